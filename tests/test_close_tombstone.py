"""A retried CloseSession answers the same after a restart, and through another replica: a closed
session leaves a tombstone with its record in the store for the session retention. GetSession
of a closed session stays NOT_FOUND."""

from __future__ import annotations

from pathlib import Path

import grpc
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import GateFactory, StateBackend, expect_error
from tests.postgres import PostgresServer
from tests.processes import server_process
from tests.test_auth import as_, tokens_file
from tests.test_replicas import replicas


async def test_a_close_retried_after_a_restart_answers_the_same_and_get_stays_not_found(
    tmp_path: Path, state: StateBackend
) -> None:
    async with server_process(tmp_path, extra_args=state.process_args()) as first:
        created = await first.stub.CreateSession(
            pb.CreateSessionRequest(request_id="r1", labels={"team": "a"}), timeout=30
        )
        sid = created.session_id
        request = pb.PromptRequest(session_id=sid, text="hello")
        assert [e async for e in first.stub.Prompt(request, timeout=30)]
        closed = await first.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
        assert closed.session.state == pb.SESSION_STATE_CLOSED
        assert await first.stop() == 0

    async with server_process(tmp_path, extra_args=state.process_args()) as second:
        again = await second.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
        # All but the last turn's id: that turn went with the session, and a restored session
        # never names its last turn (the record does not hold it).
        assert closed.session.turn_id
        closed.session.ClearField("turn_id")
        assert again == closed
        gone = await expect_error(second.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10))
        assert gone.code == grpc.StatusCode.NOT_FOUND
        unknown = await expect_error(
            second.stub.CloseSession(pb.CloseSessionRequest(session_id="never-made"), timeout=10)
        )
        assert unknown.code == grpc.StatusCode.NOT_FOUND
        assert (await second.stub.ListSessions(pb.ListSessionsRequest(), timeout=10)).sessions == []


async def test_a_close_retried_through_another_replica_answers_the_same(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=10.0) as started:
        a, b = started["a"], started["b"]
        created = await a.stub.CreateSession(pb.CreateSessionRequest(labels={"k": "v"}), timeout=30)
        sid = created.session_id
        closed = await a.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)

        again = await b.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
        assert again == closed
        gone = await expect_error(b.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10))
        assert gone.code == grpc.StatusCode.NOT_FOUND


async def test_another_principals_tombstone_is_not_found_and_tells_nothing(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    """A retried close reads the tombstone only for the principal that may see the session: to
    anyone else a closed session is as unknown as one never made (same status, no owner named)."""
    gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "tokens.toml"))
    created = await gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    sid = created.session_id
    request = pb.CloseSessionRequest(session_id=sid)
    closed = await gate.stub.CloseSession(request, metadata=as_("alice"), timeout=30)
    gate.running.pool._recently_closed.clear()  # as after a restart: only the tombstone is left
    for intruder in ("bob", "carol"):
        refused = await expect_error(gate.stub.CloseSession(request, metadata=as_(intruder), timeout=10))
        unknown = await expect_error(
            gate.stub.CloseSession(pb.CloseSessionRequest(session_id="x" * len(sid)), metadata=as_(intruder))
        )
        assert (
            (refused.code, refused.reason)
            == (unknown.code, unknown.reason)
            == (
                grpc.StatusCode.NOT_FOUND,
                "SESSION_NOT_FOUND",
            )
        )
        assert "alice" not in refused.message
    assert await gate.stub.CloseSession(request, metadata=as_("alice"), timeout=10) == closed
    admin = await gate.stub.CloseSession(request, metadata=as_("root"), timeout=10)
    assert admin == closed  # an admin sees every principal's sessions, closed ones too
