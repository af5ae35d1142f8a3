"""A session's http/sse MCP servers from inside its agent's sandbox (issue 23 part 1).

With `network = "proxy"` the agent reaches only its `allowed_domains` through the gateway's proxy
(tests/test_sandbox_network.py); a session's http/sse MCP servers add exactly their host:port to
that agent process's own box when the session is opened, so the agent reaches them with no
allowed_domains at all, and another session's agent does not. "none" refuses such a server at
CreateSession, as does an address the sandbox can never reach (its loopback is its own).

The MCP server is tests/mcp_server.py over streamable HTTP on this machine's non-loopback
address (a private one on a test machine: an operator-named server may be there, exactly).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sessiongate.server.agents.connection import AgentConnection
from sessiongate.server.sandbox import network_proxy
from sessiongate.server.sandbox.network_proxy import NetworkProxy
from sessiongate.server.settings import AgentConfig, McpServerConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ECHO, Gate, GateFactory, expect_error, reply_text
from tests.mcp_server import serving
from tests.test_sandbox import needs_bwrap
from tests.test_sandbox_network import ask, local_address

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def address() -> str:
    found = local_address()
    if found is None:
        pytest.skip("this machine has no non-loopback address for the MCP server")
    return found


@pytest.fixture(scope="module")
def mcp_url(address: str) -> Iterator[str]:
    """tests/mcp_server.py over streamable HTTP on `address`; stopped with its group."""
    with serving("http", address) as port:
        yield f"http://{address}:{port}/mcp"


def boxed(name: str, network: str) -> AgentConfig:
    """The built-in agent in bwrap, with no allowed_domains and no private destinations."""
    return AgentConfig(name=name, command=ECHO[0], args=ECHO[1:], sandbox="bwrap", network=network)


def connect(url: str) -> bytes:
    host_port = url.split("/")[2]
    return f"CONNECT {host_port} HTTP/1.1\r\n\r\n".encode()


def socket_of(gate: Gate, session_id: str) -> Path:
    """The proxy socket of the session's running agent (its sandbox's box)."""
    agent = gate.running.pool.get(session_id).holder.agent
    assert isinstance(agent, AgentConnection) and agent.group.network is not None
    return agent.group.network.path


async def test_a_box_reaches_exactly_its_mcp_hosts(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Straight to the proxy: an MCP host:port is allowed once added, no other port of it; a
    private address only for an operator-named server; a name resolving to loopback never."""
    listener = await asyncio.start_server(lambda r, w: w.close(), address, 0)
    port = listener.sockets[0].getsockname()[1]

    async def resolve(host: str, port: int) -> list[str]:
        return {"sneaky.test": ["127.0.0.1"]}.get(host, [host])

    monkeypatch.setattr(network_proxy, "resolve", resolve)
    seen: list[str] = []
    proxy = NetworkProxy(lambda agent, decision: seen.append(decision))
    try:
        box = proxy.open(AgentConfig(name="a", command="x"), "bob", "s1", None)
        target = f"CONNECT {address}:{port} HTTP/1.1\r\n\r\n".encode()
        assert (await ask(box.path, target)).startswith(b"HTTP/1.1 403")
        box.allow_mcp([(address, port, True), ("sneaky.test", port, True), (address, port + 1, False)])
        assert (await ask(box.path, target)).startswith(b"HTTP/1.1 200")
        other = f"CONNECT {address}:{port + 2} HTTP/1.1\r\n\r\n".encode()
        assert (await ask(box.path, other)).startswith(b"HTTP/1.1 403")
        sneaky = await ask(box.path, f"CONNECT sneaky.test:{port} HTTP/1.1\r\n\r\n".encode())
        assert sneaky.startswith(b"HTTP/1.1 403") and b"loopback" in sneaky
        client = await ask(box.path, f"CONNECT {address}:{port + 1} HTTP/1.1\r\n\r\n".encode())
        assert client.startswith(b"HTTP/1.1 403") and b"private" in client
        # Another box of the same agent and principal gains nothing.
        second = proxy.open(AgentConfig(name="a", command="x"), "bob", "s2", None)
        assert (await ask(second.path, target)).startswith(b"HTTP/1.1 403")
    finally:
        await proxy.close()
        listener.close()
    expected = ["refused_domain", "allowed", "refused_domain", "refused_address", "refused_address"]
    assert seen == [*expected, "refused_domain"]


@needs_bwrap
async def test_a_sandboxed_agent_reaches_its_sessions_http_server_and_no_other_session_does(
    make_gate: GateFactory, mcp_url: str
) -> None:
    catalog = {"tools": McpServerConfig("tools", "http", url=mcp_url)}
    gate = await make_gate(agents={"boxed": boxed("boxed", "proxy")}, settings={"mcp_servers": catalog})
    with_tools = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="boxed", mcp_servers=["tools"]), timeout=30
    )
    call = '/mcp call tools add {"a": 2, "b": 3}'
    assert reply_text(await gate.prompt(with_tools.session_id, call, timeout=60)).strip() == "5"

    # A second session of the same agent, without the server: its agent's box refuses the host.
    without = await gate.create(agent="boxed")
    reply = await ask(socket_of(gate, without.session_id), connect(mcp_url))
    assert reply.startswith(b"HTTP/1.1 403") and b"allowed_domains" in reply, reply
    assert (await ask(socket_of(gate, with_tools.session_id), connect(mcp_url))).startswith(b"HTTP/1.1 200")


@needs_bwrap
async def test_an_http_server_is_refused_where_the_sandbox_cannot_reach_it(
    make_gate: GateFactory, mcp_url: str
) -> None:
    catalog = {
        "tools": McpServerConfig("tools", "http", url=mcp_url),
        "local": McpServerConfig("local", "sse", url="http://127.0.0.1:9/sse"),
    }
    agents = {"closed": boxed("closed", "none"), "boxed": boxed("boxed", "proxy")}
    gate = await make_gate(agents=agents, settings={"mcp_servers": catalog})
    for agent, server, said in (("closed", "tools", 'network = "none"'), ("boxed", "local", "loopback")):
        refused = await expect_error(
            gate.stub.CreateSession(pb.CreateSessionRequest(agent=agent, mcp_servers=[server]), timeout=30)
        )
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "MCP_TRANSPORT_UNSUPPORTED",
        ), refused
        assert said in refused.message, refused.message
