"""One running turn: its timestamps, and the buffer between the agent and the client.

The agent connection pushes updates in; the session takes them out for the client. Two
things happen in between:
- backpressure: past HIGH_WATER buffered events the agent's output is no longer read, until
  the client has taken the buffer down to LOW_WATER, so a fast agent waits on its own pipe
  instead of filling the server's memory and event loop;
- coalescing: when the client is behind, consecutive text chunks of one message that are
  already buffered leave as one event. Nothing is reordered and nothing waits for more.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from acp import schema

from server.agent import AgentConnection, TurnItem

HIGH_WATER = 256
LOW_WATER = 64
MAX_COALESCED_CHARS = 64 * 1024  # one event carries at most this much merged text
TEXT_CHUNKS = ("agent_message_chunk", "agent_thought_chunk")


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
class TextRun:
    """Consecutive text chunks of one message, merged (see coalescing above)."""

    kind: str  # "agent_message_chunk" or "agent_thought_chunk"
    text: str
    message_id: str


class Marker:
    """Buffer items that are not events."""


PROMPT_DONE = Marker()  # the upstream `session/prompt` request finished (any outcome)
WAKE = Marker()  # only re-arms the turn's wait (cancel, reap)


@dataclass(eq=False)
class Turn:
    """One running turn. Its timestamps are readable without the session lock."""

    stall_timeout: float
    deadline: float  # loop time at which the turn times out
    agent: AgentConnection | None = None
    started_at: float = field(default_factory=time.time)
    last_event_at: float = field(default_factory=time.time)
    last_seq: int = 0
    cancel_deadline: float | None = None  # set by cancel(): loop time by which the agent must stop
    reaped: bool = False  # the sweeper ended this turn because its handler was stuck
    prompt_task: asyncio.Task[schema.PromptResponse] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    _items: deque[TurnItem] = field(default_factory=deque)
    _waiter: asyncio.Future[None] | None = None

    # ---- the agent side --------------------------------------------------------------

    def push(self, item: TurnItem) -> None:
        """An update from the agent (the connection's sink for this turn)."""
        self.last_event_at = time.time()
        self.mark(item)
        if len(self._items) >= HIGH_WATER and self.agent is not None:
            self.agent.pause_reading()

    def mark(self, item: TurnItem) -> None:
        """Buffer an item without counting it as agent activity (markers)."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the client side -------------------------------------------------------------

    def buffered(self) -> int:
        return len(self._items)

    async def wait(self) -> None:
        """Until something is buffered (bound it with a timeout)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take(self) -> TurnItem:
        """The next item (something must be buffered), with already-buffered text merged in."""
        item = self._items.popleft()
        if self._items and getattr(item, "session_update", None) in TEXT_CHUNKS:
            item = self._coalesce(item)
        agent = self.agent
        if agent is not None and agent.reading_paused and len(self._items) <= LOW_WATER:
            agent.resume_reading()
            self.last_event_at = time.time()  # held back by us, not silent: the stall clock restarts
        return item

    def _coalesce(self, first: Any) -> TurnItem:
        kind, message_id = first.session_update, first.message_id
        text = _text(first)
        if text is None:
            return first
        parts, size = [text], len(text)
        while self._items and size < MAX_COALESCED_CHARS:
            following = self._items[0]
            if getattr(following, "session_update", None) != kind or following.message_id != message_id:
                break
            more = _text(following)
            if more is None:
                break
            self._items.popleft()
            parts.append(more)
            size += len(more)
        if len(parts) == 1:
            return first
        return TextRun(kind, "".join(parts), message_id or "")


def _text(chunk: Any) -> str | None:
    content = chunk.content
    return content.text if getattr(content, "type", None) == "text" else None
