"""A fair share of agent slots between principals (issue 8): each principal's
`max_live_sessions`, a reserve no single principal can take, and eviction that hits the
principal over its share first. The rules are in server/agents/slots.py; without authentication
everything stays plain least-recently-used eviction."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sessiongate.server.agents.slots import LiveLimit, Slots
from sessiongate.server.errors import PoolExhausted, QuotaExceeded
from sessiongate.server.security.principals import TokensFileError, TokenTable, token_hash
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error, reply_text

TOKENS = {"alice": "alice-secret", "bob": "bob-secret", "dave": "dave-secret"}


def tokens_file(path: Path, **extra: str) -> Path:
    """A tokens file of TOKENS' principals; `extra` adds lines to a principal's table."""
    path.write_text(
        "".join(
            f'[principals.{name}]\ntoken_sha256 = "{token_hash(token)}"\n{extra.get(name, "")}\n'
            for name, token in TOKENS.items()
        )
    )
    return path


def as_(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


async def create(gate: Gate, who: str) -> pb.Session:
    return await gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_(who), timeout=30)


async def state(gate: Gate, who: str, session_id: str) -> int:
    session = await gate.stub.GetSession(
        pb.GetSessionRequest(session_id=session_id), metadata=as_(who), timeout=5
    )
    return session.state


async def busy(gate: Gate, who: str, session_id: str) -> Any:
    """A turn that keeps running (`/stall`) until the returned call is cancelled."""
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session_id, text="/stall"), metadata=as_(who))
    await asyncio.wait_for(call.read(), 10)  # its first event: the turn runs, the slot is held
    return call


# ---- the tokens file ---------------------------------------------------------------------


def test_the_tokens_file_takes_max_live_sessions_and_refuses_a_bad_one(tmp_path: Path) -> None:
    table = TokenTable(tokens_file(tmp_path / "tokens.toml", alice="max_live_sessions = 2\n"))
    table.load()
    assert table.live_limit("alice") == 2
    assert table.live_limit("bob") is None and table.live_limit("nobody") is None
    for bad in ("0", "-1", '"2"', "true", "1.5"):
        table = TokenTable(tokens_file(tmp_path / "bad.toml", alice=f"max_live_sessions = {bad}\n"))
        with pytest.raises(TokensFileError, match="max_live_sessions must be a whole number"):
            table.load()


# ---- the rules, on slots alone ---------------------------------------------------------------


@dataclass(eq=False)
class Seat:
    """A session as the slots see it: a principal, a slot or not, idle or busy."""

    slots: Slots
    principal: str
    last_active_time: float
    idle: bool = True
    holds_slot: bool = False
    suspended: bool = False

    def evictable(self) -> bool:
        return self.idle and self.holds_slot

    async def suspend(self) -> bool:
        self.holds_slot, self.suspended = False, True
        self.slots.release()
        return True


class Seats:
    def __init__(self, limit: int, live_limit: LiveLimit | None) -> None:
        self.all: list[Seat] = []
        self.slots = Slots(limit, lambda: self.all, live_limit)

    async def take(self, principal: str, last_active_time: float = 0.0, idle: bool = True) -> Seat:
        seat = Seat(self.slots, principal, last_active_time, idle)
        self.all.append(seat)
        await self.slots.acquire(seat)
        seat.holds_slot = True  # as the holder does once acquire returns
        return seat

    def suspended(self) -> list[tuple[str, float]]:
        return [(s.principal, s.last_active_time) for s in self.all if s.suspended]


def no_limits(name: str) -> int | None:
    return None


async def test_a_full_pool_evicts_the_principal_over_its_share_first_and_one_trust_domain_evicts_lru() -> (
    None
):
    for live_limit, expected in ((no_limits, [("alice", 2.0)]), (None, [("bob", 1.0)])):
        seats = Seats(3, live_limit)
        await seats.take("bob", 1.0)  # the least recently used
        await seats.take("alice", 2.0)
        await seats.take("alice", 3.0)  # alice holds 2 of 3: over her share once dave comes
        await seats.take("dave", 4.0)
        assert seats.suspended() == expected, "shared" if live_limit else "one trust domain"


async def test_a_principal_over_its_max_live_sessions_is_evicted_before_anyone_else() -> None:
    limits: dict[str, int] = {}
    seats = Seats(8, limits.get)
    for n in range(4):
        await seats.take("alice", 1.0 + n)  # alice's are the least recently used
    for n in range(4):
        await seats.take("bob", 5.0 + n)
    limits["bob"] = 3  # lowered by a tokens file reload after bob started his four
    await seats.take("alice", 9.0)  # alice holds her share (4 of 8); bob is over his limit
    assert seats.suspended() == [("bob", 5.0)]


async def test_a_principal_with_its_share_evicts_its_own_idle_session_not_one_of_a_smaller_holder() -> None:
    seats = Seats(8, no_limits)
    await seats.take("bob", 0.0)  # bob's idle session is the least recently used
    await seats.take("bob", 1.0, idle=False)
    for n in range(6):
        await seats.take("alice", 2.0 + n)
    await seats.take("alice", 9.0)  # alice has 6 of 8 (share 4): she may not push bob out
    assert seats.suspended() == [("alice", 2.0)]
    for seat in seats.all:
        seat.idle = seat.principal == "bob" and seat.last_active_time == 0.0
    with pytest.raises(PoolExhausted):
        await seats.take("alice", 10.0)  # bob's idle session stays his
    await seats.take("bob", 11.0)  # bob, within his share, may evict (his own, the oldest idle)
    assert ("bob", 0.0) in seats.suspended()


async def test_one_principal_never_takes_the_reserved_slots_even_with_free_ones_left() -> None:
    seats = Seats(4, {"bob": 1}.get)
    for n in range(3):
        await seats.take("alice", float(n), idle=False)
    with pytest.raises(QuotaExceeded) as raised:
        await seats.take("alice", 3.0)  # 1 of 4 is kept for the others
    assert raised.value.quota == ("principal:alice", "fair share: at most 3 of the 4 agent slots")
    assert raised.value.retry_after is not None
    first = await seats.take("bob", 4.0)
    await seats.take("bob", 5.0)  # at his max_live_sessions: his own idle one makes room
    assert first.suspended and seats.slots.used == 4
    for seat in seats.all:
        seat.idle = False
    with pytest.raises(QuotaExceeded) as raised:
        await seats.take("bob", 6.0)  # at his own limit with nothing idle
    assert raised.value.quota == ("principal:bob", "max_live_sessions is 1")


# ---- a real server -----------------------------------------------------------------------------


async def test_at_its_max_live_sessions_a_principal_suspends_its_own_idle_session_then_gets_quota_exceeded(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    path = tokens_file(tmp_path / "tokens.toml", alice="max_live_sessions = 1\n")
    gate: Gate = await make_gate(auth_tokens_file=path, max_sessions=4)
    first = await create(gate, "alice")
    second = await create(gate, "alice")  # free slots, but alice runs one agent at most
    assert await state(gate, "alice", first.session_id) == pb.SESSION_STATE_SUSPENDED
    assert await state(gate, "alice", second.session_id) == pb.SESSION_STATE_IDLE

    call = await busy(gate, "alice", second.session_id)
    over = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice")))
    assert (over.code, over.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert over.quota == {"principal:alice": "max_live_sessions is 1"}
    assert over.retry_delay is not None and over.retry_delay > 0
    await create(gate, "bob")  # others are not limited by alice's quota
    call.cancel()


async def test_one_principal_with_every_turn_busy_cannot_starve_another_of_slots(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate: Gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "tokens.toml"), max_sessions=4)
    calls = []
    for _ in range(3):
        session = await create(gate, "alice")
        calls.append(await busy(gate, "alice", session.session_id))
    greedy = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice")))
    assert (greedy.code, greedy.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert greedy.quota == {"principal:alice": "fair share: at most 3 of the 4 agent slots"}

    mine = await create(gate, "bob")  # the slot alice could not take is bob's
    events = gate.stub.Prompt(
        pb.PromptRequest(session_id=mine.session_id, text="still here"), metadata=as_("bob")
    )
    assert reply_text([e async for e in events]) == "still here"
    for call in calls:
        call.cancel()


async def test_when_slots_are_short_the_principal_over_its_share_is_evicted_first(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate: Gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "tokens.toml"), max_sessions=3)
    bobs = await create(gate, "bob")  # the least recently used session
    alices = [await create(gate, "alice") for _ in range(2)]  # 2 of 3 slots: over her share
    await create(gate, "dave")  # the pool is full: one session must be suspended
    assert await state(gate, "alice", alices[0].session_id) == pb.SESSION_STATE_SUSPENDED
    assert await state(gate, "alice", alices[1].session_id) == pb.SESSION_STATE_IDLE
    assert await state(gate, "bob", bobs.session_id) == pb.SESSION_STATE_IDLE
