"""A real MCP server for the tests, written with the official `mcp` SDK (MCPServer, once FastMCP).

    python -m tests.mcp_server stdio
    python -m tests.mcp_server http --port N    # streamable HTTP on http://127.0.0.1:N/mcp
    python -m tests.mcp_server sse --port N     # SSE on http://127.0.0.1:N/sse

Tools: `echo(text)` returns the text, `add(a, b)` the sum, and `secret_env(name)` says whether
the variable is "set" or "unset" in the server's environment, never its value: a test proves
that an env value reached the server while the value appears in no reply.
"""

from __future__ import annotations

import argparse
import os

from mcp.server.mcpserver import MCPServer

HTTP_PATH = "/mcp"

server = MCPServer("sessiongate-test-tools")


@server.tool()
def echo(text: str) -> str:
    """Return the text as given."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Return a + b."""
    return a + b


@server.tool()
def secret_env(name: str) -> str:
    """Whether the environment variable is "set" or "unset" here (never its value)."""
    return "set" if os.environ.get(name) else "unset"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tests.mcp_server", description=__doc__)
    parser.add_argument("transport", choices=("stdio", "http", "sse"))
    parser.add_argument("--port", type=int, default=0, help="http, sse: the loopback port to listen on")
    opts = parser.parse_args(argv)
    if opts.transport == "stdio":
        server.run("stdio")
    elif opts.transport == "sse":
        server.run("sse", host="127.0.0.1", port=opts.port)
    else:
        server.run("streamable-http", host="127.0.0.1", port=opts.port, streamable_http_path=HTTP_PATH)


if __name__ == "__main__":
    main()
