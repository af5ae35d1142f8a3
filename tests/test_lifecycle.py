"""Sessions that survive faults: slots and eviction, idle TTL, zombies, suspend and resume."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
from google.protobuf.duration_pb2 import Duration
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error, kinds, reply_text, wait_gone


async def test_a_full_pool_suspends_the_least_recently_used_idle_session(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(max_sessions=2)
    older = await gate.create()
    newer = await gate.create()
    await gate.prompt(older.session_id, "touch")  # older is now the most recently used
    pids = gate.agent_pids()

    third = await gate.create()

    assert third.state == pb.SESSION_STATE_IDLE
    assert await gate.state(newer.session_id) == pb.SESSION_STATE_SUSPENDED
    assert await gate.state(older.session_id) == pb.SESSION_STATE_IDLE
    assert len(await asyncio.to_thread(wait_gone, pids, 5)) == 1, "exactly the LRU session's agent ends"
    # The suspended one resumes on its next prompt, suspending the now least recently used.
    assert reply_text(await gate.prompt(newer.session_id, "back")) == "back"
    assert await gate.state(older.session_id) == pb.SESSION_STATE_SUSPENDED
    assert await gate.state(third.session_id) == pb.SESSION_STATE_IDLE


async def test_with_every_slot_busy_a_create_fails_pool_exhausted_at_once(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(max_sessions=2)
    calls = []
    for _ in range(2):
        session = await gate.create()
        call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/stall"), timeout=30)
        await asyncio.wait_for(call.read(), 10)
        calls.append(call)
    started = time.monotonic()
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest()))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED")
    assert error.retry_delay is not None and error.retry_delay > 0
    assert time.monotonic() - started < 1.0
    for call in calls:
        call.cancel()


async def test_an_idle_session_is_suspended_after_the_ttl_and_resumes(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(idle_ttl=1.5, sweep_interval=0.2)
    session = await gate.create()
    pids = gate.agent_pids()
    await gate.wait_state(session.session_id, pb.SESSION_STATE_SUSPENDED, timeout=10)
    idle_for = time.time() - session.last_active_time.ToNanoseconds() / 1e9
    assert idle_for >= 1.5, f"suspended after {idle_for:.2f}s idle, before the 1.5 s TTL"
    assert not await asyncio.to_thread(wait_gone, pids, 5)
    assert reply_text(await gate.prompt(session.session_id, "awake")) == "awake"
    assert await gate.state(session.session_id) == pb.SESSION_STATE_IDLE


async def test_a_pool_full_of_turns_whose_clients_stopped_reading_recovers_at_the_turn_limit(
    make_gate: GateFactory,
) -> None:
    """Two /hang turns whose clients stopped reading: their handlers block on flow control and
    their agents are held back by backpressure. Each turn's runner still ends it at the turn
    limit, kills the agent that ignores cancel and respawns it; the reaper (its grace is ten
    minutes here) has nothing to do with it."""
    gate: Gate = await make_gate(
        max_sessions=2, max_turn_duration=3.0, zombie_grace=600.0, stall_timeout=60.0, cancel_grace=1.0
    )
    stuck = [await gate.create() for _ in range(2)]
    stuck_pids = gate.agent_pids()
    calls = []
    for session in stuck:
        # 12 MB the client never reads: the handler blocks in its write, the agent hangs after.
        request = pb.PromptRequest(session_id=session.session_id, text="/hang 3000 4096")
        calls.append(gate.stub.Prompt(request, timeout=60))
    for session in stuck:
        await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
    started = time.monotonic()
    refused = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest()))
    assert refused.reason == "POOL_EXHAUSTED"

    created = None
    while created is None and time.monotonic() - started < 20:
        try:
            created = await gate.create()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.25)
    recovered_in = time.monotonic() - started

    assert created is not None, "the pool never recovered"
    # Turn limit + cancel grace + a kill, then fresh agent starts (slow on a loaded 2-core machine).
    assert recovered_in < 3.0 + 1.0 + 8.0, f"recovery took {recovered_in:.1f}s"
    assert not await asyncio.to_thread(wait_gone, stuck_pids, 5), "the hung agents were not killed"
    print(f"pool of stuck turns recovered in {recovered_in:.2f}s (turn limit 3 s + cancel grace 1 s)")
    for call in calls:
        call.cancel()
    for session in stuck:  # each was respawned (one since evicted for the new session): usable
        assert reply_text(await gate.prompt(session.session_id, "alive", timeout=30)) == "alive"


async def test_resume_with_session_load_keeps_the_agent_side_history(make_gate: GateFactory) -> None:
    # An agent without session/resume (the built-in one prefers it: test_session_state.py).
    gate: Gate = await make_gate(agents={"loader": ("--no-resume-session",)}, max_sessions=1)
    session = await gate.create(agent="loader")
    await gate.prompt(session.session_id, "remember this")
    await gate.create()  # takes the only slot: the first session is suspended
    assert await gate.state(session.session_id) == pb.SESSION_STATE_SUSPENDED

    started = time.monotonic()
    events = await gate.prompt(session.session_id, "/history")
    resumed_in = time.monotonic() - started

    assert "notice" not in kinds(events)
    assert reply_text(events) == "1 earlier turns: remember this"
    # Replayed history (session/load) is not re-sent to the client: only this turn's events.
    assert kinds(events) == ["message_chunk", "result"]
    print(f"resume with session/load took {resumed_in:.2f}s")


async def test_resume_without_load_session_starts_with_a_context_reset_notice(make_gate: GateFactory) -> None:
    forgetful = ("--no-load-session", "--no-resume-session")  # neither resumes nor loads
    gate: Gate = await make_gate(agents={"forgetful": forgetful}, max_sessions=1)
    session = await gate.create(agent="forgetful")
    await gate.prompt(session.session_id, "remember this")
    await gate.create()  # suspends the forgetful session

    events = await gate.prompt(session.session_id, "/history")

    assert kinds(events)[0] == "notice"
    assert events[0].notice.kind == "context_reset"
    assert events[0].seq == 1 and events[1].seq == 2
    assert reply_text(events) == "0 earlier turns: "
    resumed = await gate.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    assert resumed.agent_session_id != session.agent_session_id
    # The notice comes once, not on every later turn.
    assert "notice" not in kinds(await gate.prompt(session.session_id, "again"))


async def test_two_prompts_racing_to_resume_start_one_agent(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(max_sessions=1)
    session = await gate.create()
    await gate.create()  # suspends the first session
    before = gate.agent_pids()

    results = await asyncio.gather(
        gate.prompt(session.session_id, "/sleep 0.5 one"),
        gate.prompt(session.session_id, "/sleep 0.5 two"),
        return_exceptions=True,
    )

    ok = [r for r in results if isinstance(r, list)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 1, results
    assert failed[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(gate.agent_pids() - before) == 1, "two agents were started for one session"


async def test_an_idle_agent_killed_from_outside_is_noticed_and_the_next_prompt_works(gate: Gate) -> None:
    session = await gate.create()
    (pid,) = gate.agent_pids()
    os.kill(pid, signal.SIGKILL)

    await gate.wait_state(session.session_id, pb.SESSION_STATE_SUSPENDED, timeout=10)
    assert reply_text(await gate.prompt(session.session_id, "revived")) == "revived"
    assert await gate.state(session.session_id) == pb.SESSION_STATE_IDLE


async def test_get_and_list_report_turn_timing_and_filter_by_label(gate: Gate) -> None:
    busy = await gate.create(labels={"team": "a", "tier": "1"})
    await gate.create(labels={"team": "b"})
    call = gate.stub.Prompt(pb.PromptRequest(session_id=busy.session_id, text="/stall"), timeout=30)
    await asyncio.wait_for(call.read(), 10)
    await asyncio.sleep(1.0)

    got = await gate.stub.GetSession(pb.GetSessionRequest(session_id=busy.session_id))
    assert got.state == pb.SESSION_STATE_BUSY
    assert got.turn_elapsed.ToTimedelta().total_seconds() >= 1.0
    assert got.since_last_event.ToTimedelta().total_seconds() >= 0.9
    assert got.last_active_time.seconds > 0

    only_a = await gate.stub.ListSessions(pb.ListSessionsRequest(labels={"team": "a"}))
    assert [s.session_id for s in only_a.sessions] == [busy.session_id]
    none = await gate.stub.ListSessions(pb.ListSessionsRequest(labels={"team": "a", "tier": "2"}))
    assert not none.sessions
    call.cancel()


async def test_closing_a_session_deletes_what_the_built_in_agent_stored_live_or_suspended(
    make_gate: GateFactory,
) -> None:
    # A prompt that meets the sweeper suspending its session waits for it (wait_timeout) rather
    # than failing SESSION_BUSY; the idle TTL leaves seconds between the steps below.
    gate: Gate = await make_gate(idle_ttl=3, sweep_interval=0.2)
    stored = gate.state_dir / "sessions"
    live, suspended, kept = [await gate.create() for _ in range(3)]
    for session in (live, suspended, kept):
        await gate.prompt(session.session_id, "remember me", wait_timeout=Duration(seconds=10))
    assert len(list(stored.iterdir())) == 3

    await gate.wait_state(suspended.session_id, pb.SESSION_STATE_SUSPENDED, timeout=10)
    await gate.prompt(
        live.session_id, "still here", wait_timeout=Duration(seconds=10)
    )  # keeps its agent running
    pids = gate.agent_pids()
    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=live.session_id), timeout=30)
    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=suspended.session_id), timeout=30)

    # The running agent was asked to close its session; the suspended one's agent was started
    # just for that, and is gone again. Only the untouched session's record is left.
    assert len(list(stored.iterdir())) == 1
    cleanup = gate.agent_pids() - pids
    assert len(cleanup) == 1, "one agent was started to close the suspended session"
    assert await asyncio.to_thread(wait_gone, cleanup, 10) == set()
    assert reply_text(
        await gate.prompt(kept.session_id, "/history", wait_timeout=Duration(seconds=10))
    ).startswith("1 earlier turns")
