"""A session as its record keeps it, for showing while no `Session` of it runs here.

GetSession and ListSessions show a row another replica holds, or one no replica serves now
(released, or its leaseholder's lease ran out), and a retried CloseSession answers with a closed
session's tombstone: none of them needs an agent holder, a lock or questions, only what the
record says. Calls that read a session without taking it over (WatchTurn, ListTurns, GetTurn,
CancelPrompt, the answers to questions) also get this view there: it has no live turn, no
running turn to cancel and no open question. The pool makes a real `Session` from one when it
serves the session (at start, or taken over).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from sessiongate.server.agents.protocol import Handshake
from sessiongate.server.agents.state import AgentState
from sessiongate.server.settings import AgentConfig
from sessiongate.server.state.base import SessionRecord
from sessiongate.server.turns.questions import Questions
from sessiongate.server.turns.turn import Turn
from sessiongate.server.turns.turn_log import TurnLog


class State(enum.Enum):
    """A session's state, as GetSession shows it."""

    IDLE = "idle"
    BUSY = "busy"
    RECOVERING = "recovering"
    SUSPENDED = "suspended"
    CLOSED = "closed"


@dataclass(slots=True)
class StoredSession:
    """A stored session, SUSPENDED (or CLOSED: a tombstone's), as its record has it."""

    session_id: str
    config: AgentConfig  # an agent no longer configured has a stand-in: its sessions stay listed
    cwd: str
    labels: Mapping[str, str]
    request_id: str
    principal: str
    create_time: float
    last_active_time: float
    agent_session_id: str
    handshake: Handshake | None
    agent_state: AgentState
    closed: bool = False
    live_logs: dict[str, TurnLog] = field(default_factory=dict)  # none: no turn runs here

    @classmethod
    def from_record(
        cls, record: SessionRecord, config: AgentConfig, *, closed: bool = False
    ) -> StoredSession:
        return cls(
            session_id=record.session_id,
            config=config,
            cwd=record.cwd,
            labels=dict(record.labels),
            request_id=record.request_id,
            principal=record.principal,
            create_time=record.create_time,
            last_active_time=record.last_active_time,
            agent_session_id=record.agent_session_id,
            handshake=handshake(record.agent_info),
            agent_state=AgentState.from_json(record.agent_state),
            closed=closed,
        )

    @property
    def state(self) -> State:
        return State.CLOSED if self.closed else State.SUSPENDED

    # What the service reads of a live session, as it is for one that runs nothing here.

    @property
    def ending(self) -> bool:
        return False

    @property
    def turn(self) -> Turn | None:
        return None

    @property
    def turn_log(self) -> TurnLog | None:
        return None

    def live_log(self, turn_id: str) -> TurnLog | None:
        return None

    def cancel(self) -> bool:
        return False

    @property
    def questions(self) -> Questions:
        """None open: an answer finds no question (as for a session with no turn running)."""
        return Questions(self.session_id)


def handshake(info: Mapping[str, object]) -> Handshake | None:
    """The agent's handshake as a record keeps it (`agent_info`; empty: never started)."""
    if not info:
        return None
    return Handshake(
        name=str(info.get("name", "")),
        version=str(info.get("version", "")),
        title=str(info.get("title", "")),
        load_session=bool(info.get("load_session", False)),
        auth_methods=(),
        close_session=bool(info.get("close_session", False)),
        resume_session=bool(info.get("resume_session", False)),
    )
