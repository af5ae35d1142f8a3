"""A single replica's router: every session is served here, from the pool.

The null object of `Router` (router.py): with no replicas (no state_url) the service asks it
the same questions and it always answers "here", so the service has one path.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from sessiongate.server.sessions.pool import SessionPool
from sessiongate.server.sessions.session import Session, SessionView

R = TypeVar("R")
E = TypeVar("E")


class LocalRouter:
    """Routing without replicas: no forwarding, no takeover, no lease (see routing.Routing)."""

    def __init__(self, pool: SessionPool) -> None:
        self._pool = pool

    async def unary(self, method: str, request: Any, context: Any, here: Callable[[], Awaitable[R]]) -> R:
        return await here()

    def stream(
        self, method: str, request: Any, context: Any, here: Callable[[], AsyncGenerator[E, None]]
    ) -> AsyncIterator[E]:
        return here()

    async def session(self, session_id: str, context: Any) -> SessionView:
        return self._pool.get(session_id)

    async def take(self, session_id: str, context: Any) -> Session:
        return self._pool.get(session_id)

    async def claim(self, session_id: str, context: Any) -> None:
        pass  # the pool holds every session there is

    async def place(self, request_id: str, context: Any) -> None:
        pass

    def replica_of(self, session_id: str) -> str:
        return ""

    async def page(
        self, page_size: int, page_token: str, agent: str, labels: Mapping[str, str], principal: str
    ) -> tuple[list[tuple[SessionView, str]], str]:
        sessions, token = self._pool.page(page_size, page_token, agent, labels, principal)
        return [(session, "") for session in sessions], token

    def mark(self) -> int:
        return 0

    def check_lease(self, session_id: str) -> None:
        pass  # no lease: this replica serves its sessions for as long as it runs

    def outcome(self, exc: Exception, session_id: str, mark: int | None = None) -> Exception:
        return exc
