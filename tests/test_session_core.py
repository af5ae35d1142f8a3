"""The session core (pool, session, lock, holder, runner, turn, slots) against fake agents.

Each test pins down a way a cancellation or an unlucky interleaving used to leave a session
waiting, unusable, or leaking an agent, a slot or a record. Fake agents (tests/fakes.py) make
every window reachable on purpose; the end-to-end versions live in test_cancellation_safety.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sessiongate.server.errors import (
    OwnerLost,
    SessionBusy,
    SessionNotFound,
    ShuttingDown,
    StreamStalled,
    TurnTimeout,
)
from sessiongate.server.sessions import pool as pool_module
from sessiongate.server.sessions.lock import SessionLock
from sessiongate.server.sessions.pool import SessionPool
from sessiongate.server.sessions.session import Session, State
from sessiongate.server.settings import ServerLimits
from sessiongate.server.state.base import SessionRecord
from sessiongate.server.state.sqlite import SessionStore
from sessiongate.server.turns.runner import TurnRunner
from sessiongate.server.turns.turn import Notice, Turn, TurnEnd

from tests.conftest import eventually
from tests.fakes import FAKE, FAST, FakeAgents, fake_pool, text

PoolFactory = Callable[..., Awaitable[SessionPool]]
T = TypeVar("T")


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[PoolFactory]:
    made: list[SessionPool] = []

    async def make(
        agents: FakeAgents, limits: ServerLimits = FAST, store: SessionStore | None = None
    ) -> SessionPool:
        pool = await fake_pool(tmp_path, agents, limits, store)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.shutdown()


async def drain(turn: Turn) -> list[Any]:
    """Every item of a turn, up to and including its TurnEnd (a failed turn raises)."""
    items = []
    while not isinstance(item := await asyncio.wait_for(turn.next(), 10), TurnEnd):
        items.append(item)
    return [*items, item]


async def new_session(pool: SessionPool, request_id: str = "") -> Session:
    return await pool.create(FAKE, "/", request_id, {})


async def a_turn_and_a_waiter(session: Session, second: str = "wait") -> tuple[Turn, asyncio.Task[Turn]]:
    """A running "wait" turn, and a second prompt queued behind it (wait_timeout 30 s)."""
    first = await session.begin_turn(text("wait"), 5, 0)
    waiting = asyncio.create_task(session.begin_turn(text(second), 5, 30))
    await eventually(lambda: session.lock.waiting == 1, what="the second prompt to queue")
    return first, waiting


async def finish_and_probe_the_hand_off(
    session: Session, agents: FakeAgents, first: Turn, probe: Callable[[], T], monkeypatch: pytest.MonkeyPatch
) -> T:
    """End the running turn; `probe()` runs the instant it lets the session go, before the
    waiter it was handed to runs again. Returns what the probe returned."""
    seen: list[T] = []
    release = session.lock.release

    def releasing() -> None:
        release()
        if not seen:
            seen.append(probe())

    monkeypatch.setattr(session.lock, "release", releasing)
    agents.last.finish_turn()
    assert (await drain(first))[-1].stop_reason == "end_turn"
    return seen[0]


def stored_ids(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT session_id FROM sessions")}


# ---- 1. "busy" never waits -------------------------------------------------------------------


async def test_the_lock_passes_straight_to_a_waiter_so_busy_has_no_window() -> None:
    lock = SessionLock()
    assert lock.try_take("a")
    waiter = asyncio.create_task(lock.take("b", 30))
    await eventually(lambda: lock.waiting == 1, what="b to queue")
    lock.release()
    # Before b has even run again, the session is b's: a fail-fast caller sees it busy.
    assert lock.busy and lock.role == "b"
    assert not await lock.take("c", 0)
    assert await waiter


async def test_a_waiter_that_gives_up_never_keeps_the_lock() -> None:
    lock = SessionLock()
    lock.try_take("a")
    timed_out = await lock.take("b", 0.05)
    cancelled = asyncio.create_task(lock.take("c", 30))
    await eventually(lambda: lock.waiting == 1, what="c to queue")
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    lock.release()
    assert not timed_out and not lock.busy and lock.waiting == 0


async def test_during_a_hand_off_a_fail_fast_prompt_is_busy_and_the_session_is_not_evictable(
    pools: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    first, waiting = await a_turn_and_a_waiter(session)

    def probe() -> dict[str, Any]:
        return {
            "busy": session.lock.busy,
            "evictable": session.evictable(),
            "fail_fast": asyncio.ensure_future(session.begin_turn(text("echo c"), 5, 0)),
        }

    at_hand_off = await finish_and_probe_the_hand_off(session, agents, first, probe, monkeypatch)

    assert at_hand_off["busy"] and not at_hand_off["evictable"]
    with pytest.raises(SessionBusy):
        await asyncio.wait_for(at_hand_off["fail_fast"], 2)  # not after the second turn
    assert not await session.suspend()  # and eviction does not wait on it either
    second = await waiting
    agents.last.finish_turn()
    await drain(second)


# ---- 2, 3. cancelled close and cancelled stops leave nothing behind ---------------------------


async def test_a_close_whose_caller_is_cancelled_still_frees_the_agent_the_slot_and_the_row(
    pools: PoolFactory, tmp_path: Path
) -> None:
    agents = FakeAgents()
    agents.behaviour.terminate_delay = 1.0  # the agent takes a second to die
    pool = await pools(agents)
    session = await new_session(pool)
    close = asyncio.create_task(pool.close(session.session_id))
    await asyncio.sleep(0.2)
    close.cancel()  # the client's deadline passed mid-way
    await asyncio.gather(close, return_exceptions=True)

    await asyncio.wait_for(agents.last.terminated.wait(), 5)
    await eventually(lambda: pool._slots.used == 0, what="the slot to be freed")
    with pytest.raises(SessionNotFound):
        pool.get(session.session_id)
    assert session.session_id not in stored_ids(tmp_path / "sessions.db")
    assert (await pool.close(session.session_id)).state is State.CLOSED  # idempotent


async def test_a_create_cancelled_while_suspending_its_victim_does_not_orphan_the_victims_agent(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    pool = await pools(agents, replace(FAST, max_sessions=1))
    victim = await new_session(pool)
    victim_agent = agents.last
    agents.behaviour.terminate_delay = 1.0
    create = asyncio.create_task(new_session(pool))
    await eventually(lambda: victim_agent.terminate_calls == 1, what="the victim's stop to begin")
    create.cancel()
    await asyncio.gather(create, return_exceptions=True)

    await asyncio.wait_for(victim_agent.terminated.wait(), 5)
    await eventually(lambda: pool._slots.used == 0, what="the victim's slot to be freed")
    assert victim.state is State.SUSPENDED
    agents.behaviour.terminate_delay = 0.0
    assert (await new_session(pool)).state is State.IDLE
    assert len(agents.running()) == 1


async def test_an_agent_that_exits_by_itself_while_its_session_closes_gives_its_slot_back(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    agents.behaviour.terminate_delay = 1.0
    pool = await pools(agents)
    session = await new_session(pool)
    close = asyncio.create_task(pool.close(session.session_id))
    await eventually(lambda: agents.last.terminate_calls == 1, what="the close to stop the agent")
    agents.last.crash()
    await close
    assert pool._slots.used == 0


# ---- 4. a refused load falls back to a new ACP session ---------------------------------------


async def test_a_refused_session_load_opens_a_new_session_and_says_the_context_was_reset(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    first_acp_id = session.agent_session_id
    assert await session.suspend()
    agents.behaviour.refuse_load = True

    items = await drain(await session.begin_turn(text("echo back"), 5, 0))

    assert isinstance(items[0], Notice) and items[0].kind == "context_reset"
    assert items[-1].stop_reason == "end_turn"
    assert session.agent_session_id not in ("", first_acp_id)
    assert session.state is State.IDLE
    later = await drain(await session.begin_turn(text("echo again"), 5, 0))
    assert not any(isinstance(item, Notice) for item in later)  # said once


async def test_a_turn_is_underway_once_its_prompt_is_with_the_agent_or_its_agent_must_start(
    pools: PoolFactory,
) -> None:
    """Prompt's response headers wait for this: the prompt first, so that the agent works while
    they go out; but never for an agent to start."""
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    turn = await session.begin_turn(text("wait"), 5, 0)
    await turn.wait_underway(30)
    assert agents.last.prompts == ["wait"]  # written before the waiter ran again
    agents.last.finish_turn()
    await drain(turn)
    await eventually(lambda: session.state is State.IDLE, what="the first turn to end")

    assert await session.suspend()
    agents.behaviour.start_delay = 2.0  # within FAST's agent_start_timeout
    resumed = await session.begin_turn(text("echo later"), 30, 0)
    await resumed.wait_underway(30)
    assert [a.prompts for a in agents.made] == [["wait"]]  # its agent still starts: not waited for
    assert (await drain(resumed))[-1].stop_reason == "end_turn"


async def test_a_running_agent_has_the_prompt_when_the_turn_is_begun(pools: PoolFactory) -> None:
    """The prompt leaves in the caller's own step (eager.py), before any task switch: the agent
    works on it while the caller sends its headers. A turn that ends before its task ran
    cancels the prompt it sent, and the session is free again."""
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    turn = await session.begin_turn(text("wait"), 5, 0)
    assert agents.last.prompts == ["wait"]  # nothing awaited since begin_turn returned
    agents.last.finish_turn()
    assert (await drain(turn))[-1].stop_reason == "end_turn"
    await eventually(lambda: session.state is State.IDLE, what="the first turn to end")

    cut = await session.begin_turn(text("wait"), 5, 0)
    runner = session.runner
    assert runner is not None and runner.task is not None
    runner.task.cancel()  # before its first step: run() never starts
    with pytest.raises(ShuttingDown):
        await drain(cut)
    await eventually(lambda: session.state is State.IDLE, what="the session to be free again")
    assert agents.last.prompts == ["wait", "wait"]
    assert agents.last.cancels == [] and agents.last.prompt_cancelled  # cancelled here, in-process


# ---- 5. single-flight creates run in their own task ------------------------------------------


async def test_a_duplicate_create_gets_the_session_when_the_first_caller_goes_away(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    agents.behaviour.start_delay = 0.5
    pool = await pools(agents)
    first = asyncio.create_task(new_session(pool, "dup"))
    await eventually(lambda: len(agents.made) == 1, what="the start to begin")
    second = asyncio.create_task(new_session(pool, "dup"))
    await asyncio.sleep(0.05)
    first.cancel()

    session = await asyncio.wait_for(second, 5)
    assert session.state is State.IDLE and len(agents.made) == 1
    assert (await new_session(pool, "dup")) is session


async def test_creates_under_way_at_shutdown_all_end_shutting_down(pools: PoolFactory) -> None:
    agents = FakeAgents()
    agents.behaviour.start_delay = 3600
    pool = await pools(agents)
    callers = [asyncio.create_task(new_session(pool, "dup")) for _ in range(2)]
    callers.append(asyncio.create_task(new_session(pool)))
    await eventually(lambda: len(agents.made) == 2, what="two starts")

    await asyncio.wait_for(pool.shutdown(), 10)

    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert not agents.running() and pool._slots.used == 0


# ---- 6. the turn runs without its client -----------------------------------------------------


async def test_cancel_frees_the_session_even_if_nobody_reads_the_turn(pools: PoolFactory) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    turn = await session.begin_turn(text("hang"), 30, 0)  # an agent that ignores cancel
    hung = agents.last
    await eventually(lambda: turn.buffered() == 1, what="the first update")

    assert session.cancel()  # and the client never reads again
    await eventually(lambda: session.state is State.IDLE, 5, "the session to be free")

    assert hung.cancels and hung.terminated.is_set()  # asked, then killed after the grace
    assert agents.last is not hung and agents.last.alive  # respawned
    assert (await drain(turn))[-1].stop_reason == "cancelled"  # what the client will read, late
    assert not session.cancel()


async def test_a_stall_is_detected_and_recovered_while_nobody_reads(pools: PoolFactory) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    turn = await session.begin_turn(text("wait"), 0.5, 0)  # silent: stalls after 0.5 s
    await eventually(lambda: session.state is State.IDLE, 5, "the stalled turn to be recovered")
    assert agents.last.cancels  # the agent got session/cancel and honoured it
    with pytest.raises(StreamStalled):
        await drain(turn)


async def test_the_stall_clock_ignores_wall_clock_jumps(
    pools: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    turn = await session.begin_turn(text("wait"), 1.5, 0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)  # NTP steps the clock two hours ahead
    await asyncio.sleep(0.5)
    assert session.state is State.BUSY and not turn.ended
    agents.last.finish_turn()
    assert (await drain(turn))[-1].stop_reason == "end_turn"


# ---- 7. the sweeper: one reap per zombie, survives its own errors ---------------------------


async def test_a_zombie_turn_is_reaped_once_and_its_slot_is_held_until_its_agent_is_gone(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    limits = replace(
        FAST,
        max_sessions=1,
        max_turn_duration=0.3,
        cancel_grace=0.1,
        kill_grace=0.1,
        agent_request_timeout=0.1,
        agent_start_timeout=0.2,
        zombie_grace=0.1,
    )
    pool = await pools(agents, limits)
    session = await new_session(pool)
    turn = await session.begin_turn(text("hang"), 30, 0)
    hung = agents.last
    # Killing it gets stuck (a process in uninterruptible sleep): the runner outlives its bounds.
    hung.behaviour.terminate_delay, hung.behaviour.killable = 3.0, False
    await eventually(session.zombie, 5, "the turn to become a zombie")

    pool.sweep()
    pool.sweep()  # a second pass must not reap (and free the slot) again
    await asyncio.sleep(0.3)  # the reaped runner handles its cancellation

    with pytest.raises(TurnTimeout):
        await drain(turn)  # the client got its status at once
    assert not session.zombie() and hung.terminate_calls == 2  # the recovery's, and one forced by the reap
    assert pool._slots.used == 1, "the slot was freed while the agent was still being killed"
    with pytest.raises(SessionBusy):  # the reaped turn still owns the session: no second turn yet
        await session.begin_turn(text("echo x"), 5, 0)
    await asyncio.wait_for(hung.terminated.wait(), 5)
    await eventually(lambda: pool._slots.used == 0 and not session.lock.busy, 5, "the slot to be freed")
    assert session.state is State.SUSPENDED


async def test_the_sweeper_survives_an_error_in_one_pass(
    pools: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = FakeAgents()
    pool = await pools(agents, replace(FAST, sweep_interval=0.05, idle_ttl=0.3))
    session = await new_session(pool)
    failures = 0

    def broken_once() -> bool:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("a bug in one sweep")
        return False

    monkeypatch.setattr(session, "zombie", broken_once)
    await eventually(lambda: session.state is State.SUSPENDED, 5, "the idle TTL to suspend the session")
    assert failures == 1


# ---- 9. error holes --------------------------------------------------------------------------


async def test_a_create_cancelled_during_its_store_write_leaves_no_row(
    pools: PoolFactory, tmp_path: Path
) -> None:
    class SlowStore(SessionStore):
        def _put(self, record: SessionRecord) -> None:
            time.sleep(0.5)  # on the database thread: a slow disk
            super()._put(record)

    agents = FakeAgents()
    path = tmp_path / "slow.db"
    pool = await pools(agents, store=SlowStore(path))
    create = asyncio.create_task(new_session(pool))
    await eventually(lambda: bool(agents.made) and agents.last.alive, what="the agent start")
    await asyncio.sleep(0.2)  # inside the half-second write
    create.cancel()
    await asyncio.gather(create, return_exceptions=True)

    await asyncio.wait_for(agents.last.terminated.wait(), 5)
    await eventually(lambda: pool._slots.used == 0, what="the slot to be freed")
    await eventually(lambda: stored_ids(path) == set(), what="the queued delete, after the write")
    assert pool.sessions() == []


async def test_closing_after_shutdown_is_shutting_down_not_an_internal_error(pools: PoolFactory) -> None:
    pool = await pools(FakeAgents())
    session = await new_session(pool)
    await pool.shutdown()
    with pytest.raises(ShuttingDown):
        await pool.close(session.session_id)


# ---- 11. records expire; state changes never pile up -----------------------------------------


async def test_suspended_sessions_past_the_retention_are_deleted(pools: PoolFactory, tmp_path: Path) -> None:
    agents = FakeAgents()
    pool = await pools(agents, replace(FAST, session_retention=0.5))
    kept, expired = await new_session(pool), await new_session(pool)
    assert await expired.suspend()
    await asyncio.sleep(0.6)
    kept.last_active_time = time.time()  # in use (it has an agent anyway)

    pool.sweep()

    assert [s.session_id for s in pool.sessions()] == [kept.session_id]
    await eventually(lambda: stored_ids(tmp_path / "sessions.db") == {kept.session_id}, 5, "the delete")
    with pytest.raises(SessionNotFound):
        await expired.begin_turn(text("echo x"), 5, 0)


async def test_state_changes_queue_at_most_one_write_per_session_however_slow_the_disk(
    tmp_path: Path,
) -> None:
    store = SessionStore(tmp_path / "sessions.db")
    await store.open()
    disk = threading.Event()
    store._thread.submit(disk.wait, 30)  # the database thread is stuck behind a slow write

    for n in range(10_000):
        store.put_later(_record(f"s{n % 3}", last_active_time=float(n)))

    assert store.backlog() == 3
    assert store._thread._work_queue.qsize() <= 2
    disk.set()
    await store.close()
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        rows = dict(db.execute("SELECT session_id, last_active_time FROM sessions"))
    assert rows == {"s0": 9999.0, "s1": 9997.0, "s2": 9998.0}


def _record(session_id: str, last_active_time: float) -> SessionRecord:
    return SessionRecord(session_id, "fake", "/", {}, "idle", "", "", 1.0, last_active_time)


# ---- what the review of the rewrite found ----------------------------------------------------


async def test_a_close_whose_record_cannot_be_deleted_still_ends_the_agent_and_frees_the_slot(
    pools: PoolFactory, tmp_path: Path
) -> None:
    class FailingDeletes(SessionStore):
        def _delete(self, session_id: str) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    agents = FakeAgents()
    pool = await pools(agents, store=FailingDeletes(tmp_path / "failing.db"))
    session = await new_session(pool)

    closed = await asyncio.wait_for(pool.close(session.session_id), 10)

    assert closed.state is State.CLOSED and agents.last.terminated.is_set()
    assert pool._slots.used == 0


async def test_a_prompt_during_a_suspension_is_told_what_the_session_is_doing(pools: PoolFactory) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    agents.behaviour.terminate_delay = 1.0
    suspending = asyncio.create_task(session.suspend())
    await eventually(lambda: agents.last.terminate_calls == 1, what="the suspension to begin")

    with pytest.raises(SessionBusy) as busy:
        await session.begin_turn(text("echo x"), 5, 0)

    assert "being stopped" in busy.value.message and busy.value.metadata["doing"] == "suspend"
    assert await suspending


async def test_cancel_prompt_during_a_hand_off_cancels_the_turn_about_to_start(
    pools: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    first, waiting = await a_turn_and_a_waiter(session)
    # CancelPrompt lands before the waiter runs again.
    assert await finish_and_probe_the_hand_off(session, agents, first, session.cancel, monkeypatch)
    assert (await drain(await waiting))[-1].stop_reason == "cancelled"


async def test_prompts_waiting_for_their_session_do_not_start_turns_once_the_server_drains(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    first, waiting = await a_turn_and_a_waiter(session, "echo late")

    pool.refuse_turns()
    agents.last.finish_turn()

    assert (await drain(first))[-1].stop_reason == "end_turn"  # a running turn may finish
    with pytest.raises(ShuttingDown):
        await waiting
    assert not session.lock.busy


async def test_a_create_whose_caller_leaves_just_as_it_succeeds_is_closed_not_orphaned(
    pools: PoolFactory,
) -> None:
    agents = FakeAgents()
    agents.behaviour.start_delay = 0.2
    pool = await pools(agents)
    caller = asyncio.create_task(new_session(pool))
    await eventually(lambda: bool(pool._starting), what="the create to start")
    (start,) = pool._starting
    start.add_done_callback(lambda _: caller.cancel())  # gone before it could read the answer

    with pytest.raises(asyncio.CancelledError):
        await caller

    await eventually(lambda: not pool.sessions() and pool._slots.used == 0, 5, "the orphan to be closed")
    assert agents.last.terminated.is_set()


async def test_an_ended_turn_read_late_never_resumes_an_agent_paused_for_the_next_turn() -> None:
    agents = FakeAgents()
    agent = agents(FAKE, FAST, None)
    old = Turn(stall_timeout=5, max_duration=60, agent=agent)
    for n in range(3):
        old.push(n)
    old.end(TurnEnd("end_turn"))
    agent.pause_reading()  # the next turn's client is behind: its agent is held back

    assert [await old.next() for _ in range(4)][-1] == TurnEnd("end_turn")
    assert agent.reading_paused


# ---- a turn runner cancelled before its first step -------------------------------------------


async def test_a_fence_in_the_same_loop_pass_as_a_hand_off_still_ends_the_handed_off_turn(
    pools: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fences the session right as a turn ends and hands the session to a waiting
    prompt: the waiter's runner task is cancelled before its first step, so `run()` and its
    cleanup never run. Its turn must still end (OWNER_LOST) and the session be let go."""
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    first, waiting = await a_turn_and_a_waiter(session, "echo never")

    def fence() -> None:  # a task of its own, as a store write that found its epoch changed does
        pool.fence(session.session_id)

    await finish_and_probe_the_hand_off(session, agents, first, fence, monkeypatch)
    second = await asyncio.wait_for(waiting, 5)
    await eventually(lambda: session.fenced, 5, "the fence")

    with pytest.raises(OwnerLost):
        await drain(second)
    await eventually(lambda: not session.lock.busy and session.runner is None, 5, "the session to be let go")
    await eventually(lambda: pool._slots.used == 0 and not agents.running(), 5, "the agent to be ended")


async def test_the_reaper_ends_a_turn_whose_runner_task_ended_without_ending_it(pools: PoolFactory) -> None:
    """A safety net: a runner whose task is done while its turn never ended (cancelled before
    its first step, with nothing to settle it) is overdue at once, and reaping ends the turn
    and lets the session go."""
    agents = FakeAgents()
    pool = await pools(agents)
    session = await new_session(pool)
    never_ran = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    never_ran.cancel()
    await asyncio.gather(never_ran, return_exceptions=True)
    assert session.lock.try_take("turn")
    stuck = session.runner = TurnRunner(session, Turn(stall_timeout=5, max_duration=60), text("wait"))
    stuck.task = never_ran  # not through start(): nothing settles its turn when the task ends

    assert session.zombie()
    session.reap()

    assert not session.lock.busy and session.runner is None
    with pytest.raises(TurnTimeout):
        await drain(stuck.turn)


class CountingStore(SessionStore):
    """A real store that remembers every record queued for writing."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.queued: list[SessionRecord] = []

    def put_later(self, record: SessionRecord) -> None:
        self.queued.append(record)
        super().put_later(record)


async def test_a_turns_changes_are_written_together_later_and_the_last_is_on_disk_after_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is not built and written at each change (a turn's start and end, in the first
    event's way), but once for the changes of PERSIST_DELAY; a shutdown writes what is pending."""
    monkeypatch.setattr(pool_module, "PERSIST_DELAY", 3600)  # nothing is written by the timer here
    store = CountingStore(tmp_path / "sessions.db")
    pool = await fake_pool(tmp_path, FakeAgents(), store=store)
    session = await new_session(pool)
    for _ in range(5):
        assert (await drain(await session.begin_turn(text("echo"), 5, 0)))[-1].stop_reason == "end_turn"
    assert store.queued == []  # ten changes, nothing built or queued yet
    await pool.shutdown()
    assert [r.session_id for r in store.queued] == [session.session_id]  # one record, at the end
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        (last_active,) = db.execute(
            "SELECT last_active_time FROM sessions WHERE session_id = ?", (session.session_id,)
        ).fetchone()
    assert last_active == session.last_active_time  # the last change is on disk
