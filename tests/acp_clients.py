"""Third-party ACP clients driving an ACP agent command: the TypeScript SDK, the Python SDK, acpx.

Every helper takes the agent command (argv) as a parameter; tests/test_acp_front_door_clients.py
gives them `sessiongate acp --target GATEWAY` (front_door_command).

The TypeScript and Python clients run one scripted scenario, a list of steps, and return one
dict per step in the same shape (tests/node/acp_client.mjs documents both):
  steps:  {"op": "initialize"} | {"op": "new", "cwd", "as"} | {"op": "prompt", "text",
          "session"?, "permission"?, "cancelAfterMs"?} | {"op": "load"|"resume", "session"?,
          "cwd"} | {"op": "list", "cwd"?} | {"op": "close", "session"?}
  result: {"op", "ok", "sessionId"?, "stopReason"?, "result"?, "error"?: {code, message, data},
          "updates": [{"kind", "text"?, "toolCallId"?, "status"?, "title"?}],
          "permissions": [{"toolCallId", "title", "options", "chosen"}]}

acpx runs with HOME (its state, ~/.acpx) in a temporary directory. The commands used:
  acpx --agent CMD --ttl 1 sessions new          create the session for the cwd (prints its id)
  acpx --agent CMD --ttl 1 [--format json|quiet] [--approve-all|--deny-all] prompt TEXT
  acpx --agent CMD --format json cancel           cancel the running prompt of the cwd's session
  acpx --agent CMD --format json sessions list    session/list if the agent advertises
                                                  sessionCapabilities.list ("source": "agent"),
                                                  else the local records
  acpx --agent CMD sessions close
Each prompt hands the session to a detached "queue owner" process (its own process group) that
keeps the agent running for --ttl seconds; a later invocation within that time reuses it, after
it re-attaches with session/resume (when advertised) or session/load. The owners' PIDs are in
HOME/.acpx/queues/*.lock, and `Acpx.close` kills their process groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acp
from acp import schema

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
TS_CLIENT = NODE_DIR / "acp_client.mjs"
ACPX = NODE_DIR / "node_modules" / ".bin" / "acpx"
TS_SDK = NODE_DIR / "node_modules" / "@agentclientprotocol" / "sdk"
LINE_LIMIT = 16 * 1024 * 1024  # a replayed history can be one long line of JSON


def front_door_command(target: str, *extra: str) -> list[str]:
    """`sessiongate acp --target TARGET [EXTRA...]` as an editor's ACP agent command."""
    return [sys.executable, "-m", "sessiongate.client", "acp", "--target", target, *extra]


@dataclass
class Finished:
    """A client process that ran to its end (or was killed at its deadline)."""

    code: int | None
    stdout: str
    stderr: str


async def run_in_own_group(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    lines: list[str] | None = None,
) -> Finished:
    """Run `argv` in its own process group; at the end, or at `timeout`, kill the whole group
    (the client and any agent it started). A deadline gives code None, not an exception.
    `lines`, if given, gets each stdout line as it arrives (to watch a run in progress)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        limit=LINE_LIMIT,
    )
    assert process.stdout and process.stderr
    out = lines if lines is not None else []
    err: list[bytes] = []

    async def read_stdout() -> None:
        assert process.stdout
        async for line in process.stdout:
            out.append(line.decode(errors="replace"))

    async def read_stderr() -> None:
        assert process.stderr
        err.append(await process.stderr.read())

    code: int | None = None
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(read_stdout(), read_stderr())
            code = await process.wait()
    except TimeoutError:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
    return Finished(code, "".join(out), b"".join(err).decode(errors="replace"))


# ---- the TypeScript SDK's client -----------------------------------------------------------------


async def run_ts_client(
    agent: Sequence[str],
    steps: list[dict[str, Any]],
    *,
    workdir: Path,
    permission: str = "reject_once",
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> list[dict[str, Any]]:
    """Run the scenario with tests/node/acp_client.mjs against `agent`; one dict per step."""
    node = shutil.which("node")
    assert node, "node is not installed"
    script = workdir / f"acp-scenario-{os.urandom(4).hex()}.json"
    script.write_text(json.dumps({"permission": permission, "steps": steps}))
    finished = await run_in_own_group(
        [node, str(TS_CLIENT), str(script), "--", *agent], cwd=workdir, env=env, timeout=timeout
    )
    assert finished.code == 0, f"TS client exited {finished.code}: {finished.stderr[-2000:]}"
    results = [json.loads(line) for line in finished.stdout.splitlines() if line.strip()]
    assert len(results) == len(steps), finished.stderr[-2000:]
    return results


# ---- the Python SDK's client ---------------------------------------------------------------------


def summarize_update(update: dict[str, Any]) -> dict[str, Any]:
    """The fields a test checks of one session/update (as acp_client.mjs reports them)."""
    summary: dict[str, Any] = {"kind": update.get("sessionUpdate")}
    content = update.get("content")
    if isinstance(content, dict) and content.get("type") == "text":
        summary["text"] = content.get("text")
    for key in ("toolCallId", "status", "title", "currentModeId"):
        if key in update:
            summary[key] = update[key]
    return summary


def _dump(model: Any) -> Any:
    return None if model is None else model.model_dump(mode="json", by_alias=True, exclude_none=True)


class _ScenarioClient:
    """The client side of ACP for the Python SDK: records what each step receives."""

    def __init__(self, permission: str) -> None:
        self.default_permission = permission
        self.permission = permission
        self.updates: list[dict[str, Any]] = []
        self.permissions: list[dict[str, Any]] = []

    def start_step(self, permission: str | None) -> None:
        self.updates, self.permissions = [], []
        self.permission = permission or self.default_permission

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        self.updates.append(summarize_update(_dump(update)))

    async def request_permission(
        self, session_id: str, tool_call: Any, options: list[Any], **_: Any
    ) -> schema.RequestPermissionResponse:
        option = next((candidate for candidate in options if candidate.kind == self.permission), None)
        self.permissions.append(
            {
                "toolCallId": tool_call.tool_call_id,
                "title": tool_call.title,
                "options": [candidate.kind for candidate in options],
                "chosen": option.kind if option else "cancelled",
            }
        )
        outcome: schema.AllowedOutcome | schema.DeniedOutcome = (
            schema.AllowedOutcome(outcome="selected", option_id=option.option_id)
            if option
            else schema.DeniedOutcome(outcome="cancelled")
        )
        return schema.RequestPermissionResponse(outcome=outcome)


async def _python_step(conn: Any, step: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    sessions: dict[str, str] = state["sessions"]
    session_id = sessions.get(step.get("session", ""), step.get("session") or state.get("last"))
    op = step["op"]
    if op == "initialize":
        result = await conn.initialize(
            protocol_version=acp.PROTOCOL_VERSION,
            client_info=schema.Implementation(name="sessiongate-tests-py", version="0"),
        )
        return {"result": _dump(result)}
    if op == "new":
        created = await conn.new_session(cwd=step["cwd"], mcp_servers=[])
        state["last"] = created.session_id
        if step.get("as"):
            sessions[step["as"]] = created.session_id
        return {"sessionId": created.session_id}
    if op == "prompt":
        pending = asyncio.ensure_future(
            conn.prompt(
                session_id=session_id, prompt=[schema.TextContentBlock(type="text", text=step["text"])]
            )
        )
        if "cancelAfterMs" in step:
            done, _ = await asyncio.wait({pending}, timeout=step["cancelAfterMs"] / 1000)
            if not done:
                await conn.cancel(session_id=session_id)
        response = await pending
        return {"sessionId": session_id, "stopReason": response.stop_reason, "result": _dump(response)}
    if op in ("load", "resume"):
        call = conn.load_session if op == "load" else conn.resume_session
        result = await call(cwd=step["cwd"], session_id=session_id, mcp_servers=[])
        state["last"] = session_id
        return {"sessionId": session_id, "result": _dump(result)}
    if op == "list":
        return {"result": _dump(await conn.list_sessions(cwd=step.get("cwd")))}
    if op == "close":
        return {
            "sessionId": session_id,
            "result": _dump(await conn.close_session(session_id=session_id)) or {},
        }
    raise ValueError(f"unknown step op {op!r}")


async def run_python_client(
    agent: Sequence[str],
    steps: list[dict[str, Any]],
    *,
    workdir: Path,
    permission: str = "reject_once",
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> list[dict[str, Any]]:
    """Run the scenario with the Python ACP SDK's client against `agent` (started in its own
    process group, killed at the end); one dict per step, as run_ts_client gives."""
    client = _ScenarioClient(permission)
    results: list[dict[str, Any]] = []
    async with _agent_process(agent, workdir=workdir, env=env) as process:
        assert process.stdin and process.stdout
        conn: Any = acp.connect_to_agent(client, process.stdin, process.stdout)  # type: ignore[arg-type]
        state: dict[str, Any] = {"sessions": {}}
        try:
            async with asyncio.timeout(timeout):
                for step in steps:
                    client.start_step(step.get("permission"))
                    line: dict[str, Any] = {"op": step["op"], "ok": True}
                    try:
                        line |= await _python_step(conn, step, state)
                    except acp.RequestError as error:
                        line = {"op": step["op"], "ok": False, "error": _error(error)}
                    line["updates"], line["permissions"] = client.updates, client.permissions
                    results.append(line)
        finally:
            await conn.close()
    return results


def _error(error: acp.RequestError) -> dict[str, Any]:
    message = error.args[0] if error.args else str(error)
    return {"code": error.code, "message": message, "data": error.data}


@contextlib.asynccontextmanager
async def _agent_process(
    agent: Sequence[str], *, workdir: Path, env: dict[str, str] | None
) -> AsyncIterator[asyncio.subprocess.Process]:
    stderr_path = workdir / f"agent-{os.urandom(4).hex()}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *agent,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=workdir,
            env=env,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)


# ---- acpx -------------------------------------------------------------------------------------------


@dataclass
class Acpx:
    """acpx against one agent command, its state (HOME) in a temporary directory, run in `cwd`
    (acpx scopes a session to the agent command and the cwd)."""

    agent: Sequence[str]
    cwd: Path
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="acpx-home-")))
    ttl: float = 1  # seconds a queue owner keeps the agent after a prompt

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config")}

    async def run(self, *args: str, timeout: float = 60, lines: list[str] | None = None) -> Finished:
        """`acpx --agent AGENT --ttl TTL ARGS...` in its own process group (`lines`: its stdout
        lines as they come)."""
        argv = [str(ACPX), "--agent", shlex.join(self.agent), "--ttl", str(self.ttl), *args]
        return await run_in_own_group(argv, cwd=self.cwd, env=self.env(), timeout=timeout, lines=lines)

    async def new_session(self) -> str:
        """`sessions new`: the new session's id."""
        finished = await self.run("sessions", "new")
        assert finished.code == 0, finished.stderr[-2000:]
        return finished.stdout.strip().splitlines()[-1].split()[0]

    async def prompt(
        self, text: str, *flags: str, timeout: float = 60, lines: list[str] | None = None
    ) -> Finished:
        """`[FLAGS] --format json prompt TEXT`: stdout is the ACP traffic, one JSON-RPC message a line."""
        return await self.run(*flags, "--format", "json", "prompt", text, timeout=timeout, lines=lines)

    async def cancel(self) -> bool:
        """`--format json cancel`: whether a running prompt was cancelled."""
        finished = await self.run("--format", "json", "cancel")
        assert finished.code == 0, finished.stderr[-2000:]
        return bool(jsonrpc_lines(finished.stdout)[-1].get("cancelled"))

    async def sessions(self) -> tuple[str, list[dict[str, Any]]]:
        """`--format json sessions list`: where the list came from ("agent" when acpx called
        session/list, else "local") and the sessions acpx lists for this agent and cwd."""
        finished = await self.run("--format", "json", "sessions", "list")
        assert finished.code == 0, finished.stderr[-2000:]
        listed: Any = json.loads(finished.stdout)
        if isinstance(listed, list):
            return "local", listed
        return str(listed.get("source", "local")), list(listed.get("sessions", []))

    def queue_owner_pids(self) -> set[int]:
        pids = set()
        for lock in (self.home / ".acpx" / "queues").glob("*.lock"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pids.add(int(json.loads(lock.read_text())["pid"]))
        return pids

    def close(self) -> None:
        """Kill what acpx left running (queue owners and their agents), then remove HOME."""
        for pid in self.queue_owner_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # a queue owner leads its own group, with its agent
                    os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)
        # acpx keeps its socket in /tmp/acpx-<sha256 of HOME, 10 hex digits>, whatever TMPDIR says.
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:10]
        shutil.rmtree(f"/tmp/acpx-{digest}", ignore_errors=True)


def jsonrpc_lines(stdout: str) -> list[dict[str, Any]]:
    """The JSON-RPC messages of acpx's `--format json` output."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def methods_seen(stdout: str) -> list[str]:
    """The ACP methods in acpx's `--format json` output, in order, both ways (acpx's calls such
    as initialize and session/prompt, the agent's session/update and session/request_permission)."""
    return [message["method"] for message in jsonrpc_lines(stdout) if "method" in message]


def reply_text(stdout: str) -> str:
    """The agent's message text in acpx's `--format json` output."""
    return "".join(
        update["content"].get("text", "")
        for message in jsonrpc_lines(stdout)
        if message.get("method") == "session/update"
        for update in [message["params"]["update"]]
        if update.get("sessionUpdate") == "agent_message_chunk"
    )


def stop_reason(stdout: str) -> str | None:
    """The stop reason of the last prompt in acpx's `--format json` output."""
    reasons = [
        message["result"]["stopReason"]
        for message in jsonrpc_lines(stdout)
        if isinstance(message.get("result"), dict) and "stopReason" in message["result"]
    ]
    return reasons[-1] if reasons else None
