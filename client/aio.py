"""AsyncSessionClient: the sessiongate API for asyncio code (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from client._common import (
    Metadata,
    Reply,
    bearer,
    channel_options,
    create_request,
    list_request,
    prompt_request,
    tls_credentials,
)
from client.errors import from_rpc_error

UNARY_TIMEOUT = 30.0  # seconds, for calls that do no agent work
CREATE_TIMEOUT = 90.0  # CreateSession starts an agent (the server bounds that by its start timeout)


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

    async def __aenter__(self) -> AsyncSessionClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def create_session(
        self,
        agent: str = "",
        cwd: str = "",
        *,
        request_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: float = CREATE_TIMEOUT,
    ) -> pb.Session:
        """Start a session on `agent` (default: the server's). A request_id is generated when
        none is given, so the transparent retries of a lost response never create two."""
        return await self._call(
            self._stub.CreateSession, create_request(agent, cwd, request_id, labels), timeout
        )

    async def prompt(
        self,
        session_id: str,
        text: str = "",
        *,
        content: Sequence[pb.ContentBlock] = (),
        stall_timeout: float | None = None,
        wait_timeout: float | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.PromptEvent, None]:
        """Run one turn, yielding its events; the last is the `result`.

        Stopping the iteration early cancels the turn upstream. `timeout` is the client's own
        deadline for the whole turn (the server also bounds turns by its stall timeout and
        maximum turn duration).
        """
        request = prompt_request(session_id, text, content, stall_timeout, wait_timeout)
        call = self._stub.Prompt(request, metadata=self._metadata, timeout=timeout)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # no-op when the stream already ended

    async def reply(self, session_id: str, text: str = "", **options: Any) -> tuple[str, pb.TurnResult]:
        """Run one turn and return its whole reply text and its result."""
        reply = Reply()
        async for event in self.prompt(session_id, text, **options):
            reply.add(event)
        return reply.text, reply.result

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

    async def close_session(self, session_id: str, *, timeout: float = UNARY_TIMEOUT) -> pb.Session:
        response = await self._call(
            self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), timeout
        )
        return response.session

    async def list_agents(self, *, timeout: float = UNARY_TIMEOUT) -> pb.ListAgentsResponse:
        return await self._call(self._stub.ListAgents, pb.ListAgentsRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float = UNARY_TIMEOUT) -> str:
        """The server's health status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN."""
        response = await self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
