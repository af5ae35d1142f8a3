"""The built-in agent's side of MCP: the servers a session was given, and calls to their tools.

An ACP client passes `mcpServers` at session/new, session/load and session/resume; the agent
connects to them with the official `mcp` SDK for the /mcp directives. What is shown of a server
(`describe`) names its transport, its command's basename and its env and header NAMES, never
their values: replies reach clients and logs. Errors come back as one short, bounded line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from mcp import ClientSession

CALL_TIMEOUT = 30.0  # seconds for a whole connect + initialize + call
TEXT_LIMIT = 500  # characters of what a server said that a reply may carry
NAME_LIMIT = 100  # characters of a client-given name that a reply may carry

Transport = Literal["stdio", "http", "sse"]
T = TypeVar("T")


class McpCallError(Exception):
    """A call that failed: its message is short and bounded, fit for a reply."""


@dataclass(frozen=True, slots=True)
class McpServer:
    """One MCP server of a session, as ACP gave it. Its repr hides env and header values."""

    name: str
    transport: Transport
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    url: str = field(default="", repr=False)  # a URL may carry a token in its query
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def from_acp(cls, server: Any) -> McpServer | None:
        """From ACP's McpServerStdio / HttpMcpServer / SseMcpServer; None for other kinds (acp)."""
        kind = getattr(server, "type", None) or ("stdio" if hasattr(server, "command") else None)
        if kind == "stdio":
            return cls(
                name=server.name,
                transport="stdio",
                command=server.command,
                args=tuple(server.args),
                env=tuple((var.name, var.value) for var in server.env),
            )
        if kind in ("http", "sse"):
            return cls(
                name=server.name,
                transport="http" if kind == "http" else "sse",
                url=server.url,
                headers=tuple((header.name, header.value) for header in server.headers),
            )
        return None

    def describe(self) -> str:
        """`NAME TRANSPORT [command basename] [env: NAMES] [headers: NAMES]`: no values."""
        parts = [clip(self.name, NAME_LIMIT), self.transport]
        if self.transport == "stdio":
            parts.append(clip(os.path.basename(self.command), NAME_LIMIT))
        if self.env:
            parts.append("env: " + ",".join(clip(name, NAME_LIMIT) for name, _ in self.env))
        if self.headers:
            parts.append("headers: " + ",".join(clip(name, NAME_LIMIT) for name, _ in self.headers))
        return " ".join(parts)


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
    """The text, cut to `limit` characters (marked with an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def list_tools(server: McpServer, timeout: float = CALL_TIMEOUT) -> list[str]:
    """The names of the server's tools."""

    async def names(session: ClientSession) -> list[str]:
        return [tool.name for tool in (await session.list_tools()).tools]

    return await _guarded(server, timeout, names)


async def call_tool(
    server: McpServer, tool: str, arguments: dict[str, Any], timeout: float = CALL_TIMEOUT
) -> str:
    """The text content of the tool's result; McpCallError if the tool reports an error."""
    result = await _guarded(server, timeout, lambda session: session.call_tool(tool, arguments))
    text = "\n".join(_content_text(block) for block in result.content)
    if result.is_error:
        raise McpCallError(f"mcp tool error from {clip(server.name, NAME_LIMIT)}: {clip(text)}")
    return clip(text, 4 * TEXT_LIMIT)


def _content_text(block: Any) -> str:
    text = getattr(block, "text", None)
    return text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]"


async def _guarded(server: McpServer, timeout: float, work: Callable[[ClientSession], Awaitable[T]]) -> T:
    """`work` on a fresh session within `timeout`; any failure becomes one short McpCallError line."""
    name = clip(server.name, NAME_LIMIT)
    try:
        async with asyncio.timeout(timeout), _session(server) as session:
            return await work(session)
    except TimeoutError:
        raise McpCallError(f"mcp error: {name} did not answer within {timeout:g}s") from None
    except Exception as exc:
        cause = _leaf(exc)
        raise McpCallError(f"mcp error: {name}: {type(cause).__name__}: {clip(str(cause))}") from None


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (anyio's) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


@contextlib.asynccontextmanager
async def _session(server: McpServer) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session over the server's transport, closed on exit."""
    # Imported here: the SDK (starlette, httpx2, ...) would slow every agent's start-up.
    import httpx2
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.sse import sse_client
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    async with contextlib.AsyncExitStack() as stack:
        if server.transport == "stdio":
            # The server's stderr is not ours to forward: it may print what its env holds.
            errlog = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115, ASYNC230 (never blocks)
            params = StdioServerParameters(
                command=server.command, args=list(server.args), env=dict(server.env)
            )
            read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
        elif server.transport == "http":
            http = await stack.enter_async_context(
                httpx2.AsyncClient(headers=dict(server.headers), timeout=CALL_TIMEOUT)
            )
            read, write = await stack.enter_async_context(
                streamable_http_client(server.url, http_client=http)
            )
        else:
            read, write = await stack.enter_async_context(
                sse_client(server.url, headers=dict(server.headers))
            )
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        yield session
