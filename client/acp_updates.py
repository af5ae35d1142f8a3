"""What the ACP front door (`sessiongate acp`) tells an editor: the gateway's protobuf back into
ACP's JSON shapes.

The gateway translated each ACP `session/update` of its agent into a `PromptEvent`; this is the
inverse, so an editor sees the notification it came from: message, thought and user chunks,
tool calls and their updates, plans, modes, config options, commands, session info, usage, and
the kinds the gateway carries as `other` passed on unchanged. Prompt content goes the other way
(`prompt_blocks`). Everything here is plain JSON (camelCase, as on the wire); the front door
validates it with the ACP SDK's models before it sends.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from sessiongate.v1 import session_service_pb2 as pb

STOP_REASONS = {
    pb.STOP_REASON_END_TURN: "end_turn",
    pb.STOP_REASON_MAX_TOKENS: "max_tokens",
    pb.STOP_REASON_MAX_TURN_REQUESTS: "max_turn_requests",
    pb.STOP_REASON_REFUSAL: "refusal",
    pb.STOP_REASON_CANCELLED: "cancelled",
}
TOOL_STATUSES = {
    pb.TOOL_CALL_STATUS_PENDING: "pending",
    pb.TOOL_CALL_STATUS_IN_PROGRESS: "in_progress",
    pb.TOOL_CALL_STATUS_COMPLETED: "completed",
    pb.TOOL_CALL_STATUS_FAILED: "failed",
}
NOTICE_PREFIX = "[sessiongate] "  # a gateway notice, shown to the editor as a thought


def _given(*fields: tuple[str, Any]) -> dict[str, Any]:
    """The optional fields that are set (protobuf's unset is "" or 0: ACP leaves them out)."""
    return {key: value for key, value in fields if value}


def content_block(block: pb.ContentBlock) -> dict[str, Any]:
    kind = block.WhichOneof("block")
    if kind == "image":
        image = {
            "type": "image",
            "data": base64.b64encode(block.image.data).decode(),
            "mimeType": block.image.mime_type,
        }
        return {**image, "uri": block.image.uri} if block.image.uri else image
    if kind == "resource_link":
        link = block.resource_link
        return {
            "type": "resource_link",
            "uri": link.uri,
            "name": link.name,
            **_given(
                ("mimeType", link.mime_type),
                ("title", link.title),
                ("description", link.description),
                ("size", link.size),
            ),
        }
    if kind == "resource":
        resource = block.resource
        contents: dict[str, Any] = {"uri": resource.uri}
        if resource.mime_type:
            contents["mimeType"] = resource.mime_type
        if resource.WhichOneof("contents") == "blob":
            contents["blob"] = base64.b64encode(resource.blob).decode()
        else:
            contents["text"] = resource.text
        return {"type": "resource", "resource": contents}
    return {"type": "text", "text": block.text.text}


def prompt_blocks(blocks: Iterable[Any]) -> list[pb.ContentBlock]:
    """An ACP prompt (the SDK's content models) as the gateway's content blocks; a kind the
    gateway does not carry (audio) raises ValueError."""
    found = []
    for block in blocks:
        data = (
            block.model_dump(mode="json", by_alias=True, exclude_none=True)
            if hasattr(block, "model_dump")
            else block
        )
        kind = data.get("type")
        if kind == "text":
            found.append(pb.ContentBlock(text=pb.TextContent(text=data.get("text", ""))))
        elif kind == "image":
            image = pb.ImageContent(
                data=base64.b64decode(data.get("data", "")),
                mime_type=data.get("mimeType", ""),
                uri=data.get("uri", ""),
            )
            found.append(pb.ContentBlock(image=image))
        elif kind == "resource_link":
            link = pb.ResourceLink(
                uri=data.get("uri", ""),
                name=data.get("name", ""),
                mime_type=data.get("mimeType", ""),
                title=data.get("title", ""),
                description=data.get("description", ""),
                size=int(data.get("size") or 0),
            )
            found.append(pb.ContentBlock(resource_link=link))
        elif kind == "resource":
            contents = data.get("resource", {})
            resource = pb.EmbeddedResource(
                uri=contents.get("uri", ""), mime_type=contents.get("mimeType", "")
            )
            if "blob" in contents:
                resource.blob = base64.b64decode(contents["blob"])
            else:
                resource.text = contents.get("text", "")
            found.append(pb.ContentBlock(resource=resource))
        else:
            raise ValueError(
                f"the gateway takes text, image and resource prompt content, not {str(kind)[:40]!r}"
            )
    return found


def tool_call_fields(call: pb.ToolCallUpdate) -> dict[str, Any]:
    """A tool call as ACP's ToolCallUpdate (what a permission request is about)."""
    return _tool_fields(call, full=False)


def _tool_fields(call: pb.ToolCall | pb.ToolCallUpdate, full: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"toolCallId": call.tool_call_id}
    if call.title or full:
        fields["title"] = call.title
    if call.kind:
        fields["kind"] = call.kind
    if call.status in TOOL_STATUSES:
        fields["status"] = TOOL_STATUSES[call.status]
    if call.content:
        fields["content"] = [_tool_content(c) for c in call.content]
    if call.locations:
        fields["locations"] = [
            {"path": loc.path, **({"line": loc.line} if loc.line else {})} for loc in call.locations
        ]
    if call.HasField("raw_input"):
        fields["rawInput"] = json_format.MessageToDict(call.raw_input)
    if call.HasField("raw_output"):
        fields["rawOutput"] = json_format.MessageToDict(call.raw_output)
    return fields


def _tool_content(content: pb.ToolCallContent) -> dict[str, Any]:
    kind = content.WhichOneof("content")
    if kind == "diff":
        diff = content.diff
        return {"type": "diff", "path": diff.path, "oldText": diff.old_text or None, "newText": diff.new_text}
    if kind == "terminal_id":
        return {"type": "terminal", "terminalId": content.terminal_id}
    return {"type": "content", "content": content_block(content.block)}


def _config_option(option: pb.ConfigOption) -> dict[str, Any]:
    found: dict[str, Any] = {"id": option.id, "name": option.name, "type": option.type or "select"}
    if option.description:
        found["description"] = option.description
    if option.category:
        found["category"] = option.category
    if found["type"] == "boolean":
        found["currentValue"] = option.current_value == "true"
        return found
    found["currentValue"] = option.current_value
    found["options"] = [
        {
            "value": v.value,
            "name": v.name or v.value,
            **({"description": v.description} if v.description else {}),
        }
        for v in option.values
    ]
    return found


def config_options(options: Iterable[pb.ConfigOption]) -> list[dict[str, Any]]:
    return [_config_option(o) for o in options]


def modes(session: pb.Session) -> dict[str, Any] | None:
    if not session.HasField("modes") or not session.modes.available_modes:
        return None
    return {
        "currentModeId": session.modes.current_mode_id,
        "availableModes": [
            {"id": m.id, "name": m.name or m.id, **({"description": m.description} if m.description else {})}
            for m in session.modes.available_modes
        ],
    }


def usage(value: pb.Usage) -> dict[str, Any] | None:
    if not (value.total_tokens or value.input_tokens or value.output_tokens):
        return None
    return {
        "totalTokens": value.total_tokens,
        "inputTokens": value.input_tokens,
        "outputTokens": value.output_tokens,
        **_given(
            ("thoughtTokens", value.thought_tokens),
            ("cachedReadTokens", value.cached_read_tokens),
            ("cachedWriteTokens", value.cached_write_tokens),
        ),
    }


def session_update(event: pb.PromptEvent) -> dict[str, Any] | None:
    """The ACP `session/update` payload an event came from (its `update`), or None for events
    that are not updates: the result, the questions the front door asks the editor itself, and
    what the gateway did for the agent (files, terminals, client tools)."""
    kind = event.WhichOneof("event")
    if kind in ("message_chunk", "thought_chunk"):
        chunk = getattr(event, kind)
        name = "agent_message_chunk" if kind == "message_chunk" else "agent_thought_chunk"
        update = {"sessionUpdate": name, "content": content_block(chunk.content)}
        return {**update, "messageId": chunk.message_id} if chunk.message_id else update
    if kind == "tool_call":
        return {"sessionUpdate": "tool_call", **_tool_fields(event.tool_call, full=True)}
    if kind == "tool_call_update":
        return {"sessionUpdate": "tool_call_update", **_tool_fields(event.tool_call_update, full=False)}
    if kind == "plan":
        entries = [
            {"content": e.content, "priority": e.priority, "status": e.status} for e in event.plan.entries
        ]
        return {"sessionUpdate": "plan", "entries": entries}
    if kind == "mode_update":
        return {"sessionUpdate": "current_mode_update", "currentModeId": event.mode_update.current_mode_id}
    if kind == "config_update":
        return {
            "sessionUpdate": "config_option_update",
            "configOptions": config_options(event.config_update.config_options),
        }
    if kind == "commands_update":
        commands = [
            {
                "name": c.name,
                "description": c.description,
                **({"input": {"hint": c.input_hint}} if c.input_hint else {}),
            }
            for c in event.commands_update.available_commands
        ]
        return {"sessionUpdate": "available_commands_update", "availableCommands": commands}
    if kind == "session_info":
        info: dict[str, Any] = {
            "sessionUpdate": "session_info_update",
            "title": event.session_info.title or None,
        }
        if event.session_info.updated_at:
            info["updatedAt"] = event.session_info.updated_at
        return info
    if kind == "usage_update":
        used = event.usage_update
        found: dict[str, Any] = {
            "sessionUpdate": "usage_update",
            "used": used.context_used,
            "size": used.context_size,
        }
        if used.cost_currency:
            found["cost"] = {"amount": used.cost_amount, "currency": used.cost_currency}
        return found
    if kind == "other":
        payload = json_format.MessageToDict(event.other.payload)
        payload.setdefault("sessionUpdate", event.other.kind)
        return payload  # unchanged: the agent's own update, of a kind the gateway has no event for
    if kind == "notice":
        text = f"{NOTICE_PREFIX}{event.notice.message}"
        return {"sessionUpdate": "agent_thought_chunk", "content": {"type": "text", "text": text}}
    if kind == "permission" and event.permission.policy != "client":
        # Decided by the gateway (its policy, a timeout, a cancel): reported, not asked.
        decided = event.permission
        meta = {
            "sessiongate": {
                "permission": pb.PermissionOutcome.Name(decided.outcome)
                .removeprefix("PERMISSION_OUTCOME_")
                .lower(),
                "decidedBy": decided.policy,
            }
        }
        return {"sessionUpdate": "tool_call_update", "toolCallId": decided.tool_call_id, "_meta": meta}
    return None


def stop_reason(result: pb.TurnResult) -> str:
    return STOP_REASONS.get(result.stop_reason, "end_turn")
