"""`python -m server` / `sessiongate-server`: flags -> settings -> serve."""

from __future__ import annotations

import asyncio
import sys

from server import logs
from server.app import serve
from server.settings import ConfigError, load_settings
from server.store import StoreError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"sessiongate-server: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        return asyncio.run(serve(settings))
    except ConfigError as exc:  # found while starting (a tokens file, say)
        print(f"sessiongate-server: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, StoreError) as exc:
        print(f"sessiongate-server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
