"""Run first inside a sandbox with `network = "proxy"`, then exec the agent (or terminal command).

    python -I -S -c <this file> SOCKET -- COMMAND...

The sandbox has only its own loopback; SOCKET is the gateway's proxy (server/sandbox/network_proxy.py),
bound in. This listens on a free 127.0.0.1 port, names it in HTTP_PROXY, HTTPS_PROXY and ALL_PROXY
(and their lower-case forms), and execs COMMAND; a detached process of its own relays every
connection to that port to SOCKET, byte for byte, and holds one connection open to SOCKET for the
sandbox's life (the gateway closes the socket when it ends). Standard library only: it runs with
the server's interpreter, by source, without the server's packages.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading

HOLD = b"SESSIONGATE-HOLD\r\n\r\n"
MAX_RELAYS = 128  # connections relayed at once; more wait in the listen backlog
IDLE = 330.0  # seconds with no byte either way (the gateway's own bound is shorter)
PROXY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: sandbox_bridge SOCKET -- COMMAND...\n")
        sys.exit(2)
    path, command = argv[0], argv[2:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)  # connections made before the relay runs wait here
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    for name in PROXY_NAMES:
        os.environ[name] = os.environ[name.lower()] = url
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "localhost,127.0.0.1,::1"
    child = os.fork()
    if child == 0:  # twice: the relay is reparented to the sandbox's init, never the agent's child
        if os.fork() == 0:
            _relay(listener, path)
        os._exit(0)
    os.waitpid(child, 0)
    listener.close()
    try:
        os.execvp(command[0], command)
    except OSError as error:
        sys.stderr.write(f"{command[0]}: {error.strerror}\n")
        sys.exit(127)


def _relay(listener: socket.socket, path: str) -> None:
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the agent's stdio is not ours to hold open
            os.dup2(null, fd)
        hold = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hold.connect(path)
        hold.sendall(HOLD)
        slots = threading.BoundedSemaphore(MAX_RELAYS)
        while True:
            connection, _ = listener.accept()
            slots.acquire()
            threading.Thread(target=_carry, args=(connection, path, slots), daemon=True).start()
    finally:
        os._exit(0)


def _carry(connection: socket.socket, path: str, slots: threading.BoundedSemaphore) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
        _pipe(connection, upstream)
    except OSError:
        pass
    finally:
        connection.close()
        upstream.close()
        slots.release()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Both ways until both sides are done (a half-close passed on), or IDLE with nothing."""
    peer = {a: b, b: a}
    reading = [a, b]
    while reading:
        ready, _, _ = select.select(reading, [], [], IDLE)
        if not ready:
            return
        for source in ready:
            data = source.recv(65536)
            if data:
                peer[source].sendall(data)
            else:
                reading.remove(source)
                peer[source].shutdown(socket.SHUT_WR)


if __name__ == "__main__":
    main(sys.argv[1:])
