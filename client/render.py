"""Live rendering of a turn for a person: reply text as it arrives, tool calls as status
lines that update in place (on a terminal), thoughts dimmed, questions the agent asks
(permission requests, elicitations, client tool calls) and what became of them, session state changes (mode,
config, commands, title, usage) as dimmed lines, terminal output as it comes, and a final
stop-reason line."""

from __future__ import annotations

import json
import re
from typing import TextIO

from sessiongate.client.tools import tool_input
from sessiongate.v1 import session_service_pb2 as pb

DIM, BOLD, RESET, CLEAR_LINE = "\033[2m", "\033[1m", "\033[0m", "\r\033[K"
TOOL_MARKS: dict[int, str] = {
    pb.TOOL_CALL_STATUS_PENDING: "…",
    pb.TOOL_CALL_STATUS_IN_PROGRESS: "⋯",
    pb.TOOL_CALL_STATUS_COMPLETED: "✓",
    pb.TOOL_CALL_STATUS_FAILED: "✗",
}
PLAN_MARKS = {"completed": "[x]", "in_progress": "[>]", "pending": "[ ]"}
OUTCOMES: dict[int, str] = {
    pb.PERMISSION_OUTCOME_ALLOWED: "allowed",
    pb.PERMISSION_OUTCOME_REJECTED: "rejected",
    pb.PERMISSION_OUTCOME_CANCELLED: "cancelled",
}
ELICITATION_OUTCOMES: dict[int, str] = {
    pb.ELICITATION_ACTION_ACCEPT: "accepted",
    pb.ELICITATION_ACTION_DECLINE: "declined",
    pb.ELICITATION_ACTION_CANCEL: "cancelled",
}
MAX_COMMANDS_SHOWN = 8
INPUT_SHOWN = 200  # characters of a client tool call's input JSON (the agent chose it)
# C0 controls, DEL and C1 controls: in what an agent sends they could move the cursor, clear
# lines or restyle the terminal (redraw a question's options, say), so never reach it raw.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


class LiveRenderer:
    """Writes a turn's events to `out` as a person reads them. `session_id`: the turn's
    session, for the `respond-tool` command a client tool call line suggests."""

    def __init__(self, out: TextIO, *, terminal: bool, session_id: str = "") -> None:
        self._out = out
        self._session_id = session_id
        self._terminal = terminal  # colours and in-place updates only on a terminal
        self._tools: dict[str, tuple[str, int]] = {}  # tool_call_id -> (title, status)
        self._status_line: str | None = None  # tool call whose status line is the last line shown
        self._mode = "line"  # "line" (at the start of a line), "text", "thought", "tool", "terminal"

    def event(self, event: pb.PromptEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "message_chunk":
            self._flow("text", event.message_chunk.content.text.text)
        elif kind == "thought_chunk":
            self._flow("thought", event.thought_chunk.content.text.text)
        elif kind == "tool_call":
            call = event.tool_call
            self._tool(call.tool_call_id, call.title, call.status)
        elif kind == "tool_call_update":
            update = event.tool_call_update
            title, status = self._tools.get(update.tool_call_id, (update.tool_call_id, 0))
            self._tool(update.tool_call_id, update.title or title, update.status or status)
        elif kind == "plan":
            marks = "  ".join(f"{PLAN_MARKS.get(e.status, '[?]')} {e.content}" for e in event.plan.entries)
            self._line(f"plan: {marks}", dim=True)
        elif kind == "permission":
            p = event.permission
            self._line(
                f"permission: {p.title or p.tool_call_id} -> {OUTCOMES.get(p.outcome, '?')} ({p.policy})"
            )
        elif kind == "permission_request":
            request = event.permission_request
            options = ", ".join(o.name or o.option_id for o in request.options)
            self._line(f"? permission requested: {tool_call_label(request.tool_call)} · {options}", bold=True)
        elif kind == "elicitation_request":
            ask = event.elicitation_request
            url = f" ({ask.url})" if ask.url else ""
            self._line(f"? input requested: {ask.message}{url}", bold=True)
        elif kind == "elicitation":
            e = event.elicitation
            self._line(f"input: {ELICITATION_OUTCOMES.get(e.action, '?')} ({e.policy})")
        elif kind == "tool_request":
            self._line(self._tool_request(event.tool_request), bold=True)
        elif kind == "tool_outcome":
            o = event.tool_outcome
            self._line(f"tool {o.tool}: {'error' if o.is_error else 'answered'} ({o.decided_by})")
        elif kind == "notice":
            self._line(f"notice: {event.notice.message}", bold=True)
        elif kind == "result":
            self._result(event.result)
        elif kind == "terminal_output":
            self._terminal_output(event.terminal_output)
        elif kind == "file_write":
            w = event.file_write
            self._line(f"wrote {w.path} ({w.bytes} bytes{', new file' if w.created else ''})", dim=True)
        elif kind in STATE_UPDATES:
            self._line(state_update(event), dim=True)

    def _tool_request(self, request: pb.ToolRequest) -> str:
        """`? tool NAME INPUT (request ID; answer: sessiongate respond-tool ...)`."""
        shown = json.dumps(tool_input(request), ensure_ascii=False, sort_keys=True)
        if len(shown) > INPUT_SHOWN:
            shown = shown[: INPUT_SHOWN - 1] + "…"
        session = self._session_id or "SESSION"
        answer = f"sessiongate respond-tool {session} {request.request_id} --result TEXT"
        return f"? tool {request.tool} {shown} (request {request.request_id}; answer: {answer})"

    def _flow(self, mode: str, text: str) -> None:
        if self._mode != mode:
            self._end_line()
            if mode == "thought":
                self._write("thinking: " if not self._terminal else "")
        self._mode = mode
        self._status_line = None
        self._write(f"{DIM}{text}{RESET}" if mode == "thought" and self._terminal else text)

    def _tool(self, tool_id: str, title: str, status: int) -> None:
        self._tools[tool_id] = (title, status)
        status_name = pb.ToolCallStatus.Name(status).removeprefix("TOOL_CALL_STATUS_").lower()
        text = f"{TOOL_MARKS.get(status, '·')} {printable(title)} [{status_name}]"
        if self._terminal and self._status_line == tool_id:
            self._write(CLEAR_LINE + text)  # update the status line in place
        else:
            self._end_line()
            self._write(text)
        self._status_line = tool_id
        self._mode = "tool"

    def _line(self, text: str, *, dim: bool = False, bold: bool = False) -> None:
        """One line: what the agent sent in it (a title, a question, a name) is `printable`."""
        text = printable(text)
        self._end_line()
        if self._terminal and (dim or bold):
            text = f"{DIM if dim else BOLD}{text}{RESET}"
        self._write(text + "\n")
        self._mode, self._status_line = "line", None

    def end_line(self) -> None:
        """Finish the line being written (before someone else writes to the terminal)."""
        self._end_line()
        self._status_line = None

    def _terminal_output(self, output: pb.TerminalOutput) -> None:
        if output.output:
            self._flow("terminal", output.output)
            if output.output.endswith("\n"):
                self._mode = "line"
        if output.truncated:
            self._line(f"[terminal {output.terminal_id}: earlier output dropped]", dim=True)
        if output.exited:
            how = f"signal {output.signal}" if output.signal else f"code {output.exit_code}"
            self._line(f"[terminal {output.terminal_id} exited, {how}]", dim=True)

    def _result(self, result: pb.TurnResult) -> None:
        reason = pb.StopReason.Name(result.stop_reason).removeprefix("STOP_REASON_").lower()
        usage = ""
        if result.HasField("usage"):
            usage = f" · {result.usage.input_tokens} in / {result.usage.output_tokens} out tokens"
        self._line(f"-- {reason}{usage}", dim=True)

    def _end_line(self) -> None:
        if self._mode != "line":
            self._write("\n")
            self._mode = "line"

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


STATE_UPDATES = frozenset({"mode_update", "config_update", "commands_update", "session_info", "usage_update"})


def printable(text: str) -> str:
    """`text` (from the agent) safe to show on one line of a terminal: every control character
    (C0, DEL, C1; escape, carriage return and newline too) becomes "?"."""
    return _CONTROLS.sub("?", text)


def tool_call_label(call: pb.ToolCallUpdate) -> str:
    """A tool call as a person reads it: its title (or id), its kind, the paths it touches."""
    label = call.title or call.tool_call_id
    if call.kind:
        label += f" [{call.kind}]"
    paths = [location.path for location in call.locations if location.path]
    if paths and not any(path in label for path in paths):
        label += f" ({', '.join(paths)})"
    return label


def state_update(event: pb.PromptEvent) -> str:
    """One line for a change of the session's state (mode, config, commands, title, usage)."""
    kind = event.WhichOneof("event")
    if kind == "mode_update":
        return f"mode: {event.mode_update.current_mode_id}"
    if kind == "config_update":
        options = event.config_update.config_options
        return "config: " + ", ".join(f"{o.id}={o.current_value}" for o in options)
    if kind == "commands_update":
        names = [f"/{c.name}" for c in event.commands_update.available_commands]
        more = f" (+{len(names) - MAX_COMMANDS_SHOWN} more)" if len(names) > MAX_COMMANDS_SHOWN else ""
        return f"commands: {' '.join(names[:MAX_COMMANDS_SHOWN]) or 'none'}{more}"
    if kind == "session_info":
        return f"title: {event.session_info.title}" if event.session_info.title else "session info updated"
    return f"usage: {usage_text(event.usage_update)}"


def usage_text(usage: pb.SessionUsage) -> str:
    """Context window use and cost, e.g. "context 1200/200000 tokens · cost 0.12 USD"."""
    parts = []
    if usage.context_size or usage.context_used:
        parts.append(f"context {usage.context_used}/{usage.context_size} tokens")
    if usage.cost_currency or usage.cost_amount:
        parts.append(f"cost {usage.cost_amount:g} {usage.cost_currency}".rstrip())
    if usage.HasField("last_turn"):
        parts.append(f"last turn {usage.last_turn.input_tokens} in / {usage.last_turn.output_tokens} out")
    return " · ".join(parts) or "none reported"
