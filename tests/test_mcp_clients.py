"""Operator-named MCP servers from the clients' side (issue 23, part 1): the SDK's
`create_session(mcp_servers=[...])` and its typed errors, and the CLI's `--mcp NAME`, `get`'s
`mcp_servers` line, and the exit codes and hints of a name refused.

The server is real, and so is the MCP server (tests/mcp_server.py over stdio, as `testtools`):
the built-in agent's `/mcp call` proves the tool is reached through the session the client made.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import pytest
from sessiongate.client import (
    AsyncSessionClient,
    InvalidRequest,
    McpServerNotAllowed,
    McpTransportUnsupported,
    SessionClient,
)
from sessiongate.server.security.principals import token_hash
from sessiongate.server.settings import McpServerConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory
from tests.test_cli import cli
from tests.test_mcp_servers import CATALOG, recorder

MCP_SERVER_SCRIPT = Path(__file__).with_name("mcp_server.py")
ADD = '/mcp call testtools add {"a": 2, "b": 3}'
ALICE = "alice-token-0000"  # may use no MCP server of her own choosing
BOB = "bob-token-000000"  # may use testtools and tracker


def mcp_testtools() -> McpServerConfig:
    return McpServerConfig(
        "testtools", "stdio", command=sys.executable, args=(str(MCP_SERVER_SCRIPT), "stdio")
    )


async def mcp_gate(make_gate: GateFactory, tmp_path: Path, *, tokens: bool = False) -> Gate:
    """A server whose config has `[mcp_servers.testtools]` (and, for the transport test, an http
    `tracker` and an agent without http); with `tokens`, alice and bob above."""
    tokens_file = None
    if tokens:
        tokens_file = tmp_path / "tokens.toml"
        tokens_file.write_text(
            f'[principals.alice]\ntoken_sha256 = "{token_hash(ALICE)}"\n\n'
            f'[principals.bob]\ntoken_sha256 = "{token_hash(BOB)}"\nmcp_servers = ["testtools", "tracker"]\n'
        )
    gate: Gate = await make_gate(
        agents={"nohttp": recorder(tmp_path, "nohttp", "--no-http")},
        settings={"mcp_servers": {"testtools": mcp_testtools(), "tracker": CATALOG["tracker"]}},
        auth_tokens_file=tokens_file,
    )
    return gate


def shown(session: pb.Session) -> list[tuple[str, str, str]]:
    return [(m.name, m.transport, m.source) for m in session.mcp_servers]


# ---- SDK -------------------------------------------------------------------------------------


async def test_the_sdk_creates_a_session_with_named_servers_its_agent_reaches(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await mcp_gate(make_gate, tmp_path)
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session(mcp_servers=["testtools"])
        assert shown(session) == [("testtools", "stdio", "request")]
        assert shown(await client.get_session(session.session_id)) == [("testtools", "stdio", "request")]
        text, _ = await client.reply(session.session_id, ADD, timeout=60)
        assert text == "5"
        plain = await client.create_session()
        assert shown(plain) == []  # none unless asked for

    def blocking() -> list[tuple[str, str, str]]:
        with SessionClient(gate.target) as client:
            session = client.create_session(mcp_servers=("testtools",))
            return shown(client.get_session(session.session_id))

    assert await asyncio.to_thread(blocking) == [("testtools", "stdio", "request")]


async def test_the_sdk_raises_a_typed_error_for_each_refusal(make_gate: GateFactory, tmp_path: Path) -> None:
    gate = await mcp_gate(make_gate, tmp_path, tokens=True)
    async with AsyncSessionClient(gate.target, token=ALICE) as alice:
        with pytest.raises(InvalidRequest) as unknown:
            await alice.create_session(mcp_servers=["nope"])
        assert "nope" in unknown.value.violations["mcp_servers"]
        with pytest.raises(McpServerNotAllowed) as refused:
            await alice.create_session(mcp_servers=["testtools"])
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.metadata["server"] == "testtools"
        with pytest.raises(TypeError, match="list of names"):
            await alice.create_session(mcp_servers="testtools")  # not t, e, s, t, ...
    async with AsyncSessionClient(gate.target, token=BOB) as bob:
        with pytest.raises(McpTransportUnsupported) as unsupported:
            await bob.create_session("nohttp", mcp_servers=["tracker"])
        assert unsupported.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert shown(await bob.create_session(mcp_servers=["testtools"])) == [
            ("testtools", "stdio", "request")
        ]


# ---- CLI -------------------------------------------------------------------------------------


async def test_cli_create_with_mcp_then_get_shows_the_servers(make_gate: GateFactory, tmp_path: Path) -> None:
    gate = await mcp_gate(make_gate, tmp_path)
    code, out, err = await cli(gate, "create", "--mcp", "testtools")
    assert code == 0, err
    session_id = out.strip()
    code, out, _ = await cli(gate, "get", session_id)
    assert code == 0 and "mcp_servers        testtools (stdio, request)\n" in out, out
    assert "{" not in out  # one readable line, no Python dicts
    code, out, _ = await cli(gate, "get", "--json", session_id)
    assert json.loads(out)["mcp_servers"] == [
        {"name": "testtools", "transport": "stdio", "source": "request"}
    ]
    code, out, _ = await cli(gate, "get", (await gate.create()).session_id)
    assert code == 0 and "mcp_servers" not in out  # a session without any: no line


async def test_cli_prompt_with_mcp_creates_a_session_whose_agent_reaches_the_tool(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await mcp_gate(make_gate, tmp_path)
    code, out, err = await cli(gate, "prompt", "--mcp", "testtools", ADD)
    assert code == 0, err
    assert "5" in out.splitlines(), out
    session_id = err.split()[1]  # "session ID"
    fetched = await gate.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)
    assert shown(fetched) == [("testtools", "stdio", "request")]
    # An existing session keeps the servers it was created with: --mcp there is a usage error.
    code, _, err = await cli(gate, "prompt", "--session", session_id, "--mcp", "testtools", "hi")
    assert code == 2 and "--mcp gives MCP servers to the session this command creates" in err
    assert "hint: drop --session" in err


async def test_cli_refused_names_exit_with_their_code_and_hint(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await mcp_gate(make_gate, tmp_path, tokens=True)
    code, _, err = await cli(gate, "--token", ALICE, "create", "--mcp", "nope")
    assert code == 2, err
    assert "error: INVALID_ARGUMENT" in err and "mcp_servers: unknown MCP server 'nope'" in err
    assert (
        "(configured: testtools, tracker)" in err
        and "hint: --mcp takes the name of an [mcp_servers.NAME]" in err
    )
    code, _, err = await cli(gate, "--token", ALICE, "create", "--mcp", "testtools")
    assert code == 9, err
    assert "error: PERMISSION_DENIED MCP_SERVER_NOT_ALLOWED" in err
    assert "hint: your principal may not use that MCP server: ask the operator" in err
    code, _, err = await cli(gate, "--token", ALICE, "prompt", "--mcp", "testtools", "hi")
    assert code == 9 and "MCP_SERVER_NOT_ALLOWED" in err and "session " not in err  # none created
    code, _, err = await cli(gate, "--token", BOB, "create", "--agent", "nohttp", "--mcp", "tracker")
    assert code == 7, err
    assert "FAILED_PRECONDITION MCP_TRANSPORT_UNSUPPORTED" in err
    assert "hint: that agent cannot use http/sse MCP servers: use a stdio one" in err
    code, out, err = await cli(gate, "--token", BOB, "--json", "create", "--mcp", "testtools")
    assert code == 0 and json.loads(out)["mcp_servers"][0]["name"] == "testtools", err
