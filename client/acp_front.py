"""`sessiongate acp`: an ACP agent on stdin/stdout whose sessions are a gateway's.

An editor (Zed, acpx, any ACP client) starts this as its agent command. Each ACP call becomes
the gateway's: `session/new` CreateSession, `session/list` ListSessions, `session/load` (the
stored transcript replayed as `session/update` notifications, oldest turn first) and
`session/resume` attach to an existing session, `session/close` CloseSession, `session/prompt`
a Prompt that continues on disconnect (a broken stream re-attaches with WatchTurn from the last
event, so the editor sees no gap and no duplicate), `session/cancel` CancelPrompt, and
`session/set_mode`/`set_config_option` their RPCs. The agent's permission requests and
elicitations reach the editor as the same ACP requests; decisions the gateway made itself
(policy, timeout) are reported on the tool call, not asked. Gateway errors become JSON-RPC
errors whose `data` carries the gRPC code, the gateway's reason and its metadata.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import acp
import grpc
from acp import schema
from acp.exceptions import RequestError
from pydantic import ValidationError
from sessiongate.client import acp_updates
from sessiongate.client.aio import AsyncSessionClient
from sessiongate.client.errors import McpServerNotAllowed, McpTransportUnsupported, SessionGateError
from sessiongate.client.mcp import ClientMcpServer, McpHttpServer, McpSseServer, McpStdioServer
from sessiongate.v1 import session_service_pb2 as pb

log = logging.getLogger("sessiongate.acp")

CONNECT_TIMEOUT = 10.0  # seconds initialize waits for the gateway before saying it is unreachable
MAX_REPLAYED_TURNS = 1000  # turns session/load replays: the newest; older ones are not replayed
SERVER_NAME = "sessiongate-acp"
# JSON-RPC error codes for gateway statuses (ACP's own where it has one).
ERROR_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: -32602,  # invalid params
    grpc.StatusCode.NOT_FOUND: -32002,  # resource not found
    grpc.StatusCode.UNAUTHENTICATED: -32000,  # auth required
}
T = TypeVar("T")


def gateway_error(error: SessionGateError) -> RequestError:
    """A gateway status as a JSON-RPC error: its message, and in `data` the gRPC code, the
    gateway's reason and metadata (already bounded by the gateway)."""
    data: dict[str, Any] = {"code": error.code.name}
    if error.reason:
        data["reason"] = error.reason
    if error.metadata:
        data["metadata"] = error.metadata
    if error.violations:
        data["violations"] = error.violations
    return RequestError(ERROR_CODES.get(error.code, -32603), error.message or error.code.name, data)


class FrontDoor:
    """The ACP agent the editor talks to; every session is the gateway's."""

    def __init__(
        self,
        client: AsyncSessionClient,
        *,
        agent: str = "",
        labels: dict[str, str] | None = None,
        permission_policy: str = "ask",
        target: str = "",
    ) -> None:
        self._client = client
        self._agent = agent
        self._labels = labels or {}
        self._policy = permission_policy
        self._target = target
        self._conn: Any = None
        self._elicitation = False  # the editor answers elicitation/create (its capabilities)
        self._followers: set[asyncio.Task[None]] = set()  # running turns followed after a load

    def on_connect(self, conn: Any) -> None:
        self._conn = conn

    async def _gateway(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except SessionGateError as error:
            raise gateway_error(error) from None

    # ---- connection ----------------------------------------------------------------------

    async def initialize(
        self, protocol_version: int, client_capabilities: Any = None, client_info: Any = None, **_: Any
    ) -> schema.InitializeResponse:
        try:
            agents = await self._client.list_agents(timeout=CONNECT_TIMEOUT)
        except SessionGateError as error:
            if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RequestError(
                    -32603,
                    f"the sessiongate gateway at {self._target} cannot be reached: {error.message[:200]}",
                    {"code": error.code.name, "target": self._target},
                ) from None
            raise gateway_error(error) from None
        name = self._agent or agents.default_agent
        config = next((a for a in agents.agents if a.name == name), None)
        if config is None:
            known = ", ".join(a.name for a in agents.agents)
            raise RequestError(-32602, f"the gateway has no agent {name[:100]!r} (it has: {known[:500]})")
        self._agent = name
        elicitation = getattr(client_capabilities, "elicitation", None)
        self._elicitation = elicitation is not None
        auth: list[schema.EnvVarAuthMethod | schema.TerminalAuthMethod | schema.AuthMethodAgent] = (
            [schema.AuthMethodAgent(id=config.auth_method, name=config.auth_method)]
            if config.auth_method
            else []
        )
        return schema.InitializeResponse(
            protocol_version=min(protocol_version, acp.PROTOCOL_VERSION),
            agent_capabilities=schema.AgentCapabilities(
                load_session=True,
                prompt_capabilities=schema.PromptCapabilities(image=True, embedded_context=True),
                mcp_capabilities=schema.McpCapabilities(http=True, sse=True),
                session_capabilities=schema.SessionCapabilities(
                    list=schema.SessionListCapabilities(),
                    resume=schema.SessionResumeCapabilities(),
                    close=schema.SessionCloseCapabilities(),
                ),
            ),
            auth_methods=auth,
            agent_info=schema.Implementation(
                name=SERVER_NAME, title=f"sessiongate: {name}", version=_version()
            ),
        )

    async def authenticate(self, method_id: str, **_: Any) -> schema.AuthenticateResponse:
        await self._gateway(lambda: self._client.authenticate_agent(self._agent, method_id))
        return schema.AuthenticateResponse()

    # ---- sessions ------------------------------------------------------------------------

    async def new_session(
        self, cwd: str, mcp_servers: list[Any] | None = None, **_: Any
    ) -> schema.NewSessionResponse:
        servers = [_mcp_server(s) for s in mcp_servers or ()]

        async def create(servers: list[ClientMcpServer]) -> pb.Session:
            return await self._client.create_session(
                self._agent, cwd, labels=self._labels, client_mcp_servers=servers
            )

        try:
            session = await create(servers)
        except (McpServerNotAllowed, McpTransportUnsupported) as refused:
            # The editor's MCP servers go where the gateway allows them; where it does not, the
            # session is still made, without them (said on stderr, which editors log).
            log.warning(
                "the gateway refused the editor's MCP servers (%s); starting without them", refused.reason
            )
            session = await self._gateway(lambda: create([]))
        except SessionGateError as error:
            raise gateway_error(error) from None
        return schema.NewSessionResponse(session_id=session.session_id, **_session_state(session))

    async def load_session(
        self, cwd: str, session_id: str, mcp_servers: list[Any] | None = None, **_: Any
    ) -> schema.LoadSessionResponse:
        session = await self._gateway(lambda: self._client.get_session(session_id))
        running = await self._gateway(lambda: self._replay(session_id))
        if running is not None:  # a turn runs (another editor's): follow it live to its end
            self._follow(session_id, *running)
        return schema.LoadSessionResponse(**_session_state(session))

    async def resume_session(
        self, cwd: str, session_id: str, mcp_servers: list[Any] | None = None, **_: Any
    ) -> schema.ResumeSessionResponse:
        session = await self._gateway(lambda: self._client.get_session(session_id))
        return schema.ResumeSessionResponse(**_session_state(session))

    async def list_sessions(
        self, cursor: str | None = None, cwd: str | None = None, **_: Any
    ) -> schema.ListSessionsResponse:
        async def listed() -> list[pb.Session]:
            return [s async for s in self._client.list_sessions(agent=self._agent)]

        sessions = await self._gateway(listed)
        infos = [
            schema.SessionInfo(
                session_id=s.session_id,
                cwd=s.cwd,
                title=s.title or None,
                updated_at=s.last_active_time.ToJsonString() if s.HasField("last_active_time") else None,
            )
            for s in sessions
            if s.state != pb.SESSION_STATE_CLOSED and (not cwd or s.cwd == cwd)
        ]
        return schema.ListSessionsResponse(sessions=infos)

    async def close_session(self, session_id: str, **_: Any) -> schema.CloseSessionResponse:
        await self._gateway(lambda: self._client.close_session(session_id))
        return schema.CloseSessionResponse()

    async def set_session_mode(
        self, mode_id: str, session_id: str, **_: Any
    ) -> schema.SetSessionModeResponse:
        await self._gateway(lambda: self._client.set_mode(session_id, mode_id))
        return schema.SetSessionModeResponse()

    async def set_config_option(
        self, config_id: str, session_id: str, value: Any, **_: Any
    ) -> schema.SetSessionConfigOptionResponse:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        session = await self._gateway(lambda: self._client.set_config_option(session_id, config_id, text))
        return schema.SetSessionConfigOptionResponse.model_validate(
            {"configOptions": acp_updates.config_options(session.config_options)}
        )

    # ---- turns ---------------------------------------------------------------------------

    async def prompt(self, prompt: list[Any], session_id: str, **_: Any) -> schema.PromptResponse:
        try:
            blocks = acp_updates.prompt_blocks(prompt)
        except ValueError as error:
            raise RequestError.invalid_params({"prompt": str(error)}) from None
        events = self._client.prompt(
            session_id,
            content=blocks,
            on_disconnect="continue",
            permission_policy=self._policy,
            on_permission=lambda request: self._ask_permission(session_id, request),
            on_elicitation=lambda request: self._ask_elicitation(session_id, request),
        )
        try:
            async for event in events:
                if event.HasField("result"):
                    return schema.PromptResponse.model_validate(
                        {
                            "stopReason": acp_updates.stop_reason(event.result),
                            **({"usage": u} if (u := acp_updates.usage(event.result.usage)) else {}),
                        }
                    )
                await self._send(session_id, event)
        except SessionGateError as error:
            raise gateway_error(error) from None
        raise RequestError(-32603, "the gateway ended the turn without a result", {"sessionId": session_id})

    async def cancel(self, session_id: str, **_: Any) -> None:
        try:
            await self._client.cancel_prompt(session_id)
        except SessionGateError as error:  # a notification: nobody to answer, so say it in the log
            log.warning("session/cancel failed session=%s: %s", session_id, error)

    async def _send(self, session_id: str, event: pb.PromptEvent) -> None:
        update = acp_updates.session_update(event)
        if update is not None:
            await self._notify(session_id, update)

    async def _notify(self, session_id: str, update: dict[str, Any]) -> None:
        """One `session/update`, checked against the SDK's models where it knows the kind."""
        try:
            notification = schema.SessionNotification.model_validate(
                {"sessionId": session_id, "update": update}
            )
        except ValidationError:  # a kind this SDK does not know: passed on as the agent sent it
            await self._conn._conn.send_notification(
                "session/update", {"sessionId": session_id, "update": update}
            )
            return
        await self._conn.session_update(session_id=session_id, update=notification.update)

    def _follow(self, session_id: str, turn_id: str, after_seq: int) -> None:
        """Pass a running turn's live events on (WatchTurn after what was replayed) until it ends;
        a watch never takes the session, so this editor may prompt once the turn is over."""

        async def follow() -> None:
            try:
                async for event in self._client.watch_turn(session_id, after_seq, turn_id):
                    await self._send(session_id, event)
            except SessionGateError as error:
                log.warning("following the running turn of session %s ended: %s", session_id, error)

        task = asyncio.get_running_loop().create_task(follow())
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def _replay(self, session_id: str) -> tuple[str, int] | None:
        """The session's stored turns, oldest first, as the notifications they were: each prompt
        as user message chunks, then its events. Returns the running turn's id and the last seq
        replayed of it, if one runs."""
        turns = []
        async for turn in self._client.list_turns(session_id):
            turns.append(turn)
            if len(turns) >= MAX_REPLAYED_TURNS:
                break
        for summary in reversed(turns):
            for block in summary.prompt:
                user = {"sessionUpdate": "user_message_chunk", "content": acp_updates.content_block(block)}
                await self._notify(session_id, user)
            after = 0
            while True:
                turn = await self._client.get_turn(session_id, summary.turn_id, after)
                for event in turn.events:
                    await self._send(session_id, event)
                    after = event.seq
                if not turn.events_truncated or not turn.events:
                    break
            if turn.state == pb.TURN_STATE_RUNNING and summary is turns[0]:
                return summary.turn_id, after
        return None

    async def _ask_permission(self, session_id: str, request: pb.PermissionRequest) -> str | None:
        tool_call = schema.ToolCallUpdate.model_validate(acp_updates.tool_call_fields(request.tool_call))
        options = [
            schema.PermissionOption.model_validate({"optionId": o.option_id, "name": o.name, "kind": o.kind})
            for o in request.options
        ]
        response = await self._conn.request_permission(
            session_id=session_id, tool_call=tool_call, options=options
        )
        outcome = response.outcome
        return getattr(outcome, "option_id", None) if getattr(outcome, "outcome", "") == "selected" else None

    async def _ask_elicitation(self, session_id: str, request: pb.ElicitationRequest) -> Any:
        if not self._elicitation:
            return "decline"  # the editor did not say it answers elicitations
        from google.protobuf import json_format

        mode: Any
        if request.mode == "url":
            mode = schema.ElicitationUrlSessionMode.model_validate(
                {"sessionId": session_id, "elicitationId": request.request_id, "url": request.url}
            )
        else:
            mode = schema.ElicitationFormSessionMode.model_validate(
                {
                    "sessionId": session_id,
                    "requestedSchema": json_format.MessageToDict(request.requested_schema),
                }
            )
        response = await self._conn.create_elicitation(message=request.message, mode=mode)
        action = getattr(response, "action", "decline")
        return (action, getattr(response, "content", None)) if action == "accept" else action


def _session_state(session: pb.Session) -> dict[str, Any]:
    state: dict[str, Any] = {}
    modes = acp_updates.modes(session)
    if modes is not None:
        state["modes"] = schema.SessionModeState.model_validate(modes)
    if session.config_options:
        response = schema.NewSessionResponse.model_validate(
            {"sessionId": "x", "configOptions": acp_updates.config_options(session.config_options)}
        )
        state["config_options"] = response.config_options
    return state


def _mcp_server(server: Any) -> ClientMcpServer:
    """An editor's MCP server (ACP's shape) as the gateway takes it from a client."""
    data = server.model_dump(mode="json", by_alias=True, exclude_none=True)
    kind = data.get("type", "stdio")
    if kind == "http":
        return McpHttpServer(
            data["name"], data["url"], {h["name"]: h["value"] for h in data.get("headers", [])}
        )
    if kind == "sse":
        return McpSseServer(
            data["name"], data["url"], {h["name"]: h["value"] for h in data.get("headers", [])}
        )
    env = {e["name"]: e["value"] for e in data.get("env", [])}
    return McpStdioServer(data["name"], data["command"], tuple(data.get("args", [])), env)


def _version() -> str:
    from sessiongate.client.cli import version

    return version()


async def serve(opts: argparse.Namespace) -> int:
    """Run the front door on stdin/stdout until the editor closes it."""
    labels = dict(label.split("=", 1) for label in opts.label or ())
    tls = {"tls_ca": opts.tls_ca, "client_cert": opts.tls_cert, "client_key": opts.tls_key}
    client = AsyncSessionClient(opts.target, token=opts.token or None, **tls)
    try:
        door = FrontDoor(
            client,
            agent=opts.agent or "",
            labels=labels,
            permission_policy=opts.permission_policy,
            target=opts.target,
        )
        await acp.run_agent(cast(acp.Agent, door), use_unstable_protocol=True)
    finally:
        await client.close()
    return 0


def run(opts: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="sessiongate acp: %(message)s")
    if not _speaks_on_stdin():
        print(
            "sessiongate acp speaks ACP on its stdin and stdout: an editor or ACP client starts it "
            "(its stdin a pipe or a terminal, not a file or /dev/null)",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(serve(opts))


def _speaks_on_stdin() -> bool:
    """Whether stdin can carry ACP: a pipe, a socket or a terminal (asyncio cannot watch a file)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(0)
