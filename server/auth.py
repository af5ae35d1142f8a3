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

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server import principals
from server.errors import Unauthenticated, clip
from server.principals import Principal, TokenTable
from server.tls import certificate_name

audit = logging.getLogger("sessiongate.audit")

HEALTH = "/grpc.health.v1.Health/"
REPLICA_HEADER = "sessiongate-replica-token"  # a forwarding replica's shared secret (router.py)
PRINCIPAL_HEADER = "sessiongate-principal"  # ...and the principal it forwards a call for
REFLECTION = "/grpc.reflection."


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates by bearer token (`tokens`) and, with `mtls`, by client certificate."""

    def __init__(
        self,
        tokens: TokenTable | None,
        mtls: bool = False,
        public_reflection: bool = False,
        replica_token: str = "",
    ) -> None:
        self._tokens = tokens
        self._mtls = mtls
        self._public_reflection = public_reflection
        self._replica_token = replica_token.encode()

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
        return _wrapped(handler, method, self.principal)

    def principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller: a replica forwarding a call for a principal it authenticated (by the
        replicas' shared token), else a known bearer token, else a verified client certificate's
        name."""
        metadata = dict(context.invocation_metadata() or ())
        if REPLICA_HEADER in metadata:  # present: it must be right, never a fallback to the rest
            given = metadata[REPLICA_HEADER]
            if not self._replica_token or not isinstance(given, str):
                return None
            if not hmac.compare_digest(given.encode(), self._replica_token):
                return None
            name = metadata.get(PRINCIPAL_HEADER, "")
            if not isinstance(name, str):
                return None
            return self._tokens.by_name(name) if self._tokens is not None else Principal(name=name)
        if self._tokens is not None:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization" and isinstance(value, str):
                    scheme, _, token = value.partition(" ")
                    if scheme.lower() == "bearer" and token.strip():
                        return self._tokens.principal(token.strip())
        if self._mtls:
            certificates = context.auth_context().get("x509_pem_cert") or []
            if certificates:  # grpc verified it against the client CA
                name = certificate_name(certificates[0])
                if self._tokens is None:
                    return Principal(name=name) if name else None
                return self._tokens.by_name(name)  # the same table, by name
        return None


Authenticate = Callable[[grpc.aio.ServicerContext], "Principal | None"]


def _wrapped(
    handler: grpc.RpcMethodHandler, method: str, authenticate: Authenticate
) -> grpc.RpcMethodHandler:
    """The same handler, run as the caller's principal (or refused), and audited."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Call(method, request, context) as call:
                await _admit(call, authenticate(context), context)
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(method, request, context) as call:
                await _admit(call, authenticate(context), context)
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if handler.stream_stream is not None:
        inner_bidi = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(method, None, context) as call:
                await _admit(call, authenticate(context), context)
                async for response in inner_bidi(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
    inner_upload = handler.stream_unary

    async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        with _Call(method, None, context) as call:
            await _admit(call, authenticate(context), context)
            return await inner_upload(requests, context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, **options)


async def _admit(call: _Call, principal: Principal | None, context: grpc.aio.ServicerContext) -> None:
    call.who = "-" if principal is None else principal.name or "-"
    if principal is None:
        status = Unauthenticated("missing or invalid credentials").to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
    else:
        principals.acting_as(principal)  # this call's task only


class _Call:
    """Audits one call when it ends: who, what, which session, how it ended."""

    def __init__(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self._method = method
        self.who = "-"
        self._session = clip(getattr(request, "session_id", "") or "-", 64)
        self._context = context

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        code = self._context.code()
        if isinstance(code, grpc.StatusCode):
            name = code.name
        elif code is None:  # nothing set: it ended normally, or its client went away
            name = "CANCELLED" if kind is not None and kind.__name__ == "CancelledError" else "OK"
        else:
            name = str(code)
        audit.info("call principal=%s rpc=%s session=%s code=%s", self.who, self._method, self._session, name)
