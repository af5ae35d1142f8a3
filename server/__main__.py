"""`python -m sessiongate.server` / `sessiongate-server`: flags -> settings -> serve (or --check-config)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sessiongate.server.settings import Settings

# What the `server` extra brings: a client-only install (`pip install ./`) has none of it.
SERVER_MODULES = (
    "acp",
    "asyncpg",
    "cryptography",
    "grpc_reflection",
    "orjson",
    "prometheus_client",
    "uvloop",
)


def missing_server_modules() -> list[str]:
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_server_modules()
    if missing:
        print(
            f"sessiongate-server: the server's dependencies are not installed ({', '.join(missing)}): "
            "install it with `pip install 'sessiongate[server]'` (or './[server]' from a checkout)",
            file=sys.stderr,
        )
        return 1
    # Imported here, once the dependencies are known to be there: a clear message, not a traceback.
    from sessiongate.server.settings import ConfigError, check_requested, load_settings

    try:
        check = check_requested(argv)  # argparse ends --help and --version here (exit 0)
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"sessiongate-server: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sessiongate-server: {exc}", file=sys.stderr)
        return 1
    if settings.event_loop == "uvloop":
        # uvloop starts agents with libuv's fork(), which runs grpc's fork handlers in the child
        # (asyncio's loop uses vfork or posix_spawn, which do not): about 1 agent start in 13
        # died of SIGSEGV before its exec. The server never forks otherwise. Before grpc loads.
        os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    from sessiongate.server import logs
    from sessiongate.server.app import serve
    from sessiongate.server.state.base import StoreError

    try:
        logs.configure(settings.log_level, settings.log_format)
        if check:
            return report_check(settings)
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            return runner.run(serve(settings))
    except ConfigError as exc:  # in the settings, or found while starting (a tokens file, say)
        print(f"sessiongate-server: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, StoreError) as exc:
        print(f"sessiongate-server: {exc}", file=sys.stderr)
        return 1


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop (libuv's), or None: asyncio's own (the default)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def report_check(settings: Settings) -> int:
    """--check-config: "config ok" and what would be served (stdout), a warning per agent that
    could not start here (stderr, still exit 0); a ConfigError is raised to main (exit 2)."""
    from sessiongate.server.app import check_config

    problems = check_config(settings)
    for problem in problems.values():
        print(
            f"sessiongate-server: warning: {problem}; its sessions would fail AGENT_UNAVAILABLE",
            file=sys.stderr,
        )
    security = [
        *(["TLS"] if settings.tls_cert is not None else []),
        *(["client certificates"] if settings.tls_client_ca is not None else []),
        *(["tokens"] if settings.auth_tokens_file is not None else []),
    ]
    print(f"config ok: {settings.config_file or 'no config file (defaults, env vars, flags)'}")
    print(f"  listen {settings.listen} ({', '.join(security) or 'no authentication, no TLS'})")
    print(f"  agents {', '.join(sorted(settings.agents))} (default {settings.default_agent})")
    print(f"  state {'PostgreSQL (state_url)' if settings.state_url else settings.state_db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
