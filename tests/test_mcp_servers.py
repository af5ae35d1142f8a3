"""Operator-named MCP servers (issue 23, part 1): `[mcp_servers.NAME]` in the config, per agent
and per principal; CreateSession's `mcp_servers`; what the agent is given at session/new and
again at session/load; and no secret value anywhere a client, a log or the database sees.

What the agent received is recorded by a tiny raw JSON-RPC agent written by these tests
(`RECORDER`, exact ACP payloads), and proved end to end with the built-in agent's `/mcp list`
and `/mcp call` against tests/mcp_server.py (a real MCP server over stdio).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from sessiongate.server.security.principals import TokensFileError, TokenTable, token_hash
from sessiongate.server.settings import AgentConfig, ConfigError, McpServerConfig, load_settings
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, echo_agent, expect_error, reply_text

MCP_SERVER_SCRIPT = Path(__file__).with_name("mcp_server.py")
SECRET = "s3cr3t-mcp-value-7f1e"  # in the server's environment only
SECRET_ENV = "SG_TEST_MCP_SECRET"
HEADER_SECRET = "hdr-s3cr3t-91ac"
HEADER_ENV = "SG_TEST_MCP_HEADER"

# A minimal ACP agent: answers initialize (loadSession; mcpCapabilities.http unless --no-http),
# session/new, /load and /prompt, and appends each open's method and mcpServers to $RECORD_FILE.
RECORDER = """
import json, os, sys, uuid
record, http = os.environ["RECORD_FILE"], "--no-http" not in sys.argv
for line in sys.stdin:
    msg = json.loads(line)
    method, mid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
    if mid is None:
        continue
    if method == "initialize":
        caps = {"loadSession": True, "mcpCapabilities": {"http": http, "sse": False}}
        result = {"protocolVersion": 1, "agentCapabilities": caps}
    elif method in ("session/new", "session/load", "session/resume"):
        with open(record, "a") as f:
            f.write(json.dumps({"method": method, "mcpServers": params.get("mcpServers")}) + "\\n")
        result = {"sessionId": uuid.uuid4().hex} if method == "session/new" else {}
    elif method == "session/prompt":
        result = {"stopReason": "end_turn"}
    else:
        err = {"code": -32601, "message": "method not found"}
        print(json.dumps({"jsonrpc": "2.0", "id": mid, "error": err}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": mid, "result": result}), flush=True)
"""

CATALOG = {
    "tools": McpServerConfig(
        "tools",
        "stdio",
        command="/usr/bin/mcp-tools",
        args=("--x",),
        env={"PLAIN": "1"},
        env_from=(SECRET_ENV,),
    ),
    "tracker": McpServerConfig(
        "tracker", "http", url="http://127.0.0.1:9/mcp", headers_from={"Authorization": HEADER_ENV}
    ),
    "docs": McpServerConfig("docs", "stdio", command="/usr/bin/mcp-docs"),
}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---- config ------------------------------------------------------------------------------


def test_mcp_servers_tables_parse_with_paths_from_the_config_dir(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        """
[mcp_servers.gh]
command = "bin/gh-mcp"
args = ["serve"]
env = { MODE = "ro" }
env_from = ["GH_TOKEN"]

[mcp_servers.tracker]
type = "http"
url = "https://tracker.example/mcp"
headers = { X-Team = "a" }
headers_from = { Authorization = "TRACKER_TOKEN" }

[agents.coder]
command = "coder"
mcp_servers = ["gh"]
""",
    )
    settings = load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})
    gh = settings.mcp_servers["gh"]
    assert (gh.transport, gh.command, gh.args, gh.env_from) == (
        "stdio",
        str(tmp_path.resolve() / "bin/gh-mcp"),
        ("serve",),
        ("GH_TOKEN",),
    )
    tracker = settings.mcp_servers["tracker"]
    assert (tracker.transport, tracker.url, tracker.headers_from) == (
        "http",
        "https://tracker.example/mcp",
        {"Authorization": "TRACKER_TOKEN"},
    )
    coder = settings.agents["coder"]
    assert coder.mcp_servers == ("gh",) and set(coder.mcp_catalog) == {"gh", "tracker"}
    assert tracker.resolved_headers({"TRACKER_TOKEN": "tok"}) == {"X-Team": "a", "Authorization": "tok"}
    assert gh.resolved_env({"GH_TOKEN": "t", "OTHER": "o"}) == {"MODE": "ro", "GH_TOKEN": "t"}


def test_an_mcp_servers_repr_shows_no_values(tmp_path: Path) -> None:
    server = McpServerConfig("s", "stdio", command="c", env={"K": "secret-value"}, env_from=("SECRET_VAR",))
    remote = McpServerConfig("r", "http", url="http://h/", headers={"A": "secret-header"})
    shown = repr(server) + repr(remote) + repr(replace(AgentConfig("a", "c"), mcp_catalog={"s": server}))
    assert "secret-value" not in shown and "SECRET_VAR" not in shown and "secret-header" not in shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[mcp_servers.a]\nargs = ["x"]\n', "exactly one of `command`"),
        ('[mcp_servers.a]\ncommand = "c"\nurl = "http://x"\n', "exactly one of `command`"),
        ('[mcp_servers.a]\nurl = "http://x"\n', "`type` must be"),
        ('[mcp_servers.a]\ntype = "ws"\nurl = "http://x"\n', "`type` must be"),
        ('[mcp_servers.a]\ntype = "http"\nurl = "ftp://x"\n', "`url` must be"),
        ('[mcp_servers.a]\ncommand = "c"\nenv_from = ["not a name"]\n', "`env_from`"),
        ('[mcp_servers.a]\ncommand = "c"\nheaders = { A = "b" }\n', "for http/sse servers"),
        ('[mcp_servers.a]\ntype = "sse"\nurl = "http://x"\nenv = { A = "b" }\n', "for stdio servers"),
        ('[mcp_servers.a]\ncommand = "c"\nbogus = 1\n', "unknown keys ['bogus']"),
        ('[mcp_servers."1bad name"]\ncommand = "c"\n', "the name must be"),
        ('[mcp_servers.a]\ntype = "http"\nurl = "http://x"\nheaders_from = { A = "1x" }\n', "`headers_from`"),
        (
            '[agents.x]\ncommand = "c"\nmcp_servers = ["nope"]\n',
            "[agents.x] mcp_servers: no [mcp_servers.nope]",
        ),
        ('[agents.x]\ncommand = "c"\nmcp_servers = "a"\n', "[agents.x]: `mcp_servers` must be a list"),
    ],
)
def test_bad_mcp_servers_tables_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    config = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})
    assert expected in str(caught.value)


def test_a_principal_mcp_servers_key_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[principals.a]\ntoken_sha256 = "{token_hash("t" * 20)}"\nmcp_servers = "gh"\n')
    with pytest.raises(TokensFileError, match="mcp_servers must be a list"):
        TokenTable(path).load()


# ---- a real server -------------------------------------------------------------------------


def recorder(tmp_path: Path, name: str, *flags: str, own: tuple[str, ...] = ()) -> AgentConfig:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    return AgentConfig(
        name=name,
        command=sys.executable,
        args=(str(script), *flags),
        env={"RECORD_FILE": str(tmp_path / f"{name}.jsonl")},
        sandbox="none",
        mcp_servers=own,
    )


def recorded(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def prompt_once_suspended(gate: Gate, session_id: str, text: str) -> list[pb.PromptEvent]:
    """Wait for the idle suspend, then prompt (session/load). GetSession says SUSPENDED while the
    suspend still ends the agent's group (SESSION_BUSY meanwhile): retried until it is done."""
    await gate.wait_state(session_id, pb.SESSION_STATE_SUSPENDED)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        try:
            return await gate.prompt(session_id, text)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or loop.time() > deadline:
                raise
        await asyncio.sleep(0.1)


def shown(session: pb.Session) -> list[tuple[str, str, str]]:
    return [(m.name, m.transport, m.source) for m in session.mcp_servers]


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(HEADER_ENV, HEADER_SECRET)


async def gate_with(make_gate: GateFactory, tmp_path: Path, **kwargs: Any) -> Gate:
    agents = {
        "rec": recorder(tmp_path, "rec", own=("docs",)),
        "nohttp": recorder(tmp_path, "nohttp", "--no-http"),
    }
    gate: Gate = await make_gate(agents=agents, settings={"mcp_servers": CATALOG}, **kwargs)
    return gate


async def test_named_servers_reach_the_agent_and_show_without_secrets(
    make_gate: GateFactory, tmp_path: Path, secrets_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gate = await gate_with(make_gate, tmp_path, idle_ttl=1.0, sweep_interval=0.2)
    created = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="rec", mcp_servers=["tools", "tracker"]), timeout=30
    )
    expected = [("docs", "stdio", "agent"), ("tools", "stdio", "request"), ("tracker", "http", "request")]
    assert shown(created) == expected
    [opened] = recorded(tmp_path, "rec")
    assert opened["method"] == "session/new"
    assert opened["mcpServers"] == [
        {"name": "docs", "command": "/usr/bin/mcp-docs", "args": [], "env": []},
        {
            "name": "tools",
            "command": "/usr/bin/mcp-tools",
            "args": ["--x"],
            "env": [{"name": "PLAIN", "value": "1"}, {"name": SECRET_ENV, "value": SECRET}],
        },
        {
            "name": "tracker",
            "type": "http",
            "url": "http://127.0.0.1:9/mcp",
            "headers": [{"name": "Authorization", "value": HEADER_SECRET}],
        },
    ]
    # Suspended (idle), then a prompt loads it again: the same servers, from the config.
    await prompt_once_suspended(gate, created.session_id, "hello")
    first, again = recorded(tmp_path, "rec")
    assert again["method"] == "session/load" and again["mcpServers"] == first["mcpServers"]
    fetched = await gate.stub.GetSession(pb.GetSessionRequest(session_id=created.session_id), timeout=10)
    listed = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
    assert shown(fetched) == expected
    answers = [created, fetched, listed]
    for secret in (SECRET, HEADER_SECRET):
        assert all(secret.encode() not in m.SerializeToString() for m in answers)
        assert secret not in caplog.text
        for db in Path(gate.settings.state_db).parent.glob(Path(gate.settings.state_db).name + "*"):
            assert secret.encode() not in db.read_bytes(), db


async def created_then_stopped(make_gate: GateFactory, tmp_path: Path, state_db: Path) -> pb.Session:
    """A `rec` session asking for `tools`, made on a server on `state_db` that then stops."""
    gate = await gate_with(make_gate, tmp_path, state_db=state_db)
    created: pb.Session = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="rec", mcp_servers=["tools"]), timeout=30
    )
    await gate.running.drain(1.0)
    return created


async def test_a_session_resumed_after_a_restart_keeps_its_servers(
    make_gate: GateFactory, tmp_path: Path, secrets_env: None
) -> None:
    state_db = tmp_path / "kept.db"
    created = await created_then_stopped(make_gate, tmp_path, state_db)
    again = await gate_with(make_gate, tmp_path, state_db=state_db)
    fetched = await again.stub.GetSession(pb.GetSessionRequest(session_id=created.session_id), timeout=10)
    assert shown(fetched) == [("docs", "stdio", "agent"), ("tools", "stdio", "request")]
    await again.prompt(created.session_id, "hello")
    first, loaded = recorded(tmp_path, "rec")
    assert loaded["method"] == "session/load" and loaded["mcpServers"] == first["mcpServers"]


async def test_a_server_removed_from_the_config_is_left_out_with_a_notice(
    make_gate: GateFactory, tmp_path: Path, secrets_env: None
) -> None:
    state_db = tmp_path / "kept.db"
    created = await created_then_stopped(make_gate, tmp_path, state_db)
    catalog = {k: v for k, v in CATALOG.items() if k != "tools"}
    agents = {"rec": recorder(tmp_path, "rec", own=("docs",))}
    again = await make_gate(agents=agents, settings={"mcp_servers": catalog}, state_db=state_db)
    events = await again.prompt(created.session_id, "hello")
    notices = [e.notice for e in events if e.HasField("notice")]
    assert any(n.kind == "mcp_servers_missing" and "tools" in n.message for n in notices)
    loaded = recorded(tmp_path, "rec")[-1]
    assert [s["name"] for s in loaded["mcpServers"]] == ["docs"]


async def test_unknown_names_are_invalid_arguments(make_gate: GateFactory, tmp_path: Path) -> None:
    gate = await gate_with(make_gate, tmp_path)
    error = await expect_error(
        gate.stub.CreateSession(pb.CreateSessionRequest(agent="rec", mcp_servers=["nope"]), timeout=10)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mcp_servers" in error.violations


async def test_http_to_an_agent_without_http_is_a_failed_precondition(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await gate_with(make_gate, tmp_path)
    error = await expect_error(
        gate.stub.CreateSession(pb.CreateSessionRequest(agent="nohttp", mcp_servers=["tracker"]), timeout=30)
    )
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MCP_TRANSPORT_UNSUPPORTED")
    assert "tracker" in error.message and "http" in error.message
    assert recorded(tmp_path, "nohttp") == []  # refused before session/new was sent
    created = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="nohttp", mcp_servers=["tools"]), timeout=30
    )
    assert shown(created) == [("tools", "stdio", "request")]  # stdio: every agent


async def test_principals_use_only_the_servers_they_are_allowed(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[principals.alice]\ntoken_sha256 = "{token_hash("alice-token-0000")}"\n\n'
        f'[principals.bob]\ntoken_sha256 = "{token_hash("bob-token-00000")}"\nmcp_servers = ["tools"]\n'
    )
    gate = await gate_with(make_gate, tmp_path, auth_tokens_file=tokens)
    alice = [("authorization", "Bearer alice-token-0000")]
    bob = [("authorization", "Bearer bob-token-00000")]
    refused = await expect_error(
        gate.stub.CreateSession(
            pb.CreateSessionRequest(agent="rec", mcp_servers=["tools"]), metadata=alice, timeout=10
        )
    )
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MCP_SERVER_NOT_ALLOWED")
    # The agent's own server may always be named; bob may use "tools".
    own = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="rec", mcp_servers=["docs"]), metadata=alice, timeout=30
    )
    assert shown(own) == [("docs", "stdio", "agent")]
    allowed = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="rec", mcp_servers=["tools"]), metadata=bob, timeout=30
    )
    assert ("tools", "stdio", "request") in shown(allowed)


async def test_the_builtin_agent_reaches_a_named_servers_tool_with_its_secret(
    make_gate: GateFactory, tmp_path: Path, secrets_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    catalog = {
        "testtools": McpServerConfig(
            "testtools",
            "stdio",
            command=sys.executable,
            args=(str(MCP_SERVER_SCRIPT), "stdio"),
            env_from=(SECRET_ENV,),
        )
    }
    agent = echo_agent("echo-mcp", tmp_path / "echo-state")
    gate: Gate = await make_gate(
        agents={"echo-mcp": agent}, settings={"mcp_servers": catalog}, idle_ttl=1.0, sweep_interval=0.2
    )
    created = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="echo-mcp", mcp_servers=["testtools"]), timeout=30
    )
    listed = reply_text(await gate.prompt(created.session_id, "/mcp list"))
    assert listed.startswith("testtools stdio") and SECRET_ENV in listed and SECRET not in listed
    call = f'/mcp call testtools secret_env {{"name": "{SECRET_ENV}"}}'
    events = await gate.prompt(created.session_id, call, timeout=60)
    assert "set" in reply_text(events) and "unset" not in reply_text(events)
    # Suspended, then loaded again: the agent has the same server.
    again = await prompt_once_suspended(gate, created.session_id, "/mcp list")
    assert reply_text(again) == listed
    for event in [*events, *again]:
        assert SECRET.encode() not in event.SerializeToString()
    assert SECRET not in caplog.text
