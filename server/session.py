"""One session: its state, its turn lock, running a turn, the stall watchdog and recovery.

The turn lock is the only lock a turn takes, and it is taken fail-fast (or within the
caller's bounded wait): a busy session answers SESSION_BUSY, never a hang. A turn that ends
abnormally (stall, turn timeout, client gone, cancel ignored) hands the lock to a recovery
task that cancels the turn upstream, kills and respawns the agent if it does not stop
within the cancel grace, and only then frees the session. The client gets its status at
once; the cleanup never delays it.

A running agent holds one of the pool's slots. Turn timestamps are plain attributes, so
the pool's sweeper can see a turn whose handler is itself stuck (a client that stopped
reading) and reap it from outside, without the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import acp

from server import logs
from server.agent import AgentConnection, Handshake, TurnItem
from server.errors import (
    AgentError,
    AgentExited,
    SessionBusy,
    SessionNotFound,
    ShuttingDown,
    StreamStalled,
    TurnTimeout,
)
from server.settings import AgentConfig, ServerLimits
from server.slots import Slots
from server.spares import SparePool
from server.turn import PROMPT_DONE, WAKE, Notice, Turn, TurnEnd

log = logging.getLogger("sessiongate.session")


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    RECOVERING = "recovering"
    SUSPENDED = "suspended"
    CLOSED = "closed"


def new_session_id() -> str:
    """144 random bits, URL-safe, never starting with "-" (it would read as an option in a shell)."""
    while (session_id := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return session_id


class Session:
    """A gateway session: one ACP session on one agent process (respawned as needed)."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        cwd: str,
        labels: Mapping[str, str],
        request_id: str,
        limits: ServerLimits,
        slots: Slots,
        on_change: Callable[[Session], None] | None = None,
        on_agent_start: Callable[[str, bool], None] | None = None,
        spares: SparePool | None = None,
        session_id: str = "",
        create_time: float = 0.0,
        last_active_time: float = 0.0,
        agent_session_id: str = "",
        handshake: Handshake | None = None,
    ) -> None:
        self.session_id = session_id or new_session_id()
        self.config = config
        self.cwd = cwd
        self.labels = dict(labels)
        self.request_id = request_id
        self.limits = limits
        self.state = State.SUSPENDED
        self.create_time = create_time or time.time()
        self.last_active_time = last_active_time or self.create_time
        self.agent: AgentConnection | None = None
        self.handshake = handshake  # kept while suspended and across restarts, for GetSession
        self.agent_session_id = agent_session_id
        self.turn: Turn | None = None
        self._slots = slots
        self._has_slot = False
        self._on_change = on_change
        self._on_agent_start = on_agent_start
        self._spares = spares
        self.turns = 0  # turns started on this server, for log lines
        self._lock = asyncio.Lock()
        self._context_reset = False  # the agent lost the history: the next turn starts with a notice
        self._recovery: asyncio.Task[None] | None = None
        self._ending = False  # close or shutdown under way: turns end CANCELLED, nothing respawns
        self._retired = False  # the server is shutting down: the record stays, the session is unusable

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the agent and open the ACP session (CreateSession). Bounded by the start timeout."""
        logs.bind(session=self.session_id, agent=self.config.name)
        async with self._lock:
            await self._ensure_agent()
            self.last_active_time = time.time()  # idle from when it is ready, not from when it was asked for

    async def close(self) -> None:
        """CloseSession: cancel any turn (it ends CANCELLED), end the agent's group; gone for good."""
        self.state = State.CLOSED
        await self._end()

    async def retire(self) -> None:
        """Server shutdown: like close, but the record stays SUSPENDED for the next server."""
        self._retired = True
        await self._end()
        self.state = State.SUSPENDED
        self._changed()

    async def kill(self) -> None:
        """Second signal: end the agent's group now, without the cancel grace."""
        self._retired = self._ending = True
        await self._stop_agent()
        if self.state is not State.CLOSED:
            self.state = State.SUSPENDED
            self._changed()

    async def _end(self) -> None:
        self._ending = True
        turn = self.turn
        if turn is not None:
            await self.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.cancel_grace + self.limits.kill_grace):
                    await turn.finished.wait()
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._recovery, self.limits.kill_grace * 2)
        await self._stop_agent()

    def evictable(self) -> bool:
        """Idle with a running agent and nobody holding the lock: suspend() would not wait."""
        return self.state is State.IDLE and self._has_slot and not self._lock.locked() and not self._ending

    async def suspend(self) -> bool:
        """Stop the agent of an idle session, keeping the session (eviction, idle TTL).

        Never waits on the turn lock: returns False at once when the session is in use.
        """
        if not self.evictable():
            return False
        await self._lock.acquire()  # free (checked above): returns without waiting
        try:
            self.state = State.SUSPENDED  # first, so prompts arriving now see it
            await self._stop_agent()
            self._changed()
            log.info("session suspended session=%s", self.session_id)
        finally:
            self._lock.release()
        return True

    def zombie(self) -> bool:
        """Busy past the turn limit plus the grace: its own watchdog is not running (stuck handler)."""
        turn = self.turn
        return (
            turn is not None
            and self.state is State.BUSY
            and not turn.finished.is_set()
            and asyncio.get_running_loop().time() > turn.deadline + self.limits.zombie_grace
        )

    async def reap(self) -> None:
        """Force-recover a zombie turn: cancel it upstream, kill the agent, free slot and lock."""
        turn = self.turn
        if turn is None or turn.finished.is_set():
            return
        log.warning("reaping a turn whose handler is stuck session=%s", self.session_id)
        turn.reaped = True
        turn.mark(WAKE)
        agent = self.agent
        if agent is not None and turn.prompt_task is not None and not turn.prompt_task.done():
            await agent.cancel(self.agent_session_id)
            turn.prompt_task.cancel()
        await self._stop_agent()
        self._finish(turn)

    async def _ensure_agent(self) -> None:
        """Under the turn lock: make sure an agent runs this session, resuming it if it can."""
        self._check_open()
        if self.agent is not None and self.agent.alive:
            return
        await self._stop_agent(keep_slot=True)  # a dead agent's group may still hold children
        if not self._has_slot:
            await self._slots.acquire(self)  # may suspend another idle session, or PoolExhausted
            self._has_slot = True
        spare = self._spares.take(self.config.name) if self._spares is not None else None
        agent = spare or AgentConnection(
            self.config, request_timeout=self.limits.agent_request_timeout, kill_grace=self.limits.kill_grace
        )
        resume_id = self.agent_session_id
        try:
            if spare is not None:  # started and initialized already: only the ACP session is left
                acp_session_id, resumed = await agent.open(
                    self.cwd, self.limits.agent_start_timeout, resume_id
                )
            else:
                acp_session_id, resumed = await agent.open_session(
                    self.cwd, self.limits.agent_start_timeout, resume_id=resume_id
                )
            if self._ending:  # closed or shut down while we were starting: do not leak the agent
                await agent.terminate()
                self._check_open()
        except BaseException as exc:
            self._release_slot()
            if (
                spare is None
                and self._on_agent_start is not None
                and not isinstance(exc, ShuttingDown | SessionNotFound)
            ):
                self._on_agent_start(self.config.name, False)
            raise
        if spare is None and self._on_agent_start is not None:  # a spare was counted when it started
            self._on_agent_start(self.config.name, True)
        if resume_id and not resumed:
            self._context_reset = True
        self.agent = agent
        self.handshake = agent.handshake
        self.agent_session_id = acp_session_id
        agent.on_exit(self._agent_exited)
        self.state = State.IDLE
        self._changed()

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise SessionNotFound(
                f"session {self.session_id} was closed", metadata={"session_id": self.session_id}
            )
        if self._retired or self._ending:
            raise ShuttingDown("the server is shutting down")

    def _agent_exited(self, agent: AgentConnection) -> None:
        """The agent process ended; an idle session becomes SUSPENDED (resumed by the next prompt)."""
        if agent is self.agent and self.turn is None and self.state is State.IDLE:
            log.warning("agent exited while idle session=%s code=%s", self.session_id, agent.exit_code)
            self.state = State.SUSPENDED
            self._release_slot()
            self._changed()

    async def _stop_agent(self, keep_slot: bool = False) -> None:
        agent, self.agent = self.agent, None
        if agent is not None:
            await agent.terminate()
        if not keep_slot:
            self._release_slot()

    def _release_slot(self) -> None:
        if self._has_slot:
            self._has_slot = False
            self._slots.release()

    def _changed(self) -> None:
        if self._on_change is not None and self.state is not State.CLOSED:
            self._on_change(self)

    # ---- turns -----------------------------------------------------------------------

    async def run_turn(
        self, blocks: list[Any], stall_timeout: float, wait_timeout: float
    ) -> AsyncGenerator[TurnItem, None]:
        """Run one turn, yielding ACP updates, Notices, PermissionReports, then a TurnEnd.

        Raises SessionBusy (lock not free within `wait_timeout`), StreamStalled, TurnTimeout,
        AgentExited, AgentError, AgentAuthRequired, AgentUnavailable or PoolExhausted (resume
        failed), SessionNotFound or ShuttingDown (closed meanwhile).
        """
        logs.bind(session=self.session_id, agent=self.config.name)
        await self._acquire(wait_timeout)
        self.turns += 1
        logs.bind(turn=self.turns)
        turn: Turn | None = None
        try:
            await self._ensure_agent()
            agent = self.agent
            assert agent is not None
            deadline = asyncio.get_running_loop().time() + self.limits.max_turn_duration
            turn = self.turn = Turn(stall_timeout=stall_timeout, deadline=deadline, agent=agent)
            self.state = State.BUSY
            self.last_active_time = time.time()
            if self._context_reset:
                self._context_reset = False
                turn.last_seq += 1
                yield Notice(
                    "context_reset", "the agent was restarted without its history; context was reset"
                )
            agent.subscribe(self.agent_session_id, turn.push)
            turn.prompt_task = asyncio.create_task(agent.prompt(self.agent_session_id, blocks))
            turn.prompt_task.add_done_callback(lambda _: turn.mark(PROMPT_DONE))
            while True:
                item = await self._next_item(turn)
                if item is WAKE:
                    continue
                turn.last_seq += 1
                if item is PROMPT_DONE:
                    yield await self._turn_result(turn)
                    return
                if item is None:  # the agent ignored cancel for the whole grace
                    yield TurnEnd("cancelled")
                    return
                yield item
        finally:
            # Whatever ended the turn (result, stall, timeout, client gone), if it still runs
            # upstream a recovery task takes over the lock; otherwise the session is free now.
            # A reaped turn was already cleaned up by the sweeper: leave the lock alone.
            if turn is None:
                self._finish(None)
            elif not turn.finished.is_set():
                if turn.prompt_task is not None and not turn.prompt_task.done():
                    self._hand_off(turn)
                else:
                    self._finish(turn)

    async def _acquire(self, wait_timeout: float) -> None:
        self._check_open()
        if self._lock.locked() and wait_timeout <= 0:
            raise self._busy()
        try:
            async with asyncio.timeout(wait_timeout if self._lock.locked() else None):
                await self._lock.acquire()
        except TimeoutError:
            raise self._busy() from None

    def _busy(self) -> SessionBusy:
        turn = self.turn
        metadata: dict[str, object] = {"session_id": self.session_id, "state": self.state.value}
        if turn is not None:
            metadata["turn_running_for_s"] = f"{time.time() - turn.started_at:.3f}"
        return SessionBusy(
            f"session {self.session_id} is {self.state.value}: a turn is already running",
            metadata=metadata,
            retry_after=self.limits.busy_retry_after,
        )

    async def _next_item(self, turn: Turn) -> TurnItem:
        """The next queued item, or a watchdog verdict: raises on stall/timeout, None on cancel grace."""
        if turn.reaped:
            raise self._turn_timeout()
        if turn.buffered():
            return turn.take()
        loop = asyncio.get_running_loop()
        stall_at = loop.time() + turn.stall_timeout - (time.time() - turn.last_event_at)
        wake_at = min(stall_at, turn.deadline)
        if turn.cancel_deadline is not None:
            wake_at = min(wake_at, turn.cancel_deadline)
        try:
            async with asyncio.timeout_at(wake_at):
                await turn.wait()
            return turn.take()
        except TimeoutError:
            pass
        now = loop.time()
        if turn.cancel_deadline is not None and now >= turn.cancel_deadline:
            log.warning("agent ignored cancel session=%s; recovering", self.session_id)
            return None
        if now >= turn.deadline:
            raise self._turn_timeout()
        idle = time.time() - turn.last_event_at
        if idle >= turn.stall_timeout:
            raise StreamStalled(
                f"no event from the agent for {idle:.1f}s (stall timeout {turn.stall_timeout:g}s)",
                metadata={
                    "session_id": self.session_id,
                    "idle_s": f"{idle:.3f}",
                    "stall_timeout_s": turn.stall_timeout,
                    "last_seq": turn.last_seq,
                },
            )
        return await self._next_item(turn)  # woken early (the turn was cancelled meanwhile)

    def _turn_timeout(self) -> TurnTimeout:
        return TurnTimeout(
            f"turn ran longer than the maximum turn duration ({self.limits.max_turn_duration:g}s)",
            metadata={"session_id": self.session_id, "max_turn_duration_s": self.limits.max_turn_duration},
        )

    async def _turn_result(self, turn: Turn) -> TurnEnd:
        assert turn.prompt_task is not None
        try:
            response = turn.prompt_task.result()
        except acp.RequestError as exc:
            auth = self.agent.auth_required(exc) if self.agent else None
            if auth is not None:
                raise auth from exc
            data = f" ({exc.data})" if exc.data else ""
            raise AgentError(
                f"agent {self.config.name!r} failed the turn: {exc}{data}",
                metadata={
                    "agent": self.config.name,
                    "code": exc.code,
                    "message": str(exc),
                    "data": exc.data or "",
                },
            ) from exc
        except (ConnectionError, OSError) as exc:
            if self._ending:  # we ended the agent ourselves (close, shutdown)
                return TurnEnd("cancelled")
            code, tail = await self.agent.exit_info() if self.agent else (None, "")
            raise AgentExited(
                f"agent {self.config.name!r} exited during the turn (exit code {code})",
                metadata={"agent": self.config.name, "exit_code": code, "stderr": tail},
            ) from exc
        return TurnEnd(response.stop_reason, response.usage)

    def cancel(self) -> asyncio.Future[bool]:
        """Ask the running turn to stop (CancelPrompt). Never waits on the turn lock.

        Returns an awaitable resolving True if a turn was running. The agent gets the cancel
        grace to end the turn; past it the stream ends CANCELLED and the agent is recovered.
        """
        turn, agent = self.turn, self.agent
        if turn is None or agent is None or turn.cancel_deadline is not None:
            return _done(turn is not None)
        turn.cancel_deadline = asyncio.get_running_loop().time() + self.limits.cancel_grace
        turn.mark(WAKE)  # re-arm the turn's wait with the cancel deadline
        return asyncio.ensure_future(_cancel_then_true(agent, self.agent_session_id))

    def _finish(self, turn: Turn | None) -> None:
        """The turn is over upstream: free the session (SUSPENDED, slot freed, if the agent is gone)."""
        if turn is not None:
            if turn.finished.is_set():
                return
            turn.finished.set()
        agent = self.agent
        if agent is not None:
            agent.subscribe(self.agent_session_id, None)
            agent.resume_reading()
        if agent is None or not agent.alive:
            self._release_slot()
        self.turn = None
        self.last_active_time = time.time()
        if self.state is not State.CLOSED:
            self.state = State.IDLE if agent is not None and agent.alive else State.SUSPENDED
        if self._lock.locked():
            self._lock.release()
        self._changed()

    def _hand_off(self, turn: Turn) -> None:
        """Give the lock to a recovery task: the caller's status goes out now, cleanup follows."""
        if self.state is not State.CLOSED:
            self.state = State.RECOVERING
        if self.agent is not None:  # nobody reads this turn any more: drop its events, unblock the agent
            self.agent.subscribe(self.agent_session_id, None)
            self.agent.resume_reading()
        self._recovery = asyncio.create_task(self._recover(turn), name=f"recover-{self.session_id}")

    async def _recover(self, turn: Turn) -> None:
        """Cancel upstream; if the agent does not stop within the grace, kill and respawn it."""
        agent = self.agent
        try:
            assert turn.prompt_task is not None and agent is not None
            grace = self.limits.cancel_grace
            if turn.cancel_deadline is None:
                await agent.cancel(self.agent_session_id)
            else:  # CancelPrompt already sent session/cancel: only the rest of its grace remains
                grace = max(0.0, turn.cancel_deadline - asyncio.get_running_loop().time())
            if grace > 0:
                await asyncio.wait({turn.prompt_task}, timeout=grace)
            if not turn.prompt_task.done():
                log.warning("turn did not stop after cancel; killing agent session=%s", self.session_id)
                turn.prompt_task.cancel()
                await self._stop_agent(keep_slot=True)
                if not self._ending:
                    try:
                        await self._ensure_agent()
                    except Exception as exc:  # respawn failure leaves the session SUSPENDED, not broken
                        log.warning("respawn failed session=%s: %s", self.session_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recovery failed session=%s", self.session_id)
            await self._stop_agent()
        finally:
            self._finish(turn)


def _done(value: bool) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _cancel_then_true(agent: AgentConnection, acp_session_id: str) -> bool:
    await agent.cancel(acp_session_id)
    return True
