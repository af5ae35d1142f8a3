"""A real PostgreSQL server for the tests, from the binaries in the `pgserver` wheel.

It runs in a temp dir on a loopback port, in its own process group, and is stopped (and its
directory removed) by the tests that started it. It asks for a password (scram-sha-256, as in
docs/operations/replicas.md), never trusting whoever reaches its port. PostgreSQL refuses to
run as root, so as root (CI) it runs as `nobody`. Each test gets a database of its own
(`fresh_database`), which is much cheaper than a server of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.groups import stop_group

START_TIMEOUT = 30.0


def binaries() -> Path:
    """The wheel's bin directory, found without importing pgserver (which has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PostgreSQL binaries (PyPI pgserver) are not installed (run `make test`)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    def __init__(self, process: subprocess.Popen[bytes], port: int, data: Path, password: str) -> None:
        self.process = process
        self.port = port
        self.data = data
        self.password = password
        self._databases = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    async def fresh_database(self) -> str:
        """A new empty database; its URL."""
        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        admin = await asyncpg.connect(self.url(), timeout=10)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close(timeout=10)
        return self.url(name)

    def log(self) -> str:
        path = self.data / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = binaries()
    root = Path(tempfile.mkdtemp(prefix="sessiongate-pg-"))
    data = root / "data"
    # PostgreSQL will not run as root: there it runs as nobody, through setpriv. Not Popen's
    # user=, which makes Python fork() with grpc loaded: grpc's fork handlers then run in the
    # child, and once a child died there before its exec ("epoll_wait error: Bad file descriptor").
    as_user: list[str] = []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        owner = (nobody.pw_uid, nobody.pw_gid)
        os.chown(root, *owner)
        as_user = ["setpriv", f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups", "--"]
    process: subprocess.Popen[bytes] | None = None
    password = secrets.token_urlsafe(16)
    password_file = root / "password"
    password_file.write_text(password + "\n")
    if owner is not None:
        os.chown(password_file, *owner)
    try:
        subprocess.run(
            [
                *as_user,
                *(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=scram-sha-256"),
                *("--pwfile", password_file, "-E", "UTF8", "--no-sync"),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = free_port()
        process = subprocess.Popen(
            [
                *as_user,
                *(bin_dir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port)),
                *("-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "max_connections=200"),
                *("-c", "logging_collector=off", "-c", "log_min_messages=warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(root / "server.log", "wb"),  # noqa: SIM115 (the child holds it)
            start_new_session=True,
        )
        server = PostgresServer(process, port, root, password)
        _wait_ready(server)
        yield server
    finally:
        if process is not None:
            stop_group(process, signal.SIGQUIT)  # immediate shutdown: the data is thrown away
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited at start: {server.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
            ready = subprocess.run(
                [binaries() / "pg_isready", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"],
                capture_output=True,
                timeout=10,
            )
            if ready.returncode == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not start within {START_TIMEOUT:g}s: {server.log()}")
