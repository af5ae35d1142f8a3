"""A turn's events, numbered once, for every reader: its client, watchers and the transcript.

`pump` drains the Turn (turn.py: backpressure and coalescing between the agent and us) into
the TurnLog, translating each item into PromptEvents numbered 1, 2, 3 ... Every reader reads
the log by seq, so the prompting client and any number of watchers see one identical
sequence, and a client that reconnects asks for what follows the last seq it saw.

Where the events are:
- on disk: written in batches (every FLUSH_BYTES, or FLUSH_INTERVAL) to the state database,
  which is the turn's transcript; a reader behind what memory holds reads them back from there;
- in memory: the events not written yet, and a tail of MEMORY_BYTES for the readers that keep
  up. A detached turn that floods costs the server that much memory, not its whole output;
- within `max_turn_log_bytes` per turn over both: past it the oldest written batches are
  dropped, and a `turn_log_trimmed` notice says so. The result is never dropped (it is last).

Who waits for whom: while the prompting client reads, the pump runs at most PACE_LAG events,
and a quarter of the bound in bytes, ahead of it, so a slow client holds the agent back on its
own pipe as before; what it has read is trimmed while the pump waits, never only after. Nobody else
paces anything: a watcher reads at its own speed, and one that falls behind what is kept gets
SEQ_NOT_KEPT (with the oldest seq kept, to re-attach from). A turn whose client left
(ON_DISCONNECT_CONTINUE), or that nobody reads, runs at the agent's pace into the log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

import grpc
from google.rpc import status_pb2
from sessiongate.server.errors import (
    ReplayedFailure,
    SeqNotKept,
    SessionGateError,
    ShuttingDown,
    TurnInterrupted,
    failure_status,
)
from sessiongate.server.ids import opaque_id
from sessiongate.server.loop_share import FloodRate, loop_share, per_loop
from sessiongate.server.settings import MIN_TURN_LOG_BYTES
from sessiongate.server.state.base import Store
from sessiongate.server.state.turn_records import TurnRow
from sessiongate.server.turns import translate
from sessiongate.server.turns.turn import Turn, TurnEnd
from sessiongate.v1 import session_service_pb2 as pb

log = logging.getLogger("sessiongate.turn_log")

FLUSH_BYTES = 128 * 1024  # a batch of events is written once this much is waiting...
FLUSH_INTERVAL = 0.5  # ...or this many seconds after the first of them came
MEMORY_BYTES = 256 * 1024  # written events kept in memory for the readers that keep up
MAX_UNWRITTEN = 512 * 1024  # the pump waits while this much is not on disk yet (a slow disk)
EVENT_GAP = 0.001  # seconds: text that follows its last event sooner waits out the gap, merging
# what comes meanwhile (turn.py), so a flood costs an event per gap, not per chunk, and a chunk
# after a pause leaves at once. Each event costs the gateway (and its client) tens of µs.
FLOOD_EVENTS = 1000  # text events a second for all turns streaming text at once: each one's gap
# grows with their number (EVENT_GAP at least), so that many streams cost no more events than few.
PACE_LAG = 4  # events the pump may run ahead of the prompting client (few: what waits in the
# Turn is coalesced, see turn.py, and a stream of merged chunks relays more per event)
UNREAD_KEPT = 4096  # sizes kept for a prompting client that has not come to read yet
READ_BATCH = 256  # events a reader takes at once (and holds while its client is slow)
READ_BYTES = 256 * 1024  # ...or this many bytes of them from disk
WRITE_TIMEOUT = 30.0  # seconds a batch may take to be written before it is tried again

STATES = {
    "running": pb.TURN_STATE_RUNNING,
    "completed": pb.TURN_STATE_COMPLETED,
    "failed": pb.TURN_STATE_FAILED,
    "interrupted": pb.TURN_STATE_INTERRUPTED,
}


def new_turn_id() -> str:
    """96 random bits (see ids.opaque_id)."""
    return opaque_id(12)


@dataclass(slots=True)
class _Batch:
    """Events written together: the unit in which the bound drops old events."""

    first: int
    last: int
    size: int


class TurnLog:
    """One turn's numbered events, in memory and on disk, and its readers' waits."""

    def __init__(
        self,
        store: Store,
        record: pb.Turn,
        *,
        max_bytes: int,
        state: str = "running",
        failure: SessionGateError | None = None,
    ) -> None:
        self.store = store
        self.record = record  # without events: what ListTurns shows
        self.turn_id = record.turn_id
        self.state = state
        self.max_bytes = max(max_bytes, MIN_TURN_LOG_BYTES)
        # Unwritten events cannot be trimmed: few enough that a trim always gets under the bound.
        self._max_unwritten = min(MAX_UNWRITTEN, self.max_bytes // 4)
        self.failure = failure
        self.last_seq = record.last_seq
        self.oldest_seq = record.oldest_kept_seq or 1
        self._mem: list[pb.PromptEvent] = []
        self._sizes: list[int] = []
        self._mem_first = self.last_seq + 1  # seq of _mem[0]
        self._mem_bytes = 0
        self._written = self.last_seq  # the last seq on disk
        self._unwritten_bytes = 0
        self._disk: list[_Batch] = []
        self._kept_bytes = 0
        self._changed = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pacing = False
        self._paced_at = 0
        # Sizes of the events the prompting client has not read yet, and their sum; kept until
        # the client leaves, after which nothing paces the pump any more.
        self._unread: collections.deque[int] = collections.deque()
        self._unread_bytes = 0
        self._unread_first = self.last_seq + 1  # seq of _unread[0]
        self._paced_done = state != "running"
        self._turn_over = state != "running"  # the Turn has its last item: nothing paces the pump
        self._abandoned = False  # fenced: nothing more of this turn is written here
        self._closing = state != "running"  # no new writes are scheduled: close() does the last
        self.stored_fully = state != "running"  # closed: its final record is in the store

    @classmethod
    def stored(cls, store: Store, row: TurnRow, max_bytes: int = MIN_TURN_LOG_BYTES) -> TurnLog:
        """A turn from the transcript (finished, or interrupted by a restart): read from disk."""
        if row.state == "running":  # not live: its server died, or its record could not be
            row = replace(row, state="interrupted")  # finished; nothing will ever add to it
        record = pb.Turn.FromString(row.record)
        record.state = STATES.get(row.state, pb.TURN_STATE_UNSPECIFIED)
        record.oldest_kept_seq, record.last_seq = row.first_seq, row.last_seq
        failure: SessionGateError | None = None
        if row.state == "failed" and row.failure is not None:
            failure = ReplayedFailure(status_pb2.Status.FromString(row.failure))
        elif row.state == "interrupted":
            failure = TurnInterrupted(
                f"the server stopped while turn {row.turn_id} ran;"
                f" its events up to seq {row.last_seq} were kept",
                metadata={"turn_id": row.turn_id, "last_seq": row.last_seq},
            )
        return cls(store, record, max_bytes=max_bytes, state=row.state, failure=failure)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def next_seq(self) -> int:
        return self.last_seq + 1

    def summary(self) -> pb.Turn:
        """The turn as ListTurns shows it, up to date."""
        record = pb.Turn()
        record.CopyFrom(self.record)
        record.state = STATES[self.state]
        record.oldest_kept_seq = self.oldest_seq if self.last_seq else 0
        record.last_seq = self.last_seq
        return record

    def row(self) -> TurnRow:
        ended = self.record.end_time.ToMicroseconds() / 1e6 if self.record.HasField("end_time") else None
        failure = failure_status(self.failure).SerializeToString() if self.failure is not None else None
        return TurnRow(
            self.turn_id,
            self.record.session_id,
            self.record.start_time.ToMicroseconds() / 1e6,
            ended,
            self.state,
            self.oldest_seq,
            self._written,
            self.summary().SerializeToString(),
            failure,
        )

    # ---- the pump's side ---------------------------------------------------------------

    def append(self, events: list[pb.PromptEvent]) -> None:
        """Events of one item, numbered on from the last (the log owns the numbering): room is
        made first, so a trim's notice never follows the result."""
        sizes = [event.ByteSize() for event in events]
        if self._kept_bytes + sum(sizes) > self.max_bytes:
            self._trim()
        for event, size in zip(events, sizes, strict=True):
            event.seq = self.last_seq + 1
            self._mem.append(event)
            self._sizes.append(size)
            self._mem_bytes += size
            self._unwritten_bytes += size
            self._kept_bytes += size
            self.last_seq = event.seq
        if not self._paced_done:
            self._unread.extend(sizes)
            self._unread_bytes += sum(sizes)
            if not self._pacing and len(self._unread) > UNREAD_KEPT:  # nobody came to read
                self._stop_pacing()
        self._notify()
        self._schedule_write()

    async def room(self) -> None:
        """Until the pump may take another item: the prompting client is not too far behind
        (in events, and in bytes), and the disk keeps up.

        Each wait ends by something that moves on by itself: the client reading (it notifies),
        or a write finishing (it notifies, and is retried while the store fails). What the client
        has read and the disk holds is trimmed here too, not only at the next append: the pump
        must never wait for kept bytes to fall, since only a trim makes them fall."""
        while not self.has_room():
            await self._wait()

    def has_room(self) -> bool:
        """Whether `room()` would return at once (the pump's usual case: no coroutine then)."""
        if self._turn_over:  # what is left is the Turn's bounded buffer: the pump never waits
            return True
        if self._kept_bytes > self.max_bytes:
            self._trim()
        return not (self._client_behind() or self._unwritten_bytes > self._max_unwritten)

    def _client_behind(self) -> bool:
        """The prompting client is far enough behind that the pump waits for it: PACE_LAG
        events, or a quarter of the bound in bytes (so that what it has not read, what is not
        on disk yet and a batch it is inside of together stay within the bound). Not once the
        turn's last item is in: the agent is done (what is left is the Turn's bounded buffer),
        and the turn must end whether or not its client ever reads again (a fence, a close)."""
        if not self._pacing or self._turn_over:
            return False
        return self.last_seq - self._paced_at >= PACE_LAG or self._unread_bytes > self.max_bytes // 4

    def _stop_pacing(self) -> None:
        self._pacing, self._paced_done = False, True
        self._unread.clear()
        self._unread_bytes = 0

    def abandon(self) -> None:
        """The session moved to another replica (a fence): the new leaseholder has its record, so
        nothing more of this turn is written here, and nothing waits on a store that may hang
        (a write under way is cancelled). Its readers still get what is in memory and the end."""
        self._abandoned = self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._writer is not None:
            self._writer.cancel()
        self._notify()

    def turn_over(self) -> None:
        """The Turn has its last item (Turn.on_end): the pump drains the rest without waiting
        for the prompting client."""
        self._turn_over = True
        self._notify()

    def complete(self, result: pb.TurnResult) -> None:
        self.record.result.CopyFrom(result)
        self._end("completed")

    def fail(self, error: BaseException) -> None:
        if not isinstance(error, SessionGateError):
            error = _Internal("internal error; see the server log")
        if "last_seq" in error.metadata:
            error.metadata["last_seq"] = str(self.last_seq)  # what the client saw
        self.failure = error
        self.record.error.CopyFrom(
            pb.TurnError(code=error.code.name, reason=error.reason or "", message=error.message)
        )
        self._end("failed")

    def _end(self, state: str) -> None:
        self.state = state
        self.record.end_time.CopyFrom(translate.timestamp(time.time()))
        self._notify()

    async def close(self) -> None:
        """After the turn ended: its last events and its record on disk, its memory released."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._writer is not None:
            await asyncio.wait({self._writer})
        if self._abandoned:
            self._notify()
            return
        for _ in range(3):  # a write that failed is tried again, a few times
            if self._written >= self.last_seq:
                break
            await self._write()
        try:
            await self.store.put_turn(self.row())
        except SessionGateError as exc:
            log.warning("turn record not stored turn=%s: %s", self.turn_id, exc.message)
        if self._written >= self.last_seq:  # what is on disk is read from there from now on
            self._mem, self._sizes, self._mem_bytes = [], [], 0
            self._mem_first = self.last_seq + 1
            self.stored_fully = True
            self._disk = []
            self.record.ClearField("prompt")  # read from the store from now on (Transcripts.find)
        self._notify()

    # ---- readers -------------------------------------------------------------------------

    async def read(self, after_seq: int, *, pace: bool = False) -> AsyncGenerator[list[pb.PromptEvent], None]:
        """Batches of the events after `after_seq`, then the end: a failed turn raises its error.

        `pace`: this is the prompting client, whose reading paces the pump (until it leaves).
        Raises SeqNotKept when what is asked for (or what comes next, for a reader that fell
        behind) is no longer kept.
        """
        self._check_range(after_seq)
        following = after_seq + 1
        pace = pace and self.running and not self._paced_done
        if pace:
            self._pacing = True
            self._read_up_to(after_seq)
        try:
            while True:
                changed = self._changed
                batch = await self._fetch(following, READ_BATCH, READ_BYTES)
                if batch:
                    yield batch
                    following = batch[-1].seq + 1
                    if pace:
                        self._read_up_to(following - 1)
                        self._notify()
                    continue
                if not self.running:
                    if self.failure is not None:
                        raise self.failure.with_traceback(None)
                    return
                await changed.wait()
        finally:
            if pace:
                self._stop_pacing()
                self._notify()

    def _read_up_to(self, seq: int) -> None:
        """The prompting client has read every event up to `seq`."""
        self._paced_at = seq
        while self._unread and self._unread_first <= seq:
            self._unread_bytes -= self._unread.popleft()
            self._unread_first += 1

    async def events(self, after_seq: int, *, pace: bool = False) -> AsyncGenerator[pb.PromptEvent, None]:
        """`read` one event at a time, each taking its part of the loop's share for agents'
        output (loop_share.py): relaying an event to a client is the agent's output costing
        loop time, so a flood relayed to many readers cannot crowd out the rest of the server."""
        share = loop_share()
        async with contextlib.aclosing(self.read(after_seq, pace=pace)) as batches:
            async for batch in batches:
                for event in batch:
                    if not share.take_now(self):
                        await share.wait_turn(self)
                    yield event

    async def page(self, after_seq: int, max_bytes: int) -> tuple[list[pb.PromptEvent], bool]:
        """What is kept after `after_seq` now (0: from the oldest kept), at most about
        `max_bytes`; and whether more follows."""
        if after_seq:
            self._check_range(after_seq)
        following = max(after_seq + 1, self.oldest_seq)
        out: list[pb.PromptEvent] = []
        size, restarts = 0, 0
        while following <= self.last_seq:
            try:
                batch = await self._fetch(following, READ_BATCH, READ_BYTES)
            except SeqNotKept:
                restarts += 1
                if after_seq or restarts > 3:  # what was asked for went meanwhile
                    raise
                # "From the oldest kept", and that moved on meanwhile: again from there.
                out, size, following = [], 0, self.oldest_seq
                continue
            if not batch:
                break
            for event in batch:
                size += event.ByteSize() + 8
                if out and size > max_bytes:
                    return out, True
                out.append(event)
            following = batch[-1].seq + 1
        return out, False

    def _check_range(self, after_seq: int) -> None:
        if after_seq + 1 < self.oldest_seq or after_seq > self.last_seq:
            raise self._not_kept(after_seq)

    def _not_kept(self, after_seq: int) -> SeqNotKept:
        if after_seq + 1 < self.oldest_seq:
            why = f"events before seq {self.oldest_seq} of turn {self.turn_id} are no longer kept"
            why += f" (max_turn_log_bytes {self.max_bytes}); re-attach with after_seq {self.oldest_seq - 1}"
        else:
            why = f"turn {self.turn_id} has no seq {after_seq} (its last so far is {self.last_seq})"
        return SeqNotKept(
            why,
            metadata={
                "turn_id": self.turn_id,
                "oldest_kept_seq": self.oldest_seq,
                "last_seq": self.last_seq,
                "after_seq": after_seq,
            },
        )

    async def _fetch(self, seq: int, limit: int, max_bytes: int) -> list[pb.PromptEvent]:
        """Up to `limit` events from `seq` on, from memory or disk; [] when there are none yet."""
        if seq > self.last_seq:
            return []
        if seq < self.oldest_seq:
            raise self._not_kept(seq - 1)
        if seq >= self._mem_first:
            start = seq - self._mem_first
            return self._mem[start : start + limit]
        rows = await self.store.turn_events(self.turn_id, seq, limit, max_bytes)
        events = [pb.PromptEvent.FromString(row) for row in rows]
        if not events or events[0].seq != seq:  # dropped by the bound meanwhile
            raise self._not_kept(seq - 1)
        return events

    # ---- writing to disk, and the bound ---------------------------------------------------

    def _schedule_write(self) -> None:
        if self._writer is not None or self._closing:
            return
        if self._unwritten_bytes >= FLUSH_BYTES or not self.running:
            self._writer = asyncio.get_running_loop().create_task(self._write_task())
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._writer is None and self._written < self.last_seq and not self._closing:
            self._writer = asyncio.get_running_loop().create_task(self._write_task())

    async def _write_task(self) -> None:
        try:
            await self._write()
        finally:
            self._writer = None
        if self._written < self.last_seq and not self._closing:
            self._schedule_write()

    async def _write(self) -> None:
        """Write what is not on disk yet, as one batch (one writer at a time: the writer task,
        or close() once that is done)."""
        first, last = self._written + 1, self.last_seq
        if last < first:
            return
        start = first - self._mem_first
        events = self._mem[start : start + last - first + 1]
        size = sum(self._sizes[start : start + len(events)])
        rows = [(event.seq, event.SerializeToString()) for event in events]
        try:
            await self.store.add_turn_events(self.turn_id, rows, self.oldest_seq, last, WRITE_TIMEOUT)
        except SessionGateError as exc:
            log.warning("turn events not written yet turn=%s: %s", self.turn_id, exc.message)
            await asyncio.sleep(FLUSH_INTERVAL)
            return
        self._written = last
        self._unwritten_bytes -= size
        self._disk.append(_Batch(first, last, size))
        self._forget_written()
        self._notify()

    def _forget_written(self) -> None:
        """Memory keeps the unwritten events and a tail of MEMORY_BYTES."""
        drop, freed = 0, 0
        while (
            drop < len(self._mem)
            and self._mem_first + drop <= self._written
            and self._mem_bytes - freed > MEMORY_BYTES
        ):
            freed += self._sizes[drop]
            drop += 1
        if drop:
            del self._mem[:drop], self._sizes[:drop]
            self._mem_first += drop
            self._mem_bytes -= freed

    def _trim(self) -> None:
        """Over the bound: the oldest written batches go (to three quarters of the bound), so
        it is not trimmed again at every event; a notice says what went."""
        dropped = 0
        while self._disk and self._kept_bytes > self.max_bytes * 3 // 4:
            if self._pacing and self._disk[0].last > self._paced_at:
                break  # the prompting client has not read these yet: room() holds the pump back
            batch = self._disk.pop(0)
            self._kept_bytes -= batch.size
            self.oldest_seq = batch.last + 1
            dropped += batch.last - batch.first + 1
        if not dropped:
            return  # nothing written yet to drop: the disk will catch up (room() waits for it)
        self.store.drop_turn_events_later(self.turn_id, self.oldest_seq)
        if self._mem_first < self.oldest_seq:
            cut = min(self.oldest_seq - self._mem_first, len(self._mem))
            self._mem_bytes -= sum(self._sizes[:cut])
            del self._mem[:cut], self._sizes[:cut]
            self._mem_first += cut
        notice = pb.Notice(
            kind="turn_log_trimmed",
            message=(
                f"events before seq {self.oldest_seq} were dropped: a turn keeps at most"
                f" {self.max_bytes} bytes of events (max_turn_log_bytes)"
            ),
        )
        self.append([pb.PromptEvent(notice=notice)])

    # ---- waiting -----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()


class _Internal(SessionGateError):
    code = grpc.StatusCode.INTERNAL


_floods: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FloodRate] = weakref.WeakKeyDictionary()


def floods() -> FloodRate:
    """The running loop's text streams: the turns whose pumps have text to send now."""
    return per_loop(_floods, lambda: FloodRate(EVENT_GAP, FLOOD_EVENTS))


async def _merge_more(turn: Turn, rate: FloodRate, since: float, left: float) -> None:
    """Until the flood's gap after `since` is over (floods that join meanwhile lengthen it), or
    something that is not text comes: it never waits."""
    while left > 0 and turn.text_to_merge():
        if await turn.until_not_text(left):
            return
        left = rate.left(since)


async def pump(turn: Turn, log_: TurnLog, max_event_bytes: int) -> None:
    """The turn's items into its log, numbered and translated, until its last one."""
    turn.on_end = log_.turn_over
    if turn.ended:
        log_.turn_over()
    loop = asyncio.get_running_loop()
    rate = floods()
    last_event_at = 0.0
    try:
        while True:
            if not log_.has_room():
                rate.leave(turn)  # a client behind streams nothing meanwhile
                await log_.room()
            # A turn streaming text counts until it pauses for a gap: one read in batches is
            # still streaming between them.
            if not turn.buffered() and (not rate.counts(turn) or not await turn.buffering_within(rate.gap())):
                rate.leave(turn)
                await turn.buffering()
            if turn.text_to_merge():
                # Text streaming: it waits out the gap after its last event (EVENT_GAP, or more
                # while many turns stream text), merging what comes meanwhile; whatever is not
                # text ends the wait.
                rate.join(turn)
                if (left := rate.left(last_event_at)) > 0:
                    await _merge_more(turn, rate, last_event_at, left)
            else:
                rate.leave(turn)
            last_event_at = loop.time()
            try:
                item: Any = turn.next_ready()
            except Exception as exc:  # the turn failed: its error is the log's end
                if not isinstance(exc, SessionGateError):
                    log.error("turn failed turn=%s", log_.turn_id, exc_info=exc)
                log_.fail(exc)
                break
            try:
                events = translate.events(log_.next_seq, item, max_event_bytes)
                log_.append(events)
            except Exception as exc:  # a bug here: the clients get INTERNAL, the session cancels
                log.exception("relaying an event failed turn=%s", log_.turn_id)
                log_.fail(exc)
                break
            if isinstance(item, TurnEnd):
                log_.complete(events[0].result)
                break
    finally:
        rate.leave(turn)
        if log_.running:  # the pump itself was cancelled (a bug, or the loop ending)
            log_.fail(ShuttingDown("the server is shutting down"))
        with contextlib.suppress(Exception):
            await log_.close()
