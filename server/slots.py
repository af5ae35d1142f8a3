"""Live-agent slots: at most `limit` sessions run an agent process at once.

A session's agent holder takes a slot to start an agent and gives it back once that agent's
process group is gone (not when somebody merely decided to stop it). When no slot is free,
the least recently used idle session is suspended (agent stopped, record kept) to free one;
only when nothing is idle does the request fail POOL_EXHAUSTED. Picking a victim never waits
on a session somebody is working on: `suspend()` answers at once when the victim is in use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from server.errors import PoolExhausted

POOL_RETRY_AFTER = 5.0  # seconds suggested in RetryInfo when every slot is busy


class Evictable(Protocol):
    """What slots need of a session: is it idle, and suspend it (never waiting on its owner)."""

    last_active_time: float

    def evictable(self) -> bool: ...

    async def suspend(self) -> bool: ...


class Slots:
    def __init__(self, limit: int, candidates: Callable[[], Iterable[Evictable]]) -> None:
        self.limit = limit
        self.used = 0
        self._candidates = candidates

    async def acquire(self, requester: object) -> None:
        """Take a slot, suspending idle sessions (least recently used first) as needed."""
        while self.used >= self.limit:
            victims = sorted(
                (s for s in self._candidates() if s is not requester and s.evictable()),
                key=lambda s: s.last_active_time,
            )
            if not victims:
                raise PoolExhausted(
                    f"all {self.limit} agent slots are busy and no session is idle",
                    metadata={"max_sessions": self.limit},
                    retry_after=POOL_RETRY_AFTER,
                )
            # suspend() frees the victim's slot once its agent is gone; if the victim was
            # taken meanwhile it answers False at once and the next one is tried.
            await victims[0].suspend()
        self.used += 1

    def try_acquire(self) -> bool:
        """Take a free slot if there is one; never suspends anyone (tidying up after a close)."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        assert self.used > 0, "slot released twice"
        self.used -= 1
