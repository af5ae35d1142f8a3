"""Tools a gRPC client serves itself, given to the session's agent as one MCP server.

A session created with `client_tools` gives its agent a stdio MCP server named `client_tools`:
our relay (sandbox/tools_relay.py), which connects to this session's Unix socket. Here, behind
that socket, the MCP SDK's low-level server answers `tools/list` with the declared tools and
turns each `tools/call` into a question of the running turn (questions.py): a `tool_request`
event that any connection of the session's principal answers with RespondToolCall.

The socket is reachable from the agent's sandbox only (it is bound in at the same path, under
/tmp, by the launcher), in a directory only the server lists. Whatever comes through it is the
agent's, so it is bounded like everything an agent writes: a line longer than MAX_LINE ends the
connection, arguments larger than MAX_INPUT_BYTES are refused, at most MAX_CONNECTIONS at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sessiongate.server.sandbox.launcher import agent_script
from sessiongate.server.settings import AgentConfig, McpServerConfig

if TYPE_CHECKING:
    from sessiongate.server.turns.questions import TurnAsker

log = logging.getLogger("sessiongate.client_tools")

SERVER_NAME = "client_tools"  # the MCP server's name in the session (no other may take it)
MAX_TOOLS = 64
MAX_LINE = 2 * 1024 * 1024  # one MCP message from the agent's side
MAX_INPUT_BYTES = 256 * 1024  # a call's arguments as JSON; larger ones get an error, not an event
MAX_CONNECTIONS = 8  # the agent (re)starting its MCP server: more at once are closed at once
WRITE_TIMEOUT = 30.0  # seconds an agent may leave our answer unread before we hang up


@dataclass(frozen=True, slots=True)
class ClientToolSpec:
    """A tool as the client declared it (CreateSessionRequest.client_tools)."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] | None = field(default=None, hash=False)

    def to_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.input_schema is not None:
            info["input_schema"] = self.input_schema
        return info

    @classmethod
    def from_info(cls, info: object) -> ClientToolSpec | None:
        """One kept in a record's agent_info; None for anything that is not one."""
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            return None
        schema = info.get("input_schema")
        return cls(
            info["name"], str(info.get("description", "")), schema if isinstance(schema, dict) else None
        )


class _SocketDir:
    """The server's directory of client tools sockets: under /tmp (the sandboxes' own tmpfs, so
    the same path can be bound in), listable by the server only (0711), removed at exit."""

    _path: Path | None = None

    @classmethod
    def path(cls) -> Path:
        if cls._path is None or not cls._path.is_dir():
            cls._path = Path(tempfile.mkdtemp(prefix="sessiongate-tools-", dir="/tmp"))
            os.chmod(cls._path, 0o711)
            atexit.register(shutil.rmtree, cls._path, True)
        return cls._path


class ClientTools:
    """One session's client tools: its socket and the MCP server behind it."""

    def __init__(
        self, session_id: str, tools: tuple[ClientToolSpec, ...], asker: Callable[[], TurnAsker | None]
    ) -> None:
        self.session_id = session_id
        self.tools = tools
        self._by_name = {tool.name: tool for tool in tools}
        self._asker = asker  # the running turn's, or None between turns
        self._server: asyncio.Server | None = None
        self._path = ""
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def socket_path(self) -> str:
        return self._path

    async def listen(self) -> str:
        """The socket's path, listening (opened at the session's first agent start)."""
        if self._server is None:
            path = str(_SocketDir.path() / f"{secrets.token_hex(8)}.sock")
            self._server = await asyncio.start_unix_server(self._accept, path, limit=MAX_LINE)
            os.chmod(path, 0o666)  # an agent run as another user (config `user`) connects too
            self._path = path
        return self._path

    def mcp_server(self, config: AgentConfig) -> McpServerConfig:
        """The stdio MCP server `config`'s agent starts: the relay to our socket."""
        command, *args = agent_script(config, "tools_relay.py", self._path)
        return McpServerConfig(SERVER_NAME, "stdio", command=command, args=tuple(args))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(OSError):
            os.unlink(self._path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            log.warning("too many client tools connections session=%s; closing one", self.session_id)
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the agent's side broke the protocol: its connection ends, not us
            log.warning(
                "client tools connection ended session=%s error=%s", self.session_id, type(error).__name__
            )
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from mcp.server.lowlevel import Server
        from mcp.server.stdio import stdio_server

        server = Server(SERVER_NAME, on_list_tools=self._list_tools, on_call_tool=self._call_tool)
        async with stdio_server(_Lines(reader), _Writer(writer)) as (read_stream, write_stream):  # type: ignore[arg-type]
            await server.run(read_stream, write_stream, server.create_initialization_options())

    async def _list_tools(self, _context: Any, _params: Any) -> Any:
        import mcp_types as types

        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=tool.name,
                    description=tool.description,
                    input_schema=tool.input_schema or {"type": "object"},
                )
                for tool in self.tools
            ]
        )

    async def _call_tool(self, _context: Any, params: Any) -> Any:
        import mcp_types as types

        def result(text: str, is_error: bool, structured: dict[str, Any] | None = None) -> Any:
            content: list[types.ContentBlock] = [types.TextContent(type="text", text=text)]
            return types.CallToolResult(content=content, structured_content=structured, is_error=is_error)

        name = params.name
        if name not in self._by_name:
            return result("no such client tool", True)
        arguments = params.arguments or {}
        if len(json.dumps(arguments)) > MAX_INPUT_BYTES:
            return result(f"{name}: arguments larger than {MAX_INPUT_BYTES} bytes", True)
        asker = self._asker()
        if asker is None:
            return result(f"{name}: no turn is running; client tools answer during a turn only", True)
        answer = await asker.client_tool(name, arguments)
        return result(answer.text, answer.is_error, answer.structured)


class _Lines:
    """The agent's side of the socket as the MCP SDK's stdio transport reads it: lines of text.
    A line longer than MAX_LINE (the reader's limit) ends the connection."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return  # the agent closed its side
            except asyncio.LimitOverrunError:
                log.warning("client tools line longer than %d bytes: closing", MAX_LINE)
                return
            yield line.decode("utf-8", errors="replace")


class _Writer:
    """Our answers to the agent, as the MCP SDK's stdio transport writes them."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode())

    async def flush(self) -> None:
        await asyncio.wait_for(self._writer.drain(), WRITE_TIMEOUT)
