"""The built-in reference ACP agent: `python -m sessiongate.echo`.

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
  /permission [BYTES] ask permission for an edit (its raw input BYTES long), report the decision
  /error            answer the turn with a JSON-RPC error
  /commands         advertise the directives as slash commands (ACP available_commands_update)
  /history          reply with the prompts this ACP session remembers (kept across session/load)
  /env NAME...      reply with each variable's value as the agent sees it ("NAME=value" or "NAME unset")
  /read PATH        reply with the file's first 2000 bytes, or "cannot read: <why>" (sandbox checks)
  /write PATH TEXT  write TEXT to PATH (relative: in the cwd); reply "wrote PATH" or "cannot write: <why>"
  /badresult        answer the turn with a stopReason that is not an ACP stop reason ("bogus"),
                    so the client's SDK fails validating the response
  /mode MODE        switch its own mode (as an agent leaving plan mode does): current_mode_update,
                    reply "mode MODE"; an unknown MODE fails the turn (invalid params)
  /state            reply "mode=<mode> model=<model> verbose=<true|false>"
  /blocks           reply the prompt's content blocks as its SDK parsed them, one JSON per line
  /title TEXT       session_info_update with title TEXT; reply "title set"
  /usage USED SIZE  usage_update (USED of SIZE tokens, cost 0.01 USD); reply "usage sent"
  /elicit [url]     elicitation/create (form, or url mode) asking "What is your name?";
                    reply "elicitation accept <content as JSON>", "elicitation decline",
                    "elicitation cancel", or "elicitation error <code>" (JSON-RPC error)
  /fs-read PATH [LINE [LIMIT]]
                    the client's fs/read_text_file (relative PATH: in the session's cwd); reply
                    the content, or "fs error <code>: <message>" (JSON-RPC error)
  /fs-write PATH TEXT
                    the client's fs/write_text_file; reply "fs wrote PATH" or "fs error <code>: <message>"
  /terminal [--limit N] [--keep] CMD...
                    the client's terminal/create (sh -c CMD in the session's cwd, output limit N
                    bytes, default 65536), a tool call (kind execute, id "echo-term-<n>") showing the
                    terminal, then terminal/wait_for_exit (cancellable), terminal/output and
                    terminal/release; reply "terminal exit <code|signal> truncated=<true|false>: <output>"
                    ("terminal cancelled" on session/cancel). With --keep: reply "terminal kept <id>"
                    once the command has printed something (terminal/output polled, at most 10 s),
                    never waiting for its exit nor releasing it (the client cleans up).
                    JSON-RPC errors: "terminal error <code>: <message>"
  /terminal-env NAME=VALUE... [--limit N] [--keep] CMD...
                    /terminal, asking for the environment variables NAME=VALUE (terminal/create's env)
  /mcp list         one line per MCP server of the session (as the last session/new, /load or
                    /resume gave them): "NAME stdio|http|sse [command basename] [env: NAMES]
                    [headers: NAMES]", never a value; "no mcp servers" when there are none
  /mcp tools SERVER the server's tool names, comma-separated (official `mcp` SDK)
  /mcp call SERVER TOOL [JSON]
                    connect, initialize, call TOOL with the JSON object (default {}), reply its text
                    content; any failure (unknown server, bad JSON, cannot connect, tool error,
                    30 s without an answer) replies one short "mcp ..." line
Sessions have modes `ask` and `code` (default; session/set_mode, refused during a turn) and
config options `model` (select: echo-small (default), echo-large) and `verbose` (boolean,
default false; session/set_config_option, allowed during a turn), kept with the session.
Start-up options: --init-delay SECONDS, --auth-required, --fail-init, --no-load-session,
--no-resume-session (do not advertise session/resume),
--ignore-sigterm (SIGTERM is ignored: stopping the agent takes SIGKILL),
--ignore-stdin-eof (keeps running after its stdin ends, until killed),
--load-fails hang|exit (session/load and session/resume never answer, or exit the agent),
--state-dir DIR (or ECHO_AGENT_STATE_DIR): where sessions are kept for session/load and
received cancels are logged (events.log); when given, the agent also records its PID there
(pids/PID). Default: $XDG_STATE_HOME/sessiongate/echo-agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import acp
from acp import helpers, schema
from acp.schema import StopReason
from sessiongate.echo.mcp_client import McpCallError, McpServer, call_tool, clip, list_tools

AGENT_NAME = "sessiongate-echo"
AGENT_VERSION = "0.1.0"
WORD_DELAY = 0.005  # seconds between echoed words: plausible streaming, fast tests
CRASH_EXIT_CODE = 3
ERROR_CODE = -32603
INVALID_REQUEST_CODE = -32600
TERMINAL_OUTPUT_LIMIT = 65536  # bytes, /terminal's default output_byte_limit
TERMINAL_CLEANUP_TIMEOUT = 2.0  # seconds for each kill/release after a cancel or an error

MODES = (
    schema.SessionMode(id="ask", name="Ask", description="answers, changes nothing"),
    schema.SessionMode(id="code", name="Code", description="may edit files"),
)
MODE_IDS = tuple(mode.id for mode in MODES)
DEFAULT_MODE = "code"
MODELS = {"echo-small": "Echo small", "echo-large": "Echo large"}
DEFAULT_MODEL = "echo-small"

T = TypeVar("T")


@dataclass(slots=True)
class Settings:
    """A session's cwd (as the last new/load/resume gave it), mode and config option values."""

    cwd: str
    mode: str = DEFAULT_MODE
    model: str = DEFAULT_MODEL
    verbose: bool = False

    @classmethod
    def from_record(cls, record: dict[str, Any], cwd: str) -> Settings:
        """The values kept in a session record; defaults for what is missing or invalid."""
        config = record.get("config")
        config = config if isinstance(config, dict) else {}
        mode, model, verbose = record.get("mode"), config.get("model"), config.get("verbose")
        return cls(
            cwd=cwd,
            mode=mode if mode in MODE_IDS else DEFAULT_MODE,
            model=model if isinstance(model, str) and model in MODELS else DEFAULT_MODEL,
            verbose=verbose if isinstance(verbose, bool) else False,
        )

    def store(self, record: dict[str, Any]) -> dict[str, Any]:
        record["mode"] = self.mode
        record["config"] = {"model": self.model, "verbose": self.verbose}
        return record

    def modes(self) -> schema.SessionModeState:
        return schema.SessionModeState(current_mode_id=self.mode, available_modes=list(MODES))

    def config_options(self) -> list[schema.SessionConfigOptionSelect | schema.SessionConfigOptionBoolean]:
        return [
            schema.SessionConfigOptionSelect(
                type="select",
                id="model",
                name="Model",
                category="model",
                description="which echo model answers",
                current_value=self.model,
                options=[schema.SessionConfigSelectOption(value=v, name=n) for v, n in MODELS.items()],
            ),
            schema.SessionConfigOptionBoolean(
                type="boolean",
                id="verbose",
                name="Verbose",
                description="say more",
                current_value=self.verbose,
            ),
        ]


class EchoAgent:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.state_dir: Path = opts.state_dir
        self.client: Any = None
        self.cancelled: dict[str, asyncio.Event] = {}
        self.known: set[str] = set()
        self.logged_in = False  # --auth-required: until `authenticate` with "echo-login"
        self.settings: dict[str, Settings] = {}
        self.running: dict[str, list[Any]] = {}  # sessions with a turn under way: its prompt (/blocks)
        self.terminals = 0  # /terminal tool calls so far (their ids: echo-term-<n>)
        # Each session's MCP servers, as the last session/new, /load or /resume passed them. Kept
        # in memory only: they hold secret values, and ACP passes them again on every load/resume.
        self.mcp_servers: dict[str, tuple[McpServer, ...]] = {}

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
                mcp_capabilities=schema.McpCapabilities(http=True, sse=True),
                session_capabilities=schema.SessionCapabilities(
                    close=schema.SessionCloseCapabilities(),
                    resume=None if self.opts.no_resume_session else schema.SessionResumeCapabilities(),
                ),
            ),
            auth_methods=auth,
            agent_info=schema.Implementation(name=AGENT_NAME, version=AGENT_VERSION, title="Echo agent"),
        )

    async def authenticate(self, method_id: str, **_: Any) -> schema.AuthenticateResponse:
        # With --auth-required, "echo-login" logs this process in (its key, if ECHO_AGENT_KEY is
        # set, must be "open-sesame": like an API key passed with pass_env); anything else fails.
        key_ok = os.environ.get("ECHO_AGENT_KEY", "open-sesame") == "open-sesame"
        if not self.opts.auth_required or method_id != "echo-login" or not key_ok:
            raise acp.RequestError.auth_required({"details": "echo agent: login refused"})
        self.logged_in = True
        return schema.AuthenticateResponse()

    async def new_session(
        self, cwd: str, mcp_servers: list[Any] | None = None, **_: Any
    ) -> schema.NewSessionResponse:
        if self.opts.auth_required and not self.logged_in:
            raise acp.RequestError.auth_required({"authMethods": ["echo-login"]})
        session_id = f"echo-{uuid.uuid4().hex}"
        settings = Settings(cwd=cwd)
        self._save(session_id, settings.store({"cwd": cwd, "history": []}))
        self._activate(session_id, settings, mcp_servers)
        return schema.NewSessionResponse(
            session_id=session_id, modes=settings.modes(), config_options=settings.config_options()
        )

    async def load_session(
        self, cwd: str, session_id: str, mcp_servers: list[Any] | None = None, **_: Any
    ) -> schema.LoadSessionResponse:
        if self.opts.no_load_session:
            raise acp.RequestError.method_not_found("session/load")
        await self._fail_resuming()
        record = self._load(session_id)
        if record is None:
            raise acp.RequestError.invalid_params({"details": f"unknown session {session_id}"})
        for user_text, reply in record["history"]:  # replay, as ACP asks of session/load
            await self._send(session_id, acp.update_user_message_text(user_text))
            await self._send(session_id, acp.update_agent_message_text(reply))
        settings = self._activate(session_id, Settings.from_record(record, cwd), mcp_servers)
        return schema.LoadSessionResponse(modes=settings.modes(), config_options=settings.config_options())

    async def resume_session(
        self, cwd: str, session_id: str, mcp_servers: list[Any] | None = None, **_: Any
    ) -> schema.ResumeSessionResponse:
        """Like session/load, without replaying the history."""
        if self.opts.no_resume_session:
            raise acp.RequestError.method_not_found("session/resume")
        await self._fail_resuming()
        record = self._load(session_id)
        if record is None:
            raise acp.RequestError.invalid_params({"details": f"unknown session {session_id}"})
        settings = self._activate(session_id, Settings.from_record(record, cwd), mcp_servers)
        return schema.ResumeSessionResponse(modes=settings.modes(), config_options=settings.config_options())

    async def _fail_resuming(self) -> None:
        """--load-fails: never answer session/load or /resume ("hang"), or exit on it ("exit")."""
        if self.opts.load_fails == "hang":
            await asyncio.Event().wait()
        if self.opts.load_fails == "exit":
            os._exit(3)

    async def set_session_mode(
        self, session_id: str, mode_id: str, **_: Any
    ) -> schema.SetSessionModeResponse:
        settings = self._settings(session_id)
        if mode_id not in MODE_IDS:
            raise acp.RequestError.invalid_params({"details": f"unknown mode {mode_id}"})
        if session_id in self.running:
            raise acp.RequestError(
                INVALID_REQUEST_CODE, "cannot switch mode during a turn", {"sessionId": session_id}
            )
        await self._switch_mode(session_id, settings, mode_id)
        return schema.SetSessionModeResponse()

    async def set_config_option(
        self, config_id: str, session_id: str, value: str | bool, **_: Any
    ) -> schema.SetSessionConfigOptionResponse:
        """Allowed during a turn. The SDK passes a bool for `type: "boolean"`, else a str."""
        settings = self._settings(session_id)
        if config_id == "model":
            if not isinstance(value, str) or value not in MODELS:
                raise acp.RequestError.invalid_params({"details": f"unknown model {value!r}"})
            settings.model = value
        elif config_id == "verbose":
            if not isinstance(value, bool):
                raise acp.RequestError.invalid_params({"details": f"verbose takes a boolean, not {value!r}"})
            settings.verbose = value
        else:
            raise acp.RequestError.invalid_params({"details": f"unknown config option {config_id}"})
        self._persist(session_id, settings)
        return schema.SetSessionConfigOptionResponse(config_options=settings.config_options())

    async def close_session(self, session_id: str, **_: Any) -> schema.CloseSessionResponse:
        """The gateway closed the session for good: forget it, and delete what was stored."""
        self.known.discard(session_id)
        self.settings.pop(session_id, None)
        self.mcp_servers.pop(session_id, None)
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
        self.running[session_id] = prompt
        try:
            if handler is not None:
                reply, stop = await handler(self, session_id, rest, cancel)
            else:
                reply, stop = await self._normal_turn(session_id, text, cancel)
        finally:
            self.running.pop(session_id, None)
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
        padding = int(rest) if rest.strip().isdigit() else 0  # /permission BYTES: a large tool call
        response = await self.client.request_permission(
            session_id=session_id,
            tool_call=schema.ToolCallUpdate(
                tool_call_id="echo-edit",
                title="Editing notes.txt",
                kind="edit",
                raw_input={"content": "x" * padding} if padding else None,
            ),
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

    async def _mode(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        mode_id = rest.strip()
        if mode_id not in MODE_IDS:
            raise acp.RequestError.invalid_params({"details": f"/mode needs one of {', '.join(MODE_IDS)}"})
        await self._switch_mode(session_id, self._settings(session_id), mode_id)
        return await self._reply(session_id, f"mode {mode_id}")

    async def _state(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        settings = self._settings(session_id)
        verbose = "true" if settings.verbose else "false"
        return await self._reply(session_id, f"mode={settings.mode} model={settings.model} verbose={verbose}")

    async def _blocks(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        blocks = self.running.get(session_id, [])
        return await self._reply(
            session_id, "\n".join(b.model_dump_json(by_alias=True, exclude_none=True) for b in blocks)
        )

    async def _title(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        title = rest.strip()
        if not title:
            raise acp.RequestError.invalid_params({"details": "/title needs TEXT"})
        await self._send(
            session_id, schema.SessionInfoUpdate(session_update="session_info_update", title=title)
        )
        return await self._reply(session_id, "title set")

    async def _usage(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        try:
            used, size = (int(part) for part in rest.split())
            update = schema.UsageUpdate(
                session_update="usage_update",
                used=used,
                size=size,
                cost=schema.Cost(amount=0.01, currency="USD"),
            )
        except ValueError:  # also pydantic's, for negative numbers
            raise acp.RequestError.invalid_params({"details": "/usage needs USED SIZE (tokens)"}) from None
        await self._send(session_id, update)
        return await self._reply(session_id, "usage sent")

    async def _elicit(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        mode: Any = schema.ElicitationFormSessionMode(
            session_id=session_id,
            requested_schema=schema.ElicitationSchema(
                type="object",
                properties={"name": schema.ElicitationStringPropertySchema(type="string")},
                required=["name"],
            ),
        )
        if rest.strip() == "url":  # /elicit url: the user is sent to a page instead of a form
            mode = schema.ElicitationUrlSessionMode.model_validate(
                {
                    "sessionId": session_id,
                    "elicitationId": "echo-url",
                    "url": "https://example.com/echo-login",
                }
            )
        try:
            answer = await self.client.create_elicitation(message="What is your name?", mode=mode)
        except acp.RequestError as exc:
            return await self._reply(session_id, f"elicitation error {exc.code}")
        if answer.action == "accept":
            reply = f"elicitation accept {json.dumps(answer.content or {}, sort_keys=True)}"
        else:
            reply = f"elicitation {answer.action}"
        return await self._reply(session_id, reply, "cancelled" if cancel.is_set() else "end_turn")

    async def _fs_read(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        parts = rest.split()
        try:
            path = parts[0]
            line = int(parts[1]) if len(parts) > 1 else None
            limit = int(parts[2]) if len(parts) > 2 else None
        except (IndexError, ValueError):
            raise acp.RequestError.invalid_params({"details": "/fs-read needs PATH [LINE [LIMIT]]"}) from None
        try:
            response = await self.client.read_text_file(
                session_id=session_id, path=self._in_cwd(session_id, path), line=line, limit=limit
            )
        except acp.RequestError as exc:
            return await self._reply(session_id, f"fs error {exc.code}: {exc}")
        return await self._reply(session_id, response.content)

    async def _fs_write(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        path, _, text = rest.strip().partition(" ")
        if not path:
            raise acp.RequestError.invalid_params({"details": "/fs-write needs PATH TEXT"})
        try:
            await self.client.write_text_file(
                session_id=session_id, path=self._in_cwd(session_id, path), content=text
            )
        except acp.RequestError as exc:
            return await self._reply(session_id, f"fs error {exc.code}: {exc}")
        return await self._reply(session_id, f"fs wrote {path}")

    async def _terminal_env(
        self, session_id: str, rest: str, cancel: asyncio.Event
    ) -> tuple[str, StopReason]:
        env: list[schema.EnvVariable] = []
        head, _, tail = rest.strip().partition(" ")
        while "=" in head:
            name, _, value = head.partition("=")
            env.append(schema.EnvVariable(name=name, value=value))
            head, _, tail = tail.lstrip().partition(" ")
        return await self._terminal(session_id, f"{head} {tail}", cancel, env)

    async def _first_output(self, session_id: str, terminal_id: str) -> None:
        """Until the terminal has printed something (or 10 s): a test that reads what a kept command
        wrote then knows it ran before the turn ended, which ends the turn's terminals."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10
        while loop.time() < give_up:
            shown = await self.client.terminal_output(session_id=session_id, terminal_id=terminal_id)
            if shown.output or shown.exit_status is not None:
                return
            await asyncio.sleep(0.02)

    async def _terminal(
        self, session_id: str, rest: str, cancel: asyncio.Event, env: list[schema.EnvVariable] | None = None
    ) -> tuple[str, StopReason]:
        limit, keep, command = _terminal_args(rest)
        cwd = self._settings(session_id).cwd
        self.terminals += 1
        tool_call_id = f"echo-term-{self.terminals}"
        terminal_id: str | None = None  # until released
        shown = False  # the tool call was sent
        try:
            created = await self.client.create_terminal(
                session_id=session_id,
                command="sh",
                args=["-c", command],
                env=env,
                cwd=cwd or None,
                output_byte_limit=limit,
            )
            terminal_id = created.terminal_id
            await self._send(
                session_id,
                helpers.start_tool_call(
                    tool_call_id,
                    f"Running: {command}",
                    kind="execute",
                    status="in_progress",
                    content=[helpers.tool_terminal_ref(terminal_id)],
                    raw_input={"command": command},
                ),
            )
            shown = True
            if keep:  # left running for the client to clean up, once it has surely started
                await self._first_output(session_id, terminal_id)
                await self._send(session_id, acp.update_tool_call(tool_call_id, status="completed"))
                return await self._reply(session_id, f"terminal kept {terminal_id}")
            finished, exited = await _unless_cancelled(
                self.client.wait_for_terminal_exit(session_id=session_id, terminal_id=terminal_id), cancel
            )
            if not finished or exited is None:
                await self._drop_terminal(session_id, terminal_id, kill=True)
                await self._send(session_id, acp.update_tool_call(tool_call_id, status="failed"))
                return await self._reply(session_id, "terminal cancelled", "cancelled")
            output = await self.client.terminal_output(session_id=session_id, terminal_id=terminal_id)
            released, terminal_id = terminal_id, None
            await self.client.release_terminal(session_id=session_id, terminal_id=released)
        except acp.RequestError as exc:
            if terminal_id is not None and not keep:
                await self._drop_terminal(session_id, terminal_id, kill=False)
            if shown:
                await self._send(session_id, acp.update_tool_call(tool_call_id, status="failed"))
            return await self._reply(session_id, f"terminal error {exc.code}: {exc}")
        status = exited.exit_code if exited.exit_code is not None else exited.signal or "unknown"
        await self._send(
            session_id,
            acp.update_tool_call(tool_call_id, status="completed" if exited.exit_code == 0 else "failed"),
        )
        truncated = "true" if output.truncated else "false"
        return await self._reply(session_id, f"terminal exit {status} truncated={truncated}: {output.output}")

    async def _mcp(self, session_id: str, rest: str, cancel: asyncio.Event) -> tuple[str, StopReason]:
        """/mcp list | tools SERVER | call SERVER TOOL [JSON]: the session's MCP servers."""
        action, _, args = rest.strip().partition(" ")
        servers = self.mcp_servers.get(session_id, ())
        if action == "list":
            return await self._reply(
                session_id, "\n".join(server.describe() for server in servers) or "no mcp servers"
            )
        if action not in ("tools", "call"):
            return await self._reply(
                session_id, "mcp usage: /mcp list | tools SERVER | call SERVER TOOL [JSON]"
            )
        name, _, args = args.strip().partition(" ")
        server = next((server for server in servers if server.name == name), None)
        if server is None:
            return await self._reply(session_id, f"mcp error: no server named {clip(name, 100)!r}")
        try:
            if action == "tools":
                reply = ", ".join(await list_tools(server)) or "no tools"
            else:
                tool, _, raw = args.strip().partition(" ")
                reply = await call_tool(server, tool, _json_object(raw))
        except McpCallError as exc:
            reply = str(exc)
        return await self._reply(session_id, reply)

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

    async def _reply(
        self, session_id: str, text: str, stop: StopReason = "end_turn"
    ) -> tuple[str, StopReason]:
        """Send the turn's reply as one message chunk."""
        await self._send(session_id, acp.update_agent_message_text(text))
        return text, stop

    def _activate(self, session_id: str, settings: Settings, mcp_servers: list[Any] | None) -> Settings:
        self.known.add(session_id)
        self.settings[session_id] = settings
        servers = (McpServer.from_acp(server) for server in mcp_servers or [])
        self.mcp_servers[session_id] = tuple(server for server in servers if server is not None)
        return settings

    def _settings(self, session_id: str) -> Settings:
        settings = self.settings.get(session_id)
        if settings is None:
            raise acp.RequestError.invalid_params({"details": f"unknown session {session_id}"})
        return settings

    def _persist(self, session_id: str, settings: Settings) -> None:
        self._save(session_id, settings.store(self._load(session_id) or {"cwd": settings.cwd, "history": []}))

    async def _switch_mode(self, session_id: str, settings: Settings, mode_id: str) -> None:
        settings.mode = mode_id
        self._persist(session_id, settings)
        await self._send(session_id, helpers.update_current_mode(mode_id))

    def _in_cwd(self, session_id: str, path: str) -> str:
        cwd = self._settings(session_id).cwd
        return path if os.path.isabs(path) or not cwd else os.path.join(cwd, path)

    async def _drop_terminal(self, session_id: str, terminal_id: str, *, kill: bool) -> None:
        """Best effort, bounded: kill (when asked) and release a terminal we give up on."""
        calls = [self.client.kill_terminal] if kill else []
        for call in [*calls, self.client.release_terminal]:
            with contextlib.suppress(acp.RequestError, TimeoutError):
                await asyncio.wait_for(
                    call(session_id=session_id, terminal_id=terminal_id), TERMINAL_CLEANUP_TIMEOUT
                )

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
    "/mode": EchoAgent._mode,
    "/state": EchoAgent._state,
    "/blocks": EchoAgent._blocks,
    "/title": EchoAgent._title,
    "/usage": EchoAgent._usage,
    "/elicit": EchoAgent._elicit,
    "/fs-read": EchoAgent._fs_read,
    "/fs-write": EchoAgent._fs_write,
    "/terminal": EchoAgent._terminal,
    "/terminal-env": EchoAgent._terminal_env,
    "/mcp": EchoAgent._mcp,
}


async def _unless_cancelled(call: Awaitable[T], cancel: asyncio.Event) -> tuple[bool, T | None]:
    """(True, result) of `call`, or (False, None) as soon as `cancel` is set (`call` is cancelled)."""
    task = asyncio.ensure_future(call)
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return True, task.result()
    return False, None


def _terminal_args(rest: str) -> tuple[int, bool, str]:
    """[--limit N] [--keep] CMD... from /terminal's arguments."""
    limit, keep, rest = TERMINAL_OUTPUT_LIMIT, False, rest.strip()
    while True:
        head, _, tail = rest.partition(" ")
        if head == "--keep":
            keep, rest = True, tail.lstrip()
        elif head == "--limit":
            value, _, tail = tail.lstrip().partition(" ")
            try:
                limit = int(value)
            except ValueError:
                raise acp.RequestError.invalid_params({"details": "/terminal --limit needs N"}) from None
            if limit < 0:
                raise acp.RequestError.invalid_params({"details": "/terminal --limit needs N >= 0"})
            rest = tail.lstrip()
        else:
            break
    if not rest:
        raise acp.RequestError.invalid_params({"details": "/terminal needs CMD"})
    return limit, keep, rest


def _json_object(raw: str) -> dict[str, Any]:
    """/mcp call's arguments: a JSON object ({} when absent), else McpCallError."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise McpCallError(f"mcp error: arguments are not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise McpCallError("mcp error: arguments must be a JSON object")
    return value


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
        "--no-resume-session", action="store_true", help="do not advertise (nor answer) session/resume"
    )
    parser.add_argument(
        "--ignore-sigterm", action="store_true", help="ignore SIGTERM: stopping the agent takes SIGKILL"
    )
    parser.add_argument(
        "--load-fails",
        choices=("hang", "exit"),
        default="",
        help="session/load and session/resume never answer (hang) or exit the agent (exit)",
    )
    parser.add_argument(
        "--ignore-stdin-eof", action="store_true", help="keep running after stdin ends (until killed)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ["ECHO_AGENT_STATE_DIR"]) if os.environ.get("ECHO_AGENT_STATE_DIR") else None,
        help="where sessions, pids and events are kept (env ECHO_AGENT_STATE_DIR)",
    )
    opts = parser.parse_args(argv)
    opts.record_pid = opts.state_dir is not None
    opts.state_dir = opts.state_dir or default_state_dir()
    return opts


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/sessiongate/echo-agent: beside the gateway's state (it never imports the gateway)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sessiongate" / "echo-agent"


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if opts.record_pid:  # only where someone asked for a state dir: tests check PIDs there
        pids = opts.state_dir / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / str(os.getpid())).write_text(str(os.getpgrp()))
    # session/close is stable in ACP 1.21; this SDK still routes it (and session/resume) only as
    # "unstable".
    try:
        asyncio.run(acp.run_agent(cast(acp.Agent, EchoAgent(opts)), use_unstable_protocol=True))
    finally:
        while opts.ignore_stdin_eof:  # the connection is over; the process lingers until killed
            time.sleep(3600)


if __name__ == "__main__":
    main()
