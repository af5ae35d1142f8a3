"""Calls served without authentication (health; reflection when public) have a budget of their
own, per client address and in all, that never eats the authenticated calls' share
(`max_concurrent_rpcs`): a flood of Health Watch streams leaves an authenticated ListSessions
working, and is itself refused RESOURCE_EXHAUSTED past its budget (issue 20, item 8)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.server.security import auth
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, details_of
from tests.test_auth import as_, tokens_file

STREAMS = 200  # far past the budget and past max_concurrent_rpcs below
MAX_RPCS = 32


async def flood(gate: Gate, count: int) -> tuple[list[grpc.aio.UnaryStreamCall], int]:
    """`count` Health Watch streams from one address: the ones being served, and how many were
    refused RESOURCE_EXHAUSTED (anything else fails the test)."""
    channel = grpc.aio.insecure_channel(gate.target)
    gate.extra_channels.append(channel)
    health = health_pb2_grpc.HealthStub(channel)
    calls = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(count)]

    async def first(call: grpc.aio.UnaryStreamCall) -> bool:
        try:
            answer = await call.read()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert details_of(error).reason == "QUOTA_EXCEEDED"
            return False
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        return True

    served = await asyncio.wait_for(asyncio.gather(*(first(c) for c in calls)), 30)
    return [c for c, ok in zip(calls, served, strict=True) if ok], served.count(False)


async def authenticated_calls_work(gate: Gate) -> None:
    listed = await gate.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("alice"), timeout=10)
    assert list(listed.sessions) == []
    made = await gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    assert made.owner == "alice"


async def test_unauthenticated_watch_streams_from_one_peer_are_capped_and_leave_authenticated_calls_working(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await make_gate(
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"),
        max_concurrent_rpcs=MAX_RPCS,
        max_streams_per_connection=1000,
    )
    served, refused = await flood(gate, STREAMS)
    assert (len(served), refused) == (auth.UNAUTHENTICATED_PER_PEER, STREAMS - auth.UNAUTHENTICATED_PER_PEER)
    await authenticated_calls_work(gate)
    # A stream holds its place until it ends, however it ends: once these are cancelled, as
    # many new ones are served again.
    for call in served:
        call.cancel()
    for _ in range(100):
        again, _ = await flood(gate, auth.UNAUTHENTICATED_PER_PEER)
        if len(again) == auth.UNAUTHENTICATED_PER_PEER:
            break
        for call in again:
            call.cancel()
        await asyncio.sleep(0.1)
    assert len(again) == auth.UNAUTHENTICATED_PER_PEER
    for call in again:
        call.cancel()


async def test_unauthenticated_calls_in_all_are_capped_too(
    make_gate: GateFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "UNAUTHENTICATED_PER_PEER", STREAMS)  # one address stands for many
    gate = await make_gate(
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"),
        max_concurrent_rpcs=MAX_RPCS,
        max_streams_per_connection=1000,
    )
    served, refused = await flood(gate, STREAMS)
    assert (len(served), refused) == (auth.UNAUTHENTICATED_TOTAL, STREAMS - auth.UNAUTHENTICATED_TOTAL)
    await authenticated_calls_work(gate)
    for call in served:
        call.cancel()
