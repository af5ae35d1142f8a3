"""One session: its state, its turn lock, running a turn, the stall watchdog and recovery.

The turn lock is the only lock a turn takes, and it is taken fail-fast (or within the
caller's bounded wait): a busy session answers SESSION_BUSY, never a hang. A turn that ends
abnormally (stall, turn timeout, client gone, cancel ignored) hands the lock to a recovery
task that cancels the turn upstream, kills and respawns the agent if it does not stop
within the cancel grace, and only then frees the session. The client gets its status at
once; the cleanup never delays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import acp
from acp import schema

from server.agent import AgentConnection, Handshake, TurnItem
from server.errors import (
    AgentAuthRequired,
    AgentError,
    AgentExited,
    SessionBusy,
    SessionNotFound,
    StreamStalled,
    TurnTimeout,
)
from server.settings import AgentConfig, ServerLimits

log = logging.getLogger("sessiongate.session")


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    RECOVERING = "recovering"
    SUSPENDED = "suspended"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Notice:
    """A message from sessiongate itself, streamed as a turn event."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """The last item of a turn that ended OK."""

    stop_reason: str
    usage: schema.Usage | None = None


class _PromptDone:
    """Queued when the upstream `session/prompt` request finished (any outcome)."""


PROMPT_DONE = _PromptDone()


@dataclass(eq=False)
class Turn:
    """One running turn. Its timestamps are readable without the session lock."""

    stall_timeout: float
    deadline: float  # loop time at which the turn times out
    started_at: float = field(default_factory=time.time)
    last_event_at: float = field(default_factory=time.time)
    last_seq: int = 0
    cancel_deadline: float | None = None  # set by cancel(): loop time by which the agent must stop
    queue: asyncio.Queue[TurnItem] = field(default_factory=asyncio.Queue)
    prompt_task: asyncio.Task[schema.PromptResponse] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, item: TurnItem) -> None:
        self.last_event_at = time.time()
        self.queue.put_nowait(item)


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
    ) -> None:
        self.session_id = secrets.token_urlsafe(18)
        self.config = config
        self.cwd = cwd
        self.labels = dict(labels)
        self.request_id = request_id
        self.limits = limits
        self.state = State.SUSPENDED
        self.create_time = time.time()
        self.last_active_time = self.create_time
        self.agent: AgentConnection | None = None
        self.handshake: Handshake | None = None  # kept while suspended, for GetSession
        self.agent_session_id = ""
        self.turn: Turn | None = None
        self._lock = asyncio.Lock()
        self._context_reset = False  # the agent lost the history: the next turn starts with a notice
        self._recovery: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the agent and open the ACP session (CreateSession). Bounded by the start timeout."""
        async with self._lock:
            await self._ensure_agent()

    async def close(self) -> None:
        """Cancel any turn (giving it the cancel grace to end), then end the agent's process group."""
        self.state = State.CLOSED
        turn = self.turn
        if turn is not None:
            await self.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.cancel_grace + self.limits.kill_grace):
                    await turn.finished.wait()
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._recovery, self.limits.kill_grace * 2)
        await self._stop_agent()

    async def _ensure_agent(self) -> None:
        """Under the turn lock: make sure an agent runs this session, resuming it if it can."""
        self._check_open()
        if self.agent is not None and self.agent.alive:
            return
        await self._stop_agent()  # a dead agent's group may still hold children: end them
        agent = AgentConnection(
            self.config, request_timeout=self.limits.agent_request_timeout, kill_grace=self.limits.kill_grace
        )
        resume_id = self.agent_session_id
        acp_session_id, resumed = await agent.open_session(
            self.cwd, self.limits.agent_start_timeout, resume_id=resume_id
        )
        if self.state is State.CLOSED:  # closed while we were starting: do not leak the new agent
            await agent.terminate()
            self._check_open()
        if resume_id and not resumed:
            self._context_reset = True
        self.agent = agent
        self.handshake = agent.handshake
        self.agent_session_id = acp_session_id
        agent.on_exit(self._agent_exited)
        self.state = State.IDLE

    def _agent_exited(self, agent: AgentConnection) -> None:
        """The agent process ended; an idle session becomes SUSPENDED (resumed by the next prompt)."""
        if agent is self.agent and self.turn is None and self.state is State.IDLE:
            log.warning("agent exited while idle session=%s code=%s", self.session_id, agent.exit_code)
            self.state = State.SUSPENDED

    async def _stop_agent(self) -> None:
        agent, self.agent = self.agent, None
        if agent is not None:
            await agent.terminate()

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise SessionNotFound(
                f"session {self.session_id} was closed", metadata={"session_id": self.session_id}
            )

    # ---- turns -----------------------------------------------------------------------

    async def run_turn(
        self, blocks: list[Any], stall_timeout: float, wait_timeout: float
    ) -> AsyncGenerator[TurnItem, None]:
        """Run one turn, yielding ACP updates, Notices, PermissionReports, then a TurnEnd.

        Raises SessionBusy (lock not free within `wait_timeout`), StreamStalled, TurnTimeout,
        AgentExited, AgentError, AgentAuthRequired, AgentUnavailable (respawn failed).
        """
        await self._acquire(wait_timeout)
        turn: Turn | None = None
        try:
            await self._ensure_agent()
            agent = self.agent
            assert agent is not None
            deadline = asyncio.get_running_loop().time() + self.limits.max_turn_duration
            turn = self.turn = Turn(stall_timeout=stall_timeout, deadline=deadline)
            self.state = State.BUSY
            self.last_active_time = time.time()
            if self._context_reset:
                self._context_reset = False
                yield Notice(
                    "context_reset", "the agent was restarted without its history; context was reset"
                )
            agent.subscribe(self.agent_session_id, turn.push)
            turn.prompt_task = asyncio.create_task(agent.prompt(self.agent_session_id, blocks))
            queue = turn.queue
            turn.prompt_task.add_done_callback(lambda _: queue.put_nowait(PROMPT_DONE))
            while True:
                item = await self._next_item(turn)
                if item is _WAKE:
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
            if turn is not None and turn.prompt_task is not None and not turn.prompt_task.done():
                self._hand_off(turn)
            else:
                self._finish(turn)

    async def _acquire(self, wait_timeout: float) -> None:
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
        if not turn.queue.empty():
            return turn.queue.get_nowait()
        loop = asyncio.get_running_loop()
        now = loop.time()
        stall_at = now + turn.stall_timeout - (time.time() - turn.last_event_at)
        wake_at = min(stall_at, turn.deadline)
        if turn.cancel_deadline is not None:
            wake_at = min(wake_at, turn.cancel_deadline)
        try:
            async with asyncio.timeout_at(wake_at):
                return await turn.queue.get()
        except TimeoutError:
            pass
        now = loop.time()
        if turn.cancel_deadline is not None and now >= turn.cancel_deadline:
            log.warning("agent ignored cancel session=%s; recovering", self.session_id)
            return None
        if now >= turn.deadline:
            raise TurnTimeout(
                f"turn ran longer than the maximum turn duration ({self.limits.max_turn_duration:g}s)",
                metadata={
                    "session_id": self.session_id,
                    "max_turn_duration_s": self.limits.max_turn_duration,
                },
            )
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

    async def _turn_result(self, turn: Turn) -> TurnEnd:
        assert turn.prompt_task is not None
        try:
            response = turn.prompt_task.result()
        except acp.RequestError as exc:
            if exc.code == -32000:
                raise AgentAuthRequired(
                    f"agent {self.config.name!r} requires authentication: {exc}",
                    metadata={"agent": self.config.name},
                ) from exc
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
            if self.state is State.CLOSED:
                return TurnEnd("cancelled")
            agent = self.agent
            code = await agent.wait_exit(self.limits.kill_grace) if agent else None
            tail = agent.stderr_tail() if agent else ""
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
        turn.queue.put_nowait(_WAKE)  # re-arm the turn's wait with the cancel deadline
        return asyncio.ensure_future(_cancel_then_true(agent, self.agent_session_id))

    def _finish(self, turn: Turn | None) -> None:
        """The turn is over upstream: free the session (SUSPENDED if the agent is gone)."""
        if self.agent is not None:
            self.agent.subscribe(self.agent_session_id, None)
        if turn is not None:
            turn.finished.set()
        self.turn = None
        self.last_active_time = time.time()
        if self.state is not State.CLOSED:
            self.state = State.IDLE if self.agent is not None and self.agent.alive else State.SUSPENDED
        if self._lock.locked():
            self._lock.release()

    def _hand_off(self, turn: Turn) -> None:
        """Give the lock to a recovery task: the caller's status goes out now, cleanup follows."""
        if self.state is not State.CLOSED:
            self.state = State.RECOVERING
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
                await self._stop_agent()
                if self.state is not State.CLOSED:
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


class _Wake:
    """A queue item that only re-arms the turn's wait (see Session.cancel)."""


_WAKE = _Wake()


def _done(value: bool) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _cancel_then_true(agent: AgentConnection, acp_session_id: str) -> bool:
    await agent.cancel(acp_session_id)
    return True
