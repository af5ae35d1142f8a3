"""The built-in reference ACP agent: `python -m server.echo_agent`.

A real ACP agent over stdio, built on the same SDK as the gateway, so the default path
exercises the real protocol. Without a directive a turn streams a thought, a tool call
going pending -> completed, a plan, then the prompt echoed back word by word.

Directives at the start of the prompt text (used by tests, benchmarks and demos):
  /stall            one chunk, then silence; honours session/cancel
  /hang [N [BYTES]] (N chunks of BYTES first, then) one chunk, then silence; ignores session/cancel
  /sleep SECONDS    sleep (cancellable), then a normal turn
  /pace MS TEXT     TEXT's words as chunks, MS milliseconds apart
  /crash            one chunk, then exit with code 3
  /flood N [BYTES]  N message chunks of BYTES bytes (default 64) as fast as possible,
                    each starting with its number ("0:xxx", "1:xxx", ...) so order is checkable
  /permission       ask permission for an edit, report the decision in text
  /error            answer the turn with a JSON-RPC error
  /commands         advertise the directives as slash commands (ACP available_commands_update)
  /history          reply with the prompts this ACP session remembers (kept across session/load)
  /env NAME...      reply with each variable's value as the agent sees it ("NAME=value" or "NAME unset")
  /read PATH        reply with the file's first 2000 bytes, or "cannot read: <why>" (sandbox checks)
  /write PATH TEXT  write TEXT to PATH (relative: in the cwd); reply "wrote PATH" or "cannot write: <why>"
  /badresult        answer the turn with a stopReason that is not an ACP stop reason ("bogus"),
                    so the client's SDK fails validating the response
Start-up options: --init-delay SECONDS, --auth-required, --fail-init, --no-load-session,
--ignore-sigterm (SIGTERM is ignored: stopping the agent takes SIGKILL),
--state-dir DIR (or ECHO_AGENT_STATE_DIR): where sessions are kept for session/load and
received cancels are logged (events.log); when given, the agent also records its PID there
(pids/PID). Default: $XDG_STATE_HOME/sessiongate/echo-agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import acp
from acp import helpers, schema
from acp.schema import StopReason

from server.settings import default_state_dir

AGENT_NAME = "sessiongate-echo"
AGENT_VERSION = "0.1.0"
WORD_DELAY = 0.005  # seconds between echoed words: plausible streaming, fast tests
CRASH_EXIT_CODE = 3
ERROR_CODE = -32603


class EchoAgent:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.state_dir: Path = opts.state_dir
        self.client: Any = None
        self.cancelled: dict[str, asyncio.Event] = {}
        self.known: set[str] = set()

    def on_connect(self, conn: Any) -> None:
        self.client = conn

    # ---- lifecycle ---------------------------------------------------------------------

    async def initialize(self, protocol_version: int, **_: Any) -> schema.InitializeResponse:
        if self.opts.init_delay:
            await asyncio.sleep(self.opts.init_delay)
        if self.opts.fail_init:
            raise acp.RequestError(ERROR_CODE, "echo agent: initialize refused (--fail-init)")
        auth: list[Any] = (
            [schema.AuthMethodAgent(id="echo-login", name="Echo login")] if self.opts.auth_required else []
        )
        return schema.InitializeResponse(
            protocol_version=acp.PROTOCOL_VERSION,
            agent_capabilities=schema.AgentCapabilities(
                load_session=not self.opts.no_load_session,
                session_capabilities=schema.SessionCapabilities(close=schema.SessionCloseCapabilities()),
            ),
            auth_methods=auth,
            agent_info=schema.Implementation(name=AGENT_NAME, version=AGENT_VERSION, title="Echo agent"),
        )

    async def authenticate(self, method_id: str, **_: Any) -> None:
        raise acp.RequestError.auth_required({"details": "the echo agent cannot be logged into"})

    async def new_session(self, cwd: str, **_: Any) -> schema.NewSessionResponse:
        if self.opts.auth_required:
            raise acp.RequestError.auth_required({"authMethods": ["echo-login"]})
        session_id = f"echo-{uuid.uuid4().hex}"
        self._save(session_id, {"cwd": cwd, "history": []})
        self.known.add(session_id)
        return schema.NewSessionResponse(session_id=session_id)

    async def load_session(self, cwd: str, session_id: str, **_: Any) -> schema.LoadSessionResponse:
        if self.opts.no_load_session:
            raise acp.RequestError.method_not_found("session/load")
        record = self._load(session_id)
        if record is None:
            raise acp.RequestError.invalid_params({"details": f"unknown session {session_id}"})
        for user_text, reply in record["history"]:  # replay, as ACP asks of session/load
            await self._send(session_id, acp.update_user_message_text(user_text))
            await self._send(session_id, acp.update_agent_message_text(reply))
        self.known.add(session_id)
        return schema.LoadSessionResponse()

    async def close_session(self, session_id: str, **_: Any) -> schema.CloseSessionResponse:
        """The gateway closed the session for good: forget it, and delete what was stored."""
        self.known.discard(session_id)
        if "/" not in session_id and not session_id.startswith("."):
            self._path(session_id).unlink(missing_ok=True)
        return schema.CloseSessionResponse()

    async def cancel(self, session_id: str, **_: Any) -> None:
        self._log_event(f"cancel {session_id}")
        self.cancelled.setdefault(session_id, asyncio.Event()).set()

    # ---- turns -------------------------------------------------------------------------

    async def prompt(self, session_id: str, prompt: list[Any], **_: Any) -> schema.PromptResponse:
        if session_id not in self.known:
            raise acp.RequestError.invalid_params({"details": f"unknown session {session_id}"})
        cancel = self.cancelled[session_id] = asyncio.Event()
        text = " ".join(b.text for b in prompt if getattr(b, "type", None) == "text").strip()
        directive, _sep, rest = text.partition(" ")
        handler = DIRECTIVES.get(directive) if directive.startswith("/") else None
        if directive == "/badresult":  # a dict is sent as is: the SDK validates only models
            return cast(schema.PromptResponse, {"stopReason": "bogus"})
        if handler is not None:
            reply, stop = await handler(self, session_id, rest, cancel)
        else:
            reply, stop = await self._normal_turn(session_id, text, cancel)
        self._remember(session_id, text, reply)
        words = len(text.split())
        usage = schema.Usage(input_tokens=words, output_tokens=len(reply.split()), total_tokens=words * 2)
        return schema.PromptResponse(stop_reason=stop, usage=usage)

    async def _normal_turn(self, session_id: str, text: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        await self._send(
            session_id, acp.update_agent_thought_text("Reading the prompt and planning an echo.")
        )
        await self._send(
            session_id, acp.start_tool_call("echo-read", "Reading the prompt", kind="read", status="pending")
        )
        await self._send(session_id, acp.update_tool_call("echo-read", status="completed"))
        await self._send(
            session_id,
            acp.update_plan(
                [
                    acp.plan_entry("Read the prompt", status="completed"),
                    acp.plan_entry("Echo it back", status="in_progress"),
                ]
            ),
        )
        sent: list[str] = []
        for word in text.split() or ["(empty)"]:
            if cancel.is_set():
                return " ".join(sent), "cancelled"
            chunk = word if not sent else " " + word
            await self._send(session_id, acp.update_agent_message_text(chunk))
            sent.append(word)
            await asyncio.sleep(WORD_DELAY)
        return " ".join(sent), "end_turn"

    async def _stall(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        await self._send(session_id, acp.update_agent_message_text("stalling"))
        await cancel.wait()
        return "stalling", "cancelled"

    async def _hang(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        count, size = _counts(rest, default_count=0)
        for _ in range(count):  # optional flood first: fills a client that stopped reading
            await self._send(session_id, acp.update_agent_message_text("h" * size))
        await self._send(session_id, acp.update_agent_message_text("hanging"))
        await asyncio.Event().wait()  # forever, whatever cancel says
        return "hanging", "end_turn"

    async def _sleep(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        seconds_text, _, text = rest.partition(" ")
        try:
            seconds = float(seconds_text)
        except ValueError:
            raise acp.RequestError.invalid_params({"details": "/sleep needs SECONDS"}) from None
        try:
            await asyncio.wait_for(cancel.wait(), seconds)
            return "", "cancelled"
        except TimeoutError:
            return await self._normal_turn(session_id, text or "slept", cancel)

    async def _pace(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        milliseconds, _, text = rest.partition(" ")
        try:
            delay = float(milliseconds) / 1000
        except ValueError:
            raise acp.RequestError.invalid_params({"details": "/pace needs MS TEXT"}) from None
        sent: list[str] = []
        for word in text.split():  # one chunk per word, MS apart: a model writing at its pace
            if cancel.is_set():
                return " ".join(sent), "cancelled"
            await self._send(session_id, acp.update_agent_message_text(word if not sent else " " + word))
            sent.append(word)
            await asyncio.sleep(delay)
        return " ".join(sent), "end_turn"

    async def _crash(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        await self._send(session_id, acp.update_agent_message_text("crashing"))
        sys.stderr.write("echo agent: crashing on purpose (/crash)\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)

    async def _flood(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        count, size = _counts(rest, default_count=None)
        for sent in range(count):
            if cancel.is_set():
                return f"flooded {sent}", "cancelled"
            await self._send(session_id, acp.update_agent_message_text(flood_chunk(sent, size)))
        return f"flooded {count}", "end_turn"

    async def _permission(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        tool = acp.start_edit_tool_call("echo-edit", "Editing notes.txt", path="notes.txt", content="echo")
        await self._send(session_id, tool)
        options = [
            schema.PermissionOption(option_id="allow", name="Allow once", kind="allow_once"),
            schema.PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
        ]
        response = await self.client.request_permission(
            session_id=session_id,
            tool_call=schema.ToolCallUpdate(tool_call_id="echo-edit", title="Editing notes.txt", kind="edit"),
            options=options,
        )
        outcome = response.outcome
        decision = outcome.option_id if getattr(outcome, "outcome", "") == "selected" else "cancelled"
        allowed = decision == "allow"
        await self._send(
            session_id, acp.update_tool_call("echo-edit", status="completed" if allowed else "failed")
        )
        reply = f"permission {decision}"
        await self._send(session_id, acp.update_agent_message_text(reply))
        return reply, "cancelled" if decision == "cancelled" else "end_turn"

    async def _history(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        record = self._load(session_id) or {"history": []}
        turns = [user for user, _ in record["history"]]
        reply = f"{len(turns)} earlier turns: " + " | ".join(turns)
        await self._send(session_id, acp.update_agent_message_text(reply))
        return reply, "end_turn"

    async def _env(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        reply = " ".join(f"{n}={os.environ[n]}" if n in os.environ else f"{n} unset" for n in rest.split())
        await self._send(session_id, acp.update_agent_message_text(reply))
        return reply, "end_turn"

    async def _read(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        try:
            reply = (await asyncio.to_thread(_head, rest.strip(), 2000)).decode(errors="replace")
        except OSError as exc:
            reply = f"cannot read: {exc.strerror}"
        await self._send(session_id, acp.update_agent_message_text(reply))
        return reply, "end_turn"

    async def _write(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        path, _, text = rest.strip().partition(" ")
        try:
            await asyncio.to_thread(Path(path).write_text, text)
            reply = f"wrote {path}"
        except OSError as exc:
            reply = f"cannot write: {exc.strerror}"
        await self._send(session_id, acp.update_agent_message_text(reply))
        return reply, "end_turn"

    async def _commands(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        # Advertise the directives as slash commands, as real agents advertise theirs.
        commands = [
            schema.AvailableCommand(name=name[1:], description=f"echo agent {name}") for name in DIRECTIVES
        ]
        await self._send(session_id, helpers.update_available_commands(commands))
        return "", "end_turn"

    async def _error(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        raise acp.RequestError(ERROR_CODE, "echo agent: failing the turn as asked (/error)")

    # ---- helpers -----------------------------------------------------------------------

    async def _send(self, session_id: str, update: Any) -> None:
        await self.client.session_update(session_id=session_id, update=update)

    def _path(self, session_id: str) -> Path:
        return self.state_dir / "sessions" / f"{session_id}.json"

    def _save(self, session_id: str, record: dict[str, Any]) -> None:
        path = self._path(session_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _load(self, session_id: str) -> dict[str, Any] | None:
        if "/" in session_id or session_id.startswith("."):
            return None
        try:
            record: dict[str, Any] = json.loads(self._path(session_id).read_text())
            return record
        except (OSError, ValueError):
            return None

    def _remember(self, session_id: str, text: str, reply: str) -> None:
        record = self._load(session_id) or {"cwd": "", "history": []}
        record["history"].append([text, reply])
        self._save(session_id, record)

    def _log_event(self, line: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "events.log").open("a") as handle:
            handle.write(f"{os.getpid()} {line}\n")


DIRECTIVES = {
    "/stall": EchoAgent._stall,
    "/hang": EchoAgent._hang,
    "/sleep": EchoAgent._sleep,
    "/crash": EchoAgent._crash,
    "/flood": EchoAgent._flood,
    "/pace": EchoAgent._pace,
    "/permission": EchoAgent._permission,
    "/error": EchoAgent._error,
    "/env": EchoAgent._env,
    "/read": EchoAgent._read,
    "/write": EchoAgent._write,
    "/commands": EchoAgent._commands,
    "/history": EchoAgent._history,
}


def _head(path: str, size: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def flood_chunk(index: int, size: int) -> str:
    """Chunk `index` of a /flood: its number, padded with x to `size` (so order is checkable)."""
    return f"{index}:".ljust(size, "x")


def _counts(rest: str, default_count: int | None) -> tuple[int, int]:
    """N [BYTES] from a directive's arguments (BYTES defaults to 64)."""
    parts = rest.split()
    try:
        if not parts and default_count is not None:
            return default_count, 64
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 64
    except (IndexError, ValueError):
        raise acp.RequestError.invalid_params({"details": "expected N [BYTES]"}) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="echo_agent", description="sessiongate's built-in ACP agent")
    parser.add_argument(
        "--init-delay", type=float, default=0.0, help="seconds to wait before answering initialize"
    )
    parser.add_argument(
        "--auth-required", action="store_true", help="demand authentication (session/new fails)"
    )
    parser.add_argument("--fail-init", action="store_true", help="answer initialize with a JSON-RPC error")
    parser.add_argument("--no-load-session", action="store_true", help="do not advertise session/load")
    parser.add_argument(
        "--ignore-sigterm", action="store_true", help="ignore SIGTERM: stopping the agent takes SIGKILL"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ["ECHO_AGENT_STATE_DIR"]) if os.environ.get("ECHO_AGENT_STATE_DIR") else None,
        help="where sessions, pids and events are kept (env ECHO_AGENT_STATE_DIR)",
    )
    opts = parser.parse_args(argv)
    opts.record_pid = opts.state_dir is not None
    opts.state_dir = opts.state_dir or default_state_dir() / "echo-agent"
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if opts.record_pid:  # only where someone asked for a state dir: tests check PIDs there
        pids = opts.state_dir / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / str(os.getpid())).write_text(str(os.getpgrp()))
    # session/close is stable in ACP 1.21; this SDK still routes it only as "unstable".
    asyncio.run(acp.run_agent(cast(acp.Agent, EchoAgent(opts)), use_unstable_protocol=True))


if __name__ == "__main__":
    main()
