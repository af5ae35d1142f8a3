"""A prompt's ACP blocks as JSON (translate.prompt_json): the gateway builds the session/prompt
params itself, and they must be what the SDK's own PromptRequest model would have sent."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from acp import schema
from acp.utils import serialize_params
from sessiongate.server.turns.translate import prompt_json
from sessiongate.v1 import session_service_pb2 as pb

PNG = b"\x89PNG\r\n"
BLOB = b"\x00\x01\xff"

# (the proto block, the SDK model the agent should get for it), built apart from the code under test
CASES: list[tuple[str, pb.ContentBlock, Any]] = [
    (
        "text",
        pb.ContentBlock(text=pb.TextContent(text="a block")),
        schema.TextContentBlock(type="text", text="a block"),
    ),
    ("empty text", pb.ContentBlock(text=pb.TextContent()), schema.TextContentBlock(type="text", text="")),
    (
        "image",
        pb.ContentBlock(image=pb.ImageContent(data=PNG, mime_type="image/png")),
        schema.ImageContentBlock(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"),
    ),
    (
        "image with uri",
        pb.ContentBlock(image=pb.ImageContent(data=PNG, mime_type="image/png", uri="file:///i.png")),
        schema.ImageContentBlock(
            type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png", uri="file:///i.png"
        ),
    ),
    (
        "bare resource link",
        pb.ContentBlock(resource_link=pb.ResourceLink(uri="file:///a", name="a")),
        schema.ResourceContentBlock(type="resource_link", uri="file:///a", name="a"),
    ),
    (
        "full resource link",
        pb.ContentBlock(
            resource_link=pb.ResourceLink(
                uri="file:///a", name="a", mime_type="text/plain", title="A", description="the a", size=7
            )
        ),
        schema.ResourceContentBlock(
            type="resource_link",
            uri="file:///a",
            name="a",
            mime_type="text/plain",
            title="A",
            description="the a",
            size=7,
        ),
    ),
    (
        "text resource",
        pb.ContentBlock(resource=pb.EmbeddedResource(uri="file:///b", text="bee")),
        schema.EmbeddedResourceContentBlock(
            type="resource", resource=schema.TextResourceContents(uri="file:///b", text="bee")
        ),
    ),
    (
        "text resource with a type",
        pb.ContentBlock(resource=pb.EmbeddedResource(uri="file:///b", mime_type="text/x-b", text="bee")),
        schema.EmbeddedResourceContentBlock(
            type="resource",
            resource=schema.TextResourceContents(uri="file:///b", mime_type="text/x-b", text="bee"),
        ),
    ),
    (
        "blob resource",
        pb.ContentBlock(resource=pb.EmbeddedResource(uri="file:///c", mime_type="x/y", blob=BLOB)),
        schema.EmbeddedResourceContentBlock(
            type="resource",
            resource=schema.BlobResourceContents(
                uri="file:///c", mime_type="x/y", blob=base64.b64encode(BLOB).decode()
            ),
        ),
    ),
]


def sdk_prompt(models: list[Any]) -> list[dict[str, Any]]:
    """What the SDK's ClientSideConnection.prompt() sends as the params' `prompt`."""
    return serialize_params(schema.PromptRequest(session_id="s", prompt=models))["prompt"]


@pytest.mark.parametrize(("block", "model"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_kind_is_what_the_sdk_would_send(block: pb.ContentBlock, model: Any) -> None:
    assert prompt_json("", [block]) == sdk_prompt([model])


def test_the_text_comes_first_then_the_content_in_order() -> None:
    blocks = [case[1] for case in CASES]
    models = [schema.TextContentBlock(type="text", text="hi"), *(case[2] for case in CASES)]
    assert prompt_json("hi", blocks) == sdk_prompt(models)
    assert prompt_json("", []) == []
