"""One session: who works on it now, its agent, its turns, and how it ends.

A session is a small state machine read off three facts: whether it is closed, who holds its
lock (`SessionLock`: a turn, its recovery, a start, a suspend...), and whether its agent runs
(`AgentHolder`). Work on a session needs the lock, taken fail-fast (or within the caller's
bounded wait): a busy session answers SESSION_BUSY, never a hang.

Work that must not be cut in half runs in tasks of its own, never in an RPC handler: each
turn in a `TurnRunner` task (prompt, watchdog, recovery), stopping an agent in the holder's
task. A client that goes away, or stops reading, only drops its own view of the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessiongate.server import logs
from sessiongate.server.agents.holder import AgentFactory, AgentHolder, real_agent
from sessiongate.server.agents.protocol import AgentProcess
from sessiongate.server.agents.slots import Slots
from sessiongate.server.agents.spares import SparePool
from sessiongate.server.agents.state import AgentState
from sessiongate.server.errors import (
    OwnerLost,
    SessionBusy,
    SessionGateError,
    SessionNotFound,
    ShuttingDown,
    TurnTimeout,
)
from sessiongate.server.ids import opaque_id
from sessiongate.server.sandbox.launcher import sockets_for_agent
from sessiongate.server.security.secrets import SecretBox, SecretUnreadable
from sessiongate.server.sessions.lock import SessionLock
from sessiongate.server.sessions.stored import (
    AttachedMcpServer,
    ClientMcpServers,
    State,
    StoredSession,
    attached_mcp_servers,
    missing_mcp_servers,
)
from sessiongate.server.settings import AgentConfig, McpServerConfig, ServerLimits
from sessiongate.server.supervisor import Supervisor
from sessiongate.server.turns.client_tools import ClientTools, ClientToolSpec
from sessiongate.server.turns.questions import Questions, TurnAsker
from sessiongate.server.turns.runner import TurnRunner
from sessiongate.server.turns.transcripts import Transcripts
from sessiongate.server.turns.turn import Notice, Turn
from sessiongate.server.turns.turn_log import WRITE_TIMEOUT, TurnLog, pump
from sessiongate.v1 import session_service_pb2 as pb

log = logging.getLogger("sessiongate.session")


PUMP_GRACE = WRITE_TIMEOUT + 5.0  # a closing session waits this long for its last events to be stored
ROLE_STATES = {"turn": State.BUSY, "recovery": State.RECOVERING}
BUSY_WITH = {
    "turn": "a turn is already running",
    "recovery": "it is recovering from its last turn",
    "start": "its agent is starting",
    "suspend": "its agent is being stopped (suspended)",
    "stop": "its exited agent is being cleaned up",
}


def new_session_id() -> str:
    """144 random bits (see ids.opaque_id)."""
    return opaque_id(18)


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session of a pool shares: the limits, the agent slots and the supervisor of
    their tasks, the transcripts of their turns, how and where their agents start, and where a
    session reports that it changed (to be stored)."""

    limits: ServerLimits
    slots: Slots
    supervisor: Supervisor
    transcripts: Transcripts | None = None
    on_change: Callable[[Session], None] | None = None
    on_agent_start: Callable[[str, bool], None] | None = None  # (agent name, started ok)
    spares: SparePool | None = None
    agent_factory: AgentFactory = real_agent
    roots: tuple[Path, ...] = ()  # a session's cwd must be inside one of these at every agent start
    secret_box: SecretBox | None = None  # opens sessions' client-supplied MCP servers at each start


class Session:
    """A gateway session: one ACP session on one agent process (respawned as needed)."""

    def __init__(
        self,
        services: SessionServices,
        config: AgentConfig,
        *,
        cwd: str,
        labels: Mapping[str, str],
        request_id: str,
        principal: str = "",
        stored: StoredSession | None = None,
        mcp_servers: tuple[str, ...] = (),
        client_mcp: ClientMcpServers | None = None,
        client_tools: tuple[ClientToolSpec, ...] = (),
    ) -> None:
        """A new session, or (`stored`) one brought back from its record as SUSPENDED: its id,
        times, ACP session, handshake and agent state are the record's. `mcp_servers`: the
        operator-named MCP servers asked for besides the agent's own (the record's, restored);
        `client_mcp`: the client-supplied ones, sealed (`services.secret_box` opens them);
        `client_tools`: the tools the client serves (given to the agent as one MCP server)."""
        limits, supervisor = services.limits, services.supervisor
        self.session_id = stored.session_id if stored is not None else new_session_id()
        self.config = config
        self.cwd = cwd
        self.labels = dict(labels)
        self.request_id = request_id
        self.principal = principal  # the principal that created it (empty without authentication)
        # Names only, kept with the session: each agent start resolves them from the config, so the
        # same servers come back on every load/resume and no secret is ever stored.
        self.requested_mcp_servers = tuple(mcp_servers)
        self._mcp_missing: tuple[str, ...] = ()  # asked for, no longer configured: said at the next turn
        self.client_mcp = client_mcp or ClientMcpServers()
        self._secret_box = services.secret_box
        self.limits = limits
        self.create_time = (stored.create_time if stored is not None else 0.0) or time.time()
        self.last_active_time = (stored.last_active_time if stored is not None else 0.0) or self.create_time
        # Kept while suspended and across restarts, for GetSession.
        self.handshake = stored.handshake if stored is not None else None
        self.agent_session_id = stored.agent_session_id if stored is not None else ""
        # Modes, config options, commands, title, usage: kept up to date by the agent's
        # connection (watch), also while no turn runs; kept while suspended and across restarts.
        self.agent_state = stored.agent_state if stored is not None else AgentState()
        self._agent_calls = 0  # SetSessionMode/SetSessionConfigOption calls on the running agent
        self.lock = SessionLock(on_release=self._released)
        self.holder = AgentHolder(
            config,
            limits,
            services.slots,
            supervisor,
            spares=services.spares,
            factory=services.agent_factory,
            roots=services.roots,
            on_agent_start=services.on_agent_start,
            on_exit=self._agent_exited,
        )
        self.runner: TurnRunner | None = None
        self.transcripts = services.transcripts
        self.turn_log: TurnLog | None = None  # the running turn's events, or the last turn's
        # Turn logs whose last events or record are not in the store yet (a turn's pump may still
        # write while the next turn runs), and the pumps that move turns' events into them.
        self.live_logs: dict[str, TurnLog] = {}
        self._pumps: set[asyncio.Task[None]] = set()
        self.questions = Questions(self.session_id)  # the agent's questions waiting on a client
        self.client_tools = (
            ClientTools(self.session_id, client_tools, self._tool_asker) if client_tools else None
        )
        self.closed = False
        self.fenced = False  # another replica owns it now (replicas): gone from here, kept there
        self.ending = False  # close or shutdown under way: turns end CANCELLED, nothing respawns
        self.draining = False  # the server drains: no new turn starts (running ones may finish)
        self._cancel_pending = False  # CancelPrompt came while a turn was being handed over
        self.turns = 0  # turns started on this server, for log lines
        self._supervisor = supervisor
        self._on_change = services.on_change
        self._context_reset = False  # the agent lost the history: the next turn starts with a notice

    # ---- what the session is now -------------------------------------------------------

    @property
    def state(self) -> State:
        if self.closed:
            return State.CLOSED
        role = self.lock.role
        if role in ROLE_STATES:
            return ROLE_STATES[role]
        if role is None and self.holder.alive:
            return State.IDLE
        return State.SUSPENDED

    @property
    def agent(self) -> AgentProcess | None:
        return self.holder.agent

    @property
    def turn(self) -> Turn | None:
        """The turn running now (for GetSession's timings), if any."""
        runner = self.runner
        return runner.turn if runner is not None else None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the agent and open the ACP session (CreateSession). Bounded by the start timeout."""
        logs.bind(session=self.session_id, agent=self.config.name)
        if not self.lock.try_take("start"):
            raise self._busy()
        try:
            await self.prepare_agent()
            self.last_active_time = time.time()  # idle from when it is ready, not from when it was asked for
        finally:
            self._release()

    async def close(self) -> None:
        """CloseSession: cancel any turn (it ends CANCELLED), end the agent's group; gone for good."""
        self.closed = True
        await self._end(forget=True)

    async def retire(self) -> None:
        """Server shutdown: like close, but the record stays SUSPENDED for the next server."""
        await self._end()
        self._changed()

    async def fence(self) -> None:
        """This replica lost the session (cluster/leases.py): its turn ends OWNER_LOST and its agent's
        group ends now; nothing more of it is written here (the new leaseholder has its record)."""
        self.fenced = True
        self.closed = True
        for log in list(self.live_logs.values()):
            log.abandon()
        await self.kill()

    async def kill(self) -> None:
        """Second signal: end the agent's group now, without the graces."""
        self.ending = True
        if self.runner is not None:
            self.runner.abort(self.gone_error())
        await self.holder.stop(force=True)
        await self._close_tools()
        self._changed()

    async def _end(self, forget: bool = False) -> None:
        self.ending = True
        runner = self.runner
        if runner is not None:
            runner.request_cancel()
            limits = self.limits
            if not await runner.wait_done(
                limits.agent_request_timeout + limits.cancel_grace + 3 * limits.kill_grace
            ):
                log.warning("turn did not end in time for close session=%s; aborting it", self.session_id)
                runner.abort(self.gone_error())
                await runner.wait_done(3 * limits.kill_grace)
        await self._wait_pump(PUMP_GRACE)
        try:
            if forget:
                await self._forget_upstream()
        finally:
            await self.holder.stop()
            await self._close_tools()

    async def _close_tools(self) -> None:
        if self.client_tools is not None:
            await self.client_tools.close()

    def _tool_asker(self) -> TurnAsker | None:
        """Who answers a call of a client tool now: the running turn's client, or no one."""
        turn = self.turn
        return self.questions.asker(turn) if turn is not None and not turn.ended else None

    async def _forget_upstream(self) -> None:
        """Ask the agent to close the ACP session (`session/close`: the built-in agent deletes
        what it stored for it). A suspended session's agent is started for this when a slot is
        free. Bounded by the start and request timeouts; a failure is logged, never fatal."""
        handshake = self.handshake
        if not self.agent_session_id or handshake is None or not handshake.close_session:
            return
        try:
            if self.holder.alive:
                agent = self.holder.agent
            elif self.draining:  # the server is going away: start nothing more
                agent = None
            else:
                agent = await self.holder.start_for_cleanup(self.cwd, self)
            if agent is None:
                log.info("agent not started to close its session (no free slot) session=%s", self.session_id)
            elif agent.handshake is not None and agent.handshake.close_session:
                await agent.close_session(self.agent_session_id, self.limits.agent_request_timeout)
        except SessionGateError as exc:
            log.warning("the agent could not close its session session=%s: %s", self.session_id, exc)

    @property
    def holds_slot(self) -> bool:
        """Whether an agent slot is counted against this session (and so its principal) now."""
        return self.holder.has_slot

    def evictable(self) -> bool:
        """Idle with a running agent and nobody working on it: suspend() would not wait.

        Not once closed: a closing session's agent is its close's to end.
        """
        return (
            not self.lock.busy
            and self.holder.alive
            and not self.ending
            and not self.closed
            and not self._agent_calls  # a mode or option being set on it
        )

    async def suspend(self) -> bool:
        """Stop the agent of an idle session, keeping the session (eviction, idle TTL).

        Never waits on the session: returns False at once when somebody works on it.
        """
        if not self.evictable() or not self.lock.try_take("suspend"):
            return False
        try:
            await self.holder.stop()
            log.info("session suspended session=%s", self.session_id)
        finally:
            self._release()
        return True

    def zombie(self) -> bool:
        """A turn's runner outlived its own bounds by the zombie grace (a bug, or a stuck kill)."""
        runner = self.runner
        return runner is not None and runner.overdue(self.limits.zombie_grace)

    def reap(self) -> None:
        """End a zombie turn from outside: its client gets TURN_TIMEOUT, its agent is killed."""
        runner = self.runner
        if runner is None or runner.reaped:
            return
        log.warning("reaping a turn that outlived its bounds session=%s", self.session_id)
        runner.abort(
            TurnTimeout(
                "the turn outlived its bounds and was ended by the server",
                metadata={
                    "session_id": self.session_id,
                    "max_turn_duration_s": self.limits.max_turn_duration,
                },
            ),
            reaped=True,
        )

    # ---- turns -------------------------------------------------------------------------

    async def begin_turn(
        self,
        blocks: list[dict[str, Any]],
        stall_timeout: float,
        wait_timeout: float,
        permission_policy: str = "",
        permission_timeout: float | None = None,
    ) -> Turn:
        """Take the session for a turn and start its runner; the caller drains the Turn.

        Raises SessionBusy (not free within `wait_timeout`), SessionNotFound or ShuttingDown
        (closed meanwhile). Everything after that reaches the caller through the Turn.
        """
        await self._take_for_turn(wait_timeout)
        return self._run_turn(blocks, stall_timeout, permission_policy, permission_timeout)

    async def _take_for_turn(self, wait_timeout: float) -> None:
        """The lock, for a turn (begin_turn's errors). The caller starts its runner (_run_turn)
        without an await between: the runner's task then holds the lock."""
        logs.bind(session=self.session_id, agent=self.config.name)
        self._check_open()
        if not await self.lock.take("turn", wait_timeout):
            raise self._busy()
        if self.closed or self.ending or self.draining:
            self._cancel_pending = False
            self.lock.release()
            self._check_open()
            raise ShuttingDown("the server is shutting down; retry on another instance")
        self.turns += 1
        logs.bind(turn=self.turns)

    def _run_turn(
        self,
        blocks: list[dict[str, Any]],
        stall_timeout: float,
        permission_policy: str,
        permission_timeout: float | None,
    ) -> Turn:
        """The turn and its runner, on the lock _take_for_turn took; its prompt is on its way
        to the agent when this returns, if the agent runs."""
        turn = Turn(
            stall_timeout=stall_timeout,
            max_duration=self.limits.max_turn_duration,
            max_event_bytes=self.limits.max_event_bytes,
            permission_policy=permission_policy,
            permission_timeout=permission_timeout or self.limits.permission_timeout,
        )
        runner = self.runner = TurnRunner(self, turn, blocks)
        if self._cancel_pending:  # cancelled while it was handed to us: it ends at once, CANCELLED
            self._cancel_pending = False
            runner.request_cancel()
        try:
            runner.start_prompt_now()
        except Exception:  # a bug: the runner's task (which frees the session) sends it instead
            log.exception("sending the prompt at once failed session=%s", self.session_id)
        runner.start(self._supervisor.spawn(runner.run(), name=f"turn-{self.session_id}-{self.turns}"))
        self.last_active_time = time.time()
        self._changed()
        return turn

    async def start_turn(
        self,
        blocks: list[dict[str, Any]],
        stall_timeout: float,
        wait_timeout: float,
        permission_policy: str = "",
        permission_timeout: float | None = None,
        *,
        prompt: list[pb.ContentBlock],
        on_disconnect: pb.OnDisconnect = pb.ON_DISCONNECT_UNSPECIFIED,
    ) -> tuple[Turn, TurnLog]:
        """A turn whose events go to a turn log (the Prompt RPC): its client, watchers and the
        transcript read them from there, by seq. Raises what `begin_turn` raises."""
        assert self.transcripts is not None, "the pool gives every session its transcripts"
        await self._take_for_turn(wait_timeout)
        # No await from here on: the log is the session's before anybody can ask for it. Its
        # record goes to the store's queue before the prompt goes to the agent (_run_turn): the
        # store's thread then works while the agent does, not when the agent's first answer
        # comes back (queued after the prompt, it cost the first event 0.1-0.2 ms here).
        try:
            log = self.turn_log = self.transcripts.start(self.session_id, prompt, on_disconnect)
        except BaseException:
            self.lock.release()  # no runner holds it yet
            raise
        self.live_logs[log.turn_id] = log
        turn = self._run_turn(blocks, stall_timeout, permission_policy, permission_timeout)
        pumping = self._supervisor.spawn(self._pump_turn(turn, log), name=f"pump-{self.session_id}")
        self._pumps.add(pumping)
        pumping.add_done_callback(self._pumps.discard)
        self._changed()
        return turn, log

    async def _pump_turn(self, turn: Turn, log: TurnLog) -> None:
        try:
            await pump(turn, log, self.limits.max_event_bytes)
        finally:
            self.live_logs.pop(log.turn_id, None)
            if not turn.ended:  # the pump failed (a bug): nobody drains the turn, so end it
                self.cancel(turn)
            if self.transcripts is not None:
                self.transcripts.ended(log)

    def live_log(self, turn_id: str) -> TurnLog | None:
        """The turn's log while it is not all in the store (no `turn_id`: the newest turn's)."""
        if not turn_id:
            newest = self.turn_log
            return newest if newest is not None and not newest.stored_fully else None
        return self.live_logs.get(turn_id)

    async def _wait_pump(self, timeout: float) -> None:
        """Until the turns' events are in their logs and on disk (bounded by the store's timeout)."""
        if self._pumps:
            await asyncio.wait(set(self._pumps), timeout=timeout)

    def cancel(self, turn: Turn | None = None) -> bool:
        """Ask the running turn (or only `turn`, if given) to stop; never waits.

        True if a turn was running. CancelPrompt cancels whatever runs; a client leaving its
        stream cancels only its own turn.
        """
        runner = self.runner
        if runner is None and turn is None and self.lock.role == "turn":
            self._cancel_pending = True  # handed to a waiting prompt that has not started yet
            return True
        if runner is None or (turn is not None and runner.turn is not turn):
            return False
        return runner.request_cancel()

    async def wait_turn_over(self, timeout: float) -> None:
        """Until no turn runs (drain), at most `timeout` seconds."""
        started = asyncio.get_running_loop().time()
        runner = self.runner
        if runner is not None:
            await runner.wait_done(timeout)
        await self._wait_pump(max(0.0, timeout - (asyncio.get_running_loop().time() - started)))

    # ---- the runner's host (TurnHost) ----------------------------------------------------

    async def prepare_agent(self) -> None:
        """By the lock's holder: make sure an agent runs this session, resuming it if it can."""
        self._check_open()
        if self.holder.alive:  # the usual case: nothing to start, nothing to store
            return
        missing = missing_mcp_servers(self.config, self.requested_mcp_servers)
        if missing:
            log.warning(
                "MCP servers no longer configured, starting without them session=%s servers=%s",
                self.session_id,
                ",".join(missing),
            )
        supplied, unreadable = self._client_mcp_servers()
        missing += unreadable
        try:
            named = attached_mcp_servers(self.config, self.requested_mcp_servers)
            servers = (*(a.server for a in named), *supplied)
            sockets: tuple[str, ...] = ()
            if self.client_tools is not None:
                sockets = (await self.client_tools.listen(),)
                servers += (self.client_tools.mcp_server(self.config),)
            with sockets_for_agent(sockets):
                opened = await self.holder.ensure(self.cwd, self.agent_session_id, self, servers)
        except SessionGateError:
            self._check_open()  # closed, killed or fenced meanwhile: that, not the stopped start
            raise
        self._mcp_missing = missing
        if self.agent_session_id and not opened.resumed:
            self._context_reset = True
        if not opened.resumed:
            self.agent_state.forget_session()  # what an old ACP session reported is gone with it
        self.agent_session_id = opened.session_id
        if opened.response is not None:
            self.agent_state.apply_response(opened.response)
        agent = self.holder.agent
        if agent is not None:
            if agent.handshake is not None:
                self.handshake = agent.handshake
            agent.watch(opened.session_id, self._state_watcher(agent))
        if self.ending:  # closed or shut down while we were starting: do not keep the agent
            await self.holder.stop()
            self._check_open()
        self._changed()

    # ---- modes and config options (not waiting for a turn) ------------------------------

    async def set_mode(self, mode_id: str) -> None:
        """SetSessionMode: `session/set_mode` to the agent, also during a turn (the agent decides:
        AgentRefused). Unknown mode: InvalidArgument; an agent without modes: NotSupported."""
        async with self._agent_for_call(lambda: self.agent_state.check_mode(mode_id)) as agent:
            await agent.set_mode(self.agent_session_id, mode_id)
            self.agent_state.set_mode(mode_id)
            self._changed()

    async def set_config_option(self, config_id: str, value: str) -> None:
        """SetSessionConfigOption: `session/set_config_option`, like set_mode; the agent answers
        with every option and its value now."""

        def check() -> str | bool:
            return self.agent_state.check_option(config_id, value)

        async with self._agent_for_call(check) as agent:
            response = await agent.set_config_option(self.agent_session_id, config_id, check())
            self.agent_state.apply_response(response)
            self._changed()

    @contextlib.asynccontextmanager
    async def _agent_for_call(self, check: Callable[[], object]) -> AsyncIterator[AgentProcess]:
        """The running agent, for a call that does not take the turn: during a turn, or idle, the
        agent as it is (not evicted meanwhile); a SUSPENDED session is resumed first, owned as a
        start owns it. Busy otherwise (starting, stopping, recovering). `check` vets the request
        against what the agent offers, before anything is started when that is known."""
        logs.bind(session=self.session_id, agent=self.config.name)
        self._check_open()
        if self.agent_state.known or self.holder.alive:
            check()  # a bad request resumes nothing
        role, agent, turn = self.lock.role, self.holder.agent, self.turn
        # Idle, or a turn under way (its agent is ready once the turn has it: not while starting).
        ready = role is None or (role == "turn" and turn is not None and turn.agent is agent)
        if ready and agent is not None and agent.alive:
            if agent.reading_paused:  # held back for a slow client: its answer could not be read
                raise self._busy()
            self._agent_calls += 1
            try:
                yield agent
            finally:
                self._agent_calls -= 1
            return
        if role is not None or not self.lock.try_take("start"):
            raise self._busy()
        try:
            if self.draining:
                raise ShuttingDown("the server is shutting down; retry on another instance")
            await self.prepare_agent()
            self.last_active_time = time.time()
            check()  # against what the resumed agent offers
            agent = self.holder.agent
            assert agent is not None, "prepare_agent leaves a running agent"
            yield agent
        finally:
            self._release()

    def _state_watcher(self, agent: AgentProcess) -> Callable[[object], None]:
        """What `agent` reports about the session (modes, options, commands, title, usage), turn
        or not, kept in the session's state and stored."""

        def on_update(item: object) -> None:
            if agent is self.holder.agent and self.agent_state.apply_update(item):
                self._changed()

        return on_update

    @property
    def mcp_servers(self) -> tuple[AttachedMcpServer, ...]:
        """The MCP servers its agent is given (the agent's own, then the requested, as configured
        now, then the client-supplied ones, then the one serving its client tools: names and
        transports only)."""
        return attached_mcp_servers(
            self.config, self.requested_mcp_servers, self.client_mcp.shown, self.client_tools is not None
        )

    @property
    def client_tool_specs(self) -> tuple[ClientToolSpec, ...]:
        """The tools the client serves, as it declared them."""
        return self.client_tools.tools if self.client_tools is not None else ()

    def _client_mcp_servers(self) -> tuple[tuple[McpServerConfig, ...], tuple[str, ...]]:
        """The client-supplied servers opened for this start, and the names of those that cannot
        be (the key file changed): the agent starts without them, logged and said at the next turn."""
        client = self.client_mcp
        if not client.sealed:
            return (), ()
        try:
            if self._secret_box is None:
                raise SecretUnreadable("no key")
            return client.open(self._secret_box), ()
        except (SecretUnreadable, ValueError):
            names = tuple(s.name for s in client.shown)
            log.warning(
                "client MCP servers cannot be opened with the MCP key, starting without them"
                " session=%s servers=%s",
                self.session_id,
                ",".join(names),
            )
            return (), names

    def take_notice(self) -> Notice | None:
        if self._context_reset:
            self._context_reset = False
            return Notice("context_reset", "the agent was restarted without its history; context was reset")
        if self._mcp_missing:
            missing, self._mcp_missing = self._mcp_missing, ()
            return Notice(
                "mcp_servers_missing",
                f"MCP servers no longer configured, the agent started without them: {', '.join(missing)}",
            )
        return None

    def recovering(self) -> None:
        self.lock.hand_over("recovery")
        self._changed()

    def turn_over(self, runner: TurnRunner) -> None:
        """The runner is done: unhook its turn and free the session."""
        agent = runner.turn.agent
        if agent is not None:
            agent.subscribe(self.agent_session_id, None)
            agent.ask_with(self.agent_session_id, None)
            agent.resume_reading()
        if self.runner is runner:
            self.runner = None
        self.last_active_time = time.time()
        self._release()

    def gone_error(self) -> SessionGateError:
        if self.fenced:
            return OwnerLost(
                f"session {self.session_id} moved to another replica; retry to reach it there",
                metadata={"session_id": self.session_id},
            )
        if self.closed:
            return SessionNotFound(
                f"session {self.session_id} was closed", metadata={"session_id": self.session_id}
            )
        return ShuttingDown("the server is shutting down")

    # ---- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed or self.ending:
            raise self.gone_error()

    def _busy(self) -> SessionBusy:
        role = self.lock.role or "turn"
        metadata: dict[str, object] = {
            "session_id": self.session_id,
            "state": self.state.value,
            "doing": role,
        }
        turn = self.turn
        if turn is not None:
            metadata["turn_running_for_s"] = f"{turn.elapsed():.3f}"
        return SessionBusy(
            f"session {self.session_id} is busy: {BUSY_WITH.get(role, role)}",
            metadata=metadata,
            retry_after=self.limits.busy_retry_after,
        )

    def _release(self) -> None:
        self.lock.release()

    def _released(self) -> None:
        """After every release (to the next waiter, if any): clean up a dead agent left behind."""
        if self.runner is None:
            self._cancel_pending = False  # it was meant for a turn that has ended or never began
        self._clean_up_if_dead()
        self._changed()

    def _agent_exited(self, agent: AgentProcess) -> None:
        """The agent process ended by itself. The lock's holder, if any, deals with it; else we do."""
        if agent is self.holder.agent and not self.lock.busy:
            log.warning("agent exited while idle session=%s code=%s", self.session_id, agent.exit_code)
            self._clean_up_if_dead()
            self._changed()

    def _clean_up_if_dead(self) -> None:
        agent = self.holder.agent
        if agent is not None and not agent.alive and self.lock.try_take("stop"):
            self._supervisor.spawn(self._stop_dead_agent(), name=f"stop-dead-{self.session_id}")

    async def _stop_dead_agent(self) -> None:
        try:
            await self.holder.stop()
        finally:
            self.lock.release()

    def _changed(self) -> None:
        if self._on_change is not None and not self.closed:
            self._on_change(self)


# What GetSession, ListSessions and the calls that read a session without taking it are given:
# a session served here, or one shown from its record (see stored.py).
SessionView = Session | StoredSession
