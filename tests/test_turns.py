"""Turn semantics against a real server and real echo-agent subprocesses."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from sessiongate.echo.agent import flood_chunk
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import (
    Gate,
    GateFactory,
    alive,
    echo_agent,
    eventually,
    expect_error,
    kinds,
    reply_text,
    wait_gone,
)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def first_event(gate: Gate, call: grpc.aio.UnaryStreamCall) -> pb.PromptEvent:
    event: pb.PromptEvent = await asyncio.wait_for(call.read(), 10)
    return event


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.PromptEvent]:
    """The remaining events of a call already read with read() (grpc.aio forbids mixing styles)."""
    events = []
    while (event := await asyncio.wait_for(call.read(), 15)) is not grpc.aio.EOF:
        events.append(event)
    return events


async def test_normal_turn_streams_every_update_kind_in_order_and_ends_with_result(gate: Gate) -> None:
    session = await gate.create()
    assert session.state == pb.SESSION_STATE_IDLE
    assert session.agent_info.name == "sessiongate-echo"

    events = await gate.prompt(session.session_id, "hello brave new world")

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert kinds(events)[:4] == ["thought_chunk", "tool_call", "tool_call_update", "plan"]
    assert events[1].tool_call.status == pb.TOOL_CALL_STATUS_PENDING
    assert events[1].tool_call.kind == "read"
    assert events[2].tool_call_update.status == pb.TOOL_CALL_STATUS_COMPLETED
    assert [e.status for e in events[3].plan.entries] == ["completed", "in_progress"]
    assert set(kinds(events)[4:-1]) == {"message_chunk"}  # one per word, or fewer if coalesced
    assert reply_text(events) == "hello brave new world"
    result = events[-1].result
    assert result.stop_reason == pb.STOP_REASON_END_TURN
    assert result.usage.input_tokens == 4
    assert await gate.state(session.session_id) == pb.SESSION_STATE_IDLE


async def test_available_commands_arrive_as_a_typed_commands_update(gate: Gate) -> None:
    # (Update kinds without a typed event still pass through as `other`: test_misbehaving_agents.)
    session = await gate.create()
    events = await gate.prompt(session.session_id, "/commands")
    assert kinds(events) == ["commands_update", "result"]
    names = {c.name for c in events[0].commands_update.available_commands}
    assert names >= {"stall", "hang", "flood", "commands"}


async def test_content_blocks_are_sent_after_text(gate: Gate) -> None:
    session = await gate.create()
    content = [pb.ContentBlock(text=pb.TextContent(text="from a block"))]
    events = await gate.prompt(session.session_id, "first", content=content)
    assert reply_text(events) == "first from a block"


async def test_every_kind_of_content_block_reaches_the_agent_as_the_acp_schema_has_it(gate: Gate) -> None:
    """The prompt goes to the agent as JSON the gateway builds (translate.prompt_json), not
    through the SDK's PromptRequest: the agent's own SDK parses each kind, in order, with every
    field (/blocks)."""
    session = await gate.create()
    content = [
        pb.ContentBlock(text=pb.TextContent(text="a block")),
        pb.ContentBlock(image=pb.ImageContent(data=b"\x89PNG", mime_type="image/png", uri="file:///i.png")),
        pb.ContentBlock(
            resource_link=pb.ResourceLink(
                uri="file:///a.txt",
                name="a.txt",
                mime_type="text/plain",
                title="A",
                description="the a",
                size=12,
            )
        ),
        pb.ContentBlock(
            resource=pb.EmbeddedResource(uri="file:///b.txt", mime_type="text/plain", text="bee")
        ),
        pb.ContentBlock(resource=pb.EmbeddedResource(uri="file:///c.bin", blob=b"\x00\x01")),
    ]
    events = await gate.prompt(session.session_id, "/blocks", content=content)
    assert [json.loads(line) for line in reply_text(events).splitlines()] == [
        {"type": "text", "text": "/blocks"},
        {"type": "text", "text": "a block"},
        {
            "type": "image",
            "data": base64.b64encode(b"\x89PNG").decode(),
            "mimeType": "image/png",
            "uri": "file:///i.png",
        },
        {
            "type": "resource_link",
            "uri": "file:///a.txt",
            "name": "a.txt",
            "mimeType": "text/plain",
            "title": "A",
            "description": "the a",
            "size": 12,
        },
        {"type": "resource", "resource": {"uri": "file:///b.txt", "mimeType": "text/plain", "text": "bee"}},
        {"type": "resource", "resource": {"uri": "file:///c.bin", "blob": "AAE="}},
    ]


async def test_second_prompt_on_busy_session_fails_fast_while_first_turn_completes(gate: Gate) -> None:
    session = await gate.create()
    first = asyncio.create_task(gate.prompt(session.session_id, "/sleep 2 still here"))
    await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)

    started = time.monotonic()
    error = await expect_error(
        gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="again"))
    )
    rejected_in = time.monotonic() - started

    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.reason, error.domain) == ("SESSION_BUSY", "sessiongate")
    assert error.retry_delay is not None and error.retry_delay > 0
    assert rejected_in < 1.0, f"busy rejection took {rejected_in:.3f}s"  # fail-fast, not after the 2 s turn
    events = await first
    assert reply_text(events) == "still here"
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN


async def test_wait_timeout_longer_than_the_running_turn_waits_and_succeeds(gate: Gate) -> None:
    session = await gate.create()
    first = asyncio.create_task(gate.prompt(session.session_id, "/sleep 1 one"))
    await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)

    second = await gate.prompt(session.session_id, "two", wait_timeout=seconds(10))

    assert reply_text(second) == "two"
    assert reply_text(await first) == "one"


async def test_wait_timeout_shorter_than_the_running_turn_fails_busy_after_the_wait(gate: Gate) -> None:
    session = await gate.create()
    first = asyncio.create_task(gate.prompt(session.session_id, "/sleep 3 one"))
    await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)

    started = time.monotonic()
    request = pb.PromptRequest(session_id=session.session_id, text="two", wait_timeout=seconds(0.5))
    error = await expect_error(gate.stub.Prompt(request))
    waited = time.monotonic() - started

    assert error.reason == "SESSION_BUSY"
    assert 0.45 <= waited < 2.5
    assert reply_text(await first) == "one"


async def test_stall_ends_deadline_exceeded_after_the_stall_timeout_and_the_session_recovers(
    gate: Gate,
) -> None:
    stalled = await gate.create()
    other = await gate.create()

    started = time.monotonic()
    stall = asyncio.create_task(
        expect_error(
            gate.stub.Prompt(
                pb.PromptRequest(session_id=stalled.session_id, text="/stall", stall_timeout=seconds(2))
            )
        )
    )
    await gate.wait_state(stalled.session_id, pb.SESSION_STATE_BUSY)
    # During the stall another session streams a whole turn normally.
    other_events = await gate.prompt(other.session_id, "unaffected by the stall", timeout=5)
    assert not stall.done()
    error = await stall
    elapsed = time.monotonic() - started

    assert reply_text(other_events) == "unaffected by the stall"
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "STREAM_STALLED"
    assert error.metadata["last_seq"] == "1"
    assert float(error.metadata["idle_s"]) >= 2.0
    assert 2.0 <= elapsed < 4.0, f"stall reported after {elapsed:.2f}s"
    # The agent honoured session/cancel: same session, same agent, usable again.
    await gate.wait_state(stalled.session_id, pb.SESSION_STATE_IDLE)
    assert any(f"cancel {stalled.agent_session_id}" in line for line in gate.events_log())
    assert reply_text(await gate.prompt(stalled.session_id, "after the stall")) == "after the stall"


async def test_hang_is_stalled_then_the_agent_group_is_killed_and_respawned(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(stall_timeout=2.0, cancel_grace=1.0)
    session = await gate.create()
    pids_before = gate.agent_pids()
    (old_pid,) = pids_before

    started = time.monotonic()
    error = await expect_error(
        gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/hang"))
    )
    elapsed = time.monotonic() - started
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "STREAM_STALLED")
    assert 2.0 <= elapsed < 4.0

    # During recovery a prompt is refused with RetryInfo, never left hanging.
    state = await gate.state(session.session_id)
    if state == pb.SESSION_STATE_RECOVERING:
        busy = await expect_error(gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="x")))
        assert busy.reason == "SESSION_BUSY" and busy.retry_delay is not None
    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)

    assert not await asyncio.to_thread(wait_gone, {old_pid}, 5), "the hung agent was not killed"
    new_pids = gate.agent_pids() - pids_before
    assert len(new_pids) == 1 and all(alive(p) for p in new_pids)
    # Respawned with session/load: the ACP session id is kept.
    resumed = await gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert resumed.agent_session_id == session.agent_session_id
    assert reply_text(await gate.prompt(session.session_id, "alive again")) == "alive again"


async def test_cancel_prompt_mid_stream_ends_the_stream_cancelled_within_a_second(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/stall"), timeout=30)
    assert (await first_event(gate, call)).HasField("message_chunk")

    started = time.monotonic()
    response = await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=5)
    rest = await read_rest(call)
    took = time.monotonic() - started

    assert response.cancelled
    assert rest[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    assert took < 1.0, f"cancel took {took:.3f}s"
    assert await call.code() == grpc.StatusCode.OK
    assert await gate.state(session.session_id) == pb.SESSION_STATE_IDLE
    idle = await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=5)
    assert not idle.cancelled


async def test_cancel_prompt_on_an_agent_that_ignores_cancel_ends_cancelled_after_the_grace(
    make_gate: GateFactory,
) -> None:
    gate: Gate = await make_gate(cancel_grace=1.0)
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/hang"), timeout=30)
    await first_event(gate, call)

    started = time.monotonic()
    assert (await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id))).cancelled
    rest = await read_rest(call)
    took = time.monotonic() - started

    assert rest[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    assert 0.9 <= took < 3.0
    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)
    assert reply_text(await gate.prompt(session.session_id, "works")) == "works"


async def test_client_deadline_mid_stream_sends_session_cancel_and_frees_the_session(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/stall"), timeout=1.5)
    error = await expect_error(call)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED

    waited = await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE, timeout=10)
    assert any(f"cancel {session.agent_session_id}" in line for line in gate.events_log())
    assert waited < 2.0  # the agent honoured the cancel: no kill grace was needed
    assert reply_text(await gate.prompt(session.session_id, "next")) == "next"


async def test_client_cancelling_the_call_cancels_the_turn_upstream(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/stall"), timeout=30)
    await first_event(gate, call)
    call.cancel()

    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE, timeout=10)
    assert any(f"cancel {session.agent_session_id}" in line for line in gate.events_log())


async def test_agent_crash_mid_turn_is_agent_exited_and_the_next_prompt_respawns(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/crash"), timeout=30)
    error = await expect_error(call)

    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_EXITED")
    assert error.metadata["exit_code"] == "3"
    assert "crashing on purpose" in error.metadata["stderr"]
    assert await gate.state(session.session_id) == pb.SESSION_STATE_SUSPENDED
    assert reply_text(await gate.prompt(session.session_id, "respawned")) == "respawned"


async def test_agent_json_rpc_error_is_internal_agent_error(gate: Gate) -> None:
    session = await gate.create()
    error = await expect_error(
        gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/error"))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.INTERNAL, "AGENT_ERROR")
    assert error.metadata["code"] == "-32603"
    assert "as asked" in error.metadata["message"]
    assert reply_text(await gate.prompt(session.session_id, "fine")) == "fine"


async def test_turn_longer_than_the_maximum_duration_is_turn_timeout(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(max_turn_duration=2.0, stall_timeout=30.0)
    session = await gate.create()
    started = time.monotonic()
    error = await expect_error(
        gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/sleep 10"))
    )
    elapsed = time.monotonic() - started
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "TURN_TIMEOUT")
    assert 2.0 <= elapsed < 4.0
    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)


async def test_permission_requests_follow_the_agent_policy(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(
        agents={
            "yes": ("policy", "approve-all"),
            "no": ("policy", "deny-all"),
            "reads": ("policy", "approve-reads"),
        }
    )
    expected = {
        "yes": ("allow", pb.PERMISSION_OUTCOME_ALLOWED),
        "no": ("reject", pb.PERMISSION_OUTCOME_REJECTED),
    }
    expected["reads"] = expected["no"]  # the request is for an edit, not a read
    for agent, (option, outcome) in expected.items():
        session = await gate.create(agent=agent)
        events = await gate.prompt(session.session_id, "/permission")
        (permission,) = [e.permission for e in events if e.HasField("permission")]
        assert permission.outcome == outcome, agent
        assert permission.selected_option_id == option
        assert permission.policy == gate.settings.agents[agent].permission_policy
        assert {o.kind for o in permission.options} == {"allow_once", "reject_once"}
        assert reply_text(events) == f"permission {option}"


async def test_flood_delivers_every_chunk_in_order(gate: Gate) -> None:
    session = await gate.create()
    events = await gate.prompt(session.session_id, "/flood 3000 32")
    # Complete and in order, however a client that fell behind had its chunks coalesced.
    assert reply_text(events) == "".join(flood_chunk(i, 32) for i in range(3000))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN


async def test_only_named_server_variables_reach_an_agent(
    make_gate: GateFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONGATE_AGENT_KEY", "for-this-agent")
    monkeypatch.setenv("SESSIONGATE_SERVER_SECRET", "do-not-leak")
    keyed = replace(echo_agent("keyed", tmp_path / "agent-state"), pass_env=("SESSIONGATE_AGENT_KEY",))
    gate: Gate = await make_gate(agents={"keyed": keyed})
    session = await gate.create(agent="keyed")
    events = await gate.prompt(session.session_id, "/env SESSIONGATE_AGENT_KEY SESSIONGATE_SERVER_SECRET")
    assert reply_text(events) == "SESSIONGATE_AGENT_KEY=for-this-agent SESSIONGATE_SERVER_SECRET unset"


async def test_agent_environment_is_clean(gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONGATE_SERVER_SECRET", "do-not-leak")
    session = await gate.create()
    events = await gate.prompt(
        session.session_id, "/env SESSIONGATE_SERVER_SECRET SESSIONGATE_TEST_MARKER HOME"
    )
    reply = reply_text(events)
    assert "SESSIONGATE_SERVER_SECRET unset" in reply
    assert "SESSIONGATE_TEST_MARKER=agent-env" in reply  # the agent's configured env is passed
    assert "HOME=" in reply


async def test_a_client_that_fell_behind_gets_buffered_text_chunks_coalesced_in_order(gate: Gate) -> None:
    flooded = 60_000
    session = await gate.create()
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text=f"/flood {flooded} 256"), timeout=60
    )
    first = await asyncio.wait_for(call.read(), 10)
    # Fall behind: read nothing until the transport's windows and what the turn log may run
    # ahead of the client (32 coalesced events, a quarter of max_turn_log_bytes) are full, and
    # the agent's chunks pile up in the gateway's buffer. (5 MB fitted in those on a loaded
    # machine, where each coalesced event carries more: 15 MB never does.)
    turn = gate.running.pool.get(session.session_id).turn
    assert turn is not None
    await eventually(lambda: turn.buffered() >= 100, 15, "chunks to pile up")
    events = [first]
    while (event := await asyncio.wait_for(call.read(), 15)) is not grpc.aio.EOF:
        events.append(event)
    chunks = [e for e in events if e.HasField("message_chunk")]
    assert len(chunks) < flooded, "nothing was coalesced"
    assert reply_text(events) == "".join(flood_chunk(i, 256) for i in range(flooded))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_paced_turns_stream_each_word_as_it_comes(gate: Gate) -> None:
    session = await gate.create()
    arrivals: list[float] = []
    events = []
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/pace 400 one two three four")
    )
    async for event in call:
        events.append(event)
        if event.HasField("message_chunk"):
            arrivals.append(time.monotonic())
    assert reply_text(events) == "one two three four"
    # One event per word, each sent on when the agent wrote it: neither held back nor merged.
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 0.9, f"the words arrived together: {arrivals}"
