"""The Python SDK against a real server: calls, typed errors, retries."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from sessiongate.v1 import session_service_pb2 as pb

from client import (
    AgentAuthRequired,
    AgentProtocolError,
    AgentUnavailable,
    AsyncSessionClient,
    InvalidRequest,
    SessionBusy,
    SessionClient,
    SessionNotFound,
    retry,
    retry_async,
)
from tests.conftest import Gate, GateFactory


async def test_async_client_mirrors_the_rpcs(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target, metadata=[("x-caller", "tests")]) as client:
        assert await client.health() == "SERVING"
        assert (await client.list_agents()).default_agent == "echo"
        session = await client.create_session(labels={"k": "v"})
        assert session.request_id.startswith("sdk-"), "the SDK makes creates idempotent"
        text, result = await client.reply(session.session_id, "typed events and a result")
        assert text == "typed events and a result"
        assert result.stop_reason == pb.STOP_REASON_END_TURN
        kinds = [e.WhichOneof("event") async for e in client.prompt(session.session_id, "x")]
        assert kinds[0] == "thought_chunk" and kinds[-1] == "result"
        for _ in range(2):
            await client.create_session()
        listed = [s.session_id async for s in client.list_sessions(page_size=1)]
        assert len(listed) == 3 and listed[0] == session.session_id
        assert [s.session_id async for s in client.list_sessions(labels={"k": "v"})] == [session.session_id]
        assert not await client.cancel_prompt(session.session_id)
        assert (await client.close_session(session.session_id)).state == pb.SESSION_STATE_CLOSED
        assert (await client.close_session(session.session_id)).state == pb.SESSION_STATE_CLOSED  # safe again
        with pytest.raises(SessionNotFound) as raised:
            await client.get_session(session.session_id)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert raised.value.metadata["session_id"] == session.session_id
        other = await client.create_session()
        with pytest.raises(AgentProtocolError) as broken:
            await client.reply(other.session_id, "/badresult")
        assert broken.value.metadata["method"] == "session/prompt"


async def test_errors_are_typed_with_their_decoded_details(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"locked": ("--auth-required",)})
    async with AsyncSessionClient(gate.target) as client:
        with pytest.raises(AgentAuthRequired) as auth:
            await client.create_session("locked")
        assert auth.value.metadata["auth_methods"] == "echo-login"

        with pytest.raises(InvalidRequest) as invalid:
            await client.create_session("nope")
        assert "agent" in invalid.value.violations

        session = await client.create_session()
        turn = asyncio.create_task(client.reply(session.session_id, "/sleep 1.5 first"))
        await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
        with pytest.raises(SessionBusy) as busy:
            await client.reply(session.session_id, "second")
        assert busy.value.retry_delay == 1.0 and busy.value.reason == "SESSION_BUSY"
        assert (await turn)[0] == "first"


async def test_retry_helper_honours_retry_info_within_a_bounded_wait(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        turn = asyncio.create_task(client.reply(session.session_id, "/sleep 2 first"))
        await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)

        with pytest.raises(SessionBusy):
            await retry_async(lambda: client.reply(session.session_id, "too impatient"), max_wait=0.5)
        started = time.monotonic()
        text, _ = await retry_async(lambda: client.reply(session.session_id, "patient"), max_wait=15)
        assert text == "patient"
        assert time.monotonic() - started >= 0.5, "it must have waited for the first turn"
        await turn


async def test_agent_start_failures_are_not_retried_transparently(make_gate: GateFactory) -> None:
    """The unary retry policy retries UNAVAILABLE; the server commits AGENT_UNAVAILABLE first so
    a failing agent is started once, not once per attempt."""
    gate: Gate = await make_gate(agents={"refuses": ("--fail-init",)})
    async with AsyncSessionClient(gate.target) as client:
        with pytest.raises(AgentUnavailable):
            await client.create_session("refuses")
    assert len(gate.agent_pids()) == 1


async def test_the_blocking_client_and_retry(gate: Gate) -> None:
    def scenario() -> tuple[str, str, int]:
        with SessionClient(gate.target) as client:
            session = client.create_session()
            text, _ = client.reply(session.session_id, "blocking works")
            events = list(client.prompt(session.session_id, "again"))
            retried, _ = retry(lambda: client.reply(session.session_id, "retried"), max_wait=5)
            return text, retried, events[-1].result.stop_reason

    text, retried, stop = await asyncio.to_thread(scenario)
    assert (text, retried, stop) == ("blocking works", "retried", pb.STOP_REASON_END_TURN)


async def test_abandoning_a_prompt_iteration_cancels_the_turn_upstream(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        stream = client.prompt(session.session_id, "/stall")
        first = await anext(stream)
        assert first.HasField("message_chunk")
        await stream.aclose()
        await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)
        assert any(f"cancel {session.agent_session_id}" in line for line in gate.events_log())
