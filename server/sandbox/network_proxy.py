"""The network of sandboxed agents with `network = "proxy"` (the default when sandboxed).

Such an agent runs in bwrap with `--unshare-net`: its network namespace has only a loopback of
its own. Its one way out is a Unix socket of ours bound into the sandbox, one socket per sandbox,
so every connection arriving on it is known to be that agent's, for that session and principal.
Inside, `server/sandbox/bridge.py` listens on a loopback port and relays each connection to the
socket, and HTTP_PROXY/HTTPS_PROXY/ALL_PROXY name that port.

Here, on the host, each connection is one HTTP proxy request: `CONNECT host:port` (a tunnel, for
https) or `GET http://host/...` (plain http, forwarded). It is allowed only when the host is on
the agent's `allowed_domains` (an exact name or `*.suffix`) and every address we connect to,
resolved here, is public: loopback, link-local (metadata endpoints), multicast and unspecified
addresses always refused, private ones (RFC 1918, CGNAT, ULA) unless the agent's
`allow_private_destinations`. So the gateway's own port, the database and the LAN stay out of
reach, and a DNS answer pointing at them changes nothing (we connect to the address we checked).
A session's http/sse MCP servers (`allow_mcp`, when its agent opens the session: a box is one
agent process's, so one session's) add their exact host:port; one the operator named may be
at a private address (the one named, not the range); loopback and link-local never.
Every decision is counted (`sessiongate_proxy_connections{agent,decision}`) and logged with the
session and principal. Bounded: the request head (8 KiB, 10 s), the connect (10 s), idleness
(300 s), and connections at once per agent and principal (64).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sessiongate.server.settings import AgentConfig

log = logging.getLogger("sessiongate.proxy")

HEAD_LIMIT = 8192  # bytes of a request line and its headers
HEAD_TIMEOUT = 10.0  # seconds to send them
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # a connection with no byte either way for this long is closed
MAX_CONNECTIONS = 64  # open at once per agent and principal
HOLD_GRACE = 60.0  # a sandbox's socket nobody holds after this long (the sandbox never came up) closes
CHUNK = 65536
HOLD = b"SESSIONGATE-HOLD"  # the bridge's first connection: held open for the sandbox's life
SHOWN = 120  # characters of a host name we log
MAX_MCP_DESTINATIONS = 64  # host:port pairs a sandbox's MCP servers may add

Counter = Callable[[str, str], None]  # (agent, decision)


class Refused(Exception):
    """A request the proxy will not carry: `decision` for the metrics, `status` for the agent."""

    def __init__(self, decision: str, status: str, why: str) -> None:
        super().__init__(why)
        self.decision, self.status, self.why = decision, status, why


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of `host` (tests replace this to name a test server)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def domain_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """`host` is one of `domains`, or under a `*.suffix` of them (not the bare suffix)."""
    host = host.lower().rstrip(".")
    for domain in domains:
        domain = domain.lower().rstrip(".")
        if domain.startswith("*."):
            if host.endswith(domain[1:]) and len(host) > len(domain) - 1:
                return True
        elif host == domain:
            return True
    return False


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def address_refused(address: str, allow_private: bool) -> str | None:
    """Why an agent may not connect to `address`, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast or ip.is_reserved:
        return "reserved"
    if (ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT)) and not allow_private:
        return "private"
    return None


def _target(authority: str, default_port: int) -> tuple[str, int]:
    """host[:port] or [v6]:port → (host, port); ValueError when malformed."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest.removeprefix(":") or str(default_port)
    else:
        host, sep, port = authority.rpartition(":")
        if not sep:
            host, port = authority, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or len(host) > 253:
        raise ValueError("bad host or port")
    return host, int(port)


@dataclass(eq=False)  # by identity: kept in a set
class _Sandbox:
    """One sandbox's socket: whose it is, and what it may reach."""

    agent: str
    principal: str
    session: str
    domains: tuple[str, ...]
    allow_private: bool
    path: Path
    server: asyncio.AbstractServer | None = None
    held: bool = False
    # A session's MCP servers: (host, port) -> may it be a private address (operator-named).
    mcp: dict[tuple[str, int], bool] = field(default_factory=dict)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


def _host_key(host: str) -> str:
    return host.lower().rstrip(".")


class SandboxNetwork:
    """The handle of one sandbox's socket, kept by its agent process: where to bind it, and the
    destinations its session's MCP servers add once the session is opened."""

    def __init__(self, box: _Sandbox) -> None:
        self._box = box

    @property
    def path(self) -> Path:
        """The socket on the host, bound into the sandbox."""
        return self._box.path

    def allow_mcp(self, destinations: Iterable[tuple[str, int, bool]]) -> None:
        """Let the sandbox reach each (host, port) exactly, still at a public address only unless
        its flag (an operator-named server: that host may be private) or allow_private_destinations.
        ValueError past MAX_MCP_DESTINATIONS."""
        for host, port, private in destinations:
            key = (_host_key(host), port)
            if key not in self._box.mcp and len(self._box.mcp) >= MAX_MCP_DESTINATIONS:
                raise ValueError(f"over {MAX_MCP_DESTINATIONS} MCP destinations")
            self._box.mcp[key] = self._box.mcp.get(key, False) or private


class NetworkProxy:
    """One per server: a Unix socket per sandbox (`open`), and the filtering proxy behind them."""

    def __init__(self, count: Counter) -> None:
        self._count = count
        # 0711: an agent running as another user can reach its own socket, list none of them.
        self._dir = Path(tempfile.mkdtemp(prefix="sessiongate-proxy-"))
        os.chmod(self._dir, 0o711)
        self._sandboxes: set[_Sandbox] = set()
        self._open: dict[tuple[str, str], int] = {}  # connections at once by (agent, principal)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def open(self, config: AgentConfig, principal: str, session: str, uid: int | None) -> SandboxNetwork:
        """A new socket for one sandbox of `config`'s agent (its handle: `path` to bind inside).
        It closes when the sandbox's bridge lets go of it, or unheld after HOLD_GRACE."""
        if self._closed:
            raise RuntimeError("the network proxy is stopped")
        path = self._dir / f"{secrets.token_hex(8)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o600)
            if uid is not None:
                os.chown(path, uid, -1)
            listener.listen(64)
            listener.setblocking(False)
        except OSError:
            listener.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        box = _Sandbox(
            config.name, principal, session, config.allowed_domains, config.allow_private_destinations, path
        )
        self._sandboxes.add(box)
        self._spawn(self._serve(box, listener))
        return SandboxNetwork(box)

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        for box in list(self._sandboxes):
            self._close(box)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _close(self, box: _Sandbox) -> None:
        self._sandboxes.discard(box)
        if box.server is not None:
            box.server.close()
        for writer in list(box.writers):
            writer.close()
        with contextlib.suppress(OSError):
            box.path.unlink()

    async def _serve(self, box: _Sandbox, listener: socket.socket) -> None:
        try:
            box.server = await asyncio.start_unix_server(
                lambda r, w: self._connection(box, r, w), sock=listener, limit=HEAD_LIMIT
            )
        except OSError:
            listener.close()
            self._close(box)
            return
        await asyncio.sleep(HOLD_GRACE)
        if not box.held:
            self._close(box)

    async def _connection(
        self, box: _Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        key = (box.agent, box.principal)
        box.writers.add(writer)
        self._open[key] = self._open.get(key, 0) + 1
        try:
            await self._request(box, reader, writer, over=self._open[key] > MAX_CONNECTIONS)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]
            box.writers.discard(writer)
            writer.close()

    async def _request(
        self, box: _Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, over: bool
    ) -> None:
        host, port = "", 0
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.LimitOverrunError, ValueError):
                raise Refused(
                    "bad_request", "431 Request Header Fields Too Large", "request head too large"
                ) from None
            except (TimeoutError, asyncio.IncompleteReadError):
                raise Refused("bad_request", "400 Bad Request", "no complete request head") from None
            line, _, headers = head.partition(b"\r\n")
            if line == HOLD:
                if box.held:
                    raise Refused("bad_request", "400 Bad Request", "held already")
                box.held = True  # the bridge: its sandbox lives while this stays open
                while await reader.read(CHUNK):
                    pass
                self._close(box)
                return
            if over:
                raise Refused("refused_limit", "429 Too Many Requests", f"over {MAX_CONNECTIONS} connections")
            method, target, forward = self._parse(line, headers)
            host, port = target
            address = await self._check(box, host, port)
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)
            except (TimeoutError, OSError):
                raise Refused("unreachable", "502 Bad Gateway", "cannot connect") from None
        except Refused as refused:
            self._decide(box, refused.decision, host, port, refused.why)
            body = f"sessiongate proxy: {refused.why}\n".encode()
            writer.write(
                f"HTTP/1.1 {refused.status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
            return
        self._decide(box, "allowed", host, port, address)
        up_reader, up_writer = upstream
        box.writers.add(up_writer)
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                up_writer.write(forward)
            await _pipe(reader, writer, up_reader, up_writer)
        finally:
            box.writers.discard(up_writer)
            up_writer.close()

    @staticmethod
    def _parse(line: bytes, headers: bytes) -> tuple[str, tuple[str, int], bytes]:
        """(method, (host, port), the head to send upstream for plain http)."""
        try:
            method, target, version = line.decode("ascii").split(" ")
            if method == "CONNECT":
                return method, _target(target, 443), b""
            scheme, sep, rest = target.partition("://")
            if scheme.lower() != "http" or not sep or not method.isalpha():
                raise ValueError("not an absolute http:// URL")
            authority, slash, path = rest.partition("/")
            host, port = _target(authority.rpartition("@")[2], 80)
        except (UnicodeDecodeError, ValueError):
            raise Refused("bad_request", "400 Bad Request", "not a proxy request") from None
        # One request per connection, to the host it names; the proxy's own headers dropped.
        kept = [
            h
            for h in headers.split(b"\r\n")
            if h and not h.lower().startswith((b"proxy-", b"connection:", b"keep-alive:"))
        ]
        request = f"{method} {slash}{path} {version}".encode()
        return method, (host, port), b"\r\n".join([request, *kept, b"Connection: close", b"", b""])

    async def _check(self, box: _Sandbox, host: str, port: int) -> str:
        """The address to connect to, or Refused."""
        mcp = box.mcp.get((_host_key(host), port))
        if mcp is None and not domain_allowed(host, box.domains):
            raise Refused("refused_domain", "403 Forbidden", "host not in allowed_domains")
        allow_private = box.allow_private or bool(mcp)
        try:
            addresses = await asyncio.wait_for(resolve(host, port), CONNECT_TIMEOUT)
        except (TimeoutError, OSError):
            raise Refused("unreachable", "502 Bad Gateway", "cannot resolve") from None
        why = "no address"
        for address in addresses:
            refused = address_refused(address, allow_private)
            if refused is None:
                return address
            why = f"{refused} address {address}"
        raise Refused("refused_address", "403 Forbidden", why)

    def _decide(self, box: _Sandbox, decision: str, host: str, port: int, detail: str) -> None:
        self._count(box.agent, decision)
        level = logging.INFO if decision == "allowed" else logging.WARNING
        log.log(
            level,
            "proxy %s host=%s port=%d (%s) agent=%s session=%s principal=%s",
            decision,
            host[:SHOWN],
            port,
            detail,
            box.agent,
            box.session,
            box.principal,
        )


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Copies both ways until both ends finish, or nothing moves for IDLE_TIMEOUT."""
    last = [time.monotonic()]

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = await asyncio.wait_for(source.read(CHUNK), IDLE_TIMEOUT / 4)
            except TimeoutError:
                if time.monotonic() - last[0] > IDLE_TIMEOUT:
                    raise
                continue
            if not data:
                if sink.can_write_eof():
                    sink.write_eof()
                return
            last[0] = time.monotonic()
            sink.write(data)
            await asyncio.wait_for(sink.drain(), IDLE_TIMEOUT)

    tasks = [asyncio.ensure_future(copy(reader, up_writer)), asyncio.ensure_future(copy(up_reader, writer))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
