"""One turn, run in a task of its own: the prompt, its watchdog, and the recovery after it.
(The prompt itself leaves at once, in the caller's step, when the session's agent runs.)

The runner owns the session for the whole turn and is the only code that decides how a turn
ends: the agent's answer, a stall (no update within the stall timeout), the turn deadline,
a cancel (CancelPrompt, the client leaving, a close) and its grace. None of this depends on
the client reading: the RPC handler only drains the turn's buffer, so a client that stops
reading cannot freeze a watchdog or keep a session busy.

The client gets its outcome first (the turn's last item); cleanup follows while the session
shows RECOVERING: a turn still running upstream gets `session/cancel`, and an agent that does
not stop within the cancel grace is killed (its whole group) and respawned. Only then is the
session free again.

Every phase has a bound (`overdue()` tells the sweeper when a runner has outlived its own),
and a runner that is reaped or cancelled still ends its turn with a status and stops its
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from sessiongate.server.agents.holder import AgentHolder
from sessiongate.server.agents.protocol import AgentProcess
from sessiongate.server.eager import start_eagerly
from sessiongate.server.errors import AgentExited, SessionGateError, StreamStalled, TurnTimeout
from sessiongate.server.settings import ServerLimits
from sessiongate.server.turns.questions import Questions
from sessiongate.server.turns.turn import Notice, Turn, TurnEnd

log = logging.getLogger("sessiongate.runner")


class TurnHost(Protocol):
    """What a runner needs of its session."""

    session_id: str
    agent_session_id: str
    limits: ServerLimits
    holder: AgentHolder
    ending: bool  # closing or shutting down: turns end CANCELLED, nothing respawns
    questions: Questions  # the session's questions waiting on a client

    async def prepare_agent(self) -> None: ...

    def take_notice(self) -> Notice | None: ...

    def recovering(self) -> None: ...

    def turn_over(self, runner: TurnRunner) -> None: ...

    def gone_error(self) -> SessionGateError: ...


class TurnRunner:
    def __init__(self, host: TurnHost, turn: Turn, blocks: list[dict[str, Any]]) -> None:
        self.host = host
        self.turn = turn
        self.blocks = blocks
        self.limits = host.limits
        self.task: asyncio.Task[None] | None = None
        self.reaped = False
        self._phase = "starting"  # starting -> prompting -> recovering
        self._bound_at = self._now() + self._start_bound()
        self._wake = asyncio.Event()
        self._prompt: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._cancel_deadline: float | None = None  # loop time by which the agent must have stopped
        self._forced: SessionGateError | None = None
        self._over = False  # the turn was ended and handed back to its session (turn_over)

    def start(self, task: asyncio.Task[None]) -> None:
        """Run in `task` (spawned on `run()`). A task cancelled before its first step never runs
        `run()`, nor so its cleanup: the task's end then settles the turn instead."""
        self.task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not self._over:
            self._settle()

    def _settle(self) -> None:
        """End the turn and free the session without the task (it never ran, or is gone). A run
        that never began started nothing but, at most, its prompt (start_prompt_now), cancelled
        here; stopping the agent is its canceller's: a kill or fence (abort) and a shutdown
        stop it themselves."""
        self._over = True
        self.turn.end(self._forced or self.host.gone_error())
        self._stop_prompt()
        self.host.questions.cancel_all()
        self.host.turn_over(self)

    # ---- requests from outside: none of them waits -------------------------------------

    def request_cancel(self) -> bool:
        """CancelPrompt, the client leaving, a close: end the turn CANCELLED within the grace.

        True if the turn was still running for its client.
        """
        if self.turn.ended:
            return False
        self._cancel_requested = True
        self.host.questions.cancel_all()  # ACP: open questions are answered `cancelled` at once
        self.turn.stop_holding_back()  # the agent's answer must get through
        if self._phase == "starting" and self.host.ending and self.task is not None:
            self.task.cancel()  # a start cannot be cancelled politely; the close must not wait for it
        self._wake.set()
        return True

    def abort(self, error: SessionGateError, reaped: bool = False) -> None:
        """End the runner now (the reaper, a second signal): its turn ends with `error`."""
        self.reaped = self.reaped or reaped
        self._forced = error
        if self.task is None:
            return
        if not self.task.done():
            self.task.cancel()
        elif not self._over:  # its task ended without ending the turn
            self._settle()

    def overdue(self, grace: float) -> bool:
        """Still running `grace` seconds past its own bound (stuck), or its task is done but the
        turn was never ended and handed back: the sweeper's business."""
        if self.reaped or self.task is None:
            return False
        if self.task.done():
            return not self._over
        return self._now() > self._bound_at + grace

    async def wait_done(self, timeout: float) -> bool:
        if self.task is None:
            return True
        await asyncio.wait({self.task}, timeout=timeout)
        return self.task.done()

    def start_prompt_now(self) -> None:
        """Send the prompt now, in the caller's step, when the session's agent runs (the usual
        turn): the prompt then leaves before the caller's other work and before any task
        switch, and the agent's work on it overlaps ours. Before `start()`. Nothing when the
        task has to start or resume the agent first (it sends the prompt then)."""
        agent = self.host.holder.agent
        if agent is None or not self.host.holder.alive or self._cancel_requested or self.host.ending:
            return
        notice = self.host.take_notice()
        if notice is not None:
            self.turn.notice(notice)
        self._send_prompt(agent)

    # ---- the task ---------------------------------------------------------------------

    async def run(self) -> None:
        turn = self.turn
        try:
            try:
                if self._prompt is None:  # not sent at once: an agent to start or resume first
                    if not self.host.holder.alive:
                        turn.underway()  # its client gets the headers meanwhile
                    await self.host.prepare_agent()
                    notice = self.host.take_notice()
                    if notice is not None:
                        turn.notice(notice)
                turn.end(await self._prompt_turn())
            except SessionGateError as exc:
                turn.end(exc)
            self.host.questions.cancel_all()  # nobody may answer what this turn asked any more
            await self._recover()
        except asyncio.CancelledError:
            turn.end(self._forced or self.host.gone_error())
            self._stop_prompt()
            await self.host.holder.stop(force=self.reaped)
            raise
        except Exception as exc:  # a bug: the client still gets a status, the agent is ended
            log.exception("turn failed session=%s", self.host.session_id)
            turn.end(exc)
            self._stop_prompt()
            await self.host.holder.stop()
        finally:
            self._stop_prompt()
            self.host.questions.cancel_all()
            try:
                agent = self.host.holder.agent
                if agent is not None:  # commands the agent ran through us end with its turn (bounded)
                    await agent.end_terminals(self.host.agent_session_id)
            finally:  # even when cancelled again meanwhile (a second signal): the session is freed
                self._over = True
                self.host.turn_over(self)

    def _send_prompt(self, agent: AgentProcess) -> None:
        """The prompt to `agent`: written before this returns, unless the agent's input is
        busy or full (then its task writes it as soon as it can)."""
        turn, acp_session_id = self.turn, self.host.agent_session_id
        turn.agent = agent
        self._phase = "prompting"
        self._bound_at = turn.deadline + self._cleanup_bound()
        turn.last_event_at = self._now()  # the stall clock starts with the prompt
        agent.subscribe(acp_session_id, turn.push)
        agent.ask_with(acp_session_id, self.host.questions.asker(turn))
        # The prompt's first step (the write) needs no task of its own (eager.py).
        self._prompt = start_eagerly(
            agent.prompt(acp_session_id, self.blocks), name=f"turn-prompt-{self.host.session_id}"
        )
        self._prompt.add_done_callback(self._prompt_done)
        turn.underway()

    async def _prompt_turn(self) -> TurnEnd:
        """Send the prompt (if not sent yet) and watch it: the agent's answer, a cancel, a
        stall or the deadline."""
        if self._prompt is None:
            if self._cancel_requested or self.host.ending:
                return TurnEnd("cancelled")
            agent = self.host.holder.agent
            assert agent is not None, "prepare_agent leaves a running agent"
            self._send_prompt(agent)
        prompt, agent, turn = self._prompt, self.turn.agent, self.turn
        assert prompt is not None and agent is not None
        while True:
            if prompt.done():
                return self._answer(prompt)
            now = self._now()
            if self._cancel_requested and self._cancel_deadline is None:
                self._cancel_deadline = now + self.limits.cancel_grace
                await self._send_cancel(agent)
                continue
            if self._cancel_deadline is not None and now >= self._cancel_deadline:
                log.warning("agent ignored cancel session=%s; recovering", self.host.session_id)
                return TurnEnd("cancelled")
            if now >= turn.deadline:
                raise TurnTimeout(
                    f"turn ran longer than the maximum turn duration ({turn.max_duration:g}s)",
                    metadata={"session_id": self.host.session_id, "max_turn_duration_s": turn.max_duration},
                )
            # An agent we hold back (backpressure), or one waiting for the client's answer to its
            # question, is not silent: it waits on us.
            idle = 0.0 if agent.reading_paused or turn.asking else now - turn.last_event_at
            if idle >= turn.stall_timeout:
                raise self._stalled(idle)
            wake_at = min(turn.deadline, now + turn.stall_timeout - idle)
            if self._cancel_deadline is not None:
                wake_at = min(wake_at, self._cancel_deadline)
            self._wake.clear()
            try:
                async with asyncio.timeout_at(wake_at):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _prompt_done(self, prompt: asyncio.Task[Any]) -> None:
        if not prompt.cancelled():
            prompt.exception()  # retrieved: an answer that comes after the outcome is only logged here
        self._wake.set()

    def _answer(self, prompt: asyncio.Task[Any]) -> TurnEnd:
        try:
            response = prompt.result()
        except AgentExited:
            if self.host.ending:  # we ended the agent ourselves (close, shutdown)
                return TurnEnd("cancelled")
            raise
        if self._cancel_requested and response.stop_reason != "cancelled":
            # ACP: after session/cancel an agent answers `cancelled`; one that says otherwise
            # (Zed's example agent does) still ends a cancelled turn, as CancelPrompt promises.
            return TurnEnd("cancelled", response.usage)
        return TurnEnd(response.stop_reason, response.usage)

    def _stalled(self, idle: float) -> StreamStalled:
        stall = self.turn.stall_timeout
        return StreamStalled(
            f"no event from the agent for {idle:.1f}s (stall timeout {stall:g}s)",
            metadata={
                "session_id": self.host.session_id,
                "idle_s": f"{idle:.3f}",
                "stall_timeout_s": stall,
                "last_seq": "",  # filled in with what the client received (Turn.next)
            },
        )

    async def _recover(self) -> None:
        """After the client has its outcome: make sure the agent stopped the turn, else replace it."""
        prompt, agent = self._prompt, self.turn.agent
        if prompt is None or agent is None:
            return
        if prompt.done():
            await self._drop_if_broken(prompt, agent)
            return
        self._phase = "recovering"
        self._bound_at = self._now() + self._cleanup_bound()
        self.host.recovering()
        self.turn.stop_holding_back()  # nobody reads the rest: let the agent's answer through
        if self._cancel_deadline is None:
            self._cancel_deadline = self._now() + self.limits.cancel_grace
            await self._send_cancel(agent)
        grace = self._cancel_deadline - self._now()
        if grace > 0:
            await asyncio.wait({prompt}, timeout=grace)
        if prompt.done():
            await self._drop_if_broken(prompt, agent)
            return
        log.warning("turn did not stop after cancel; killing agent session=%s", self.host.session_id)
        self._stop_prompt()
        await self.host.holder.stop()
        if not self.host.ending:
            try:
                await self.host.prepare_agent()  # respawn; a lost history is noticed on the next turn
            except SessionGateError as exc:  # the session stays SUSPENDED; the next prompt retries
                log.warning("respawn failed session=%s: %s", self.host.session_id, exc.message)

    async def _drop_if_broken(self, prompt: asyncio.Task[Any], agent: AgentProcess) -> None:
        """A turn that ended with the connection broken leaves an agent of no further use."""
        broken = not prompt.cancelled() and isinstance(prompt.exception(), AgentExited)
        if broken or not agent.alive:
            await self.host.holder.stop()

    async def _send_cancel(self, agent: AgentProcess) -> None:
        """`session/cancel`, within what is left of the grace: an agent that does not read its
        stdin cannot stretch the grace by blocking our write."""
        assert self._cancel_deadline is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._cancel_deadline):
                await agent.cancel(self.host.agent_session_id)

    def _stop_prompt(self) -> None:
        if self._prompt is not None and not self._prompt.done():
            self._prompt.cancel()

    # ---- bounds ------------------------------------------------------------------------

    def _start_bound(self) -> float:
        """Starting (or resuming) an agent: the start timeout, plus stopping a failed one."""
        return self.limits.agent_start_timeout + 2 * self.limits.kill_grace

    def _cleanup_bound(self) -> float:
        """After the deadline: sending cancel, its grace, killing, respawning."""
        limits = self.limits
        return (
            limits.agent_request_timeout + limits.cancel_grace + self._start_bound() + 2 * limits.kill_grace
        )

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
