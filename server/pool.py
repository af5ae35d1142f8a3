"""The lock map: create, get, list, close and sweep sessions; their records in the store.

The map lock guards the dicts below and nothing else: no `await` on I/O ever happens while
it is held. Agent start-up runs outside it. Concurrent creates with one `request_id` share
a single start (the first caller's), so one request id never spawns two agents.

The sweeper suspends sessions idle past the TTL and reaps turns whose handler is stuck
past the turn limit plus a grace. It only reads lock-free attributes and never waits on a
busy session's lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from server.agent import Handshake
from server.errors import InvalidArgument, SessionNotFound, ShuttingDown
from server.session import Session
from server.settings import AgentConfig, ServerLimits
from server.slots import Slots
from server.spares import SparePool
from server.store import SessionRecord, SessionStore

log = logging.getLogger("sessiongate.pool")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class _Pending:
    """A create in progress for a request id, and what it was asked for."""

    agent: str
    cwd: str
    done: asyncio.Future[Session]


class SessionPool:
    def __init__(self, limits: ServerLimits, store: SessionStore, spares: SparePool | None = None) -> None:
        self.limits = limits
        self._store = store
        self._spares = spares
        self._map_lock = asyncio.Lock()
        self._sessions: dict[str, Session] = {}  # insertion order = creation order
        self._by_request_id: dict[str, Session] = {}
        self._pending: dict[str, _Pending] = {}
        self._slots = Slots(limits.max_sessions, self._sessions.values)
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.on_agent_start: Callable[[str, bool], None] | None = None  # (agent name, started ok)

    # ---- start-up ----------------------------------------------------------------------

    async def load(self, agents: Mapping[str, AgentConfig]) -> int:
        """Bring back every stored session as SUSPENDED; start the sweeper. Returns the count."""
        for record in await self._store.open():
            # An agent no longer configured keeps its sessions listed; resuming them fails clearly.
            config = agents.get(record.agent) or AgentConfig(name=record.agent, command="")
            session = self._new_session(config, record.cwd, record.request_id, record.labels, record)
            self._sessions[session.session_id] = session
            if record.request_id:
                self._by_request_id[record.request_id] = session
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sessiongate-sweeper")
        return len(self._sessions)

    def _new_session(
        self,
        config: AgentConfig,
        cwd: str,
        request_id: str,
        labels: Mapping[str, str],
        record: SessionRecord | None = None,
    ) -> Session:
        return Session(
            config=config,
            cwd=cwd,
            labels=labels,
            request_id=request_id,
            limits=self.limits,
            slots=self._slots,
            on_change=self._persist_later,
            on_agent_start=self.on_agent_start,
            spares=self._spares,
            session_id=record.session_id if record else "",
            create_time=record.create_time if record else 0.0,
            last_active_time=record.last_active_time if record else 0.0,
            agent_session_id=record.agent_session_id if record else "",
            handshake=_handshake(record.agent_info) if record else None,
        )

    # ---- the map -------------------------------------------------------------------------

    async def create(
        self, config: AgentConfig, cwd: str, request_id: str, labels: Mapping[str, str]
    ) -> Session:
        async with self._map_lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            existing = self._by_request_id.get(request_id) if request_id else None
            pending = self._pending.get(request_id) if request_id else None
            if existing is not None:
                _check_same_request(request_id, existing.config.name, existing.cwd, config.name, cwd)
                return existing
            if pending is None:
                session = self._new_session(config, cwd, request_id, labels)
                if request_id:
                    done: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
                    self._pending[request_id] = _Pending(config.name, cwd, done)
        if pending is not None:
            # Another caller is starting this request's session: share its outcome (bounded by
            # its start timeout). shield() keeps our cancellation from cancelling theirs.
            _check_same_request(request_id, pending.agent, pending.cwd, config.name, cwd)
            return await asyncio.shield(pending.done)
        return await self._start(session)

    async def _start(self, session: Session) -> Session:
        """Start the agent and store the record, outside the map lock; then publish the session."""
        try:
            await session.start()
            await self._store.put(_record(session))  # durable before CreateSession answers
        except BaseException as exc:
            async with self._map_lock:
                waiter = self._pending.pop(session.request_id, None)
            if waiter is not None and not waiter.done.done():
                waiter.done.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                waiter.done.exception()  # mark retrieved: nobody else may be waiting
            if session.agent is not None:
                await asyncio.shield(session.close())  # stored failed: do not leak the agent
            raise
        async with self._map_lock:
            waiter = self._pending.pop(session.request_id, None)
            closed = self._closed
            if not closed:
                self._sessions[session.session_id] = session
                if session.request_id:
                    self._by_request_id[session.request_id] = session
        if closed:  # shutdown began while we were starting: do not leak the agent
            await session.retire()
            raise ShuttingDown("the server is shutting down")
        if waiter is not None:
            waiter.done.set_result(session)
        log.info("session created session=%s agent=%s", session.session_id, session.config.name)
        return session

    def get(self, session_id: str) -> Session:
        """A plain dict lookup: needs no lock in one event loop, and never waits."""
        session = self._sessions.get(session_id)
        if session is None:
            raise _not_found(session_id)
        return session

    def page(
        self, page_size: int, page_token: str, agent: str, labels: Mapping[str, str]
    ) -> tuple[list[Session], str]:
        """One page of sessions in creation order, and the token of the next page ("" at the end)."""
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        offset = _decode_token(page_token)
        matching = [
            s
            for s in self._sessions.values()
            if (not agent or s.config.name == agent) and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        page = matching[offset : offset + size]
        more = offset + size < len(matching)
        return page, _encode_token(offset + size) if more else ""

    async def close(self, session_id: str) -> Session:
        async with self._map_lock:
            session = self._sessions.pop(session_id, None)
            if session is not None and self._by_request_id.get(session.request_id) is session:
                del self._by_request_id[session.request_id]
        if session is None:
            raise _not_found(session_id)
        await session.close()
        await self._store.delete(session_id)
        log.info("session closed session=%s", session_id)
        return session

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # ---- shutdown ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Refuse new sessions, end every turn (CANCELLED) and agent; keep every record."""
        sessions = await self._stop_taking_work()
        await asyncio.gather(*(s.retire() for s in sessions), return_exceptions=True)
        await self._store.close()

    async def terminate(self) -> None:
        """Like shutdown, but agents are ended at once, without the cancel grace."""
        sessions = await self._stop_taking_work()
        await asyncio.gather(*(s.kill() for s in sessions), return_exceptions=True)
        await self._store.close()

    async def _stop_taking_work(self) -> list[Session]:
        async with self._map_lock:
            self._closed = True
        for task in [self._sweeper, *self._background]:
            if task is not None:
                task.cancel()
        if self._spares is not None:
            await self._spares.close()
        return list(self._sessions.values())

    # ---- the sweeper -------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            self.sweep()

    def sweep(self) -> None:
        """Suspend sessions idle past the TTL; reap turns stuck past the turn limit plus grace."""
        now = time.time()
        for session in list(self._sessions.values()):
            if session.zombie():
                self._run(session.reap())
            elif session.evictable() and now - session.last_active_time > self.limits.idle_ttl:
                log.info("idle TTL passed session=%s", session.session_id)
                self._run(session.suspend())

    def _run(self, work: Awaitable[object]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("sweeper task failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _persist_later(self, session: Session) -> None:
        if session.session_id not in self._sessions:
            return  # still being created: _start writes it, durably, once it is ready
        with contextlib.suppress(RuntimeError):  # the store's thread is gone after shutdown
            self._store.put_later(_record(session))


def _record(session: Session) -> SessionRecord:
    info: dict[str, object] = {}
    if session.handshake is not None:
        hs = session.handshake
        info = {"name": hs.name, "version": hs.version, "title": hs.title, "load_session": hs.load_session}
    return SessionRecord(
        session_id=session.session_id,
        agent=session.config.name,
        cwd=session.cwd,
        labels=session.labels,
        state=session.state.value,
        agent_session_id=session.agent_session_id,
        request_id=session.request_id,
        create_time=session.create_time,
        last_active_time=session.last_active_time,
        agent_info=info,
    )


def _handshake(info: Mapping[str, object]) -> Handshake | None:
    if not info:
        return None
    return Handshake(
        name=str(info.get("name", "")),
        version=str(info.get("version", "")),
        title=str(info.get("title", "")),
        load_session=bool(info.get("load_session", False)),
        auth_methods=(),
    )


def _not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(
        f"session {session_id!r} not found (unknown or closed)", metadata={"session_id": session_id}
    )


def _check_same_request(request_id: str, agent: str, cwd: str, new_agent: str, new_cwd: str) -> None:
    if (agent, cwd) != (new_agent, new_cwd):
        raise InvalidArgument.field(
            "request_id",
            f"request_id {request_id!r} was already used for agent {agent!r} in {cwd!r}",
        )


_TOKEN_PREFIX = "offset:"


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{offset}".encode()).decode()


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if text.startswith(_TOKEN_PREFIX) and text[len(_TOKEN_PREFIX) :].isdigit():
            return int(text[len(_TOKEN_PREFIX) :])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument.field("page_token", "not a token returned by ListSessions")
