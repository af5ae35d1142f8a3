"""Agents' CPU priority (server/sandbox/priority.py): an autogroup change the kernel refuses
for coming too soon after another (EAGAIN, unprivileged servers) is retried while the process
lives, and never after."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from sessiongate.server.sandbox import priority

from tests.conftest import eventually


class Autogroups:
    """/proc/PID/autogroup as the kernel answers an unprivileged writer: EAGAIN `busy` times."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.written: list[tuple[str, str]] = []

    def open(self, path: str, mode: str = "r", *args: Any, **kwargs: Any) -> io.StringIO:
        assert path.endswith("/autogroup") and mode == "w", path
        if self.busy:
            self.busy -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        outer = self

        class Written(io.StringIO):
            def close(self) -> None:
                outer.written.append((path, self.getvalue()))
                super().close()

        return Written()


async def test_a_refused_autogroup_change_is_retried_until_it_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Autogroups(busy=3)
    monkeypatch.setattr(priority, "open", kernel.open, raising=False)
    monkeypatch.setattr(priority, "AUTOGROUP_RETRY", 0.01)
    monkeypatch.setattr(priority.os, "setpriority", lambda *_: None)
    priority.lower(4242, 10, lambda: True)
    await eventually(lambda: bool(kernel.written), timeout=5, what="the autogroup change")
    assert kernel.written == [("/proc/4242/autogroup", "10")] and kernel.busy == 0


async def test_retries_are_bounded_and_end_with_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(priority, "AUTOGROUP_RETRY", 0.01)
    monkeypatch.setattr(priority, "AUTOGROUP_TRIES", 5)
    monkeypatch.setattr(priority.os, "setpriority", lambda *_: None)
    always_busy = Autogroups(busy=1_000)
    monkeypatch.setattr(priority, "open", always_busy.open, raising=False)
    priority.lower(4242, 10, lambda: True)
    await eventually(lambda: always_busy.busy == 1_000 - 5, timeout=10, what="5 tries")
    await asyncio.sleep(0.2)  # ten retry periods more: no sixth try
    assert always_busy.busy == 1_000 - 5 and not always_busy.written

    gone_soon = Autogroups(busy=1_000)
    monkeypatch.setattr(priority, "open", gone_soon.open, raising=False)
    monkeypatch.setattr(priority, "AUTOGROUP_TRIES", 1_000)
    running = True
    priority.lower(4242, 10, lambda: running)
    await eventually(lambda: gone_soon.busy <= 1_000 - 3, timeout=5, what="a few retries")
    running = False
    tried = gone_soon.busy
    await asyncio.sleep(0.2)
    assert gone_soon.busy == tried and not gone_soon.written  # the next retry found it gone
