"""A sandboxed agent's network, for real (issue 20 item 4): `network = "proxy"` (the default)
reaches only its `allowed_domains`, at public addresses, through the gateway's proxy; never the
gateway's own port, the database's, or a host not on its list. "none" reaches nothing; "host" is
the host's network, as before.

The agent is the built-in one, in bwrap, trying each with a terminal: a direct connection
(python's socket) and requests through the proxy its environment names (curl). The allowed host
is a test HTTP server on this machine's own non-loopback address; the test names it `allowed.test`
by replacing the proxy's resolver, and lets that agent reach private addresses (the address a
test machine has is one), so every check of the production path still runs: `sneaky.test`, also
allowed, resolves to loopback and is refused.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sessiongate.server.sandbox import network_proxy
from sessiongate.server.sandbox.network_proxy import NetworkProxy, address_refused, domain_allowed
from sessiongate.server.settings import AgentConfig, ConfigError, load_settings
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ECHO, Gate, GateFactory, reply_text
from tests.test_sandbox import needs_bwrap

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
BODY = "hello-from-the-allowed-host"


def local_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@dataclass
class Listener:
    host: str
    port: int
    accepted: int = 0


@pytest.fixture
async def web() -> AsyncIterator[Listener]:
    """A plain HTTP server on the machine's non-loopback address, answering BODY."""
    address = local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address for the allowed test host")
    listener = Listener(address, 0)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.accepted += 1
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n{BODY}".encode()
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, address, 0)
    listener.port = server.sockets[0].getsockname()[1]
    yield listener
    server.close()


@pytest.fixture
async def database() -> AsyncIterator[Listener]:
    """A listener on loopback standing in for PostgreSQL: it counts who reaches it."""
    listener = Listener("127.0.0.1", 0)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.accepted += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    yield listener
    server.close()


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch, web: Listener) -> None:
    """The proxy's resolver, for test names: allowed.test (and elsewhere.test) is the web server,
    sneaky.test is loopback; any other name is not found."""
    table = {"allowed.test": web.host, "elsewhere.test": web.host, "sneaky.test": "127.0.0.1"}

    async def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return [table[host]]
        raise OSError("not found")

    monkeypatch.setattr(network_proxy, "resolve", resolve)


def boxed(network: str | bool, name: str = "boxed") -> AgentConfig:
    return AgentConfig(
        name=name,
        command=ECHO[0],
        args=ECHO[1:],
        sandbox="bwrap",
        client_terminal=True,
        network=network,
        allowed_domains=("allowed.test", "sneaky.test"),
        allow_private_destinations=True,
    )


async def run(gate: Gate, sid: str, command: str) -> str:
    request = pb.PromptRequest(session_id=sid, text=f"/terminal {command}")
    return reply_text([e async for e in gate.stub.Prompt(request, timeout=90)])


def connect(host: str, port: int) -> str:
    """A direct TCP connection from inside the sandbox: prints connected, or the error."""
    code = (
        "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)\n"
        " print('connected')\nexcept OSError as e:\n print('refused', e)"
    )
    return f'{sys.executable} -I -c "{code}" {host} {port}'


def curl(url: str, tunnel: bool = False) -> str:
    return f"curl -f -s -S -m 20 --noproxy '' {'-p ' if tunnel else ''}{url}; echo ' code='$?"


def decisions(gate: Gate) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in gate.running.metrics.registry.collect():
        if family.name == "sessiongate_proxy_connections":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["agent"] == "boxed":
                    found[sample.labels["decision"]] = sample.value
    return found


@needs_bwrap
@needs_curl
@pytest.mark.usefixtures("names")
async def test_the_proxy_reaches_an_allowed_host_and_refuses_the_gateway_the_database_and_others(
    make_gate: GateFactory, web: Listener, database: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sessiongate.proxy")
    gate = await make_gate(agents={"boxed": boxed("proxy")})
    sid = (await gate.create(agent="boxed")).session_id

    # Never directly: the gateway's port, the database's, the allowed host's own address.
    for host, port in (("127.0.0.1", gate.running.port), ("127.0.0.1", database.port), (web.host, web.port)):
        reply = await run(gate, sid, connect(host, port))
        assert "connected" not in reply and "refused" in reply, (host, port, reply)

    # Through the proxy its environment names: plain http forwarded, and a CONNECT tunnel.
    assert "=http://127.0.0.1:" in await run(gate, sid, "echo proxy=$HTTPS_PROXY")
    reply = await run(gate, sid, curl(f"http://allowed.test:{web.port}/"))
    assert BODY in reply and "code=0" in reply, reply
    reply = await run(gate, sid, curl(f"http://allowed.test:{web.port}/", tunnel=True))
    assert BODY in reply and "code=0" in reply, reply
    reached = web.accepted

    # Nor through the proxy: by address, by a name off its list, by an allowed name that
    # resolves to loopback.
    for url, tunnel in (
        (f"http://127.0.0.1:{gate.running.port}/", True),
        (f"http://localhost:{database.port}/", False),
        (f"http://sneaky.test:{database.port}/", True),
        (f"http://sneaky.test:{gate.running.port}/", False),
        (f"http://elsewhere.test:{web.port}/", False),
        (f"http://elsewhere.test:{web.port}/", True),
    ):
        reply = await run(gate, sid, curl(url, tunnel))
        assert BODY not in reply and "code=0" not in reply, (url, reply)
    assert database.accepted == 0 and web.accepted == reached

    counted = decisions(gate)
    assert counted["allowed"] == 2
    assert counted["refused_domain"] == 4 and counted["refused_address"] == 2, counted
    lines = [r.getMessage() for r in caplog.records if r.name == "sessiongate.proxy"]
    assert any("proxy allowed" in line and f"session={sid}" in line for line in lines), lines
    assert any("proxy refused_address" in line and "loopback" in line for line in lines), lines


@needs_bwrap
@pytest.mark.usefixtures("names")
async def test_network_none_reaches_nothing_and_host_reaches_as_before(
    make_gate: GateFactory, web: Listener, database: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    gate = await make_gate(
        agents={"none": boxed("none", "none"), "host": boxed("host", "host"), "old": boxed(False, "old")}
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("agent=host" in w and "network = host" in w for w in warnings), warnings
    for agent in ("none", "old"):
        sid = (await gate.create(agent=agent)).session_id
        for host, port in ((web.host, web.port), ("127.0.0.1", database.port)):
            reply = await run(gate, sid, connect(host, port))
            assert "connected" not in reply, (agent, reply)
        assert (await run(gate, sid, "echo proxy=$HTTP_PROXY.")).endswith("proxy=.\n")
    sid = (await gate.create(agent="host")).session_id
    for host, port in ((web.host, web.port), ("127.0.0.1", database.port)):
        assert "connected" in await run(gate, sid, connect(host, port))
    assert database.accepted == 1


def test_domains_and_addresses() -> None:
    domains = ("api.example.com", "*.registry.test")
    assert domain_allowed("API.example.com.", domains) and domain_allowed("a.b.registry.test", domains)
    for host in ("example.com", "registry.test", "xapi.example.com", "evil-registry.test"):
        assert not domain_allowed(host, domains), host
    for address in ("127.0.0.1", "::1", "0.0.0.0", "169.254.169.254", "fe80::1", "::ffff:127.0.0.1"):
        assert address_refused(address, allow_private=True), address
    for address in ("10.0.0.1", "192.168.1.1", "172.16.0.1", "fd00::1", "100.64.0.1"):
        assert address_refused(address, allow_private=False) == "private", address
        assert address_refused(address, allow_private=True) is None, address
    assert address_refused("93.184.216.34", allow_private=False) is None


async def ask(path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(4096), 15)
    finally:
        writer.close()


async def test_the_proxy_refuses_what_a_hostile_agent_sends_its_socket_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Straight to the socket, without the bridge: a head past 8 KiB, a request that is not a
    proxy's, a name off the list, an allowed name on a link-local (metadata) address, and one
    connection past the per-agent bound."""
    seen: list[tuple[str, str]] = []
    proxy = NetworkProxy(lambda agent, decision: seen.append((agent, decision)))

    async def resolve(host: str, port: int) -> list[str]:
        return ["169.254.169.254"]

    monkeypatch.setattr(network_proxy, "resolve", resolve)
    monkeypatch.setattr(network_proxy, "MAX_CONNECTIONS", 1)
    config = AgentConfig(name="hostile", command="x", allowed_domains=("metadata.test",))
    try:
        path = proxy.open(config, "bob", "s1", None).path
        huge = b"GET http://metadata.test/ HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"
        assert (await ask(path, huge)).startswith(b"HTTP/1.1 431")
        assert (await ask(path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await ask(path, b"CONNECT 127.0.0.1:5432 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
        reply = await ask(path, b"CONNECT metadata.test:80 HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403") and b"link-local" in reply
        _, held = await asyncio.open_unix_connection(str(path))  # the one connection allowed
        assert (await ask(path, b"CONNECT metadata.test:80 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 429")
        held.close()
    finally:
        await proxy.close()
    assert [d for _, d in seen] == [
        "bad_request",
        "bad_request",
        "refused_domain",
        "refused_address",
        "refused_limit",
    ]
    assert not path.exists()


def test_network_keys_are_read_and_checked(tmp_path: Path) -> None:
    def agent(text: str) -> AgentConfig:
        config = tmp_path / "c.toml"
        config.write_text(f"[agents.x]\ncommand = 'x'\n{text}\n")
        return load_settings(["--config", str(config), "--workdir", str(tmp_path)], environ={}).agents["x"]

    assert agent("").network_mode == "proxy" and agent("network = true").network_mode == "proxy"
    assert agent("network = false").network_mode == "none"
    x = agent(
        "network = 'host'\nallowed_domains = ['API.x.com', '*.npmjs.org']\nallow_private_destinations = true"
    )
    assert (x.network_mode, x.allowed_domains, x.allow_private_destinations) == (
        "host",
        ("api.x.com", "*.npmjs.org"),
        True,
    )
    for text in (
        "network = 'all'",
        "allowed_domains = ['a b']",
        "allowed_domains = ['*']",
        "allow_private_destinations = 1",
    ):
        with pytest.raises(ConfigError):
            agent(text)
