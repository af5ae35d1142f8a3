"""MCP servers from the clients' side (issue 23, part 1): the SDK's
`create_session(mcp_servers=[...])` and its typed errors, and the CLI's `--mcp NAME`, `get`'s
`mcp_servers` line, and the exit codes and hints of a name refused; client-supplied servers:
the SDK's `client_mcp_servers=[McpStdioServer(...), ...]` (reprs without secrets), the CLI's
`--mcp-config FILE` (the editors' `mcpServers` JSON), refusals and bad files.

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
    McpConfigError,
    McpHttpServer,
    McpServerNotAllowed,
    McpSseServer,
    McpStdioServer,
    McpTransportUnsupported,
    SessionClient,
    load_mcp_config,
)
from sessiongate.client.mcp import ClientMcpServer, proto_servers
from sessiongate.server.security.principals import token_hash
from sessiongate.server.settings import McpServerConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory
from tests.test_cli import cli
from tests.test_mcp_servers import CATALOG, recorder

MCP_SERVER_SCRIPT = Path(__file__).with_name("mcp_server.py")
ADD = '/mcp call testtools add {"a": 2, "b": 3}'
ALICE = "alice-token-0000"  # may use no MCP server of her own choosing
BOB = "bob-token-000000"  # may use testtools and tracker, and supply servers of its own


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
            "client_mcp_servers = true\n"
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


# ---- client-supplied servers: SDK ------------------------------------------------------------

SECRET = "sdk-s3cr3t-9f3a11"
HEADER_SECRET = "sdk-hdr-s3cr3t-2c7e"
VAR = "SG_CLIENT_SECRET"
CALL = f'/mcp call mine secret_env {{"name": "{VAR}"}}'


def mine(secret: str = SECRET) -> McpStdioServer:
    """tests/mcp_server.py over stdio, with `secret` in its env."""
    return McpStdioServer("mine", sys.executable, (str(MCP_SERVER_SCRIPT), "stdio"), env={VAR: secret})


def test_the_servers_reprs_show_no_env_or_header_value() -> None:
    servers: list[ClientMcpServer] = [
        mine(),
        McpHttpServer("remote", "https://mcp.example/mcp", {"Authorization": HEADER_SECRET}),
        McpSseServer("events", "https://mcp.example/sse", {"X-Key": HEADER_SECRET}),
    ]
    for server in servers:
        for text in (repr(server), str(server), f"{server}", repr([server])):
            assert SECRET not in text and HEADER_SECRET not in text, text
    assert repr(servers[0]).endswith(f"env={{{VAR!r}: ...}})")
    assert (
        repr(servers[2])
        == "McpSseServer(name='events', url='https://mcp.example/sse', headers={'X-Key': ...})"
    )
    assert [s.WhichOneof("transport") for s in proto_servers(servers)] == ["stdio", "http", "sse"]
    assert proto_servers(servers)[0].stdio.env[VAR] == SECRET  # on the wire, of course
    raw = pb.McpServer(name="raw", stdio=pb.McpStdio(command="x"))
    assert proto_servers([raw]) == [raw]  # messages pass as they are
    with pytest.raises(TypeError, match="a list of servers"):
        proto_servers(mine())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not dict"):
        proto_servers([{"name": "x"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="args takes a list"):
        McpStdioServer("x", "npx", "pkg").proto()


async def test_the_sdk_gives_a_client_stdio_server_whose_secret_stays_hidden(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await mcp_gate(make_gate, tmp_path)
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session(mcp_servers=["testtools"], client_mcp_servers=[mine()])
        assert shown(session) == [("testtools", "stdio", "request"), ("mine", "stdio", "request")]
        text, _ = await client.reply(session.session_id, CALL, timeout=60)
        assert text == "set"
        fetched = await client.get_session(session.session_id)
        listed = [s async for s in client.list_sessions()]
        for answer in (session, fetched, *listed):
            assert SECRET.encode() not in answer.SerializeToString()
            assert SECRET not in repr(answer)

    def blocking() -> str:
        with SessionClient(gate.target) as client:
            session = client.create_session(client_mcp_servers=[mine()])
            assert shown(session) == [("mine", "stdio", "request")]
            return client.reply(session.session_id, CALL, timeout=60)[0]

    assert await asyncio.to_thread(blocking) == "set"


async def test_the_sdk_is_refused_client_servers_without_client_mcp_servers(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await mcp_gate(make_gate, tmp_path, tokens=True)
    async with AsyncSessionClient(gate.target, token=ALICE) as alice:
        with pytest.raises(McpServerNotAllowed) as refused:
            await alice.create_session(client_mcp_servers=[mine()])
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "server" not in refused.value.metadata  # no name refused: servers of her own
        assert SECRET not in str(refused.value) and SECRET not in repr(refused.value)
    async with AsyncSessionClient(gate.target, token=BOB) as bob:
        assert shown(await bob.create_session(client_mcp_servers=[mine()])) == [("mine", "stdio", "request")]


# ---- the editors' mcpServers file ------------------------------------------------------------


def write_config(path: Path, servers: object) -> Path:
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def test_load_mcp_config_reads_the_editors_shape(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "mcp.json",
        {
            "gh": {"command": "npx", "args": ["-y", "server-${PKG}"], "env": {"TOKEN": "${GH_TOKEN}"}},
            "api": {"type": "http", "url": "https://${HOST:-api.example}/mcp", "headers": {"A": "b"}},
            "events": {"type": "sse", "url": "https://x/sse"},
            "bare": {"url": "https://x/mcp"},  # a url without a type: http
            "off": {"command": "nope", "disabled": True},
            "extra": {"command": "tool", "type": "stdio", "autoApprove": ["x"]},
        },
    )
    servers = load_mcp_config(path, {"PKG": "github", "GH_TOKEN": SECRET, "HOST": ""})
    assert servers == [
        McpStdioServer("gh", "npx", ("-y", "server-github"), {"TOKEN": SECRET}),
        McpHttpServer("api", "https://api.example/mcp", {"A": "b"}),
        McpSseServer("events", "https://x/sse"),
        McpHttpServer("bare", "https://x/mcp"),
        McpStdioServer("extra", "tool"),
    ]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "not valid JSON at line 1"),
        ('{"servers": {}}', 'needs a top-level "mcpServers" object'),
        ({"a": {"args": [SECRET]}}, "mcpServers.a.command: missing"),
        ({"a": {"command": SECRET, "args": SECRET}}, "mcpServers.a.args: must be a list of strings"),
        ({"a": {"command": "c", "env": {"K": 1}}}, "mcpServers.a.env.K: must be a string"),
        ({"a": {"command": "c", "env": {"K": "${UNSET_VAR_9}"}}}, "a.env.K: ${UNSET_VAR_9} is not set"),
        ({"a": {"type": "websocket", "url": SECRET}}, 'mcpServers.a.type: must be "stdio", "http" or "sse"'),
        ({"a": {"type": "http", "headers": {"A": SECRET}}}, "mcpServers.a.url: missing"),
        ({"a": {"type": "sse", "url": "u", "command": SECRET}}, "an sse server has a url, not a command"),
        ({"a": SECRET}, "mcpServers.a: must be an object"),
    ],
)
def test_a_bad_mcp_config_names_the_key_never_the_value(tmp_path: Path, content: object, said: str) -> None:
    path = tmp_path / "mcp.json"
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_config(path, content)
    with pytest.raises(McpConfigError) as caught:
        load_mcp_config(path, {})
    assert said in str(caught.value) and str(path) in str(caught.value)
    assert SECRET not in str(caught.value)


# ---- client-supplied servers: CLI ------------------------------------------------------------


def mine_config(path: Path, env: dict[str, str]) -> Path:
    command = {"command": sys.executable, "args": [str(MCP_SERVER_SCRIPT), "stdio"], "env": env}
    return write_config(path, {"mine": command})


async def test_cli_mcp_config_gives_the_agent_the_files_servers(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await mcp_gate(make_gate, tmp_path)
    literal = mine_config(tmp_path / "literal.json", {VAR: SECRET})
    code, out, err = await cli(gate, "prompt", "--mcp-config", str(literal), CALL)
    assert code == 0, err
    assert "set" in out.splitlines(), out
    assert SECRET not in out + err
    # The secret from the environment (${VAR}), the file holding only its name; then `get`.
    expanded = mine_config(tmp_path / "expanded.json", {VAR: "${SG_TEST_SECRET}"})
    env = {"SG_TEST_SECRET": SECRET}
    code, out, err = await cli(gate, "create", "--mcp-config", str(expanded), "--mcp", "testtools", env=env)
    assert code == 0, err
    session_id = out.strip()
    code, out, err = await cli(gate, "prompt", "--session", session_id, CALL)
    assert code == 0 and "set" in out.splitlines(), out + err
    code, out, _ = await cli(gate, "get", session_id)
    assert "mcp_servers        testtools (stdio, request), mine (stdio, request)\n" in out, out
    code, out, _ = await cli(gate, "get", "--json", session_id)
    assert code == 0 and SECRET not in out
    code, _, err = await cli(gate, "prompt", "--session", session_id, "--mcp-config", str(literal), "hi")
    assert code == 2 and "--mcp-config gives MCP servers to the session this command creates" in err


async def test_cli_mcp_config_refused_and_invalid(make_gate: GateFactory, tmp_path: Path) -> None:
    gate = await mcp_gate(make_gate, tmp_path, tokens=True)
    config = mine_config(tmp_path / "mcp.json", {VAR: SECRET})
    code, _, err = await cli(gate, "--token", ALICE, "create", "--mcp-config", str(config))
    assert code == 9, err
    assert "error: PERMISSION_DENIED MCP_SERVER_NOT_ALLOWED" in err
    assert "hint: your principal may not supply its own MCP servers (--mcp-config)" in err
    assert "client_mcp_servers = true" in err and SECRET not in err
    # A server the gateway finds invalid: the hint says which file entry client_mcp_servers[0] is.
    bad_name = write_config(tmp_path / "bad.json", {"1st": {"command": "tool", "env": {"K": SECRET}}})
    code, _, err = await cli(gate, "--token", BOB, "create", "--mcp-config", str(bad_name))
    assert code == 2, err
    assert "client_mcp_servers[0].name" in err and "hint: client_mcp_servers[0] is 1st" in err
    assert SECRET not in err


@pytest.mark.parametrize(
    ("files", "said"),
    [
        ({"a.json": "{not json"}, "a.json: not valid JSON at line 1 column 2"),
        ({"a.json": {"mine": {"env": {VAR: SECRET}}}}, "a.json: mcpServers.mine.command: missing"),
        (
            {"a.json": {"m": {"command": "c"}}, "b.json": {"m": {"command": SECRET}}},
            "MCP server m is given twice",
        ),
        ({"a.json": {"m": {"command": "c", "disabled": True}}}, "no MCP server in"),
        ({}, "missing.json: cannot read it (No such file or directory)"),
    ],
)
async def test_cli_a_bad_mcp_config_is_a_usage_error_before_any_call(
    tmp_path: Path, files: dict[str, object], said: str
) -> None:
    paths = []
    for name, content in files.items():
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps({"mcpServers": content}))
        paths.append(path)
    args = [arg for path in paths or [tmp_path / "missing.json"] for arg in ("--mcp-config", str(path))]
    for command in (["create"], ["prompt", "hi"]):
        # Nothing listens on port 9: a call would fail UNAVAILABLE (exit 6), not a usage error.
        code, out, err = await cli(None, "--target", "127.0.0.1:9", *command, *args)
        assert code == 2, err
        assert said in err and "error: INVALID_ARGUMENT" in err, err
        assert "no MCP server" in said or 'hint: --mcp-config takes a JSON file like {"mcpServers"' in err
        assert SECRET not in out + err and "Traceback" not in err
