"""The turns table and its events, as SQL run on the store's database thread (store.py).

A turn's row holds what ListTurns shows (a serialized `Turn` without events, plus the
columns it is found and kept by); its events are rows of their own, written in batches as
the turn runs, so a turn's log lives on disk, not in the server's memory. The store owns the
connection and the thread; these functions only know the SQL.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

# Schema step 4 (store.MIGRATIONS): the transcript.
SCHEMA = """
CREATE TABLE turns (
    turn_id    TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    started    REAL NOT NULL,    -- wall clock
    ended      REAL,             -- NULL while running, and for an interrupted turn
    state      TEXT NOT NULL,    -- running, completed, failed, interrupted
    first_seq  INTEGER NOT NULL, -- the oldest event kept
    last_seq   INTEGER NOT NULL, -- the last event on disk
    record     BLOB NOT NULL,    -- a serialized sessiongate.v1.Turn without events
    failure    BLOB              -- a failed turn's google.rpc.Status, replayed to watchers
);
CREATE INDEX turns_by_session ON turns (session_id, started, turn_id);
CREATE TABLE turn_events (
    turn_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    event   BLOB NOT NULL,       -- a serialized sessiongate.v1.PromptEvent
    PRIMARY KEY (turn_id, seq)
) WITHOUT ROWID;
"""

COLUMNS = "turn_id, session_id, started, ended, state, first_seq, last_seq, record, failure"


@dataclass(frozen=True, slots=True)
class TurnRow:
    turn_id: str
    session_id: str
    started: float
    ended: float | None
    state: str
    first_seq: int
    last_seq: int
    record: bytes
    failure: bytes | None = None

    def row(self) -> tuple[object, ...]:
        return (
            self.turn_id,
            self.session_id,
            self.started,
            self.ended,
            self.state,
            self.first_seq,
            self.last_seq,
            self.record,
            self.failure,
        )


def put_turn(db: sqlite3.Connection, turn: TurnRow) -> None:
    """Insert or update a turn's row; none for a session deleted meanwhile."""
    db.execute(
        f"INSERT OR REPLACE INTO turns ({COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?"
        " WHERE EXISTS (SELECT 1 FROM sessions WHERE session_id = ?)",
        (*turn.row(), turn.session_id),
    )


EventBatch = tuple[str, list[tuple[int, bytes]], int, int]  # turn_id, [(seq, event)], first kept, last


class _Waiter(Protocol):
    def done(self) -> bool: ...


W = TypeVar("W", bound=_Waiter)


class TurnWrites(Generic[W]):
    """Turn rows and event batches waiting for a store's writer, in order, each with the futures
    of those who wait for it (the store settles them when written).

    A turn has at most one batch waiting: a writer that timed out sends the same events again
    with any new ones (turn_log.py), so a newer batch for a turn absorbs the waiting one (its
    events win) and takes its place at the back; a hung database costs one copy per turn, not
    one per retry. A drop of a turn's oldest events prunes them from its waiting batch, and a
    session's delete removes its turns' waiting rows and batches (the delete would undo them).
    """

    def __init__(self) -> None:
        self.items: list[tuple[TurnRow | EventBatch, list[W]]] = []
        self._sessions: dict[str, str] = {}  # running turn -> its session (for a delete)

    def add(self, item: TurnRow | EventBatch, done: W | None) -> None:
        waiters = [done] if done is not None else []
        if isinstance(item, TurnRow):
            if item.state == "running":
                self._sessions[item.turn_id] = item.session_id
            else:  # its last row: no batch follows
                self._sessions.pop(item.turn_id, None)
        else:
            for index, (queued, older) in enumerate(self.items):
                if not isinstance(queued, TurnRow) and queued[0] == item[0]:
                    del self.items[index]
                    item = _merged(queued, item)
                    waiters = [w for w in older if not w.done()] + waiters  # who gave up is gone
                    break
        self.items.append((item, waiters))

    def drop_events(self, turn_id: str, before_seq: int) -> None:
        for index, (queued, waiters) in enumerate(self.items):
            if not isinstance(queued, TurnRow) and queued[0] == turn_id:
                _, events, first_seq, last_seq = queued
                kept = [(seq, event) for seq, event in events if seq >= before_seq]
                self.items[index] = ((turn_id, kept, max(first_seq, before_seq), last_seq), waiters)

    def forget_session(self, session_id: str) -> list[W]:
        """The session is being deleted: its turns' waiting writes go; their waiters, to be told
        they are done (what they wrote is deleted with the session anyway)."""
        turns = {turn for turn, session in self._sessions.items() if session == session_id}
        for turn in turns:
            del self._sessions[turn]
        kept: list[tuple[TurnRow | EventBatch, list[W]]] = []
        gone: list[W] = []
        for item, waiters in self.items:
            if (item.session_id == session_id) if isinstance(item, TurnRow) else (item[0] in turns):
                gone.extend(waiters)
            else:
                kept.append((item, waiters))
        self.items = kept
        return gone

    def take(self) -> list[tuple[TurnRow | EventBatch, list[W]]]:
        taken, self.items = self.items, []
        return taken

    def size(self) -> tuple[int, int]:
        """(items waiting, bytes of events waiting)."""
        events = sum(len(e) for item, _ in self.items if not isinstance(item, TurnRow) for _, e in item[1])
        return len(self.items), events


def _merged(older: EventBatch, newer: EventBatch) -> EventBatch:
    turn_id, events, first_seq, last_seq = newer
    rows = dict(older[1])
    rows.update(events)
    return (turn_id, sorted(r for r in rows.items() if r[0] >= first_seq), first_seq, max(last_seq, older[3]))


def write(db: sqlite3.Connection, queued: list[TurnRow | EventBatch]) -> None:
    """Turn rows and batches of events, in the order they were queued, in one transaction."""
    db.execute("BEGIN")
    try:
        for item in queued:
            if isinstance(item, TurnRow):
                put_turn(db, item)
                continue
            turn_id, events, first_seq, last_seq = item
            if db.execute("SELECT 1 FROM turns WHERE turn_id = ?", (turn_id,)).fetchone() is None:
                continue  # deleted with its session meanwhile (its row is always queued first)
            db.executemany(
                "INSERT OR REPLACE INTO turn_events (turn_id, seq, event) VALUES (?, ?, ?)",
                [(turn_id, seq, event) for seq, event in events],
            )
            db.execute(
                "UPDATE turns SET first_seq = ?, last_seq = ? WHERE turn_id = ?",
                (first_seq, last_seq, turn_id),
            )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def drop_events(db: sqlite3.Connection, turn_id: str, before_seq: int) -> None:
    """The turn's log past its bound: its oldest events go."""
    db.execute("DELETE FROM turn_events WHERE turn_id = ? AND seq < ?", (turn_id, before_seq))
    db.execute("UPDATE turns SET first_seq = max(first_seq, ?) WHERE turn_id = ?", (before_seq, turn_id))


def events(db: sqlite3.Connection, turn_id: str, from_seq: int, limit: int, max_bytes: int) -> list[bytes]:
    """Up to `limit` events from `from_seq` on, stopping once `max_bytes` are read (at least one)."""
    out: list[bytes] = []
    size = 0
    rows = db.execute(
        "SELECT event FROM turn_events WHERE turn_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
        (turn_id, from_seq, limit),
    )
    for (event,) in rows:
        out.append(event)
        size += len(event)
        if size >= max_bytes:
            break
    return out


def get_turn(db: sqlite3.Connection, session_id: str, turn_id: str) -> TurnRow | None:
    """One turn of the session; without `turn_id`, its newest."""
    if turn_id:
        found = db.execute(
            f"SELECT {COLUMNS} FROM turns WHERE session_id = ? AND turn_id = ?", (session_id, turn_id)
        ).fetchone()
    else:
        found = db.execute(
            f"SELECT {COLUMNS} FROM turns WHERE session_id = ? ORDER BY started DESC, turn_id DESC LIMIT 1",
            (session_id,),
        ).fetchone()
    return TurnRow(*found) if found else None


def list_turns(
    db: sqlite3.Connection, session_id: str, before: tuple[float, str] | None, limit: int
) -> list[TurnRow]:
    """The session's turns, newest first, older than `before` (a page token's position)."""
    if before is None:
        rows = db.execute(
            f"SELECT {COLUMNS} FROM turns WHERE session_id = ? ORDER BY started DESC, turn_id DESC LIMIT ?",
            (session_id, limit),
        )
    else:
        started, turn_id = before
        rows = db.execute(
            f"SELECT {COLUMNS} FROM turns WHERE session_id = ?"
            " AND (started < ? OR (started = ? AND turn_id < ?)) ORDER BY started DESC, turn_id DESC LIMIT ?",
            (session_id, started, started, turn_id, limit),
        )
    return [TurnRow(*row) for row in rows]


def keep_recent(db: sqlite3.Connection, session_id: str, count: int, max_age: float) -> None:
    """Retention: the session's newest `count` turns, none that started more than `max_age` ago."""
    old = db.execute(
        "SELECT turn_id FROM turns WHERE session_id = ? AND state != 'running' AND turn_id NOT IN"
        " (SELECT turn_id FROM turns WHERE session_id = ? ORDER BY started DESC, turn_id DESC LIMIT ?)"
        " UNION SELECT turn_id FROM turns WHERE session_id = ? AND state != 'running' AND started < ?",
        (session_id, session_id, count, session_id, time.time() - max_age),
    ).fetchall()
    _delete_turns(db, [turn_id for (turn_id,) in old])


def expire(db: sqlite3.Connection, max_age: float) -> None:
    """Retention by age over every session (at start and now and then)."""
    old = db.execute(
        "SELECT turn_id FROM turns WHERE state != 'running' AND started < ?", (time.time() - max_age,)
    ).fetchall()
    _delete_turns(db, [turn_id for (turn_id,) in old])


def delete_session(db: sqlite3.Connection, session_id: str) -> None:
    """A deleted session's turns go with it."""
    db.execute(
        "DELETE FROM turn_events WHERE turn_id IN (SELECT turn_id FROM turns WHERE session_id = ?)",
        (session_id,),
    )
    db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))


def after_restart(db: sqlite3.Connection) -> None:
    """At open: turns that were running when the server died are interrupted; turns of sessions
    deleted meanwhile (a close whose last writes raced it) go."""
    db.execute("UPDATE turns SET state = 'interrupted' WHERE state = 'running'")
    orphans = db.execute(
        "SELECT turn_id FROM turns WHERE session_id NOT IN (SELECT session_id FROM sessions)"
    ).fetchall()
    _delete_turns(db, [turn_id for (turn_id,) in orphans])


def _delete_turns(db: sqlite3.Connection, turn_ids: list[str]) -> None:
    for turn_id in turn_ids:
        db.execute("DELETE FROM turn_events WHERE turn_id = ?", (turn_id,))
        db.execute("DELETE FROM turns WHERE turn_id = ?", (turn_id,))
