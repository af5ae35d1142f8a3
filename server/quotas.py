"""Quotas: how many sessions a principal and the server keep, and how fast a principal prompts.

Over a quota is RESOURCE_EXHAUSTED / QUOTA_EXCEEDED with a QuotaFailure naming it, and
RetryInfo where waiting helps (the prompt rate). Live agents per principal (`max_live_sessions`
and a fair share of the agent slots) are bounded by server/slots.py, which raises the same.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from server.errors import QuotaExceeded
from server.principals import Principal

WINDOW = 60.0  # seconds of the prompt-rate window


class PromptRate:
    """Prompts per principal in any sliding minute; memory bounded by each principal's limit."""

    def __init__(self) -> None:
        self._sent: dict[str, deque[float]] = {}

    def admit(self, principal: Principal) -> None:
        limit = principal.max_prompts_per_minute
        if limit is None:
            return
        now = time.monotonic()
        sent = self._sent.setdefault(principal.name, deque())
        while sent and now - sent[0] >= WINDOW:
            sent.popleft()
        if len(sent) >= limit:
            raise QuotaExceeded(
                f"principal {principal.name!r} may send {limit} prompts a minute",
                metadata={"principal": principal.name, "max_prompts_per_minute": limit},
                retry_after=WINDOW - (now - sent[0]),
                quota=(f"principal:{principal.name}", f"max_prompts_per_minute is {limit}"),
            )
        sent.append(now)


def check_room(owners: Iterable[str], principal: Principal, max_stored: int) -> None:
    """Before a create: `owners` are the owners of every session kept or being created."""
    owners = list(owners)
    if len(owners) >= max_stored:
        raise QuotaExceeded(
            f"the server keeps at most {max_stored} sessions; close some first",
            metadata={"max_stored_sessions": max_stored},
            quota=("server", f"max_stored_sessions is {max_stored}"),
        )
    limit = principal.max_sessions
    if limit is not None and sum(owner == principal.name for owner in owners) >= limit:
        raise QuotaExceeded(
            f"principal {principal.name!r} may keep {limit} sessions; close some first",
            metadata={"principal": principal.name, "max_sessions": limit},
            quota=(f"principal:{principal.name}", f"max_sessions is {limit}"),
        )
