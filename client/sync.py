"""SessionClient: the sessiongate API for plain (blocking) Python code."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.client._common import (
    GONE,
    REATTACH_TIMEOUT,
    Answer,
    ElicitationCallback,
    Metadata,
    PermissionCallback,
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
from sessiongate.client.aio import CREATE_TIMEOUT, UNARY_TIMEOUT
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


class TurnEvents(Generator[pb.PromptEvent, None, None]):
    """The blocking twin of `AsyncTurnEvents`: a generator of one turn's events (`close()`
    stops early) with its `session_id`, `turn_id` and `last_seq`."""

    def __init__(self, session_id: str, turn_id: str = "", after_seq: int = 0) -> None:
        self.session_id = session_id
        self.turn_id = turn_id
        self.last_seq = after_seq
        self._events: Generator[pb.PromptEvent, None, None] | None = None

    def _bind(self, events: Generator[pb.PromptEvent, None, None]) -> None:
        self._events = events

    @property
    def _generator(self) -> Generator[pb.PromptEvent, None, None]:
        assert self._events is not None
        return self._events

    def __iter__(self) -> TurnEvents:
        return self

    def __next__(self) -> pb.PromptEvent:
        return next(self._generator)

    def send(self, value: None) -> pb.PromptEvent:
        return self._generator.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> pb.PromptEvent:
        return self._generator.throw(typ, val, tb)

    def close(self) -> None:
        self._generator.close()


class SessionClient:
    """The blocking twin of `AsyncSessionClient`: same methods, same errors."""

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
            grpc.secure_channel(target, credentials, opts)
            if credentials is not None
            else grpc.insecure_channel(target, opts)
        )
        self._stub = pb_grpc.SessionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (*metadata, *bearer(token))
        self._tools = ServedTools()

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, metadata=routed(self._metadata, request), timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def create_session(
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
        """See AsyncSessionClient.create_session. The tools' handlers are plain functions."""
        request = create_request(
            agent, cwd, request_id, labels, mcp_servers, client_mcp_servers, client_tools
        )
        session: pb.Session = self._call(self._stub.CreateSession, request, timeout)
        self._tools.remember(session.session_id, client_tools)
        return session

    def serve_tools(self, session_id: str, tools: Sequence[ClientToolDeclaration]) -> None:
        """See AsyncSessionClient.serve_tools."""
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
        on_permission: PermissionCallback | None = None,
        on_elicitation: ElicitationCallback | None = None,
        on_disconnect: str | int | None = None,
        reattach_timeout: float = REATTACH_TIMEOUT,
        timeout: float | None = None,
    ) -> TurnEvents:
        """See AsyncSessionClient.prompt. Closing the iterator early cancels the turn (unless
        `on_disconnect="continue"`: then it runs on, and a transport failure re-attaches).

        The callbacks are plain functions, called in the iterating thread when the iteration
        resumes after yielding the question's event (events arriving meanwhile are buffered);
        so are the handlers of the tools this client serves, whose calls it answers for you.
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
        events = TurnEvents(session_id)
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
    ) -> TurnEvents:
        """See AsyncSessionClient.watch_turn."""
        events = TurnEvents(session_id, turn_id, after_seq)
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

    def _stream(
        self,
        events: TurnEvents,
        start: Callable[[float | None], Any],
        timeout: float | None,
        reattach_timeout: float,
        on_permission: PermissionCallback | None,
        on_elicitation: ElicitationCallback | None,
    ) -> Generator[pb.PromptEvent, None, None]:
        """See AsyncSessionClient._stream."""
        reattach = Reattach(reattach_timeout, deadline_after(timeout))
        call = start(timeout)
        attached = False
        try:
            while True:
                try:
                    if not attached:  # the headers come before any event (or with the failure)
                        turn_id = turn_id_of(call.initial_metadata())
                        if turn_id:
                            events.turn_id = events.turn_id or turn_id
                            attached = True
                            reattach.attached()
                    event = next(call)
                except StopIteration:
                    return
                except grpc.RpcError as rpc_error:
                    error = from_rpc_error(rpc_error)
                    delay = reattach.delay(error, events.turn_id)
                    if delay is None:
                        raise error from None
                    time.sleep(delay)
                    request = watch_request(events.session_id, events.last_seq, events.turn_id)
                    call = self._stub.WatchTurn(
                        request, metadata=routed(self._metadata, request), timeout=reattach.remaining()
                    )
                    attached = False
                    continue
                if event.seq <= events.last_seq:
                    continue  # yielded before a re-attach (WatchTurn never repeats one: a guard)
                events.last_seq = event.seq
                reattach.progressed()
                yield event
                asked = question(event, on_permission, on_elicitation)
                if asked is not None:
                    callback, message = asked
                    answer = answer_request(events.session_id, message, callback(message))
                    if answer is not None:
                        self._answer(answer)
                served = self._tools.take(events.session_id, event)
                if served is not None:
                    self._serve_tool(events.session_id, *served)
        finally:
            call.cancel()

    def _answer(self, answer: Answer) -> None:
        method = (
            self._stub.RespondPermission
            if isinstance(answer, pb.RespondPermissionRequest)
            else self._stub.RespondElicitation
        )
        with contextlib.suppress(*GONE):
            self._call(method, answer, UNARY_TIMEOUT)

    def _serve_tool(self, session_id: str, handler: ToolHandler, request: pb.ToolRequest) -> None:
        """See AsyncSessionClient._serve_tool (the handler runs in this thread)."""
        try:
            value = handler(tool_input(request))
            if inspect.iscoroutine(value):  # an async handler needs AsyncSessionClient
                value.close()
                raise TypeError("an async tool handler needs AsyncSessionClient")
            answer = answered(session_id, request, value)
        except Exception as error:  # the handler's failure is the agent's, not this stream's
            answer = failed(session_id, request, error)
        try:
            with contextlib.suppress(*GONE):
                self._call(self._stub.RespondToolCall, answer, UNARY_TIMEOUT)
        except InvalidRequest as error:  # the result is too large: the agent gets an error instead
            instead = refused(answer, error.message)
            if instead is None:
                raise
            with contextlib.suppress(*GONE):
                self._call(self._stub.RespondToolCall, instead, UNARY_TIMEOUT)

    def reply(self, session_id: str, text: str = "", **options: Any) -> tuple[str, pb.TurnResult]:
        """Run one turn and return its whole reply text and its result (options as for prompt)."""
        reply = Reply()
        for event in self.prompt(session_id, text, **options):
            reply.add(event)
        return reply.text, reply.result

    def respond_permission(
        self, session_id: str, request_id: str, option_id: str, *, timeout: float = UNARY_TIMEOUT
    ) -> int:
        """See AsyncSessionClient.respond_permission."""
        request = pb.RespondPermissionRequest(
            session_id=session_id, request_id=request_id, option_id=option_id
        )
        return int(self._call(self._stub.RespondPermission, request, timeout).outcome)

    def respond_elicitation(
        self,
        session_id: str,
        request_id: str,
        action: str | int,
        content: Mapping[str, Any] | None = None,
        *,
        timeout: float = UNARY_TIMEOUT,
    ) -> None:
        """See AsyncSessionClient.respond_elicitation."""
        request = respond_elicitation_request(session_id, request_id, action, content)
        self._call(self._stub.RespondElicitation, request, timeout)

    def respond_tool_call(
        self,
        session_id: str,
        request_id: str,
        result: ToolValue = None,
        *,
        error: str | None = None,
        timeout: float = UNARY_TIMEOUT,
    ) -> None:
        """See AsyncSessionClient.respond_tool_call."""
        request = respond_tool_call_request(session_id, request_id, result, error)
        self._call(self._stub.RespondToolCall, request, timeout)

    def set_mode(self, session_id: str, mode_id: str, *, timeout: float = CREATE_TIMEOUT) -> pb.Session:
        """See AsyncSessionClient.set_mode."""
        request = pb.SetSessionModeRequest(session_id=session_id, mode_id=mode_id)
        return self._call(self._stub.SetSessionMode, request, timeout)

    def set_config_option(
        self, session_id: str, config_id: str, value: bool | str, *, timeout: float = CREATE_TIMEOUT
    ) -> pb.Session:
        """See AsyncSessionClient.set_config_option."""
        request = pb.SetSessionConfigOptionRequest(
            session_id=session_id, config_id=config_id, value=config_value(value)
        )
        return self._call(self._stub.SetSessionConfigOption, request, timeout)

    def authenticate_agent(
        self, agent: str, method_id: str, *, timeout: float = CREATE_TIMEOUT
    ) -> pb.AuthenticateAgentResponse:
        """See AsyncSessionClient.authenticate_agent."""
        request = pb.AuthenticateAgentRequest(agent=agent, method_id=method_id)
        return self._call(self._stub.AuthenticateAgent, request, timeout)

    def cancel_prompt(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> bool:
        response = self._call(self._stub.CancelPrompt, pb.CancelPromptRequest(session_id=session_id), timeout)
        return bool(response.cancelled)

    def get_session(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> pb.Session:
        return self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id), timeout)

    def list_sessions(
        self,
        *,
        agent: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        timeout: float = UNARY_TIMEOUT,
    ) -> Iterator[pb.Session]:
        token = ""
        while True:
            request = list_request(agent, labels, page_size, token)
            page = self._call(self._stub.ListSessions, request, timeout)
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    def list_turns(
        self, session_id: str, *, page_size: int = 0, page_token: str = "", timeout: float = UNARY_TIMEOUT
    ) -> Iterator[pb.Turn]:
        """See AsyncSessionClient.list_turns."""
        token = page_token
        while True:
            request = pb.ListTurnsRequest(session_id=session_id, page_size=page_size, page_token=token)
            page = self._call(self._stub.ListTurns, request, timeout)
            yield from page.turns
            token = page.next_page_token
            if not token:
                return

    def get_turn(
        self, session_id: str, turn_id: str, after_seq: int = 0, *, timeout: float = UNARY_TIMEOUT
    ) -> pb.Turn:
        """See AsyncSessionClient.get_turn."""
        request = pb.GetTurnRequest(session_id=session_id, turn_id=turn_id, after_seq=after_seq)
        return self._call(self._stub.GetTurn, request, timeout)

    def close_session(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> pb.Session:
        response = self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), timeout)
        self._tools.forget(session_id)
        return response.session

    def list_agents(self, *, timeout: float = UNARY_TIMEOUT) -> pb.ListAgentsResponse:
        return self._call(self._stub.ListAgents, pb.ListAgentsRequest(), timeout)

    def health(self, service: str = "", *, timeout: float = UNARY_TIMEOUT) -> str:
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
