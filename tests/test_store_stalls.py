"""A store that stops answering (a hung disk or database), on both backends: retried turn writes
wait as one copy per turn, not one per retry, and a read whose caller gave up never runs.

The store is stalled on purpose: its writer (SQLite's database thread, PostgreSQL's ordered
writer) is held by a blocker queued first, released by the test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sessiongate.server.errors import StoreUnavailable
from sessiongate.server.state import turn_records
from sessiongate.server.state.base import SessionRecord
from sessiongate.server.state.postgres import PostgresStore
from sessiongate.server.state.sqlite import SessionStore
from sessiongate.server.state.turn_records import TurnRow

from tests.postgres import PostgresServer

Store = SessionStore | PostgresStore
EVENT = b"x" * 1000


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = SessionStore(tmp_path / "stalls.db")
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        opened = PostgresStore(await server.fresh_database(), "replica-a")
    await opened.open()
    await opened.put(SessionRecord("s1", "echo", "/", {}, "idle", "", "", 1.0, 1.0))
    await opened.put_turn(TurnRow("t1", "s1", 1.0, None, "running", 1, 0, b"record"))
    yield opened
    await opened.close()


def stall(store: Store) -> Callable[[], None]:
    """Hold the store's writer until the returned function is called (at most 60 s)."""
    if isinstance(store, SessionStore):
        held = threading.Event()
        store._thread.submit(held.wait, 60)
        return held.set

    released = asyncio.Event()

    async def blocker(db: asyncpg.Connection) -> None:
        async with asyncio.timeout(60):
            await released.wait()

    store._queue(blocker, None)
    return released.set


async def test_retried_turn_writes_of_a_hung_store_wait_as_one_copy_per_turn(store: Store) -> None:
    release = stall(store)
    rows: list[tuple[int, bytes]] = []
    for seq in range(1, 6):  # as turn_log.py retries: the same first seq, and what came since
        rows.append((seq, EVENT))
        with pytest.raises(StoreUnavailable):
            await store.add_turn_events("t1", list(rows), 1, seq, 0.2)
    assert store.turn_backlog() == (1, 5 * len(EVENT))

    release()
    await asyncio.wait_for(store.put_turn(TurnRow("t1", "s1", 1.0, 2.0, "completed", 1, 5, b"end")), 30)
    assert store.turn_backlog() == (0, 0)
    assert await store.turn_events("t1", 1, 100, 1 << 20) == [EVENT] * 5
    written = await store.get_turn("s1", "t1")
    assert written is not None and (written.first_seq, written.last_seq) == (1, 5)


async def test_a_drop_prunes_a_waiting_batch_and_a_delete_of_its_session_removes_it(store: Store) -> None:
    release = stall(store)
    events = [(seq, EVENT) for seq in range(1, 6)]
    with pytest.raises(StoreUnavailable):
        await store.add_turn_events("t1", events, 1, 5, 0.2)
    store.drop_turn_events_later("t1", 4)  # the turn log's bound dropped seqs 1..3
    assert store.turn_backlog() == (1, 2 * len(EVENT))
    store.delete_later("s1")
    assert store.turn_backlog() == (0, 0)

    release()
    assert await asyncio.wait_for(store.list_turns("s1", None, 10), 30) == []


async def test_a_read_whose_caller_gave_up_on_a_hung_store_never_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    if isinstance(store, SessionStore):
        events = turn_records.events

        def counted(*args: Any) -> list[bytes]:
            reads.append("events")
            return events(*args)

        monkeypatch.setattr(turn_records, "events", counted)
    else:
        fetch = asyncpg.connection.Connection.fetch

        async def counted_fetch(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
            if "FROM turn_events" in query:
                reads.append("events")
            return await fetch(self, query, *args, **kw)

        monkeypatch.setattr(asyncpg.connection.Connection, "fetch", counted_fetch)
    await store.add_turn_events("t1", [(1, EVENT)], 1, 1, 30)

    release = stall(store)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.turn_events("t1", 1, 10, 1 << 20), 0.3)
    release()
    await asyncio.wait_for(store.get_turn("s1", "t1"), 30)  # queued after them: they are past

    assert reads == []
    assert await store.turn_events("t1", 1, 10, 1 << 20) == [EVENT]
    assert reads == ["events"]
