"""The agent's stdio as the ACP SDK's message transport, with the agent treated as a client.

Everything an agent writes costs the gateway bounded work, memory and log volume:
- a line that is not JSON (garbage, a stray print) is dropped and counted; only the first
  few are logged (clipped), then a summary now and then, never a traceback per line;
- a line longer than the line limit is skipped without being held in memory;
- a JSON value that is not an object, or a message whose `id` or `method` has the wrong
  type, means the connection cannot be trusted any more: the transport ends (the SDK sees
  end of stream, failing what waits on the agent) and reports the violation, so the agent
  is ended and its session recovers with a fresh one;
- end of stream while the process still runs (it closed its stdout) is reported the same way;
- a `session/update` whose kind this SDK does not know (a newer agent) is handed to
  `on_unknown_update` instead of being dropped by the SDK's validation;
- at most BATCH messages are handled before the loop gets a turn, so one agent writing as
  fast as it can never takes more than a bounded slice of the event loop from the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import typing
from collections.abc import Callable
from typing import Any

from acp import schema

from server.errors import clip

log = logging.getLogger("sessiongate.agent")

LINE_LIMIT = 64 * 1024 * 1024  # one JSON-RPC message; tool output and diffs can be long
BATCH = 32  # lines handled before yielding to the event loop
GARBAGE_LOGGED = 5  # garbage lines logged per agent (clipped); then a summary every...
GARBAGE_SUMMARY_EVERY = 100_000  # ...this many more
LOGGED_BYTES = 200  # of one garbage line

# The `sessionUpdate` kinds this SDK can parse; others reach the client as `other` events.
KNOWN_UPDATES = frozenset(
    kind
    for model in typing.get_args(schema.SessionNotification.model_fields["update"].annotation)
    for kind in typing.get_args(model.model_fields["session_update"].annotation)
)


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
        on_unknown_update: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._name = name
        self._reader = reader
        self._writer = writer
        self._on_broken = on_broken
        self._on_unknown_update = on_unknown_update
        self._write_lock = asyncio.Lock()
        self._handled = 0  # lines since the loop last got a turn
        self._flowing = asyncio.Event()  # cleared while a turn holds the agent back (backpressure)
        self._flowing.set()
        self.garbage = 0  # lines dropped as not JSON
        self._ended = False

    # ---- to the agent ----------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
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
        """Hand the SDK nothing more until `resume()`: what the pipe already delivered waits here."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def receive(self) -> dict[str, Any] | None:
        """The next valid message, or None at the end (EOF, a violation, or closed by us)."""
        while not self._ended:
            if not self._flowing.is_set():
                await self._flowing.wait()
                continue  # closed meanwhile?
            self._handled += 1
            if self._handled >= BATCH:
                self._handled = 0
                await asyncio.sleep(0)  # others' turn: a flooding agent gets a bounded slice
            line = await self._read_line()
            if line is None:
                self._end("closed its output (stdout)", eof=True)
                return None
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                self._garbage(line)
                continue
            try:
                if self._sorted_out(message):
                    continue
            except Violation as violation:
                self._end(str(violation), eof=False)
                return None
            return message
        return None

    def _sorted_out(self, message: Any) -> bool:
        """Checks one message; True when it was dealt with here (not for the SDK)."""
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
        if method == "session/update" and "id" not in message:
            params = message.get("params")
            update = params.get("update") if isinstance(params, dict) else None
            kind = update.get("sessionUpdate") if isinstance(update, dict) else None
            session_id = params.get("sessionId") if isinstance(params, dict) else None
            if isinstance(kind, str) and kind not in KNOWN_UPDATES and isinstance(session_id, str):
                assert isinstance(update, dict)
                self._on_unknown_update(session_id, update)
                return True
        return False

    async def _read_line(self) -> bytes | None:
        """One line (without its end), None at EOF; an overlong line is skipped, not kept."""
        while True:
            try:
                return await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                return exc.partial or None  # a last line without its newline, then EOF
            except asyncio.LimitOverrunError as exc:
                await self._skip_line(exc.consumed)

    async def _skip_line(self, consumed: int) -> None:
        """Drop the rest of an overlong line, a buffer at a time."""
        skipped = 0
        while True:
            await self._reader.readexactly(consumed)
            skipped += consumed
            try:
                skipped += len(await self._reader.readuntil(b"\n"))
                break
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed
            except asyncio.IncompleteReadError as exc:
                skipped += len(exc.partial)
                break
        self._garbage(f"<a line over {LINE_LIMIT} bytes ({skipped} bytes skipped)>".encode())

    def _garbage(self, line: bytes) -> None:
        self.garbage += 1
        if self.garbage <= GARBAGE_LOGGED:
            text = clip(line[: LOGGED_BYTES * 2].decode(errors="replace"), LOGGED_BYTES)
            log.warning("agent=%s wrote a line that is not JSON-RPC (dropped): %s", self._name, text)
        elif self.garbage % GARBAGE_SUMMARY_EVERY == 0 or self.garbage == GARBAGE_LOGGED + 1:
            log.warning(
                "agent=%s has written %d lines that are not JSON-RPC (dropped, not logged)",
                self._name,
                self.garbage,
            )

    def _end(self, why: str, eof: bool) -> None:
        """No more messages: tell the connection why (unless we closed it), and the SDK (None)."""
        if not self._ended:
            self._ended = True
            self._on_broken(why, eof)
