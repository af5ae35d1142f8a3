"""Translation between the gRPC contract and ACP: prompt content in, turn events out.

Pure functions, no I/O: the service calls them, the session never sees protobufs.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from typing import Any

from acp import schema
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from sessiongate.server.agents import state as agent_state
from sessiongate.server.agents.protocol import ElicitationReport, PermissionReport
from sessiongate.server.agents.transport import RawUpdate
from sessiongate.server.errors import clip
from sessiongate.server.sandbox.files import FileWriteReport
from sessiongate.server.sandbox.terminals import TerminalReport
from sessiongate.server.turns.questions import ElicitationAsk, PermissionAsk, ToolAsk, ToolReport
from sessiongate.server.turns.turn import Notice, TextRun, TurnEnd
from sessiongate.v1 import session_service_pb2 as pb

log = logging.getLogger("sessiongate.translate")

STOP_REASONS = {
    "end_turn": pb.STOP_REASON_END_TURN,
    "max_tokens": pb.STOP_REASON_MAX_TOKENS,
    "max_turn_requests": pb.STOP_REASON_MAX_TURN_REQUESTS,
    "refusal": pb.STOP_REASON_REFUSAL,
    "cancelled": pb.STOP_REASON_CANCELLED,
}
TOOL_STATUSES = {
    "pending": pb.TOOL_CALL_STATUS_PENDING,
    "in_progress": pb.TOOL_CALL_STATUS_IN_PROGRESS,
    "completed": pb.TOOL_CALL_STATUS_COMPLETED,
    "failed": pb.TOOL_CALL_STATUS_FAILED,
}
ELICITATION_ACTIONS = {
    "accept": pb.ELICITATION_ACTION_ACCEPT,
    "decline": pb.ELICITATION_ACTION_DECLINE,
    "cancel": pb.ELICITATION_ACTION_CANCEL,
}
PERMISSION_OUTCOMES = {
    "allowed": pb.PERMISSION_OUTCOME_ALLOWED,
    "rejected": pb.PERMISSION_OUTCOME_REJECTED,
    "cancelled": pb.PERMISSION_OUTCOME_CANCELLED,
}


# ---- prompt content: proto -> ACP ----------------------------------------------------------


def content_size(block: pb.ContentBlock) -> int:
    """Bytes a block contributes to the prompt-size limit."""
    return block.ByteSize()


def prompt_json(text: str, content: Iterable[pb.ContentBlock]) -> list[dict[str, Any]]:
    """A prompt (its text, then its content) as the agent receives it: ACP content blocks as
    JSON, in the wire form the SDK's models dump to (tests/test_prompt_json.py). Text needs no
    model; the other kinds are built by the schema's models, which check them, then dumped."""
    blocks = [_text_json(text)] if text else []
    for block in content:
        if block.WhichOneof("block") == "text":
            blocks.append(_text_json(block.text.text))
        else:  # as the SDK's serialize_params dumps a request
            dumped = _acp_model(block).model_dump(
                mode="json", by_alias=True, exclude_none=True, exclude_defaults=True
            )
            blocks.append(dumped)
    return blocks


def _text_json(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _acp_model(block: pb.ContentBlock) -> Any:
    """A proto ContentBlock that is not text as the ACP schema's model. The caller has validated it."""
    kind = block.WhichOneof("block")
    if kind == "image":
        image = block.image
        return schema.ImageContentBlock(
            type="image",
            data=base64.b64encode(image.data).decode(),
            mime_type=image.mime_type,
            uri=image.uri or None,
        )
    if kind == "resource_link":
        link = block.resource_link
        return schema.ResourceContentBlock(
            type="resource_link",
            uri=link.uri,
            name=link.name,
            mime_type=link.mime_type or None,
            title=link.title or None,
            description=link.description or None,
            size=link.size or None,
        )
    resource = block.resource
    contents: Any
    if resource.WhichOneof("contents") == "blob":
        contents = schema.BlobResourceContents(
            uri=resource.uri,
            blob=base64.b64encode(resource.blob).decode(),
            mime_type=resource.mime_type or None,
        )
    else:
        contents = schema.TextResourceContents(
            uri=resource.uri, text=resource.text, mime_type=resource.mime_type or None
        )
    return schema.EmbeddedResourceContentBlock(type="resource", resource=contents)


def block_problem(block: pb.ContentBlock) -> str | None:
    """Why a content block is unusable, or None when it is fine."""
    kind = block.WhichOneof("block")
    if kind is None:
        return "a content block must set one of text, image, resource_link, resource"
    if kind == "image" and (not block.image.data or not block.image.mime_type):
        return "an image needs data and mime_type"
    if kind == "resource_link" and (not block.resource_link.uri or not block.resource_link.name):
        return "a resource link needs uri and name"
    if kind == "resource" and (not block.resource.uri or block.resource.WhichOneof("contents") is None):
        return "an embedded resource needs uri and text or blob"
    return None


# ---- turn events: ACP -> proto ---------------------------------------------------------

MAX_JSON_DEPTH = 20  # JSON an agent sends is carried this deep (each level is ~3 protobuf levels
# of the 100 a message may have); deeper parts become a marker
DEEP_MARKER = f"[cut: nested deeper than {MAX_JSON_DEPTH} levels]"


def events(seq: int, item: Any, max_bytes: int) -> list[pb.PromptEvent]:
    """`item` as the event(s) a client gets, numbered from `seq`: the event, cut to fit
    `max_bytes` and to the depth a protobuf can carry, followed by a `notice` when it was cut.
    One bad update never ends a turn: what cannot be carried is replaced, and said so."""
    event, cut = _bounded_event(seq, item)
    if event.ByteSize() > max_bytes:
        size = event.ByteSize()
        event = _fit(event, max_bytes)
        cut.append(f"a {_kind(item)} update of {size} bytes was cut to fit max_event_bytes ({max_bytes})")
    if not cut:
        return [event]
    notice = pb.Notice(kind="event_truncated", message="; ".join(cut))
    return [event, pb.PromptEvent(seq=seq + 1, notice=notice)]


def _bounded_event(seq: int, item: Any) -> tuple[pb.PromptEvent, list[str]]:
    try:
        return to_event(seq, item), []
    except DeepJson:
        return to_event(seq, item, bounded=True), [
            f"a {_kind(item)} update nested deeper than {MAX_JSON_DEPTH} levels was cut"
        ]
    except (TypeError, ValueError) as exc:  # a value protobuf refuses (a bug here, or a strange agent)
        log.warning("an update could not be carried kind=%s: %s", _kind(item), clip(str(exc)))
        dropped = pb.Notice(kind="event_dropped", message=f"a {_kind(item)} update could not be carried")
        return pb.PromptEvent(seq=seq, notice=dropped), []


class DeepJson(Exception):
    """JSON nested deeper than MAX_JSON_DEPTH (protobuf's own limit is 100, and a whole
    message counts): carried only up to the marker."""


def _fit(event: pb.PromptEvent, max_bytes: int) -> pb.PromptEvent:
    """`event` without what made it too large: raw tool input/output, tool content, payloads,
    schemas, long names. Whatever is still too large is replaced by the marker alone, except a
    question: its request id and options always reach the client, so it can be answered."""
    marker = struct_pb2.Value(string_value=f"[cut: over max_event_bytes ({max_bytes})]")
    which = event.WhichOneof("event")
    if which in ("tool_call", "tool_call_update"):
        _fit_tool_call(getattr(event, which), marker, event, max_bytes)
    elif which == "permission_request":
        request = event.permission_request
        _fit_tool_call(request.tool_call, marker, event, max_bytes)
        for option in request.options:
            option.name = option.name[:MAX_FITTED_NAME]
    elif which == "permission":
        event.permission.title = event.permission.title[:MAX_FITTED_NAME]
        for option in event.permission.options:
            option.name = option.name[:MAX_FITTED_NAME]
    elif which == "elicitation_request":
        elicitation = event.elicitation_request
        elicitation.requested_schema.Clear()
        elicitation.requested_schema["cut"] = marker.string_value
        elicitation.message = elicitation.message[: 4 * MAX_FITTED_NAME]
        elicitation.url = elicitation.url[: 4 * MAX_FITTED_NAME]
    elif which == "other":
        event.other.payload.Clear()
        event.other.payload["cut"] = marker.string_value
    if event.ByteSize() <= max_bytes or which in ("permission_request", "elicitation_request"):
        return event
    return pb.PromptEvent(seq=event.seq, notice=pb.Notice(kind="event_dropped", message=marker.string_value))


MAX_FITTED_NAME = 1024  # characters of a title or option name kept in an event cut to fit


def _fit_tool_call(body: Any, marker: struct_pb2.Value, event: pb.PromptEvent, max_bytes: int) -> None:
    for name in ("raw_input", "raw_output"):
        if body.HasField(name):
            getattr(body, name).CopyFrom(marker)
    if event.ByteSize() > max_bytes:
        del body.content[:]
        body.content.add().block.text.text = marker.string_value
        del body.locations[:]
    body.title = body.title[:MAX_FITTED_NAME]


def _kind(item: Any) -> str:
    if isinstance(item, RawUpdate):
        return item.kind[:64]
    return str(getattr(item, "session_update", type(item).__name__))


def to_event(seq: int, item: Any, bounded: bool = False) -> pb.PromptEvent:
    """One turn item (an ACP update, a PermissionReport, a Notice or the TurnEnd) as a PromptEvent.

    JSON from the agent deeper than MAX_JSON_DEPTH raises DeepJson, or with `bounded` is cut."""
    if isinstance(item, TurnEnd):
        return pb.PromptEvent(seq=seq, result=_result(item))
    if type(item) is TextRun:  # most of a turn's events: set in place (half the cost of nesting)
        built = pb.PromptEvent(seq=seq)
        chunk = built.message_chunk if item.kind == "agent_message_chunk" else built.thought_chunk
        block = chunk.content.text
        block.text = item.text
        block.SetInParent()  # present even with empty text
        chunk.message_id = item.message_id
        return built
    kind = getattr(item, "session_update", None)
    if kind == "agent_message_chunk":
        return pb.PromptEvent(seq=seq, message_chunk=_chunk(item))
    if kind == "agent_thought_chunk":
        return pb.PromptEvent(seq=seq, thought_chunk=_chunk(item))
    if kind == "tool_call":
        return pb.PromptEvent(seq=seq, tool_call=pb.ToolCall(**_tool_fields(item, bounded)))
    if kind == "tool_call_update":
        return pb.PromptEvent(seq=seq, tool_call_update=pb.ToolCallUpdate(**_tool_fields(item, bounded)))
    if kind == "plan":
        entries = [
            pb.PlanEntry(content=e.content, priority=e.priority, status=e.status) for e in item.entries
        ]
        return pb.PromptEvent(seq=seq, plan=pb.Plan(entries=entries))
    if kind == "current_mode_update":
        return pb.PromptEvent(
            seq=seq, mode_update=pb.ModeUpdate(current_mode_id=agent_state.current_mode_id(item))
        )
    if kind == "config_option_update":
        options = [config_option(o) for o in agent_state.config_options(item.config_options)]
        return pb.PromptEvent(seq=seq, config_update=pb.ConfigUpdate(config_options=options))
    if kind == "available_commands_update":
        commands = [available_command(c) for c in agent_state.commands(item.available_commands)]
        return pb.PromptEvent(seq=seq, commands_update=pb.CommandsUpdate(available_commands=commands))
    if kind == "session_info_update":
        info = pb.SessionInfo(
            title=agent_state.session_title(item), updated_at=clip(item.updated_at or "", 100)
        )
        return pb.PromptEvent(seq=seq, session_info=info)
    if kind == "usage_update":
        return pb.PromptEvent(seq=seq, usage_update=session_usage(agent_state.context_usage(item)))
    if isinstance(item, PermissionReport):
        return pb.PromptEvent(seq=seq, permission=_permission(item))
    if isinstance(item, PermissionAsk):
        return pb.PromptEvent(seq=seq, permission_request=_permission_request(item, bounded))
    if isinstance(item, ElicitationAsk):
        return pb.PromptEvent(seq=seq, elicitation_request=_elicitation_request(item, bounded))
    if isinstance(item, ElicitationReport):
        event = pb.ElicitationEvent(
            request_id=item.request_id, action=ELICITATION_ACTIONS[item.action], policy=item.decided_by
        )
        return pb.PromptEvent(seq=seq, elicitation=event)
    if isinstance(item, ToolAsk):
        return pb.PromptEvent(seq=seq, tool_request=_tool_request(item, bounded))
    if isinstance(item, ToolReport):
        outcome = pb.ToolOutcome(
            request_id=item.request_id, tool=item.tool, is_error=item.is_error, decided_by=item.decided_by
        )
        return pb.PromptEvent(seq=seq, tool_outcome=outcome)
    if isinstance(item, Notice):
        return pb.PromptEvent(seq=seq, notice=pb.Notice(kind=item.kind, message=item.message))
    if isinstance(item, FileWriteReport):
        return pb.PromptEvent(
            seq=seq, file_write=pb.FileWrite(path=item.path, bytes=item.bytes, created=item.created)
        )
    if isinstance(item, TerminalReport):
        return pb.PromptEvent(seq=seq, terminal_output=_terminal_output(item))
    return pb.PromptEvent(seq=seq, other=_other(item, bounded))


def _chunk(update: Any) -> pb.ContentChunk:
    return pb.ContentChunk(content=_content_block(update.content), message_id=update.message_id or "")


def _content_block(block: Any) -> pb.ContentBlock:
    kind = getattr(block, "type", None)
    if kind == "text":
        return pb.ContentBlock(text=pb.TextContent(text=block.text))
    if kind == "image":
        return pb.ContentBlock(
            image=pb.ImageContent(data=_b64(block.data), mime_type=block.mime_type, uri=block.uri or "")
        )
    if kind == "resource_link":
        return pb.ContentBlock(
            resource_link=pb.ResourceLink(
                uri=block.uri,
                name=block.name,
                mime_type=block.mime_type or "",
                title=block.title or "",
                description=block.description or "",
                size=block.size or 0,
            )
        )
    if kind == "resource":
        res = block.resource
        if getattr(res, "blob", None) is not None:
            embedded = pb.EmbeddedResource(uri=res.uri, mime_type=res.mime_type or "", blob=_b64(res.blob))
        else:
            embedded = pb.EmbeddedResource(uri=res.uri, mime_type=res.mime_type or "", text=res.text)
        return pb.ContentBlock(resource=embedded)
    # Audio and future kinds: keep the text form so nothing is silently dropped.
    return pb.ContentBlock(text=pb.TextContent(text=f"[{kind} content]"))


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=False)
    except ValueError:
        return data.encode()


def _tool_content(items: list[Any] | None) -> list[pb.ToolCallContent]:
    out = []
    for item in items or []:
        if item.type == "diff":
            out.append(
                pb.ToolCallContent(
                    diff=pb.Diff(path=item.path, old_text=item.old_text or "", new_text=item.new_text)
                )
            )
        elif item.type == "terminal":
            out.append(pb.ToolCallContent(terminal_id=item.terminal_id))
        else:
            out.append(pb.ToolCallContent(block=_content_block(item.content)))
    return out


def _locations(items: list[Any] | None) -> list[pb.ToolCallLocation]:
    return [pb.ToolCallLocation(path=loc.path, line=loc.line or 0) for loc in items or []]


def _value(raw: Any, bounded: bool = False) -> struct_pb2.Value | None:
    if raw is None:
        return None
    value = struct_pb2.Value()
    try:
        json_format.ParseDict(_depth_checked(raw, bounded), value)
    except (json_format.ParseError, TypeError, ValueError):
        value.string_value = str(raw)
    return value


def _depth_checked(raw: Any, bounded: bool, depth: int = 0) -> Any:
    """`raw` as plain JSON; deeper than MAX_JSON_DEPTH: DeepJson, or (`bounded`) the marker."""
    if isinstance(raw, dict | list):
        if depth >= MAX_JSON_DEPTH:
            if not bounded:
                raise DeepJson
            return DEEP_MARKER
        if isinstance(raw, dict):
            return {str(k): _depth_checked(v, bounded, depth + 1) for k, v in raw.items()}
        return [_depth_checked(v, bounded, depth + 1) for v in raw]
    if raw is None or isinstance(raw, str | int | float | bool):
        return raw
    return str(raw)


def _tool_fields(update: Any, bounded: bool = False) -> dict[str, Any]:
    """The fields a tool call start and a tool call update share (ACP ToolCall/ToolCallUpdate)."""
    return {
        "tool_call_id": update.tool_call_id,
        "title": update.title or "",
        "kind": update.kind or "",
        "status": TOOL_STATUSES.get(update.status or "", pb.TOOL_CALL_STATUS_UNSPECIFIED),
        "content": _tool_content(update.content),
        "locations": _locations(update.locations),
        "raw_input": _value(update.raw_input, bounded),
        "raw_output": _value(update.raw_output, bounded),
    }


def _permission(report: PermissionReport) -> pb.PermissionEvent:
    return pb.PermissionEvent(
        tool_call_id=report.tool_call_id,
        title=report.title,
        options=_options(report.options),
        outcome=PERMISSION_OUTCOMES[report.outcome],
        selected_option_id=report.selected_option_id,
        policy=report.policy,
        request_id=report.request_id,
    )


def _options(options: tuple[schema.PermissionOption, ...]) -> list[pb.PermissionOption]:
    return [pb.PermissionOption(option_id=o.option_id, name=o.name, kind=o.kind) for o in options]


def _permission_request(ask: PermissionAsk, bounded: bool) -> pb.PermissionRequest:
    return pb.PermissionRequest(
        request_id=ask.request_id,
        tool_call=pb.ToolCallUpdate(**_tool_fields(ask.tool_call, bounded)),
        options=_options(ask.options),
        expire_time=timestamp(ask.expire_wall),
    )


def _elicitation_request(ask: ElicitationAsk, bounded: bool) -> pb.ElicitationRequest:
    request = pb.ElicitationRequest(
        request_id=ask.request_id,
        message=ask.message,
        mode=ask.mode,
        url=ask.url,
        tool_call_id=ask.tool_call_id,
        expire_time=timestamp(ask.expire_wall),
    )
    if ask.requested_schema is not None:
        request.requested_schema.update(_depth_checked(ask.requested_schema, bounded))
    return request


def _tool_request(ask: ToolAsk, bounded: bool) -> pb.ToolRequest:
    request = pb.ToolRequest(request_id=ask.request_id, tool=ask.tool, expire_time=timestamp(ask.expire_wall))
    request.input.update(_depth_checked(ask.arguments, bounded))
    return request


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _terminal_output(report: TerminalReport) -> pb.TerminalOutput:
    return pb.TerminalOutput(
        terminal_id=report.terminal_id,
        output=report.output_delta,
        truncated=report.truncated,
        exited=report.exited,
        exit_code=report.exit_code or 0,
        signal=report.signal or "",
    )


def _other(update: Any, bounded: bool = False) -> pb.OtherUpdate:
    """An update without an event of its own: a kind we carry as JSON, or one this SDK does not
    know (a newer agent's, read below the SDK's validation)."""
    payload = struct_pb2.Struct()
    if isinstance(update, RawUpdate):
        data: Any = update.payload
    elif hasattr(update, "model_dump"):
        data = update.model_dump(mode="json", by_alias=True, exclude_none=True)
    else:
        data = {}
    payload.update(_depth_checked(data, bounded))
    return pb.OtherUpdate(kind=_kind(update), payload=payload)


def _result(end: TurnEnd) -> pb.TurnResult:
    result = pb.TurnResult(stop_reason=STOP_REASONS.get(end.stop_reason, pb.STOP_REASON_UNSPECIFIED))
    if end.usage is not None:
        result.usage.CopyFrom(token_usage(agent_state.token_usage(end.usage)))
    return result


# ---- session state (agent_state.py) -> proto: Session fields and the turn's events alike ----


def session_modes(state: agent_state.AgentState) -> pb.SessionModes:
    modes = [pb.SessionMode(id=m.id, name=m.name, description=m.description) for m in state.modes]
    return pb.SessionModes(current_mode_id=state.current_mode_id, available_modes=modes)


def config_option(option: agent_state.ConfigOption) -> pb.ConfigOption:
    return pb.ConfigOption(
        id=option.id,
        name=option.name,
        description=option.description,
        category=option.category,
        type=option.type,
        current_value=option.current_value,
        values=[
            pb.ConfigOptionValue(value=v.value, name=v.name, description=v.description, group=v.group)
            for v in option.values
        ],
    )


def available_command(command: agent_state.Command) -> pb.AvailableCommand:
    return pb.AvailableCommand(
        name=command.name, description=command.description, input_hint=command.input_hint
    )


def session_usage(usage: agent_state.SessionUsage) -> pb.SessionUsage:
    message = pb.SessionUsage(
        context_used=usage.context_used,
        context_size=usage.context_size,
        cost_amount=usage.cost_amount,
        cost_currency=usage.cost_currency,
    )
    if usage.last_turn is not None:
        message.last_turn.CopyFrom(token_usage(usage.last_turn))
    return message


def token_usage(usage: agent_state.TokenUsage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        thought_tokens=usage.thought_tokens,
        cached_read_tokens=usage.cached_read_tokens,
        cached_write_tokens=usage.cached_write_tokens,
    )
