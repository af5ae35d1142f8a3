"""Every secret the server keeps from its agents, tried by a sandboxed agent for real.

The tokens file, the TLS key, the config file, the replicas' token, the state database and
the server's own Unix socket are configured outside /tmp (which the sandbox replaces anyway),
in a directory the agent is given as a `ro_path` so that it would see them; the agent then
tries each with its own `open` and with a terminal (`cat`, and a `connect` to the socket).
Each must give it nothing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import ECHO, GateFactory, reply_text
from tests.pki import Pki
from tests.test_auth import as_, tokens_file
from tests.test_sandbox import needs_bwrap
from tests.test_tls import tls_channel

MARK = "secret-marker-"  # every secret's content starts with it: a leak shows in any reply


def boxed() -> AgentConfig:
    return AgentConfig(name="boxed", command=ECHO[0], args=ECHO[1:], sandbox="bwrap", client_terminal=True)


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sessiongate-secrets-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def say(stub: pb_grpc.SessionServiceStub, session_id: str, text: str, metadata: object = None) -> str:
    request = pb.PromptRequest(session_id=session_id, text=text)
    return reply_text([e async for e in stub.Prompt(request, metadata=metadata, timeout=60)])


async def assert_hidden(stub: pb_grpc.SessionServiceStub, sid: str, path: Path, metadata: object) -> None:
    assert path.exists(), path
    read = await say(stub, sid, f"/read {path}", metadata)
    assert MARK not in read and (read == "" or read.startswith("cannot read")), (path, read)
    cat = await say(stub, sid, f"/terminal cat {path}", metadata)
    assert cat.startswith("terminal exit") and MARK not in cat, (path, cat)


@needs_bwrap
async def test_a_sandboxed_agent_reads_none_of_the_servers_secret_files(
    make_gate: GateFactory, outside_tmp: Path
) -> None:
    secrets = outside_tmp / "etc"
    secrets.mkdir()
    tokens = tokens_file(secrets / "tokens.toml")
    with tokens.open("a") as handle:
        handle.write(f"# {MARK}tokens\n")
    pki = Pki.make(secrets, "gate")
    cert, key = pki.issue("server", ip="127.0.0.1")
    key.write_bytes(MARK.encode() + b"\n" + key.read_bytes())  # PEM parsers skip text before it
    config = secrets / "sessiongate.toml"
    config.write_text(f'# {MARK}config\n[agents.boxed]\ncommand = "x"\nenv = {{ API_KEY = "{MARK}key" }}\n')
    replica = secrets / "replica.token"
    replica.write_text(f"{MARK}0123456789abcdef\n")
    public = outside_tmp / "public.txt"  # beside them, not a secret: the agent does see it
    public.write_text("visible")
    state_db = outside_tmp / "state" / "sessions.db"
    gate = await make_gate(
        agents={"boxed": replace(boxed(), ro_paths=(str(outside_tmp),))},  # shown, but for the secrets
        state_db=state_db,
        auth_tokens_file=tokens,
        settings={"tls_cert": cert, "tls_key": key, "config_file": config, "replica_token_file": replica},
    )
    stub = pb_grpc.SessionServiceStub(tls_channel(gate, pki.path("ca.pem")))
    alice = as_("alice")
    session = await stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), metadata=alice, timeout=30)
    sid = session.session_id

    assert await say(stub, sid, f"/read {public}", alice) == "visible"
    assert (await say(stub, sid, f"/terminal cat {public}", alice)).endswith(": visible")
    for path in (tokens, key, config, replica, state_db):
        await assert_hidden(stub, sid, path, alice)


@needs_bwrap
async def test_a_sandboxed_agent_cannot_reach_the_servers_unix_socket(
    make_gate: GateFactory, outside_tmp: Path
) -> None:
    """Over the server's own socket an agent would call the API as the server's local user."""
    socket = outside_tmp / "gate.sock"
    gate = await make_gate(agents={"boxed": boxed()}, settings={"listen": f"unix://{socket}"})
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    gate.extra_channels.append(channel)
    stub = pb_grpc.SessionServiceStub(channel)
    session = await stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    connect = (
        f'{sys.executable} -c "import socket; s = socket.socket(socket.AF_UNIX); '
        f"s.connect('{socket}'); print('connected')\""
    )
    reply = await say(stub, session.session_id, f"/terminal {connect}")
    assert reply.startswith("terminal exit") and "connected" not in reply, reply
    assert "ConnectionRefusedError" in reply or "FileNotFoundError" in reply, reply
