"""Live rendering of a turn for a person: reply text as it arrives, tool calls as status
lines that update in place (on a terminal), thoughts dimmed, and a final stop-reason line."""

from __future__ import annotations

from typing import TextIO

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


class LiveRenderer:
    def __init__(self, out: TextIO, *, terminal: bool) -> None:
        self._out = out
        self._terminal = terminal  # colours and in-place updates only on a terminal
        self._tools: dict[str, tuple[str, int]] = {}  # tool_call_id -> (title, status)
        self._status_line: str | None = None  # tool call whose status line is the last line shown
        self._mode = "line"  # "line" (at the start of a line), "text", "thought"

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
        elif kind == "notice":
            self._line(f"notice: {event.notice.message}", bold=True)
        elif kind == "result":
            self._result(event.result)

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
        text = f"{TOOL_MARKS.get(status, '·')} {title} [{status_name}]"
        if self._terminal and self._status_line == tool_id:
            self._write(CLEAR_LINE + text)  # update the status line in place
        else:
            self._end_line()
            self._write(text)
        self._status_line = tool_id
        self._mode = "tool"

    def _line(self, text: str, *, dim: bool = False, bold: bool = False) -> None:
        self._end_line()
        if self._terminal and (dim or bold):
            text = f"{DIM if dim else BOLD}{text}{RESET}"
        self._write(text + "\n")
        self._mode, self._status_line = "line", None

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
