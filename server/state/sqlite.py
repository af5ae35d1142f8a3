"""Session records and turn transcripts, so both survive restarts: the embedded SQLite backend
of the store (the default; PostgreSQL, for replicas, is postgres.py; both implement base.Store).

All SQL runs on one dedicated thread, in submission order: the event loop never waits on
the disk unless it chooses to (`put` for a CreateSession, which must be durable before it
is answered). State changes (`put_later`) are coalesced per session, latest wins, so the
backlog is bounded by the number of sessions however slow the disk. A database that cannot
be read is moved aside, never deleted, and a fresh one is started. Once closed, writes are
refused with SHUTTING_DOWN (awaited ones) or dropped (background ones). Turn events
(turn_records.py) are written in batches, every turn's queued batches in one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sessiongate.server.errors import ShuttingDown, StoreUnavailable, clip
from sessiongate.server.state import turn_records
from sessiongate.server.state.base import (
    COLUMNS,
    WRITE_TIMEOUT,
    SessionRecord,
    StoreError,
    Tombstone,
    tombstone_record,
)
from sessiongate.server.state.turn_records import EventBatch, TurnRow, TurnWrites

log = logging.getLogger("sessiongate.store")

SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id       TEXT PRIMARY KEY,
    agent            TEXT NOT NULL,
    cwd              TEXT NOT NULL,
    labels           TEXT NOT NULL,  -- JSON object
    state            TEXT NOT NULL,
    agent_session_id TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    create_time      REAL NOT NULL,
    last_active_time REAL NOT NULL,
    agent_info       TEXT NOT NULL   -- JSON object: name, version, title, load_session, close_session,
                                     -- resume_session
);
CREATE INDEX IF NOT EXISTS sessions_request_id ON sessions (request_id) WHERE request_id != '';
"""
# Each schema version's step from the one before; a database is brought up to date at open.
MIGRATIONS = {
    2: "ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT '';",  # the principal's name
    # What the agent reported about the session (agent_state.py), as a JSON object; '' before.
    3: "ALTER TABLE sessions ADD COLUMN agent_state TEXT NOT NULL DEFAULT '';",
    4: turn_records.SCHEMA,  # every turn's record and events (the transcript)
    5: """
CREATE TABLE closed_sessions (
    session_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    closed_time REAL NOT NULL,
    record      TEXT NOT NULL   -- JSON array: SessionRecord.row() at its close
);
CREATE INDEX closed_sessions_by_time ON closed_sessions (closed_time);
""",  # tombstones: a CloseSession retried after a restart (or through another replica) answers the same
}
INSERT = f"INSERT OR REPLACE INTO sessions ({COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS.split(',')))})"

T = TypeVar("T")


def _closed_session(db: sqlite3.Connection, session_id: str, max_age: float) -> SessionRecord | None:
    found = db.execute(
        "SELECT record FROM closed_sessions WHERE session_id = ? AND closed_time >= ?",
        (session_id, time.time() - max_age),
    ).fetchone()
    return tombstone_record(found[0]) if found else None


def _migrate(db: sqlite3.Connection, step: int, script: str) -> None:
    """One schema step and its version number in one transaction: a crash or a failure half way
    leaves the database as it was, never with the step done but its number not written."""
    try:
        db.executescript(f"BEGIN; {script} PRAGMA user_version={step}; COMMIT;")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def hold_database(path: Path) -> int:
    """Lock `<path>.lock` for this process's life (released when its descriptor closes, at exit
    at the latest) and write our PID into it: two servers sharing a database would restore the
    same sessions and each run their agents. O_CLOEXEC: agents never inherit the lock."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {lock}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise StoreError(
            f"state database {path} is in use by another server{pid}: stop it, or give this one"
            " a state_db of its own (--state-db)"
        ) from exc
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {lock}: {exc.strerror}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class SessionStore:
    """The SQLite backend."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sessiongate-db"
        )
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # guards the three below, shared with the database thread
        self._dirty: dict[str, SessionRecord] = {}  # latest unwritten state per session
        self._flush_queued = False
        # Turn rows and events waiting for the database thread, in order (a turn's row before its
        # events), each with the futures its writers wait on; one transaction for all queued.
        self._turn_writes: TurnWrites[concurrent.futures.Future[None]] = TurnWrites()
        self._turn_writes_queued = False
        self._closed = False
        self._holder: int | None = None  # the lock file, held while open (hold_database)

    async def open(self) -> list[SessionRecord]:
        """Open (or create) the database and return every stored session, oldest first."""
        return await self._run(self._open, timeout=None)

    async def put(self, record: SessionRecord) -> None:
        """Insert or update a record and wait until it is on disk."""
        await self._run(self._put, record)

    def put_later(self, record: SessionRecord) -> None:
        """Write a record soon, off the event loop; a newer one for the session replaces it."""
        with self._lock:
            if self._closed:
                return
            self._dirty[record.session_id] = record
            if not self._flush_queued:
                self._flush_queued = True
                self._thread.submit(self._guarded, self._flush)

    def backlog(self) -> int:
        """Records waiting to be written by `put_later` (at most one per session)."""
        with self._lock:
            return len(self._dirty)

    async def delete(self, session_id: str, tombstone: Tombstone | None = None) -> None:
        """Delete a record and its turns, leaving `tombstone` if given (after every write queued
        before), and wait until it is on disk."""
        with self._lock:
            self._forget_turns(session_id)
        await self._run(self._bury, session_id, tombstone)

    def _forget_turns(self, session_id: str) -> None:  # under self._lock
        for done in self._turn_writes.forget_session(session_id):
            if done.set_running_or_notify_cancel():
                done.set_result(None)

    def _delete(self, session_id: str) -> None:  # on the database thread
        with self._lock:  # a state change queued meanwhile must not bring the record back
            self._dirty.pop(session_id, None)
        assert self._db is not None
        self._db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        turn_records.delete_session(self._db, session_id)

    def _bury(self, session_id: str, tombstone: Tombstone | None) -> None:  # on the database thread
        """The delete, and the tombstone if any, in one transaction."""
        assert self._db is not None
        self._db.execute("BEGIN")
        try:
            self._delete(session_id)
            if tombstone is not None:
                now = time.time()
                self._db.execute("DELETE FROM closed_sessions WHERE closed_time < ?", (now - tombstone.keep,))
                self._db.execute(
                    "INSERT OR REPLACE INTO closed_sessions VALUES (?, ?, ?, ?)",
                    (session_id, tombstone.record.principal, now, tombstone.json()),
                )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def closed_session(self, session_id: str, max_age: float) -> SessionRecord | None:
        """A session closed less than `max_age` seconds ago: its record at the close."""
        return await self._run(self._with_db, _closed_session, session_id, max_age)

    # ---- turns (turn_records.py) ---------------------------------------------------------

    def put_turn_later(self, turn: TurnRow) -> None:
        """Insert or update a turn's row soon, in order with its events."""
        with self._lock:
            if not self._closed:
                self._queue_turn_write(turn, None)

    async def put_turn(self, turn: TurnRow) -> None:
        """Insert or update a turn's row, in order with its events; waits until written."""
        await self._turn_write(turn, WRITE_TIMEOUT)

    async def add_turn_events(
        self, turn_id: str, events: list[tuple[int, bytes]], first_seq: int, last_seq: int, timeout: float
    ) -> None:
        """Write a batch of a turn's events (with the turn's kept range); waits until written.
        Batches of every turn queued meanwhile share one transaction."""
        await self._turn_write((turn_id, events, first_seq, last_seq), timeout)

    async def _turn_write(self, item: TurnRow | EventBatch, timeout: float) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down: the session store is closed")
            self._queue_turn_write(item, done)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wrap_future(done)
        except TimeoutError:
            raise StoreUnavailable(f"the session database did not answer within {timeout:g}s") from None
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the session database failed: {clip(str(exc))}") from exc

    def drop_turn_events_later(self, turn_id: str, before_seq: int) -> None:
        with self._lock:
            self._turn_writes.drop_events(turn_id, before_seq)  # no need to write them first
        self._later(turn_records.drop_events, turn_id, before_seq)

    def keep_recent_turns_later(self, session_id: str, count: int, max_age: float) -> None:
        self._later(turn_records.keep_recent, session_id, count, max_age)

    def expire_turns_later(self, max_age: float) -> None:
        self._later(turn_records.expire, max_age)

    async def turn_events(self, turn_id: str, from_seq: int, limit: int, max_bytes: int) -> list[bytes]:
        return await self._run(self._with_db, turn_records.events, turn_id, from_seq, limit, max_bytes)

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRow | None:
        return await self._run(self._with_db, turn_records.get_turn, session_id, turn_id)

    async def list_turns(
        self, session_id: str, before: tuple[float, str] | None, limit: int
    ) -> list[TurnRow]:
        return await self._run(self._with_db, turn_records.list_turns, session_id, before, limit)

    def _later(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if not self._closed:
                self._thread.submit(self._guarded, self._relaxed, fn, *args)

    def _with_db(self, fn: Callable[..., T], *args: Any) -> T:  # on the database thread
        assert self._db is not None
        return fn(self._db, *args)

    def _relaxed(self, fn: Callable[..., T], *args: Any) -> T:  # on the database thread
        """`fn` without an fsync: a turn's record and events need to survive a crash of this
        process, not a power cut (WAL with synchronous=NORMAL), unlike the sessions' records."""
        assert self._db is not None
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            return fn(self._db, *args)
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def _queue_turn_write(
        self, item: TurnRow | EventBatch, done: concurrent.futures.Future[None] | None
    ) -> None:  # under self._lock
        self._turn_writes.add(item, done)
        if not self._turn_writes_queued:
            self._turn_writes_queued = True
            self._thread.submit(self._write_turns)

    def _write_turns(self) -> None:  # on the database thread
        with self._lock:
            queued = self._turn_writes.take()
            self._turn_writes_queued = False
        if not queued:
            return
        assert self._db is not None
        try:
            self._relaxed(turn_records.write, [item for item, _ in queued])
        except BaseException as exc:
            for _, waiters in queued:
                for done in waiters:
                    if done.set_running_or_notify_cancel():  # not given up on
                        done.set_exception(exc)
            if not isinstance(exc, sqlite3.Error):
                raise
            log.error("writing turns failed path=%s: %s", self.path, exc)
            return
        for _, waiters in queued:
            for done in waiters:
                if done.set_running_or_notify_cancel():  # its writer may have given up
                    done.set_result(None)

    def turn_backlog(self) -> tuple[int, int]:
        """Turn rows and batches waiting to be written, and their events' bytes."""
        with self._lock:
            return self._turn_writes.size()

    def delete_later(self, session_id: str, tombstone: Tombstone | None = None) -> None:
        """Delete a record soon, after every write queued before (a cancelled `put` included)."""
        with self._lock:
            if not self._closed:
                self._forget_turns(session_id)
                self._thread.submit(self._guarded, self._bury, session_id, tombstone)

    async def close(self) -> None:
        """Finish queued writes and close the database; later writes are refused."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.wrap_future(self._thread.submit(self._close))
        self._thread.shutdown(wait=True)  # idle by now: returns at once

    async def _run(self, fn: Callable[..., T], *args: Any, timeout: float | None = WRITE_TIMEOUT) -> T:
        """`fn` on the database thread, in order. A call whose caller stops waiting (a timeout, a
        cancel) before it starts never runs: wrap_future cancels its future, and the executor
        skips cancelled work. (Writes that must happen anyway are queued with `_later`.)"""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down: the session store is closed")
            future = self._thread.submit(fn, *args)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise StoreUnavailable(f"the session database did not answer within {timeout:g}s") from None
        except sqlite3.Error as exc:
            log.error("database write failed path=%s: %s", self.path, exc)
            raise StoreUnavailable(f"the session database failed: {clip(str(exc))}") from exc

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except sqlite3.Error:
            log.exception("database write failed path=%s", self.path)

    # ---- on the database thread ------------------------------------------------------

    def _open(self) -> list[SessionRecord]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one: ours alone
        except OSError as exc:
            raise StoreError(f"cannot create the directory of {self.path}: {exc.strerror}") from exc
        if self._holder is None:
            self._holder = hold_database(self.path)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            self._disconnect()
            aside = self._move_aside(exc)
            log.error(
                "session database %s could not be read (%s); moved it to %s and started a fresh one",
                self.path,
                exc,
                aside,
            )
            try:
                return self._connect()
            except sqlite3.DatabaseError as again:
                raise StoreError(f"cannot open a fresh session database at {self.path}: {again}") from again

    def _connect(self) -> list[SessionRecord]:
        db = self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an answered CreateSession survives a crash
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this server's {SCHEMA_VERSION}"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            try:
                _migrate(db, step, SCHEMA if step == 1 else MIGRATIONS[step])
            except sqlite3.Error as exc:  # not unreadable: never moved aside for this
                self._disconnect()
                raise StoreError(
                    f"cannot bring session database {self.path} from schema version {step - 1} to"
                    f" {step}: {exc}; it is left as it was"
                ) from exc
        for suffix in ("", "-wal", "-shm"):  # sessions' cwds, labels and principals: ours to read only
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.path.with_name(self.path.name + suffix), 0o600)
        turn_records.after_restart(db)
        rows = db.execute(f"SELECT {COLUMNS} FROM sessions ORDER BY create_time, session_id").fetchall()
        return [SessionRecord.from_row(row) for row in rows]

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _move_aside(self, reason: Exception) -> Path:
        aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                companion = self.path.with_name(self.path.name + suffix)
                if companion.exists():
                    companion.replace(aside.with_name(aside.name + suffix))
        except OSError as exc:
            raise StoreError(
                f"session database {self.path} is unreadable ({reason}) and could not be moved aside: {exc}"
            ) from exc
        return aside

    def _put(self, record: SessionRecord) -> None:
        assert self._db is not None
        self._db.execute(INSERT, record.row())

    def _flush(self) -> None:
        with self._lock:
            records, self._dirty = list(self._dirty.values()), {}
            self._flush_queued = False
        if records and self._db is not None:
            self._db.execute("BEGIN")  # one transaction (one fsync) for the batch
            try:
                self._db.executemany(INSERT, [r.row() for r in records])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _close(self) -> None:
        try:
            self._flush()
            self._write_turns()
            self._disconnect()
        finally:
            if self._holder is not None:
                os.close(self._holder)  # releases the lock: the next server may open the database
                self._holder = None
