"""Every session's turns: new turn logs, finding a turn to watch or show, and retention.

A running turn, and the last one a session ran on this server, are its TurnLog in memory
(`Session.turn_log`); every other turn, and every turn after a restart, is read from the
store. Retention keeps `turn_retention` turns per session, none older than
`turn_retention_age`; a session's turns are deleted with it (store.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Protocol

from sessiongate.server.errors import InvalidArgument, TurnNotFound
from sessiongate.server.settings import ServerLimits
from sessiongate.server.state.base import Store
from sessiongate.server.state.turn_records import TurnRow
from sessiongate.server.turns import translate
from sessiongate.server.turns.turn_log import TurnLog, new_turn_id
from sessiongate.v1 import session_service_pb2 as pb


class LiveLogs(Protocol):
    """A session as its transcripts see it: its id and the turn logs it has in memory (a
    `Session` is one; turns never import sessions)."""

    session_id: str
    live_logs: dict[str, TurnLog]

    def live_log(self, turn_id: str) -> TurnLog | None: ...


DEFAULT_PAGE = 20
MAX_PAGE = 100
EXPIRE_EVERY = 3600.0  # seconds between retention passes over every session


class Transcripts:
    def __init__(self, store: Store, limits: ServerLimits) -> None:
        self.store = store
        self.limits = limits
        self._expired_at = 0.0

    def start(
        self, session_id: str, prompt: list[pb.ContentBlock], on_disconnect: pb.OnDisconnect
    ) -> TurnLog:
        """A new turn's log; its record is queued for the store at once (in order before its events)."""
        record = pb.Turn(
            turn_id=new_turn_id(),
            session_id=session_id,
            state=pb.TURN_STATE_RUNNING,
            prompt=prompt,
            start_time=translate.timestamp(time.time()),
            on_disconnect=on_disconnect or pb.ON_DISCONNECT_CANCEL,
        )
        log = TurnLog(self.store, record, max_bytes=self.limits.max_turn_log_bytes)
        self.store.put_turn_later(log.row())
        return log

    def ended(self, log: TurnLog) -> None:
        """After a turn's log is closed: the session keeps its newest turns only."""
        limits = self.limits
        self.store.keep_recent_turns_later(
            log.record.session_id, limits.turn_retention, limits.turn_retention_age
        )

    def expire_now_and_then(self) -> None:
        """From the sweeper: retention by age over every session, once in a while."""
        now = time.monotonic()
        if now - self._expired_at >= EXPIRE_EVERY:
            self._expired_at = now
            self.store.expire_turns_later(self.limits.turn_retention_age)

    async def find(self, session: LiveLogs, turn_id: str) -> TurnLog:
        """The turn to watch or show: the session's live one when it is that turn (or no turn
        was named), else from the store."""
        live = session.live_log(turn_id)
        if live is not None:
            return live  # running, or its last events are still on their way to the store
        row = await self.store.get_turn(session.session_id, turn_id)
        if row is None:
            what = f"turn {turn_id!r}" if turn_id else "no turn yet"
            raise TurnNotFound(
                f"session {session.session_id} has {what}" if not turn_id else f"{what} not found",
                metadata={"session_id": session.session_id, "turn_id": turn_id},
            )
        return TurnLog.stored(self.store, row, self.limits.max_turn_log_bytes)

    async def page(self, session: LiveLogs, page_size: int, token: str) -> tuple[list[pb.Turn], str]:
        """ListTurns: newest first, the live turn as it is now."""
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        before = _decode(token) if token else None
        rows = await self.store.list_turns(session.session_id, before, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        turns = [
            live.summary() if (live := session.live_logs.get(row.turn_id)) is not None else self._stored(row)
            for row in rows
        ]
        next_token = _encode(rows[-1].started, rows[-1].turn_id) if more else ""
        return turns, next_token

    def _stored(self, row: TurnRow) -> pb.Turn:
        return TurnLog.stored(self.store, row, self.limits.max_turn_log_bytes).record


def _encode(started: float, turn_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([started, turn_id]).encode()).decode()


def _decode(token: str) -> tuple[float, str]:
    try:
        started, turn_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(started, int | float) and isinstance(turn_id, str):
            return float(started), turn_id
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgument.field("page_token", "not a token from ListTurns")
