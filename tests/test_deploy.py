"""The deploy/ examples: the Kubernetes manifests against the API's schema, Envoy's config, and
a real Envoy run from deploy/envoy.yaml in front of two real servers.

The two servers keep separate SQLite states, so a session exists only on the server that
created it: a NOT_FOUND from the other one is how the tests tell the backends apart. What is
not tested here is a real cluster: the manifests are checked against the schema only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import yaml  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2
from kubernetes_validate import utils as kubernetes_validate  # type: ignore[import-untyped]
from sessiongate.echo.agent import flood_chunk
from sessiongate.server.app import SERVICE_NAME
from sessiongate.server.settings import ServerLimits, Settings
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import kinds, reply_text
from tests.envoy import DEPLOY, ENVOY, ENVOY_CONFIG, NO_ENVOY, Envoy, envoy_front, needs_envoy, poll
from tests.processes import ServerProcess, server_process

KUBERNETES_VERSION = "1.33.0"  # the schemas kubernetes-validate ships, offline
DRAINED_GRACE = 30.0  # the drained backend stays up (NOT_SERVING) this long with a turn running


# ---- Kubernetes --------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    found = [
        resource
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for resource in kubernetes_validate.resources_from_file(str(path))
    ]
    assert found, "no manifests under deploy/kubernetes"
    return found


def test_kubernetes_manifests_match_the_api_schema() -> None:
    """Strict: a misspelt or misplaced field fails, not only a wrong type."""
    for resource in manifests():
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {error.message}")


def test_kubernetes_replicas_probe_health_and_drain_within_the_grace_period() -> None:
    (replicas,) = [r for r in manifests() if r["kind"] in ("StatefulSet", "Deployment")]
    pod = replicas["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    known = {f for f in Settings.__dataclass_fields__} | set(ServerLimits.__dataclass_fields__)
    for name in env:
        if name.startswith("SESSIONGATE_"):
            key = name.removeprefix("SESSIONGATE_").lower()
            assert key in known, f"{name} is not a server setting"
    drain_grace = float(env["SESSIONGATE_DRAIN_GRACE"]["value"])
    # The drain must end (turns cancelled, agents stopped, server stopped) before SIGKILL.
    assert drain_grace + 5 <= pod["terminationGracePeriodSeconds"]
    assert env["SESSIONGATE_STATE_URL"]["valueFrom"]["secretKeyRef"]["key"]
    assert env["SESSIONGATE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "$(POD_IP)" in env["SESSIONGATE_ADVERTISE"]["value"]
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert "grpc" in container["livenessProbe"]
    (budget,) = [r for r in manifests() if r["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["selector"] == replicas["spec"]["selector"]


# ---- Envoy ---------------------------------------------------------------------------------


@needs_envoy
def test_envoy_accepts_the_config() -> None:
    assert ENVOY is not None
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(ENVOY_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    (cluster,) = config["static_resources"]["clusters"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME


@dataclass
class Front:
    """Envoy on an ephemeral port in front of two servers, each with one session of its own
    (a landmark: found through Envoy only when the call reached that server)."""

    envoy: Envoy
    backends: list[ServerProcess]
    landmarks: list[str]  # a session id on each backend, in the same order

    @property
    def stub(self) -> pb_grpc.SessionServiceStub:
        return self.envoy.stub

    def healthy(self) -> set[int]:
        """Backend ports Envoy's health checks currently pass (blocking: the admin API)."""
        return self.envoy.healthy()

    def log_tail(self) -> str:
        return self.envoy.log_tail()

    async def create(self, key: str | None = None) -> pb.Session:
        session: pb.Session = await self.stub.CreateSession(
            pb.CreateSessionRequest(), metadata=header(key), timeout=20
        )
        return session

    async def reached(self, key: str | None = None) -> ServerProcess:
        """The backend one call with this `session-id` header (or none) reaches through Envoy:
        the first backend's landmark is found there, and only there."""
        first, second = self.backends
        return first if await knows(self.stub, self.landmarks[0], header(key)) else second

    async def key_on(self, backend: ServerProcess) -> str:
        """A `session-id` header value that Envoy hashes onto `backend`."""
        for _ in range(40):  # each try lands on `backend` with probability 1/2
            key = uuid.uuid4().hex
            if await self.reached(key) is backend:
                return key
        raise AssertionError("40 keys never hashed onto one of two backends")

    async def backend_of(self, session_id: str) -> ServerProcess:
        """The one backend that knows this session (asked directly)."""
        owners = [b for b in self.backends if await knows(b.stub, session_id)]
        assert len(owners) == 1, f"session {session_id} is on {len(owners)} backends"
        return owners[0]


def header(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("session-id", key),) if key is not None else None


async def knows(
    stub: pb_grpc.SessionServiceStub, session_id: str, metadata: tuple[tuple[str, str], ...] | None = None
) -> bool:
    try:
        await stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return True


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def front(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Front]:
    if ENVOY is None:
        pytest.skip(NO_ENVOY)
    async with contextlib.AsyncExitStack() as stack:
        backends = [
            await stack.enter_async_context(
                server_process(tmp_path_factory.mktemp(f"backend-{i}"), drain_grace=DRAINED_GRACE)
            )
            for i in range(2)
        ]
        landmarks = [
            (await b.stub.CreateSession(pb.CreateSessionRequest(), timeout=20)).session_id for b in backends
        ]
        home = tmp_path_factory.mktemp("envoy")
        envoy = await stack.enter_async_context(envoy_front(home, [b.port for b in backends]))
        yield Front(envoy, backends, landmarks)


@needs_envoy
@pytest.mark.asyncio(loop_scope="module")
async def test_prompt_streams_through_envoy_with_events_intact(front: Front) -> None:
    key = await front.key_on(front.backends[0])
    session = await front.create(key)
    assert await front.backend_of(session.session_id) is front.backends[0]
    request = pb.PromptRequest(session_id=session.session_id, text="hello through envoy")
    events = [e async for e in front.stub.Prompt(request, metadata=header(key), timeout=30)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert kinds(events)[-1] == "result"
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    assert reply_text(events) == "hello through envoy"
    # The same turn straight to the backend streams the same kinds of events.
    direct = pb.PromptRequest(session_id=front.landmarks[0], text="hello through envoy")
    assert kinds([e async for e in front.backends[0].stub.Prompt(direct, timeout=30)]) == kinds(events)
    # Many events, fast: none lost, none reordered (a client behind the stream gets
    # consecutive chunks merged into fewer events).
    request = pb.PromptRequest(session_id=session.session_id, text="/flood 2000 200")
    events = [e async for e in front.stub.Prompt(request, metadata=header(key), timeout=60)]
    assert reply_text(events) == "".join(flood_chunk(i, 200) for i in range(2000))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN


@needs_envoy
@pytest.mark.asyncio(loop_scope="module")
async def test_one_session_id_header_lands_on_one_backend(front: Front) -> None:
    for backend in front.backends:
        key = await front.key_on(backend)
        for _ in range(10):
            assert await front.reached(key) is backend
        session = await front.create(key)
        assert await front.backend_of(session.session_id) is backend
        request = pb.PromptRequest(session_id=session.session_id, text="same backend")
        events = [e async for e in front.stub.Prompt(request, metadata=header(key), timeout=30)]
        assert reply_text(events) == "same backend"


@needs_envoy
@pytest.mark.asyncio(loop_scope="module")
async def test_calls_without_the_header_reach_any_backend(front: Front) -> None:
    seen: set[int] = set()
    for _ in range(30):  # random picks: both backends within 30 with probability 1 - 2**-29
        seen.add((await front.reached(None)).port)
        if len(seen) == 2:
            break
    assert seen == {b.port for b in front.backends}
    session = await front.create()  # a real call too: it starts an agent wherever it lands
    await front.backend_of(session.session_id)


@needs_envoy
@pytest.mark.asyncio(loop_scope="module")
async def test_a_draining_backend_leaves_the_ring_while_it_still_runs(front: Front) -> None:
    """Last in this module: it drains one backend. A turn keeps that backend alive (and
    NOT_SERVING) for its drain grace, so the calls that move to the other backend moved
    because of Envoy's health checks, not because a connection was refused."""
    drained, other = front.backends
    key = await front.key_on(drained)
    held = front.landmarks[0]
    turn = drained.stub.Prompt(pb.PromptRequest(session_id=held, text="/sleep 60"), timeout=90)

    async def busy() -> bool:
        found = await drained.stub.GetSession(pb.GetSessionRequest(session_id=held), timeout=5)
        return bool(found.state == pb.SESSION_STATE_BUSY)

    await poll("the held turn running", 15, busy)
    drained.process.send_signal(signal.SIGTERM)
    started = time.monotonic()

    async def created_elsewhere() -> pb.Session | None:
        try:
            return await front.create(key)
        except grpc.aio.AioRpcError as error:  # SHUTTING_DOWN until Envoy takes it out
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return None

    try:
        session = await poll("a create for the drained backend's key succeeding", 20, created_elsewhere)
        moved_after = time.monotonic() - started
        assert await front.backend_of(session.session_id) is other
        assert drained.process.poll() is None, "the drained backend exited before Envoy noticed"
        assert await drained.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.to_thread(front.healthy) == {other.port}
        for _ in range(10):  # with the key, and without any
            assert await front.reached(key) is other
            assert await front.reached(None) is other
        assert moved_after < DRAINED_GRACE / 2, f"took {moved_after:.1f}s\n{front.log_tail()}"
    finally:
        turn.cancel()


# ---- deploy/envoy-config.py: the Envoy config for other ports (docs/operations/replicas.md)

ENVOY_CONFIG_SCRIPT = DEPLOY / "envoy-config.py"


def envoy_config(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ENVOY_CONFIG_SCRIPT), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_envoy_config_script_prints_deploy_envoy_yaml_by_default() -> None:
    """The documented default and the script agree, comments included."""
    assert envoy_config() == ENVOY_CONFIG.read_text()
    ports = "--listen 127.0.0.1:8080 --admin 127.0.0.1:9901 127.0.0.1:50051 127.0.0.1:50052 127.0.0.1:50053"
    assert envoy_config(*ports.split()) == ENVOY_CONFIG.read_text()


@needs_envoy
def test_envoy_config_script_routes_to_the_ports_it_is_given(tmp_path: Path) -> None:
    assert ENVOY is not None
    text = envoy_config(
        "--listen", "127.0.0.1:18080", "--admin", "127.0.0.1:19901", "127.0.0.1:15001", "[::1]:15002"
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(text)
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    (cluster,) = config["static_resources"]["clusters"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]] == [
        {"address": "127.0.0.1", "port_value": 15001},
        {"address": "::1", "port_value": 15002},
    ]
    # Everything else is deploy/envoy.yaml's: the same health checks, routes and bounds.
    default = yaml.safe_load(ENVOY_CONFIG.read_text())
    for part in (config, default):
        part.pop("admin")
        part["static_resources"]["listeners"][0].pop("address")
        part["static_resources"]["clusters"][0].pop("load_assignment")
    assert config == default


def test_envoy_config_script_refuses_an_address_without_a_port() -> None:
    result = subprocess.run(
        [sys.executable, str(ENVOY_CONFIG_SCRIPT), "127.0.0.1"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "not HOST:PORT: '127.0.0.1'" in result.stderr
