"""Is this session mine? Serve it here, take it over, or forward the call to its leaseholder.

Between the service and the pool (docs/architecture.md's one-way flow). Without replicas
(no state_url) the service holds a `LocalRouter` (local.py) instead, and every lookup is the
pool's. With replicas:
- a session in this replica's pool is served here;
- a session whose leaseholder's lease is alive is forwarded to the leaseholder: the same call with the
  same request, its deadline, and cancellation passed on, signed for the caller's principal
  (server/security/auth.py `sign`: never the caller's token nor the replicas' secret, since the leaseholder's
  address is read from the database); the leaseholder's status and details come back unchanged
  (`Relayed`);
- a session released on drain, or whose leaseholder's lease ran out, is taken over (a compare-and-set
  on its epoch) by calls that work on it (`take`): Prompt, mode and option changes, close;
  other calls read it from the database as it was stored (a SUSPENDED view), moving nothing.
A call that was forwarded once is never forwarded again: if the session moved meanwhile the
caller gets OWNER_LOST and retries.

A forwarded call waits on its leaseholder only while the leaseholder's lease lives: once the lease and the
takeover margin have run out (by the database's clock, as for a takeover) the call is abandoned
with OWNER_LOST, and the caller's retry takes the session over. So a frozen or cut-off leaseholder
costs a caller `lease_ttl` + `TAKEOVER_MARGIN` + one look at the database, not the channel's
keepalive (25 s) or the forwarding bounds below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from sessiongate.server.cluster.leases import DB_TIMEOUT, Lease, Leases
from sessiongate.server.errors import OwnerLost, SessionGateError, SessionNotFound, StoreUnavailable, clip
from sessiongate.server.security import principals
from sessiongate.server.security.auth import sign
from sessiongate.server.sessions.pool import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    SessionPool,
    decode_token,
    encode_token,
    sort_key,
)
from sessiongate.server.sessions.session import Session, SessionView
from sessiongate.server.state.postgres import DB_ERRORS, PostgresStore
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

log = logging.getLogger("sessiongate.router")

T = TypeVar("T")
R = TypeVar("R")
E = TypeVar("E")

FORWARDED_HEADER = "sessiongate-forwarded-by"
# Bounds of a forwarded call whose caller set no deadline: a unary call, a stream's headers (the
# leaseholder sends them when the turn starts), and keepalive pings that find one that stopped.
FORWARD_TIMEOUT = 300.0
FORWARD_HEADERS_TIMEOUT = 120.0
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
]
LEASE_WATCH_DELAY = 0.5  # seconds into a forwarded call before its leaseholder's lease is looked at
LEASE_WATCH_RETRY = 1.0  # seconds before looking again when the database did not answer
SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"].full_name


class Forward(Exception):
    """The session is owned by the replica at `address`: the call goes there. Raised by the
    lookups (`session`, `place`) and caught by `unary` and `stream` around the call: the
    router's own signal, never seen by the service (`outcome` passes it on unchanged)."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


class Relayed(Exception):
    """The leaseholder's answer to a forwarded call: the same status, details and trailers."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


class Router:
    """Routing between replicas sharing a PostgreSQL database (see routing.Routing)."""

    def __init__(
        self, pool: SessionPool, store: PostgresStore, leases: Leases, replica_token: str = ""
    ) -> None:
        self._pool = pool
        self._replica_token = replica_token
        self._store = store
        self._leases = leases
        self._stubs: dict[str, pb_grpc.SessionServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def check_lease(self, session_id: str) -> None:
        """Before each event relayed: a replica whose lease may have run out (it was paused, or
        cut off from the database) sends nothing more; its sessions are someone else's now."""
        if not self._leases.valid():
            raise _lease_lost(session_id)

    def mark(self) -> int:
        """Where the lease's losses stand: a stream takes it when it starts (see `outcome`)."""
        return self._leases.losses

    def outcome(self, exc: Exception, session_id: str, mark: int | None = None) -> Exception:
        """How a stream of this replica ends: whatever else went wrong (a stall timer that fired
        as the process woke up, say), once the lease ran out it is OWNER_LOST. Also when the
        lease was lost after the stream's `mark` and renewed again since: its session was fenced
        meanwhile, even if the handler only got to run after the renewal (a loaded machine)."""
        if isinstance(exc, Forward):  # not an error: the call goes to the leaseholder
            return exc
        lost = not self._leases.valid() or (mark is not None and self._leases.losses != mark)
        return _lease_lost(session_id) if lost else exc

    async def unary(self, method: str, request: Any, context: Any, here: Callable[[], Awaitable[R]]) -> R:
        """`here()`, or the call forwarded to the leaseholder its lookup found."""
        try:
            return await here()
        except Forward as forward:
            result: R = await self._forward_unary(forward.address, method, request, context)
            return result

    async def stream(
        self, method: str, request: Any, context: Any, here: Callable[[], AsyncGenerator[E, None]]
    ) -> AsyncIterator[E]:
        """The events of `here()`, or of the call forwarded to the leaseholder its lookup found."""
        try:
            async with contextlib.aclosing(here()) as events:
                async for event in events:
                    yield event
            return
        except Forward as forward:
            address = forward.address
        async for item in self._forward_stream(address, method, request, context):
            yield item

    async def session(self, session_id: str, context: Any) -> SessionView:
        """The session to read here (another replica's released one as stored), or Forward."""
        return await self._find(session_id, context, take=False)

    async def take(self, session_id: str, context: Any) -> Session:
        """The session to work on here, taken over if its leaseholder released it, or Forward."""
        found = await self._find(session_id, context, take=True)
        assert isinstance(found, Session)  # served here: the pool's
        return found

    async def _find(self, session_id: str, context: Any, *, take: bool) -> SessionView:
        await self._leases.check()
        if self._pool.has(session_id):
            return self._pool.get(session_id)  # not the caller's: NOT_FOUND
        async with _database():
            lease = await self._leases.lease(session_id)
        if lease is None or not principals.current().may_see(lease.record.principal):
            return self._pool.get(session_id)  # NOT_FOUND, as for an unknown id
        if lease.alive and lease.replica != self._leases.replica_id:
            if _forwarded(context):
                raise OwnerLost(f"session {session_id} moved while the call was forwarded; retry")
            raise Forward(lease.advertise)
        if not take:
            return self._pool.view(lease.record)
        await self._take_over(lease)
        return self._pool.get(session_id)

    async def _take_over(self, lease: Lease) -> None:
        async with _database():
            taken = await self._leases.take(lease)
        if taken is None:  # another replica was faster, or the leaseholder came back
            raise OwnerLost(f"session {lease.record.session_id} is being moved between replicas; retry")
        record, epoch = taken
        await self._leases.check()  # still ours to serve (the lease did not run out meanwhile)
        self._store.owns(record.session_id, epoch)
        await self._pool.adopt(record)  # the row as the takeover found it, not as read before

    async def claim(self, session_id: str, context: Any) -> None:
        """Before a close: a session another replica released is taken over, one a live leaseholder
        serves is forwarded (Forward); one closed already is left to the pool to answer."""
        if not self._pool.has(session_id):
            with contextlib.suppress(SessionNotFound):
                await self.take(session_id, context)

    async def place(self, request_id: str, context: Any) -> None:
        """Returns when a CreateSession makes its session here; else Forward (`create_target`)."""
        target = await self.create_target(request_id, context)
        if target is not None:
            raise Forward(target)

    def replica_of(self, session_id: str) -> str:
        """This replica for a session it serves; "" for a stored view of another's."""
        return self._leases.replica_id if self._pool.has(session_id) else ""

    async def create_target(self, request_id: str, context: Any) -> str | None:
        """Where a CreateSession goes: None for here. A request id another replica already made
        a session for goes to that replica (or the session is taken over here when its replica is
        gone); with no free agent slot here, the live replica with the most free slots."""
        await self._leases.check()
        if _forwarded(context):
            return None
        if request_id:
            async with _database():
                made = await self._leases.lease_by_request(principals.current().name, request_id)
            if made is not None and not self._pool.has(made.record.session_id):
                if made.alive and made.replica != self._leases.replica_id:
                    return made.advertise
                await self._take_over(made)  # the pool then finds it by its request id
                return None
        if self._leases.free_slots() > 0:
            return None
        async with _database():
            return await self._leases.most_free()

    async def page(
        self, page_size: int, page_token: str, agent: str, labels: Mapping[str, str], principal: str
    ) -> tuple[list[tuple[SessionView, str]], str]:
        """ListSessions over every replica's sessions (from the database), each with the replica
        serving it; ones served here show their live state. Same order and tokens as the pool's."""
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        after = decode_token(page_token)
        caller = principals.current()
        batch = max(2 * size, 100)
        found: list[tuple[SessionView, str]] = []
        principal = principal or ("" if caller.admin else caller.name)  # only what the caller may see
        while True:
            async with _database():
                rows = await self._leases.page(after, principal, agent, batch)
            for record, replica in rows:
                if len(found) == size:
                    return found, encode_token(sort_key(found[-1][0]))
                after = (record.create_time, record.session_id)
                if not caller.may_see(record.principal) or any(
                    record.labels.get(k) != v for k, v in labels.items()
                ):
                    continue
                local = self._pool.has(record.session_id)
                session = self._pool.get(record.session_id) if local else self._pool.view(record)
                found.append((session, self._leases.replica_id if local else replica))
            if len(rows) < batch:
                return found, ""

    # ---- forwarding ----------------------------------------------------------------------

    async def _forward_unary(self, address: str, method: str, request: Any, context: Any) -> Any:
        call = getattr(self._stub(address), method)(
            request, timeout=_bounded(context), metadata=self._passed_on(address, method, request)
        )
        gone = self._watch(address)
        try:
            return await _unless_gone(call, gone, address)
        except grpc.aio.AioRpcError as error:
            raise _relayed(error, address) from None
        finally:
            gone.cancel()
            call.cancel()  # the caller left, or the leaseholder's lease ran out: its call ends too

    async def _forward_stream(
        self, address: str, method: str, request: Any, context: Any
    ) -> AsyncIterator[Any]:
        call = getattr(self._stub(address), method)(
            request, timeout=context.time_remaining(), metadata=self._passed_on(address, method, request)
        )
        gone = self._watch(address)
        try:
            try:
                async with asyncio.timeout(FORWARD_HEADERS_TIMEOUT):
                    headers = await _unless_gone(call.initial_metadata(), gone, address)
            except TimeoutError:
                raise OwnerLost(
                    f"the replica owning the session ({clip(address)}) sent no response headers within"
                    f" {FORWARD_HEADERS_TIMEOUT:g}s; retry",
                    retry_after=1.0,
                ) from None
            ours = tuple((k, v) for k, v in (headers or ()) if k.startswith("sessiongate-"))
            if ours:
                await context.send_initial_metadata(ours)
            # Past the headers the leaseholder's call itself is cancelled when its lease runs out: no
            # task and no wait per relayed message.
            gone.add_done_callback(lambda watch: watch.cancelled() or call.cancel())
            while True:
                try:
                    item = await call.read()
                except asyncio.CancelledError:
                    if _leaseholder_was_gone(gone):
                        raise _leaseholder_lost(address) from None
                    raise
                if item is grpc.aio.EOF:
                    break
                yield item
        except grpc.aio.AioRpcError as error:
            raise _relayed(error, address) from None
        finally:
            gone.cancel()
            call.cancel()  # the caller left (or the stream ended): the leaseholder's call ends too

    def _watch(self, address: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            self._leaseholder_gone(address), name="sessiongate-lease-watch"
        )

    async def _leaseholder_gone(self, address: str) -> None:
        """Returns once no replica at `address` has a lease alive plus the takeover margin: its
        sessions may be taken over, and the replica itself has stopped serving them. Looks at the
        database about once per renewal the leaseholder makes; a failed look is retried."""
        await asyncio.sleep(LEASE_WATCH_DELAY)  # most forwarded calls are answered by then
        while True:
            try:
                async with asyncio.timeout(DB_TIMEOUT):
                    left = await self._leases.lease_left(address)
            except Exception as exc:  # the call goes on meanwhile (keepalive still bounds it)
                log.warning("could not read the lease of replica %s: %s", clip(address), clip(str(exc)))
                left = LEASE_WATCH_RETRY
            if left <= 0:
                return
            await asyncio.sleep(max(left, 0.05))

    def _passed_on(self, address: str, method: str, request: Any) -> tuple[tuple[str, str], ...]:
        """Who the call is for: the principal authenticated here, signed for this call to this
        address (the leaseholder trusts the name, however the caller proved it). Without the replicas'
        secret nothing: authentication is off (with it on, the secret is required at start)."""
        who: tuple[tuple[str, str], ...] = ()
        if self._replica_token:
            who = sign(
                self._replica_token, f"/{SERVICE}/{method}", request, principals.current().name, address
            )
        return (*who, (FORWARDED_HEADER, self._leases.replica_id))

    def _stub(self, address: str) -> pb_grpc.SessionServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.SessionServiceStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[None]:
    """A routing query: bounded, and a database that fails or does not answer is
    UNAVAILABLE/STORE_UNAVAILABLE (retryable), never INTERNAL."""
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            yield
    except TimeoutError:
        raise StoreUnavailable(f"the session database did not answer within {DB_TIMEOUT:g}s") from None
    except DB_ERRORS as exc:
        raise StoreUnavailable(f"the session database failed: {clip(str(exc))}") from exc


async def _unless_gone(step: Awaitable[T], gone: asyncio.Task[None], address: str) -> T:
    """`step` (a wait on the leaseholder), abandoned with OWNER_LOST once `gone` finds the
    leaseholder's lease ran out."""
    waiting = asyncio.ensure_future(step)
    try:
        await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        waiting.cancel()
        raise
    if waiting.done():
        return waiting.result()
    waiting.cancel()
    raise _leaseholder_lost(address)


def _leaseholder_was_gone(gone: asyncio.Task[None]) -> bool:
    """The leaseholder's call was cancelled because its lease ran out, not because this task was."""
    task = asyncio.current_task()
    return gone.done() and not gone.cancelled() and (task is None or task.cancelling() == 0)


def _leaseholder_lost(address: str) -> OwnerLost:
    return OwnerLost(
        f"the replica owning the session ({clip(address)}) did not answer and its lease ran out;"
        " retry (the session is taken over)",
        retry_after=0.2,
    )


def _lease_lost(session_id: str) -> OwnerLost:
    return OwnerLost(f"this replica's lease ran out: session {session_id} is being moved; retry")


def _bounded(context: Any) -> float:
    remaining = context.time_remaining()
    return FORWARD_TIMEOUT if remaining is None else min(remaining, FORWARD_TIMEOUT)


def _forwarded(context: Any) -> bool:
    return any(key == FORWARDED_HEADER for key, _ in context.invocation_metadata() or ())


def _relayed(error: grpc.aio.AioRpcError, address: str) -> Exception:
    """The leaseholder's status as it is; a transport failure (no sessiongate details) says so."""
    trailers = error.trailing_metadata() or ()
    detailed = any(key == "grpc-status-details-bin" for key, _ in trailers)
    if error.code() == grpc.StatusCode.UNAVAILABLE and not detailed:
        return _unreachable(address)
    return Relayed(error)


def _unreachable(address: str) -> SessionGateError:
    return OwnerLost(
        f"the replica owning the session ({address}) cannot be reached; retry (it is taken over once"
        " that replica's lease runs out)",
        retry_after=1.0,
    )
