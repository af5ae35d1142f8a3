"""The fence of a lost lease (server/cluster/leases.py) against a pool of fake agents: it ends every
session's agent whatever happens to the call that noticed the loss, and the server's shutdown
(which reaches the leases through stop()) waits for a fence under way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sessiongate.server.cluster.leases import Leases
from sessiongate.server.cluster.router import Router
from sessiongate.server.errors import OwnerLost, StreamStalled
from sessiongate.server.sessions.pool import SessionPool

from tests.conftest import eventually
from tests.fakes import FAKE, FakeAgents, FakeBehaviour, fake_pool


@pytest.fixture
async def agents_and_pool(tmp_path: Path) -> AsyncIterator[tuple[FakeAgents, SessionPool]]:
    agents = FakeAgents()
    pool = await fake_pool(tmp_path, agents)
    yield agents, pool
    await pool.shutdown()


def lapsed(noticed: asyncio.Event, pool: SessionPool) -> Leases:
    """The leases of a replica whose own lease has run out (never renewed: no database is
    needed); their fence ends the pool's sessions as the server's does, and says when it starts."""

    async def lease_lost() -> None:
        noticed.set()
        await pool.fence_all()

    unused: Any = None  # the fence runs no query
    return Leases("", unused, "a", "127.0.0.1:1", 3.0, free_slots=lambda: 0, on_lost=lease_lost)


async def test_a_cancelled_call_that_noticed_the_lost_lease_does_not_cut_the_fence_short(
    agents_and_pool: tuple[FakeAgents, SessionPool],
) -> None:
    agents, pool = agents_and_pool
    sessions = [await pool.create(FAKE, "/", "", {}) for _ in range(3)]
    assert len(agents.running()) == 3
    noticed = asyncio.Event()
    leases = lapsed(noticed, pool)
    call = asyncio.create_task(leases.check())  # the RPC that notices first
    await noticed.wait()
    # The fence has taken the sessions off the map and is about to end their agents: the caller
    # goes away now (its client cancelled), before the agents' fences have run at all.
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: not agents.running(), what="every agent to end after the lease was lost")
    assert all(s.fenced for s in sessions) and not any(pool.has(s.session_id) for s in sessions)
    # A later call is refused, and the loss is fenced once.
    noticed.clear()
    with pytest.raises(OwnerLost):
        await asyncio.wait_for(leases.check(), 10)
    assert not noticed.is_set()


async def test_stopping_the_leases_waits_for_a_fence_under_way(
    agents_and_pool: tuple[FakeAgents, SessionPool],
) -> None:
    agents, pool = agents_and_pool
    agents.behaviour = FakeBehaviour(terminate_delay=1.0, killable=False)  # each agent takes 1 s to end
    for _ in range(2):
        await pool.create(FAKE, "/", "", {})
    noticed = asyncio.Event()
    leases = lapsed(noticed, pool)
    call = asyncio.create_task(leases.check())
    await noticed.wait()
    call.cancel()
    # Shutdown: the sessions are no longer in the pool's map, so only the fence reaches them.
    await asyncio.wait_for(leases.stop(), 20)
    assert not agents.running()


async def test_a_stream_that_spanned_a_lost_and_renewed_lease_ends_owner_lost(
    agents_and_pool: tuple[FakeAgents, SessionPool],
) -> None:
    """A paused replica wakes, fences, and renews its lease before a stream's handler gets to
    map its error (a stall timer that fired on waking, on a loaded machine): the lease is valid
    again, yet the stream's session was fenced meanwhile, so it ends OWNER_LOST, not
    STREAM_STALLED. (Seen in the paused-owner test under load.)"""
    _, pool = agents_and_pool
    leases = lapsed(asyncio.Event(), pool)
    unused: Any = None
    router = Router(pool, unused, leases)
    mark = router.mark()
    stalled = StreamStalled("no event from the agent for 9.0s")
    await asyncio.wait({leases._fence()})  # the loss, noticed and fenced...
    leases._valid_until = float("inf")  # ...and the lease renewed since (no database here)
    assert leases.valid()
    assert isinstance(router.outcome(stalled, "sid", mark), OwnerLost)
    assert router.outcome(stalled, "sid", router.mark()) is stalled  # a stream started after it
