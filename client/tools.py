"""Client tools: functions of the client's own that its session's agent calls (issue 23, part 2).

`Tool(name, handler, description, input_schema)` declares one (CreateSession's `client_tools`);
the gateway serves the session's tools to the agent as the MCP server `client_tools`, and each
call of one reaches the client as a `tool_request` event, answered with RespondToolCall.
`ServedTools` is what a client object remembers: the handlers of the sessions it created with
tools, and which calls it took, so the clients' turn streams answer those calls for you.
`load_tools` reads the CLI's `--client-tools` JSON file (declarations only, no handlers).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf import json_format
from sessiongate.v1 import session_service_pb2 as pb

# What a handler returns: text for the model, a JSON object (structured content, also sent as
# its JSON text), None (an empty text result); another JSON value is sent as its JSON text.
# An async client's handler may be async.
ToolValue: TypeAlias = str | Mapping[str, Any] | int | float | bool | list[Any] | None
ToolHandler: TypeAlias = Callable[[dict[str, Any]], ToolValue | Awaitable[ToolValue]]

ERROR_SHOWN = 1000  # characters of a handler's exception message the agent gets
REFUSAL_SHOWN = 300  # characters of the gateway's reason when it refuses a handler's result
TAKEN_KEPT = 4096  # tool calls a client remembers having taken (a re-attach may show them again)


@dataclass(frozen=True)
class Tool:
    """A tool the client serves its session's agent: `name` (a letter, then letters, digits, - or
    _), `description` for the model, `input_schema` (a JSON Schema object; None: any object),
    and `handler(input: dict)`, the Python callable that answers its calls (None: you answer
    them yourself, e.g. from another connection with `respond_tool_call`)."""

    name: str
    handler: ToolHandler | None = None
    description: str = ""
    input_schema: Mapping[str, Any] | None = None

    def proto(self) -> pb.ClientTool:
        tool = pb.ClientTool(name=self.name, description=self.description)
        if self.input_schema is not None:
            tool.input_schema.update(dict(self.input_schema))
        return tool


ClientToolDeclaration: TypeAlias = Tool | pb.ClientTool


def proto_tools(tools: Iterable[ClientToolDeclaration]) -> list[pb.ClientTool]:
    """CreateSession's `client_tools` from `Tool`s (or `pb.ClientTool`s, passed as they are)."""
    if isinstance(tools, (str, Tool)):  # one tool passed bare
        raise TypeError("client_tools takes a list of tools")
    messages = []
    for tool in tools:
        if not isinstance(tool, (Tool, pb.ClientTool)):
            raise TypeError(f"client_tools takes Tool or pb.ClientTool items, not {type(tool).__name__}")
        messages.append(tool.proto() if isinstance(tool, Tool) else tool)
    return messages


def tool_input(request: pb.ToolRequest) -> dict[str, Any]:
    """The call's arguments as a plain dict; whole numbers as ints (a Struct keeps only floats,
    so the agent's {"a": 2} would otherwise arrive as 2.0)."""
    return {key: _plain(value) for key, value in json_format.MessageToDict(request.input).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def respond_tool_call_request(
    session_id: str, request_id: str, result: ToolValue = None, error: str | None = None
) -> pb.RespondToolCallRequest:
    """The RespondToolCall answer: `error` (the tool failed, with this text), else `result`."""
    request = pb.RespondToolCallRequest(session_id=session_id, request_id=request_id)
    if error is not None:
        if result is not None:
            raise ValueError("a tool call is answered with a result or an error, not both")
        request.error = error
    else:
        request.result.CopyFrom(tool_result(result))
    return request


def tool_result(value: object) -> pb.ToolResult:
    """A handler's return value as a ToolResult: a str as text, a dict as structured content
    and its JSON text, None as an empty text, another JSON value (5, [1, 2]) as its JSON text."""
    if value is None:
        return pb.ToolResult()
    if isinstance(value, str):
        return pb.ToolResult(text=value)
    if isinstance(value, Mapping):
        result = pb.ToolResult(text=json.dumps(dict(value)))
        result.structured.update(dict(value))
        return result
    try:  # a number, a list, a bool: its JSON text
        return pb.ToolResult(text=json.dumps(value))
    except (TypeError, ValueError):
        kind = type(value).__name__
        raise TypeError(f"a tool's result is a str, a dict or a JSON value, not {kind}") from None


def failure_text(error: BaseException) -> str:
    """What the agent gets when a handler raised: its type and (clipped) message."""
    message = str(error)
    if len(message) > ERROR_SHOWN:
        message = message[: ERROR_SHOWN - 1] + "…"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def answered(session_id: str, request: pb.ToolRequest, value: object) -> pb.RespondToolCallRequest:
    """The answer for a handler's return value; one that is no str, dict or JSON-able dict is
    the agent's error (a bad return value of the handler never ends the stream)."""
    try:
        return pb.RespondToolCallRequest(
            session_id=session_id, request_id=request.request_id, result=tool_result(value)
        )
    except (TypeError, ValueError) as error:
        return failed(session_id, request, error)


def failed(session_id: str, request: pb.ToolRequest, error: BaseException) -> pb.RespondToolCallRequest:
    return respond_tool_call_request(session_id, request.request_id, error=failure_text(error))


def refused(answer: pb.RespondToolCallRequest, message: str) -> pb.RespondToolCallRequest | None:
    """The error to send instead of a handler's result the gateway refused (INVALID_ARGUMENT:
    too large), so the agent is not left waiting; None when `answer` was an error already."""
    if answer.WhichOneof("answer") == "error":
        return None
    shown = message if len(message) <= REFUSAL_SHOWN else message[: REFUSAL_SHOWN - 1] + "…"
    return respond_tool_call_request(
        answer.session_id, answer.request_id, error=f"the tool's result was refused: {shown}"
    )


class ServedTools:
    """The tool handlers a client object serves, by session, and the calls it took: each
    `tool_request` of a known tool is taken once, even when a re-attach or a second stream of
    the same turn shows it again."""

    def __init__(self) -> None:
        self._handlers: dict[str, dict[str, ToolHandler]] = {}
        self._taken: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()  # a blocking client may stream turns from several threads

    def remember(self, session_id: str, tools: Iterable[ClientToolDeclaration]) -> None:
        """Serve the handlers of `tools` (those that have one) for `session_id`."""
        handlers = {t.name: t.handler for t in tools if isinstance(t, Tool) and t.handler is not None}
        with self._lock:
            if handlers:
                self._handlers.setdefault(session_id, {}).update(handlers)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._handlers.pop(session_id, None)

    def take(self, session_id: str, event: pb.PromptEvent) -> tuple[ToolHandler, pb.ToolRequest] | None:
        """The handler that answers `event` and its request; None when the event is no tool
        call, the tool is not served here (another connection may answer it), or the call was
        taken already."""
        if event.WhichOneof("event") != "tool_request":
            return None
        request = event.tool_request
        with self._lock:
            handler = self._handlers.get(session_id, {}).get(request.tool)
            key = (session_id, request.request_id)
            if handler is None or key in self._taken:
                return None
            self._taken[key] = None
            if len(self._taken) > TAKEN_KEPT:
                self._taken.popitem(last=False)
        return handler, request


class ToolsFileError(ValueError):
    """A `--client-tools` file that cannot be used: which file and tool, never more of its text."""


def load_tools(path: str | Path) -> list[Tool]:
    """The tools a JSON file declares: `[{"name": ..., "description": ..., "input_schema":
    {...}}, ...]`, without handlers (their calls are answered with `respond_tool_call`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ToolsFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ToolsFileError(f"{path}: not JSON ({type(error).__name__})") from None
    if not isinstance(data, list):
        raise ToolsFileError(f"{path}: a JSON list of tools is expected")
    tools = []
    for index, item in enumerate(data):
        where = f"{path}: tool [{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ToolsFileError(f"{where}: an object with a string name is expected")
        unknown = sorted(set(item) - {"name", "description", "input_schema"})
        if unknown:
            raise ToolsFileError(f"{where}: unknown keys {', '.join(map(repr, unknown))}")
        description, schema = item.get("description", ""), item.get("input_schema")
        if not isinstance(description, str):
            raise ToolsFileError(f"{where}: description must be a string")
        if schema is not None and not isinstance(schema, dict):
            raise ToolsFileError(f"{where}: input_schema must be a JSON object")
        tools.append(Tool(item["name"], description=description, input_schema=schema))
    return tools
