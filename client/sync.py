"""SessionClient: the sessiongate API for plain (blocking) Python code."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from client._common import (
    GONE,
    Answer,
    ElicitationCallback,
    Metadata,
    PermissionCallback,
    Reply,
    answer_request,
    bearer,
    channel_options,
    config_value,
    create_request,
    list_request,
    prompt_request,
    question,
    respond_elicitation_request,
    tls_credentials,
)
from client.aio import CREATE_TIMEOUT, UNARY_TIMEOUT
from client.errors import from_rpc_error


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

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def create_session(
        self,
        agent: str = "",
        cwd: str = "",
        *,
        request_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float = CREATE_TIMEOUT,
    ) -> pb.Session:
        """See AsyncSessionClient.create_session."""
        return self._call(self._stub.CreateSession, create_request(agent, cwd, request_id, labels), timeout)

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
        timeout: float | None = None,
    ) -> Generator[pb.PromptEvent, None, None]:
        """See AsyncSessionClient.prompt. Closing the iterator early cancels the turn.

        The callbacks are plain functions, called in the iterating thread when the iteration
        resumes after yielding the question's event (events arriving meanwhile are buffered).
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
        )
        call = self._stub.Prompt(request, metadata=self._metadata, timeout=timeout)
        try:
            for event in call:
                yield event
                asked = question(event, on_permission, on_elicitation)
                if asked is not None:
                    callback, message = asked
                    answer = answer_request(session_id, message, callback(message))
                    if answer is not None:
                        self._answer(answer)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
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

    def close_session(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> pb.Session:
        response = self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), timeout)
        return response.session

    def list_agents(self, *, timeout: float = UNARY_TIMEOUT) -> pb.ListAgentsResponse:
        return self._call(self._stub.ListAgents, pb.ListAgentsRequest(), timeout)

    def health(self, service: str = "", *, timeout: float = UNARY_TIMEOUT) -> str:
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
