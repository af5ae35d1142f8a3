"""The `client_tools` MCP server as the agent starts it: a relay to the gateway.

    python -I -S -c <this file> SOCKET

A session with client tools gives its agent one stdio MCP server, this. It connects to SOCKET
(the session's socket on the gateway, bound into the agent's sandbox) and carries bytes both
ways, stdin to the socket and the socket to stdout, until either side ends. The MCP server
itself runs in the gateway (turns/client_tools.py), which bounds what it reads. Standard
library only: it runs with the server's interpreter (or a system python3), by source, without
the server's packages, inside any agent's sandbox.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CHUNK = 65536


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.stderr.write("usage: tools_relay SOCKET\n")
        sys.exit(2)
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(argv[0])
    except OSError as error:
        sys.stderr.write(f"client_tools: cannot reach the gateway ({error.strerror})\n")
        sys.exit(1)
    threading.Thread(target=_to_gateway, args=(upstream,), daemon=True).start()
    try:
        while True:  # the gateway's answers, until it closes (or the agent stops reading)
            data = upstream.recv(CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]
    except OSError:
        pass
    os._exit(0)


def _to_gateway(upstream: socket.socket) -> None:
    """The agent's requests; its end of stdin half-closes the socket (the gateway then ends)."""
    try:
        while True:
            data = os.read(0, CHUNK)
            if not data:
                break
            upstream.sendall(data)
        upstream.shutdown(socket.SHUT_WR)
    except OSError:
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
