"""Who is calling: principals, the bearer-token table they come from, and the current one.

The tokens file is TOML, one table per principal; only SHA-256 hashes of tokens are stored:

    [principals.alice]
    token_sha256 = "<64 hex digits>"   # printf %s "$TOKEN" | sha256sum
    admin = false                      # an admin sees and may act on every session
    agents = ["claude"]                # agents this principal may use; empty or absent: all
    max_sessions = 20                  # sessions it may keep; absent: no limit
    max_live_sessions = 4              # of them with a running agent at once; absent: no own limit
    max_prompts_per_minute = 30        # absent: no limit
    roots = ["/srv/work/{principal}"]  # where its sessions may be; absent: the server's roots
    mcp_servers = ["github"]           # operator-named MCP servers it may ask for; absent: none
    client_mcp_servers = false         # may it supply its own MCP servers; absent: false

`roots` narrow the server's own (allowed_roots, or the workdir): each must lie inside one of
them, and none may contain the state directory (checked at start, exit 2, and at each reload).
`{principal}` is the principal's name made one safe path component (as its home is: a name
with `/`, `..` or a leading dot cannot climb out). A principal with roots has its first root as
its default cwd, made 0700 when missing (only that last directory). Its sessions' directories
are checked against them, its principal's, at every agent start, whoever asks for it.

A presented token is hashed and compared with every stored hash in constant time. The file
is re-read when it changes; a file that no longer parses keeps the last good table (logged).

The principal of the call being served travels in a context variable set by the auth
interceptor, never as a parameter: `current()` is ANONYMOUS when no authentication is
configured: sessions created then belong to no principal, and every session is visible.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessiongate.server.errors import clip
from sessiongate.server.sandbox.launcher import principal_dir
from sessiongate.server.settings import ConfigError

log = logging.getLogger("sessiongate.auth")

RELOAD_INTERVAL = 2.0  # seconds between checks of the tokens file for changes
LIMIT_KEYS = ("max_sessions", "max_live_sessions", "max_prompts_per_minute")  # whole numbers >= 1
KEYS = ("token_sha256", "admin", "agents", "roots", "mcp_servers", "client_mcp_servers", *LIMIT_KEYS)


class TokensFileError(ConfigError):
    """The tokens file cannot be used; the message says which entry and why."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    admin: bool = False
    agents: tuple[str, ...] = ()  # empty: every agent
    max_sessions: int | None = None  # sessions it may keep (suspended ones too); None: no limit
    # Its sessions with a running agent (holding an agent slot) at once; None: no limit of its
    # own, only the fair share of the slots (server/agents/slots.py).
    max_live_sessions: int | None = None
    max_prompts_per_minute: int | None = None  # prompts it may send in any 60 s; None: no limit
    # Where its sessions' directories may be (resolved; the first is its default cwd); empty:
    # the server's roots.
    roots: tuple[Path, ...] = ()
    # Operator-named MCP servers it may ask for in CreateSession (beyond its agent's own); None:
    # every one (no authentication: ANONYMOUS).
    mcp_servers: tuple[str, ...] | None = ()
    client_mcp_servers: bool = False  # may it supply its own MCP servers in CreateSession

    def may_use(self, agent: str) -> bool:
        return not self.agents or agent in self.agents

    def may_use_mcp_server(self, name: str) -> bool:
        return self.mcp_servers is None or name in self.mcp_servers

    def may_see(self, principal: str) -> bool:
        """Whether sessions of `principal` (a name) are this one's to see."""
        return self.admin or principal == self.name


# No authentication configured: one trust domain. Its sessions belong to no principal, and it
# sees every session (also those of principals of an earlier run with authentication).
ANONYMOUS = Principal(name="", admin=True, mcp_servers=None, client_mcp_servers=True)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "sessiongate_principal", default=ANONYMOUS
)


def current() -> Principal:
    """The principal of the call being served (ANONYMOUS without authentication)."""
    return _current.get()


def acting_as(principal: Principal) -> None:
    """The caller of the current task's call (set once per call by the auth interceptor)."""
    _current.set(principal)


def live_limits(tokens: TokenTable | None, authenticated: bool) -> Callable[[str], int | None] | None:
    """For the slots: each principal's max_live_sessions by name, or None without authentication
    (one trust domain: nothing to share fairly). mTLS without a tokens file names principals
    that have no limits of their own (they still get only a fair share)."""
    if not authenticated:
        return None
    return tokens.live_limit if tokens is not None else _no_limit


def _no_limit(name: str) -> int | None:
    return None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """The principals of a tokens file, kept in step with the file."""

    def __init__(self, path: Path, allowed: tuple[Path, ...] = (), state_dir: Path | None = None) -> None:
        """`allowed`: the server's roots, which principals' roots must lie inside (empty: no
        such rule); `state_dir`: what no principal's root may contain."""
        self.path = path
        self._rules = _RootRules(allowed, state_dir)
        self._hashes: list[tuple[bytes, Principal]] = []
        self._stamp: tuple[int, int, int] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Read the file now (at start: an unusable file is a configuration error)."""
        stamp = _stamp(self.path)
        self._hashes = _parse(self.path, self._rules)
        self._stamp = stamp

    def principal(self, token: str) -> Principal | None:
        """The principal whose token this is, or None; the comparison is constant-time."""
        presented = token_hash(token).encode()
        found = None
        for stored, principal in self._hashes:  # no early exit: the time says nothing
            if hmac.compare_digest(presented, stored):
                found = principal
        return found

    def by_name(self, name: str) -> Principal | None:
        """The principal of this name (an mTLS client's certificate names it), or None."""
        return next((p for _, p in self._hashes if p.name == name), None)

    def live_limit(self, name: str) -> int | None:
        """The max_live_sessions of the principal of this name (None: none, or no such principal),
        as the table says now: the slots ask at every agent start, so a reload applies at once."""
        principal = self.by_name(name)
        return principal.max_live_sessions if principal is not None else None

    def roots_of(self, name: str) -> tuple[Path, ...]:
        """The roots of the principal of this name as the table says now (empty: none of its
        own, or no such principal): asked at every agent start, so a reload applies at once."""
        principal = self.by_name(name)
        return principal.roots if principal is not None else ()

    def start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="sessiongate-tokens")

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                await asyncio.to_thread(self._reload_if_changed)
            except Exception:  # keep watching whatever happened
                log.exception("checking the tokens file failed path=%s", self.path)

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            log.error("tokens file unreadable, keeping the last good one path=%s: %s", self.path, exc)
            return
        if stamp == self._stamp:
            return
        try:
            hashes = _parse(self.path, self._rules)
        except TokensFileError as exc:
            log.error("tokens file rejected, keeping the last good one: %s", exc)
            return
        self._hashes, self._stamp = hashes, stamp
        log.info("tokens file reloaded path=%s principals=%d", self.path, len(hashes))


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass(frozen=True, slots=True)
class _RootRules:
    allowed: tuple[Path, ...]
    state_dir: Path | None


def _parse(path: Path, rules: _RootRules) -> list[tuple[bytes, Principal]]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TokensFileError(f"tokens file {path} is not valid TOML: {exc}") from exc
    principals = document.get("principals", {})
    if set(document) - {"principals"} or not isinstance(principals, dict):
        raise TokensFileError(f"tokens file {path}: expected only [principals.NAME] tables")
    out = []
    for name, table in principals.items():
        out.append((_hash_of(name, table).encode(), _principal(name, table, rules)))
    return out


def _hash_of(name: str, table: Any) -> str:
    where = f"[principals.{name}]"
    if not isinstance(table, dict):
        raise TokensFileError(f"{where} must be a table")
    unknown = set(table) - set(KEYS)
    if unknown:
        raise TokensFileError(f"{where}: unknown keys {sorted(unknown)}")
    digest = table.get("token_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise TokensFileError(f"{where}: token_sha256 must be 64 lower-case hex digits (sha256sum)")
    return digest


def _principal(name: str, table: dict[str, Any], rules: _RootRules) -> Principal:
    where = f"[principals.{name}]"
    admin = table.get("admin", False)
    agents = table.get("agents", [])
    if not isinstance(admin, bool):
        raise TokensFileError(f"{where}: admin must be true or false")
    if not isinstance(agents, list) or not all(isinstance(a, str) and a for a in agents):
        raise TokensFileError(f"{where}: agents must be a list of agent names")
    if not name:
        raise TokensFileError("a principal needs a name")
    limits = {}
    for key in LIMIT_KEYS:
        value = table.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TokensFileError(f"{where}: {key} must be a whole number, 1 or more")
        limits[key] = value
    roots = _roots(where, name, table.get("roots", []), rules)
    mcp_servers = table.get("mcp_servers", [])
    if not isinstance(mcp_servers, list) or not all(isinstance(m, str) and m for m in mcp_servers):
        raise TokensFileError(f"{where}: mcp_servers must be a list of [mcp_servers.NAME] names")
    client_mcp_servers = table.get("client_mcp_servers", False)
    if not isinstance(client_mcp_servers, bool):
        raise TokensFileError(f"{where}: client_mcp_servers must be true or false")
    return Principal(
        name=name,
        admin=admin,
        agents=tuple(agents),
        roots=roots,
        mcp_servers=tuple(mcp_servers),
        client_mcp_servers=client_mcp_servers,
        **limits,
    )


def _roots(where: str, name: str, templates: Any, rules: _RootRules) -> tuple[Path, ...]:
    if not isinstance(templates, list) or not all(isinstance(t, str) and t for t in templates):
        raise TokensFileError(f"{where}: roots must be a list of absolute directories")
    roots = []
    for template in templates:
        # The name as one path component, never a `/`, `..` or NUL of its own.
        expanded = os.path.expanduser(template).replace("{principal}", principal_dir(name))
        if "\x00" in expanded or not os.path.isabs(expanded):
            raise TokensFileError(f"{where}: root {clip(template)!r} must be an absolute directory")
        try:
            root = Path(expanded).resolve()  # need not exist yet: the first one is made when used
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise TokensFileError(
                f"{where}: root {clip(template)!r} cannot be resolved: {clip(str(exc))}"
            ) from None
        if rules.state_dir is not None and rules.state_dir.is_relative_to(root):
            raise TokensFileError(
                f"{where}: root {clip(str(root))} contains the state directory {rules.state_dir} "
                "(state_db): its sessions' agents would see every session's data"
            )
        if rules.allowed and not any(root.is_relative_to(a) for a in rules.allowed):
            shown = ", ".join(str(a) for a in rules.allowed)
            raise TokensFileError(
                f"{where}: root {clip(str(root))} is outside the server's roots ({clip(shown)}): "
                "a principal's roots narrow allowed_roots (or the workdir), never widen them"
            )
        roots.append(root)
    return tuple(roots)
