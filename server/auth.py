"""The auth interceptor: every call names its principal, or ends UNAUTHENTICATED before the
handler runs (the shape of grpc's own examples/python/auth).

Clients send `authorization: Bearer <token>`. Health is always public (probes carry no
token); reflection is public only when configured so. A call that fails authentication gets
one status whatever was wrong (no header, another scheme, an unknown token), so it gives an
attacker no hint. The principal is set in a context variable for the handler, and every call
leaves one line on the `sessiongate.audit` logger: principal, RPC, session, status code;
never a token or a prompt.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from server import principals
from server.errors import Unauthenticated, clip
from server.principals import Principal, TokenTable

audit = logging.getLogger("sessiongate.audit")

HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection."


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenTable, public_reflection: bool = False) -> None:
        self._tokens = tokens
        self._public_reflection = public_reflection

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(HEALTH):
            return handler
        if self._public_reflection and method.startswith(REFLECTION):
            return handler
        principal = self._authenticate(details.invocation_metadata or ())
        return _wrapped(handler, method, principal)

    def _authenticate(self, metadata: Iterable[Any]) -> Principal | None:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return self._tokens.principal(token.strip())
        return None


def _wrapped(
    handler: grpc.RpcMethodHandler, method: str, principal: Principal | None
) -> grpc.RpcMethodHandler:
    """The same handler, run as `principal` (or refused), and audited."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Call(method, principal, request, context):
                await _admit(principal, context)
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(method, principal, request, context):
                await _admit(principal, context)
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if handler.stream_stream is not None:
        inner_bidi = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(method, principal, None, context):
                await _admit(principal, context)
                async for response in inner_bidi(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
    inner_upload = handler.stream_unary

    async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        with _Call(method, principal, None, context):
            await _admit(principal, context)
            return await inner_upload(requests, context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, **options)


async def _admit(principal: Principal | None, context: grpc.aio.ServicerContext) -> None:
    if principal is None:
        status = Unauthenticated("missing or invalid credentials").to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
    else:
        principals.acting_as(principal)  # this call's task only


class _Call:
    """Audits one call when it ends: who, what, which session, how it ended."""

    def __init__(
        self, method: str, principal: Principal | None, request: Any, context: grpc.aio.ServicerContext
    ) -> None:
        self._method = method
        self._who = "-" if principal is None else principal.name or "-"
        self._session = clip(getattr(request, "session_id", "") or "-", 64)
        self._context = context

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        code = self._context.code()
        if isinstance(code, grpc.StatusCode):
            name = code.name
        elif code is None:  # nothing set: it ended normally, or its client went away
            name = "CANCELLED" if kind is not None and kind.__name__ == "CancelledError" else "OK"
        else:
            name = str(code)
        audit.info(
            "call principal=%s rpc=%s session=%s code=%s", self._who, self._method, self._session, name
        )
