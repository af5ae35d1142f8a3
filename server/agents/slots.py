"""Live-agent slots: at most `limit` sessions run an agent process at once, shared fairly.

A session's agent holder takes a slot to start an agent and gives it back once that agent's
process group is gone (not when somebody merely decided to stop it). When no slot is free,
an idle session is suspended (agent stopped, record kept) to free one; only when nothing
suitable is idle does the request fail POOL_EXHAUSTED. Picking a victim never waits on a
session somebody is working on: `suspend()` answers at once when the victim is in use.

Without authentication (`live_limit` is None) every session is the one trust domain's, and
the victim is simply the least recently used idle session. With authentication the slots are
shared between principals (whose the sessions are), by three rules:

1. A cap per principal: at most its `max_live_sessions` (tokens file; absent = no own limit)
   and never more than `limit - reserved_slots(limit)` live agents, so that one principal can
   never take the last slots from all others, not even with every one of its turns busy (busy
   sessions cannot be evicted, so only a reserve helps). At its cap a principal's next agent
   suspends its own least recently used idle session; with none idle the request fails
   QUOTA_EXCEEDED (QuotaFailure naming the bound, RetryInfo).
2. When every slot is taken, the victim is first the least recently used idle session of a
   principal over its fair share (`limit` divided by the principals holding slots, the
   requester counted) or over its own `max_live_sessions` (lowered by a reload).
3. Otherwise a principal evicts its own idle sessions, and another principal's only while
   taking the slot keeps it within its fair share: one that already has its share cannot push
   out those who hold less. Nothing to evict: POOL_EXHAUSTED.

Which principal holds each slot is read off the sessions (`holds_slot`, `principal`), so slots need
no bookkeeping of their own beyond `used`, and never import sessions or the pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sessiongate.server.errors import PoolExhausted, QuotaExceeded, SessionGateError

POOL_RETRY_AFTER = 5.0  # seconds suggested in RetryInfo when every slot is busy

# A principal's max_live_sessions by name (None: no limit of its own); read at every acquire,
# so a reloaded tokens file applies to the next agent started.
LiveLimit = Callable[[str], "int | None"]


def reserved_slots(limit: int) -> int:
    """Slots one principal can never take from the others: an eighth, at least one (none of one)."""
    return max(1, limit // 8) if limit > 1 else 0


@runtime_checkable
class Evictable(Protocol):
    """What slots need of a session: whose it is, whether it holds a slot, is it idle, and
    suspend it (never waiting on whoever works on it)."""

    principal: str  # the principal the session belongs to ("" without authentication)
    last_active_time: float

    @property
    def holds_slot(self) -> bool: ...

    def evictable(self) -> bool: ...

    async def suspend(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _Cap:
    """The most live agents a principal may run, and what to say when it is reached."""

    limit: int
    quota: str  # the QuotaFailure description
    why: str  # the end of the message
    metadata: dict[str, object]


class Slots:
    def __init__(
        self,
        limit: int,
        candidates: Callable[[], Iterable[Evictable]],
        live_limit: LiveLimit | None = None,
    ) -> None:
        """`candidates`: every session that may hold a slot (also those being created or
        closed, so each principal's count is right; only evictable ones are ever suspended).
        `live_limit`: None without authentication (one trust domain: no caps, plain LRU)."""
        self.limit = limit
        self.used = 0
        self._candidates = candidates
        self._live_limit = live_limit

    async def acquire(self, requester: object) -> None:
        """Take a slot for `requester` (a session), suspending idle sessions as needed.

        Raises QuotaExceeded (the requester's principal is at its cap and none of its sessions
        is idle) or PoolExhausted (every slot taken and nothing this request may evict is idle).
        """
        principal = requester.principal if isinstance(requester, Evictable) else ""
        # Each pass re-reads who holds what: a suspend awaits its victim's stop, and others
        # may take or give back slots meanwhile.
        while True:
            others = [s for s in self._candidates() if s is not requester]
            held = Counter(s.principal for s in others if s.holds_slot)
            cap = self._cap(principal)
            if cap is not None and held[principal] >= cap.limit:
                victims = _lru(s for s in others if s.principal == principal and s.evictable())
                if not victims:
                    raise QuotaExceeded(
                        f"principal {principal!r} {cap.why}, and none of its sessions is idle to suspend",
                        metadata={"principal": principal, **cap.metadata},
                        retry_after=POOL_RETRY_AFTER,
                        quota=(f"principal:{principal}", cap.quota),
                    )
            elif self.used < self.limit:
                self.used += 1
                return
            else:
                victims = self._victims(principal, others, held)
                if not victims:
                    raise self._exhausted()
            # suspend() frees the victim's slot once its agent is gone; if the victim was
            # taken meanwhile it answers False at once and the next pass picks again.
            await victims[0].suspend()

    def try_acquire(self, requester: object) -> bool:
        """Take a free slot if there is one and the requester's principal is within its cap;
        never suspends anyone (tidying up after a close)."""
        if self.used >= self.limit:
            return False
        principal = requester.principal if isinstance(requester, Evictable) else ""
        cap = self._cap(principal)
        if cap is not None:
            held = sum(
                1
                for s in self._candidates()
                if s is not requester and s.holds_slot and s.principal == principal
            )
            if held >= cap.limit:
                return False
        self.used += 1
        return True

    def release(self) -> None:
        assert self.used > 0, "slot released twice"
        self.used -= 1

    def _cap(self, principal: str) -> _Cap | None:
        """Rule 1: the tighter of the principal's max_live_sessions and the others' reserve."""
        if self._live_limit is None:
            return None
        reserve = reserved_slots(self.limit)
        most = self.limit - reserve
        own = self._live_limit(principal)
        if own is None and reserve == 0:
            return None  # a single slot: nothing to keep for others
        if own is not None and own <= most:
            return _Cap(
                own,
                f"max_live_sessions is {own}",
                f"may run {own} agents at once (max_live_sessions)",
                {"max_live_sessions": own},
            )
        return _Cap(
            most,
            f"fair share: at most {most} of the {self.limit} agent slots",
            f"may run at most {most} of the {self.limit} agents ({reserve} kept for other principals)",
            {"max_sessions": self.limit, "reserved_slots": reserve},
        )

    def _victims(self, principal: str, others: list[Evictable], held: Counter[str]) -> list[Evictable]:
        """Rules 2 and 3: who may be suspended for `principal` when every slot is taken, best first."""
        idle = [s for s in others if s.evictable()]
        if self._live_limit is None:
            return _lru(idle)
        share = self.limit / len(held.keys() | {principal})
        over = {}
        for name in held.keys() | {principal}:
            cap = self._cap(name)
            over[name] = held[name] > share or (cap is not None and held[name] > cap.limit)
        within = held[principal] + 1 <= share  # still within its share with this slot
        allowed = [s for s in idle if within or s.principal == principal or over.get(s.principal, False)]
        return sorted(allowed, key=lambda s: (not over.get(s.principal, False), s.last_active_time))

    def _exhausted(self) -> SessionGateError:
        shared = self._live_limit is not None
        why = "no session this request may evict is idle" if shared else "no session is idle"
        return PoolExhausted(
            f"all {self.limit} agent slots are busy and {why}",
            metadata={"max_sessions": self.limit},
            retry_after=POOL_RETRY_AFTER,
        )


def _lru(sessions: Iterable[Evictable]) -> list[Evictable]:
    return sorted(sessions, key=lambda s: s.last_active_time)
