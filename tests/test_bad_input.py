"""Bad input gets a clear status with field violations; the server stays up."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error


@pytest.fixture
async def small_gate(make_gate: GateFactory) -> Gate:
    gate: Gate = await make_gate(max_prompt_bytes=1000)
    return gate


PROMPT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("empty prompt", {"text": ""}, "text"),
    ("oversize prompt", {"text": "x" * 1001}, "content"),
    ("oversize content", {"content": [pb.ContentBlock(text=pb.TextContent(text="y" * 1200))]}, "content"),
    ("empty content block", {"content": [pb.ContentBlock()]}, "content[0]"),
    (
        "image without mime type",
        {"content": [pb.ContentBlock(image=pb.ImageContent(data=b"x"))]},
        "content[0]",
    ),
    (
        "nanos out of range",
        {"text": "x", "stall_timeout": duration_pb2.Duration(nanos=2_000_000_000)},
        "stall_timeout",
    ),
    (
        "mixed signs",
        {"text": "x", "wait_timeout": duration_pb2.Duration(seconds=1, nanos=-5)},
        "wait_timeout",
    ),
    ("zero stall timeout", {"text": "x", "stall_timeout": duration_pb2.Duration()}, "stall_timeout"),
    ("negative wait", {"text": "x", "wait_timeout": duration_pb2.Duration(seconds=-1)}, "wait_timeout"),
]


@pytest.mark.parametrize(("case", "fields", "field"), PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
async def test_malformed_prompt_is_invalid_argument_with_a_field_violation(
    small_gate: Gate, case: str, fields: dict[str, Any], field: str
) -> None:
    session = await small_gate.create()
    error = await expect_error(
        small_gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, **fields))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, case
    assert field in error.violations, error.violations
    assert error.violations[field] in error.message


async def test_prompt_without_session_id_names_the_field(gate: Gate) -> None:
    error = await expect_error(gate.stub.Prompt(pb.PromptRequest(text="hello")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == {"session_id": "required"}


@pytest.mark.parametrize("closed", [False, True], ids=["unknown", "closed"])
async def test_unknown_or_closed_session_is_not_found(gate: Gate, closed: bool) -> None:
    session_id = "no-such-session"
    if closed:
        session_id = (await gate.create()).session_id
        await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    calls = [
        gate.stub.Prompt(pb.PromptRequest(session_id=session_id, text="hi")),
        gate.stub.GetSession(pb.GetSessionRequest(session_id=session_id)),
        gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session_id)),
    ]
    if not closed:  # closing a closed session again answers it again (a retried close is safe)
        calls.append(gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id)))
    for call in calls:
        error = await expect_error(call)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


async def test_create_with_bad_agent_cwd_and_labels_lists_every_violation(gate: Gate, tmp_path: Path) -> None:
    outside = tmp_path.parent
    error = await expect_error(
        gate.stub.CreateSession(
            pb.CreateSessionRequest(
                agent="nope", cwd=str(outside), labels={"k" * 100: "v"}, request_id="r" * 200
            )
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown agent 'nope'" in error.violations["agent"]
    assert "outside the allowed roots" in error.violations["cwd"]
    assert "request_id" in error.violations
    assert any(name.startswith("labels[") for name in error.violations)


async def test_cwd_that_is_not_a_directory_is_invalid(gate: Gate) -> None:
    (gate.workdir / "file.txt").write_text("not a dir")
    for cwd in ("file.txt", "missing-dir", "../../.."):
        error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(cwd=cwd)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, cwd
        assert "cwd" in error.violations


async def test_a_cwd_that_cannot_be_resolved_is_invalid_not_internal(gate: Gate) -> None:
    (gate.workdir / "loop").symlink_to(gate.workdir / "loop")  # resolving it never ends
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(cwd="loop/sub")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be resolved" in error.violations["cwd"]


async def test_many_oversized_non_ascii_violations_still_fit_in_one_status(gate: Gate) -> None:
    """Statuses travel in trailers that peers cap at 8 KiB: every part is bounded in bytes, so
    a request full of long non-ASCII mistakes still gets its INVALID_ARGUMENT, not a transport error."""
    labels = {f"{'é' * 70}{n}": "ü" * 300 for n in range(64)}
    cwd = "ö" * 4000
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(labels=labels, cwd=cwd)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.violations) <= 10 and "(more)" in error.violations
    assert len(error.message.encode()) < 1000


async def test_malformed_page_token_and_page_size_are_invalid(gate: Gate) -> None:
    deep = base64.urlsafe_b64encode(b"[" * 100_000).decode()  # too deep for a JSON parser
    for request, field in (
        (pb.ListSessionsRequest(page_token="garbage!"), "page_token"),
        (pb.ListSessionsRequest(page_token=deep), "page_token"),
        (pb.ListSessionsRequest(page_token=base64.urlsafe_b64encode(b"[" * 50).decode()), "page_token"),
        (pb.ListSessionsRequest(page_size=-1), "page_size"),
    ):
        error = await expect_error(gate.stub.ListSessions(request))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.violations


async def test_server_is_healthy_and_serving_after_bad_input(small_gate: Gate) -> None:
    for bad in (pb.PromptRequest(), pb.PromptRequest(session_id="x", text="y")):
        await expect_error(small_gate.stub.Prompt(bad))
    health = health_pb2_grpc.HealthStub(small_gate.channel)
    for service in ("", "sessiongate.v1.SessionService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    session = await small_gate.create()
    assert (await small_gate.prompt(session.session_id, "ok"))[-1].HasField("result")


async def test_a_huge_session_id_gets_a_receivable_invalid_argument(gate: Gate) -> None:
    error = await expect_error(gate.stub.GetSession(pb.GetSessionRequest(session_id="s" * 1_000_000)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 128 characters" in error.violations["session_id"]


async def test_a_request_far_over_the_prompt_limit_is_refused_by_the_transport(small_gate: Gate) -> None:
    """grpc's receive limit sits just above max_prompt_bytes: a 1 MB request for a 1000-byte
    limit is never read into memory, and the server goes on serving."""
    session = await small_gate.create()
    error = await expect_error(
        small_gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="x" * 1_000_000))
    )
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await small_gate.prompt(session.session_id, "ok"))[-1].HasField("result")
