"""Client-supplied MCP servers (issue 23, part 1): CreateSession's `client_mcp_servers`, who may
supply them (the tokens file's `client_mcp_servers = true`), their checks, what the agent is
given at session/new and again at session/load (after a suspend and after a restart), and their
secrets: never in a response or a log line, encrypted at rest with a key file (0600) that a
sandboxed agent cannot read.

The built-in agent proves a stdio server really runs with its secret env value (`/mcp call
NAME secret_env`, which answers set or unset, never the value); the recording agent of
tests/test_mcp_servers.py shows the exact ACP payloads.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from sessiongate.server.security.principals import TokensFileError, TokenTable
from sessiongate.server.settings import ConfigError
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, echo_agent, expect_error, reply_text
from tests.test_auth import TOKENS, as_, tokens_file
from tests.test_mcp_servers import (
    MCP_SERVER_SCRIPT,
    prompt_once_suspended,
    recorded,
    recorder,
    shown,
)
from tests.test_sandbox import needs_bwrap
from tests.test_secret_masks import boxed, outside_tmp, say
from tests.test_server_startup import run_server

__all__ = ["outside_tmp"]  # a fixture, used here

SECRET = "client-s3cr3t-4be2d1"
HEADER_SECRET = "client-hdr-s3cr3t-77c0"
VAR = "SG_CLIENT_SECRET"


def stdio_server(name: str = "mine", secret: str = SECRET) -> pb.McpServer:
    """tests/mcp_server.py over stdio, given `secret` in its env."""
    command = pb.McpStdio(command=sys.executable, args=[str(MCP_SERVER_SCRIPT), "stdio"], env={VAR: secret})
    return pb.McpServer(name=name, stdio=command)


def http_server(name: str = "remote") -> pb.McpServer:
    remote = pb.McpRemote(url="http://127.0.0.1:9/mcp", headers={"Authorization": HEADER_SECRET})
    return pb.McpServer(name=name, http=remote)


def database_files(gate: Gate) -> list[Path]:
    state_db = Path(gate.settings.state_db)
    return [p for p in state_db.parent.glob(state_db.name + "*") if p.is_file()]


def assert_nowhere(secret: str, gate: Gate, caplog: pytest.LogCaptureFixture, *answers: Any) -> None:
    for answer in answers:
        assert secret.encode() not in answer.SerializeToString()
    assert secret not in caplog.text
    files = database_files(gate)
    assert files
    for db in files:
        assert secret.encode() not in db.read_bytes(), db


async def echo_gate(make_gate: GateFactory, tmp_path: Path, **kwargs: Any) -> Gate:
    agent = echo_agent("echo-mcp", tmp_path / "echo-state")
    rec = recorder(tmp_path, "rec")
    nohttp = recorder(tmp_path, "nohttp", "--no-http")
    gate: Gate = await make_gate(agents={"echo-mcp": agent, "rec": rec, "nohttp": nohttp}, **kwargs)
    return gate


CALL = f'/mcp call mine secret_env {{"name": "{VAR}"}}'


async def test_a_client_stdio_server_reaches_its_tool_and_its_secret_stays_hidden(
    make_gate: GateFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gate = await echo_gate(make_gate, tmp_path, idle_ttl=1.0, sweep_interval=0.2)
    created = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="echo-mcp", client_mcp_servers=[stdio_server()]), timeout=30
    )
    assert shown(created) == [("mine", "stdio", "request")]
    listed = reply_text(await gate.prompt(created.session_id, "/mcp list"))
    assert listed.startswith("mine stdio") and SECRET not in listed
    events = await gate.prompt(created.session_id, CALL, timeout=60)
    assert "set" in reply_text(events) and "unset" not in reply_text(events)
    # Suspended (idle), then loaded again: the agent still has the server and its secret.
    again = await prompt_once_suspended(gate, created.session_id, CALL)
    assert "set" in reply_text(again) and "unset" not in reply_text(again)
    fetched = await gate.stub.GetSession(pb.GetSessionRequest(session_id=created.session_id), timeout=10)
    listed_sessions = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
    assert shown(fetched) == [("mine", "stdio", "request")]
    assert_nowhere(SECRET, gate, caplog, created, fetched, listed_sessions, *events, *again)


async def test_the_agent_gets_the_same_client_servers_after_a_restart(
    make_gate: GateFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    state_db = tmp_path / "kept" / "sessions.db"
    state_db.parent.mkdir()
    gate = await echo_gate(make_gate, tmp_path, state_db=state_db)
    servers = [stdio_server(), http_server()]
    created = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="rec", client_mcp_servers=servers), timeout=30
    )
    assert shown(created) == [("mine", "stdio", "request"), ("remote", "http", "request")]
    made = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="echo-mcp", client_mcp_servers=[stdio_server()]), timeout=30
    )
    await gate.running.drain(1.0)
    again = await echo_gate(make_gate, tmp_path, state_db=state_db)
    fetched = await again.stub.GetSession(pb.GetSessionRequest(session_id=created.session_id), timeout=10)
    assert shown(fetched) == shown(created)
    await again.prompt(created.session_id, "hello")
    first, loaded = recorded(tmp_path, "rec")
    assert first["method"] == "session/new" and loaded["method"] == "session/load"
    assert (
        loaded["mcpServers"]
        == first["mcpServers"]
        == [
            {
                "name": "mine",
                "command": sys.executable,
                "args": [str(MCP_SERVER_SCRIPT), "stdio"],
                "env": [{"name": VAR, "value": SECRET}],
            },
            {
                "name": "remote",
                "type": "http",
                "url": "http://127.0.0.1:9/mcp",
                "headers": [{"name": "Authorization", "value": HEADER_SECRET}],
            },
        ]
    )
    # The built-in agent, restarted with the server, reaches the tool with its secret.
    events = await again.prompt(made.session_id, CALL, timeout=60)
    assert "set" in reply_text(events) and "unset" not in reply_text(events)
    for secret in (SECRET, HEADER_SECRET):
        assert_nowhere(secret, again, caplog, created, fetched, *events)
        assert_nowhere(secret, gate, caplog)


async def test_principals_supply_servers_only_when_allowed(make_gate: GateFactory, tmp_path: Path) -> None:
    tokens = tokens_file(tmp_path / "tokens.toml", ("alice", "bob"))
    text = tokens.read_text().replace("[principals.bob]\n", "[principals.bob]\nclient_mcp_servers = true\n")
    tokens.write_text(text)
    gate = await echo_gate(make_gate, tmp_path, auth_tokens_file=tokens)
    request = pb.CreateSessionRequest(agent="rec", client_mcp_servers=[stdio_server()])
    refused = await expect_error(gate.stub.CreateSession(request, metadata=as_("alice"), timeout=10))
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MCP_SERVER_NOT_ALLOWED")
    assert "client-supplied MCP servers are not allowed" in refused.message and SECRET not in refused.message
    assert recorded(tmp_path, "rec") == []
    allowed = await gate.stub.CreateSession(request, metadata=as_("bob"), timeout=30)
    assert shown(allowed) == [("mine", "stdio", "request")]


async def test_a_transport_the_agent_lacks_is_a_failed_precondition(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await echo_gate(make_gate, tmp_path)
    error = await expect_error(
        gate.stub.CreateSession(
            pb.CreateSessionRequest(agent="nohttp", client_mcp_servers=[http_server()]), timeout=30
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MCP_TRANSPORT_UNSUPPORTED")
    assert HEADER_SECRET not in error.message
    assert recorded(tmp_path, "nohttp") == []


def long_env(count: int) -> dict[str, str]:
    return {f"V{i}": "x" for i in range(count)}


@pytest.mark.parametrize(
    ("servers", "field"),
    [
        ([pb.McpServer(name="1bad", stdio=pb.McpStdio(command="c"))], "client_mcp_servers[0].name"),
        ([stdio_server("a"), stdio_server("a")], "client_mcp_servers[1].name"),
        ([stdio_server("tools")], "client_mcp_servers[0].name"),  # also asked for by name
        ([stdio_server(f"s{i}") for i in range(9)], "client_mcp_servers"),
        ([pb.McpServer(name="a")], "client_mcp_servers[0]"),
        ([pb.McpServer(name="a", stdio=pb.McpStdio())], "client_mcp_servers[0].stdio.command"),
        (
            [pb.McpServer(name="a", stdio=pb.McpStdio(command="c" * 4097))],
            "client_mcp_servers[0].stdio.command",
        ),
        (
            [pb.McpServer(name="a", stdio=pb.McpStdio(command="c", args=["x"] * 65))],
            "client_mcp_servers[0].stdio.args",
        ),
        (
            [pb.McpServer(name="a", stdio=pb.McpStdio(command="c", args=["x" * 4097]))],
            "client_mcp_servers[0].stdio.args",
        ),
        (
            [pb.McpServer(name="a", stdio=pb.McpStdio(command="c", env=long_env(65)))],
            "client_mcp_servers[0].stdio.env",
        ),
        (
            [pb.McpServer(name="a", stdio=pb.McpStdio(command="c", env={"NOT A NAME": "v"}))],
            "client_mcp_servers[0].stdio.env",
        ),
        (
            [pb.McpServer(name="a", stdio=pb.McpStdio(command="c", env={"V": SECRET * 500}))],
            "client_mcp_servers[0].stdio.env",
        ),
        ([pb.McpServer(name="a", http=pb.McpRemote(url="ftp://x/"))], "client_mcp_servers[0].http.url"),
        (
            [pb.McpServer(name="a", sse=pb.McpRemote(url="http://x/" + "p" * 2048))],
            "client_mcp_servers[0].sse.url",
        ),
        (
            [pb.McpServer(name="a", http=pb.McpRemote(url="http://x/", headers={"Bad Header": "v"}))],
            "client_mcp_servers[0].http.headers",
        ),
        (
            [pb.McpServer(name="a", http=pb.McpRemote(url="http://x/", headers={"A": SECRET + "\r\nX: y"}))],
            "client_mcp_servers[0].http.headers",
        ),
    ],
)
async def test_bad_client_servers_are_invalid_arguments(
    make_gate: GateFactory, tmp_path: Path, servers: list[pb.McpServer], field: str
) -> None:
    from tests.test_mcp_servers import CATALOG

    gate = await echo_gate(make_gate, tmp_path, settings={"mcp_servers": CATALOG})
    request = pb.CreateSessionRequest(agent="rec", mcp_servers=["tools"], client_mcp_servers=servers)
    error = await expect_error(gate.stub.CreateSession(request, timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations, error.violations
    assert all(SECRET not in v and len(v) < 200 for v in error.violations.values())
    assert recorded(tmp_path, "rec") == []


async def test_the_key_file_is_made_0600_and_a_bad_one_stops_the_start(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await echo_gate(make_gate, tmp_path)
    key = Path(gate.settings.state_db).parent / "mcp.key"
    assert gate.settings.mcp_key_path == key
    assert key.stat().st_mode & 0o777 == 0o600
    made = key.read_bytes()
    await gate.running.drain(1.0)
    await echo_gate(make_gate, tmp_path, state_db=gate.settings.state_db)
    assert key.read_bytes() == made  # read, never replaced
    bad = tmp_path / "bad.key"
    bad.write_text("not a fernet key\n")
    with pytest.raises(ConfigError, match=r"bad\.key is not a Fernet key") as caught:
        await echo_gate(make_gate, tmp_path, settings={"mcp_key_file": bad})
    assert "not a fernet key" not in str(caught.value)  # the content is never shown


@needs_bwrap
async def test_a_sandboxed_agent_cannot_read_the_key_file(make_gate: GateFactory, outside_tmp: Path) -> None:
    key = outside_tmp / "etc" / "mcp.key"
    key.parent.mkdir()
    public = outside_tmp / "public.txt"  # beside it, not a secret: the agent does see it
    public.write_text("visible")
    gate = await make_gate(
        agents={"boxed": replace(boxed(), ro_paths=(str(outside_tmp),))},
        state_db=outside_tmp / "state" / "sessions.db",
        settings={"mcp_key_file": key},
    )
    secret = key.read_text().strip()
    assert os.stat(key).st_mode & 0o777 == 0o600
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    sid = session.session_id
    assert await say(gate.stub, sid, f"/read {public}") == "visible"
    read = await say(gate.stub, sid, f"/read {key}")
    assert secret not in read and (read == "" or read.startswith("cannot read")), read
    cat = await say(gate.stub, sid, f"/terminal cat {key}")
    assert cat.startswith("terminal exit") and secret not in cat, cat


async def test_servers_sealed_with_another_key_are_left_out_with_a_notice(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    state_db = tmp_path / "kept" / "sessions.db"
    state_db.parent.mkdir()
    gate = await echo_gate(make_gate, tmp_path, state_db=state_db)
    created = await gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="rec", client_mcp_servers=[stdio_server()]), timeout=30
    )
    await gate.running.drain(1.0)
    (state_db.parent / "mcp.key").write_bytes(Fernet.generate_key())  # the operator replaced it
    again = await echo_gate(make_gate, tmp_path, state_db=state_db)
    events = await again.prompt(created.session_id, "hello")
    notices = [e.notice for e in events if e.HasField("notice")]
    assert any(n.kind == "mcp_servers_missing" and "mine" in n.message for n in notices)
    assert recorded(tmp_path, "rec")[-1] == {"method": "session/load", "mcpServers": []}


def test_a_principals_client_mcp_servers_key_must_be_a_boolean(tmp_path: Path) -> None:
    path = tokens_file(tmp_path / "tokens.toml", ("alice",))
    path.write_text(path.read_text() + 'client_mcp_servers = "yes"\n')
    with pytest.raises(TokensFileError, match="client_mcp_servers must be true or false"):
        TokenTable(path).load()
    path.write_text(path.read_text().replace('"yes"', "true"))
    table = TokenTable(path)
    table.load()
    alice = table.principal(TOKENS["alice"])
    assert alice is not None and alice.client_mcp_servers


def test_check_config_refuses_a_bad_key_file_without_making_one(tmp_path: Path) -> None:
    state = ["--state-db", str(tmp_path / "state" / "sessions.db")]
    missing = tmp_path / "missing.key"
    result = run_server("--check-config", *state, "--mcp-key-file", str(missing))
    assert result.returncode == 0, result.stderr
    assert not missing.exists()  # a start makes it, a check does not
    bad = tmp_path / "bad.key"
    bad.write_text("not a fernet key\n")
    result = run_server("--check-config", *state, "--mcp-key-file", str(bad))
    assert result.returncode == 2 and "bad.key is not a Fernet key" in result.stderr, result.stderr
    assert "not a fernet key" not in result.stderr and "Traceback" not in result.stderr
