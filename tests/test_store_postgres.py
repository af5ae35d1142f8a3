"""The PostgreSQL backend of the store on its own: versioned migrations that several replicas may
run at once, refusals that leave the database as it was, and clear failures at start. (The
persistence tests that restart servers run on both backends through the `state` fixture.)"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from sessiongate.server.cluster.leases import Leases
from sessiongate.server.errors import OwnerLost
from sessiongate.server.state import pg_schema
from sessiongate.server.state.base import SessionRecord, StoreError
from sessiongate.server.state.postgres import IDLE_IN_TRANSACTION_TIMEOUT, PostgresStore, redacted
from sessiongate.server.state.turn_records import TurnRow

from tests.postgres import PostgresServer


async def versions(url: str) -> list[int]:
    db = await asyncpg.connect(url, timeout=10)
    try:
        return [row[0] for row in await db.fetch("SELECT version FROM sessiongate_schema ORDER BY version")]
    finally:
        await db.close(timeout=10)


async def test_replicas_starting_at_once_run_each_schema_step_once_and_writes_are_fenced(
    postgres: PostgresServer,
) -> None:
    url = await postgres.fresh_database()
    stores = [PostgresStore(url, replica) for replica in ("a", "b", "c")]
    opened = await asyncio.gather(*(store.open() for store in stores))
    assert opened == [[], [], []]
    assert await versions(url) == list(range(1, pg_schema.SCHEMA_VERSION + 1))
    info = {"name": "x"}
    record = SessionRecord("s1", "echo", "/", {"k": "v"}, "idle", "a1", "r1", 1.0, 2.0, info, "alice")
    leaseholder, other, reader = stores
    await leaseholder.put(record)
    turn = TurnRow("t1", "s1", 5.0, None, "running", 1, 0, b"record")
    await leaseholder.put_turn(turn)
    await leaseholder.add_turn_events("t1", [(1, b"e1"), (2, b"e2")], 1, 2, 10)
    assert await reader.turn_events("t1", 2, 10, 1 << 20) == [b"e2"]
    assert await reader.get_turn("s1", "") == TurnRow("t1", "s1", 5.0, None, "running", 1, 2, b"record")
    # A replica that does not own the session at its epoch changes nothing of it, and hears so.
    fenced: list[str] = []
    other.on_fenced = fenced.append
    await other.put(replace(record, state="busy", labels={"k": "changed"}))
    await other.add_turn_events("t1", [(3, b"stale")], 1, 3, 10)
    await other.delete("s1")
    assert fenced == ["s1"]
    assert await reader.turn_events("t1", 1, 10, 1 << 20) == [b"e1", b"e2"]
    for store in stores:
        await store.close()
    again = PostgresStore(url, "a")  # the leaseholder, restarted under its replica id
    assert await again.open() == [record]
    assert again.epochs == {"s1": 2}  # a new epoch: the previous process's writes are fenced off
    # A turn that was running when its server went away is interrupted.
    assert [t.state for t in await again.list_turns("s1", None, 10)] == ["interrupted"]
    await again.delete("s1")
    assert await again.get_turn("s1", "t1") is None
    await again.close()


async def test_a_failing_schema_step_leaves_the_database_as_it_was(postgres: PostgresServer) -> None:
    url = await postgres.fresh_database()
    broken = {1: pg_schema.MIGRATIONS[1], 2: "CREATE TABLE half_done (x int); SELECT no_such_function();"}
    db = await asyncpg.connect(url, timeout=10)
    try:
        with pytest.raises(StoreError, match=r"from schema version 1 to 2: .*no_such_function"):
            await pg_schema.migrate(db, broken)
        # One transaction for the whole upgrade: not even step 1 is left behind.
        assert await db.fetchval("SELECT to_regclass('half_done')") is None
        assert await db.fetchval("SELECT to_regclass('sessions')") is None
        assert await db.fetchval("SELECT to_regclass('sessiongate_schema')") is None
    finally:
        await db.close(timeout=10)
    store = PostgresStore(url)  # the real steps still apply afterwards
    assert await store.open() == []
    await store.close()
    assert await versions(url) == list(range(1, pg_schema.SCHEMA_VERSION + 1))


async def test_a_database_from_a_newer_server_is_refused(postgres: PostgresServer) -> None:
    url = await postgres.fresh_database()
    store = PostgresStore(url)
    await store.open()
    await store.close()
    db = await asyncpg.connect(url, timeout=10)
    await db.execute("INSERT INTO sessiongate_schema (version) VALUES (999)")
    await db.close(timeout=10)
    with pytest.raises(StoreError, match="schema version 999 is newer"):
        await PostgresStore(url).open()


def test_an_unreachable_database_exits_1_with_a_clear_message_and_no_password(tmp_path: Path) -> None:
    url = "postgresql://gate:s3cret@127.0.0.1:9/sessions"  # the discard port: nothing listens
    result = subprocess.run(
        [sys.executable, "-m", "sessiongate.server", "--listen", "127.0.0.1:0", "--state-url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot connect to the session database postgresql://gate@127.0.0.1:9/sessions" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
    assert redacted(url) == "postgresql://gate@127.0.0.1:9/sessions"


def test_a_state_url_that_is_not_postgresql_is_a_configuration_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sessiongate.server", "--state-url", "mysql://x/y"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "state_url must be a postgresql:// URL" in result.stderr


async def test_sessions_no_replica_serves_are_deleted_past_the_retention_and_others_kept(
    postgres: PostgresServer,
) -> None:
    url = await postgres.fresh_database()
    store = PostgresStore(url, "a")
    await store.open()

    async def nothing() -> None:
        return None

    alive = Leases(url, store.pool, "a", "127.0.0.1:1", 30, free_slots=lambda: 1, on_lost=nothing)
    await alive.start()
    try:
        old = SessionRecord("old", "echo", "/", {}, "suspended", "", "", 1.0, 1.0)
        await store.put(old)
        await store.put(replace(old, session_id="recent", create_time=2.0, last_active_time=time.time()))
        await store.put_turn(TurnRow("t-old", "old", 1.0, 2.0, "completed", 1, 1, b""))
        await store.add_turn_events("t-old", [(1, b"e")], 1, 1, 10)
        assert await store.release() == 2  # as on drain: no replica serves them now
        await store.put(replace(old, session_id="served", create_time=3.0))  # a's own, as old
        sweeper = Leases(url, store.pool, "b", "127.0.0.1:2", 30, free_slots=lambda: 1, on_lost=nothing)
        assert await sweeper.expire_unleased(3600) == 1
        left = await sweeper.page(None, "", "", 10)
        assert [(record.session_id, replica) for record, replica in left] == [("recent", ""), ("served", "a")]
        assert await store.turn_events("t-old", 1, 10, 1 << 20) == []
    finally:
        await alive.stop()
        await store.close()


async def test_a_frozen_replicas_transaction_and_its_row_locks_end_within_the_idle_bound(
    postgres: PostgresServer,
) -> None:
    """A replica frozen (SIGSTOP, a partition) inside a transaction that locked its session row
    must not block the takeover: the database ends the idle transaction, locks and all, well
    before lease_ttl + TAKEOVER_MARGIN. (Seen: a takeover STORE_UNAVAILABLE for as long as the
    frozen replica's connection lived.)"""
    url = await postgres.fresh_database()
    store = PostgresStore(url, "a")
    await store.open()
    other = await asyncpg.connect(url, timeout=10)
    try:
        await store.put(SessionRecord("locked", "echo", "/", {}, "idle", "", "", 1.0, 1.0))
        frozen = await store.pool.acquire(timeout=10)
        await frozen.execute("BEGIN")
        await frozen.execute("SELECT 1 FROM sessions WHERE session_id = 'locked' FOR UPDATE")
        with pytest.raises(asyncpg.LockNotAvailableError):  # held: a takeover would wait on it
            await other.execute("SELECT 1 FROM sessions WHERE session_id = 'locked' FOR UPDATE NOWAIT")
        started = time.monotonic()
        async with asyncio.timeout(IDLE_IN_TRANSACTION_TIMEOUT + 20):
            async with other.transaction():  # waits for the lock, which the database frees
                await other.execute("SELECT 1 FROM sessions WHERE session_id = 'locked' FOR UPDATE")
        assert time.monotonic() - started >= IDLE_IN_TRANSACTION_TIMEOUT - 0.5
        # Its session was ended by the database: the connection is unusable (how asyncpg says so
        # depends on whether it has read the server's goodbye yet).
        with pytest.raises(Exception):  # noqa: B017
            await frozen.execute("SELECT 1")
        with contextlib.suppress(Exception):
            await store.pool.release(frozen)
    finally:
        await other.close(timeout=10)
        await store.close()


async def test_a_stale_owner_neither_brings_back_a_deleted_session_nor_takes_one_without_a_lease(
    postgres: PostgresServer,
) -> None:
    url = await postgres.fresh_database()
    stale = PostgresStore(url, "a")
    await stale.open()
    fenced: list[str] = []
    stale.on_fenced = fenced.append
    record = SessionRecord("s1", "echo", "/", {}, "idle", "", "", 1.0, 1.0)
    await stale.put(record)
    db = await asyncpg.connect(url, timeout=10)
    try:  # another replica takes it over and closes it
        await db.execute("UPDATE sessions SET replica = 'b', epoch = epoch + 1 WHERE session_id = 's1'")
        await db.execute("DELETE FROM sessions WHERE session_id = 's1'")
        stale.put_later(replace(record, state="busy"))
        await stale.close()  # the queued write is flushed
        assert await db.fetchval("SELECT count(*) FROM sessions") == 0
        assert fenced == ["s1"]
        # A replica whose lease is not alive takes nothing over, not even its own released session.
        await db.execute(
            "INSERT INTO sessions (session_id, agent, cwd, labels, state, agent_session_id, request_id,"
            " create_time, last_active_time, agent_info, replica, epoch)"
            " VALUES ('s2', 'echo', '/', '{}', 'idle', '', '', 1, 1, '{}', '', 4)"
        )
    finally:
        await db.close(timeout=10)
    store = PostgresStore(url, "c")
    await store.open()

    async def nothing() -> None:
        return None

    unleased = Leases(url, store.pool, "c", "127.0.0.1:3", 10, free_slots=lambda: 1, on_lost=nothing)
    lease = await unleased.lease("s2")
    assert lease is not None and lease.replica == "" and not lease.alive
    assert await unleased.take(lease) is None
    with pytest.raises(OwnerLost):
        await unleased.check()
    await unleased.start()  # now with a lease
    try:
        taken = await unleased.take(lease)
        assert taken is not None and taken[1] == 5 and taken[0].session_id == "s2"
    finally:
        await unleased.stop()
        await store.close()


# ---- issue 19: a stale owner's update of a session row that still exists ---------------------


async def test_a_stale_epochs_update_of_a_session_that_still_exists_is_not_applied(
    postgres: PostgresServer,
) -> None:
    """The same replica id at an older epoch (the process before a restart, still writing) changes
    nothing of a row that is still there: the epoch, not only the replica, fences the update."""
    url = await postgres.fresh_database()
    stale = PostgresStore(url, "a")
    await stale.open()
    fenced: list[str] = []
    stale.on_fenced = fenced.append
    record = SessionRecord("s1", "echo", "/", {"k": "v"}, "idle", "a1", "", 1.0, 2.0)
    await stale.put(record)
    assert stale.epochs == {"s1": 1}
    current = PostgresStore(url, "a")  # restarted under the same replica id: a new epoch
    assert await current.open() == [record]
    assert current.epochs == {"s1": 2}
    stale.put_later(replace(record, state="busy", labels={"k": "stale"}, last_active_time=3.0))
    await stale.close()  # the queued update is flushed, at epoch 1
    assert fenced == ["s1"]
    db = await asyncpg.connect(url, timeout=10)
    try:
        row = await db.fetchrow("SELECT state, labels, last_active_time, replica, epoch FROM sessions")
        assert tuple(row) == ("idle", '{"k": "v"}', 2.0, "a", 2)
        # The owner at the current epoch still writes it.
        current.put_later(replace(record, labels={"k": "current"}, last_active_time=4.0))
        await current.close()
        row = await db.fetchrow("SELECT labels, last_active_time, epoch FROM sessions")
        assert tuple(row) == ('{"k": "current"}', 4.0, 2)
    finally:
        await db.close(timeout=10)
