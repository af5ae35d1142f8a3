"""A session's MCP servers on the PostgreSQL store (issue 23, part 1).

The servers a session was created with, operator-named (`[mcp_servers.NAME]` with an `env_from`
secret) and client-supplied (a stdio server whose env carries a secret), are kept with the
session in PostgreSQL: after a restart of the server (same database, same mcp key file) the
session's next prompt loads the agent with both again, and neither secret is in any column of
the database in plain text (the client's is encrypted with the key file; the operator's is never
stored). The built-in agent proves each server really runs with its secret (`/mcp call NAME
secret_env`, which answers set or unset, never the value).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sessiongate.server.security.principals import token_hash
from sessiongate.server.settings import McpServerConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, echo_agent, reply_text
from tests.postgres import PostgresServer
from tests.test_mcp_servers import MCP_SERVER_SCRIPT, shown

NAMED_SECRET = "pg-named-s3cr3t-5d02"  # in the server's environment only
NAMED_VAR = "SG_TEST_PG_NAMED_SECRET"
CLIENT_SECRET = "pg-client-s3cr3t-9e41"  # sent by the client in CreateSession
CLIENT_VAR = "SG_TEST_PG_CLIENT_SECRET"
TOKEN = "bob-pg-token-00000"
AGENT = "echo-mcp"

SERVER_ARGS = (str(MCP_SERVER_SCRIPT), "stdio")  # tests/mcp_server.py over stdio
CATALOG = {
    "named": McpServerConfig(
        "named", "stdio", command=sys.executable, args=SERVER_ARGS, env_from=(NAMED_VAR,)
    )
}
CLIENT_SERVER = pb.McpServer(
    name="mine",
    stdio=pb.McpStdio(command=sys.executable, args=SERVER_ARGS, env={CLIENT_VAR: CLIENT_SECRET}),
)
CALLS = {
    "named": f'/mcp call named secret_env {{"name": "{NAMED_VAR}"}}',
    "mine": f'/mcp call mine secret_env {{"name": "{CLIENT_VAR}"}}',
}


def bob() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKEN}")]


async def start(make_gate: GateFactory, tmp_path: Path, url: str) -> Gate:
    """A server on the PostgreSQL database `url`; every start shares its tokens and key file."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[principals.bob]\ntoken_sha256 = "{token_hash(TOKEN)}"\n'
        'mcp_servers = ["named"]\nclient_mcp_servers = true\n'
    )
    replica_token = tmp_path / "replica.token"  # replicas with authentication need one
    replica_token.write_text("replica-token-0123456789\n")
    agent = echo_agent(AGENT, tmp_path / "echo-state")
    (tmp_path / "keys").mkdir(exist_ok=True)
    settings = {
        "mcp_servers": CATALOG,
        "mcp_key_file": tmp_path / "keys" / "mcp.key",
        "replica_token_file": replica_token,
    }
    gate: Gate = await make_gate(
        agents={AGENT: agent}, state_url=url, auth_tokens_file=tokens, settings=settings
    )
    return gate


async def reaches_both(gate: Gate, session_id: str) -> list[pb.PromptEvent]:
    """Each server's tool sees its secret env value; the events of both calls."""
    events: list[pb.PromptEvent] = []
    for name, call in CALLS.items():
        request = pb.PromptRequest(session_id=session_id, text=call)
        answer = [e async for e in gate.stub.Prompt(request, metadata=bob(), timeout=60)]
        assert reply_text(answer) == "set", (name, reply_text(answer))
        events += answer
    return events


async def database_text(url: str) -> tuple[str, bytes]:
    """Every column of every table of the database: the text ones as text, the bytea ones raw."""
    db = await asyncpg.connect(url, timeout=10)
    try:
        columns = await db.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
        assert {"sessions", "turn_events"} <= {c["table_name"] for c in columns}
        text, raw = [], []
        for column in columns:
            table, name = column["table_name"], column["column_name"]
            if column["data_type"] == "bytea":
                rows = await db.fetch(f'SELECT "{name}" AS v FROM "{table}"')
                raw += [bytes(r["v"]) for r in rows if r["v"] is not None]
            else:
                rows = await db.fetch(f'SELECT "{name}"::text AS v FROM "{table}"')
                text += [r["v"] for r in rows if r["v"] is not None]
        return "\n".join(text), b"\n".join(raw)
    finally:
        await db.close(timeout=10)


async def test_named_and_client_servers_survive_a_restart_on_postgresql_with_no_secret_stored(
    make_gate: GateFactory,
    tmp_path: Path,
    postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(NAMED_VAR, NAMED_SECRET)
    url = await postgres.fresh_database()
    gate = await start(make_gate, tmp_path, url)
    request = pb.CreateSessionRequest(agent=AGENT, mcp_servers=["named"], client_mcp_servers=[CLIENT_SERVER])
    created = await gate.stub.CreateSession(request, metadata=bob(), timeout=30)
    expected = [("named", "stdio", "request"), ("mine", "stdio", "request")]
    assert sorted(shown(created)) == sorted(expected)
    before = await reaches_both(gate, created.session_id)
    await gate.running.drain(1.0)

    again = await start(make_gate, tmp_path, url)  # same database, same key file
    fetched = await again.stub.GetSession(
        pb.GetSessionRequest(session_id=created.session_id), metadata=bob(), timeout=10
    )
    assert sorted(shown(fetched)) == sorted(expected)
    after = await reaches_both(again, created.session_id)  # the agent is started anew: session/load
    listed = await again.stub.ListSessions(pb.ListSessionsRequest(), metadata=bob(), timeout=10)

    text, raw = await database_text(url)
    assert "mine" in text and "named" in text  # the servers are there, by name
    answers: list[Any] = [created, fetched, listed, *before, *after]
    for secret in (NAMED_SECRET, CLIENT_SECRET):
        assert secret not in text and secret.encode() not in raw
        assert secret not in caplog.text
        for answer in answers:
            assert secret.encode() not in answer.SerializeToString()
