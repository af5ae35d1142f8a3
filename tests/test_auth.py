"""Principals and ownership: bearer tokens, sessions that belong to their creator, allowed
agents, the audit log, and the refusal to serve a network address unauthenticated."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sessiongate.client import AsyncSessionClient, Unauthenticated
from sessiongate.server.security.principals import token_hash
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, eventually, expect_error, reply_text
from tests.processes import run_server
from tests.test_cli import cli

TOKENS = {"alice": "alice-secret", "bob": "bob-secret", "root": "root-secret", "carol": "carol-secret"}
# Every RPC that names a session, from the service itself: a new one is covered by construction.
SESSION_RPCS = tuple(
    m.name
    for m in pb.DESCRIPTOR.services_by_name["SessionService"].methods
    if "session_id" in m.input_type.fields_by_name
)
# What else each needs to be a valid request, so that only the session's owner decides the
# answer (an RPC missing here that needs more fails the ownership test with INVALID_ARGUMENT).
VALID_FIELDS: dict[str, dict[str, Any]] = {
    "Prompt": {"text": "hi"},
    "RespondPermission": {"request_id": "r1", "option_id": "allow"},
    "RespondElicitation": {"request_id": "r1", "action": pb.ELICITATION_ACTION_DECLINE},
    "RespondToolCall": {"request_id": "r1", "error": "no"},
    "SetSessionMode": {"mode_id": "ask"},  # one the echo agent offers, not its first
    "SetSessionConfigOption": {"config_id": "c", "value": "v"},
    "GetTurn": {"turn_id": "t"},
}


def tokens_file(path: Path, names: tuple[str, ...] = tuple(TOKENS)) -> Path:
    entries = {
        "alice": "",
        "bob": "",
        "root": "admin = true\n",
        "carol": 'agents = ["second"]\n',
    }
    path.write_text(
        "".join(f'[principals.{n}]\ntoken_sha256 = "{token_hash(TOKENS[n])}"\n{entries[n]}\n' for n in names)
    )
    return path


def as_(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


@pytest.fixture
async def auth_gate(make_gate: GateFactory, tmp_path: Path) -> Gate:
    gate: Gate = await make_gate(
        agents={"second": ()}, auth_tokens_file=tokens_file(tmp_path / "tokens.toml")
    )
    return gate


def session_call(gate: Gate, rpc: str, session_id: str, metadata: Any, **fields: Any) -> Any:
    """`rpc` of SessionService on `session_id`: a unary call to await or a stream to drain."""
    method = pb.DESCRIPTOR.services_by_name["SessionService"].methods_by_name[rpc]
    request = getattr(pb, method.input_type.name)(
        session_id=session_id, **{**VALID_FIELDS.get(rpc, {}), **fields}
    )
    return getattr(gate.stub, rpc)(request, metadata=metadata, timeout=10)


async def test_every_rpc_needs_a_valid_token_and_says_nothing_about_what_was_wrong(auth_gate: Gate) -> None:
    session = await auth_gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    for metadata in (
        [],
        [("authorization", "Bearer wrong")],
        [("authorization", f"Basic {TOKENS['alice']}")],
    ):
        calls = [
            auth_gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata, timeout=10),
            auth_gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=10),
            auth_gate.stub.ListAgents(pb.ListAgentsRequest(), metadata=metadata, timeout=10),
            *(session_call(auth_gate, rpc, session.session_id, metadata) for rpc in SESSION_RPCS),
        ]
        for call in calls:
            error = await expect_error(call)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
            assert error.message == "missing or invalid credentials"
    health = health_pb2_grpc.HealthStub(auth_gate.channel)  # probes carry no token
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(auth_gate.channel)
    listing = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    assert (await expect_error(listing)).code == grpc.StatusCode.UNAUTHENTICATED


async def test_reflection_can_be_made_public(make_gate: GateFactory, tmp_path: Path) -> None:
    gate: Gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "t.toml"), reflection="public")
    stub = reflection_pb2_grpc.ServerReflectionStub(gate.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    assert "sessiongate.v1.SessionService" in {s.name for s in responses[0].list_services_response.service}


async def test_sessions_belong_to_their_owner_and_others_cannot_tell_them_from_unknown_ones(
    auth_gate: Gate,
) -> None:
    stub = auth_gate.stub
    mine = await stub.CreateSession(
        pb.CreateSessionRequest(request_id="same"), metadata=as_("alice"), timeout=30
    )
    theirs = await stub.CreateSession(
        pb.CreateSessionRequest(request_id="same"), metadata=as_("bob"), timeout=30
    )
    assert mine.session_id != theirs.session_id, "request_id idempotency must be per principal"
    assert (mine.owner, theirs.owner) == ("alice", "bob")

    # A turn of alice's, so that a turn RPC missing the check would find something to show.
    first = [
        e
        async for e in stub.Prompt(
            pb.PromptRequest(session_id=mine.session_id, text="first"), metadata=as_("alice")
        )
    ]
    assert reply_text(first) == "first"
    before = await stub.GetSession(pb.GetSessionRequest(session_id=mine.session_id), metadata=as_("alice"))
    turn_id = before.turn_id
    assert turn_id

    assert {"Prompt", "RespondPermission", "RespondElicitation", "SetSessionMode"} <= set(SESSION_RPCS)
    assert {"SetSessionConfigOption", "WatchTurn", "ListTurns", "GetTurn", "CloseSession"} <= set(
        SESSION_RPCS
    )
    unknown = "x" * len(mine.session_id)
    for rpc in SESSION_RPCS:
        turn = {"turn_id": turn_id} if "turn_id" in VALID_FIELDS.get(rpc, {}) else {}
        hidden = await expect_error(session_call(auth_gate, rpc, mine.session_id, as_("bob"), **turn))
        absent = await expect_error(session_call(auth_gate, rpc, unknown, as_("bob"), **turn))
        assert (hidden.code, hidden.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"), (rpc, hidden)
        assert hidden.message.replace(mine.session_id, unknown) == absent.message, rpc
        assert hidden.metadata == {"session_id": mine.session_id} and absent.metadata == {
            "session_id": unknown
        }, rpc
    untouched = await stub.GetSession(pb.GetSessionRequest(session_id=mine.session_id), metadata=as_("alice"))
    assert (untouched.state, untouched.turn_id) == (pb.SESSION_STATE_IDLE, turn_id)
    assert untouched.modes.current_mode_id == before.modes.current_mode_id != "ask"

    listed = await stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("bob"), timeout=10)
    assert [s.session_id for s in listed.sessions] == [theirs.session_id]
    everyone = await stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("root"), timeout=10)
    assert {s.session_id for s in everyone.sessions} == {mine.session_id, theirs.session_id}
    only_alice = await stub.ListSessions(
        pb.ListSessionsRequest(owner="alice"), metadata=as_("root"), timeout=10
    )
    assert [s.session_id for s in only_alice.sessions] == [mine.session_id]
    # Alice's own session is hers to use; an admin may act on it too.
    events = [
        e
        async for e in stub.Prompt(
            pb.PromptRequest(session_id=mine.session_id, text="mine"), metadata=as_("alice")
        )
    ]
    assert reply_text(events) == "mine"
    closed = await stub.CloseSession(
        pb.CloseSessionRequest(session_id=mine.session_id), metadata=as_("root"), timeout=15
    )
    assert closed.session.state == pb.SESSION_STATE_CLOSED
    # ...and once closed, it stays invisible to bob (no "already closed" answer leaks it).
    again = await expect_error(session_call(auth_gate, "CloseSession", mine.session_id, as_("bob")))
    assert again.reason == "SESSION_NOT_FOUND"


async def test_an_agent_the_principal_may_not_use_is_permission_denied(auth_gate: Gate) -> None:
    error = await expect_error(
        auth_gate.stub.CreateSession(pb.CreateSessionRequest(agent="echo"), metadata=as_("carol"), timeout=30)
    )
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "AGENT_NOT_ALLOWED")
    allowed = await auth_gate.stub.CreateSession(
        pb.CreateSessionRequest(agent="second"), metadata=as_("carol"), timeout=30
    )
    assert allowed.agent == "second" and allowed.owner == "carol"


async def test_a_principal_removed_from_the_tokens_file_loses_access_without_a_restart(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    path = tokens_file(tmp_path / "tokens.toml")
    gate: Gate = await make_gate(auth_tokens_file=path)
    await gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("bob"), timeout=10)
    tokens_file(path, ("alice", "root"))

    async def bob_refused() -> bool:
        try:
            await gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("bob"), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    for _ in range(100):  # the file is checked every 2 s
        if await bob_refused():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("bob's token still worked 10 s after his entry was removed")
    path.write_text("this is [ not toml")  # a broken edit keeps the last good table
    await asyncio.sleep(2.5)
    await gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("alice"), timeout=10)


async def test_every_call_leaves_an_audit_line_without_tokens_or_prompts(
    auth_gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sessiongate.audit")
    session = await auth_gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    events = auth_gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="confidential words"), metadata=as_("alice")
    )
    assert reply_text([e async for e in events]) == "confidential words"
    await expect_error(auth_gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id)))

    def line(rpc: str, who: str, code: str) -> bool:
        return any(
            f"principal={who} rpc=/sessiongate.v1.SessionService/{rpc}" in r.getMessage()
            and f"code={code}" in r.getMessage()
            for r in caplog.records
            if r.name == "sessiongate.audit"
        )

    # A call's line is written as its handler returns, which can be just after its client
    # saw the status: wait for each rather than assume the order.
    await eventually(lambda: line("Prompt", "alice", "OK"), 5, "the prompt's audit line")
    await eventually(lambda: line("GetSession", "-", "UNAUTHENTICATED"), 5, "the refusal's audit line")
    assert line("CreateSession", "alice", "OK")
    audited = "\n".join(r.getMessage() for r in caplog.records if r.name == "sessiongate.audit")
    assert session.session_id in audited
    assert "secret" not in audited and "confidential" not in audited


async def test_the_sdk_and_the_cli_send_a_token(auth_gate: Gate) -> None:
    async with AsyncSessionClient(auth_gate.target, token=TOKENS["alice"]) as client:
        session = await client.create_session()
        assert session.owner == "alice"
    async with AsyncSessionClient(auth_gate.target) as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.list_agents()
    code, out, _ = await cli(auth_gate, "--token", TOKENS["alice"], "list")
    assert code == 0 and session.session_id in out
    code, _, err = await cli(auth_gate, "list", env={"SESSIONGATE_TOKEN": "wrong"})
    assert code == 8 and "UNAUTHENTICATED" in err and "--token" in err


async def test_sessions_stored_before_owners_existed_belong_to_nobody_and_only_admins_see_them(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as old:  # a schema-1 database, as the previous release wrote it
        old.executescript(
            """CREATE TABLE sessions (session_id TEXT PRIMARY KEY, agent TEXT NOT NULL, cwd TEXT NOT NULL,
            labels TEXT NOT NULL, state TEXT NOT NULL, agent_session_id TEXT NOT NULL,
            request_id TEXT NOT NULL, create_time REAL NOT NULL, last_active_time REAL NOT NULL,
            agent_info TEXT NOT NULL);
            INSERT INTO sessions VALUES ('old-one', 'echo', '/', '{}', 'idle', '', '', 1e9, 4e9, '{}');
            PRAGMA user_version=1;"""
        )
    gate: Gate = await make_gate(state_db=db, auth_tokens_file=tokens_file(tmp_path / "t.toml"))
    seen_by_root = await gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("root"), timeout=10)
    assert [(s.session_id, s.owner) for s in seen_by_root.sessions] == [("old-one", "")]
    seen_by_bob = await gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("bob"), timeout=10)
    assert not seen_by_bob.sessions


async def test_state_files_are_the_servers_alone(make_gate: GateFactory, tmp_path: Path) -> None:
    gate: Gate = await make_gate(state_db=tmp_path / "fresh-state" / "sessions.db")
    await gate.create()
    assert stat.S_IMODE((tmp_path / "fresh-state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "fresh-state" / "sessions.db").stat().st_mode) == 0o600


def test_a_network_address_without_authentication_needs_insecure_to_start(tmp_path: Path) -> None:
    result = run_server("--listen", "0.0.0.0:0", "--state-db", str(tmp_path / "db"), timeout=30)
    assert result.returncode == 2
    assert "--auth-tokens-file" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


async def test_quotas_bound_each_principals_sessions_and_prompt_rate_and_the_servers_sessions(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.toml"
    tokens_file(path)
    path.write_text(
        path.read_text().replace(
            "[principals.bob]\n", "[principals.bob]\nmax_sessions = 2\nmax_prompts_per_minute = 3\n"
        )
    )
    gate: Gate = await make_gate(auth_tokens_file=path, max_stored_sessions=4)
    stub = gate.stub
    kept = [
        await stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"), timeout=30) for _ in range(2)
    ]
    over = await expect_error(stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"), timeout=30))
    assert (over.code, over.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert over.quota == {"principal:bob": "max_sessions is 2"}
    await stub.CreateSession(
        pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30
    )  # others unaffected

    for n in range(3):
        events = stub.Prompt(
            pb.PromptRequest(session_id=kept[0].session_id, text=f"p{n}"), metadata=as_("bob")
        )
        assert reply_text([e async for e in events]) == f"p{n}"
    fast = await expect_error(
        stub.Prompt(pb.PromptRequest(session_id=kept[0].session_id, text="too fast"), metadata=as_("bob"))
    )
    assert fast.reason == "QUOTA_EXCEEDED" and fast.quota == {"principal:bob": "max_prompts_per_minute is 3"}
    assert fast.retry_delay is not None and 0 < fast.retry_delay <= 60

    await stub.CloseSession(
        pb.CloseSessionRequest(session_id=kept[1].session_id), metadata=as_("bob"), timeout=15
    )
    await stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"), timeout=30)  # room again
    await stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)  # 4 kept now
    full = await expect_error(stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("root"), timeout=30))
    assert full.quota == {"server": "max_stored_sessions is 4"}
