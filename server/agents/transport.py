"""The agent's stdio as the ACP SDK's message transport, with the agent treated as a client.

Everything an agent writes costs the gateway bounded work, memory and log volume:
- a line that is not JSON (garbage, a stray print) is dropped and counted; only the first
  few are logged (clipped), then a summary now and then, never a traceback per line;
- the pipe is read through a small buffer (READ_BUFFER): an agent that writes faster than
  it is read fills its pipe and blocks, not our memory; a long line is gathered piece by
  piece, and one longer than LINE_LIMIT is skipped without being held;
- a JSON value that is not an object, or a message whose `id` or `method` has the wrong
  type, means the connection cannot be trusted any more: the transport ends (the SDK sees
  end of stream, failing what waits on the agent) and reports the violation, so the agent
  is ended and its session recovers with a fresh one;
- end of stream while the process still runs (it closed its stdout) is reported the same way;
- `session/update` notifications are parsed and handed to `on_update` here, in order, not
  through the SDK (which starts a task per notification and logs a traceback per invalid
  one): an update of a kind this SDK does not know (a newer agent's) arrives as a
  `RawUpdate`, an invalid one is dropped with bounded logging. A plain text chunk (most of
  what a turn streams) is checked here and becomes a `TextRun` without a pydantic model:
  the line is parsed once (orjson), and the update costs a few dict lookups;
- every line is charged to the loop's shared slice (loop_share.py), so however many agents
  write as fast as they can, they take a bounded part of each loop pass from the others;
- the agent's requests to us (the SDK starts a task for each, without a limit) are bounded:
  at most MAX_REQUESTS unanswered at once, and what they hold (each request's line until our
  answer is written, and each answer from its serialization until it is written) at most
  MAX_HELD_BYTES, whatever one request and its answer alone take. An agent over either bound
  (one that asks without reading its answers) is a violation: its memory cost stays bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from acp import schema
from pydantic import ValidationError
from sessiongate.server.errors import clip
from sessiongate.server.loop_share import loop_share

log = logging.getLogger("sessiongate.agent")

LINE_LIMIT = 64 * 1024 * 1024  # one JSON-RPC message; tool output and diffs can be long
READ_BUFFER = 64 * 1024  # the stream reader's limit: it stops reading the pipe past twice this
DROPS_LOGGED = 5  # dropped lines (or updates) logged per agent and kind, clipped; then a summary...
DROP_SUMMARY_EVERY = 100_000  # ...every this many more
READ_GAP = 0.001  # seconds: a flood's reads are at least this far apart (see _read)
STREAK = 3  # ...once this many reads in a row came within the gap
GARBAGE_RATE = 1024 * 1024  # bytes a second: dropped lines pace the reads after them to this rate
LOGGED_BYTES = 200  # of one dropped line
# The agent's requests to us: their count is what its own tool calls run in parallel (reads wait
# for their lane, permissions for the client, terminal waits for a command), the bytes are the
# memory; a 10 MiB fs read's answer (client_fs.MAX_READ_BYTES) is about 10 MiB of JSON.
MAX_REQUESTS = 32  # unanswered at once
MAX_HELD_BYTES = 32 * 1024 * 1024  # their lines until answered, answers until written

# The `sessionUpdate` kinds this SDK can parse; others reach the client as `other` events.
KNOWN_UPDATES = frozenset(
    kind
    for model in typing.get_args(schema.SessionNotification.model_fields["update"].annotation)
    for kind in typing.get_args(model.model_fields["session_update"].annotation)
)


TEXT_CHUNKS = ("agent_message_chunk", "agent_thought_chunk")


@dataclass(slots=True)
class TextRun:
    """Text of one message: an agent's plain text chunk, or consecutive ones merged (turn.py).
    Never changed once made; not frozen, whose __init__ (object.__setattr__ per field) took
    three times as long, and one is made per chunk."""

    kind: str  # "agent_message_chunk" or "agent_thought_chunk"
    text: str
    message_id: str


def text_chunk(params: dict[str, Any]) -> TextRun | None:
    """`params` of a `session/update` as a TextRun when it is a plain text chunk: nothing but a
    session id and an update with a text block and maybe a message id, all of the types the
    ACP schema wants. Anything else (annotations, _meta, other content) is None: the schema's
    models parse it, as before. (Key counts, not key sets: this runs for every chunk.)"""
    update = params.get("update")
    if type(update) is not dict or len(params) != 2 or type(params.get("sessionId")) is not str:
        return None
    if len(update) != (3 if "messageId" in update else 2):  # sessionUpdate, content: nothing else
        return None
    kind, content = update.get("sessionUpdate"), update.get("content")
    if kind not in TEXT_CHUNKS or type(content) is not dict or len(content) != 2:
        return None
    text = content.get("text")
    if type(text) is not str or content.get("type") != "text":
        return None
    message_id = update.get("messageId")
    if message_id is not None and type(message_id) is not str:
        return None
    return TextRun(kind, text, message_id or "")


@dataclass(frozen=True, slots=True)
class RawUpdate:
    """A `session/update` of a kind this SDK does not know (a newer agent's), as JSON."""

    kind: str
    payload: dict[str, Any]


# Characters a line reader may end a line at besides "\n" (Python's str.splitlines() does), which
# JSON lets a string hold as they are; escaped, as json.dumps (ASCII only) always did.
LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def encode(message: dict[str, Any]) -> bytes:
    """One JSON-RPC message to the agent, as one line: orjson's UTF-8 (a prompt's or a file's
    text as it is, 10 MiB in milliseconds) with LINE_BREAKS escaped, or the standard library's
    where orjson refuses a value (a lone surrogate, an integer past 64 bits, a key that is not
    a string)."""
    try:
        data = orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps(message, separators=(",", ":")) + "\n").encode()
    if not data.isascii():
        for raw, escaped in LINE_BREAKS:
            data = data.replace(raw, escaped)
    return data


class Violation(Exception):
    """The agent broke the protocol so that its connection cannot be used any more."""


class AgentTransport:
    """`acp`'s Transport (send/receive/close of decoded messages) over an agent's pipes."""

    def __init__(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_broken: Callable[[str, bool], None],
        on_update: Callable[[str, Any], None],
        *,
        pipe: asyncio.ReadTransport | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._name = name
        self._pipe = pipe  # what `reader` reads: not polled while a flood's read waits (_read)
        self._reader = reader
        self._writer = writer
        self._on_broken = on_broken
        self._on_update = on_update
        self._on_dropped = on_dropped  # the bytes of each line dropped (a flood of them counts)
        self._share = loop_share()
        self._write_lock = asyncio.Lock()
        self._flowing = asyncio.Event()  # cleared while a turn holds the agent back (backpressure)
        self._flowing.set()
        self.dropped: dict[str, int] = {}  # what was dropped, by kind ("garbage lines", ...)
        self._ended = False
        self._asked: dict[Any, list[int]] = {}  # the agent's requests unanswered: line sizes, by id
        self._requests = 0  # how many (an id may be used twice)
        self._held = 0  # bytes: their lines, and our answers not yet written
        self._lines: collections.deque[bytes] = collections.deque()  # read, not handled yet: one buffer's
        self._partial: list[bytes] = []  # a line whose newline has not come yet...
        self._partial_size = 0  # ...and its size so far (counted on past LINE_LIMIT)
        self._at_eof = False
        self._read_at = 0.0  # loop time of the last read
        self._streak = 0  # small reads in a row, each within READ_GAP of the one before
        self._dropped_bytes = 0  # of lines dropped, not yet paid for by a read's wait (_read)

    # ---- to the agent ----------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        if "method" in message or "id" not in message:  # a request or notification of ours
            await self._write(data)
            return
        # Our answer to one of the agent's requests: held (and counted) until written.
        sizes = self._asked.get(message["id"])
        asked = sizes.pop() if sizes else 0
        if sizes is not None and not sizes:
            del self._asked[message["id"]]
        own = asked + len(data)
        try:
            if self._hold(len(data), own):
                self._end(self._overheld(), eof=False)
            if self._ended:
                return  # nobody reads it any more
            # Nobody waits on an answer's write: one the agent can no longer take is dropped
            # (the SDK would log a traceback for each).
            with contextlib.suppress(ConnectionError):
                await self._write(data)
        finally:
            self._held -= own
            if sizes is not None:
                self._requests -= 1

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._writer.is_closing():
                raise ConnectionResetError(f"agent {self._name!r} closed its input")
            self._writer.write(data)
            await self._writer.drain()

    async def close(self) -> None:
        self._ended = True
        self._flowing.set()  # a paused receive() returns None now
        # The agent's stdin stays open (as with the SDK's own transport): the agent is ended by
        # signals to its group, within the kill grace, not by an end of input it may ignore.

    # ---- from the agent --------------------------------------------------------------------

    def pause(self) -> None:
        """Hand on nothing more until `resume()`. The reader's small buffer then fills, it
        stops reading the pipe, and the agent blocks on its full pipe."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def receive(self) -> dict[str, Any] | None:
        """The next message for the SDK, or None at the end (EOF, a violation, or closed by us).

        `session/update` notifications, most of what an agent writes, are handled here in the
        loop and never returned: each line costs no coroutine of its own unless it has to wait
        (for a new buffer from the pipe, or for the loop's next slice)."""
        share, lines = self._share, self._lines
        while not self._ended:
            if not self._flowing.is_set():
                await self._flowing.wait()
                continue  # closed meanwhile?
            if not share.take_now(self):
                await share.wait_turn(self)
            line = lines.popleft() if lines else await self._read_line()
            if line is None:
                self._end("closed its output (stdout)", eof=True)
                return None
            try:
                message = orjson.loads(line)  # surrounding whitespace is JSON's too
            except (ValueError, RecursionError):
                if line.strip():
                    self._drop("garbage lines", "a line that is not JSON-RPC", line, len(line) + 1)
                else:  # an empty line is skipped, not logged; a flood of them costs as garbage does
                    self._charge(len(line) + 1)
                continue
            if type(message) is dict and message.get("method") == "session/update" and "id" not in message:
                self._update(message.get("params"), len(line) + 1)
                continue
            try:
                if self._sorted_out(message):
                    continue
                if "method" in message and "id" in message:
                    self._admit(message["id"], len(line))
            except Violation as violation:
                self._end(str(violation), eof=False)
                return None
            return message
        return None

    def _sorted_out(self, message: Any) -> bool:
        """Checks one message for the SDK (session/update notifications never come here: receive()
        handles them); True when it was dealt with here."""
        if not isinstance(message, dict):
            raise Violation(
                f"wrote a JSON {type(message).__name__} where a JSON-RPC message (an object) belongs"
            )
        if "id" in message and (
            isinstance(message["id"], bool) or not isinstance(message["id"], (str, int, type(None)))
        ):
            raise Violation("wrote a JSON-RPC message whose id is not a string, number or null")
        method = message.get("method")
        if method is not None and not isinstance(method, str):
            raise Violation("wrote a JSON-RPC message whose method is not a string")
        return False

    def _admit(self, request_id: Any, size: int) -> None:
        """Count one request of the agent's (of `size` bytes) until our answer to it is written."""
        if self._requests >= MAX_REQUESTS:
            raise Violation(f"sent over {MAX_REQUESTS} requests to the gateway that were not answered yet")
        if self._hold(size, size):
            self._held -= size
            raise Violation(self._overheld())
        self._asked.setdefault(request_id, []).append(size)
        self._requests += 1

    def _hold(self, size: int, own: int) -> bool:
        """Hold `size` bytes more; True when that goes over MAX_HELD_BYTES, unless only one
        request and its answer (`own` bytes of them) are held: a request alone always fits."""
        self._held += size
        return self._held > MAX_HELD_BYTES and self._held > own

    def _overheld(self) -> str:
        return (
            f"had requests to the gateway and their answers holding over {MAX_HELD_BYTES >> 20} MiB"
            " unanswered or unread"
        )

    def _update(self, params: Any, size: int) -> None:
        """One `session/update`, parsed and handed on now: in order, and within the slice."""
        item: Any = text_chunk(params) if type(params) is dict else None
        if item is not None:  # the bulk of a turn: no model, nothing else to check
            self._route(params["sessionId"], item)
            return
        update = params.get("update") if isinstance(params, dict) else None
        kind = update.get("sessionUpdate") if isinstance(update, dict) else None
        session_id = params.get("sessionId") if isinstance(params, dict) else None
        if isinstance(kind, str) and kind not in KNOWN_UPDATES and isinstance(session_id, str):
            assert isinstance(update, dict)
            item = RawUpdate(kind, update)
        else:
            try:
                notification = schema.SessionNotification.model_validate(params)
            except (ValidationError, RecursionError) as exc:
                self._drop("invalid updates", "a session/update that does not fit the ACP schema", exc, size)
                return
            session_id, item = notification.session_id, notification.update
        self._route(session_id, item)

    def _route(self, session_id: str, item: Any) -> None:
        try:
            self._on_update(session_id, item)
        except Exception as exc:  # a bug of ours: the agent's connection stays usable
            self._drop("unroutable updates", "a session/update that could not be handled", exc)
            if self.dropped["unroutable updates"] == 1:
                log.exception("agent=%s update handling failed", self._name)

    async def _read_line(self) -> bytes | None:
        """One line (without its newline), None at EOF. What the pipe's buffer holds is taken at
        once and split here, so a flood of short lines costs one read per buffer, not one per
        line; a line longer than LINE_LIMIT is counted, not held, and read as b"" (dropped)."""
        while not self._lines:
            if self._at_eof:
                return None
            data = await self._read()
            if not data:  # EOF: a last line without its newline?
                self._at_eof = True
                if self._partial_size:
                    self._lines.append(self._finish_line(b""))
                continue
            pieces = data.split(b"\n")
            if len(pieces) == 1:
                self._gather(data)
                continue
            first, *complete, rest = pieces
            self._lines.append(self._finish_line(first) if self._partial_size else first)
            self._lines.extend(complete)
            if rest:
                self._gather(rest)
        return self._lines.popleft()

    async def _read(self) -> bytes:
        """What the pipe has (up to READ_BUFFER). While the agent writes without a pause (STREAK
        small reads in a row each found data within READ_GAP), the next read waits until READ_GAP
        after the last: a flood is then read a gap's worth at a time, not a write at a time, and
        a line after a pause is read at once. Lines dropped (garbage, blank, invalid updates, an
        overlong line's bytes past LINE_LIMIT) delay the reads after them as long as they take
        at GARBAGE_RATE, a buffer's worth per read: an agent writing them as fast as it can is
        read at that rate (and blocks on its full pipe), whatever valid lines it mixes in, so
        dropping them costs a bounded part of the loop, not a buffer's parsing every pass."""
        loop = asyncio.get_running_loop()
        # A read pays for at most a buffer's worth (one long dropped line must not hold back the
        # lines after it for seconds); what is left is paid by the next reads, a second's at most.
        paid = min(self._dropped_bytes, READ_BUFFER)
        self._dropped_bytes = min(self._dropped_bytes - paid, GARBAGE_RATE)
        gap = max(READ_GAP if self._streak >= STREAK else 0.0, paid / GARBAGE_RATE)
        if gap and (wait := self._read_at + gap - loop.time()) > 0:
            # Unpolled meanwhile, or each of the agent's writes would wake the loop to read it.
            # (One the reader paused itself, its buffer full, is the reader's to resume.)
            pipe = self._pipe if self._pipe is not None and self._pipe.is_reading() else None
            if pipe is not None:
                pipe.pause_reading()
            try:
                await asyncio.sleep(wait)
            finally:
                if pipe is not None and not pipe.is_closing():
                    pipe.resume_reading()
        asked = loop.time()
        data = await self._reader.read(READ_BUFFER)
        now = loop.time()
        streaming = now - asked < READ_GAP and len(data) < READ_BUFFER // 2  # the agent kept writing
        self._streak = self._streak + 1 if streaming else 0
        self._read_at = now
        return data

    def _gather(self, piece: bytes) -> None:
        """Part of a line whose newline has not come yet: kept up to LINE_LIMIT, then only counted."""
        self._partial_size += len(piece)
        if self._partial_size <= LINE_LIMIT:
            self._partial.append(piece)
        else:  # overlong: what was kept goes, the rest is only counted, and paced as dropped
            self._partial.clear()
            self._charge(min(len(piece), self._partial_size - LINE_LIMIT))

    def _finish_line(self, last: bytes) -> bytes:
        """The gathered line, with its `last` piece; b"" (and a drop) when it was overlong."""
        self._gather(last)
        size, parts = self._partial_size, self._partial
        self._partial, self._partial_size = [], 0
        if size > LINE_LIMIT:
            overlong = f"<a line of {size} bytes, over {LINE_LIMIT}>"
            self._drop("garbage lines", "a line that is not JSON-RPC", overlong)
            if self._on_dropped is not None:  # the flood measure: what _gather did not charge
                self._on_dropped(LINE_LIMIT)
            return b""
        return b"".join(parts)

    def _charge(self, size: int) -> None:
        """`size` bytes the agent wrote were dropped: they pace the reads, and count as its output."""
        self._dropped_bytes += size
        if self._on_dropped is not None:
            self._on_dropped(size)

    def _drop(self, kind: str, what: str, detail: object, size: int = 0) -> None:
        """Count something the agent wrote that was dropped (`size` bytes of it not charged yet);
        log the first few and a summary now and then."""
        self._charge(size)
        count = self.dropped[kind] = self.dropped.get(kind, 0) + 1
        if count <= DROPS_LOGGED:
            if isinstance(detail, bytes):
                detail = detail[: LOGGED_BYTES * 2].decode("utf-8", "replace")
            log.warning("agent=%s wrote %s (dropped): %s", self._name, what, clip(str(detail), LOGGED_BYTES))
        elif count % DROP_SUMMARY_EVERY == 0 or count == DROPS_LOGGED + 1:
            log.warning("agent=%s has written %d %s (dropped, not logged)", self._name, count, kind)

    def _end(self, why: str, eof: bool) -> None:
        """No more messages: tell the connection why (unless we closed it), and the SDK (None)."""
        if not self._ended:
            self._ended = True
            self._on_broken(why, eof)
