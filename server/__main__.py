"""`python -m server` / `sessiongate-server`: flags -> settings -> serve."""

from __future__ import annotations

import asyncio
import logging
import sys

from server.app import serve
from server.settings import ConfigError, load_settings
from server.store import StoreError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"sessiongate-server: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(settings))
    except (OSError, StoreError) as exc:
        print(f"sessiongate-server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
