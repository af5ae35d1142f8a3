"""Session records and turn transcripts in PostgreSQL (state_url = "postgresql://..."), through an
asyncpg connection pool: the store several replicas share.

It keeps the SQLite store's promises (store.py): every write and read runs in submission order,
one at a time, on a connection of the pool (so a `delete_later` queued after a cancelled `put`
still removes its row, and a read sees every write queued before it); state changes are
coalesced per session; turn rows and event batches queued together share one transaction;
awaited calls give up after their timeout with STORE_UNAVAILABLE; once closed, writes are
refused or dropped. Each query is bounded by the pool's command timeout, so a database that
stops answering holds the writer for at most that long.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sessiongate.server.errors import RequestIdTaken, ShuttingDown, StoreUnavailable, clip
from sessiongate.server.security.quotas import too_many_sessions
from sessiongate.server.state import pg_schema
from sessiongate.server.state.base import (
    COLUMNS,
    WRITE_TIMEOUT,
    SessionRecord,
    StoreError,
    Tombstone,
    tombstone_record,
)
from sessiongate.server.state.turn_records import COLUMNS as TURN_COLUMNS
from sessiongate.server.state.turn_records import EventBatch, TurnRow, TurnWrites

log = logging.getLogger("sessiongate.store")

Op = Callable[[asyncpg.Connection], Awaitable[Any]]
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0  # one query; the writer is never held longer by a silent database
POOL_SIZE = 4
# A transaction of ours only ever waits on its own statements. One idle this long belongs to a
# frozen or cut-off replica, and the database ends it, with its row locks: else a replica frozen
# inside an event write would block the takeover of its session until its TCP connection died.
# Well within lease_ttl + TAKEOVER_MARGIN, so the locks are gone before a takeover may start.
IDLE_IN_TRANSACTION_TIMEOUT = 3.0
RETRY_PAUSE = 0.5  # after the database could not be reached, before the writer tries again
QUOTA_TIMEOUT = 10.0  # a quota's query (a create's count, a prompt's admission), connection included
# Per-principal transaction locks (pg_advisory_xact_lock): a principal's session count and insert,
# and its prompt admissions, each run one at a time over all replicas.
SESSIONS_LOCK = "SELECT pg_advisory_xact_lock(hashtext('sessiongate-quota:' || $1))"
PROMPTS_LOCK = "SELECT pg_advisory_xact_lock(hashtext('sessiongate-rate:' || $1))"

_NAMES = [c.strip() for c in COLUMNS.split(",")]
# A new session's row; then every write of it is an update by its leaseholder at its epoch (the
# fencing token, cluster/leases.py): a replica that lost the session writes nothing ("UPDATE 0"),
# and a row deleted meanwhile is never brought back.
INSERT_SESSION = (
    f"INSERT INTO sessions ({COLUMNS}, replica, epoch)"
    f" VALUES ({', '.join(f'${i + 1}' for i in range(len(_NAMES) + 2))})"
)
UPDATE_SESSION = (
    f"UPDATE sessions SET {', '.join(f'{c} = ${i + 2}' for i, c in enumerate(_NAMES[1:]))}"
    f" WHERE session_id = $1 AND replica = ${len(_NAMES) + 1} AND epoch = ${len(_NAMES) + 2}"
)
_TURN_NAMES = [c.strip() for c in TURN_COLUMNS.split(",")]
UPSERT_TURN = (
    f"INSERT INTO turns ({TURN_COLUMNS}) SELECT {', '.join(f'${i + 1}' for i in range(len(_TURN_NAMES)))}"
    # FOR SHARE: a takeover's update of the session waits for this write's transaction.
    " WHERE EXISTS (SELECT 1 FROM sessions WHERE session_id = $2 AND replica = $10 AND epoch = $11 FOR SHARE)"
    f" ON CONFLICT (turn_id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _TURN_NAMES[1:])}"
)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class PostgresStore:
    def __init__(
        self, url: str, replica_id: str = "", on_fenced: Callable[[str], None] | None = None
    ) -> None:
        self.url = url
        self.where = redacted(url)
        self.replica_id = replica_id
        # The epoch of every session this replica owns: each write of it is fenced by it.
        self.epochs: dict[str, int] = {}
        self.on_fenced = on_fenced  # a write found the session moved (base.Fences.report)
        self._pool: asyncpg.Pool | None = None
        self._ops: collections.deque[tuple[Op, asyncio.Future[Any] | None]] = collections.deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._dirty: dict[str, SessionRecord] = {}  # latest unwritten state per session
        self._flush_queued = False
        self._turn_writes: TurnWrites[asyncio.Future[Any]] = TurnWrites()  # see turn_records.py
        self._turn_writes_queued = False
        self._closed = False

    async def open(self) -> list[SessionRecord]:
        """Connect, bring the schema up to date and return every stored session, oldest first."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={
                    "idle_in_transaction_session_timeout": str(int(IDLE_IN_TRANSACTION_TIMEOUT * 1000))
                },
            )
        except (*DB_ERRORS, ValueError) as exc:
            reason = clip(str(exc))
            raise StoreError(f"cannot connect to the session database {self.where}: {reason}") from exc
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as db:
                await pg_schema.migrate(db)
                async with db.transaction():
                    await _after_restart(db, self.replica_id)
                rows = await db.fetch(
                    f"UPDATE sessions SET epoch = epoch + 1 WHERE replica = $1 RETURNING {COLUMNS}, epoch",
                    self.replica_id,
                )
        except DB_ERRORS as exc:
            await self._pool.close()
            raise StoreError(f"cannot open the session database {self.where}: {clip(str(exc))}") from exc
        self._writer = asyncio.create_task(self._write_in_order(), name="sessiongate-db")
        records = [SessionRecord.from_row(tuple(row)[:-1]) for row in rows]
        self.epochs = {row[0]: row[-1] for row in rows}
        return sorted(records, key=lambda r: (r.create_time, r.session_id))

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "open() first"
        return self._pool

    def owns(self, session_id: str, epoch: int) -> None:
        """A session taken over (cluster/leases.py): written from now on at this epoch (the newest of
        two takeovers that finished out of order)."""
        self.epochs[session_id] = max(epoch, self.epochs.get(session_id, 0))

    async def release(self) -> int:
        """Drain: every session of this replica is released (owned by none), after every write
        queued before; the next prompt's replica takes each over at once. The count released."""

        async def release(db: asyncpg.Connection) -> int:
            done = await db.execute("UPDATE sessions SET replica = '' WHERE replica = $1", self.replica_id)
            self.epochs.clear()
            return int(done.split()[-1])

        released: int = await self._run(release)
        return released

    def disown(self, session_id: str) -> None:
        """A session fenced off or released: nothing more of it is written by this replica."""
        self.epochs.pop(session_id, None)
        self._dirty.pop(session_id, None)

    def _fenced(self, session_id: str) -> None:
        log.warning("session=%s moved to another replica: this one writes nothing more of it", session_id)
        self.disown(session_id)
        if self.on_fenced is not None:
            self.on_fenced(session_id)

    async def _insert(self, db: asyncpg.Connection, record: SessionRecord, max_sessions: int | None) -> None:
        """A new session, owned by this replica from epoch 1; refused (QUOTA_EXCEEDED) if its
        principal already keeps `max_sessions`, counted over all replicas under the principal's lock."""
        self.epochs[record.session_id] = 1
        try:
            async with db.transaction():
                if max_sessions is not None:
                    await db.execute(SESSIONS_LOCK, record.principal)
                    kept = await db.fetchval(
                        "SELECT count(*) FROM sessions WHERE owner = $1", record.principal
                    )
                    if kept >= max_sessions:
                        self.epochs.pop(record.session_id, None)
                        raise too_many_sessions(record.principal, max_sessions)
                await db.execute(INSERT_SESSION, *record.row(), self.replica_id, 1)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != pg_schema.REQUEST_ID_INDEX:
                self._fenced(record.session_id)  # the row is someone else's
                return
            self.epochs.pop(record.session_id, None)
            raise RequestIdTaken(
                f"another replica stored a session for request_id {clip(record.request_id, 64)!r} first;"
                " retry to get it"
            ) from None

    async def _update(self, db: asyncpg.Connection, record: SessionRecord) -> None:
        epoch = self.epochs.get(record.session_id)
        if epoch is None:
            return  # not (or no longer) ours: never written from here
        done = await db.execute(UPDATE_SESSION, *record.row(), self.replica_id, epoch)
        if done.endswith(" 0"):
            self._fenced(record.session_id)

    async def put(self, record: SessionRecord, max_sessions: int | None = None) -> None:
        """Store a new session's record and wait until it is committed (later changes of it go
        through put_later). With `max_sessions`, only while its principal keeps fewer (all replicas)."""
        await self._run(lambda db: self._insert(db, record, max_sessions))

    # ---- quotas over all replicas (quotas.Shared) -----------------------------------------

    async def count_sessions(self, principal: str) -> int:
        """The sessions `principal` keeps over all replicas (its rows)."""
        count: int = await self._quota_query(
            lambda db: db.fetchval("SELECT count(*) FROM sessions WHERE owner = $1", principal)
        )
        return count

    async def admit_prompt(self, principal: str, limit: int, window: float) -> float | None:
        """Count a prompt unless `limit` were sent in the last `window` seconds (by the database's
        clock, over all replicas); else the seconds until the oldest leaves the window. The rows
        of `principal` older than the window go first, so it has at most `limit` (bounded work)."""

        async def admit(db: asyncpg.Connection) -> float | None:
            async with db.transaction():
                await db.execute(PROMPTS_LOCK, principal)
                await db.execute(
                    "DELETE FROM prompt_times WHERE principal = $1"
                    " AND sent <= clock_timestamp() - make_interval(secs => $2)",
                    principal,
                    window,
                )
                sent, oldest_left = await db.fetchrow(
                    "SELECT count(*), extract(epoch FROM min(sent) + make_interval(secs => $2)"
                    " - clock_timestamp())::float8 FROM prompt_times WHERE principal = $1",
                    principal,
                    window,
                )
                if sent >= limit:
                    return float(oldest_left or 0.0)
                await db.execute(
                    "INSERT INTO prompt_times (principal, sent) VALUES ($1, clock_timestamp())", principal
                )
                return None

        result: float | None = await self._quota_query(admit)
        return result

    async def _quota_query(self, op: Op) -> Any:
        """Beside the ordered writer (a quota waits for no queued write), bounded; a database that
        fails or does not answer is STORE_UNAVAILABLE, as for routing queries."""
        if self._closed:
            raise ShuttingDown("the server is shutting down: the session store is closed")
        try:
            async with asyncio.timeout(QUOTA_TIMEOUT), self.pool.acquire() as db:
                return await op(db)
        except TimeoutError:
            raise StoreUnavailable(f"the session database did not answer within {QUOTA_TIMEOUT:g}s") from None
        except DB_ERRORS as exc:
            raise StoreUnavailable(f"the session database failed: {clip(str(exc))}") from exc

    def put_later(self, record: SessionRecord) -> None:
        """Write a record soon; a newer one for the session replaces it."""
        if self._closed:
            return
        self._dirty[record.session_id] = record
        if not self._flush_queued:
            self._flush_queued = True
            self._queue(self._flush, None)

    def backlog(self) -> int:
        return len(self._dirty)

    async def delete(self, session_id: str, tombstone: Tombstone | None = None) -> None:
        """Delete a record and its turns, leaving `tombstone` if given (after every write queued
        before); wait until committed."""
        self._forget_turns(session_id)
        await self._run(lambda db: self._delete(db, session_id, tombstone))

    def delete_later(self, session_id: str, tombstone: Tombstone | None = None) -> None:
        if not self._closed:
            self._forget_turns(session_id)
            self._queue(lambda db: self._delete(db, session_id, tombstone), None)

    def _forget_turns(self, session_id: str) -> None:
        for done in self._turn_writes.forget_session(session_id):
            _settle(done, None)

    async def closed_session(self, session_id: str, max_age: float) -> SessionRecord | None:
        """A session closed less than `max_age` seconds ago (by any replica): its record then."""
        found = await self._run(
            lambda db: db.fetchval(
                "SELECT record FROM closed_sessions WHERE session_id = $1 AND closed_time >= $2",
                session_id,
                time.time() - max_age,
            ),
            read=True,
        )
        return tombstone_record(found) if found is not None else None

    async def _delete(self, db: asyncpg.Connection, session_id: str, tombstone: Tombstone | None) -> None:
        self._dirty.pop(session_id, None)  # a state change queued meanwhile must not bring it back
        epoch = self.epochs.pop(session_id, 1)
        async with db.transaction():
            deleted = await db.execute(
                "DELETE FROM sessions WHERE session_id = $1 AND replica = $2 AND epoch = $3",
                session_id,
                self.replica_id,
                epoch,
            )
            if deleted.endswith(" 0"):
                return  # another replica owns it now (or it is gone): its turns are not ours
            await delete_turns_of(db, [session_id])
            if tombstone is not None:
                now = time.time()
                await db.execute("DELETE FROM closed_sessions WHERE closed_time < $1", now - tombstone.keep)
                await db.execute(
                    "INSERT INTO closed_sessions (session_id, owner, closed_time, record)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (session_id) DO UPDATE SET owner = EXCLUDED.owner,"
                    " closed_time = EXCLUDED.closed_time, record = EXCLUDED.record",
                    session_id,
                    tombstone.record.principal,
                    now,
                    tombstone.json(),
                )

    # ---- turns ---------------------------------------------------------------------------

    def put_turn_later(self, turn: TurnRow) -> None:
        if not self._closed:
            self._queue_turn_write(turn, None)

    async def put_turn(self, turn: TurnRow) -> None:
        await self._turn_write(turn, WRITE_TIMEOUT)

    async def add_turn_events(
        self, turn_id: str, events: list[tuple[int, bytes]], first_seq: int, last_seq: int, timeout: float
    ) -> None:
        await self._turn_write((turn_id, events, first_seq, last_seq), timeout)

    async def _turn_write(self, item: TurnRow | EventBatch, timeout: float) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down: the session store is closed")
        done = asyncio.get_running_loop().create_future()
        self._queue_turn_write(item, done)
        # Unshielded: a writer that gives up cancels its future (the item is written anyway), so
        # a newer batch superseding it does not carry it along.
        await self._wait(done, timeout, shield=False)

    def _queue_turn_write(self, item: TurnRow | EventBatch, done: asyncio.Future[Any] | None) -> None:
        self._turn_writes.add(item, done)
        if not self._turn_writes_queued:
            self._turn_writes_queued = True
            self._queue(self._write_turns, None)

    async def _write_turns(self, db: asyncpg.Connection) -> None:
        queued = self._turn_writes.take()
        self._turn_writes_queued = False
        if not queued:
            return
        try:
            async with db.transaction():
                for item, _ in queued:
                    await self._write_turn_item(db, item)
        except BaseException as exc:
            for _, waiters in queued:
                for done in waiters:
                    _settle(done, exc)
            if not isinstance(exc, DB_ERRORS):
                raise
            log.error("writing turns failed db=%s: %s", self.where, clip(str(exc)))
            return
        for _, waiters in queued:
            for done in waiters:
                _settle(done, None)

    def turn_backlog(self) -> tuple[int, int]:
        """Turn rows and batches waiting to be written, and their events' bytes."""
        return self._turn_writes.size()

    async def _write_turn_item(self, db: asyncpg.Connection, item: TurnRow | EventBatch) -> None:
        if isinstance(item, TurnRow):
            epoch = self.epochs.get(item.session_id)
            if epoch is None:
                return  # not (or no longer) ours
            done = await db.execute(UPSERT_TURN, *item.row(), self.replica_id, epoch)
            if done.endswith(" 0"):
                self._fenced(item.session_id)
            return
        turn_id, events, first_seq, last_seq = item
        lease = await db.fetchrow(
            "SELECT s.session_id, s.replica, s.epoch FROM turns t JOIN sessions s USING (session_id)"
            " WHERE t.turn_id = $1 FOR SHARE OF s",
            turn_id,
        )
        if lease is None or lease[0] not in self.epochs:
            return  # deleted with its session meanwhile (its row is always written first), or not ours
        session_id, replica, epoch = lease
        if (replica, epoch) != (self.replica_id, self.epochs[session_id]):
            self._fenced(session_id)  # the session moved
            return
        await db.executemany(
            "INSERT INTO turn_events (turn_id, seq, event) VALUES ($1, $2, $3)"
            " ON CONFLICT (turn_id, seq) DO UPDATE SET event = EXCLUDED.event",
            [(turn_id, seq, event) for seq, event in events],
        )
        await db.execute(
            "UPDATE turns SET first_seq = $1, last_seq = $2 WHERE turn_id = $3", first_seq, last_seq, turn_id
        )

    def drop_turn_events_later(self, turn_id: str, before_seq: int) -> None:
        self._turn_writes.drop_events(turn_id, before_seq)  # no need to write them first

        async def drop(db: asyncpg.Connection) -> None:
            async with db.transaction():
                drop = "DELETE FROM turn_events WHERE turn_id = $1 AND seq < $2"
                await db.execute(drop, turn_id, before_seq)
                keep = "UPDATE turns SET first_seq = GREATEST(first_seq, $2) WHERE turn_id = $1"
                await db.execute(keep, turn_id, before_seq)

        self._later_op(drop)

    def keep_recent_turns_later(self, session_id: str, count: int, max_age: float) -> None:
        async def keep(db: asyncpg.Connection) -> None:
            old = await db.fetch(
                "SELECT turn_id FROM turns WHERE session_id = $1 AND state != 'running' AND turn_id NOT IN"
                " (SELECT turn_id FROM turns WHERE session_id = $1 ORDER BY started DESC, turn_id DESC"
                " LIMIT $2) UNION SELECT turn_id FROM turns WHERE session_id = $1 AND state != 'running'"
                " AND started < $3",
                session_id,
                count,
                time.time() - max_age,
            )
            await _delete_turns(db, [row[0] for row in old])

        self._later_op(keep)

    def expire_turns_later(self, max_age: float) -> None:
        async def expire(db: asyncpg.Connection) -> None:
            old = await db.fetch(
                "SELECT turn_id FROM turns WHERE state != 'running' AND started < $1", time.time() - max_age
            )
            await _delete_turns(db, [row[0] for row in old])

        self._later_op(expire)

    async def turn_events(self, turn_id: str, from_seq: int, limit: int, max_bytes: int) -> list[bytes]:
        async def read(db: asyncpg.Connection) -> list[bytes]:
            out: list[bytes] = []
            size = 0
            rows = await db.fetch(
                "SELECT event FROM turn_events WHERE turn_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                turn_id,
                from_seq,
                limit,
            )
            for (event,) in rows:
                out.append(bytes(event))
                size += len(event)
                if size >= max_bytes:
                    break
            return out

        result: list[bytes] = await self._run(read, read=True)
        return result

    async def get_turn(self, session_id: str, turn_id: str) -> TurnRow | None:
        """One turn of the session; without `turn_id`, its newest."""
        query = f"SELECT {TURN_COLUMNS} FROM turns WHERE session_id = $1"
        args: tuple[Any, ...] = (session_id,)
        if turn_id:
            query, args = query + " AND turn_id = $2", (session_id, turn_id)
        row = await self._run(
            lambda db: db.fetchrow(query + " ORDER BY started DESC, turn_id DESC LIMIT 1", *args), read=True
        )
        return _turn_row(row) if row is not None else None

    async def list_turns(
        self, session_id: str, before: tuple[float, str] | None, limit: int
    ) -> list[TurnRow]:
        order = " ORDER BY started DESC, turn_id DESC"
        if before is None:
            query = f"SELECT {TURN_COLUMNS} FROM turns WHERE session_id = $1{order} LIMIT $2"
            args: tuple[Any, ...] = (session_id, limit)
        else:
            query = (
                f"SELECT {TURN_COLUMNS} FROM turns WHERE session_id = $1"
                f" AND (started < $2 OR (started = $2 AND turn_id < $3)){order} LIMIT $4"
            )
            args = (session_id, before[0], before[1], limit)
        rows = await self._run(lambda db: db.fetch(query, *args), read=True)
        return [_turn_row(row) for row in rows]

    # ---- the ordered writer --------------------------------------------------------------

    def _later_op(self, op: Op) -> None:
        if not self._closed:
            self._queue(op, None)

    def _queue(self, op: Op, done: asyncio.Future[Any] | None) -> None:
        self._ops.append((op, done))
        self._wake.set()

    async def _run(self, op: Op, timeout: float = WRITE_TIMEOUT, *, read: bool = False) -> Any:
        """`op` in order. A write runs even when its caller stops waiting (a `delete_later` after
        a cancelled `put` relies on the put having run first); a read whose caller gave up before
        it started never runs (the writer skips ops whose future is cancelled)."""
        if self._closed:
            raise ShuttingDown("the server is shutting down: the session store is closed")
        done = asyncio.get_running_loop().create_future()
        self._queue(op, done)
        return await self._wait(done, timeout, shield=not read)

    async def _wait(self, done: asyncio.Future[Any], timeout: float, *, shield: bool = True) -> Any:
        """The op's result. Shielded, `done` outlives its caller; else a caller that stops
        waiting cancels it."""
        try:
            async with asyncio.timeout(timeout):
                return await (asyncio.shield(done) if shield else done)
        except TimeoutError:
            if not done.done() or done.cancelled():  # (else the op's own query timed out)
                raise StoreUnavailable(f"the session database did not answer within {timeout:g}s") from None
            raise StoreUnavailable("the session database timed out") from None
        except DB_ERRORS as exc:
            raise StoreUnavailable(f"the session database failed: {clip(str(exc))}") from exc

    async def _write_in_order(self) -> None:
        assert self._pool is not None
        while True:
            if not self._ops:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as db:
                    while self._ops:
                        op, done = self._ops[0]
                        if done is not None and done.cancelled():  # a read its caller gave up on
                            self._ops.popleft()
                            continue
                        try:
                            result = await op(db)
                        except Exception as exc:  # the op's caller gets it; the writer goes on
                            self._ops.popleft()
                            _settle(done, exc)
                            if done is None:
                                log.error("database write failed db=%s: %s", self.where, clip(str(exc)))
                            if db.is_closed():
                                break
                            continue
                        self._ops.popleft()
                        _settle(done, None, result)
            except DB_ERRORS as exc:  # no connection: fail the oldest awaited op, retry the rest soon
                log.error("session database unreachable db=%s: %s", self.where, clip(str(exc)))
                while self._ops and self._ops[0][1] is not None:
                    _settle(self._ops.popleft()[1], exc)
                if self._closed:
                    self._ops.clear()
                    return
                await asyncio.sleep(RETRY_PAUSE)

    async def _flush(self, db: asyncpg.Connection) -> None:
        records, self._dirty = list(self._dirty.values()), {}
        self._flush_queued = False
        if records:
            async with db.transaction():
                for record in records:
                    await self._update(db, record)

    async def close(self) -> None:
        """Finish queued writes and close the pool; later writes are refused."""
        if self._closed:
            return
        self._closed = True
        if self._pool is None:
            return
        self._queue(self._flush, None)
        self._queue(self._write_turns, None)
        if self._writer is not None:
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await self._writer
            except TimeoutError:
                log.error("the session database did not take the last writes within %gs", WRITE_TIMEOUT)
                self._writer.cancel()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()


def _settle(done: asyncio.Future[Any] | None, exc: BaseException | None, result: Any = None) -> None:
    if done is None or done.done():
        return
    if exc is not None:
        done.set_exception(exc)
        done.add_done_callback(lambda f: f.exception())  # its caller may have stopped waiting
    else:
        done.set_result(result)


def _turn_row(row: Any) -> TurnRow:
    values = list(row)
    values[7] = bytes(values[7])
    values[8] = bytes(values[8]) if values[8] is not None else None
    return TurnRow(*values)


async def delete_turns_of(db: asyncpg.Connection, session_ids: list[str]) -> None:
    """Deleted sessions' turns and their events (in the caller's transaction)."""
    await db.execute(
        "DELETE FROM turn_events WHERE turn_id IN"
        " (SELECT turn_id FROM turns WHERE session_id = ANY($1::text[]))",
        session_ids,
    )
    await db.execute("DELETE FROM turns WHERE session_id = ANY($1::text[])", session_ids)


async def _delete_turns(db: asyncpg.Connection, turn_ids: list[str]) -> None:
    if turn_ids:
        async with db.transaction():
            await db.execute("DELETE FROM turn_events WHERE turn_id = ANY($1::text[])", turn_ids)
            await db.execute("DELETE FROM turns WHERE turn_id = ANY($1::text[])", turn_ids)


async def _after_restart(db: asyncpg.Connection, replica_id: str) -> None:
    """At open: this replica's turns that were running when it died are interrupted (another
    replica's running turns are its own); turns of sessions deleted meanwhile go."""
    await db.execute(
        "UPDATE turns SET state = 'interrupted' WHERE state = 'running'"
        " AND session_id IN (SELECT session_id FROM sessions WHERE replica = $1)",
        replica_id,
    )
    orphans = await db.fetch(
        "SELECT turn_id FROM turns WHERE session_id NOT IN (SELECT session_id FROM sessions)"
    )
    await _delete_turns(db, [row[0] for row in orphans])
