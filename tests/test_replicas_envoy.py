"""Three replicas on one PostgreSQL behind a real Envoy from deploy/envoy.yaml: one session is one
session whichever way a call comes in (a replica directly, Envoy with the SDK's `session-id`
header, Envoy without it), and a turn streaming through Envoy is cancelled through another
replica. Envoy's ring hash is checked by its own per-backend request counts: a `session-id`
header always lands on one replica."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from sessiongate.client.aio import AsyncSessionClient
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import reply_text
from tests.envoy import Envoy, envoy_front, needs_envoy
from tests.postgres import PostgresServer
from tests.test_replicas import PACED, drain, eventually_idle, replicas

Metadata = tuple[tuple[str, str], ...] | None


def assert_intact(events: list[pb.PromptEvent], text: str) -> None:
    """One whole turn: seq 1..n, the echo agent's reply, a result that ends the turn, last."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.HasField("result") for e in events].count(True) == 1 and events[-1].HasField("result")
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    assert reply_text(events) == text


async def prompt(stub: pb_grpc.SessionServiceStub, sid: str, text: str, metadata: Metadata) -> None:
    request = pb.PromptRequest(session_id=sid, text=text)
    assert_intact([e async for e in stub.Prompt(request, metadata=metadata, timeout=30)], text)


async def shown(stub: pb_grpc.SessionServiceStub, sid: str, metadata: Metadata = None) -> pb.Session:
    session: pb.Session = await stub.GetSession(
        pb.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10
    )
    return session


async def landings(envoy: Envoy, calls: int, metadata: Metadata, sid: str) -> dict[int, int]:
    """Per backend port, how many of `calls` GetSessions through Envoy reached it (by Envoy's own
    per-host request counts, which health checks do not touch)."""
    before = await asyncio.to_thread(envoy.requests)
    for _ in range(calls):
        await shown(envoy.stub, sid, metadata)
    after = await asyncio.to_thread(envoy.requests)
    return {port: after[port] - before[port] for port in after if after[port] != before[port]}


@needs_envoy
async def test_one_session_through_replicas_and_envoy_and_a_cancel_through_another_replica(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with (
        replicas(tmp_path, url, ("a", "b", "c"), lease_ttl=10) as r,
        envoy_front(tmp_path / "envoy", [s.port for s in r.values()]) as envoy,
    ):
        a, b, c = r["a"], r["b"], r["c"]
        created = await a.stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        sid = created.session_id
        keyed = (("session-id", sid),)
        assert created.replica == "a"
        agent_session = (await shown(a.stub, sid)).agent_session_id
        assert agent_session

        await prompt(b.stub, sid, "through b", None)
        await prompt(envoy.stub, sid, "through envoy with the header", keyed)
        await prompt(envoy.stub, sid, "through envoy without a header", None)
        for stub, metadata in ((envoy.stub, keyed), (envoy.stub, None), (b.stub, None), (c.stub, None)):
            seen = await shown(stub, sid, metadata)
            assert (seen.replica, seen.agent_session_id) == ("a", agent_session)
            assert seen.state == pb.SESSION_STATE_IDLE

        # The header lands on one replica, every time; calls without it are spread.
        ports = {s.port: name for name, s in r.items()}
        (landed,) = (await landings(envoy, 12, keyed, sid)).items()
        assert landed[0] in ports and landed[1] == 12, landed
        spread = await landings(envoy, 24, None, sid)
        assert sum(spread.values()) == 24 and len(spread) > 1, spread
        # The SDK sends the header by itself: its calls about the session land on one replica too.
        async with AsyncSessionClient(f"127.0.0.1:{envoy.port}") as client:
            before = await asyncio.to_thread(envoy.requests)
            for _ in range(12):
                assert (await client.get_session(sid)).replica == "a"
            after = await asyncio.to_thread(envoy.requests)
        assert {port: after[port] - before[port] for port in after if after[port] != before[port]} == {
            landed[0]: 12
        }

        # A long turn streaming through Envoy, cancelled through C.
        call = envoy.stub.Prompt(pb.PromptRequest(session_id=sid, text=PACED), metadata=keyed, timeout=60)
        assert dict(await call.initial_metadata())["sessiongate-turn-id"]
        first = await call.read()
        assert first is not grpc.aio.EOF
        cancelled = await c.stub.CancelPrompt(pb.CancelPromptRequest(session_id=sid), timeout=10)
        assert cancelled.cancelled
        events = [first, *await drain(call)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
        assert len(reply_text(events).split()) < 30  # stopped, not run to its end
        await eventually_idle(a, sid)

        # Only A ever ran an agent for it, with the one agent session.
        assert (await shown(c.stub, sid)).agent_session_id == agent_session
        assert not any(f"session={sid}" in line and "took over" in line for s in r.values() for line in s.log)
