"""What the service asks of a router: where a session is served, and the call sent there.

Two implementations: `LocalRouter` (local.py) for a single replica, where every session is
served here, and `Router` (router.py) for replicas sharing a PostgreSQL database, which takes
sessions over and forwards calls to their leaseholders. The service holds one of them and has one
path for both.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from sessiongate.server.sessions.session import Session, SessionView

R = TypeVar("R")
E = TypeVar("E")


class Routing(Protocol):
    """Where sessions are served, as the service sees it."""

    async def unary(self, method: str, request: Any, context: Any, here: Callable[[], Awaitable[R]]) -> R:
        """`here()`, the call served on this replica; or the call forwarded, unchanged, to the
        replica that serves its session (found out while `here` runs)."""
        ...

    def stream(
        self, method: str, request: Any, context: Any, here: Callable[[], AsyncGenerator[E, None]]
    ) -> AsyncIterator[E]:
        """The events of `here()`, or of the call forwarded to the replica serving its session."""
        ...

    async def session(self, session_id: str, context: Any) -> SessionView:
        """The session a call reads: another principal's, or an unknown id, is NOT_FOUND."""
        ...

    async def take(self, session_id: str, context: Any) -> Session:
        """The session a call works on, served here (taken over if another replica released it)."""
        ...

    async def claim(self, session_id: str, context: Any) -> None:
        """Before a close: the session brought here if it is served anywhere."""
        ...

    async def place(self, request_id: str, context: Any) -> None:
        """Before a CreateSession: returns when the session is to be made here."""
        ...

    def replica_of(self, session_id: str) -> str:
        """The replica serving a session as a Session message shows it ("" without replicas)."""
        ...

    async def page(
        self, page_size: int, page_token: str, agent: str, labels: Mapping[str, str], principal: str
    ) -> tuple[list[tuple[SessionView, str]], str]:
        """A ListSessions page (`principal`: the request's owner filter): each session with the
        replica serving it, and the next token."""
        ...

    def mark(self) -> int:
        """Where this replica's lease stands when a stream starts (see `outcome`)."""
        ...

    def check_lease(self, session_id: str) -> None:
        """Before each event sent: raises when this replica may no longer serve the session."""
        ...

    def outcome(self, exc: Exception, session_id: str, mark: int | None = None) -> Exception:
        """The error a stream of this replica ends with, given what went wrong (`exc`)."""
        ...
