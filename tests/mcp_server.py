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
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
    parser.add_argument("--port", type=int, default=0, help="http, sse: the port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="http, sse: the address to listen on")
    opts = parser.parse_args(argv)
    if opts.transport == "stdio":
        server.run("stdio")
    elif opts.transport == "sse":
        server.run("sse", host=opts.host, port=opts.port)
    else:
        server.run("streamable-http", host=opts.host, port=opts.port, streamable_http_path=HTTP_PATH)


@contextlib.contextmanager
def serving(transport: str, host: str = "127.0.0.1") -> Iterator[int]:
    """This server over `transport` (http or sse) on `host` and a free port, which it yields;
    ended with its process group afterwards."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mcp_server", transport, "--host", host, "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex((host, port)) == 0:
                    break
            assert process.poll() is None, "the MCP server exited"
            time.sleep(0.05)
        else:
            raise AssertionError("the MCP server did not listen within 10s")
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


if __name__ == "__main__":
    main()
