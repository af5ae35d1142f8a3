"""The agent baseline: a direct ACP client (the SDK, no gateway) on an echo agent over stdio."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import acp
from acp import schema
from sessiongate.server.agents.transport import LINE_LIMIT


def agent_env(workdir: Path) -> dict[str, str]:
    """An echo agent's environment outside the gateway: its state under `workdir`."""
    env = {k: os.environ[k] for k in ("HOME", "PATH", "USER", "LANG") if k in os.environ}
    env["ECHO_AGENT_STATE_DIR"] = str(workdir / "direct-agent-state")
    return env


class _Counter:
    """The client side of ACP, counting updates and noting when the first one arrived."""

    def __init__(self) -> None:
        self.updates = 0
        self.first_at: float | None = None

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        self.updates += 1
        if self.first_at is None:
            self.first_at = time.perf_counter()

    async def request_permission(self, **_: Any) -> schema.RequestPermissionResponse:
        return schema.RequestPermissionResponse(outcome=schema.DeniedOutcome(outcome="cancelled"))


class DirectAgent:
    """One echo agent driven directly over stdio."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.counter = _Counter()
        self.process: asyncio.subprocess.Process | None = None
        self.conn: Any = None
        self.session_id = ""

    async def start(self, cwd: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessiongate.echo",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        assert self.process.stdin and self.process.stdout
        self.conn = acp.connect_to_agent(self.counter, self.process.stdin, self.process.stdout)  # type: ignore[arg-type]
        await self.conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        self.session_id = (await self.conn.new_session(cwd=cwd, mcp_servers=[])).session_id

    async def turn(self, text: str) -> tuple[int, float, float]:
        """Run one turn: (updates received, seconds to first update, seconds in all)."""
        self.counter.updates, self.counter.first_at = 0, None
        started = time.perf_counter()
        await self.conn.prompt(
            session_id=self.session_id, prompt=[schema.TextContentBlock(type="text", text=text)]
        )
        ended = time.perf_counter()
        first = (self.counter.first_at or ended) - started
        return self.counter.updates, first, ended - started

    async def stop(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
