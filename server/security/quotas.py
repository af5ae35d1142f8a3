"""Quotas: how many sessions a principal and the server keep, and how fast a principal prompts.

Over a quota is RESOURCE_EXHAUSTED / QUOTA_EXCEEDED with a QuotaFailure naming it, and
RetryInfo where waiting helps (the prompt rate). Live agents per principal (`max_live_sessions`
and a fair share of the agent slots) are bounded by server/agents/slots.py, which raises the same.

Alone (SQLite, one process) a principal's sessions and prompts are counted in memory. With
replicas (PostgreSQL) they are counted in the database, over every replica (`Shared`): its
sessions are its rows, and the insert of a new one counts them under a per-principal lock in
the same transaction (store_postgres.py), so two replicas creating at once cannot both take
the last place; its prompts are timestamps in the database, admitted one at a time per principal.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from sessiongate.server.errors import QuotaExceeded
from sessiongate.server.security.principals import Principal

WINDOW = 60.0  # seconds of the prompt-rate window


class Shared(Protocol):
    """The counts the replicas share (store_postgres.PostgresStore); STORE_UNAVAILABLE when the
    database fails or does not answer."""

    async def count_sessions(self, principal: str) -> int: ...

    async def admit_prompt(self, principal: str, limit: int, window: float) -> float | None:
        """Count a prompt unless `limit` were sent in the last `window` seconds; else the seconds
        until the oldest of them leaves the window."""
        ...


class PromptRate:
    """Prompts per principal in any sliding minute; memory bounded by each principal's limit."""

    def __init__(self, shared: Shared | None = None) -> None:
        self._sent: dict[str, deque[float]] = {}
        self._shared = shared

    async def admit(self, principal: Principal) -> None:
        limit = principal.max_prompts_per_minute
        if limit is None:
            return
        if self._shared is not None:
            wait = await self._shared.admit_prompt(principal.name, limit, WINDOW)
            if wait is not None:
                raise too_fast(principal.name, limit, wait)
            return
        now = time.monotonic()
        sent = self._sent.setdefault(principal.name, deque())
        while sent and now - sent[0] >= WINDOW:
            sent.popleft()
        if len(sent) >= limit:
            raise too_fast(principal.name, limit, WINDOW - (now - sent[0]))
        sent.append(now)


def too_fast(name: str, limit: int, retry_after: float) -> QuotaExceeded:
    return QuotaExceeded(
        f"principal {name!r} may send {limit} prompts a minute",
        metadata={"principal": name, "max_prompts_per_minute": limit},
        retry_after=min(max(retry_after, 0.0), WINDOW),
        quota=(f"principal:{name}", f"max_prompts_per_minute is {limit}"),
    )


def too_many_sessions(name: str, limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"principal {name!r} may keep {limit} sessions; close some first",
        metadata={"principal": name, "max_sessions": limit},
        quota=(f"principal:{name}", f"max_sessions is {limit}"),
    )


async def check_shared_room(shared: Shared | None, principal: Principal) -> None:
    """Before a create with replicas: the principal's sessions over every replica (a cheap early
    refusal; the insert counts again, atomically)."""
    limit = principal.max_sessions
    if shared is not None and limit is not None and await shared.count_sessions(principal.name) >= limit:
        raise too_many_sessions(principal.name, limit)


def check_room(kept_by: Iterable[str], principal: Principal, max_stored: int) -> None:
    """Before a create: `kept_by` are the principals of every session kept or being created here."""
    kept_by = list(kept_by)
    if len(kept_by) >= max_stored:
        raise QuotaExceeded(
            f"the server keeps at most {max_stored} sessions; close some first",
            metadata={"max_stored_sessions": max_stored},
            quota=("server", f"max_stored_sessions is {max_stored}"),
        )
    limit = principal.max_sessions
    if limit is not None and sum(name == principal.name for name in kept_by) >= limit:
        raise too_many_sessions(principal.name, limit)
