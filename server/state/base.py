"""What every backend of the state keeps and how it is used: session records, tombstones and
the `Store` interface (SQLite in sqlite.py, PostgreSQL for replicas in postgres.py; `app`
chooses one). Backends import this module, never each other."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sessiongate.server.state.turn_records import TurnRow

COLUMNS = ", ".join(
    (
        "session_id",
        "agent",
        "cwd",
        "labels",
        "state",
        "agent_session_id",
        "request_id",
        "create_time",
        "last_active_time",
        "agent_info",
        "owner",
        "agent_state",
    )
)

WRITE_TIMEOUT = 30.0  # seconds an awaited write may take before the request fails STORE_UNAVAILABLE


class StoreError(Exception):
    """The database can be neither used nor moved aside; the message says why."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    agent: str
    cwd: str
    labels: dict[str, str]
    state: str
    agent_session_id: str
    request_id: str
    create_time: float
    last_active_time: float
    agent_info: dict[str, Any] = field(default_factory=dict)
    principal: str = ""  # the principal that created it; stored in the `owner` column
    agent_state: dict[str, Any] = field(default_factory=dict)  # AgentState.to_json()

    def row(self) -> tuple[Any, ...]:
        return (
            self.session_id,
            self.agent,
            self.cwd,
            json.dumps(self.labels, sort_keys=True),
            self.state,
            self.agent_session_id,
            self.request_id,
            self.create_time,
            self.last_active_time,
            json.dumps(self.agent_info, sort_keys=True),
            self.principal,
            json.dumps(self.agent_state, sort_keys=True) if self.agent_state else "",
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SessionRecord:
        sid, agent, cwd, labels, state, acp_id, request_id, created, active, info, principal, agent_state = (
            row
        )
        return cls(
            sid,
            agent,
            cwd,
            json.loads(labels),
            state,
            acp_id,
            request_id,
            created,
            active,
            json.loads(info),
            principal,
            _json_object(agent_state),
        )


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What a closed session leaves behind for `keep` seconds (its retention): its record at the
    close, so a retried CloseSession answers the same after a restart or through another replica.
    Older tombstones go at each close."""

    record: SessionRecord
    keep: float

    def json(self) -> str:
        return json.dumps(list(self.record.row()))


class Fences:
    """Where a store reports the sessions a write found moved to another replica (their epoch
    changed), for whoever serves them here to fence them off.

    The store reports to the pool, but the pool is made with the store: this go-between is made
    before both, the store is given `report` and the pool connects its handler as it is made,
    so neither is patched after the fact. Reports before a handler is connected go nowhere."""

    def __init__(self) -> None:
        self._handlers: list[Callable[[str], None]] = []

    def handle_with(self, handler: Callable[[str], None]) -> None:
        self._handlers.append(handler)

    def report(self, session_id: str) -> None:
        for handler in self._handlers:
            handler(session_id)


def tombstone_record(text: str) -> SessionRecord:
    return SessionRecord.from_row(tuple(json.loads(text)))


def _json_object(text: str) -> dict[str, Any]:
    """A stored JSON object; an empty or unreadable one (a record from before) is {}."""
    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


class Store(Protocol):
    """What the pool, the transcripts and turn logs use; SQLite and PostgreSQL behind it."""

    where: str  # for logs: the file, or the database URL without its password

    async def open(self) -> list[SessionRecord]: ...
    async def put(self, record: SessionRecord) -> None: ...
    def put_later(self, record: SessionRecord) -> None: ...
    def backlog(self) -> int: ...
    async def delete(self, session_id: str, tombstone: Tombstone | None = None) -> None: ...
    def delete_later(self, session_id: str, tombstone: Tombstone | None = None) -> None: ...
    async def closed_session(self, session_id: str, max_age: float) -> SessionRecord | None: ...
    def put_turn_later(self, turn: TurnRow) -> None: ...
    async def put_turn(self, turn: TurnRow) -> None: ...
    async def add_turn_events(
        self, turn_id: str, events: list[tuple[int, bytes]], first_seq: int, last_seq: int, timeout: float
    ) -> None: ...
    def drop_turn_events_later(self, turn_id: str, before_seq: int) -> None: ...
    def keep_recent_turns_later(self, session_id: str, count: int, max_age: float) -> None: ...
    def expire_turns_later(self, max_age: float) -> None: ...
    async def turn_events(self, turn_id: str, from_seq: int, limit: int, max_bytes: int) -> list[bytes]: ...
    async def get_turn(self, session_id: str, turn_id: str) -> TurnRow | None: ...
    async def list_turns(
        self, session_id: str, before: tuple[float, str] | None, limit: int
    ) -> list[TurnRow]: ...
    async def close(self) -> None: ...
