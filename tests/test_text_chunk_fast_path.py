"""The agent's plain text chunks skip pydantic (transport.text_chunk): they must read exactly as
the ACP schema's models read them, and anything else must go the models' way."""

from __future__ import annotations

import json
from typing import Any

from acp import schema
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sessiongate.server.agents.transport import TextRun, encode, text_chunk

scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)
kinds = st.sampled_from(["agent_message_chunk", "agent_thought_chunk", "user_message_chunk", "plan", 3])
blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", 1])},
    optional={"text": st.text(max_size=8) | scalars, "annotations": values, "_meta": values, "data": values},
)
updates = st.fixed_dictionaries(
    {"sessionUpdate": kinds},
    optional={"content": blocks | values, "messageId": scalars, "_meta": values, "extra": values},
)
params = st.fixed_dictionaries(
    {"sessionId": st.just("s1"), "update": updates | values}, optional={"_meta": values, "other": values}
)


def _plain(message: dict[str, Any]) -> bool:
    """Only the keys a plain text chunk has (its values may still be wrong)."""
    update = message["update"]
    if message.keys() != {"sessionId", "update"} or not isinstance(update, dict):
        return False
    content = update.get("content")
    return (
        update.keys() <= {"sessionUpdate", "content", "messageId"}
        and isinstance(content, dict)
        and content.keys() == {"type", "text"}
    )


def by_the_models(message: dict[str, Any]) -> TextRun | None:
    """What the schema's models make of `message`, as a TextRun when it is a plain text chunk."""
    try:
        update = schema.SessionNotification.model_validate(message).update
    except ValidationError:
        return None
    content: Any = getattr(update, "content", None)
    if update.session_update not in ("agent_message_chunk", "agent_thought_chunk") or content.type != "text":
        return None
    return TextRun(update.session_update, content.text, update.message_id or "")


@settings(max_examples=600, derandomize=True, deadline=None)
@given(params)
def test_a_fast_chunk_is_what_the_models_read_and_only_a_valid_one_is_fast(message: dict[str, Any]) -> None:
    fast, read = text_chunk(message), by_the_models(message)
    if fast is not None:
        assert fast == read
    if _plain(message):
        assert fast == read  # a plain chunk the models read is always read fast


def test_plain_chunks_take_the_fast_path_and_decorated_ones_the_models() -> None:
    plain: dict[str, Any] = {
        "sessionId": "s",
        "update": {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "hi"}},
    }
    assert text_chunk(plain) == TextRun("agent_message_chunk", "hi", "")
    with_id = {
        **plain,
        "update": {**plain["update"], "messageId": "m1", "sessionUpdate": "agent_thought_chunk"},
    }
    assert text_chunk(with_id) == TextRun("agent_thought_chunk", "hi", "m1")
    annotated = {
        **plain,
        "update": {**plain["update"], "content": {"type": "text", "text": "hi", "annotations": None}},
    }
    assert text_chunk(annotated) is None and by_the_models(annotated) == TextRun(
        "agent_message_chunk", "hi", ""
    )
    assert text_chunk({**plain, "_meta": {}}) is None
    wrong = {**plain, "update": {**plain["update"], "content": {"type": "text", "text": 5}}}
    assert text_chunk(wrong) is None and by_the_models(wrong) is None


# ---- the other way: our messages to the agent (transport.encode) ----------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither
    | st.text(st.characters(blacklist_categories=())),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_a_message_to_the_agent_is_one_line_of_the_same_json(value: Any) -> None:
    """Whatever it holds (any text, lone surrogates, integers past 64 bits): one line, whose JSON
    is the message, and no character a line reader may split at but its final newline."""
    message = {"jsonrpc": "2.0", "id": 1, "result": value}
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    text = line.decode("utf-8")
    assert len(text.splitlines()) == 1, text
    assert json.loads(text) == json.loads(json.dumps(message))


def test_a_message_to_the_agent_keeps_its_text_as_utf8() -> None:
    line = encode({"params": {"text": "héllo \u2028 \x85 \u2029 ✓"}})
    assert line == '{"params":{"text":"héllo \\u2028 \\u0085 \\u2029 ✓"}}\n'.encode()
    assert encode({"text": "\ud800"}) == b'{"text":"\\ud800"}\n'  # orjson refuses it: json's way
