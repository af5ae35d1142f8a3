"""Cancellation safety: a caller that goes away (deadline, cancel, shutdown, a client that
stops reading) never leaves a session, a slot, an agent process or a record half done.

Also the edges of the API that clients' retries and paging rely on: an idempotent
CloseSession, SHUTTING_DOWN after shutdown, keyset page tokens, an agent answer the SDK
cannot parse, and session records that expire.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sessiongate.server.agents.connection import AgentConnection
from sessiongate.server.settings import ServerLimits
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import (
    Gate,
    GateFactory,
    StateBackend,
    alive,
    details_of,
    echo_agent,
    eventually,
    expect_error,
    kinds,
    reply_text,
    wait_gone,
)

STUBBORN = ("--ignore-sigterm",)  # stopping it takes the gateway's SIGKILL after kill_grace


async def create_when_a_slot_frees(gate: Gate, timeout: float = 10, **kwargs: Any) -> pb.Session:
    """CreateSession, retried while the pool is exhausted; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Each attempt may start an agent: on a busy machine that takes seconds, not a refusal.
            request = pb.CreateSessionRequest(**kwargs)
            session: pb.Session = await gate.stub.CreateSession(request, timeout=30)
            return session
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            if time.monotonic() > deadline:
                raise AssertionError(f"no slot was freed within {timeout:g}s: {error.details()}") from error
            await asyncio.sleep(0.2)


async def listed_ids(gate: Gate) -> list[str]:
    response = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=5)
    return [s.session_id for s in response.sessions]


async def wait_for_state(gate: Gate, session_id: str, state: int, timeout: float) -> None:
    """Poll GetSession until `state`; the failure names every state seen on the way."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (current := await gate.state(session_id)) != state:
        name = pb.SessionState.Name(current)
        if not seen or seen[-1] != name:
            seen.append(name)
        if time.monotonic() > deadline:
            wanted = pb.SessionState.Name(state)
            raise AssertionError(f"not {wanted} within {timeout:g}s; states seen: {' -> '.join(seen)}")
        await asyncio.sleep(0.05)


def stuck_on_its_client(gate: Gate, session_id: str) -> bool:
    """The turn's buffer is full (the agent's output is no longer read) and has not drained
    for a second: the handler is blocked writing to a client that stopped reading."""
    turn = gate.running.pool.get(session_id).turn
    return (
        turn is not None
        and turn.agent is not None
        and turn.agent.reading_paused
        and turn.since_last_event() > 1.0
    )


# ---- callers that go away ----------------------------------------------------------------


async def test_close_session_whose_deadline_passes_midway_still_ends_agent_frees_slot_and_record(
    make_gate: GateFactory, state: StateBackend
) -> None:
    gate: Gate = await make_gate(
        **state.gate_kwargs(), agents={"stubborn": STUBBORN}, kill_grace=2.0, max_sessions=1
    )
    session = await gate.create(agent="stubborn")
    (pid,) = gate.agent_pids()

    error = await expect_error(
        gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=0.3)
    )

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not await asyncio.to_thread(wait_gone, {pid}, 8), "the closed session's agent was left running"
    gone = await expect_error(gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id)))
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    await create_when_a_slot_frees(gate, timeout=10)  # the closed session's slot was given back
    await gate.running.drain(0)
    restarted: Gate = await make_gate(**state.gate_kwargs())
    assert session.session_id not in await listed_ids(restarted), "the closed session came back"


async def test_create_cancelled_while_suspending_the_victim_neither_orphans_its_agent_nor_the_slot(
    make_gate: GateFactory,
) -> None:
    gate: Gate = await make_gate(agents={"stubborn": STUBBORN}, kill_grace=2.0, max_sessions=1)
    victim = await gate.create(agent="stubborn")
    (victim_pid,) = gate.agent_pids()

    # The only slot is the victim's: this create must suspend it, which takes kill_grace.
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(), timeout=0.5))

    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not await asyncio.to_thread(wait_gone, {victim_pid}, 8), "the victim's agent was orphaned"
    created = await create_when_a_slot_frees(gate, timeout=10)
    assert created.state == pb.SESSION_STATE_IDLE
    assert await gate.state(victim.session_id) == pb.SESSION_STATE_SUSPENDED


async def test_single_flight_create_survives_its_first_caller_giving_up(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"slowinit": ("--init-delay", "2")})
    request = pb.CreateSessionRequest(agent="slowinit", request_id="dup")

    first = asyncio.create_task(expect_error(gate.stub.CreateSession(request, timeout=1)))
    await eventually(lambda: len(gate.agent_pids()) == 1, 15, "the slowinit agent's start")
    second: pb.Session = await gate.stub.CreateSession(request, timeout=15)  # the start takes ~2 s

    assert (await first).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert second.state == pb.SESSION_STATE_IDLE
    assert len(gate.agent_pids()) == 1, "the request id started more than one agent"
    retried = await gate.stub.CreateSession(request, timeout=30)
    assert retried.session_id == second.session_id
    assert len(gate.agent_pids()) == 1


async def test_pending_creates_are_answered_shutting_down_when_the_pool_shuts_down(
    make_gate: GateFactory,
) -> None:
    gate: Gate = await make_gate(agents={"slow": ("--init-delay", "3600")}, agent_start_timeout=30.0)
    request = pb.CreateSessionRequest(agent="slow", request_id="pending")
    calls = [gate.stub.CreateSession(request, timeout=60) for _ in range(2)]
    waits = [asyncio.create_task(expect_error(call)) for call in calls]
    await eventually(lambda: len(gate.agent_pids()) == 1, 15, "the slow agent's start")

    await gate.running.pool.shutdown()
    done, pending = await asyncio.wait(waits, timeout=5)

    for call in calls:  # today they would wait out the start timeout: end them either way
        call.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    assert not pending, f"{len(pending)} of 2 pending creates were still waiting 5 s after shutdown"
    for wait in done:
        error = wait.result()
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"), error


async def test_cancel_prompt_frees_a_session_whose_client_stopped_reading(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/flood 100000 4096"), timeout=60
    )
    await asyncio.wait_for(call.read(), 10)  # then never read again: flow control stops the handler
    # gRPC's flow-control windows take a few MB first: in 4 KiB events, hundreds of them, not the
    # tens of thousands of 64-byte ones that a flooding agent, idle beside a busy machine's other
    # work, once did not write within the 30 s.
    await eventually(
        lambda: stuck_on_its_client(gate, session.session_id), 30, "a handler stuck on its client"
    )

    response = await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=10)

    assert response.cancelled
    try:
        await wait_for_state(gate, session.session_id, pb.SESSION_STATE_IDLE, timeout=6)
        assert reply_text(await gate.prompt(session.session_id, "free again")) == "free again"
    finally:
        call.cancel()


async def test_turn_deadline_holds_for_a_client_that_stopped_reading(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(
        max_turn_duration=3.0, zombie_grace=600.0, stall_timeout=60.0, cancel_grace=1.0
    )
    session = await gate.create()
    (old_pid,) = gate.agent_pids()
    # 12 MB the client never reads: the handler blocks in its write, the agent hangs after.
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/hang 3000 4096"), timeout=60
    )
    try:
        await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
        await wait_for_state(gate, session.session_id, pb.SESSION_STATE_IDLE, timeout=15)
        assert not await asyncio.to_thread(wait_gone, {old_pid}, 5), "the hung agent was not killed"
        assert [p for p in gate.agent_pids() - {old_pid} if alive(p)], "the agent was not respawned"
    finally:
        call.cancel()


# ---- answers clients rely on -------------------------------------------------------------


async def test_a_turn_result_the_sdk_cannot_parse_is_internal_agent_protocol_error(gate: Gate) -> None:
    session = await gate.create()

    error = await expect_error(
        gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/badresult"))
    )

    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.INTERNAL,
        "AGENT_PROTOCOL_ERROR",
        "sessiongate",
    ), error
    assert error.metadata.get("method") == "session/prompt"
    assert len(error.message) < 1000
    assert reply_text(await gate.prompt(session.session_id, "still fine")) == "still fine"


async def test_close_session_is_idempotent_so_a_retried_close_is_safe(gate: Gate) -> None:
    session = await gate.create()
    request = pb.CloseSessionRequest(session_id=session.session_id)
    first = await gate.stub.CloseSession(request, timeout=15)

    again = await gate.stub.CloseSession(request, timeout=15)

    assert first.session.state == again.session.state == pb.SESSION_STATE_CLOSED
    assert again.session.session_id == session.session_id


async def test_close_after_the_pool_shut_down_is_shutting_down_not_internal(gate: Gate) -> None:
    session = await gate.create()
    await gate.running.pool.shutdown()

    error = await expect_error(
        gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=15)
    )

    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"), error


async def test_list_pages_continue_after_the_last_listed_session_when_earlier_ones_close(gate: Gate) -> None:
    created = [await gate.create() for _ in range(4)]
    page1 = await gate.stub.ListSessions(pb.ListSessionsRequest(page_size=2), timeout=5)
    assert [s.session_id for s in page1.sessions] == [s.session_id for s in created[:2]]

    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=created[0].session_id), timeout=15)
    page2 = await gate.stub.ListSessions(
        pb.ListSessionsRequest(page_size=2, page_token=page1.next_page_token), timeout=5
    )

    assert [s.session_id for s in page2.sessions] == [s.session_id for s in created[2:]]


async def test_a_resume_whose_session_load_fails_falls_back_to_a_new_session_with_a_notice(
    make_gate: GateFactory,
) -> None:
    gate: Gate = await make_gate(max_sessions=1)
    session = await gate.create()
    await gate.prompt(session.session_id, "remember this")
    await gate.create()  # takes the only slot: the first session is suspended
    assert await gate.state(session.session_id) == pb.SESSION_STATE_SUSPENDED
    stored: Path = gate.state_dir / "sessions" / f"{session.agent_session_id}.json"
    stored.unlink()  # the agent no longer knows the session: its session/load fails

    events = await gate.prompt(session.session_id, "/history")

    assert kinds(events)[0] == "notice"
    assert events[0].notice.kind == "context_reset"
    assert reply_text(events) == "0 earlier turns: "
    resumed = await gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), timeout=5)
    assert resumed.agent_session_id and resumed.agent_session_id != session.agent_session_id


async def test_suspended_sessions_past_the_retention_are_deleted_for_good(
    make_gate: GateFactory, state: StateBackend
) -> None:
    limits = {"idle_ttl": 0.5, "session_retention": 2.0, "sweep_interval": 0.2}
    gate: Gate = await make_gate(**state.gate_kwargs(), **limits)
    session = await gate.create()

    async def gone() -> bool:
        try:
            await gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), timeout=5)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            return True
        return False

    deadline = time.monotonic() + 8
    while not await gone():
        assert time.monotonic() < deadline, "the session outlived idle_ttl + session_retention by 5 s"
        await asyncio.sleep(0.2)
    await gate.running.drain(0)
    restarted: Gate = await make_gate(**state.gate_kwargs())
    assert session.session_id not in await listed_ids(restarted), "the expired record came back"


# ---- process groups ------------------------------------------------------------------------


async def test_an_agents_group_is_never_signalled_after_its_leader_was_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's id is its leader's PID; once the leader is reaped the PID may belong to someone
    else (PID space here can be 32768), so a late terminate() must not signal that group."""
    signalled: list[tuple[int, int]] = []
    real_killpg = os.killpg

    def recording_killpg(pgid: int, signum: int) -> None:
        signalled.append((pgid, signum))
        real_killpg(pgid, signum)

    limits = ServerLimits()
    agents = [
        AgentConnection(echo_agent("echo", tmp_path / "state"), request_timeout=5, kill_grace=1)
        for _ in range(2)
    ]
    try:
        for agent in agents:
            await agent.start(limits.agent_start_timeout)
        dead, live = agents
        assert dead.pid is not None and live.pid is not None
        os.kill(dead.pid, signal.SIGKILL)  # it dies by itself, long before anyone stops it
        await eventually(lambda: not dead.alive, 10, "the agent's exit to be noticed")
        monkeypatch.setattr(os, "killpg", recording_killpg)

        await dead.terminate()
        assert not [s for s in signalled if s[0] == dead.pid], signalled

        await live.terminate()  # a group whose leader is ours is still ended
        assert (live.pid, signal.SIGTERM) in signalled
    finally:
        for agent in agents:
            await agent.terminate(force=True)


async def test_a_wall_clock_stepped_back_does_not_postpone_a_stall(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stall clock is monotonic: NTP stepping the wall clock back two hours mid-turn must
    not turn a 1 s stall timeout into a two-hour hang."""
    session = await gate.create()
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/stall", stall_timeout=Duration(seconds=1)),
        timeout=30,
    )
    await asyncio.wait_for(call.read(), 10)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 7200)

    with pytest.raises(grpc.aio.AioRpcError) as stalled:
        await asyncio.wait_for(call.read(), 5)

    assert details_of(stalled.value).reason == "STREAM_STALLED"


# ---- a stop racing another call's agent start --------------------------------------------


@pytest.mark.parametrize("stop", ["close", "kill", "fence"])
async def test_a_stop_racing_an_agent_start_ends_the_agent_spawned_after_it_and_frees_the_slot(
    make_gate: GateFactory, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """SetSessionMode resumes a suspended session; a close, kill or fence lands before its agent's
    process exists (the window widened by a hook before the spawn). The stop must end whatever
    the start spawns next, and the slot must come back exactly once."""
    gate: Gate = await make_gate()
    session = await gate.create()
    live = gate.running.pool.get(session.session_id)
    assert await live.suspend()
    await asyncio.to_thread(wait_gone, gate.agent_pids(), 10)
    reached, release = asyncio.Event(), asyncio.Event()
    real_spawn = AgentConnection._spawn
    held: list[AgentConnection] = []

    async def spawn_after_a_pause(self: AgentConnection) -> None:
        if not held:  # only the resuming start: a close's own clean-up agent spawns at once
            held.append(self)
            reached.set()
            await asyncio.wait_for(release.wait(), 30)
        await real_spawn(self)

    monkeypatch.setattr(AgentConnection, "_spawn", spawn_after_a_pause)
    set_mode = asyncio.create_task(
        expect_error(
            gate.stub.SetSessionMode(
                pb.SetSessionModeRequest(session_id=session.session_id, mode_id="ask"), timeout=30
            )
        )
    )
    await asyncio.wait_for(reached.wait(), 10)

    if stop == "close":
        await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=15)
    elif stop == "kill":
        await asyncio.wait_for(live.kill(), 15)
    else:
        await asyncio.wait_for(live.fence(), 15)
    release.set()
    error = await asyncio.wait_for(set_mode, 20)

    assert error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), error
    assert error.reason != "AGENT_UNAVAILABLE", error  # the stop's reason, not the stopped start's
    left = await asyncio.to_thread(wait_gone, gate.agent_pids(), 10)
    assert not left, f"agent processes outlived the {stop}: {sorted(left)}"
    assert gate.running.pool._slots.used == 0
    assert not live.holder.has_slot and live.holder.agent is None


# ---- a resume that hangs or kills the agent --------------------------------------------------


@pytest.mark.parametrize("failure", ["hang", "exit"])
async def test_a_resume_that_hangs_or_kills_the_agent_falls_back_to_a_new_session_within_the_start(
    make_gate: GateFactory, failure: str
) -> None:
    """session/resume and /load get a share of the start timeout: one that never answers, or
    ends the agent, leaves the rest to a fresh agent and a new session (a context_reset notice),
    not AGENT_UNAVAILABLE on every prompt."""
    start_timeout = 9.0
    gate: Gate = await make_gate(
        agents={"flaky": ("--load-fails", failure)},
        agent_start_timeout=start_timeout,
        agent_request_timeout=60.0,
    )
    session = await gate.create(agent="flaky")
    await gate.prompt(session.session_id, "remember this")
    assert await gate.running.pool.get(session.session_id).suspend()
    old = gate.agent_pids()

    started = time.monotonic()
    events = await gate.prompt(session.session_id, "/history")
    took = time.monotonic() - started

    assert kinds(events)[0] == "notice" and events[0].notice.kind == "context_reset", kinds(events)
    assert reply_text(events) == "0 earlier turns: "
    assert took < start_timeout, f"the fallback took {took:.1f}s, past the start timeout"
    assert not await asyncio.to_thread(wait_gone, old, 5), "the agent that failed the resume runs on"
    assert len([p for p in gate.agent_pids() if alive(p)]) == 1
    assert reply_text(await gate.prompt(session.session_id, "works")) == "works"
    resumed = await gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), timeout=5)
    assert resumed.agent_session_id != session.agent_session_id
