"""The session core as a state machine (Hypothesis): any interleaving of what clients, agents,
the disk and other replicas do, with the core's promises checked after every step.

Rules: create; prompt (fast, slow or large events; readers that keep up, are slow, stop for a
while or leave); cancel; close; suspend; an agent crash; agents that hang (starting, or being
stopped); a store that stalls; a fence (one session, or all at a lease's end); the sweeper;
shutdown. Everything runs on one event loop per test case, against in-process fake agents
(tests/fakes.py, ChaosAgents), with short limits so every bound is reached in seconds.

Invariants, after every step:
- every stream ends with a result or a status, within its bound (and its seqs are 1, 2, 3...);
- live agent processes == slots used == sessions holding a slot, and every live agent is one
  session's (no orphan, no session with two);
- a session runs at most one turn at a time (no session is served twice);
- nothing outlives its session: once a close or fence is done, no runner, pump, turn log,
  agent or slot of it is left; after shutdown, no task, agent or slot at all.
A check that needs the loop to settle (a stop in flight gives its slot back a loop pass after
the process is gone) polls for up to SETTLE seconds.

`make test` runs a short, derandomized budget (the "ci" profile, reproducible); `make chaos`
runs random cases for SESSIONGATE_CHAOS_SECONDS (the "chaos" profile). A failure prints the
steps (and a @reproduce_failure blob under chaos).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sessiongate.server.turns.turn_log
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sessiongate.server.errors import SessionGateError
from sessiongate.server.sessions.pool import SessionPool
from sessiongate.server.sessions.session import Session
from sessiongate.server.settings import MIN_TURN_LOG_BYTES
from sessiongate.server.state.sqlite import SessionStore
from sessiongate.server.turns.turn import Turn
from sessiongate.server.turns.turn_log import TurnLog
from sessiongate.v1 import session_service_pb2 as pb

from tests.fakes import FAKE, FAST, ChaosAgent, ChaosAgents, fake_pool, text

T = TypeVar("T")
SEEN: Counter[str] = Counter()  # what the cases did, printed at the end (pytest -s)

LIMITS = replace(
    FAST,
    max_sessions=3,  # fewer slots than sessions: creates and resumes evict
    max_turn_duration=2.5,
    cancel_grace=0.3,
    kill_grace=0.2,
    agent_start_timeout=1.0,
    agent_request_timeout=0.5,
    zombie_grace=0.5,
    max_turn_log_bytes=MIN_TURN_LOG_BYTES,  # large events reach the turn log's bound
)
STALL = 0.8  # each prompt's stall timeout
WRITE_TIMEOUT = 0.5  # the turn log's write timeout here: a store stall reaches its retries
SLACK = 5.0  # a loaded machine (a benchmark beside the suite): on top of every computed bound
SETTLE = 3.0  # how long a check that needs the loop to settle may poll
STEP = 0.02  # loop time given to the background (readers, turns, stops) after each rule
STORE_STALL_MAX = 1.5  # a stalled store resumes by itself after at most this long
MAX_SESSIONS = 5  # sessions a case keeps at once (the pool has LIMITS.max_sessions slots)

START_BOUND = LIMITS.agent_start_timeout + 2 * LIMITS.kill_grace
CLEANUP_BOUND = LIMITS.agent_request_timeout + LIMITS.cancel_grace + START_BOUND + 2 * LIMITS.kill_grace
# A prompt's stream: waiting for its session (a turn ahead of it, its start), its own turn,
# the recovery, a stalled store; its reader's own pauses are added per stream.
STREAM_BOUND = 2 * (START_BOUND + LIMITS.max_turn_duration + CLEANUP_BOUND) + STORE_STALL_MAX + SLACK
# A close: the turn's cancel and grace, a kill, the pump's last write, the agent's stop.
CLOSE_BOUND = CLEANUP_BOUND + 6 * LIMITS.kill_grace + STORE_STALL_MAX + 3 * WRITE_TIMEOUT + SLACK
OP_BOUND = STREAM_BOUND  # any single awaited operation of a rule

PROMPTS = {  # what the agent does (listed most telling first: Hypothesis favours the first)
    "large": "flood 4 600000 0",  # over the turn log's bound in two events
    "many": "flood 300 64 0",  # past the turn's HIGH_WATER: the agent is held back
    "slow": "flood 6 32 0.15",
    "hang": "hang",  # ignores cancel: killed after the grace
    "silent": "wait",  # ends by a stall, a cancel, or never (a stopped reader's turn)
    "fast": "echo a b c d e f g h",
}
AGENT_EVENTS = ["crashes", "hang starting", "die slowly", "cannot be killed", "heal"]
READERS = {  # the client: seconds per event; stops for a while after some events; leaves
    "slow": (0.05, None),
    "stops": (0.0, 2),
    "keeps up": (0.0, None),
    "leaves": (0.0, 1),
}


class Violation(AssertionError):
    """An invariant failed; the message says which, and about what."""


@dataclass(eq=False)
class Stream:
    """One Prompt call as the service runs it: start the turn, read its log (pacing it)."""

    number: int
    session: Session
    prompt: str
    reader: str
    started: float
    bound: float
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    turn: Turn | None = None
    turn_log: TurnLog | None = None
    seqs: list[int] = field(default_factory=list)
    outcome: str = ""  # "result", a status ("CODE/REASON"), or "client left"
    problem: str = ""  # what the stream did that it must not

    def go_on(self, now: float) -> None:
        """A stopped reader reads again: its bound counts from now."""
        if not self.resume.is_set():
            self.resume.set()
            self.started = now

    @property
    def stopped(self) -> bool:
        return self.reader == "stops" and not self.resume.is_set()

    def __str__(self) -> str:
        session = self.session.session_id[:6]
        return f"stream {self.number} ({self.prompt} prompt, {self.reader} reader, session {session})"


@dataclass(eq=False)
class Ending:
    """A close or fence of a session, and when it was asked for."""

    session: Session
    how: str
    started: float
    task: asyncio.Task[Any] | None = None
    done_at: float | None = None


class SessionMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="sessiongate-machine-"))
        self.agents_made = ChaosAgents()
        self.store = SessionStore(self.tmp / "sessions.db")
        self.pool: SessionPool | None = None
        self.all_sessions: list[Session] = []  # every session ever made: fenced ones leave the pool
        self.streams: list[Stream] = []
        self.endings: list[Ending] = []
        self.stall_releases: list[threading.Event] = []
        self.shut_down = False
        self._write_timeout = sessiongate.server.turns.turn_log.WRITE_TIMEOUT
        sessiongate.server.turns.turn_log.WRITE_TIMEOUT = WRITE_TIMEOUT

    # ---- running the loop --------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def run(self, work: Coroutine[Any, Any, T], bound: float = OP_BOUND, what: str = "") -> T:
        """Run `work` on the machine's loop (the background runs meanwhile), within `bound`."""

        async def bounded() -> T:
            try:
                return await asyncio.wait_for(work, bound)
            except TimeoutError:
                raise Violation(f"{what or 'a rule'} did not return within {bound:.1f}s") from None

        return self.loop.run_until_complete(bounded())

    def call(self, fn: Callable[[], Any]) -> None:
        """Call `fn` on the loop, as the server's callbacks are (it may spawn tasks)."""

        async def on_the_loop() -> None:
            fn()

        self.loop.run_until_complete(on_the_loop())

    def advance(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.loop.create_task(work)

    def settled(self, check: Callable[[], str], bound: float = SETTLE) -> None:
        """Poll `check` (it returns what is wrong, "" when all is well) for up to `bound` seconds."""
        deadline = self.now() + bound
        while (problem := check()) and self.now() < deadline:
            self.advance(0.01)
        if problem:
            raise Violation(problem)

    # ---- rules ---------------------------------------------------------------------------

    @initialize(target=sessions)
    def open_pool(self) -> Any:
        """A pool with two sessions, so that prompts can come from the first step."""
        self.pool = self.run(
            fake_pool(self.tmp, self.agents_made, LIMITS, self.store), what="opening the pool"
        )
        return multiple(*(s for s in (self.create(), self.create()) if isinstance(s, Session)))

    @precondition(lambda self: not self.shut_down)
    @rule(target=sessions)
    def create(self) -> Any:
        assert self.pool is not None
        try:
            session = self.run(self.pool.create(FAKE, "/", "", {}), what="create")
        except SessionGateError:
            return multiple()  # every slot busy, an agent that would not start: a status, fine
        self.all_sessions.append(session)
        return session

    @rule(
        session=sessions,
        prompt=st.sampled_from(list(PROMPTS)),
        reader=st.sampled_from(list(READERS)),
        wait=st.sampled_from([0.0, 1.0]),
    )
    def prompt(self, session: Session, prompt: str, reader: str, wait: float) -> None:
        SEEN[f"prompt {prompt}, {reader} reader"] += 1
        stream = Stream(len(self.streams) + 1, session, prompt, reader, self.now(), STREAM_BOUND + wait)
        stream.task = self.spawn(self._client(stream, wait))
        self.streams.append(stream)

    async def _client(self, stream: Stream, wait: float) -> None:
        """What the Prompt RPC does (service.py), with a client that reads as told."""
        session = stream.session
        pause, stop_after = READERS[stream.reader]
        try:
            turn, turn_log = await session.start_turn(
                text(PROMPTS[stream.prompt]), STALL, wait, prompt=[], on_disconnect=pb.ON_DISCONNECT_CANCEL
            )
        except SessionGateError as exc:
            stream.outcome = _status(exc)
            return
        stream.turn, stream.turn_log = turn, turn_log
        try:
            async with contextlib.aclosing(turn_log.events(0, pace=True)) as events:
                async for event in events:
                    expected = (stream.seqs[-1] if stream.seqs else 0) + 1
                    if event.seq != expected:
                        stream.problem = f"seq {event.seq} where {expected} was due"
                    stream.seqs.append(event.seq)
                    if event.HasField("result"):
                        stream.outcome = "result"
                    if stop_after is not None and len(stream.seqs) == stop_after:
                        if stream.reader == "leaves":
                            stream.outcome = "client left"
                            return
                        await stream.resume.wait()  # until a rule (or the end of the case) resumes it
                    if pause:
                        await asyncio.sleep(pause)
            if stream.outcome != "result":
                stream.problem = "the stream ended without a result or a status"
        except SessionGateError as exc:
            stream.outcome = _status(exc)
        except asyncio.CancelledError:
            stream.outcome = stream.outcome or "client left"
            raise
        except Exception as exc:
            stream.problem = f"the stream failed with {type(exc).__name__}: {exc}"
        finally:
            if turn_log.running:  # the client left: the service cancels its turn
                session.cancel(turn)

    @rule(session=sessions, prompt=st.sampled_from(["silent", "fast", "large"]))
    def prompt_behind_a_turn(self, session: Session, prompt: str) -> None:
        """A second prompt that waits for the session (the hand-off to a waiter)."""
        self.prompt(session, prompt, "keeps up", 1.0)

    @rule(action=st.sampled_from(["resumes", "leaves"]), data=st.data())
    def a_client(self, action: str, data: st.DataObject) -> None:
        """A stopped reader reads again; or a client cancels its call (deadline, connection lost)."""
        if action == "resumes":
            stopped = [s for s in self.streams if s.stopped]
            if stopped:
                data.draw(st.sampled_from(stopped), label="reader").go_on(self.now())
            return
        open_ = [s for s in self.streams if s.task is not None and not s.task.done()]
        if open_:
            stream = data.draw(st.sampled_from(open_), label="leaving")
            assert stream.task is not None
            self.call(stream.task.cancel)

    @rule(session=sessions)
    def cancel(self, session: Session) -> None:
        self.call(session.cancel)

    @rule(session=consumes(sessions))
    def close(self, session: Session) -> None:
        assert self.pool is not None
        ending = Ending(session, "close", self.now())
        ending.task = self.spawn(self._end(ending, self.pool.close(session.session_id)))
        self.endings.append(ending)

    async def _end(self, ending: Ending, work: Coroutine[Any, Any, Any]) -> None:
        try:
            await work
        except SessionGateError:
            pass  # already closed, fenced, shutting down: a status, fine
        finally:
            ending.done_at = self.now()

    @precondition(lambda self: not self.shut_down)
    @rule(session=sessions)
    def suspend(self, session: Session) -> None:
        self.run(session.suspend(), what="suspend")

    @rule(
        what=st.sampled_from(["crashes", "hang starting", "die slowly", "cannot be killed", "heal"]),
        data=st.data(),
    )
    def agents(self, what: str, data: st.DataObject) -> None:
        """One agent crashes; or agents from now on hang starting (past the start timeout), take
        a second to die (SIGTERM ignored) or to be killed at all (uninterruptible sleep); or heal."""
        behaviour = self.agents_made.behaviour
        if what == "crashes":
            running = self.agents_made.running()
            if running:
                agent = data.draw(st.sampled_from(running), label="crashing agent")
                assert isinstance(agent, ChaosAgent)
                self.call(agent.crash)
        elif what == "hang starting":
            behaviour.start_delay = LIMITS.agent_start_timeout + 0.5
        elif what in ("die slowly", "cannot be killed"):
            behaviour.terminate_delay, behaviour.killable = 1.0, what == "die slowly"
        else:
            self.heal()

    def heal(self) -> None:
        behaviour = self.agents_made.behaviour
        behaviour.start_delay, behaviour.terminate_delay, behaviour.killable = 0.0, 0.0, True

    @precondition(lambda self: not self.shut_down)
    @rule(seconds=st.sampled_from([0.3, STORE_STALL_MAX]))
    def store_stalls(self, seconds: float) -> None:
        """The database thread is stuck (a slow disk) for a while."""
        released = threading.Event()
        self.stall_releases.append(released)
        with contextlib.suppress(RuntimeError):  # the store closed meanwhile
            self.store._thread.submit(released.wait, seconds)

    @rule(session=consumes(sessions))
    def fenced(self, session: Session) -> None:
        """Another replica took the session over."""
        assert self.pool is not None
        self.call(functools.partial(self.pool.fence, session.session_id))
        ending = Ending(session, "fence", self.now())
        ending.task = self.spawn(self._end(ending, self._fence_done(session)))
        self.endings.append(ending)

    async def _fence_done(self, session: Session) -> None:
        """A fence runs in a pool task: done when the session's agent is gone."""
        while session.runner is not None or session.holder.alive or session.holder.stopping:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    @rule(seconds=st.sampled_from([0.05, 0.3, 1.0]), sweep=st.booleans())
    def time_passes(self, seconds: float, sweep: bool) -> None:
        """Time passes (with a pass of the sweeper: idle TTL, zombie reaping)."""
        if sweep and not self.shut_down:
            assert self.pool is not None
            self.call(self.pool.sweep)
        self.advance(seconds)

    @precondition(lambda self: not self.shut_down)
    @rule(how=st.sampled_from(["shutdown", "lease lost"]))
    def server_ends(self, how: str) -> None:
        """Shutdown (every turn ends, agents stopped); or the lease ran out (every session fenced)."""
        assert self.pool is not None
        if how == "shutdown":
            self.shutdown()
            return
        for session in self.pool.sessions():
            self.endings.append(Ending(session, "fence_all", self.now()))
        self.run(self.pool.fence_all(), CLOSE_BOUND, "fence_all")
        for ending in self.endings:
            if ending.how == "fence_all" and ending.done_at is None:
                ending.done_at = self.now()

    def shutdown(self) -> None:
        assert self.pool is not None
        self.shut_down = True
        self.run(self.pool.shutdown(), CLOSE_BOUND + 2 * WRITE_TIMEOUT, "shutdown")

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def streams_end_within_their_bounds(self) -> None:
        self.advance(STEP)
        now = self.now()
        for stream in self.streams:
            if stream.problem:
                raise Violation(f"{stream}: {stream.problem}")
            if stream.stopped or stream.task is None or stream.task.done():
                continue  # a client that does not read cannot be told anything
            if now - stream.started > stream.bound:
                raise Violation(
                    f"{stream} has not ended {now - stream.started:.1f}s after its prompt"
                    f" (bound {stream.bound:.1f}s; {len(stream.seqs)} events read;"
                    f" turn log {_log_state(stream.turn_log)}; session {stream.session.state.value})"
                )

    @invariant()
    def agents_slots_and_holders_agree(self) -> None:
        self.settled(self._agents_slots_holders)

    def _agents_slots_holders(self) -> str:
        assert self.pool is not None
        live = [a for a in self.agents_made.made if a.alive]
        used = self.pool._slots.used
        holding = sum(1 for s in self.all_sessions if s.holder.has_slot)
        if not len(live) == used == holding:
            return f"live agents {len(live)}, slots used {used}, sessions holding a slot {holding}"
        held: dict[int, Session] = {}
        for session in self.all_sessions:
            mine = {id(a) for a in (session.holder.agent, getattr(session.holder, "_dying", None)) if a}
            alive = [a for a in live if id(a) in mine]
            if len(alive) > 1:
                return f"session {session.session_id[:6]} is served by {len(alive)} live agents"
            for agent in alive:
                held[id(agent)] = session
        orphans = [a.pid_value for a in live if id(a) not in held]
        return f"live agents that no session holds (orphans): {orphans}" if orphans else ""

    @invariant()
    def one_turn_at_a_time(self) -> None:
        running: dict[str, list[str]] = {}
        for stream in self.streams:
            if stream.turn is not None and not stream.turn.ended:
                running.setdefault(stream.session.session_id, []).append(str(stream))
        for session_id, streams in running.items():
            if len(streams) > 1:
                raise Violation(f"session {session_id[:6]} runs {len(streams)} turns at once: {streams}")

    @invariant()
    def nothing_outlives_its_session(self) -> None:
        now = self.now()
        for ending in self.endings:
            if ending.done_at is None:
                if now - ending.started > CLOSE_BOUND:
                    raise Violation(
                        f"the {ending.how} of session {ending.session.session_id[:6]} has not finished"
                        f" {now - ending.started:.1f}s later (bound {CLOSE_BOUND:.1f}s)"
                    )
                continue
            self.settled(functools.partial(_leftovers, ending.session, f"after its {ending.how}"))

    # ---- the end of a case -----------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self._finish()
        finally:
            for released in self.stall_releases:
                released.set()
            left = asyncio.all_tasks(self.loop)  # after a failure: whatever still runs
            for task in left:
                task.cancel()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.store.close())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            sessiongate.server.turns.turn_log.WRITE_TIMEOUT = self._write_timeout
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish(self) -> None:
        """Every stream must end on its own (readers resumed, agents and store healed), then
        shutdown leaves nothing behind."""
        assert self.pool is not None
        for stream in self.streams:
            stream.go_on(self.now())
        self.heal()
        for released in self.stall_releases:
            released.set()
        for stream in self.streams:
            if stream.task is not None and not stream.task.done():
                left = stream.bound - (self.now() - stream.started)
                self.loop.run_until_complete(asyncio.wait({stream.task}, timeout=max(left, 0.0)))
            self.streams_end_within_their_bounds()
        for ending in self.endings:
            if ending.task is not None and not ending.task.done():
                left = CLOSE_BOUND - (self.now() - ending.started)
                self.loop.run_until_complete(asyncio.wait({ending.task}, timeout=max(left, 0.0)))
        self.nothing_outlives_its_session()
        self.agents_slots_and_holders_agree()
        SEEN.update(f"stream ended {s.outcome or 'unread'}" for s in self.streams)
        SEEN.update(f"{e.how} done" for e in self.endings if e.done_at is not None)
        if not self.shut_down:
            self.shutdown()
        pool = self.pool
        self.settled(lambda: _after_shutdown(pool, self.agents_made, self.all_sessions))


# ---- what is checked ----------------------------------------------------------------------------


def _status(exc: SessionGateError) -> str:
    return f"{exc.code.name}/{exc.reason or ''}"


def _log_state(turn_log: TurnLog | None) -> str:
    if turn_log is None:
        return "none"
    return f"{turn_log.state}, last seq {turn_log.last_seq}"


def _leftovers(session: Session, when: str) -> str:
    left = []
    if session.runner is not None:
        left.append("a turn runner")
    if session._pumps:
        left.append(f"{len(session._pumps)} pump task(s)")
    if session.live_logs:
        left.append(f"{len(session.live_logs)} live turn log(s)")
    if session.holder.agent is not None:
        left.append("an agent")
    if session.holder.has_slot:
        left.append("a slot")
    return f"session {session.session_id[:6]} keeps {', '.join(left)} {when}" if left else ""


def _after_shutdown(pool: SessionPool, agents: ChaosAgents, sessions: list[Session]) -> str:
    tasks = [t.get_name() for t in pool._supervisor._tasks if not t.done()]
    if tasks:
        return f"tasks outlive the shutdown: {tasks}"
    live = [a.pid_value for a in agents.made if a.alive]
    if live or pool._slots.used:
        return f"after shutdown: live agents {live}, slots used {pool._slots.used}"
    for session in sessions:
        if problem := _leftovers(session, "after shutdown"):
            return problem
    return ""


# ---- budgets ----------------------------------------------------------------------------------

CHAOS_SECONDS = float(os.environ.get("SESSIONGATE_CHAOS_SECONDS", "0") or 0)

BOTH: dict[str, Any] = {
    "deadline": None,  # a step's time is bounded by the machine's own waits, not Hypothesis's
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
}
settings.register_profile(
    "ci",  # make test: short and reproducible (the same cases on every run)
    max_examples=25,
    stateful_step_count=20,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    **BOTH,
)
settings.register_profile(
    "chaos",  # make chaos: random cases, batch after batch, until the time is up
    max_examples=20,
    stateful_step_count=40,
    derandomize=False,
    **BOTH,
)


def check_all(state: SessionMachine) -> None:
    state.streams_end_within_their_bounds()
    state.agents_slots_and_holders_agree()
    state.one_turn_at_a_time()
    state.nothing_outlives_its_session()


@pytest.mark.parametrize("how", ["fence", "lease lost"])
def test_found_a_fence_while_the_prompting_client_stopped_reading_leaves_no_pump_behind(how: str) -> None:
    """Found by the machine: the turn ended OWNER_LOST, but its pump went on waiting for a client
    that had stopped reading, keeping the pump task and the live turn log of a fenced session."""
    state = SessionMachine()
    try:
        first, _ = state.open_pool()
        state.prompt(prompt="many", reader="stops", session=first, wait=0.0)
        check_all(state)
        if how == "fence":
            state.fenced(session=first)
        else:
            state.server_ends(how="lease lost")
        for _ in range(3):
            check_all(state)
    finally:
        state.teardown()


def test_found_a_fence_while_the_store_hangs_leaves_no_pump_writing_behind() -> None:
    """Found by the machine (make chaos): a lease lost while the store hung (6 s of stalls) and a
    large turn streamed; the fenced session's pump went on waiting to write its turn, which the
    new owner has, for as long as the store hung."""
    state = SessionMachine()
    try:
        _, second = state.open_pool()
        check_all(state)
        for _ in range(4):
            state.store_stalls(seconds=STORE_STALL_MAX)
        state.prompt(prompt="large", reader="slow", session=second, wait=0.0)
        check_all(state)
        state.server_ends(how="lease lost")
        check_all(state)
    finally:
        state.teardown()


def test_the_session_core_keeps_its_promises_in_any_interleaving() -> None:
    if not CHAOS_SECONDS:
        run_state_machine_as_test(SessionMachine, settings=settings.get_profile("ci"))
        print("\n".join(f"{n:5} {what}" for what, n in sorted(SEEN.items())))
        return
    ends = time.monotonic() + CHAOS_SECONDS
    batches = 0
    while time.monotonic() < ends:
        run_state_machine_as_test(SessionMachine, settings=settings.get_profile("chaos"))
        batches += 1
    print("\n".join(f"{n:5} {what}" for what, n in sorted(SEEN.items())))
    print(f"chaos: {batches} batches of random cases in {CHAOS_SECONDS:g}s, nothing found")
