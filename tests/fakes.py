"""An in-process fake agent, and a pool/session built on it, for unit tests of the session core.

The fake has the shape of `server.agent.AgentProcess` and does what the prompt text says:
  echo WORDS   one message chunk per word, then end_turn
  wait         nothing until the test calls `finish_turn()` (end_turn), or a cancel (cancelled)
  hang         one chunk, then nothing, whatever cancel says
Its start, load and terminate take as long as the test wants, and it can be made to refuse
`session/load` or to "crash" (exit by itself), so every cancellation window of the core can
be hit on purpose, without timing luck.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acp
from acp import schema
from sessiongate.server.agents.protocol import AgentProcess, Handshake, McpServers, UpdateSink
from sessiongate.server.errors import AgentUnavailable
from sessiongate.server.sandbox.workdir import WorkDir
from sessiongate.server.sessions.pool import SessionPool
from sessiongate.server.settings import AgentConfig, ServerLimits
from sessiongate.server.state.sqlite import SessionStore

_pids = itertools.count(1_000_000)


@dataclass
class FakeBehaviour:
    """What every fake agent of one factory does; tests change it as they go."""

    start_delay: float = 0.0
    terminate_delay: float = 0.0  # how long a terminate takes (SIGTERM ignored, say)
    killable: bool = True  # False: a forced terminate takes terminate_delay too (D state)
    refuse_load: bool = False
    load_session: bool = True


class FakeAgent:
    def __init__(self, config: AgentConfig, behaviour: FakeBehaviour) -> None:
        self.config = config
        self.behaviour = behaviour
        self.handshake: Handshake | None = None
        self.exit_code: int | None = None
        self.reading_paused = False
        self.pid_value = next(_pids)
        self.started = False
        self.exited = False
        self.cancels: list[str] = []
        self.terminate_calls = 0
        self.terminated = asyncio.Event()  # terminate() finished: the "process group" is gone
        self.sinks: dict[str, UpdateSink] = {}
        self.watchers: dict[str, Callable[[Any], None]] = {}  # state updates, turn or not
        self.sessions: list[str] = []
        self.closed_sessions: list[str] = []  # session/close calls
        self.prompts: list[str] = []  # each prompt's text, noted in prompt()'s first step
        self.prompt_cancelled = False  # a "wait" prompt's coroutine was cancelled where it waited
        self._on_exit: Callable[[Any], None] | None = None
        self._cancelled = asyncio.Event()
        self._finish = asyncio.Event()
        self._terminating: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()

    # ---- AgentProcess --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.pid_value if self.started else None

    @property
    def alive(self) -> bool:
        return self.started and not self.exited

    def on_exit(self, callback: Callable[[Any], None]) -> None:
        self._on_exit = callback

    async def start(self, timeout: float, login: bool = True) -> Handshake:
        if self._terminating is not None:  # like AgentConnection: no process after a terminate
            raise AgentUnavailable("fake agent: stopped while it was starting")
        self.started = True  # "spawned"; the delay is its initialize
        await asyncio.sleep(self.behaviour.start_delay)
        if self.exited:  # ended meanwhile: the real initialize fails on the closed connection
            raise AgentUnavailable("fake agent: exited during initialize")
        self.handshake = Handshake("fake", "1", "Fake", self.behaviour.load_session, ())
        return self.handshake

    async def load(
        self, cwd: str, session_id: str, timeout: float, mcp_servers: McpServers = ()
    ) -> schema.LoadSessionResponse:
        if self.behaviour.refuse_load:
            # An error answer (a JSON-RPC code), as AgentConnection reports one; the agent lives on.
            raise AgentUnavailable(f"fake agent: unknown session {session_id}", metadata={"code": -32602})
        self.sessions.append(session_id)
        return schema.LoadSessionResponse()

    async def resume(
        self, cwd: str, session_id: str, timeout: float, mcp_servers: McpServers = ()
    ) -> schema.ResumeSessionResponse:
        raise AgentUnavailable("fake agent: no session/resume")  # not advertised either

    async def set_mode(self, session_id: str, mode_id: str) -> None:
        raise AgentUnavailable("fake agent: no session modes")

    async def set_config_option(
        self, session_id: str, config_id: str, value: str | bool
    ) -> schema.SetSessionConfigOptionResponse:
        raise AgentUnavailable("fake agent: no config options")

    async def close_session(self, session_id: str, timeout: float) -> None:
        self.closed_sessions.append(session_id)

    async def new_session(
        self, cwd: str, timeout: float, mcp_servers: McpServers = ()
    ) -> schema.NewSessionResponse:
        session_id = f"fake-{self.pid_value}-{len(self.sessions)}"
        self.sessions.append(session_id)
        return schema.NewSessionResponse(session_id=session_id)

    async def prompt(self, session_id: str, blocks: list[dict[str, Any]]) -> schema.PromptResponse:
        self._cancelled.clear()
        self._finish.clear()
        self.prompts.append(" ".join(b["text"] for b in blocks))
        command, _, rest = self.prompts[-1].partition(" ")
        if command == "echo":
            for word in rest.split():
                self.send(session_id, word)
                await asyncio.sleep(0)
            return schema.PromptResponse(stop_reason="end_turn")
        if command == "wait":
            finish = asyncio.ensure_future(self._finish.wait())
            cancel = asyncio.ensure_future(self._cancelled.wait())
            try:
                await asyncio.wait({finish, cancel}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                self.prompt_cancelled = True
                raise
            finally:
                finish.cancel()
                cancel.cancel()
            return schema.PromptResponse(stop_reason="cancelled" if self._cancelled.is_set() else "end_turn")
        if command == "hang":
            self.send(session_id, "hanging")
            await asyncio.Event().wait()
        raise AssertionError(f"the fake agent has no command {command!r}")

    async def cancel(self, session_id: str) -> None:
        self.cancels.append(session_id)
        self._cancelled.set()

    def subscribe(self, session_id: str, sink: UpdateSink | None) -> None:
        if sink is None:
            self.sinks.pop(session_id, None)
        else:
            self.sinks[session_id] = sink

    def watch(self, session_id: str, watcher: Callable[[Any], None] | None) -> None:
        if watcher is None:
            self.watchers.pop(session_id, None)
        else:
            self.watchers[session_id] = watcher

    async def authenticate(self, method_id: str) -> None:
        pass

    async def end_terminals(self, session_id: str) -> None:
        pass  # the fake agent runs no terminals

    def ask_with(self, session_id: str, asker: Any) -> None:
        pass  # the fake agent asks no questions

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    async def terminate(self, force: bool = False) -> None:
        """Like the real one: one shared termination that a forced call hurries."""
        self.terminate_calls += 1
        if force:
            self._hurry.set()
        if self._terminating is None:
            self._terminating = asyncio.get_running_loop().create_task(self._terminate())
        await asyncio.shield(self._terminating)

    async def _terminate(self) -> None:
        if self.behaviour.terminate_delay and not (self._hurry.is_set() and self.behaviour.killable):
            hurry = asyncio.ensure_future(
                self._hurry.wait() if self.behaviour.killable else asyncio.Event().wait()
            )
            await asyncio.wait({hurry}, timeout=self.behaviour.terminate_delay)
            hurry.cancel()
        self.exited = True
        self.terminated.set()

    # ---- test controls -------------------------------------------------------------------

    def send(self, session_id: str, text: str) -> None:
        sink = self.sinks.get(session_id)
        if sink is not None:
            sink(acp.update_agent_message_text(text))

    def finish_turn(self) -> None:
        self._finish.set()

    def crash(self, code: int = 3) -> None:
        self.exited = True
        self.exit_code = code
        self.terminated.set()
        if self._on_exit is not None:
            self._on_exit(self)


@dataclass
class FakeAgents:
    """A factory of fake agents that remembers every agent it made."""

    behaviour: FakeBehaviour = field(default_factory=FakeBehaviour)
    made: list[FakeAgent] = field(default_factory=list)

    def __call__(self, config: AgentConfig, limits: ServerLimits, workdir: WorkDir | None) -> AgentProcess:
        agent = FakeAgent(config, self.behaviour)
        self.made.append(agent)
        return agent

    @property
    def last(self) -> FakeAgent:
        return self.made[-1]

    def running(self) -> list[FakeAgent]:
        return [a for a in self.made if a.alive]


FAST = ServerLimits(
    stall_timeout=5.0,
    cancel_grace=0.5,
    kill_grace=0.5,
    agent_start_timeout=5.0,
    agent_request_timeout=1.0,
    sweep_interval=3600.0,  # tests sweep by hand
)
FAKE = AgentConfig(name="fake", command="fake-agent")


async def fake_pool(
    tmp_path: Path, agents: FakeAgents, limits: ServerLimits = FAST, store: SessionStore | None = None
) -> SessionPool:
    pool = SessionPool(limits, store or SessionStore(tmp_path / "sessions.db"), agent_factory=agents)
    await pool.load({FAKE.name: FAKE})
    return pool


def text(value: str) -> list[dict[str, Any]]:
    """A prompt as the runner hands it to the agent: ACP content blocks as JSON."""
    return [{"type": "text", "text": value}]


# ---- chaos agents (tests/test_session_machine.py) ---------------------------------------------
# Added at the end, apart from the rest: a fake that also floods (many or large chunks, paced
# like a real pipe by pause_reading) and whose crash ends the prompt under way as a real
# agent's exit does (AgentExited), so the state machine can mix every kind of turn and failure.

from sessiongate.server.errors import AgentExited  # noqa: E402  (kept in this block: added, not merged above)


class ChaosAgent(FakeAgent):
    """FakeAgent plus `flood COUNT SIZE PAUSE`: COUNT chunks of SIZE characters, PAUSE seconds
    apart, held back while reading is paused; stops early (cancelled) on session/cancel."""

    def __init__(self, config: AgentConfig, behaviour: FakeBehaviour) -> None:
        super().__init__(config, behaviour)
        self._died = asyncio.Event()

    async def prompt(self, session_id: str, blocks: list[dict[str, Any]]) -> schema.PromptResponse:
        if not self.alive:
            raise AgentExited("fake agent: exited")
        work = asyncio.ensure_future(self._prompt(session_id, blocks))
        died = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait({work, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise AgentExited(f"fake agent {self.pid_value} exited during the prompt")
        return work.result()

    async def _prompt(self, session_id: str, blocks: list[dict[str, Any]]) -> schema.PromptResponse:
        command, _, rest = " ".join(b["text"] for b in blocks).partition(" ")
        if command != "flood":
            return await super().prompt(session_id, blocks)
        self._cancelled.clear()
        count, size, pause = rest.split()
        chunk = "x" * int(size)
        for _ in range(int(count)):
            while self.reading_paused and not self._cancelled.is_set():  # noqa: ASYNC110 (a flag)
                await asyncio.sleep(0.005)  # a real agent blocks on its full stdout pipe
            if self._cancelled.is_set():
                return schema.PromptResponse(stop_reason="cancelled")
            self.send(session_id, chunk)
            await asyncio.sleep(float(pause))
        return schema.PromptResponse(stop_reason="end_turn")

    def crash(self, code: int = 3) -> None:
        self._died.set()
        super().crash(code)

    async def _terminate(self) -> None:
        await super()._terminate()
        self._died.set()


@dataclass
class ChaosAgents(FakeAgents):
    """A factory of ChaosAgents."""

    def __call__(self, config: AgentConfig, limits: ServerLimits, workdir: WorkDir | None) -> AgentProcess:
        agent = ChaosAgent(config, self.behaviour)
        self.made.append(agent)
        return agent
