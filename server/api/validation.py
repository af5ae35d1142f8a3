"""Request validation: the bounds and shapes a request must have before anything acts on it.

Pure checks of the request (and of the limits and agents configured): each raises
InvalidArgument with one FieldViolation per problem found, so a client learns all of them at
once. What needs the file system or a session (a cwd's resolution, a turn's existence) is the
service's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2, json_format
from sessiongate.server.agents.state import MAX_ID
from sessiongate.server.errors import FieldViolation, InvalidArgument, clip
from sessiongate.server.settings import (
    ENV_NAME,
    MCP_NAME,
    PERMISSION_POLICIES,
    AgentConfig,
    McpServerConfig,
    ServerLimits,
)
from sessiongate.server.turns import translate
from sessiongate.server.turns.client_tools import MAX_TOOLS, SERVER_NAME, ClientToolSpec
from sessiongate.server.turns.questions import ToolAnswer
from sessiongate.v1 import session_service_pb2 as pb

MAX_REQUEST_ID = 128
MAX_MCP_SERVERS = 32  # names in one CreateSession
# Client-supplied MCP servers (CreateSession's client_mcp_servers): bounds of each part.
MAX_CLIENT_MCP_SERVERS = 8
MAX_MCP_COMMAND = 4096  # characters of a command, and of each argument
MAX_MCP_ARGS = 64
MAX_MCP_ENTRIES = 64  # env variables, or headers, of one server
MAX_MCP_KEY = 128  # characters of an env variable's or a header's name
MAX_MCP_VALUE = 8 * 1024  # UTF-8 bytes of an env or header value
MAX_MCP_URL = 2048
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
MAX_SESSION_ID = 128
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_NANOS = 999_999_999
MAX_CWD = 4096  # characters (PATH_MAX)
MAX_FILTER_NAME = 1024  # characters of ListSessions' agent and owner filters
MAX_TURN_ID = 64  # characters (ids are 16)
MAX_PAGE_TOKEN = 512  # characters of a ListTurns page token
ON_DISCONNECT_VALUES = frozenset(pb.OnDisconnect.values())  # once: values() makes a list per call
MAX_ANSWER_ID = 1024  # characters of a request id or option id in an answer (questions.MAX_OPTION_ID)
MAX_ELICITATION_CONTENT = 64 * 1024  # bytes of an elicitation answer's content
MAX_TOOL_DESCRIPTION = 4096  # characters of a client tool's description
MAX_TOOL_SCHEMA = 64 * 1024  # bytes of a client tool's input schema
MAX_TOOL_ANSWER = 1024 * 1024  # bytes of a RespondToolCall's result or error
ELICITATION_ACTIONS = {
    pb.ELICITATION_ACTION_ACCEPT: "accept",
    pb.ELICITATION_ACTION_DECLINE: "decline",
    pb.ELICITATION_ACTION_CANCEL: "cancel",
}


@dataclass(frozen=True)
class PromptOptions:
    """A valid Prompt's timeouts (seconds, clamped to the limits) and permission choices."""

    stall_timeout: float
    wait_timeout: float
    permission_policy: str
    permission_timeout: float | None


def raise_any(violations: list[FieldViolation]) -> None:
    """INVALID_ARGUMENT naming every violation, if there is one."""
    if violations:
        raise InvalidArgument(violations)


def create_session(
    request: pb.CreateSessionRequest,
    agent_name: str,
    agents: Mapping[str, AgentConfig],
    cwd_problem: str | None,
    mcp_servers: Mapping[str, McpServerConfig] | None = None,
) -> AgentConfig:
    """The agent a CreateSession names; `cwd_problem` is what resolving its cwd found; every
    name in its `mcp_servers` must be one of `mcp_servers` (the configured ones)."""
    violations = []
    config = agents.get(agent_name)
    if config is None:
        known = ", ".join(sorted(agents))
        violations.append(
            FieldViolation("agent", f"unknown agent {clip(agent_name, 100)!r} (configured: {known})")
        )
    if cwd_problem:
        violations.append(FieldViolation("cwd", cwd_problem))
    if len(request.request_id) > MAX_REQUEST_ID:
        violations.append(FieldViolation("request_id", f"at most {MAX_REQUEST_ID} characters"))
    violations.extend(label_violations(request.labels))
    if problem := mcp_servers_problem(request.mcp_servers, mcp_servers or {}):
        violations.append(FieldViolation("mcp_servers", problem))
    named = {*request.mcp_servers, *(config.mcp_servers if config is not None else ())}
    violations.extend(client_mcp_violations(request.client_mcp_servers, named))
    if request.client_tools:
        supplied = {server.name for server in request.client_mcp_servers}
        violations.extend(client_tool_violations(request.client_tools, named | supplied))
    raise_any(violations)
    assert config is not None
    return config


def mcp_servers_problem(names: Any, configured: Mapping[str, McpServerConfig]) -> str | None:
    """What is wrong with the MCP server names a CreateSession asks for, if anything."""
    if len(names) > MAX_MCP_SERVERS:
        return f"at most {MAX_MCP_SERVERS} names"
    unknown = [n for n in names if n not in configured]
    if unknown:
        known = ", ".join(sorted(configured)) or "none"
        return f"unknown MCP server {clip(unknown[0], 64)!r} (configured: {clip(known)})"
    return None


def client_mcp_violations(servers: Sequence[pb.McpServer], named: set[str]) -> list[FieldViolation]:
    """What is wrong with a CreateSession's client-supplied MCP servers: bounds and shapes only,
    in messages that never repeat a value (env and header values may be secrets)."""
    field = "client_mcp_servers"
    if len(servers) > MAX_CLIENT_MCP_SERVERS:
        return [FieldViolation(field, f"at most {MAX_CLIENT_MCP_SERVERS} servers")]
    violations = []
    seen = set(named)
    for index, server in enumerate(servers):
        where = f"{field}[{index}]"
        if not MCP_NAME.fullmatch(server.name):
            violations.append(
                FieldViolation(f"{where}.name", "a letter, then letters, digits, - or _ (at most 64)")
            )
        elif server.name in seen:
            violations.append(
                FieldViolation(f"{where}.name", "another MCP server of the session has this name")
            )
        seen.add(server.name)
        kind = server.WhichOneof("transport")
        if kind is None:
            violations.append(FieldViolation(where, "set one transport: stdio, http or sse"))
        elif kind == "stdio":
            violations.extend(_stdio_violations(f"{where}.stdio", server.stdio))
        else:
            violations.extend(_remote_violations(f"{where}.{kind}", getattr(server, kind)))
    return violations


def _stdio_violations(where: str, stdio: pb.McpStdio) -> list[FieldViolation]:
    violations = []
    if not stdio.command:
        violations.append(FieldViolation(f"{where}.command", "required"))
    elif len(stdio.command) > MAX_MCP_COMMAND or "\x00" in stdio.command:
        violations.append(FieldViolation(f"{where}.command", f"at most {MAX_MCP_COMMAND} characters, no NUL"))
    if len(stdio.args) > MAX_MCP_ARGS:
        violations.append(FieldViolation(f"{where}.args", f"at most {MAX_MCP_ARGS} arguments"))
    elif any(len(a) > MAX_MCP_COMMAND or "\x00" in a for a in stdio.args):
        violations.append(
            FieldViolation(f"{where}.args", f"each at most {MAX_MCP_COMMAND} characters, no NUL")
        )
    violations.extend(_entries_violations(f"{where}.env", stdio.env, ENV_NAME, "\x00"))
    return violations


def _remote_violations(where: str, remote: pb.McpRemote) -> list[FieldViolation]:
    violations = []
    url = remote.url
    if (
        len(url) > MAX_MCP_URL
        or not url.startswith(("http://", "https://"))
        or len(url.split("://", 1)[1]) == 0
    ):
        violations.append(
            FieldViolation(f"{where}.url", f"an http:// or https:// URL of at most {MAX_MCP_URL} characters")
        )
    elif any(c.isspace() or ord(c) < 0x20 for c in url):
        violations.append(FieldViolation(f"{where}.url", "no spaces or control characters"))
    violations.extend(_entries_violations(f"{where}.headers", remote.headers, HEADER_NAME, "\x00\r\n"))
    return violations


def _entries_violations(
    where: str, entries: Mapping[str, str], key_pattern: re.Pattern[str], banned: str
) -> list[FieldViolation]:
    """An env's or headers' bounds: count, names of `key_pattern`, values' size and characters."""
    if len(entries) > MAX_MCP_ENTRIES:
        return [FieldViolation(where, f"at most {MAX_MCP_ENTRIES} entries")]
    violations = []
    if any(len(k) > MAX_MCP_KEY or not key_pattern.fullmatch(k) for k in entries):
        violations.append(
            FieldViolation(where, f"a name is not valid here (at most {MAX_MCP_KEY} characters)")
        )
    if any(len(v.encode()) > MAX_MCP_VALUE or any(c in v for c in banned) for v in entries.values()):
        violations.append(
            FieldViolation(
                where, f"a value is too long (at most {MAX_MCP_VALUE} bytes) or has a forbidden character"
            )
        )
    return violations


def client_tool_violations(tools: Sequence[pb.ClientTool], servers: set[str]) -> list[FieldViolation]:
    """What is wrong with a CreateSession's client tools: bounds, names, schemas; and an MCP
    server of the session (`servers`) that takes the name their server needs."""
    field = "client_tools"
    if len(tools) > MAX_TOOLS:
        return [FieldViolation(field, f"at most {MAX_TOOLS} tools")]
    violations = []
    if SERVER_NAME in servers:
        problem = f"another MCP server of the session is named {SERVER_NAME!r}, the name their server takes"
        violations.append(FieldViolation(field, problem))
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"{field}[{index}]"
        if not MCP_NAME.fullmatch(tool.name):
            problem = "a letter, then letters, digits, - or _ (at most 64)"
            violations.append(FieldViolation(f"{where}.name", problem))
        elif tool.name in seen:
            violations.append(FieldViolation(f"{where}.name", "another client tool has this name"))
        seen.add(tool.name)
        if len(tool.description) > MAX_TOOL_DESCRIPTION:
            problem = f"at most {MAX_TOOL_DESCRIPTION} characters"
            violations.append(FieldViolation(f"{where}.description", problem))
        if schema_problem := _schema_problem(tool):
            violations.append(FieldViolation(f"{where}.input_schema", schema_problem))
    return violations


def _schema_problem(tool: pb.ClientTool) -> str | None:
    if not tool.HasField("input_schema"):
        return None
    if tool.input_schema.ByteSize() > MAX_TOOL_SCHEMA:
        return f"at most {MAX_TOOL_SCHEMA} bytes"
    kind = tool.input_schema.fields.get("type")
    if kind is not None and kind.string_value != "object":
        return 'an object schema ("type": "object")'
    return None


def client_tool_specs(tools: Sequence[pb.ClientTool]) -> tuple[ClientToolSpec, ...]:
    """Valid client tools (see client_tool_violations) as the session keeps them."""
    return tuple(
        ClientToolSpec(
            tool.name,
            tool.description,
            json_format.MessageToDict(tool.input_schema) if tool.HasField("input_schema") else None,
        )
        for tool in tools
    )


def tool_answer(request: pb.RespondToolCallRequest) -> ToolAnswer:
    """A RespondToolCall's answer as the agent gets it: required, bounded."""
    check_answer_ids(request.request_id)
    kind = request.WhichOneof("answer")
    if kind is None:
        raise InvalidArgument.field("answer", "set result or error")
    if kind == "error":
        if len(request.error.encode()) > MAX_TOOL_ANSWER:
            raise InvalidArgument.field("error", f"at most {MAX_TOOL_ANSWER} bytes")
        return ToolAnswer(request.error, None, True, "client")
    if request.result.ByteSize() > MAX_TOOL_ANSWER:
        raise InvalidArgument.field("result", f"at most {MAX_TOOL_ANSWER} bytes")
    structured = (
        json_format.MessageToDict(request.result.structured)
        if request.result.HasField("structured")
        else None
    )
    return ToolAnswer(request.result.text, structured, False, "client")


def client_mcp_configs(servers: Sequence[pb.McpServer]) -> tuple[McpServerConfig, ...]:
    """Valid client-supplied servers (see client_mcp_violations) as the agent will be given them."""
    found = []
    for server in servers:
        kind = server.WhichOneof("transport")
        if kind == "stdio":
            stdio = server.stdio
            found.append(
                McpServerConfig(
                    server.name, "stdio", command=stdio.command, args=tuple(stdio.args), env=dict(stdio.env)
                )
            )
        else:
            remote = getattr(server, str(kind))
            found.append(
                McpServerConfig(server.name, str(kind), url=remote.url, headers=dict(remote.headers))
            )
    return tuple(found)


def cwd_problem(requested: str) -> str | None:
    """What is wrong with a requested cwd before the file system is asked."""
    if "\x00" in requested:
        return "must not contain NUL"
    if len(requested) > MAX_CWD:
        return f"at most {MAX_CWD} characters"
    return None


def prompt(request: pb.PromptRequest, limits: ServerLimits) -> PromptOptions:
    violations = []
    if not request.session_id:
        violations.append(FieldViolation("session_id", "required"))
    elif id_problem := session_id_problem(request.session_id):
        violations.append(FieldViolation("session_id", id_problem))
    if not request.text and not request.content:
        violations.append(FieldViolation("text", "the prompt is empty: set text and/or content"))
    for index, block in enumerate(request.content):
        problem = translate.block_problem(block)
        if problem:
            violations.append(FieldViolation(f"content[{index}]", problem))
    size = len(request.text.encode()) + sum(translate.content_size(b) for b in request.content)
    if size > limits.max_prompt_bytes:
        violations.append(
            FieldViolation("content", f"the prompt is {size} bytes; the limit is {limits.max_prompt_bytes}")
        )
    stall = _clamped(request, "stall_timeout", limits.max_stall_timeout, violations)
    wait = _clamped(request, "wait_timeout", limits.max_wait_timeout, violations, allow_zero=True)
    permission_timeout = _clamped(request, "permission_timeout", limits.max_permission_timeout, violations)
    if request.on_disconnect not in ON_DISCONNECT_VALUES:
        violations.append(
            FieldViolation("on_disconnect", "must be ON_DISCONNECT_CANCEL or ON_DISCONNECT_CONTINUE")
        )
    policy = request.permission_policy
    if policy and policy not in PERMISSION_POLICIES:
        violations.append(
            FieldViolation("permission_policy", "must be empty or one of " + ", ".join(PERMISSION_POLICIES))
        )
    raise_any(violations)
    return PromptOptions(
        stall_timeout=limits.stall_timeout if stall is None else stall,
        wait_timeout=wait or 0.0,
        permission_policy=policy,
        permission_timeout=permission_timeout,
    )


def list_turns(request: pb.ListTurnsRequest) -> None:
    violations = []
    if request.page_size < 0:
        violations.append(FieldViolation("page_size", "must not be negative"))
    if len(request.page_token) > MAX_PAGE_TOKEN:
        violations.append(FieldViolation("page_token", "not a token from ListTurns"))
    raise_any(violations)


def list_sessions(request: pb.ListSessionsRequest) -> None:
    violations = label_violations(request.labels)  # lengths first: nothing unbounded is echoed
    if request.page_size < 0:
        violations.append(FieldViolation("page_size", "must not be negative"))
    for name, value in (("agent", request.agent), ("owner", request.owner)):
        if len(value) > MAX_FILTER_NAME:
            violations.append(FieldViolation(name, f"at most {MAX_FILTER_NAME} characters"))
    raise_any(violations)


def authenticate_agent(
    request: pb.AuthenticateAgentRequest, agent_name: str, agents: Mapping[str, AgentConfig]
) -> AgentConfig:
    """The agent an AuthenticateAgent names, with a method id to log in with."""
    config = agents.get(agent_name)
    violations = []
    if config is None:
        violations.append(FieldViolation("agent", f"unknown agent {clip(agent_name, 100)!r}"))
    if not request.method_id:
        violations.append(FieldViolation("method_id", "required (AGENT_AUTH_REQUIRED lists the methods)"))
    elif len(request.method_id) > MAX_ANSWER_ID:
        violations.append(FieldViolation("method_id", f"at most {MAX_ANSWER_ID} characters"))
    raise_any(violations)
    assert config is not None
    return config


def elicitation_action(request: pb.RespondElicitationRequest) -> str:
    """The action of an elicitation answer ("accept", "decline", "cancel"), its content checked."""
    check_answer_ids(request.request_id)
    action = ELICITATION_ACTIONS.get(request.action)
    if action is None:
        raise InvalidArgument.field("action", "must be ACCEPT, DECLINE or CANCEL")
    if request.HasField("content") and action != "accept":
        raise InvalidArgument.field("content", "only an ACCEPT answer carries content")
    if request.content.ByteSize() > MAX_ELICITATION_CONTENT:
        raise InvalidArgument.field("content", f"at most {MAX_ELICITATION_CONTENT} bytes")
    return action


def check_answer_ids(request_id: str, *others: tuple[str, str]) -> None:
    """A question's request id, and the other ids an answer names: required and bounded."""
    violations = []
    for name, value in (("request_id", request_id), *others):
        if not value:
            violations.append(FieldViolation(name, "required"))
        elif len(value) > MAX_ANSWER_ID:
            violations.append(FieldViolation(name, f"at most {MAX_ANSWER_ID} characters"))
    raise_any(violations)


def check_state_ids(*fields: tuple[str, str]) -> None:
    """A mode id, config option id or value: required, and no longer than any an agent can offer."""
    violations = []
    for name, value in fields:
        if not value:
            violations.append(FieldViolation(name, "required"))
        elif len(value.encode()) > MAX_ID:
            violations.append(FieldViolation(name, f"at most {MAX_ID} bytes"))
    raise_any(violations)


def check_turn_id(turn_id: str, *, required: bool) -> None:
    if required and not turn_id:
        raise InvalidArgument.field("turn_id", "required (see ListTurns)")
    if len(turn_id) > MAX_TURN_ID:
        raise InvalidArgument.field("turn_id", f"at most {MAX_TURN_ID} characters (ids are 16)")


def required_id(session_id: str) -> str:
    """`session_id`, present and bounded."""
    problem = session_id_problem(session_id)
    if problem:
        raise InvalidArgument.field("session_id", problem)
    return session_id


def session_id_problem(session_id: str) -> str:
    if not session_id:
        return "required"
    if len(session_id) > MAX_SESSION_ID:
        return f"at most {MAX_SESSION_ID} characters (ids are 24)"
    return ""


def label_violations(labels: Any) -> list[FieldViolation]:
    out = []
    if len(labels) > MAX_LABELS:
        out.append(FieldViolation("labels", f"at most {MAX_LABELS} labels"))
    for key, value in labels.items():
        where = f"labels[{clip(key, MAX_LABEL_KEY)!r}]"
        if not key or len(key) > MAX_LABEL_KEY:
            out.append(FieldViolation(where, f"keys must be 1 to {MAX_LABEL_KEY} characters"))
        if len(value) > MAX_LABEL_VALUE:
            out.append(FieldViolation(where, f"values must be at most {MAX_LABEL_VALUE} characters"))
    return out


def _clamped(
    request: Any, name: str, maximum: float, violations: list[FieldViolation], allow_zero: bool = False
) -> float | None:
    """A request's optional Duration field in seconds, clamped to `maximum`; None when unset or
    malformed (then a violation says why)."""
    if not request.HasField(name):
        return None
    seconds, problem = _duration(getattr(request, name), allow_zero=allow_zero)
    if problem:
        violations.append(FieldViolation(name, problem))
        return None
    return min(seconds, maximum)


def _duration(value: duration_pb2.Duration, *, allow_zero: bool) -> tuple[float, str | None]:
    """Seconds of a Duration, or why it is malformed."""
    if abs(value.nanos) > MAX_NANOS or (
        value.seconds and value.nanos and (value.seconds > 0) != (value.nanos > 0)
    ):
        return 0.0, "malformed duration: nanos must be within ±999999999 and share the sign of seconds"
    seconds = value.seconds + value.nanos / 1e9
    if seconds < 0 or (seconds == 0 and not allow_zero):
        return 0.0, "must be positive" if not allow_zero else "must not be negative"
    return seconds, None
