"""Transport: TLS, mTLS principals, certificates rotated on disk, and a Unix socket.

Certificates are made with `cryptography` (tests/pki.py): a CA, a server certificate for
127.0.0.1, and client certificates naming their principal by URI SAN.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import grpc
import pytest
from sessiongate.client import AsyncSessionClient
from sessiongate.server.security.tls import certificate_name
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import Gate, GateFactory, expect_error, reply_text
from tests.pki import Pki
from tests.test_auth import TOKENS, as_, tokens_file
from tests.test_cli import cli

ALICE_URI = "spiffe://sessiongate.test/alice"


def tls_channel(gate: Gate, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    channel = grpc.aio.secure_channel(gate.target, credentials)
    gate.extra_channels.append(channel)
    return channel


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.make(tmp_path, "one")


async def test_tls_with_tokens_serves_encrypted_clients_and_refuses_plaintext(
    make_gate: GateFactory, pki: Pki, tmp_path: Path
) -> None:
    cert, key = pki.issue("server", ip="127.0.0.1")
    gate: Gate = await make_gate(
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"), settings={"tls_cert": cert, "tls_key": key}
    )
    stub = pb_grpc.SessionServiceStub(tls_channel(gate, pki.path("ca.pem")))
    session = await stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    events = [
        e
        async for e in stub.Prompt(
            pb.PromptRequest(session_id=session.session_id, text="over tls"), metadata=as_("alice")
        )
    ]
    assert reply_text(events) == "over tls"
    plaintext = await expect_error(
        gate.stub.ListAgents(pb.ListAgentsRequest(), metadata=as_("alice"), timeout=5)
    )
    assert plaintext.code == grpc.StatusCode.UNAVAILABLE
    async with AsyncSessionClient(gate.target, token=TOKENS["alice"], tls_ca=pki.path("ca.pem")) as client:
        assert (await client.get_session(session.session_id)).owner == "alice"
    code, out, err = await cli(gate, "--tls-ca", str(pki.path("ca.pem")), "--token", TOKENS["alice"], "list")
    assert code == 0 and session.session_id in out, err


async def test_mtls_requires_a_client_certificate_whose_name_is_the_principal(
    make_gate: GateFactory, pki: Pki
) -> None:
    cert, key = pki.issue("server", ip="127.0.0.1")
    alice_cert, alice_key = pki.issue("alice", uri=ALICE_URI, cn="ignored")
    gate: Gate = await make_gate(
        settings={"tls_cert": cert, "tls_key": key, "tls_client_ca": pki.path("ca.pem")}
    )
    anonymous = pb_grpc.SessionServiceStub(tls_channel(gate, pki.path("ca.pem")))
    refused = await expect_error(anonymous.ListAgents(pb.ListAgentsRequest(), timeout=5))
    assert refused.code == grpc.StatusCode.UNAVAILABLE  # no handshake without a client certificate

    alice = pb_grpc.SessionServiceStub(tls_channel(gate, pki.path("ca.pem"), alice_cert, alice_key))
    session = await alice.CreateSession(pb.CreateSessionRequest(), timeout=30)
    assert session.owner == ALICE_URI
    listed = await alice.ListSessions(pb.ListSessionsRequest(), timeout=5)
    assert [s.session_id for s in listed.sessions] == [session.session_id]


def test_a_certificates_principal_is_its_uri_san_else_dns_san_else_cn(pki: Pki) -> None:
    uri_cert, _ = pki.issue("uri", uri=ALICE_URI, cn="cn")
    cn_cert, _ = pki.issue("cn", cn="bob")
    assert certificate_name(uri_cert.read_bytes()) == ALICE_URI
    assert certificate_name(cn_cert.read_bytes()) == "bob"


async def test_a_certificate_rotated_on_disk_is_served_to_new_connections_while_old_streams_go_on(
    make_gate: GateFactory, pki: Pki, tmp_path: Path
) -> None:
    cert, key = pki.issue("server", ip="127.0.0.1")
    gate: Gate = await make_gate(
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"), settings={"tls_cert": cert, "tls_key": key}
    )
    old = pb_grpc.SessionServiceStub(tls_channel(gate, pki.path("ca.pem")))
    session = await old.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    stream = old.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/stall"), metadata=as_("alice"), timeout=60
    )
    await asyncio.wait_for(stream.read(), 10)

    other = Pki.make(tmp_path, "two")  # a new CA: only clients trusting it accept the new certificate
    new_cert, new_key = other.issue("server", ip="127.0.0.1")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())

    fresh = pb_grpc.SessionServiceStub(tls_channel(gate, other.path("ca.pem")))
    agents = await fresh.ListAgents(pb.ListAgentsRequest(), metadata=as_("alice"), timeout=10)
    assert agents.default_agent == "echo"
    stale = pb_grpc.SessionServiceStub(tls_channel(gate, pki.path("ca.pem")))
    assert (
        await expect_error(stale.ListAgents(pb.ListAgentsRequest(), metadata=as_("alice"), timeout=5))
    ).code == (grpc.StatusCode.UNAVAILABLE)
    # The stream opened before the rotation is still served to its end.
    await old.CancelPrompt(
        pb.CancelPromptRequest(session_id=session.session_id), metadata=as_("alice"), timeout=10
    )
    rest = []
    while (event := await asyncio.wait_for(stream.read(), 10)) is not grpc.aio.EOF:
        rest.append(event)
    assert rest[-1].result.stop_reason == pb.STOP_REASON_CANCELLED


async def test_a_unix_socket_is_created_for_the_servers_user_alone(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    socket = tmp_path / "gate.sock"
    gate: Gate = await make_gate(settings={"listen": f"unix://{socket}"})
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    gate.extra_channels.append(channel)
    stub = pb_grpc.SessionServiceStub(channel)
    session = await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
    events = [e async for e in stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="local"))]
    assert reply_text(events) == "local"
