"""One turn's events on their way from the agent to the client, and the turn's clocks.

The agent connection pushes updates in, the turn's runner pushes the turn's last item (its
result or its error), and the turn's pump takes them out into the turn log (turn_log.py),
which every reader reads. Two things happen in between:
- backpressure: past HIGH_WATER buffered events or HIGH_WATER_BYTES buffered bytes, whichever
  comes first, the agent's output is no longer read, until the pump has taken the buffer down
  to both LOW_WATER and LOW_WATER_BYTES (the pump waits for a prompting client that is
  behind, never for watchers), so a fast agent waits on its own pipe instead of filling the
  server's memory and event loop: the buffer holds at most HIGH_WATER_BYTES plus the one
  update that crossed it (an agent's line is at most agent_transport.LINE_LIMIT). Once nobody
  will read the rest (the client left, or asked to cancel) the agent is never held back
  again: the buffer keeps as much and drops the others, so the agent's answer gets through.
- coalescing: consecutive text chunks of one message that are already buffered leave as one
  event. Nothing is reordered; the turn log's pump waits for more only while text streams
  faster than one event per turn_log.EVENT_GAP (a flood; the gap grows while many turns
  stream text), never for a turn's first event, and not once something that is not text comes.

Clocks are the event loop's monotonic clock; wall-clock times are only for display.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from acp import schema
from pydantic import BaseModel
from sessiongate.server.agents.protocol import AgentProcess, TurnItem
from sessiongate.server.agents.transport import TEXT_CHUNKS, TextRun
from sessiongate.server.errors import SessionGateError

HIGH_WATER = 256
LOW_WATER = 64
HIGH_WATER_BYTES = 4 * 1024 * 1024  # of buffered updates, as item_bytes() estimates them
LOW_WATER_BYTES = 1024 * 1024
ITEM_BYTES = 64  # what an item costs besides its strings (an estimate)
MAX_COALESCED_CHARS = 64 * 1024  # one event carries at most this much merged text
EVENT_OVERHEAD = 1024  # bytes of an event besides its text (ids, tags), kept free when splitting


@dataclass(frozen=True, slots=True)
class Notice:
    """A message from sessiongate itself, streamed as a turn event."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """The last item of a turn that ended OK."""

    stop_reason: str
    usage: schema.Usage | None = None


@dataclass(frozen=True, slots=True)
class _Last:
    """The turn's last item: a TurnEnd, or the error the client's stream ends with."""

    outcome: TurnEnd | BaseException


def _now() -> float:
    return asyncio.get_running_loop().time()


@dataclass(eq=False)
class Turn:
    """One turn: a buffer between agent and client, and clocks readable without any lock."""

    stall_timeout: float
    max_duration: float
    agent: AgentProcess | None = None
    max_event_bytes: int = 1_048_576  # a longer text chunk goes out as several events, in order
    permission_policy: str = ""  # this turn's override of the agent's policy ("ask": the client decides)
    permission_timeout: float = 300.0  # how long a question waits on the client (questions.py)
    asking: int = 0  # questions waiting on the client now: the stall watchdog does not count
    started_at: float = field(default_factory=_now)  # loop time
    started_wall: float = field(default_factory=time.time)  # for display only
    last_event_at: float = field(default_factory=_now)  # loop time of the agent's last update
    delivered: int = 0  # events taken by the client so far (the last one's seq)
    dropped: int = 0  # updates dropped because nobody will read them
    _items: deque[TurnItem | _Last] = field(default_factory=deque)
    _sizes: deque[int] = field(default_factory=deque)  # item_bytes() of each of _items
    _bytes: int = 0  # their sum
    _waiter: asyncio.Future[None] | None = None
    _not_text_waiter: asyncio.Future[None] | None = None  # until_not_text()'s
    _ended: bool = False
    _holding_back: bool = True  # backpressure on; off once nobody will read the rest
    on_end: Callable[[], None] | None = None  # told when the last item is in (the turn log's pump)
    _underway: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def deadline(self) -> float:
        """Loop time at which the turn times out."""
        return self.started_at + self.max_duration

    @property
    def ended(self) -> bool:
        """The last item is in: the client's stream ends once it has read what is buffered."""
        return self._ended

    def elapsed(self) -> float:
        return _now() - self.started_at

    def since_last_event(self) -> float:
        return _now() - self.last_event_at

    def last_event_wall(self) -> float:
        return time.time() - self.since_last_event()

    # ---- the agent side --------------------------------------------------------------

    def push(self, item: TurnItem) -> None:
        """An update from the agent (the connection's sink for this turn)."""
        self.last_event_at = _now()
        if self._ended:
            return
        if not self._holding_back and self._full():
            self.dropped += 1
            return
        self._append(item)
        if self._holding_back and self._full() and self.agent is not None:
            self.agent.pause_reading()

    def _full(self) -> bool:
        return len(self._items) >= HIGH_WATER or self._bytes >= HIGH_WATER_BYTES

    def stop_holding_back(self) -> None:
        """Nobody will read the rest (client gone, or cancelling): never pause the agent again."""
        self._holding_back = False
        if self.agent is not None and self.agent.reading_paused:
            self.agent.resume_reading()
            self.last_event_at = _now()

    # ---- the runner side -------------------------------------------------------------

    def underway(self) -> None:
        """The prompt is on its way to the agent (written, or its task writes it before the
        waiting handler runs again: asyncio runs callbacks in the order they were scheduled),
        or the turn has to start its agent first, or it ended: its client's response headers
        need not wait."""
        self._underway.set()

    async def wait_underway(self, timeout: float) -> None:
        """Until underway(), at most `timeout` seconds (it comes within the runner's first steps)."""
        if not self._underway.is_set():
            await _within(timeout, self._underway.wait())

    def notice(self, notice: Notice) -> None:
        if not self._ended:
            self._append(notice)

    def end(self, outcome: TurnEnd | BaseException) -> None:
        """The turn's last item; anything pushed after it is ignored. Only the first counts."""
        if self._ended:
            return
        if self.dropped:
            self._append(Notice("events_dropped", f"{self.dropped} agent updates were dropped after cancel"))
        self._ended = True
        self._underway.set()
        self._append(_Last(outcome))
        if self.on_end is not None:
            self.on_end()

    def _append(self, item: TurnItem | _Last) -> None:
        size = item_bytes(item)
        self._items.append(item)
        self._sizes.append(size)
        self._bytes += size
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        waiter = self._not_text_waiter
        if waiter is not None and type(item) is not TextRun and not waiter.done() and _as_text(item) is None:
            waiter.set_result(None)

    # ---- the client side -------------------------------------------------------------

    def buffered(self) -> int:
        return len(self._items)

    def buffered_bytes(self) -> int:
        """What the buffered items hold, as item_bytes() estimates it."""
        return self._bytes

    def _pop(self) -> TurnItem | _Last:
        self._bytes -= self._sizes.popleft()
        return self._items.popleft()

    def _put_back(self, item: TurnItem) -> None:
        size = item_bytes(item)
        self._items.appendleft(item)
        self._sizes.appendleft(size)
        self._bytes += size

    async def next(self) -> TurnItem:
        """The next event: updates, Notices, then the TurnEnd; a failed turn raises its error.

        Waits for the runner, which always ends the turn within its bounds (stall, turn
        duration, cancel grace), with the sweeper's reaper behind it.
        """
        await self.buffering()
        return self.next_ready()

    async def buffering(self) -> None:
        """Until an item is buffered (`next()` without taking it)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def buffering_within(self, timeout: float) -> bool:
        """`buffering()` for at most `timeout` seconds: whether an item is buffered."""
        return await _within(timeout, self.buffering())

    async def until_not_text(self, timeout: float) -> bool:
        """Until something that is not text is buffered (the turn's end included: True), at most
        `timeout` seconds (False): text that comes meanwhile does not wake the waiter."""
        self._not_text_waiter = asyncio.get_running_loop().create_future()
        try:
            return await _within(timeout, self._not_text_waiter)
        finally:
            self._not_text_waiter = None

    def text_to_merge(self) -> bool:
        """What is buffered is text still coming (the first and the newest buffered items are
        text chunks, the turn not over): waiting a moment more lets more of it leave as one event."""
        items = self._items
        if not items or self._ended:
            return False
        return _as_text(items[0]) is not None and _as_text(items[-1]) is not None

    def next_ready(self) -> TurnItem:
        """`next()` when an item is buffered, without its waits (the pump's usual case)."""
        item = self._take()
        if isinstance(item, _Last):
            if isinstance(item.outcome, BaseException):
                if isinstance(item.outcome, SessionGateError) and "last_seq" in item.outcome.metadata:
                    item.outcome.metadata["last_seq"] = str(self.delivered)  # what this client saw
                raise item.outcome
            item = item.outcome
        self.delivered += 1
        return item

    def _take(self) -> TurnItem | _Last:
        """The next item, with already-buffered text merged in."""
        item = self._pop()
        if self._items and (run := _as_text(item)) is not None:
            item = self._coalesce(item, run)
        item = self._split(item)
        agent = self.agent
        # An ended turn's agent may already serve the next turn: its pauses are not ours to undo.
        low = len(self._items) <= LOW_WATER and self._bytes <= LOW_WATER_BYTES
        if not self._ended and agent is not None and agent.reading_paused and low:
            agent.resume_reading()
            self.last_event_at = _now()  # held back by us, not silent: the stall clock restarts
        return item

    def _split(self, item: Any) -> Any:
        """A text chunk over `max_event_bytes` as its first part; the rest goes back in front."""
        run = _as_text(item)
        if run is None:
            return item
        kind, text, message_id = run.kind, run.text, run.message_id
        budget = max(self.max_event_bytes - EVENT_OVERHEAD, 1024)
        if len(text) * 4 <= budget or len(data := text.encode()) <= budget:
            return item
        head = data[:budget].decode(errors="ignore")  # whole characters only
        self._put_back(TextRun(kind, text[len(head) :], message_id))
        return TextRun(kind, head, message_id)

    def _coalesce(self, first: TurnItem, run: TextRun) -> TurnItem:
        """`first` (whose text is `run`) with the chunks of its message buffered after it."""
        parts, size = [run.text], len(run.text)
        while self._items and size < MAX_COALESCED_CHARS:
            following = _as_text(self._items[0])
            if following is None or following.kind != run.kind or following.message_id != run.message_id:
                break
            self._pop()
            parts.append(following.text)
            size += len(following.text)
        if len(parts) == 1:
            return first
        return TextRun(run.kind, "".join(parts), run.message_id)


async def _within(timeout: float, awaitable: Awaitable[object]) -> bool:
    """Whether `awaitable` is done within `timeout` seconds (it is cancelled if not)."""
    try:
        async with asyncio.timeout(timeout):
            await awaitable
    except TimeoutError:
        return False
    return True


def item_bytes(item: object) -> int:
    """A cheap estimate of the memory `item` holds: its strings' lengths plus ITEM_BYTES per
    part. A text chunk (nearly every item of a flood) costs a length; anything else a walk of
    its fields, less work than parsing it from the agent's line took."""
    if type(item) is TextRun:  # nearly every item of a flood: checked first, without a call
        return ITEM_BYTES + len(item.text)
    if (run := _as_text(item)) is not None:
        return ITEM_BYTES + len(run.text)
    size = 0
    parts: list[object] = [item]
    while parts:  # a stack, not recursion: JSON may nest deeply
        part = parts.pop()
        size += ITEM_BYTES
        if isinstance(part, (str, bytes)):
            size += len(part)
        elif isinstance(part, dict):
            parts.extend(part.keys())
            parts.extend(part.values())
        elif isinstance(part, (list, tuple)):
            parts.extend(part)
        elif isinstance(part, BaseModel):
            parts.extend(part.__dict__.values())
            parts.extend((part.model_extra or {}).values())
        elif dataclasses.is_dataclass(part) and not isinstance(part, type):
            parts.extend(getattr(part, f.name) for f in dataclasses.fields(part))
    return size


def _as_text(item: object) -> TextRun | None:
    """A text chunk's text: a TextRun as it is, an ACP text chunk (a model) as one; else None."""
    if type(item) is TextRun:
        return item
    kind = getattr(item, "session_update", None)
    if kind in TEXT_CHUNKS and (text := _text(item)) is not None:
        return TextRun(kind, text, getattr(item, "message_id", None) or "")
    return None


def _text(chunk: Any) -> str | None:
    content = chunk.content
    return content.text if getattr(content, "type", None) == "text" else None
