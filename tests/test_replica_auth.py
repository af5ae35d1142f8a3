"""Replicas authenticate the calls they forward without sending a reusable secret: a listener
planted in the database as a replica (issue 20, item 3) receives a forwarded call, and nothing it
received works anywhere else. Real replica processes, a real PostgreSQL, the built-in agent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from sessiongate.server.security.auth import sign
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import expect_error
from tests.postgres import PostgresServer
from tests.processes import run_server
from tests.test_auth import as_, tokens_file
from tests.test_replicas import replicas

SECRET = "a-secret-the-replicas-share"
GET = "/sessiongate.v1.SessionService/GetSession"


class Listener(pb_grpc.SessionServiceServicer):
    """An attacker's gRPC server, registered as a replica: it keeps the headers it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[tuple[str, Any], ...]] = []

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        self.received.append(tuple(context.invocation_metadata() or ()))
        return pb.Session(session_id=request.session_id)


async def test_a_listener_planted_as_a_replica_gets_nothing_that_authenticates_elsewhere(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    secret = tmp_path / "replica-token"
    secret.write_text(SECRET + "\n")
    auth = (
        "--auth-tokens-file",
        str(tokens_file(tmp_path / "tokens.toml")),
        "--replica-token-file",
        str(secret),
    )
    listener = Listener()
    evil = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(listener, evil)
    evil_address = f"127.0.0.1:{evil.add_insecure_port('127.0.0.1:0')}"
    await evil.start()
    try:
        async with replicas(tmp_path, url, ("a", "b"), lease_ttl=10, options={"a": auth, "b": auth}) as r:
            a, b = r["a"], r["b"]
            sid = (
                await a.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
            ).session_id
            other = (
                await a.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"), timeout=30)
            ).session_id
            a_address = f"127.0.0.1:{a.port}"
            # What an agent that reached the database does: a replica row of its own, alice's
            # session pointed at it.
            db = await asyncpg.connect(url, timeout=10)
            try:
                await db.execute(
                    "INSERT INTO replicas (replica_id, advertise, lease_until, free_slots)"
                    " VALUES ('evil', $1, clock_timestamp() + interval '1 hour', 0)",
                    evil_address,
                )
                await db.execute("UPDATE sessions SET replica = 'evil' WHERE session_id = $1", sid)
            finally:
                await db.close(timeout=10)
            await b.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=as_("alice"), timeout=10)
            assert len(listener.received) == 1
            received = listener.received[0]
            values = " ".join(str(v) for _, v in received)
            # Neither the replicas' secret nor the caller's token reached it.
            assert SECRET not in values and "alice-secret" not in values
            assert not any(k in ("authorization", "sessiongate-replica-token") for k, _ in received)
            captured = [(k, v) for k, v in received if k.startswith("sessiongate-")]
            as_root = [(k, "root" if k == "sessiongate-principal" else v) for k, v in captured]

            async def refused(call: Any) -> None:
                error = await expect_error(call)
                assert error.code == grpc.StatusCode.UNAUTHENTICATED, error

            # Replayed to the real owner: the same call, another session, another method,
            # another principal; all refused (the signature was for the listener's address).
            await refused(
                a.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=captured, timeout=10)
            )
            await refused(
                a.stub.GetSession(pb.GetSessionRequest(session_id=other), metadata=captured, timeout=10)
            )
            await refused(
                a.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=captured, timeout=10)
            )
            await refused(a.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_root, timeout=10))
            # The old header, even with the real secret, is no way in any more.
            old = [("sessiongate-replica-token", SECRET), ("sessiongate-principal", "root")]
            await refused(a.stub.ListSessions(pb.ListSessionsRequest(), metadata=old, timeout=10))

            # A signature made for the owner itself (as one seen on the way from b to a would be)
            # works for that one call, once, within the window, and for nothing else.
            request = pb.GetSessionRequest(session_id=other)
            valid = list(sign(SECRET, GET, request, "bob", a_address))
            shown = await a.stub.GetSession(request, metadata=valid, timeout=10)
            assert shown.session_id == other and shown.owner == "bob"
            await refused(a.stub.GetSession(request, metadata=valid, timeout=10))  # twice
            fresh = list(sign(SECRET, GET, request, "bob", a_address))
            await refused(a.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=fresh, timeout=10))
            await refused(
                a.stub.CloseSession(pb.CloseSessionRequest(session_id=other), metadata=fresh, timeout=10)
            )
            swapped = [(k, "root" if k == "sessiongate-principal" else v) for k, v in fresh]
            await refused(a.stub.GetSession(request, metadata=swapped, timeout=10))
            stale = list(sign(SECRET, GET, request, "bob", a_address, now=time.time() - 60))
            await refused(a.stub.GetSession(request, metadata=stale, timeout=10))
            wrong_key = list(sign("another-secret-of-16-chars", GET, request, "bob", a_address))
            await refused(a.stub.GetSession(request, metadata=wrong_key, timeout=10))
            # The fresh one, unused so far, still works: each refusal above was for its reason.
            assert (await a.stub.GetSession(request, metadata=fresh, timeout=10)).owner == "bob"
    finally:
        await evil.stop(0)


def test_replicas_with_authentication_and_no_replica_secret_refuse_to_start(tmp_path: Path) -> None:
    """Without the replicas' secret a forwarded call could only carry the caller's own token to an
    address read from the database: the server refuses to start so (exit 2) instead."""
    tokens = tokens_file(tmp_path / "tokens.toml")
    url = "postgresql://gate@127.0.0.1:9/sessions"  # never reached: the check comes first
    result = run_server(
        *("--listen", "127.0.0.1:0", "--state-url", url, "--auth-tokens-file", str(tokens)),
        *("--state-db", str(tmp_path / "s.db")),
    )
    assert result.returncode == 2, result.stderr
    assert "replica_token_file" in result.stderr and "Traceback" not in result.stderr
