"""The auth interceptor: every call names its principal, or ends UNAUTHENTICATED before the
handler runs (the shape of grpc's own examples/python/auth).

Clients send `authorization: Bearer <token>`. Health is always public (probes carry no
token); reflection is public only when configured so. Those public calls have a small budget of
their own (per peer and in all, `UnauthenticatedBudget`), so they never take the authenticated
calls' `max_concurrent_rpcs`. A call that fails authentication gets
one status whatever was wrong (no header, another scheme, an unknown token), so it gives an
attacker no hint. The principal is set in a context variable for the handler, and every call
leaves one line on the `sessiongate.audit` logger: principal, RPC, session, status code;
never a token or a prompt.

A replica forwarding a call never sends a reusable secret: it signs the call (`sign`) with the
replicas' shared secret, bound to the method, the session, the whole request, the principal, the
leaseholder's address and a timestamp and nonce; the leaseholder checks it (`ReplicaSignatures`). A listener
that got a forwarded call (say, at an address planted in the database) can use what it received
for nothing else: not another call, not another replica, not twice, not after the window.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from sessiongate.server.errors import QuotaExceeded, Unauthenticated, clip
from sessiongate.server.security import principals
from sessiongate.server.security.principals import Principal, TokenTable
from sessiongate.server.security.tls import certificate_name

audit = logging.getLogger("sessiongate.audit")
log = logging.getLogger("sessiongate.auth")

HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection."
OLD_REPLICA_HEADER = "sessiongate-replica-token"  # the shared secret itself, once: refused now
SIGNATURE_HEADER = "sessiongate-replica-signature"  # a forwarding replica's signature (router.py)
PRINCIPAL_HEADER = "sessiongate-principal"  # ...and the principal it forwards the call for
SIGNATURE_WINDOW = 30.0  # seconds a signature is good for, either side of the leaseholder's clock
MAX_NONCES = 100_000  # nonces remembered (2 windows); past it forwarded calls are refused
_SIGNATURE = re.compile(r"v1:([0-9]{1,16}):([0-9a-f]{32}):([0-9a-f]{64})")
# Public calls (health, reflection when public) at once, per client address and in all. grpc's
# own limit is raised by UNAUTHENTICATED_TOTAL, so they never eat the authenticated calls' share.
UNAUTHENTICATED_PER_PEER = 16
UNAUTHENTICATED_TOTAL = 64


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates by bearer token (`tokens`) and, with `mtls`, by client certificate."""

    def __init__(
        self,
        tokens: TokenTable | None,
        mtls: bool = False,
        public_reflection: bool = False,
        replica_token: str = "",
        replica_address: str = "",
    ) -> None:
        self._tokens = tokens
        self._mtls = mtls
        self._public_reflection = public_reflection
        self._replicas = ReplicaSignatures(replica_token, replica_address) if replica_token else None
        self.unauthenticated = UnauthenticatedBudget(UNAUTHENTICATED_PER_PEER, UNAUTHENTICATED_TOTAL)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        if method.startswith(HEALTH) or (self._public_reflection and method.startswith(REFLECTION)):
            return _budgeted(handler, self.unauthenticated)
        return _wrapped(handler, method, self.principal)

    def principal(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> Principal | None:
        """The caller: a replica forwarding a call for a principal it authenticated (signed with
        the replicas' secret), else a known bearer token, else a verified client certificate's
        name."""
        metadata = dict(context.invocation_metadata() or ())
        if OLD_REPLICA_HEADER in metadata:
            return None
        if SIGNATURE_HEADER in metadata:  # present: it must be right, never a fallback to the rest
            name = None if self._replicas is None else self._replicas.check(metadata, method, request)
            if not name:
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


Authenticate = Callable[[grpc.aio.ServicerContext, str, Any], "Principal | None"]


def _signed_text(method: str, request: Any, principal: str, address: str, stamp: str, nonce: str) -> bytes:
    """What a replica signs: the call (method, session, the whole request), who it is for,
    where it goes, when, and a nonce. JSON keeps the fields apart whatever they hold."""
    session_id = getattr(request, "session_id", "") if request is not None else ""
    body = request.SerializeToString(deterministic=True) if request is not None else b""
    fields = ["sessiongate-replica-v1", method, session_id, hashlib.sha256(body).hexdigest()]
    return json.dumps([*fields, principal, address, stamp, nonce]).encode()


def sign(
    secret: str, method: str, request: Any, principal: str, address: str, now: float | None = None
) -> tuple[tuple[str, str], ...]:
    """The headers of a call forwarded to the replica at `address` for `principal`."""
    stamp, nonce = str(int((time.time() if now is None else now) * 1000)), secrets.token_hex(16)
    text = _signed_text(method, request, principal, address, stamp, nonce)
    mac = hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()
    return ((SIGNATURE_HEADER, f"v1:{stamp}:{nonce}:{mac}"), (PRINCIPAL_HEADER, principal))


class ReplicaSignatures:
    """Checks forwarded calls' signatures, as the replica at `address` (its advertised address,
    as the others read it from the database), and remembers their nonces for two windows."""

    def __init__(self, secret: str, address: str, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret.encode()
        self._address = address
        self._clock = clock
        self._seen: dict[str, float] = {}  # nonce -> monotonic time it may be forgotten, in order

    def check(self, metadata: dict[str, Any], method: str, request: Any) -> str | None:
        """The principal name a valid, fresh, first-seen signature of this very call carries."""
        given, name = metadata.get(SIGNATURE_HEADER), metadata.get(PRINCIPAL_HEADER)
        if not isinstance(given, str) or not isinstance(name, str) or not name:
            return None
        match = _SIGNATURE.fullmatch(given)
        if match is None:
            return None
        stamp, nonce, mac = match.groups()
        text = _signed_text(method, request, name, self._address, stamp, nonce)
        if not hmac.compare_digest(mac, hmac.new(self._secret, text, hashlib.sha256).hexdigest()):
            return None
        if abs(self._clock() - int(stamp) / 1000) > SIGNATURE_WINDOW:
            return None
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) <= now:
            del self._seen[next(iter(self._seen))]
        if nonce in self._seen:
            return None
        if len(self._seen) >= MAX_NONCES:
            log.warning("more than %d forwarded calls within %gs: refused", MAX_NONCES, 2 * SIGNATURE_WINDOW)
            return None
        # Accepted here at `now`, its stamp is within a window of it: it is stale 2 windows on.
        self._seen[nonce] = now + 2 * SIGNATURE_WINDOW
        return name


class UnauthenticatedBudget:
    """Calls served without authentication that may run at once, per client address and in all."""

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self._running: dict[str, int] = {}
        self.running = 0

    def take(self, peer: str) -> bool:
        if self.running >= self.total or self._running.get(peer, 0) >= self.per_peer:
            return False
        self._running[peer] = self._running.get(peer, 0) + 1
        self.running += 1
        return True

    def give(self, peer: str) -> None:
        self.running -= 1
        left = self._running[peer] - 1
        if left:
            self._running[peer] = left
        else:
            del self._running[peer]


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """The client's address without its port ("ipv4:10.0.0.1:5000" -> "10.0.0.1")."""
    scheme, _, rest = (context.peer() or "").partition(":")
    if scheme in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return scheme  # "unix": every local client is one peer


_HANDLER_KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _budgeted(handler: grpc.RpcMethodHandler, budget: UnauthenticatedBudget) -> grpc.RpcMethodHandler:
    """The same public handler, refused RESOURCE_EXHAUSTED past the budget; a call (a stream
    too) holds its place until it ends, however it ends."""
    kind = next(k for k in _HANDLER_KINDS if getattr(handler, k) is not None)
    inner = getattr(handler, kind)

    async def admit(context: grpc.aio.ServicerContext) -> str:
        peer = _peer_host(context)
        if not budget.take(peer):
            status = QuotaExceeded(
                "too many unauthenticated calls at once; retry later",
                quota=(
                    "unauthenticated calls",
                    f"{budget.per_peer} per client address, {budget.total} in all",
                ),
                retry_after=1.0,
            ).to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        return peer

    if inspect.isasyncgenfunction(inner):  # reflection: yields its answers

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            peer = await admit(context)
            try:
                async for response in inner(request, context):
                    yield response
            finally:
                budget.give(peer)

        behaviour: Callable[..., Any] = streaming
    else:  # unary calls, and health's Watch (it writes with context.write)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            peer = await admit(context)
            try:
                return await inner(request, context)
            finally:
                budget.give(peer)

        behaviour = call
    return _HANDLER_KINDS[kind](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


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
                await _admit(call, authenticate(context, method, request), context)
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(method, request, context) as call:
                await _admit(call, authenticate(context, method, request), context)
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if handler.stream_stream is not None:
        inner_bidi = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(method, None, context) as call:
                await _admit(call, authenticate(context, method, None), context)
                async for response in inner_bidi(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
    inner_upload = handler.stream_unary

    async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        with _Call(method, None, context) as call:
            await _admit(call, authenticate(context, method, None), context)
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
