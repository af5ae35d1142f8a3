"""Who works on a session right now: one holder of its lock at a time, waiters served in
arrival order.

This replaces an `asyncio.Lock` on purpose. Its `locked()` is False between a release
and the moment the woken waiter runs, so a fail-fast check ("is anyone working on it?")
could see a session free that was already promised to a waiter, and then queue behind that
waiter's whole turn. Here a release hands the lock to the first waiter at once: `busy` is
True for the whole hand-off, and a caller that must not wait never does.

The holder is named by its role ("turn", "recovery", "start", ...) so the session's state
can be read off it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    role: str
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SessionLock:
    """The lock on a session's work: held by one role at a time, handed straight to a waiter."""

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self.role: str | None = None  # None: nobody holds the lock
        self._waiters: deque[_Waiter] = deque()
        self._on_release = on_release  # after every release, whoever made it

    @property
    def busy(self) -> bool:
        return self.role is not None

    @property
    def waiting(self) -> int:
        """Callers queued for the lock (prompts with a wait_timeout)."""
        return len(self._waiters)

    def try_take(self, role: str) -> bool:
        """Take the lock if nobody holds it; never waits."""
        if self.role is not None:
            return False
        self.role = role
        return True

    async def take(self, role: str, timeout: float) -> bool:
        """Take the lock within `timeout` seconds (0: only if free now). False if not granted."""
        if self.try_take(role):
            return True
        if timeout <= 0:
            return False
        waiter = _Waiter(role)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.granted
            return True
        except TimeoutError:
            # Granted in the same instant the timeout fired: it is ours, keep it.
            return _granted(waiter)
        except BaseException:
            if _granted(waiter):  # granted, but our caller is gone: pass it on
                self.release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def hand_over(self, role: str) -> None:
        """The holder changes role (a turn becomes its own recovery) without releasing."""
        assert self.role is not None, "hand_over without the lock"
        self.role = role

    def release(self) -> None:
        """Give the lock to the first waiter still waiting, or to nobody."""
        self.role = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.granted.done():
                self.role = waiter.role
                waiter.granted.set_result(None)
                break
        if self._on_release is not None:
            self._on_release()


def _granted(waiter: _Waiter) -> bool:
    return waiter.granted.done() and not waiter.granted.cancelled()
