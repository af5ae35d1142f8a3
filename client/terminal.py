"""Answering the agent's questions on a terminal, for `sessiongate prompt` under `ask`.

A permission request shows its tool call and numbered options and reads the choice; an
elicitation shows its message and asks for each property of its schema (string, number,
integer, boolean, or one of an enum), or is declined or cancelled. Questions and prompts go
to stderr so that stdout stays the turn's output; answers are read from stdin. Every line
shown is `printable`: no control character the agent put in a title, an option's name, a
message or a schema reaches the terminal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from google.protobuf import json_format
from sessiongate.client._common import ElicitationAnswer
from sessiongate.client.render import printable, tool_call_label
from sessiongate.v1 import session_service_pb2 as pb

YES, NO = ("y", "yes", "true", "1"), ("n", "no", "false", "0")


class EndOfInput(Exception):
    """Standard input ended (Ctrl-D) while a question waited for an answer."""


class TerminalAsker:
    """`on_permission` / `on_elicitation` callbacks that ask the person at the terminal.

    `before` runs before anything is written (the renderer ends its line there);
    `show_question`: also print what is asked (when no renderer printed the event).
    """

    def __init__(
        self,
        stdin: TextIO,
        out: TextIO,
        *,
        before: Callable[[], None] = lambda: None,
        show_question: bool = False,
    ) -> None:
        self._stdin = stdin
        self._out = out
        self._before = before
        self._show_question = show_question

    # ---- permission requests -------------------------------------------------------------

    def permission(self, request: pb.PermissionRequest) -> str | None:
        self._before()
        if self._show_question:
            self._say(f"? permission requested: {tool_call_label(request.tool_call)}")
        options = list(request.options)
        for number, option in enumerate(options, 1):
            kind = f" ({option.kind})" if option.kind else ""
            self._say(f"  {number}) {option.name or option.option_id}{kind}")
        if not options:
            return None
        while True:
            try:
                answer = self._ask(f"choose 1-{len(options)}{_expires(request.expire_time.seconds)}: ")
            except EndOfInput:
                reject = next((o for o in options if o.kind.startswith("reject")), None)
                fallback = f"choosing {reject.name or reject.option_id}" if reject else "none chosen"
                self._say(f"no answer: {fallback}")
                return reject.option_id if reject else None
            chosen = _pick(answer, options)
            if chosen is not None:
                return chosen.option_id
            self._say(f"answer with a number from 1 to {len(options)}")

    # ---- elicitations --------------------------------------------------------------------

    def elicitation(self, request: pb.ElicitationRequest) -> ElicitationAnswer:
        self._before()
        if self._show_question:
            self._say(f"? input requested: {request.message}")
        try:
            if request.mode == "url":
                self._say(f"  open {request.url}")
                return self._action("done? [y]es (accept) / [n]o (decline) / [c]ancel: ")
            action = self._action("answer? [y]es / [n]o (decline) / [c]ancel: ")
            if action != "accept":
                return action
            schema = json_format.MessageToDict(request.requested_schema)
            properties = dict(schema.get("properties") or {})
            # A Struct keeps no key order: the required properties first, in the schema's
            # `required` order (a list keeps it), then the others by name.
            required = [name for name in schema.get("required") or [] if name in properties]
            content: dict[str, Any] = {}
            for name in [*required, *sorted(set(properties) - set(required))]:
                spec = properties[name]
                value = self._value(name, spec if isinstance(spec, dict) else {}, name in required)
                if value is not None:
                    content[name] = value
            return content
        except EndOfInput:
            self._say("no answer: cancelled")
            return "cancel"

    def _action(self, question: str) -> str:
        while True:
            answer = self._ask(question).lower()
            if answer in ("", "y", "yes", "a", "accept"):
                return "accept"
            if answer in ("n", "no", "d", "decline"):
                return "decline"
            if answer in ("c", "cancel"):
                return "cancel"
            self._say("answer y, n or c")

    def _value(self, name: str, spec: dict[str, Any], required: bool) -> Any:
        """Ask for one property; None leaves an optional one out."""
        kind = spec.get("type", "string")
        label = spec.get("title") or name
        notes = [str(spec["description"])] if spec.get("description") else []
        choices = _choices(spec)
        default = spec.get("default")
        if choices:
            for number, (_, title) in enumerate(choices, 1):
                notes.append(f"{number}) {title}")
        elif kind in ("number", "integer", "boolean"):
            notes.append(kind if kind != "boolean" else "y/n")
        if default is not None:
            notes.append(f"default {json.dumps(default)}")
        if not required:
            notes.append("optional")
        details = f" ({'; '.join(notes)})" if notes else ""
        question = f"  {label}{details}: "
        while True:
            answer = self._ask(question)
            if not answer:
                if default is not None:
                    return default
                if not required:
                    return None
                self._say("  an answer is required")
                continue
            try:
                return _parse(answer, kind, choices)
            except ValueError as why:
                self._say(f"  {why}")

    # ---- terminal ------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self._out.write(printable(text) + "\n")
        self._out.flush()

    def _ask(self, question: str) -> str:
        self._out.write(printable(question))
        self._out.flush()
        line = self._stdin.readline()
        if not line:
            self._out.write("\n")
            raise EndOfInput
        return line.strip()


def _pick(answer: str, options: list[pb.PermissionOption]) -> pb.PermissionOption | None:
    if answer.isdigit() and 1 <= int(answer) <= len(options):
        return options[int(answer) - 1]
    lowered = answer.lower()
    return next((o for o in options if lowered and lowered in (o.option_id.lower(), o.name.lower())), None)


def _choices(spec: dict[str, Any]) -> list[tuple[Any, str]]:
    """An enum's (value, title) pairs: `enum` (with `enumNames`), or `oneOf` of consts."""
    if isinstance(spec.get("enum"), list):
        names = spec.get("enumNames") or []
        return [(v, str(names[i]) if i < len(names) else str(v)) for i, v in enumerate(spec["enum"])]
    one_of = spec.get("oneOf") or spec.get("anyOf")
    if isinstance(one_of, list) and all(isinstance(o, dict) and "const" in o for o in one_of):
        return [(o["const"], str(o.get("title", o["const"]))) for o in one_of]
    return []


def _parse(answer: str, kind: str, choices: list[tuple[Any, str]]) -> Any:
    if choices:
        if answer.isdigit() and 1 <= int(answer) <= len(choices):
            return choices[int(answer) - 1][0]
        for value, title in choices:
            if answer in (str(value), title):
                return value
        raise ValueError(f"answer with a number from 1 to {len(choices)}")
    if kind == "boolean":
        if answer.lower() in YES:
            return True
        if answer.lower() in NO:
            return False
        raise ValueError("answer y or n")
    if kind == "integer":
        try:
            return int(answer)
        except ValueError:
            raise ValueError("a whole number, please") from None
    if kind == "number":
        try:
            number = float(answer)
        except ValueError:
            raise ValueError("a number, please") from None
        return int(number) if number.is_integer() else number
    if kind in ("array", "object"):
        try:
            return json.loads(answer)
        except json.JSONDecodeError:
            raise ValueError(f"a JSON {kind}, please") from None
    return answer


def _expires(expire_seconds: int) -> str:
    left = int(expire_seconds - time.time()) if expire_seconds else 0
    return f" (within {left}s)" if left > 0 else ""


def decline(_: pb.ElicitationRequest) -> ElicitationAnswer:
    """Off a terminal nobody can answer an elicitation: decline it."""
    return "decline"
