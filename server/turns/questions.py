"""Questions an agent asks during a turn, and who answers them.

A permission request (`session/request_permission`) or an elicitation (`elicitation/create`)
is decided by the turn's permission policy. Under `ask` the client decides: the question goes
into the turn's stream as an event with a request id, and any connection of the session's
principal answers it (RespondPermission / RespondElicitation) while the agent waits on us.
A call of one of the session's client tools (turns/client_tools.py) is always the client's to
answer (RespondToolCall), whatever the policy: the client declared the tool.

Every wait is bounded by the turn's permission timeout (then the reject option, or decline),
and every question still open is answered `cancelled` at once when the turn is cancelled,
ends, or its session closes, as ACP requires. While a question is open the turn's stall
watchdog does not count: the agent is silent because it waits on the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from acp import schema
from sessiongate.server.agents.protocol import Decision, ElicitationAnswer, decide_by_policy, first_of_kind
from sessiongate.server.errors import InvalidArgument, RequestAnswered, RequestNotFound, clip
from sessiongate.server.ids import opaque_id

if TYPE_CHECKING:
    from sessiongate.server.turns.turn import Turn

log = logging.getLogger("sessiongate.questions")

MAX_OPEN = 64  # questions one session may have open at once; more are cancelled at once
SETTLED_KEPT = 256  # ids of settled questions remembered, to say "answered" rather than "unknown"
MAX_SCHEMA_BYTES = 64 * 1024  # an elicitation schema larger than this is declined
MAX_OPTIONS = 64  # a permission request offering more options is cancelled at once
MAX_OPTION_ID = 1024  # characters of an option id a client can answer with (validation.MAX_ANSWER_ID)
ELICITATION_ACTIONS = ("accept", "decline", "cancel")


@dataclass(frozen=True, slots=True)
class PermissionAsk:
    """Turn item: a permission request waiting for the client's answer."""

    request_id: str
    tool_call: schema.ToolCallUpdate
    options: tuple[schema.PermissionOption, ...]
    expire_wall: float


@dataclass(frozen=True, slots=True)
class ElicitationAsk:
    """Turn item: an elicitation waiting for the client's answer."""

    request_id: str
    message: str
    mode: str  # "form" or "url"
    requested_schema: dict[str, Any] | None
    url: str
    tool_call_id: str
    expire_wall: float


@dataclass(frozen=True, slots=True)
class ToolAsk:
    """Turn item: a call of a client tool waiting for the client's answer."""

    request_id: str
    tool: str
    arguments: dict[str, Any]
    expire_wall: float


@dataclass(frozen=True, slots=True)
class ToolReport:
    """Turn item: what became of a client tool call."""

    request_id: str
    tool: str
    is_error: bool
    decided_by: str  # "client", "timeout" or "cancelled"


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    """What the agent gets for a client tool call: `text` (the result, or the error's text),
    the result's `structured` object, whether it is an error, and who decided."""

    text: str
    structured: dict[str, Any] | None
    is_error: bool
    decided_by: str


class _Sentinel:
    """An answer no client gives: the question was cancelled, or it expired."""


CANCELLED = _Sentinel()
EXPIRED = _Sentinel()


@dataclass(eq=False)
class _Open:
    kind: str  # "permission" or "elicitation"
    future: asyncio.Future[Any]
    option_kinds: dict[str, str] = field(default_factory=dict)  # permission: option id -> ACP kind


class Questions:
    """One session's open questions, answerable from any connection of its principal."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._open: dict[str, _Open] = {}
        # request id -> (kind, how it was settled), so a late answer hears why it is too late
        self._settled: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()

    @property
    def open_count(self) -> int:
        return len(self._open)

    def asker(self, turn: Turn) -> TurnAsker:
        return TurnAsker(self, turn)

    # ---- answers from clients -----------------------------------------------------------

    def answer_permission(self, request_id: str, option_id: str) -> str:
        """Answer an open permission request; returns its outcome ("allowed" or "rejected")."""
        question = self._find(request_id, "permission")
        kind = question.option_kinds.get(option_id)
        if kind is None:
            offered = ", ".join(clip(o, 64) for o in list(question.option_kinds)[:10])
            raise InvalidArgument.field("option_id", f"not one of the offered options ({offered})")
        self._settle(request_id, question, option_id, "answered")
        return "allowed" if kind.startswith("allow") else "rejected"

    def answer_elicitation(self, request_id: str, action: str, content: dict[str, Any] | None) -> None:
        question = self._find(request_id, "elicitation")
        self._settle(request_id, question, (action, content if action == "accept" else None), "answered")

    def answer_tool(self, request_id: str, answer: ToolAnswer) -> None:
        """Answer an open client tool call with a result or an error."""
        question = self._find(request_id, "tool")
        self._settle(request_id, question, answer, "answered")

    def cancel_all(self) -> int:
        """Answer every open question `cancelled` (turn cancelled or ended, session closed)."""
        count = 0
        for request_id, question in list(self._open.items()):
            if not question.future.done():
                self._settle(request_id, question, CANCELLED, "cancelled")
                count += 1
        return count

    def _expire(self, request_id: str) -> None:
        question = self._open.get(request_id)
        if question is not None and not question.future.done():
            self._settle(request_id, question, EXPIRED, "expired")

    def _settle(self, request_id: str, question: _Open, answer: Any, how: str) -> None:
        """The one place a question gets its answer: what the agent is told and what a late
        answer hears ("answered", "expired", "cancelled") are decided together, here."""
        question.future.set_result(answer)
        self._settled[request_id] = (question.kind, how)
        while len(self._settled) > SETTLED_KEPT:
            self._settled.popitem(last=False)

    def _find(self, request_id: str, kind: str) -> _Open:
        question = self._open.get(request_id)
        if question is not None and question.kind == kind and not question.future.done():
            return question
        shown = clip(request_id, 64)
        settled = self._settled.get(request_id)
        if settled is not None and settled[0] == kind:
            raise RequestAnswered(
                f"{kind} request {shown} was already {settled[1]}",
                metadata={"session_id": self.session_id, "request_id": shown, "state": settled[1]},
            )
        raise RequestNotFound(
            f"session {self.session_id} has no {kind} request {shown}",
            metadata={"session_id": self.session_id, "request_id": shown},
        )

    # ---- the agent's side ----------------------------------------------------------------

    async def _ask(
        self, turn: Turn, kind: str, make_item: Any, option_kinds: dict[str, str]
    ) -> tuple[str, Any]:
        """Put a question to the client: ("client", answer), ("timeout", None) or
        ("cancelled", None). Bounded by the turn's permission timeout."""
        if turn.ended or len(self._open) >= MAX_OPEN:
            if not turn.ended:
                log.warning("too many open questions session=%s; cancelling one", self.session_id)
            return "cancelled", None
        request_id = opaque_id(12)  # the CLI takes it as an argument: never "-..."
        timeout = turn.permission_timeout
        loop = asyncio.get_running_loop()
        question = _Open(kind, loop.create_future(), option_kinds)
        self._open[request_id] = question
        expiry = loop.call_later(timeout, self._expire, request_id)  # the future is the only truth
        turn.asking += 1
        try:
            turn.push(make_item(request_id, time.time() + timeout))
            answer = await question.future
            if answer is CANCELLED:
                return "cancelled", None
            if answer is EXPIRED:
                return "timeout", None
            return "client", answer
        finally:
            expiry.cancel()
            turn.asking -= 1
            turn.last_event_at = loop.time()  # the agent works again from now
            self._open.pop(request_id, None)
            if not question.future.done():  # we were cancelled (the agent's connection ended)
                self._settle(request_id, question, CANCELLED, "cancelled")


class TurnAsker:
    """The running turn's side of its session's questions: what the agent connection calls."""

    def __init__(self, questions: Questions, turn: Turn) -> None:
        self._questions = questions
        self._turn = turn

    def policy(self, default: str) -> str:
        return self._turn.permission_policy or default

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """While the agent waits on the gateway (a terminal command it runs for it), the turn's
        stall watchdog does not count; its clock restarts afterwards."""
        self._turn.asking += 1
        try:
            yield
        finally:
            self._turn.asking -= 1
            self._turn.last_event_at = asyncio.get_running_loop().time()

    async def permission(
        self, tool_call: schema.ToolCallUpdate, options: list[schema.PermissionOption], default: str
    ) -> Decision:
        policy = self.policy(default)
        if policy != "ask":
            return decide_by_policy(policy, tool_call.kind, options)
        if len(options) > MAX_OPTIONS or any(len(o.option_id) > MAX_OPTION_ID for o in options):
            log.warning("a permission request no client could answer (options too many or too long)")
            return Decision("cancelled", "", "cancelled")
        request_id = ""

        def item(rid: str, expire: float) -> PermissionAsk:
            nonlocal request_id
            request_id = rid
            return PermissionAsk(rid, tool_call, tuple(options), expire)

        kinds: dict[str, str] = {o.option_id: o.kind for o in options}
        how, answer = await self._questions._ask(self._turn, "permission", item, kinds)
        if how == "client":
            outcome = "allowed" if kinds[answer].startswith("allow") else "rejected"
            return Decision(outcome, answer, "client", request_id)
        if how == "timeout":
            reject = first_of_kind(options, ("reject_once", "reject_always"))
            if reject is not None:
                return Decision("rejected", reject, "timeout", request_id)
            return Decision("cancelled", "", "timeout", request_id)
        return Decision("cancelled", "", "cancelled", request_id)

    async def client_tool(self, tool: str, arguments: dict[str, Any]) -> ToolAnswer:
        """Put a call of a client tool to the client: its answer, or an error after the turn's
        permission timeout, or at once when the turn is cancelled or ends. The outcome goes into
        the turn's stream after the request."""
        request_id = ""

        def item(rid: str, expire: float) -> ToolAsk:
            nonlocal request_id
            request_id = rid
            return ToolAsk(rid, tool, arguments, expire)

        how, answer = await self._questions._ask(self._turn, "tool", item, {})
        if how == "client":
            result: ToolAnswer = answer
        elif how == "timeout":
            text = f"{tool}: the client did not answer within {self._turn.permission_timeout:g}s"
            result = ToolAnswer(text, None, True, "timeout")
        else:
            result = ToolAnswer(f"{tool}: cancelled (the turn ended)", None, True, "cancelled")
        if request_id:  # (a turn that ended takes nothing more: Turn.push)
            self._turn.push(ToolReport(request_id, tool, result.is_error, result.decided_by))
        return result

    async def elicitation(self, message: str, mode: Any, default: str) -> ElicitationAnswer:
        policy = self.policy(default)
        if policy != "ask":
            return ElicitationAnswer("decline", None, policy)
        url = str(getattr(mode, "url", None) or "")  # pydantic's AnyUrl, not a str
        requested = getattr(mode, "requested_schema", None)
        schema_json = (
            requested.model_dump(mode="json", by_alias=True, exclude_none=True)
            if requested is not None
            else None
        )
        if schema_json is not None and len(repr(schema_json)) > MAX_SCHEMA_BYTES:
            return ElicitationAnswer("decline", None, "too_large")
        request_id = ""

        def item(rid: str, expire: float) -> ElicitationAsk:
            nonlocal request_id
            request_id = rid
            return ElicitationAsk(
                request_id=rid,
                message=message,
                mode="url" if url else "form",
                requested_schema=schema_json,
                url=url,
                tool_call_id=getattr(mode, "tool_call_id", None) or "",
                expire_wall=expire,
            )

        how, answer = await self._questions._ask(self._turn, "elicitation", item, {})
        if how == "client":
            action, content = answer
            return ElicitationAnswer(action, content, "client", request_id)
        if how == "timeout":
            return ElicitationAnswer("decline", None, "timeout", request_id)
        return ElicitationAnswer("cancel", None, "cancelled", request_id)
