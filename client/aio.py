"""AsyncSessionClient: the sessiongate API for asyncio code (grpc.aio)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.client._common import (
    GONE,
    REATTACH_TIMEOUT,
    Answer,
    AsyncElicitationCallback,
    AsyncPermissionCallback,
    Metadata,
    Reattach,
    Reply,
    answer_request,
    bearer,
    channel_options,
    config_value,
    create_request,
    deadline_after,
    list_request,
    prompt_request,
    question,
    respond_elicitation_request,
    routed,
    tls_credentials,
    turn_id_of,
    watch_request,
)
from sessiongate.client.errors import InvalidRequest, from_rpc_error
from sessiongate.client.mcp import ClientMcpServer
from sessiongate.client.tools import (
    ClientToolDeclaration,
    ServedTools,
    ToolHandler,
    ToolValue,
    answered,
    failed,
    refused,
    respond_tool_call_request,
    tool_input,
)
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

UNARY_TIMEOUT = 30.0  # seconds, for calls that do no agent work
CREATE_TIMEOUT = 90.0  # CreateSession starts an agent (the server bounds that by its start timeout)


class AsyncTurnEvents(AsyncGenerator[pb.PromptEvent, None]):
    """The events of one turn, from `prompt` or `watch_turn`: an async generator (iterate it
    with `async for`; `aclose()` stops early) that also says where its reader is.

    `session_id`; `turn_id`: the turn's id, from the `sessiongate-turn-id` header ("" until
    it came); `last_seq`: the seq of the last event yielded (the `after_seq` to re-attach
    with: `watch_turn(session_id, events.last_seq, events.turn_id)`).
    """

    def __init__(self, session_id: str, turn_id: str = "", after_seq: int = 0) -> None:
        self.session_id = session_id
        self.turn_id = turn_id
        self.last_seq = after_seq
        self._events: AsyncGenerator[pb.PromptEvent, None] | None = None

    def _bind(self, events: AsyncGenerator[pb.PromptEvent, None]) -> None:
        self._events = events

    @property
    def _generator(self) -> AsyncGenerator[pb.PromptEvent, None]:
        assert self._events is not None
        return self._events

    def __aiter__(self) -> AsyncTurnEvents:
        return self

    async def __anext__(self) -> pb.PromptEvent:
        return await self._generator.__anext__()

    async def asend(self, value: None) -> pb.PromptEvent:
        return await self._generator.asend(value)

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> pb.PromptEvent:
        return await self._generator.athrow(typ, val, tb)

    async def aclose(self) -> None:
        await self._generator.aclose()


class AsyncSessionClient:
    """A connection to one sessiongate server.

    `target` is a gRPC target ("localhost:50051", "dns:///gate.internal:443"). Pass
    `credentials` (grpc.ssl_channel_credentials(...)), or `tls_ca` (a PEM file of the CA to
    trust) and for mTLS `client_cert`/`client_key`, for TLS, and `metadata` to send with
    every call (e.g. a header for a proxy in front of the server), and `token` for a server
    with authentication (sent as `authorization: Bearer <token>`). Failed
    calls raise the subclasses of `client.errors.SessionGateError`.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        options: Iterable[tuple[str, Any]] = (),
        token: str | None = None,
        tls_ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> None:
        opts = channel_options(options)
        credentials = tls_credentials(credentials, tls_ca, client_cert, client_key)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, opts)
        )
        self._stub = pb_grpc.SessionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (*metadata, *bearer(token))
        self._tools = ServedTools()

    async def __aenter__(self) -> AsyncSessionClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=routed(self._metadata, request), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def create_session(
        self,
        agent: str = "",
        cwd: str = "",
        *,
        request_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        mcp_servers: Sequence[str] = (),
        client_mcp_servers: Sequence[ClientMcpServer] = (),
        client_tools: Sequence[ClientToolDeclaration] = (),
        timeout: float = CREATE_TIMEOUT,
    ) -> pb.Session:
        """Start a session on `agent` (default: the server's). A request_id is generated when
        none is given, so the transparent retries of a lost response never create two.

        `mcp_servers`: names of the server's operator-named MCP servers to give the agent, on
        top of its own (the session's `mcp_servers` lists them all). An unknown name raises
        InvalidRequest, one the principal may not use McpServerNotAllowed, an http/sse one the
        agent cannot reach McpTransportUnsupported.

        `client_mcp_servers`: MCP servers of your own, as `McpStdioServer(name, command, args,
        env)`, `McpHttpServer(name, url, headers)` or `McpSseServer(name, url, headers)` (or
        `pb.McpServer` messages; `load_mcp_config(path)` reads an editor's `mcpServers` JSON
        file into them). Your principal must be allowed them (the tokens file's
        `client_mcp_servers = true`, else McpServerNotAllowed without `metadata['server']`); a
        bad one raises InvalidRequest (`.violations['client_mcp_servers[i]...']`). Env and
        header values are sent once, kept encrypted by the server and never shown again: the
        session lists these servers by name and transport (source "request").

        `client_tools`: functions of yours the agent may call, as `Tool(name, handler,
        description, input_schema)` (the agent sees them as the MCP server `client_tools`).
        This client remembers the handlers for the new session: its `prompt` and `watch_turn`
        streams answer each `tool_request` of them for you (see `serve_tools`)."""
        request = create_request(
            agent, cwd, request_id, labels, mcp_servers, client_mcp_servers, client_tools
        )
        session: pb.Session = await self._call(self._stub.CreateSession, request, timeout)
        self._tools.remember(session.session_id, client_tools)
        return session

    def serve_tools(self, session_id: str, tools: Sequence[ClientToolDeclaration]) -> None:
        """Answer the calls of these tools of an existing session (created by another client
        object, or before a restart) in this client's streams from now on, by their handlers."""
        self._tools.remember(session_id, tools)

    def prompt(
        self,
        session_id: str,
        text: str = "",
        *,
        content: Sequence[pb.ContentBlock] = (),
        stall_timeout: float | None = None,
        wait_timeout: float | None = None,
        permission_policy: str | None = None,
        permission_timeout: float | None = None,
        on_permission: AsyncPermissionCallback | None = None,
        on_elicitation: AsyncElicitationCallback | None = None,
        on_disconnect: str | int | None = None,
        reattach_timeout: float = REATTACH_TIMEOUT,
        timeout: float | None = None,
    ) -> AsyncTurnEvents:
        """Run one turn, yielding its events; the last is the `result`.

        Returns an `AsyncTurnEvents`: iterate it (`async for`); its `turn_id` (from the
        `sessiongate-turn-id` header, once the turn started) and `last_seq` (the last event
        yielded) say where to re-attach with `watch_turn`.

        `on_disconnect`: what becomes of the turn when this call ends before the turn does.
        "cancel" (or None, the default) cancels it upstream: stopping the iteration early,
        a lost connection or the `timeout` cancels the turn. "continue"
        (ON_DISCONNECT_CONTINUE) leaves it running, its events kept: stopping the iteration
        early then only stops reading (end the turn with `cancel_prompt`), and when the
        stream fails with a transport failure (UNAVAILABLE with no sessiongate reason: the
        connection dropped, the server could not be reached) the iteration re-attaches by
        itself with WatchTurn from the last event it yielded, so no event is lost or
        repeated. It retries with a backoff (0.2 s doubling up to 2 s) for at most
        `reattach_timeout` seconds per outage (0: never), then raises the last error; an
        outage ends with the next event, or once a re-attached stream stays up 5 s. A
        failure before the turn's id came (the turn may not have started) is raised as is.

        `timeout` is the client's own deadline for the whole turn, re-attaches included (the
        server also bounds turns by its stall timeout and maximum turn duration).

        `permission_policy` decides this turn's permission requests: "approve-all",
        "approve-reads", "deny-all" or "ask" (the client answers); None or "" means the
        agent's own policy, except that passing `on_permission` or `on_elicitation` means
        "ask". `permission_timeout`: seconds a question waits for an answer under `ask`.

        `on_permission(request: PermissionRequest)` is called for every `permission_request`
        event (in a task of its own, while the stream goes on; it may be a coroutine
        function) and returns the option_id to answer with, or None to leave the request
        to someone else (`respond_permission`, or the timeout). `on_elicitation(request:
        ElicitationRequest)` likewise returns a dict (accept with that content), an action
        ("accept", "decline", "cancel"), an (action, content) pair, or None. An answer that
        comes too late (expired, cancelled) is ignored; any other failure of a callback or
        of its answer ends the iteration with that error and cancels the turn (unless it
        continues on disconnect).
        """
        request = prompt_request(
            session_id,
            text,
            content,
            stall_timeout,
            wait_timeout,
            permission_policy,
            permission_timeout,
            answering=on_permission is not None or on_elicitation is not None,
            on_disconnect=on_disconnect,
        )
        resumable = request.on_disconnect == pb.ON_DISCONNECT_CONTINUE
        events = AsyncTurnEvents(session_id)
        events._bind(
            self._stream(
                events,
                lambda deadline: self._stub.Prompt(
                    request, metadata=routed(self._metadata, request), timeout=deadline
                ),
                timeout,
                reattach_timeout if resumable else 0,
                on_permission,
                on_elicitation,
            )
        )
        return events

    def watch_turn(
        self,
        session_id: str,
        after_seq: int = 0,
        turn_id: str = "",
        *,
        reattach_timeout: float = REATTACH_TIMEOUT,
        timeout: float | None = None,
    ) -> AsyncTurnEvents:
        """A turn's events with `seq > after_seq`: what it sent so far, then the live rest,
        ending with its `result` (or raising the error its Prompt stream ended with).
        `turn_id` "" means the running turn, else the last one; the returned
        `AsyncTurnEvents.turn_id` then names the turn watched.

        Watching never takes the session nor cancels the turn: stopping early just stops
        reading. After a transport failure (UNAVAILABLE with no sessiongate reason) the
        iteration re-attaches by itself after the last event it yielded, as `prompt` does
        for a turn that continues on disconnect (at most `reattach_timeout` seconds per
        outage; 0: never). `timeout`: a deadline for the whole watch. Calls of the tools this
        client serves are answered for you, as in `prompt` (each once per client object).

        TurnNotFound: no such turn; SeqNotKept: `after_seq` is older than what is kept (see
        `metadata['oldest_kept_seq']`) or past the last event; TurnInterrupted: the server
        stopped during the turn (after its stored events)."""
        events = AsyncTurnEvents(session_id, turn_id, after_seq)
        request = watch_request(session_id, after_seq, turn_id)
        events._bind(
            self._stream(
                events,
                lambda deadline: self._stub.WatchTurn(
                    request, metadata=routed(self._metadata, request), timeout=deadline
                ),
                timeout,
                reattach_timeout,
                None,
                None,
            )
        )
        return events

    async def _stream(
        self,
        events: AsyncTurnEvents,
        start: Callable[[float | None], Any],
        timeout: float | None,
        reattach_timeout: float,
        on_permission: AsyncPermissionCallback | None,
        on_elicitation: AsyncElicitationCallback | None,
    ) -> AsyncGenerator[pb.PromptEvent, None]:
        """A turn's events from the call `start(timeout)` makes, re-attaching with WatchTurn
        after transport failures while `reattach_timeout` allows (see `Reattach`)."""
        reattach = Reattach(reattach_timeout, deadline_after(timeout))
        call = start(timeout)
        attached = False
        answers: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    if not attached:  # the headers come before any event (or with the failure)
                        turn_id = turn_id_of(await call.initial_metadata())
                        if turn_id:
                            events.turn_id = events.turn_id or turn_id
                            attached = True
                            reattach.attached()
                    event = await self._next_event(call, answers)
                except grpc.aio.AioRpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
                    delay = reattach.delay(error, events.turn_id)
                    if delay is None:
                        raise error from None
                    await asyncio.sleep(delay)
                    request = watch_request(events.session_id, events.last_seq, events.turn_id)
                    call = self._stub.WatchTurn(
                        request, metadata=routed(self._metadata, request), timeout=reattach.remaining()
                    )
                    attached = False
                    continue
                if event is grpc.aio.EOF:
                    return
                if event.seq <= events.last_seq:
                    continue  # yielded before a re-attach (WatchTurn never repeats one: a guard)
                asked = question(event, on_permission, on_elicitation)
                if asked is not None:
                    answers.add(asyncio.create_task(self._ask(events.session_id, *asked)))
                served = self._tools.take(events.session_id, event)
                if served is not None:
                    answers.add(asyncio.create_task(self._serve_tool(events.session_id, *served)))
                events.last_seq = event.seq
                reattach.progressed()
                yield event
        finally:
            call.cancel()  # no-op when the stream already ended
            for task in answers:  # the turn is over: nobody waits for these answers any more
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: a second failure is not logged as unhandled

    @staticmethod
    async def _next_event(call: Any, answers: set[asyncio.Task[None]]) -> Any:
        """The stream's next event (or EOF), failing as soon as an answer task fails."""
        _reap(answers)
        if not answers:
            return await call.read()
        read = asyncio.ensure_future(call.read())
        try:
            while not read.done():
                await asyncio.wait({read, *answers}, return_when=asyncio.FIRST_COMPLETED)
                _reap(answers)
        finally:
            if not read.done():
                read.cancel()
        return read.result()

    async def _ask(self, session_id: str, callback: Any, asked: Any) -> None:
        result = callback(asked)
        if inspect.isawaitable(result):
            result = await result
        answer = answer_request(session_id, asked, result)
        if answer is not None:
            await self._answer(answer)

    async def _answer(self, answer: Answer) -> None:
        method = (
            self._stub.RespondPermission
            if isinstance(answer, pb.RespondPermissionRequest)
            else self._stub.RespondElicitation
        )
        with contextlib.suppress(*GONE):
            await self._call(method, answer, UNARY_TIMEOUT)

    async def _serve_tool(self, session_id: str, handler: ToolHandler, request: pb.ToolRequest) -> None:
        """Answer a tool call with its handler's result, or with the error it raised."""
        try:
            answer = answered(session_id, request, await _run_handler(handler, tool_input(request)))
        except Exception as error:  # the handler's failure is the agent's, not this stream's
            answer = failed(session_id, request, error)
        try:
            with contextlib.suppress(*GONE):
                await self._call(self._stub.RespondToolCall, answer, UNARY_TIMEOUT)
        except InvalidRequest as error:  # the result is too large: the agent gets an error instead
            instead = refused(answer, error.message)
            if instead is None:
                raise
            with contextlib.suppress(*GONE):
                await self._call(self._stub.RespondToolCall, instead, UNARY_TIMEOUT)

    async def reply(self, session_id: str, text: str = "", **options: Any) -> tuple[str, pb.TurnResult]:
        """Run one turn and return its whole reply text and its result (options as for prompt)."""
        reply = Reply()
        async for event in self.prompt(session_id, text, **options):
            reply.add(event)
        return reply.text, reply.result

    async def respond_permission(
        self, session_id: str, request_id: str, option_id: str, *, timeout: float = UNARY_TIMEOUT
    ) -> int:
        """Answer a `permission_request` event with one of its options; returns the
        PermissionOutcome (ALLOWED, REJECTED). RequestNotFound for an unknown request,
        RequestAnswered when it was already answered, expired or cancelled."""
        request = pb.RespondPermissionRequest(
            session_id=session_id, request_id=request_id, option_id=option_id
        )
        response = await self._call(self._stub.RespondPermission, request, timeout)
        return int(response.outcome)

    async def respond_elicitation(
        self,
        session_id: str,
        request_id: str,
        action: str | int,
        content: Mapping[str, Any] | None = None,
        *,
        timeout: float = UNARY_TIMEOUT,
    ) -> None:
        """Answer an `elicitation_request` event: "accept" (with `content` fitting its
        schema), "decline" or "cancel" (or the ElicitationAction enum)."""
        request = respond_elicitation_request(session_id, request_id, action, content)
        await self._call(self._stub.RespondElicitation, request, timeout)

    async def respond_tool_call(
        self,
        session_id: str,
        request_id: str,
        result: ToolValue = None,
        *,
        error: str | None = None,
        timeout: float = UNARY_TIMEOUT,
    ) -> None:
        """Answer a `tool_request` event by hand: with `result` (text, or a dict: structured
        content and its JSON text; None: empty text), or with `error`, the text the agent gets
        as a failed call. RequestNotFound for an unknown request, RequestAnswered when it was
        already answered, timed out or cancelled; InvalidRequest for an answer over 1 MiB."""
        request = respond_tool_call_request(session_id, request_id, result, error)
        await self._call(self._stub.RespondToolCall, request, timeout)

    async def set_mode(self, session_id: str, mode_id: str, *, timeout: float = CREATE_TIMEOUT) -> pb.Session:
        """Switch the session to one of `session.modes.available_modes`; returns the session."""
        request = pb.SetSessionModeRequest(session_id=session_id, mode_id=mode_id)
        return await self._call(self._stub.SetSessionMode, request, timeout)

    async def set_config_option(
        self, session_id: str, config_id: str, value: bool | str, *, timeout: float = CREATE_TIMEOUT
    ) -> pb.Session:
        """Set one of `session.config_options` (a select option's value, or a bool for a
        boolean option); returns the session."""
        request = pb.SetSessionConfigOptionRequest(
            session_id=session_id, config_id=config_id, value=config_value(value)
        )
        return await self._call(self._stub.SetSessionConfigOption, request, timeout)

    async def authenticate_agent(
        self, agent: str, method_id: str, *, timeout: float = CREATE_TIMEOUT
    ) -> pb.AuthenticateAgentResponse:
        """Authenticate `agent` ("" = the default) with one of its auth methods; its later
        processes authenticate the same way (admins only on a server with authentication)."""
        request = pb.AuthenticateAgentRequest(agent=agent, method_id=method_id)
        return await self._call(self._stub.AuthenticateAgent, request, timeout)

    async def cancel_prompt(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> bool:
        """Cancel the running turn; False when none was running."""
        response = await self._call(
            self._stub.CancelPrompt, pb.CancelPromptRequest(session_id=session_id), timeout
        )
        return bool(response.cancelled)

    async def get_session(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> pb.Session:
        return await self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id), timeout)

    async def list_sessions(
        self,
        *,
        agent: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float = UNARY_TIMEOUT,
    ) -> AsyncIterator[pb.Session]:
        """Every matching session, oldest first, fetching pages as needed."""
        token = ""
        while True:
            request = list_request(agent, labels, page_size, token)
            page = await self._call(self._stub.ListSessions, request, timeout)
            for session in page.sessions:
                yield session
            token = page.next_page_token
            if not token:
                return

    async def list_turns(
        self, session_id: str, *, page_size: int = 0, page_token: str = "", timeout: float = UNARY_TIMEOUT
    ) -> AsyncIterator[pb.Turn]:
        """The session's turns, newest first, without their events (see `get_turn`), fetching
        pages of `page_size` (0: the server's default) as needed, from `page_token` (a
        ListTurns `next_page_token`; "" for the newest)."""
        token = page_token
        while True:
            request = pb.ListTurnsRequest(session_id=session_id, page_size=page_size, page_token=token)
            page = await self._call(self._stub.ListTurns, request, timeout)
            for turn in page.turns:
                yield turn
            token = page.next_page_token
            if not token:
                return

    async def get_turn(
        self, session_id: str, turn_id: str, after_seq: int = 0, *, timeout: float = UNARY_TIMEOUT
    ) -> pb.Turn:
        """One turn: its prompt, state, timings, result or error, and a page of its events
        with `seq > after_seq` (0: from the oldest kept). While `events_truncated`, ask again
        with `after_seq` = the last event's seq. TurnNotFound when the session has no such turn."""
        request = pb.GetTurnRequest(session_id=session_id, turn_id=turn_id, after_seq=after_seq)
        return await self._call(self._stub.GetTurn, request, timeout)

    async def close_session(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> pb.Session:
        response = await self._call(
            self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), timeout
        )
        self._tools.forget(session_id)
        return response.session

    async def list_agents(self, *, timeout: float = UNARY_TIMEOUT) -> pb.ListAgentsResponse:
        return await self._call(self._stub.ListAgents, pb.ListAgentsRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float = UNARY_TIMEOUT) -> str:
        """The server's health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN."""
        response = await self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def _run_handler(handler: ToolHandler, arguments: dict[str, Any]) -> Any:
    """A handler's return value: a coroutine function awaited, a plain one run in a thread so
    that it does not block the event loop (and an awaitable it returns awaited)."""
    if inspect.iscoroutinefunction(handler):
        value = await handler(arguments)
    else:
        value = await asyncio.to_thread(handler, arguments)
    if inspect.isawaitable(value):
        value = await value
    return value


def _reap(answers: set[asyncio.Task[None]]) -> None:
    """Forget finished answer tasks; raise the first one's failure."""
    for task in [t for t in answers if t.done()]:
        answers.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
