"""The lock map: create, get, list and close sessions.

The map lock guards the dicts below and nothing else: no `await` on I/O ever happens while
it is held. Agent start-up runs outside it. Concurrent creates with one `request_id` share
a single start (the first caller's), so one request id never spawns two agents.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from server.errors import InvalidArgument, PoolExhausted, SessionNotFound, ShuttingDown
from server.session import Session
from server.settings import AgentConfig, ServerLimits

log = logging.getLogger("sessiongate.pool")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
POOL_RETRY_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class _Pending:
    """A create in progress for a request id, and what it was asked for."""

    agent: str
    cwd: str
    done: asyncio.Future[Session]


class SessionPool:
    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._map_lock = asyncio.Lock()
        self._sessions: dict[str, Session] = {}  # insertion order = creation order
        self._by_request_id: dict[str, Session] = {}
        self._pending: dict[str, _Pending] = {}
        self._starting = 0
        self._closed = False

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
                if len(self._sessions) + self._starting >= self.limits.max_sessions:
                    raise PoolExhausted(
                        f"the server is at its session limit ({self.limits.max_sessions})",
                        metadata={"max_sessions": self.limits.max_sessions},
                        retry_after=POOL_RETRY_AFTER,
                    )
                self._starting += 1
                session = Session(
                    config=config, cwd=cwd, labels=labels, request_id=request_id, limits=self.limits
                )
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
        """Start the agent outside the map lock, then publish the session (or the failure)."""
        try:
            await session.start()
        except BaseException as exc:
            async with self._map_lock:
                self._starting -= 1
                waiter = self._pending.pop(session.request_id, None)
            if waiter is not None and not waiter.done.done():
                waiter.done.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                waiter.done.exception()  # mark retrieved: nobody else may be waiting
            raise
        async with self._map_lock:
            self._starting -= 1
            waiter = self._pending.pop(session.request_id, None)
            closed = self._closed
            if not closed:
                self._sessions[session.session_id] = session
                if session.request_id:
                    self._by_request_id[session.request_id] = session
        if closed:  # shutdown began while we were starting: do not leak the agent
            await session.close()
            raise ShuttingDown("the server is shutting down")
        if waiter is not None:
            waiter.done.set_result(session)
        log.info("session created session=%s agent=%s", session.session_id, session.config.name)
        return session

    def get(self, session_id: str) -> Session:
        """A plain dict lookup: needs no lock in one event loop, and never waits."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(
                f"session {session_id!r} not found (unknown or closed)", metadata={"session_id": session_id}
            )
        return session

    def page(self, page_size: int, page_token: str, agent: str) -> tuple[list[Session], str]:
        """One page of sessions in creation order, and the token of the next page ("" at the end)."""
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        offset = _decode_token(page_token)
        matching = [s for s in self._sessions.values() if not agent or s.config.name == agent]
        page = matching[offset : offset + size]
        more = offset + size < len(matching)
        return page, _encode_token(offset + size) if more else ""

    async def close(self, session_id: str) -> Session:
        async with self._map_lock:
            session = self._sessions.pop(session_id, None)
            if session is not None and self._by_request_id.get(session.request_id) is session:
                del self._by_request_id[session.request_id]
        if session is None:
            raise SessionNotFound(
                f"session {session_id!r} not found (unknown or closed)", metadata={"session_id": session_id}
            )
        await session.close()
        log.info("session closed session=%s", session_id)
        return session

    async def shutdown(self) -> None:
        """Refuse new sessions and close every session (ending every agent process group)."""
        async with self._map_lock:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._by_request_id.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())


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
