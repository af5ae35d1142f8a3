"""A bounded share of the event loop for all agents' output together.

Handling an agent's output is loop work: reading and parsing a line, validating an update,
relaying it to the client. An agent that writes as fast as it can always has more ready,
and a stream reader hands buffered lines over without yielding, so without a bound a few
flooding agents fill every loop pass: every other session, and every control RPC, waits
behind them, and the gateway's CPU is spent before the healthy agents' turn comes.

Each agent's reader, and each turn's relay, calls `take()` before each line or event:
- the first take after a loop pass starts a slice of SLICE seconds, shared by all;
- once it has run out, output still waiting is queued until the loop's next pass, in
  which the rest of the loop (RPCs, timers) runs; so other work waits at most about a
  SLICE for agents' output;
- when the output of several sessions contends (CONTENDED takers queued in a slice), the
  next slice starts only REST seconds later: the rest of the server runs, or the loop idles
  and the agents and clients get the CPU (on a busy machine, healthy agents wait for a CPU
  more than for the loop). Sustained contended output then gets at most about
  SLICE / (SLICE + REST) of the loop; a single session streaming alone is not slowed;
- a queued take, once let through, handles at least one line or event; those that found
  the slice spent go first, in the order they came, and the one that ran it out last, so
  an agent with output always ready cannot keep the others waiting slice after slice.

Output that does not fill a slice (the usual case) never waits.

FloodRate is the other bound: floods wait out gaps between their events, and the gap grows with
the number of floods, so that many floods cost no more events than a few.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SLICE = 0.001  # seconds of agents' output handled in one go, all agents together
REST = 0.0015  # seconds for everything else after a contended slice, before the next one
CONTENDED = 3  # takers queued in one slice: more than one session's reader and relay


class LoopShare:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started: float | None = None  # when the current slice began (None: no slice)
        self._resting = False  # a contended slice ran out; the next starts after REST
        self._last: object = None  # who took last: who ran the slice out, when it does
        self._waiting: list[asyncio.Future[None]] = []  # found the slice spent: first next time
        self._spent: list[asyncio.Future[None]] = []  # ran it out: after those

    async def take(self, taker: object) -> None:
        """Returns at once while the slice lasts, else when the next one starts."""
        if not self.take_now(taker):
            await self.wait_turn(taker)

    def take_now(self, taker: object) -> bool:
        """`take()` when it would return at once (True); False: the caller awaits `wait_turn()`.
        For the hot paths (a line, an event): most takes find the slice open, and then no
        coroutine is made."""
        now = time.perf_counter()
        if self._started is None:
            self._started = now
            self._loop.call_soon(self._pass_ended)
        elif self._resting or now - self._started >= SLICE:
            return False
        self._last = taker
        return True

    async def wait_turn(self, taker: object) -> None:
        """Until the next slice lets `taker` through (it found this one spent)."""
        turn = self._loop.create_future()
        (self._spent if taker is self._last else self._waiting).append(turn)
        await turn
        self._last = taker

    def _pass_ended(self) -> None:
        """The slice's pass is over: the next slice may start now, or after a rest."""
        if len(self._waiting) + len(self._spent) >= CONTENDED:
            self._resting = True
            self._loop.call_later(REST, self._next_slice)
        else:
            self._next_slice()

    def _next_slice(self) -> None:
        self._resting = False
        self._started = None
        queue = self._waiting + self._spent
        self._waiting, self._spent = [], []
        for turn in queue:
            if not turn.done():  # a taker cancelled meanwhile (its agent ended) is skipped
                turn.set_result(None)


class FloodRate:
    """A rate shared by the floods of one kind: while `n` of them flood, each one's steps are
    n / per_second seconds apart, `least` at least, so that many floods together cost the
    gateway no more steps a second than a few, and one flood alone is not slowed. A flood
    counts from `join` to `leave`, or until it is collected (held weakly)."""

    def __init__(self, least: float, per_second: float) -> None:
        self.least = least
        self.per_second = per_second
        self._floods: weakref.WeakSet[object] = weakref.WeakSet()

    def join(self, flood: object) -> None:
        self._floods.add(flood)

    def leave(self, flood: object) -> None:
        self._floods.discard(flood)

    def counts(self, flood: object) -> bool:
        return flood in self._floods

    def gap(self) -> float:
        return max(self.least, len(self._floods) / self.per_second)

    def left(self, since: float) -> float:
        """Seconds left of a gap that began at `since` (loop time); none when not above 0."""
        return since + self.gap() - asyncio.get_running_loop().time()


def per_loop(registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T], make: Callable[[], T]) -> T:
    """The running loop's entry of `registry`, made by `make()` the first time it is asked for."""
    loop = asyncio.get_running_loop()
    entry = registry.get(loop)
    if entry is None:
        entry = registry[loop] = make()
    return entry


_shares: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopShare] = weakref.WeakKeyDictionary()


def loop_share() -> LoopShare:
    """The running loop's share (one per loop: the agents on it share its slices)."""
    return per_loop(_shares, lambda: LoopShare(asyncio.get_running_loop()))
