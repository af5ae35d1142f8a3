"""This replica's place among replicas sharing one PostgreSQL store: its lease, and which
replica holds each session (its leaseholder).

Each replica renews a lease in the `replicas` table every third of `lease_ttl`. Each session row
names its leaseholder replica and an epoch, the fencing token: a session moves only by a
compare-and-set on the epoch, and only away from a replica whose lease has run out (plus a
margin) or that released the session on drain. Every write of a session checks the epoch
(state/postgres.py), so a replica that lost a session can change nothing of it.

Time is the database's clock for leases (replicas' clocks may differ); the replica itself counts
its lease from when its last successful renewal started, on its own monotonic clock, and stops
serving its sessions (`on_lost`) as soon as that lease may have run out: before any other
replica may take them over, which waits `lease_ttl` plus `TAKEOVER_MARGIN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from sessiongate.server.errors import OwnerLost, clip
from sessiongate.server.state.base import COLUMNS, SessionRecord
from sessiongate.server.state.postgres import delete_turns_of

log = logging.getLogger("sessiongate.replicas")

TAKEOVER_MARGIN = 2.0  # seconds past an expired lease before its sessions may be taken over
DB_TIMEOUT = 10.0  # a wait for a pooled connection
RENEWALS_PER_TTL = 3
MIN_ATTEMPT = 0.2  # seconds a renewal may take at least, even with the lease about to run out
EXPIRY_INTERVAL = 60.0  # how often a replica deletes expired sessions that no replica serves
FENCE_TIMEOUT = 30.0  # stop() waits this long for a fence under way (each agent's end is bounded)


@dataclass(frozen=True, slots=True)
class Lease:
    """Which replica holds a session (its leaseholder), as the database says now."""

    record: SessionRecord
    replica: str  # '' when released
    epoch: int
    advertise: str  # the leaseholder's address ('' when released or unknown)
    alive: bool  # the leaseholder's lease (plus the takeover margin) has not run out


class Leases:
    """This replica's lease (renewed in the background, fenced when it may have run out) and
    the leases on sessions: who holds each, taking one over, listing them."""

    def __init__(
        self,
        url: str,
        pool: asyncpg.Pool,
        replica_id: str,
        advertise: str,
        lease_ttl: float,
        free_slots: Callable[[], int],
        on_lost: Callable[[], Awaitable[None]],
        retention: float | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.advertise = advertise
        self.lease_ttl = lease_ttl
        self._pool = pool
        self._free_slots = free_slots
        self._on_lost = on_lost
        self._valid_until = 0.0  # monotonic: our lease may have run out from here on
        self._url = url
        self._lease_db: asyncpg.Connection | None = None  # the lease's own connection
        self._watchdog: asyncio.TimerHandle | None = None
        self._losing: asyncio.Task[None] | None = None  # the fence of the current loss
        self._fences: set[asyncio.Task[None]] = set()  # fences still running (stop waits for them)
        self.losses = 0  # leases lost so far: a stream that saw this change had its session fenced
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.retention = retention  # session_retention: expire_unleased now and then (None: never)

    def valid(self) -> bool:
        return time.monotonic() < self._valid_until

    async def start(self) -> None:
        """Register (the first renewal must succeed), then renew in the background."""
        await self._renew(self.lease_ttl / RENEWALS_PER_TTL)
        self._task = asyncio.create_task(self._renew_forever(), name="sessiongate-lease")
        self._expiry = asyncio.create_task(self._expire_forever(), name="sessiongate-expiry")

    async def _expire_forever(self) -> None:
        """Apart from the lease's renewals, which nothing may hold up."""
        while self.retention is not None:
            try:
                await self.expire_unleased(self.retention)
            except Exception as exc:
                log.error("expiring sessions no replica serves failed: %s", clip(str(exc)))
            await asyncio.sleep(EXPIRY_INTERVAL)

    async def _renew(self, bound: float) -> None:
        """One renewal on the lease's own connection (never queued behind other queries), within
        `bound` seconds; the lease then runs `lease_ttl` from when this attempt started."""
        started = time.monotonic()
        async with asyncio.timeout(bound):
            if self._lease_db is None or self._lease_db.is_closed():
                self._lease_db = await asyncpg.connect(self._url)
            await self._lease_db.execute(
                "INSERT INTO replicas (replica_id, advertise, lease_until, free_slots)"
                " VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3), $4)"
                " ON CONFLICT (replica_id) DO UPDATE SET advertise = EXCLUDED.advertise,"
                " lease_until = EXCLUDED.lease_until, free_slots = EXCLUDED.free_slots",
                self.replica_id,
                self.advertise,
                self.lease_ttl,
                self._free_slots(),
            )
        self._valid_until = started + self.lease_ttl
        self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        """The fence fires when the lease may run out, whatever the renewals are doing."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._valid_until - time.monotonic())
        self._watchdog = loop.call_later(delay, self._lose_soon)

    def _lose_soon(self) -> None:
        if not self.valid():
            self._fence()

    async def _renew_forever(self) -> None:
        interval = self.lease_ttl / RENEWALS_PER_TTL
        while True:
            await asyncio.sleep(min(interval, max(0.0, self._valid_until - time.monotonic())))
            if not self.valid():  # paused, or renewals kept failing: stop serving before anyone takes over
                await self._lose()
            # An attempt never outlasts the lease it would extend (nor a third of it).
            bound = min(interval, max(MIN_ATTEMPT, self._valid_until - time.monotonic()))
            try:
                await self._renew(bound)
            except Exception as exc:
                log.error("could not renew the lease replica=%s: %s", self.replica_id, clip(str(exc)))
                with contextlib.suppress(Exception):
                    if self._lease_db is not None:
                        self._lease_db.terminate()
                self._lease_db = None
                continue
            if self._losing is not None:
                log.info("lease renewed again replica=%s; serving sessions anew", self.replica_id)
                self._losing = None  # a later loss fences what was taken over since (this one runs on)

    def _fence(self) -> asyncio.Task[None]:
        """The fence of this loss of the lease: one task of its own, started once, whoever notices
        first. Not the noticing RPC's task: a caller that goes away must not cut the fence short
        (nothing would fence again, and another replica would run a second agent)."""
        if self._losing is None:
            self.losses += 1
            log.error(
                "lease lost replica=%s: ending every session's agent here; other replicas take them over",
                self.replica_id,
            )
            self._losing = asyncio.get_running_loop().create_task(self._run_fence(), name="sessiongate-fence")
            self._fences.add(self._losing)
            self._losing.add_done_callback(self._fences.discard)
        return self._losing

    async def _run_fence(self) -> None:
        try:
            await self._on_lost()
        except Exception:
            log.exception("ending sessions after the lease was lost failed")

    async def _lose(self) -> None:
        """Fence (once per loss), and wait until it is done; the caller's cancellation ends only
        its own wait."""
        await asyncio.shield(self._fence())

    async def check(self) -> None:
        """Called before serving: with a lease that may have run out (a pause, a lost database)
        this replica serves nothing: its sessions are ended first, the caller retries elsewhere."""
        if not self.valid():
            await self._lose()
            raise OwnerLost("this replica's lease ran out; retry (another replica serves the session)")

    async def lease(self, session_id: str) -> Lease | None:
        return await self._lease("s.session_id = $2", session_id)

    async def lease_by_request(self, principal: str, request_id: str) -> Lease | None:
        """The session a principal's CreateSession with this request id made, on any replica."""
        return await self._lease("s.owner = $2 AND s.request_id = $3", principal, request_id)

    async def _lease(self, condition: str, *args: str) -> Lease | None:
        row = await self._pool.fetchrow(
            f"SELECT {_qualified(COLUMNS)}, s.replica, s.epoch, coalesce(r.advertise, ''),"
            " coalesce(r.lease_until + make_interval(secs => $1) > clock_timestamp(), false)"
            f" FROM sessions s LEFT JOIN replicas r ON r.replica_id = s.replica WHERE {condition}",
            TAKEOVER_MARGIN,
            *args,
        )
        if row is None:
            return None
        values = tuple(row)
        count = len(COLUMNS.split(","))
        replica, epoch, advertise, alive = values[count:]
        record = SessionRecord.from_row(values[:count])
        return Lease(record, replica, epoch, advertise, bool(alive and replica))

    async def lease_left(self, address: str) -> float:
        """Seconds, by the database's clock, until no replica at `address` has a lease alive (plus
        the takeover margin): from then on its sessions may be taken over. <= 0: already so."""
        left = await self._pool.fetchval(
            "SELECT extract(epoch FROM max(lease_until) + make_interval(secs => $2) - clock_timestamp())"
            " FROM replicas WHERE advertise = $1",
            address,
            TAKEOVER_MARGIN,
        )
        return float(left) if left is not None else 0.0

    def free_slots(self) -> int:
        return self._free_slots()

    async def most_free(self) -> str | None:
        """The address of the live replica with the most free agent slots (none: None)."""
        found = await self._pool.fetchval(
            "SELECT advertise FROM replicas WHERE replica_id != $1 AND free_slots > 0"
            " AND lease_until > clock_timestamp() ORDER BY free_slots DESC, replica_id LIMIT 1",
            self.replica_id,
        )
        return str(found) if found is not None else None

    async def page(
        self, after: tuple[float, str] | None, principal: str, agent: str, limit: int
    ) -> list[tuple[SessionRecord, str]]:
        """Stored sessions in creation order after `after`, each with the replica serving it now
        ('' when none does), for ListSessions over all replicas."""
        conditions: list[str] = ["true"]
        args: list[Any] = [TAKEOVER_MARGIN]
        if after is not None:
            args += [after[0], after[1]]
            conditions.append(f"(s.create_time, s.session_id) > (${len(args) - 1}, ${len(args)})")
        for column, value in (("owner", principal), ("agent", agent)):  # owner: the principal's column
            if value:
                args.append(value)
                conditions.append(f"s.{column} = ${len(args)}")
        args.append(limit)
        rows = await self._pool.fetch(
            f"SELECT {_qualified(COLUMNS)}, CASE WHEN r.lease_until + make_interval(secs => $1)"
            " > clock_timestamp() THEN s.replica ELSE '' END"
            " FROM sessions s LEFT JOIN replicas r ON r.replica_id = s.replica"
            f" WHERE {' AND '.join(conditions)}"
            f" ORDER BY s.create_time, s.session_id LIMIT ${len(args)}",
            *args,
        )
        return [(SessionRecord.from_row(tuple(row)[:-1]), row[-1]) for row in rows]

    async def take(self, lease: Lease) -> tuple[SessionRecord, int] | None:
        """Take a session over (compare-and-set on its epoch, and only while our own lease is
        alive); the row as it is now and its new epoch, or None when another replica moved it
        first or its leaseholder is alive again. Its running turns are interrupted."""
        async with self._pool.acquire(timeout=DB_TIMEOUT) as db, db.transaction():
            row = await db.fetchrow(
                "UPDATE sessions s SET replica = $1, epoch = epoch + 1 WHERE session_id = $2 AND epoch = $3"
                " AND (replica = '' OR replica = $1 OR NOT EXISTS (SELECT 1 FROM replicas r"
                " WHERE r.replica_id = s.replica"
                " AND r.lease_until + make_interval(secs => $4) > clock_timestamp()))"
                " AND EXISTS (SELECT 1 FROM replicas m WHERE m.replica_id = $1"
                " AND m.lease_until > clock_timestamp())"
                f" RETURNING {COLUMNS}, epoch",
                self.replica_id,
                lease.record.session_id,
                lease.epoch,
                TAKEOVER_MARGIN,
            )
            if row is None:
                return None
            await db.execute(
                "UPDATE turns SET state = 'interrupted' WHERE session_id = $1 AND state = 'running'",
                lease.record.session_id,
            )
        epoch = int(row[-1])
        log.info(
            "took over session=%s from replica=%s epoch=%d",
            lease.record.session_id,
            lease.replica or "(released)",
            epoch,
        )
        return SessionRecord.from_row(tuple(row)[:-1]), epoch

    async def expire_unleased(self, retention: float) -> int:
        """Sessions no live replica serves (released, or their replica is gone) unused for
        `retention` are deleted with their turns, as each replica's sweeper deletes its own."""
        async with self._pool.acquire(timeout=DB_TIMEOUT) as db, db.transaction():
            gone = await db.fetch(
                "DELETE FROM sessions s WHERE s.last_active_time < extract(epoch FROM clock_timestamp()) - $1"
                " AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.replica_id = s.replica"
                " AND r.lease_until + make_interval(secs => $2) > clock_timestamp()) RETURNING s.session_id",
                retention,
                TAKEOVER_MARGIN,
            )
            ids = [row[0] for row in gone]
            if ids:
                await delete_turns_of(db, ids)
        if ids:
            log.info("deleted %d sessions no replica served, unused past the retention", len(ids))
        return len(ids)

    async def peers(self) -> int:
        """Other replicas whose lease is alive."""
        count = await self._pool.fetchval(
            "SELECT count(*) FROM replicas WHERE replica_id != $1 AND lease_until > clock_timestamp()",
            self.replica_id,
        )
        return int(count)

    async def leave(self) -> None:
        """Drain, once the sessions are released (state/postgres.py): we leave the table."""
        await self.stop()
        await self._pool.execute("DELETE FROM replicas WHERE replica_id = $1", self.replica_id)

    async def fenced(self) -> None:
        """Wait (bounded) until every fence under way has ended its sessions' agents: before the
        replica releases its sessions on drain, or stops."""
        if self._fences:
            _, late = await asyncio.wait(set(self._fences), timeout=FENCE_TIMEOUT)
            if late:
                log.error(
                    "the fence of a lost lease did not end within %gs replica=%s",
                    FENCE_TIMEOUT,
                    self.replica_id,
                )

    async def stop(self) -> None:
        """Stop renewing; a fence under way is awaited first (bounded): the sessions it took from
        the pool's map are reached by nothing else, not even the server's shutdown."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.fenced()
        for task in (self._task, self._expiry):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._lease_db is not None:
            with contextlib.suppress(Exception):
                await self._lease_db.close(timeout=DB_TIMEOUT)


def _qualified(columns: str) -> str:
    return ", ".join(f"s.{c.strip()}" for c in columns.split(","))
