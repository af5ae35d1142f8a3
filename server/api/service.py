"""The SessionService servicer: validate requests, call the pool/session, translate results.

Thin on purpose. Requests are checked by `validation`; sessions are found through the router
(cluster/: a `LocalRouter` without replicas), which also sends a call to the replica serving
its session, so every handler has one path. Every failure leaves through `_abort`, which turns
a SessionGateError into its status (errors.py) and anything unexpected into a plain INTERNAL
without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from sessiongate.server.agents.holder import AgentFactory
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.agents.spares import SparePool
from sessiongate.server.agents.state import SessionUsage
from sessiongate.server.api import validation
from sessiongate.server.api.metrics import OUTCOMES, Metrics
from sessiongate.server.cluster.local import LocalRouter
from sessiongate.server.cluster.router import Relayed
from sessiongate.server.cluster.routing import Routing
from sessiongate.server.errors import (
    AgentNotAllowed,
    McpServerNotAllowed,
    SessionBusy,
    SessionGateError,
    ShuttingDown,
    clip,
)
from sessiongate.server.sandbox.workdir import make_first_root
from sessiongate.server.security import principals
from sessiongate.server.sessions.pool import SessionPool
from sessiongate.server.sessions.session import SessionView, State
from sessiongate.server.settings import AgentConfig, Settings
from sessiongate.server.turns import translate
from sessiongate.server.turns.client_tools import ClientToolSpec
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

log = logging.getLogger("sessiongate.service")

CWD_CHECK_TIMEOUT = 10.0  # seconds to resolve and stat a requested cwd
MAX_LIST_BYTES = 3 * 1024 * 1024  # a ListSessions page or a GetTurn at most (one session is far smaller)
UNDERWAY_WAIT = 1.0  # seconds Prompt's headers wait at most for the prompt to be on its way
TURN_ID_HEADER = "sessiongate-turn-id"  # Prompt's and WatchTurn's response header: the turn's id

STATES = {
    State.IDLE: pb.SESSION_STATE_IDLE,
    State.BUSY: pb.SESSION_STATE_BUSY,
    State.RECOVERING: pb.SESSION_STATE_RECOVERING,
    State.SUSPENDED: pb.SESSION_STATE_SUSPENDED,
    State.CLOSED: pb.SESSION_STATE_CLOSED,
}

R = TypeVar("R")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, Relayed):  # the leaseholder's answer, passed on unchanged
        error = exc.error
        await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
    if isinstance(exc, SessionGateError):
        status = exc.to_status()
        if not exc.transparently_retryable:
            # Response headers commit the RPC: gRPC retry policies then leave it alone.
            with contextlib.suppress(Exception):  # already sent on a stream that yielded events
                await context.send_initial_metadata(())
        await context.abort(status.code, status.details, status.trailing_metadata)
    log.exception("unexpected error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def unary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Serve a unary call where its session is (the router) and route every exception through
    `_abort`."""

    @wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            result: R = await self._router.unary(
                method.__name__, request, context, lambda: method(self, request, context)
            )
            return result
        except Exception as exc:
            await _abort(context, exc)
        raise AssertionError("unreachable: abort raises")

    return handler


class SessionService(pb_grpc.SessionServiceServicer):
    """The gRPC SessionService: each RPC validated, routed to its session's replica, served."""

    def __init__(
        self,
        settings: Settings,
        pool: SessionPool,
        metrics: Metrics,
        *,
        logins: AgentLogins,
        agent_factory: AgentFactory,
        spares: SparePool,
        router: Routing | None = None,
    ) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._pool = pool
        self._metrics = metrics
        self._logins = logins
        self._agent_factory = agent_factory
        self._spares = spares
        self._router: Routing = router or LocalRouter(pool)  # without replicas: all served here
        self.draining = False

    def _proto(self, session: SessionView) -> pb.Session:
        message = session_proto(session)
        message.replica = self._router.replica_of(session.session_id)
        return message

    # ---- RPCs ----------------------------------------------------------------------------

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.Session:
        self._refuse_if_draining()
        agent_name = request.agent or self._settings.default_agent
        cwd, cwd_problem = await self._resolve_cwd(request.cwd)
        config = validation.create_session(
            request, agent_name, self._settings.agents, cwd_problem, self._settings.mcp_servers
        )
        _check_agent_allowed(config.name)
        mcp_servers = tuple(dict.fromkeys(request.mcp_servers))
        _check_mcp_servers_allowed(config, mcp_servers)
        if request.client_mcp_servers:
            _check_client_mcp_servers_allowed()
        client_mcp_servers = validation.client_mcp_configs(request.client_mcp_servers)
        client_tools = validation.client_tool_specs(request.client_tools)
        await self._router.place(request.request_id, context)
        session = await self._pool.create(
            config,
            str(cwd),
            request.request_id,
            dict(request.labels),
            mcp_servers,
            client_mcp_servers,
            client_tools,
        )
        return self._proto(session)

    async def Prompt(self, request: pb.PromptRequest, context: Any) -> AsyncIterator[pb.PromptEvent]:
        try:
            async for event in self._router.stream(
                "Prompt", request, context, lambda: self._prompt(request, context)
            ):
                yield event
        except Exception as exc:
            await _abort(context, exc)

    async def _prompt(self, request: pb.PromptRequest, context: Any) -> AsyncGenerator[pb.PromptEvent, None]:
        """Prompt served here: the turn's events, counted in the metrics once it ends."""
        started = time.monotonic()
        first_event_at = 0.0
        agent, seq, outcome = "", 0, "client_gone"
        cut_off: ShuttingDown | None = None
        lease_mark = self._router.mark()
        try:
            self._refuse_if_draining()
            options = validation.prompt(request, self._limits)
            blocks = translate.prompt_json(request.text, request.content)
            session = await self._router.take(request.session_id, context)
            _check_agent_allowed(session.config.name)  # the caller's allowed agents may have changed
            await self._pool.admit_prompt()
            agent = session.config.name
            on_disconnect = request.on_disconnect
            turn, turn_log = await session.start_turn(
                blocks,
                options.stall_timeout,
                options.wait_timeout,
                options.permission_policy,
                options.permission_timeout,
                prompt=_prompt_blocks(request),
                on_disconnect=on_disconnect,
            )
            try:
                # The prompt goes to the agent before the response headers go out: sending them
                # is work on the loop, which the agent's own work on its answer now overlaps.
                await turn.wait_underway(UNDERWAY_WAIT)
                await context.send_initial_metadata(((TURN_ID_HEADER, turn_log.turn_id),))
                # The turn runs in its own task and its events go to its log; this handler
                # reads them from there like any watcher, but paces the agent while it reads.
                async with contextlib.aclosing(turn_log.events(0, pace=True)) as events:
                    async for event in events:
                        self._router.check_lease(session.session_id)
                        if seq == 0:
                            first_event_at = time.monotonic()  # counted at the end: not on its way
                        if self._cut_off(session, event):
                            outcome = "cancelled"
                            cut_off = self._cut_off_error(session, turn_log.turn_id)
                            raise cut_off
                        yield event
                        seq = event.seq
                        if event.HasField("result"):
                            stop = event.result.stop_reason
                            outcome = "cancelled" if stop == pb.STOP_REASON_CANCELLED else "ok"
            finally:
                # The client left (cancel, deadline, connection lost): cancel the turn upstream,
                # unless it asked for the turn to go on.
                if turn_log.running and on_disconnect != pb.ON_DISCONNECT_CONTINUE:
                    session.cancel(turn)
        except Exception as error:
            # Before any turn ran (refused, or served by another replica) agent is "" and
            # nothing is counted here.
            exc = self._router.outcome(error, request.session_id, lease_mark)
            outcome = "cancelled" if exc is cut_off else _outcome(exc)
            if isinstance(exc, SessionBusy):
                self._metrics.busy_rejections.labels(agent).inc()
            if exc is not error:
                raise exc from error
            raise
        finally:
            if agent and outcome:  # a turn ran (not refused before it started)
                took = time.monotonic() - started
                self._metrics.turns.labels(agent, outcome).inc()
                self._metrics.events.labels(agent).inc(seq)  # once per turn: nothing per event
                self._metrics.turn_duration.labels(agent).observe(took)
                if first_event_at:
                    self._metrics.first_event.labels(agent).observe(first_event_at - started)
                log.info("turn ended outcome=%s events=%d seconds=%.3f", outcome, seq, took)

    async def WatchTurn(self, request: pb.WatchTurnRequest, context: Any) -> AsyncIterator[pb.PromptEvent]:
        try:
            async for event in self._router.stream(
                "WatchTurn", request, context, lambda: self._watch_turn(request, context)
            ):
                yield event
        except Exception as exc:
            await _abort(context, exc)

    async def _watch_turn(
        self, request: pb.WatchTurnRequest, context: Any
    ) -> AsyncGenerator[pb.PromptEvent, None]:
        """WatchTurn served here: the turn's events from its log, after `after_seq`."""
        lease_mark = self._router.mark()
        try:
            validation.check_turn_id(request.turn_id, required=False)
            session = await self._router.session(validation.required_id(request.session_id), context)
            turn_log = await self._pool.transcripts.find(session, request.turn_id)
            await context.send_initial_metadata(((TURN_ID_HEADER, turn_log.turn_id),))
            async with contextlib.aclosing(turn_log.events(request.after_seq)) as events:
                async for event in events:
                    self._router.check_lease(session.session_id)
                    if self._cut_off(session, event):
                        raise self._cut_off_error(session, turn_log.turn_id)
                    yield event
        except Exception as exc:
            lost = self._router.outcome(exc, request.session_id, lease_mark)
            if lost is not exc:
                raise lost from exc
            raise

    @unary
    async def ListTurns(self, request: pb.ListTurnsRequest, context: Any) -> pb.ListTurnsResponse:
        validation.list_turns(request)
        session = await self._router.session(validation.required_id(request.session_id), context)
        turns, token = await self._pool.transcripts.page(session, request.page_size, request.page_token)
        return pb.ListTurnsResponse(turns=turns, next_page_token=token)

    @unary
    async def GetTurn(self, request: pb.GetTurnRequest, context: Any) -> pb.Turn:
        validation.check_turn_id(request.turn_id, required=True)
        session = await self._router.session(validation.required_id(request.session_id), context)
        turn_log = await self._pool.transcripts.find(session, request.turn_id)
        turn = turn_log.summary()  # before the events: the log may be closed meanwhile
        events, truncated = await turn_log.page(request.after_seq, MAX_LIST_BYTES)
        turn.events.extend(events)
        turn.events_truncated = truncated
        return turn

    @unary
    async def CancelPrompt(self, request: pb.CancelPromptRequest, context: Any) -> pb.CancelPromptResponse:
        session = await self._router.session(validation.required_id(request.session_id), context)
        return pb.CancelPromptResponse(cancelled=session.cancel())

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        return self._proto(await self._router.session(validation.required_id(request.session_id), context))

    @unary
    async def ListSessions(self, request: pb.ListSessionsRequest, context: Any) -> pb.ListSessionsResponse:
        validation.list_sessions(request)
        # With replicas: every replica's sessions, from the database.
        served, token = await self._router.page(
            request.page_size, request.page_token, request.agent, request.labels, request.owner
        )
        page = [session for session, _ in served]
        # Sessions carry their agents' modes, options and commands: a page is cut short of what
        # stock clients receive (4 MiB), and the token goes on after its last session.
        sessions: list[pb.Session] = []
        size = 0
        for index, (session, replica) in enumerate(served):
            message = session_proto(session)
            message.replica = replica
            size += message.ByteSize() + 16
            if sessions and size > MAX_LIST_BYTES:
                token = self._pool.token_after(page[index - 1])
                break
            sessions.append(message)
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    @unary
    async def CloseSession(self, request: pb.CloseSessionRequest, context: Any) -> pb.CloseSessionResponse:
        session_id = validation.required_id(request.session_id)
        await self._router.claim(session_id, context)  # taken over if another replica released it
        session = await self._pool.close(session_id)
        return pb.CloseSessionResponse(session=session_proto(session))

    @unary
    async def ListAgents(self, request: pb.ListAgentsRequest, context: Any) -> pb.ListAgentsResponse:
        # A non-admin sees only the agents it may use, and not how they are run (commands and
        # args name hosts' paths and, often, credentials); admins (and, without authentication,
        # everyone: ANONYMOUS is one) see it all.
        caller = principals.current()
        default = self._settings.default_agent if caller.may_use(self._settings.default_agent) else ""
        agents = [
            pb.Agent(
                name=a.name,
                command=a.command if caller.admin else "",
                args=list(a.args) if caller.admin else [],
                permission_policy=a.permission_policy,
                is_default=a.name == self._settings.default_agent,
                auth_method=self._logins.method(a.name),
                client_fs=a.client_fs,
                client_terminal=a.client_terminal,
            )
            for a in sorted(self._settings.agents.values(), key=lambda a: a.name)
            if caller.may_use(a.name)
        ]
        return pb.ListAgentsResponse(agents=agents, default_agent=default)

    @unary
    async def AuthenticateAgent(
        self, request: pb.AuthenticateAgentRequest, context: Any
    ) -> pb.AuthenticateAgentResponse:
        principal = principals.current()
        if not principal.admin:  # every user of the agent is affected: an operator's call
            raise AgentNotAllowed(
                f"principal {principal.name!r} may not authenticate agents (admins only)",
                metadata={"principal": principal.name},
            )
        agent_name = request.agent or self._settings.default_agent
        config = validation.authenticate_agent(request, agent_name, self._settings.agents)
        self._refuse_if_draining()
        await self._logins.log_in(
            config,
            request.method_id,
            lambda: self._agent_factory(config, self._limits, None),
            self._limits,
            on_success=lambda: self._spares.renew(config.name),
        )
        return pb.AuthenticateAgentResponse(agent=config.name, method_id=request.method_id)

    @unary
    async def RespondPermission(
        self, request: pb.RespondPermissionRequest, context: Any
    ) -> pb.RespondPermissionResponse:
        session_id = validation.required_id(request.session_id)
        validation.check_answer_ids(request.request_id, ("option_id", request.option_id))
        session = await self._router.session(session_id, context)
        outcome = session.questions.answer_permission(request.request_id, request.option_id)
        return pb.RespondPermissionResponse(outcome=translate.PERMISSION_OUTCOMES[outcome])

    @unary
    async def RespondElicitation(
        self, request: pb.RespondElicitationRequest, context: Any
    ) -> pb.RespondElicitationResponse:
        session_id = validation.required_id(request.session_id)
        action = validation.elicitation_action(request)
        session = await self._router.session(session_id, context)
        content = json_format.MessageToDict(request.content) if action == "accept" else None
        session.questions.answer_elicitation(request.request_id, action, content)
        return pb.RespondElicitationResponse()

    @unary
    async def RespondToolCall(
        self, request: pb.RespondToolCallRequest, context: Any
    ) -> pb.RespondToolCallResponse:
        session_id = validation.required_id(request.session_id)
        answer = validation.tool_answer(request)
        session = await self._router.session(session_id, context)
        session.questions.answer_tool(request.request_id, answer)
        return pb.RespondToolCallResponse()

    @unary
    async def SetSessionMode(self, request: pb.SetSessionModeRequest, context: Any) -> pb.Session:
        session_id = validation.required_id(request.session_id)
        validation.check_state_ids(("mode_id", request.mode_id))
        session = await self._router.take(session_id, context)
        _check_agent_allowed(session.config.name)
        await session.set_mode(request.mode_id)
        return self._proto(session)

    @unary
    async def SetSessionConfigOption(
        self, request: pb.SetSessionConfigOptionRequest, context: Any
    ) -> pb.Session:
        session_id = validation.required_id(request.session_id)
        validation.check_state_ids(("config_id", request.config_id), ("value", request.value))
        session = await self._router.take(session_id, context)
        _check_agent_allowed(session.config.name)
        await session.set_config_option(request.config_id, request.value)
        return self._proto(session)

    # ---- helpers -------------------------------------------------------------------------

    def _cut_off(self, session: SessionView, event: pb.PromptEvent) -> bool:
        """Whether `event` is the CANCELLED result of a turn the drain ended (its grace over): the
        live streams say SHUTTING_DOWN instead, so no client takes the shutdown for a cancel it
        asked for. The turn's record keeps the result (WatchTurn after a restart shows it)."""
        return (
            self.draining
            and session.ending
            and event.HasField("result")
            and event.result.stop_reason == pb.STOP_REASON_CANCELLED
        )

    @staticmethod
    def _cut_off_error(session: SessionView, turn_id: str) -> ShuttingDown:
        return ShuttingDown(
            "the server is shutting down: the turn was cancelled when the drain grace ran out",
            metadata={"session_id": session.session_id, "turn_id": turn_id},
        )

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")

    async def _resolve_cwd(self, requested: str) -> tuple[Path, str | None]:
        """The session's cwd, checked on a worker thread: a slow file system never stalls the loop."""
        if problem := validation.cwd_problem(requested):
            return self._settings.workdir, problem
        try:
            async with asyncio.timeout(CWD_CHECK_TIMEOUT):
                return await asyncio.to_thread(self._check_cwd, requested)
        except TimeoutError:
            return self._settings.workdir, f"could not be checked within {CWD_CHECK_TIMEOUT:g}s"

    def _check_cwd(self, requested: str) -> tuple[Path, str | None]:
        # Problems name the path as the caller gave it, never what it resolves to as the server
        # (`/proc/self/cwd`, a symlink out of the roots): that is not the caller's to see.
        # A principal with roots of its own is held to them, relative paths start from its
        # first root, and that is its default cwd (made when missing); else the server's.
        own = principals.current().roots
        allowed, base = (own, own[0]) if own else (self._settings.roots, self._settings.workdir)
        shown = repr(clip(requested, 256)) if requested else "the default workdir"
        try:
            if own and not requested:
                make_first_root(base)
            path = (base / requested).resolve()
            if not any(path.is_relative_to(root) for root in allowed):
                roots = ", ".join(str(r) for r in allowed)
                return path, f"{shown} is outside the allowed roots ({roots})"
            if not path.exists():  # said only inside the roots: outside, existence is not told
                return path, f"{shown} does not exist"
            if not path.is_dir():
                return path, f"{shown} is not a directory"
        except OSError as exc:  # a directory we may not search; its text names resolved paths
            return self._settings.workdir, f"{shown} cannot be resolved: {exc.strerror or 'error'}"
        except RuntimeError:  # a symlink loop
            return self._settings.workdir, f"{shown} cannot be resolved: a symlink loop"
        return path, None


def _outcome(exc: Exception) -> str:
    """The turns outcome of a failed Prompt; "" when it was refused before any turn ran."""
    if not isinstance(exc, SessionGateError):
        return "error"
    # Busy, not found, invalid, draining, pool full: refused up front, not a turn.
    return OUTCOMES.get(exc.reason or "", "")


def _check_agent_allowed(agent: str) -> None:
    principal = principals.current()
    if not principal.may_use(agent):
        raise AgentNotAllowed(
            f"principal {principal.name!r} may not use agent {agent!r}",
            metadata={"principal": principal.name, "agent": agent},
        )


def _check_mcp_servers_allowed(config: AgentConfig, names: tuple[str, ...]) -> None:
    """Each requested MCP server is the agent's own or one the caller's principal may use."""
    principal = principals.current()
    for name in names:
        if name not in config.mcp_servers and not principal.may_use_mcp_server(name):
            raise McpServerNotAllowed(
                f"principal {principal.name!r} may not use MCP server {name!r}",
                metadata={"principal": principal.name, "server": name},
            )


def _check_client_mcp_servers_allowed() -> None:
    """The caller's principal may supply its own MCP servers (the tokens file's client_mcp_servers)."""
    principal = principals.current()
    if not principal.client_mcp_servers:
        raise McpServerNotAllowed(
            f"client-supplied MCP servers are not allowed for principal {principal.name!r}",
            metadata={"principal": principal.name},
        )


def _prompt_blocks(request: pb.PromptRequest) -> list[pb.ContentBlock]:
    """The prompt as the transcript keeps it: its text as the first block, then its content."""
    blocks = [pb.ContentBlock(text=pb.TextContent(text=request.text))] if request.text else []
    blocks.extend(request.content)
    return blocks


def _client_tool(spec: ClientToolSpec) -> pb.ClientTool:
    tool = pb.ClientTool(name=spec.name, description=spec.description)
    if spec.input_schema is not None:
        tool.input_schema.update(spec.input_schema)
    return tool


def session_proto(session: SessionView) -> pb.Session:
    message = pb.Session(
        session_id=session.session_id,
        agent=session.config.name,
        cwd=session.cwd,
        state=STATES[session.state],
        create_time=translate.timestamp(session.create_time),
        last_active_time=translate.timestamp(session.last_active_time),
        labels=session.labels,
        agent_session_id=session.agent_session_id,
        request_id=session.request_id,
        owner=session.principal,
        turn_id=session.turn_log.turn_id if session.turn_log is not None else "",
        mcp_servers=[  # names and transports only: never an env or header value
            pb.McpServerInfo(name=a.server.name, transport=a.server.transport, source=a.source)
            for a in session.mcp_servers
        ],
        client_tools=[_client_tool(tool) for tool in session.client_tool_specs],
    )
    if session.handshake is not None:
        hs = session.handshake
        message.agent_info.CopyFrom(pb.AgentInfo(name=hs.name, version=hs.version, title=hs.title))
    state = session.agent_state
    if state.modes:
        message.modes.CopyFrom(translate.session_modes(state))
    message.config_options.extend(translate.config_option(o) for o in state.config_options)
    message.available_commands.extend(translate.available_command(c) for c in state.commands)
    message.title = state.title
    if state.usage != SessionUsage():
        message.usage.CopyFrom(translate.session_usage(state.usage))
    turn = session.turn
    if turn is not None:
        message.turn_start_time.CopyFrom(translate.timestamp(turn.started_wall))
        message.last_event_time.CopyFrom(translate.timestamp(turn.last_event_wall()))
        message.turn_elapsed.FromNanoseconds(int(turn.elapsed() * 1e9))
        message.since_last_event.FromNanoseconds(int(turn.since_last_event() * 1e9))
    return message
