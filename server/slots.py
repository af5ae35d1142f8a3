"""Live-agent slots: at most `limit` sessions run an agent process at once.

A session takes a slot to start its agent and gives it back when the agent stops. When no
slot is free, the least recently used idle session is suspended (agent stopped, record
kept) to free one; only when nothing is idle does the request fail POOL_EXHAUSTED. Picking
a victim never waits on a busy session: a session whose turn lock is held is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from server.errors import PoolExhausted

if TYPE_CHECKING:
    from server.session import Session

POOL_RETRY_AFTER = 5.0  # seconds suggested in RetryInfo when every slot is busy


class Slots:
    def __init__(self, limit: int, sessions: Callable[[], Iterable[Session]]) -> None:
        self.limit = limit
        self.used = 0
        self._sessions = sessions

    async def acquire(self, requester: Session) -> None:
        """Take a slot, suspending idle sessions (least recently used first) as needed."""
        while self.used >= self.limit:
            victims = sorted(
                (s for s in self._sessions() if s is not requester and s.evictable()),
                key=lambda s: s.last_active_time,
            )
            if not victims:
                raise PoolExhausted(
                    f"all {self.limit} agent slots are busy and no session is idle",
                    metadata={"max_sessions": self.limit},
                    retry_after=POOL_RETRY_AFTER,
                )
            # suspend() frees the victim's slot; if it lost a race (a turn began), try the next.
            await victims[0].suspend()
        self.used += 1

    def release(self) -> None:
        self.used -= 1
