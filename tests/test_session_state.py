"""Modes, config options, slash commands, title and usage: what the agent reports about a session.

End to end against the built-in agent (modes ask/code, options model and verbose, directives
/mode /state /title /usage /commands), plus the pieces on their own: the bounded state, the
agent connection's watch of updates that come while no turn runs, and a session whose agent
offers no modes at all.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from acp import schema
from sessiongate.server.agents.connection import AgentConnection
from sessiongate.server.agents.state import MAX_ITEMS, MAX_NAME, AgentState, TurnUsage
from sessiongate.server.errors import NotSupported
from sessiongate.server.sessions.pool import SessionPool
from sessiongate.server.state import sqlite as store
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, StateBackend, eventually, expect_error, kinds, reply_text
from tests.fakes import FAKE, FakeAgents, fake_pool

# ---- helpers -----------------------------------------------------------------------------------


async def get(gate: Gate, session_id: str) -> pb.Session:
    return await gate.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=5)


async def set_mode(gate: Gate, session_id: str, mode_id: str, timeout: float = 30) -> pb.Session:
    request = pb.SetSessionModeRequest(session_id=session_id, mode_id=mode_id)
    return await gate.stub.SetSessionMode(request, timeout=timeout)


async def set_option(
    gate: Gate, session_id: str, config_id: str, value: str, timeout: float = 30
) -> pb.Session:
    request = pb.SetSessionConfigOptionRequest(session_id=session_id, config_id=config_id, value=value)
    return await gate.stub.SetSessionConfigOption(request, timeout=timeout)


def option(session: pb.Session, config_id: str) -> pb.ConfigOption:
    (found,) = [o for o in session.config_options if o.id == config_id]
    return found


async def say(gate: Gate, session_id: str, text: str) -> str:
    return reply_text(await gate.prompt(session_id, text))


# ---- what CreateSession shows, and setting it ----------------------------------------------------


async def test_a_new_session_shows_the_agents_modes_and_config_options(gate: Gate) -> None:
    session = await gate.create()

    assert session.modes.current_mode_id == "code"
    assert [m.id for m in session.modes.available_modes] == ["ask", "code"]
    assert all(m.name for m in session.modes.available_modes)
    model = option(session, "model")
    assert (model.type, model.category, model.current_value) == ("select", "model", "echo-small")
    assert [v.value for v in model.values] == ["echo-small", "echo-large"]
    verbose = option(session, "verbose")
    assert (verbose.type, verbose.current_value, list(verbose.values)) == ("boolean", "false", [])
    assert session.title == "" and not session.HasField("usage") and not session.available_commands


async def test_mode_and_config_options_set_by_the_client_reach_the_agent(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id

    moved = await set_mode(gate, sid, "ask")
    larger = await set_option(gate, sid, "model", "echo-large")
    chatty = await set_option(gate, sid, "verbose", "true")

    assert moved.modes.current_mode_id == "ask"
    assert option(larger, "model").current_value == "echo-large"
    assert option(chatty, "verbose").current_value == "true"
    assert await say(gate, sid, "/state") == "mode=ask model=echo-large verbose=true"
    shown = await get(gate, sid)
    assert shown.modes.current_mode_id == "ask"
    assert option(shown, "model").current_value == "echo-large"
    assert shown.state == pb.SESSION_STATE_IDLE


async def test_unknown_modes_options_and_values_are_invalid_arguments(gate: Gate) -> None:
    sid = (await gate.create()).session_id

    cases = [
        (set_mode(gate, sid, "plan"), "mode_id"),
        (set_mode(gate, sid, ""), "mode_id"),
        (set_mode(gate, sid, "x" * 5000), "mode_id"),
        (set_option(gate, sid, "temperature", "1"), "config_id"),
        (set_option(gate, sid, "model", "echo-huge"), "value"),
        (set_option(gate, sid, "verbose", "maybe"), "value"),
        (set_option(gate, sid, "model", ""), "value"),
    ]
    for call, field in cases:
        error = await expect_error(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (field, error)
        assert field in error.violations, (field, error.violations)
    unknown = await expect_error(set_mode(gate, "no-such-session", "ask"))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert await say(gate, sid, "/state") == "mode=code model=echo-small verbose=false"


async def test_during_a_turn_the_agent_refuses_a_mode_switch_but_takes_a_config_option(gate: Gate) -> None:
    sid = (await gate.create()).session_id
    turn = asyncio.create_task(gate.prompt(sid, "/sleep 5"))
    await gate.wait_state(sid, pb.SESSION_STATE_BUSY)

    started = time.monotonic()
    refused = await expect_error(set_mode(gate, sid, "ask"))
    changed = await set_option(gate, sid, "model", "echo-large")
    took = time.monotonic() - started

    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AGENT_REFUSED")
    assert "cannot switch mode during a turn" in refused.message
    assert option(changed, "model").current_value == "echo-large"
    assert changed.modes.current_mode_id == "code"
    assert took < 3, f"the calls waited {took:.1f}s for the turn"
    assert not turn.done(), "the turn was disturbed"
    await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=sid), timeout=5)
    await turn
    assert await say(gate, sid, "/state") == "mode=code model=echo-large verbose=false"


async def test_a_session_whose_agent_is_starting_answers_busy(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"slow": ("--init-delay", "2")}, max_sessions=1)
    slow = await gate.create(agent="slow")
    await gate.create()  # takes the only slot: the slow session is suspended
    resuming = asyncio.create_task(gate.prompt(slow.session_id, "hello"))
    await eventually(lambda: len(gate.agent_pids()) == 3, what="the slow agent to be started again")

    busy = await expect_error(set_mode(gate, slow.session_id, "ask"))

    assert (busy.code, busy.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_BUSY")
    assert reply_text(await resuming) == "hello"


# ---- updates from the agent ----------------------------------------------------------------------


async def test_agent_reported_state_arrives_as_typed_events_and_stays_on_the_session(gate: Gate) -> None:
    sid = (await gate.create()).session_id

    mode = await gate.prompt(sid, "/mode ask")
    title = await gate.prompt(sid, "/title Fixing the build")
    usage = await gate.prompt(sid, "/usage 1200 200000")
    commands = await gate.prompt(sid, "/commands")

    everything = [*mode, *title, *usage, *commands]
    assert "other" not in kinds(everything), kinds(everything)
    (mode_event,) = [e.mode_update for e in mode if e.HasField("mode_update")]
    assert mode_event.current_mode_id == "ask"
    (info,) = [e.session_info for e in title if e.HasField("session_info")]
    assert info.title == "Fixing the build"
    (reported,) = [e.usage_update for e in usage if e.HasField("usage_update")]
    assert (reported.context_used, reported.context_size) == (1200, 200000)
    assert (reported.cost_amount, reported.cost_currency) == (0.01, "USD")
    assert kinds(commands) == ["commands_update", "result"]
    names = {c.name for c in commands[0].commands_update.available_commands}
    assert {"mode", "state", "title", "usage", "commands"} <= names

    shown = await get(gate, sid)
    assert shown.modes.current_mode_id == "ask"
    assert shown.title == "Fixing the build"
    assert {c.name for c in shown.available_commands} == names
    assert all(c.description for c in shown.available_commands)
    assert (shown.usage.context_used, shown.usage.context_size, shown.usage.cost_currency) == (
        1200,
        200000,
        "USD",
    )
    # The last finished turn's token usage (the agent's answer to "/commands": one word in).
    assert (shown.usage.last_turn.input_tokens, shown.usage.last_turn.total_tokens) == (1, 2)


# ---- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "how"),
    [(("--no-load-session",), "session/resume"), (("--no-resume-session",), "session/load")],
)
async def test_a_suspended_session_resumes_with_its_history_and_state(
    make_gate: GateFactory, flags: tuple[str, ...], how: str
) -> None:
    gate: Gate = await make_gate(agents={"agent": flags}, max_sessions=1)
    session = await gate.create(agent="agent")
    await gate.prompt(session.session_id, "remember this")
    await set_option(gate, session.session_id, "model", "echo-large")
    await gate.create()  # takes the only slot: the first session is suspended
    assert await gate.state(session.session_id) == pb.SESSION_STATE_SUSPENDED

    events = await gate.prompt(session.session_id, "/history")

    # Only `how` is offered: the agent still knows the session, nothing was reset.
    assert kinds(events) == ["message_chunk", "result"], how
    assert reply_text(events) == "1 earlier turns: remember this", how
    resumed = await get(gate, session.session_id)
    assert resumed.agent_session_id == session.agent_session_id
    assert option(resumed, "model").current_value == "echo-large"


async def test_mode_and_model_set_on_a_suspended_session_survive_a_server_restart(
    make_gate: GateFactory, state: StateBackend
) -> None:
    gate: Gate = await make_gate(**state.gate_kwargs(), max_sessions=1)
    session = await gate.create()
    sid = session.session_id
    await gate.prompt(sid, "/title Long-lived")
    await gate.create()  # takes the only slot: the first session is suspended
    assert await gate.state(sid) == pb.SESSION_STATE_SUSPENDED
    pids = gate.agent_pids()
    # A bad request resumes nothing: it is checked against what the session last showed.
    bad = await expect_error(set_mode(gate, sid, "plan"))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and gate.agent_pids() == pids
    assert await gate.state(sid) == pb.SESSION_STATE_SUSPENDED

    moved = await set_mode(gate, sid, "ask")  # resumes it (suspending the other one)
    changed = await set_option(gate, sid, "model", "echo-large")
    assert moved.state == pb.SESSION_STATE_IDLE and moved.modes.current_mode_id == "ask"
    assert option(changed, "model").current_value == "echo-large"
    await gate.running.drain(0)
    restarted: Gate = await make_gate(**state.gate_kwargs(), max_sessions=1)

    shown = await get(restarted, sid)
    assert shown.state == pb.SESSION_STATE_SUSPENDED
    assert shown.modes.current_mode_id == "ask"
    assert option(shown, "model").current_value == "echo-large"
    assert shown.title == "Long-lived"
    assert await say(restarted, sid, "/state") == "mode=ask model=echo-large verbose=false"


# ---- the pieces on their own ---------------------------------------------------------------------


def commands_update(*names: str) -> schema.AvailableCommandsUpdate:
    return schema.AvailableCommandsUpdate(
        session_update="available_commands_update",
        available_commands=[schema.AvailableCommand(name=n, description=f"does {n}") for n in names],
    )


def mode_update(mode_id: str) -> schema.CurrentModeUpdate:
    return schema.CurrentModeUpdate(session_update="current_mode_update", current_mode_id=mode_id)


def test_updates_that_come_before_anyone_watches_are_handed_over_when_watching_starts() -> None:
    agent = AgentConnection(FAKE, request_timeout=1, kill_grace=1)
    seen: list[object] = []
    agent.route("s1", commands_update("early"))  # right after session/new: nobody watches yet
    agent.route(
        "s1",
        schema.AgentMessageChunk(
            session_update="agent_message_chunk", content=schema.TextContentBlock(type="text", text="x")
        ),
    )

    agent.watch("s1", seen.append)
    agent.route("s1", mode_update("ask"))
    agent.watch("s1", None)
    agent.route("s1", mode_update("code"))  # held again, for a later watcher

    assert [getattr(i, "session_update", None) for i in seen] == [
        "available_commands_update",
        "current_mode_update",
    ], "only state updates, in order"


def test_an_agent_that_keeps_reporting_to_nobody_is_held_within_bounds() -> None:
    agent = AgentConnection(FAKE, request_timeout=1, kill_grace=1)
    for session in range(20):
        for n in range(100):
            agent.route(f"s{session}", commands_update(f"c{n}"))
    seen: list[object] = []
    agent.watch("s19", seen.append)
    assert 0 < len(seen) <= 32
    assert [c.name for c in seen[-1].available_commands] == ["c99"]  # type: ignore[attr-defined]
    late: list[object] = []
    agent.watch("s0", late.append)
    assert late == [], "the oldest sessions' updates were let go"


def test_the_state_is_bounded_and_survives_a_round_trip_through_json() -> None:
    state = AgentState()
    modes = schema.SessionModeState(
        current_mode_id="m0",
        available_modes=[
            schema.SessionMode(id=f"m{i}", name="n" * 5000, description="d") for i in range(MAX_ITEMS + 50)
        ]
        + [schema.SessionMode(id="i" * 5000, name="too long an id")],
    )
    options: list[schema.SessionConfigOptionSelect | schema.SessionConfigOptionBoolean] = [
        schema.SessionConfigOptionSelect(
            id="model",
            name="Model",
            type="select",
            category="model",
            current_value="b",
            options=[
                schema.SessionConfigSelectGroup(
                    group="g",
                    name="Group",
                    options=[schema.SessionConfigSelectOption(value=v, name=v.upper()) for v in "ab"],
                )
            ],
        ),
        schema.SessionConfigOptionBoolean(id="fast", name="Fast", type="boolean", current_value=True),
    ]
    state.apply_response(schema.NewSessionResponse(session_id="x", modes=modes, config_options=options))
    state.apply_update(TurnUsage(schema.Usage(input_tokens=2**70, output_tokens=1, total_tokens=3)))

    assert 0 < len(state.modes) <= MAX_ITEMS
    assert all(len(m.name.encode()) <= MAX_NAME for m in state.modes)
    assert all(len(m.id) < 100 for m in state.modes), "an id too long to keep whole was dropped"
    (model, fast) = state.config_options
    assert [(v.value, v.group) for v in model.values] == [("a", "Group"), ("b", "Group")]
    assert (fast.type, fast.current_value) == ("boolean", "true")
    assert state.check_option("fast", "false") is False and state.check_option("model", "a") == "a"
    assert state.usage.last_turn is not None and state.usage.last_turn.input_tokens == 2**63 - 1
    assert AgentState.from_json(state.to_json()) == state
    assert AgentState.from_json({"modes": "garbage"}) == AgentState()
    assert not state.apply_update(mode_update("m0")), "no change, nothing to store"
    assert state.apply_update(mode_update("m1")) and state.current_mode_id == "m1"


@pytest.fixture
async def agents() -> FakeAgents:
    return FakeAgents()


@pytest.fixture
async def pool(tmp_path: Path, agents: FakeAgents) -> AsyncIterator[SessionPool]:
    made = await fake_pool(tmp_path, agents)
    yield made
    await made.shutdown()


async def test_an_agent_without_modes_or_options_is_not_supported(
    pool: SessionPool, agents: FakeAgents
) -> None:
    session = await pool.create(FAKE, "/", "", {})

    with pytest.raises(NotSupported):
        await session.set_mode("ask")
    with pytest.raises(NotSupported):
        await session.set_config_option("model", "x")
    # What it reports while no turn runs is kept all the same (the session watches its agent).
    agent = agents.last
    agent.watchers[session.agent_session_id](commands_update("review"))
    assert [c.name for c in session.agent_state.commands] == ["review"]
    # A later agent's reports count, an earlier one's do not.
    stale = agents.last.watchers[session.agent_session_id]
    assert await session.suspend()
    stale(commands_update("stale"))
    assert [c.name for c in session.agent_state.commands] == ["review"]


def test_a_schema_step_that_fails_half_way_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    """A migration and its version number go in one transaction: no column without its number
    (the next start would fail on "duplicate column name")."""
    db = sqlite3.connect(tmp_path / "v2.db", isolation_level=None)
    for step in (1, 2):
        store._migrate(db, step, store.SCHEMA if step == 1 else store.MIGRATIONS[step])
    broken = store.MIGRATIONS[3] + " SELECT no_such_function();"
    with pytest.raises(sqlite3.OperationalError):
        store._migrate(db, 3, broken)
    columns = [row[1] for row in db.execute("PRAGMA table_info(sessions)")]
    assert "agent_state" not in columns
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    store._migrate(db, 3, store.MIGRATIONS[3])
    assert db.execute("PRAGMA user_version").fetchone() == (3,)
    db.close()


async def test_a_failed_upgrade_stops_the_start_and_keeps_the_database_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema step that fails (a full disk, say) is no unreadable database: the store does not
    move it aside and start empty; it refuses to open, and opens it intact once the step works."""
    path = tmp_path / "sessions.db"
    db = sqlite3.connect(path, isolation_level=None)
    for step in (1, 2):
        store._migrate(db, step, store.SCHEMA if step == 1 else store.MIGRATIONS[step])
    db.execute(
        "INSERT INTO sessions (session_id, agent, cwd, labels, state, agent_session_id, request_id,"
        " create_time, last_active_time, agent_info, owner) VALUES"
        " ('kept', 'echo', '/', '{}', 'suspended', '', '', 1, 1, '{}', '')"
    )
    db.close()
    monkeypatch.setitem(store.MIGRATIONS, 3, store.MIGRATIONS[3] + " SELECT no_such_function();")
    failing = store.SessionStore(path)
    with pytest.raises(store.StoreError, match="left as it was"):
        await failing.open()
    await failing.close()
    assert path.exists() and not list(tmp_path.glob("*.unreadable-*"))
    monkeypatch.undo()
    working = store.SessionStore(path)
    records = await working.open()
    await working.close()
    assert [r.session_id for r in records] == ["kept"]
