"""Client-supplied MCP servers: the SDK's typed descriptions of them, and the editors' config file.

`McpStdioServer`, `McpHttpServer` and `McpSseServer` describe a server the client gives its
session's agent (CreateSession's `client_mcp_servers`); `proto_servers` turns them (or
`pb.McpServer` messages, passed as they are) into the request's messages. `load_mcp_config`
reads the `{"mcpServers": {...}}` JSON file Claude Code, Cursor and other editors use.

Env and header values may be secrets: no repr and no error here ever shows one (keys only).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from sessiongate.v1 import session_service_pb2 as pb


def _keys(mapping: Mapping[str, str]) -> str:
    """`{'A': ..., 'B': ...}`: which keys are set, never their values."""
    return "{" + ", ".join(f"{key!r}: ..." for key in mapping) + "}"


@dataclass(frozen=True, repr=False)
class McpStdioServer:
    """A program the session's agent starts and speaks MCP to over its stdin/stdout (inside the
    agent's sandbox, with the agent's network rules). `env` is its environment (may hold
    secrets: sent once, kept encrypted by the server, never shown by it or by this repr)."""

    name: str
    command: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"McpStdioServer(name={self.name!r}, command={self.command!r}, "
            f"args={tuple(self.args)!r}, env={_keys(self.env)})"
        )

    def proto(self) -> pb.McpServer:
        if isinstance(self.args, str):  # one argument passed bare would become its letters
            raise TypeError(f"McpStdioServer {self.name!r}: args takes a list of strings, not a string")
        stdio = pb.McpStdio(command=self.command, args=list(self.args), env=dict(self.env))
        return pb.McpServer(name=self.name, stdio=stdio)


@dataclass(frozen=True, repr=False)
class McpHttpServer:
    """A streamable HTTP MCP endpoint the agent reaches (if it advertises http; its host joins
    the session's allowed network destinations). `headers` (may hold secrets) are never shown."""

    name: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.url!r}, headers={_keys(self.headers)})"

    def proto(self) -> pb.McpServer:
        return pb.McpServer(name=self.name, http=pb.McpRemote(url=self.url, headers=dict(self.headers)))


@dataclass(frozen=True, repr=False)
class McpSseServer(McpHttpServer):
    """An MCP endpoint over server-sent events (if the agent advertises sse); as McpHttpServer."""

    def proto(self) -> pb.McpServer:
        return pb.McpServer(name=self.name, sse=pb.McpRemote(url=self.url, headers=dict(self.headers)))


ClientMcpServer: TypeAlias = McpStdioServer | McpHttpServer | McpSseServer | pb.McpServer
TYPES = (McpStdioServer, McpHttpServer, McpSseServer, pb.McpServer)


def proto_servers(servers: Iterable[ClientMcpServer]) -> list[pb.McpServer]:
    """CreateSession's `client_mcp_servers` for `servers` (a list of them, not one alone)."""
    if isinstance(servers, TYPES):
        raise TypeError("client_mcp_servers takes a list of servers, not one server")
    converted = []
    for server in servers:
        if isinstance(server, pb.McpServer):
            converted.append(server)
        elif isinstance(server, TYPES):
            converted.append(server.proto())
        else:
            raise TypeError(
                "client_mcp_servers takes McpStdioServer, McpHttpServer, McpSseServer or "
                f"pb.McpServer, not {type(server).__name__}"
            )
    return converted


# ---- the editors' config file ----------------------------------------------------------------


class McpConfigError(ValueError):
    """A `--mcp-config` file that cannot be used: its message names the file, the server and
    the key, never a value."""


REMOTE_TYPES: dict[str, type[McpHttpServer]] = {
    "http": McpHttpServer,
    "streamable-http": McpHttpServer,
    "streamableHttp": McpHttpServer,
    "sse": McpSseServer,
}
# Claude Code's expansion: ${VAR}, or ${VAR:-default} when VAR is unset or empty.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SHOWN_NAME = 64  # characters of a server name an error repeats


def load_mcp_config(
    path: str | Path, environ: Mapping[str, str] | None = None
) -> list[McpStdioServer | McpHttpServer | McpSseServer]:
    """The servers of a JSON file in the shape editors use:

        {"mcpServers": {
          "NAME": {"command": "npx", "args": ["-y", "pkg"], "env": {"KEY": "${KEY}"}},
          "NAME2": {"type": "http", "url": "https://host/mcp", "headers": {"Authorization": "..."}}}}

    A server with `command` is stdio (`type` absent or "stdio"); one with `url` is http unless
    `type` is "sse". `${VAR}` and `${VAR:-default}` in any string are taken from `environ`
    (default: this process's environment), so secrets can stay out of the file. Entries with
    `"disabled": true` are left out; other keys (an editor's own) are ignored."""
    where = str(path)
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise McpConfigError(f"{where}: cannot read it ({error.strerror or type(error).__name__})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        place = error if isinstance(error, json.JSONDecodeError) else None
        at = f" at line {place.lineno} column {place.colno}" if place else ""
        raise McpConfigError(f"{where}: not valid JSON{at}") from None
    servers = document.get("mcpServers") if isinstance(document, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f'{where}: needs a top-level "mcpServers" object of servers by name')
    env = os.environ if environ is None else environ
    loaded = []
    for name, entry in servers.items():
        at = f"{where}: mcpServers.{shown_name(name)}"
        if not isinstance(entry, dict):
            raise McpConfigError(f"{at}: must be an object")
        if entry.get("disabled") is True:
            continue
        loaded.append(_server(name, entry, at, env))
    return loaded


def _server(
    name: str, entry: dict[str, Any], at: str, environ: Mapping[str, str]
) -> McpStdioServer | McpHttpServer | McpSseServer:
    kind = entry.get("type", "stdio" if "command" in entry or "url" not in entry else "http")
    if kind == "stdio":
        if "url" in entry:
            raise McpConfigError(f"{at}: a stdio server has a command, not a url")
        command = _string(entry, "command", at, environ, required=True)
        return McpStdioServer(
            name, command, tuple(_strings(entry, "args", at, environ)), _table(entry, "env", at, environ)
        )
    if kind not in REMOTE_TYPES:
        raise McpConfigError(f'{at}.type: must be "stdio", "http" or "sse"')
    if "command" in entry:
        raise McpConfigError(f"{at}: an {kind} server has a url, not a command")
    url = _string(entry, "url", at, environ, required=True)
    return REMOTE_TYPES[kind](name, url, _table(entry, "headers", at, environ))


def _string(entry: dict[str, Any], key: str, at: str, environ: Mapping[str, str], required: bool) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise McpConfigError(f"{at}.{key}: must be a string")
    if required and not value:
        raise McpConfigError(f"{at}.{key}: missing")
    return _expanded(value, f"{at}.{key}", environ)


def _strings(entry: dict[str, Any], key: str, at: str, environ: Mapping[str, str]) -> list[str]:
    values = entry.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise McpConfigError(f"{at}.{key}: must be a list of strings")
    return [_expanded(v, f"{at}.{key}", environ) for v in values]


def _table(entry: dict[str, Any], key: str, at: str, environ: Mapping[str, str]) -> dict[str, str]:
    values = entry.get(key, {})
    if not isinstance(values, dict):
        raise McpConfigError(f"{at}.{key}: must be an object of strings")
    table = {}
    for name, value in values.items():
        if not isinstance(value, str):
            raise McpConfigError(f"{at}.{key}.{shown_name(name)}: must be a string")
        table[name] = _expanded(value, f"{at}.{key}.{shown_name(name)}", environ)
    return table


def _expanded(value: str, at: str, environ: Mapping[str, str]) -> str:
    def variable(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if default is not None:
            return found or default  # ${VAR:-default}: unset or empty
        if found is None:
            raise McpConfigError(f"{at}: ${{{name}}} is not set in the environment")
        return found

    return _VARIABLE.sub(variable, value)


def shown_name(name: str) -> str:
    """A name (from the file) as an error repeats it: printable, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(name))
    return text if len(text) <= SHOWN_NAME else text[: SHOWN_NAME - 1] + "…"


def check_unique(servers: Sequence[McpStdioServer | McpHttpServer | McpSseServer]) -> None:
    """Two servers of one name (from two files): said here, before any call."""
    seen: set[str] = set()
    for server in servers:
        if server.name in seen:
            raise McpConfigError(f"MCP server {shown_name(server.name)} is given twice (--mcp-config)")
        seen.add(server.name)
