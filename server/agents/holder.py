"""One session's agent, from start to the end of its process group (asyncpg's holder idea).

The holder is the only code that starts or stops a session's agent, and the only code that
takes or gives back its slot, so "a slot is held exactly while an agent process of ours may
be alive" is decided in one place:

- `ensure()` (called by whoever owns the session) starts an agent if none runs: it waits for
  a previous stop to finish, takes a slot, uses a warm spare or spawns, and resumes the ACP
  session with `session/resume` (or `session/load` when the agent offers no resume, or
  refuses it), falling back to `session/new` when both are refused.
- `stop()` ends the agent in a task of its own: a caller cancelled half-way (a client gone,
  a second signal) never leaves a process group running or a slot taken. The slot is given
  back when the group is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessiongate.server.agents.connection import AgentConnection
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.agents.protocol import AgentProcess, McpServers
from sessiongate.server.agents.slots import Slots
from sessiongate.server.agents.spares import SparePool
from sessiongate.server.errors import AgentAuthRequired, AgentUnavailable, CwdNotAllowed, SessionGateError
from sessiongate.server.sandbox.launcher import Launcher, home_principal, homes_of
from sessiongate.server.sandbox.workdir import WorkDir, open_workdir, roots_of
from sessiongate.server.settings import AgentConfig, ServerLimits
from sessiongate.server.supervisor import Supervisor, joined

log = logging.getLogger("sessiongate.holder")

# session/resume and /load together may take this share of the start timeout: one that hangs
# (or kills its agent) leaves the rest to start a fresh agent with a new session.
RESUME_SHARE = 1 / 3


class _Unanswered(Exception):
    """session/resume or /load got no answer within its budget, or the agent exited meanwhile."""


# Makes an agent for a config, to be started in a session's checked directory (None: a spare).
AgentFactory = Callable[[AgentConfig, ServerLimits, "WorkDir | None"], AgentProcess]


def real_agents(launcher: Launcher, logins: AgentLogins | None = None) -> AgentFactory:
    """Agents started by `launcher` (sandboxed or not, as each agent's config says), that
    authenticate as `logins` says."""

    def make(config: AgentConfig, limits: ServerLimits, workdir: WorkDir | None) -> AgentProcess:
        return AgentConnection(
            config,
            request_timeout=limits.agent_request_timeout,
            kill_grace=limits.kill_grace,
            launcher=launcher.for_principal(home_principal()),  # the home of the session's principal
            workdir=workdir,
            logins=logins,
        )

    return make


real_agent = real_agents(Launcher())  # unconfined unless an agent asks for bwrap


@dataclass(frozen=True, slots=True)
class Opened:
    """The ACP session `ensure()` left running."""

    session_id: str
    resumed: bool  # the session asked for; False: a new one (its context was reset)
    # The agent's answer to session/new, /resume or /load (its modes and config options);
    # None when the agent was already running.
    response: Any = None


class AgentHolder:
    def __init__(
        self,
        config: AgentConfig,
        limits: ServerLimits,
        slots: Slots,
        supervisor: Supervisor,
        *,
        spares: SparePool | None = None,
        factory: AgentFactory = real_agent,
        roots: tuple[Path, ...] = (),
        on_agent_start: Callable[[str, bool], None] | None = None,
        on_exit: Callable[[AgentProcess], None] | None = None,
    ) -> None:
        self.config = config
        self.limits = limits
        self.agent: AgentProcess | None = None
        self.has_slot = False
        self._slots = slots
        self._supervisor = supervisor
        self._spares = spares
        self._factory = factory
        self._roots = roots
        self._on_agent_start = on_agent_start
        self._on_exit = on_exit
        self._stopping: asyncio.Task[None] | None = None
        self._dying: AgentProcess | None = None  # the agent a running stop is ending
        # Counts stop() calls: a start under way when it changes was stopped (a close, a kill or
        # a fence does not take the session's lock), so it ends what it started and fails.
        self._stops = 0

    @property
    def alive(self) -> bool:
        return self.agent is not None and self.agent.alive

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and not self._stopping.done()

    async def ensure(
        self, cwd: str, resume_id: str, requester: object, mcp_servers: McpServers = ()
    ) -> Opened:
        """Make sure an agent runs with the ACP session open.

        A running agent is kept. Otherwise one is started within the start timeout, and
        `resume_id` (if any) is resumed or loaded; if both are refused a new session is opened
        (resumed=False, the caller tells the client its context was reset). On any failure, or
        if the caller is cancelled, nothing is left running and the slot is free again.
        `mcp_servers` go to the agent with whichever of new, load or resume opens the session.
        """
        if self.alive:
            return Opened(resume_id, True)
        await self.stop()  # a dead agent's group may still hold children; an earlier stop may still run
        stops = self._stops
        # The directory is checked against the roots in force now (its principal's), and the agent is
        # started in exactly the directory checked: CwdNotAllowed leaves the session as it was.
        workdir = await open_workdir(cwd, roots_of(self._roots, _principal(requester)))
        try:
            with homes_of(_principal(requester)):
                return await self._start(workdir, resume_id, requester, stops, mcp_servers)
        finally:
            workdir.close()  # the agent has its own hold on the directory by now

    async def _start(
        self, workdir: WorkDir, resume_id: str, requester: object, stops: int, mcp_servers: McpServers
    ) -> Opened:
        await self._slots.acquire(requester)  # may suspend another idle session, or PoolExhausted
        if self._stops != stops:  # stopped while we waited: the slot is this start's alone
            self._slots.release()
            raise self._stopped_while_starting()
        self.has_slot = True
        spare = self._spares.take(self.config.name) if self._spares is not None else None
        agent = spare or self._factory(self.config, self.limits, workdir)
        self.agent = agent  # from here on, stop() ends it whatever happens
        started = spare is not None
        try:
            async with asyncio.timeout(self.limits.agent_start_timeout):
                if spare is None:
                    await agent.start(self.limits.agent_start_timeout)
                    started = True
                    if self._on_agent_start is not None:
                        self._on_agent_start(self.config.name, True)
                try:
                    opened = await self._open(agent, workdir.path, resume_id, mcp_servers)
                except _Unanswered:
                    # Stuck, gone, or still loading (it could replay the history later): a
                    # fresh agent, in the same slot, opens a new session.
                    await agent.terminate()
                    if self.agent is not agent:
                        raise self._stopped_while_starting() from None
                    agent = self.agent = self._factory(self.config, self.limits, workdir)
                    started = False
                    await agent.start(self.limits.agent_start_timeout)
                    started = True
                    opened = await self._new(agent, workdir.path, mcp_servers)
        except BaseException as exc:
            if not started and self._on_agent_start is not None and isinstance(exc, SessionGateError):
                self._on_agent_start(self.config.name, False)
            if await self._end_started(agent) and isinstance(exc, Exception):
                raise self._stopped_while_starting() from None
            if isinstance(exc, TimeoutError):
                raise AgentUnavailable(
                    f"agent {self.config.name!r} did not finish starting within "
                    f"{self.limits.agent_start_timeout:g}s",
                    metadata={"agent": self.config.name},
                ) from None
            raise
        if self.agent is not agent:  # stopped meanwhile: never hand out an agent we do not hold
            await agent.terminate()
            raise self._stopped_while_starting()
        if self._on_exit is not None:
            agent.on_exit(self._on_exit)
        if not agent.alive:  # died right after opening: do not hand out a dead agent
            await self.stop()
            raise AgentUnavailable(
                f"agent {self.config.name!r} exited while starting", metadata={"agent": self.config.name}
            )
        return opened

    async def _end_started(self, agent: AgentProcess) -> bool:
        """End an agent whose start failed; True if a stop took it from us meanwhile (that stop
        gives its slot back, and the holder may hold another agent by now: not ours to stop)."""
        if self.agent is agent:
            await self.stop()
            return False
        await agent.terminate()  # shared with the stop's: waits for the same end
        return True

    def _stopped_while_starting(self) -> AgentUnavailable:
        return AgentUnavailable(
            f"agent {self.config.name!r} was stopped while it was starting",
            metadata={"agent": self.config.name},
        )

    async def start_for_cleanup(self, cwd: str, requester: object) -> AgentProcess | None:
        """An agent started only to tidy up after its session (no ACP session opened), or None
        when no slot is free right now or the directory is no longer allowed: this never
        suspends another session. The caller stops it."""
        if self.alive:
            return self.agent
        await self.stop()
        stops = self._stops
        try:
            workdir = await open_workdir(cwd, roots_of(self._roots, _principal(requester)))
        except CwdNotAllowed:
            return None
        try:
            if self._stops != stops or not self._slots.try_acquire(requester):
                return None  # stopped meanwhile (a kill), or no free slot
            self.has_slot = True
            with homes_of(_principal(requester)):
                agent = self.agent = self._factory(self.config, self.limits, workdir)
            try:
                await agent.start(self.limits.agent_start_timeout)
            except BaseException as exc:
                if await self._end_started(agent) and isinstance(exc, Exception):
                    return None
                raise
            if self.agent is not agent:
                await agent.terminate()
                return None
            return agent
        finally:
            workdir.close()

    async def _open(self, agent: AgentProcess, cwd: str, resume_id: str, mcp_servers: McpServers) -> Opened:
        """Resume `resume_id` with session/resume if the agent offers it (no history replayed),
        else, or if that is refused, with session/load; else, or if that is refused too, a new
        session. Both ways share RESUME_SHARE of the start timeout; one that is not answered in
        time, or ends the agent, raises _Unanswered (the caller starts a fresh agent)."""
        handshake = agent.handshake
        if resume_id and handshake is not None:
            ways = [("session/resume", agent.resume)] if handshake.resume_session else []
            if handshake.load_session:
                ways.append(("session/load", agent.load))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.limits.agent_start_timeout * RESUME_SHARE
            for method, way in ways:
                try:
                    return Opened(
                        resume_id,
                        True,
                        await way(cwd, resume_id, max(0.0, deadline - loop.time()), mcp_servers),
                    )
                except AgentAuthRequired:
                    raise
                except AgentUnavailable as exc:
                    # Refused: the agent answered with an error (its JSON-RPC code) and lives on.
                    if not agent.alive or "code" not in exc.metadata:
                        log.warning("%s got no answer agent=%s: %s", method, self.config.name, exc)
                        raise _Unanswered(method) from exc
                    log.warning("%s refused agent=%s: %s", method, self.config.name, exc)
            if ways:
                log.warning("opening a new ACP session instead agent=%s", self.config.name)
        return await self._new(agent, cwd, mcp_servers)

    async def _new(self, agent: AgentProcess, cwd: str, mcp_servers: McpServers) -> Opened:
        response = await agent.new_session(cwd, self.limits.agent_start_timeout, mcp_servers)
        return Opened(response.session_id, False, response)

    async def stop(self, force: bool = False) -> None:
        """End the agent's process group and give back the slot; idempotent and safe to cancel.

        The work runs in a task of its own: a caller cancelled half-way never leaves the group
        running or the slot taken. `force` skips the SIGTERM grace (a second signal), also for
        a stop already under way. Bounded by the agent's terminate (two kill graces).
        """
        self._stops += 1
        agent, self.agent = self.agent, None
        if agent is not None:
            self._dying = agent
            self._stopping = self._supervisor.spawn(self._stop(agent, force), name=f"stop-{self.config.name}")
        elif force and self._dying is not None:
            self._supervisor.spawn(self._dying.terminate(force=True), name=f"kill-{self.config.name}")
        elif self.has_slot and not self.stopping:  # a slot without an agent: nothing to wait for
            self._give_back_slot()
        stopping = self._stopping
        if stopping is not None:
            try:
                await joined(stopping)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are cancelled ourselves
                # The stop task was cancelled (shutdown); its agent still gets SIGKILL.

    async def _stop(self, agent: AgentProcess, force: bool) -> None:
        try:
            await agent.terminate(force=force)
        finally:
            self._dying = None
            self._give_back_slot()

    def _give_back_slot(self) -> None:
        if self.has_slot:
            self.has_slot = False
            self._slots.release()


def _principal(requester: object) -> str:
    """The principal whose session starts an agent: its agent gets that principal's home."""
    principal = getattr(requester, "principal", "")
    return principal if isinstance(principal, str) else ""
