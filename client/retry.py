"""Opt-in retries of the errors that say "try again later": SESSION_BUSY and POOL_EXHAUSTED.

The server's RetryInfo delay is honoured; the total wait is bounded by `max_wait`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sessiongate.client.errors import PoolExhausted, SessionBusy, SessionGateError

T = TypeVar("T")
RETRYABLE: tuple[type[SessionGateError], ...] = (SessionBusy, PoolExhausted)
DEFAULT_DELAY = 1.0  # when the server gives no RetryInfo


def _next_delay(error: SessionGateError, deadline: float) -> float | None:
    """How long to sleep before the next attempt, or None when the budget is spent."""
    delay = error.retry_delay if error.retry_delay is not None else DEFAULT_DELAY
    return None if time.monotonic() + delay > deadline else delay


async def retry_async(call: Callable[[], Awaitable[T]], *, max_wait: float = 30.0) -> T:
    """Await `call()` until it does not fail busy/exhausted, waiting at most `max_wait` in all.

    Example: `text, result = await retry_async(lambda: client.reply(sid, "hi"), max_wait=60)`
    """
    deadline = time.monotonic() + max_wait
    while True:
        try:
            return await call()
        except RETRYABLE as error:
            delay = _next_delay(error, deadline)
            if delay is None:
                raise
            await asyncio.sleep(delay)


def retry(call: Callable[[], T], *, max_wait: float = 30.0) -> T:
    """The blocking twin of `retry_async`."""
    deadline = time.monotonic() + max_wait
    while True:
        try:
            return call()
        except RETRYABLE as error:
            delay = _next_delay(error, deadline)
            if delay is None:
                raise
            time.sleep(delay)
