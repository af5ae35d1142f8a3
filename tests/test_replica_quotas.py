"""A principal's quotas hold over all replicas (issue 20 item 10): its sessions and its prompt
rate are counted in the database they share, not per replica. Real server processes, a real
PostgreSQL, the built-in agent; the store on its own for the database's failures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from sessiongate.server.errors import StoreUnavailable
from sessiongate.server.state import postgres as store_postgres
from sessiongate.server.state.postgres import PostgresStore
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ErrorDetails, details_of, expect_error, reply_text
from tests.postgres import PostgresServer
from tests.processes import ServerProcess
from tests.test_auth import as_, tokens_file
from tests.test_replicas import replicas

SESSIONS = {"principal:bob": "max_sessions is 2"}
PROMPTS = {"principal:bob": "max_prompts_per_minute is 3"}


@contextlib.asynccontextmanager
async def two_replicas(tmp_path: Path, url: str) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    """Replicas a and b with authentication; bob may keep 2 sessions and send 3 prompts a minute."""
    tokens = tokens_file(tmp_path / "tokens.toml")
    tokens.write_text(
        tokens.read_text().replace(
            "[principals.bob]\n", "[principals.bob]\nmax_sessions = 2\nmax_prompts_per_minute = 3\n"
        )
    )
    secret = tmp_path / "replica-token"
    secret.write_text("a-secret-the-replicas-share\n")
    auth = ("--auth-tokens-file", str(tokens), "--replica-token-file", str(secret))
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=10, options={"a": auth, "b": auth}) as r:
        yield r["a"], r["b"]


async def create(server: ServerProcess, who: str = "bob") -> pb.Session:
    session: pb.Session = await server.stub.CreateSession(
        pb.CreateSessionRequest(), metadata=as_(who), timeout=30
    )
    return session


async def rows_of(url: str, owner: str) -> int:
    db = await asyncpg.connect(url, timeout=10)
    try:
        count: int = await db.fetchval("SELECT count(*) FROM sessions WHERE owner = $1", owner)
        return count
    finally:
        await db.close(timeout=10)


def over_quota(error: ErrorDetails, quota: dict[str, str]) -> bool:
    return (error.code, error.reason, error.quota) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
        quota,
    )


async def test_a_principals_sessions_are_counted_over_all_replicas_and_a_close_anywhere_frees_one(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with two_replicas(tmp_path, url) as (a, b):
        on_a, on_b = await create(a), await create(b)
        assert (on_a.replica, on_b.replica) == ("a", "b")
        for server in (a, b):  # each replica holds one of bob's two: a third is refused on either
            refused = await expect_error(
                server.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"))
            )
            assert over_quota(refused, SESSIONS), refused
        await create(a, "alice")  # another principal is not held back by bob's quota
        assert await rows_of(url, "bob") == 2
        # Closed on one replica, the place is free on the other.
        await a.stub.CloseSession(
            pb.CloseSessionRequest(session_id=on_a.session_id), metadata=as_("bob"), timeout=15
        )
        again = await create(b)
        assert again.replica == "b"
        refused = await expect_error(a.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob")))
        assert over_quota(refused, SESSIONS), refused


async def test_two_creates_racing_on_two_replicas_for_the_last_place_leave_at_most_the_quota(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with two_replicas(tmp_path, url) as (a, b):
        await create(a)  # one place left
        # The test holds bob's quota lock, so both creates pass the early count and start their
        # agents, then wait at their inserts: the race the insert's own count must settle.
        holder = await asyncpg.connect(url, timeout=10)
        try:
            await holder.execute("SELECT pg_advisory_lock(hashtext('sessiongate-quota:' || $1))", "bob")
            racing = [asyncio.ensure_future(create(server)) for server in (a, b)]

            async def waiting() -> int:
                count: int = await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return count

            for _ in range(300):  # both at the lock (or, without it, both done): at most 30 s
                if await waiting() == 2 or all(call.done() for call in racing):
                    break
                await asyncio.sleep(0.1)
            both_waited = await waiting() == 2
            await holder.execute("SELECT pg_advisory_unlock(hashtext('sessiongate-quota:' || $1))", "bob")
        finally:
            await holder.close(timeout=10)
        results = await asyncio.gather(*racing, return_exceptions=True)
        made = [r for r in results if isinstance(r, pb.Session)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert await rows_of(url, "bob") == 2, results
        assert len(made) == 1 and len(refused) == 1, results
        assert over_quota(details_of(refused[0]), SESSIONS)
        assert both_waited  # the refusal came from the insert's count, not only the early one
        listed = await b.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("bob"), timeout=10)
        assert len(listed.sessions) == 2


async def test_a_principals_prompt_rate_is_counted_over_all_replicas(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with two_replicas(tmp_path, url) as (a, b):
        on_a, on_b = await create(a), await create(b)

        def prompt(server: ServerProcess, session: pb.Session, text: str) -> grpc.aio.UnaryStreamCall:
            request = pb.PromptRequest(session_id=session.session_id, text=text)
            return server.stub.Prompt(request, metadata=as_("bob"), timeout=60)

        for server, session, text in ((a, on_a, "one"), (a, on_a, "two"), (b, on_b, "three")):
            assert reply_text([e async for e in prompt(server, session, text)]) == text
        # Three in this minute, two of them on a: b refuses its second as a refuses its third,
        # served here or forwarded to the session's owner.
        for server, session in ((b, on_b), (a, on_a), (a, on_b)):
            fast = await expect_error(prompt(server, session, "too fast"))
            assert over_quota(fast, PROMPTS), fast
            assert fast.retry_delay is not None and 0 < fast.retry_delay <= 60
        alices = await create(a, "alice")  # another principal prompts on
        events = a.stub.Prompt(
            pb.PromptRequest(session_id=alices.session_id, text="mine"), metadata=as_("alice")
        )
        assert reply_text([e async for e in events]) == "mine"


async def test_a_quota_the_database_cannot_count_in_time_is_store_unavailable(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await postgres.fresh_database()
    store = PostgresStore(url, "a")
    await store.open()
    monkeypatch.setattr(store_postgres, "QUOTA_TIMEOUT", 0.5)
    holder = await asyncpg.connect(url, timeout=10)
    try:
        assert await store.admit_prompt("bob", 1, 60) is None
        retry = await store.admit_prompt("bob", 1, 60)
        assert retry is not None and 0 < retry <= 60
        await holder.execute("SELECT pg_advisory_lock(hashtext('sessiongate-rate:' || $1))", "bob")
        with pytest.raises(StoreUnavailable):  # a database that does not answer in time
            await store.admit_prompt("bob", 1, 60)
        await store.pool.close()
        with pytest.raises(StoreUnavailable):  # nor at all
            await store.count_sessions("bob")
    finally:
        await holder.close(timeout=10)
        await store.close()
