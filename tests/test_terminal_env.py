"""The environment a terminal asks for (`terminal/create`'s `env`) reaches its command inside
the confinement only, never a process on the host side of it (bwrap, setpriv), and the names
that load code at start-up (LD_* ...) are refused.

The attack (issue 20, item 1): an agent builds a shared object in its cwd and asks for
`terminal/create(command, env=[LD_PRELOAD=<it>])`; bwrap or setpriv, started by the gateway on
the host with that environment, ran the object's constructor outside the sandbox, as root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import acp
import pytest
from acp import schema
from sessiongate.server.sandbox import terminals
from sessiongate.server.sandbox.launcher import Launcher
from sessiongate.server.sandbox.terminals import Terminals
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ECHO, GateFactory, reply_text

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bwrap is not installed (Debian package bubblewrap; .ci/run installs it as root)",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a terminal as another user needs root")

PAYLOAD = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void payload(void) {
    FILE *marker = fopen(MARKER, "a");
    if (marker) {
        fprintf(marker, "ran uid=%d pid=%d\n", (int)getuid(), (int)getpid());
        fclose(marker);
    }
}
"""


def build_payload(where: Path, marker: Path) -> Path:
    """The attacker's shared object: its constructor appends to `marker` wherever it can."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the attacker's shared object cannot be built")
    source, library = where / "evil.c", where / "evil.so"
    source.write_text(PAYLOAD)
    subprocess.run(
        [gcc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)],
        check=True,
        timeout=60,
    )
    library.chmod(0o755)
    return library


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory another user (nobody) can reach, outside /tmp (private in the sandbox)."""
    path = Path(tempfile.mkdtemp(prefix="sessiongate-env-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host_only(tmp_path: Path) -> Path:
    """Where only a host-side process running as the server's user can write: not the sandbox
    (its /tmp is its own), not another user (0700)."""
    path = tmp_path / "host-only"
    path.mkdir(mode=0o700)
    return path


# ---- end to end: the built-in agent as the attacker, in the bwrap sandbox --------------------


def boxed() -> AgentConfig:
    return AgentConfig(
        name="boxed", command=ECHO[0], args=ECHO[1:], sandbox="bwrap", client_fs=True, client_terminal=True
    )


async def prompt(gate: Any, session_id: str, text: str) -> AsyncIterator[pb.PromptEvent]:
    async for event in gate.stub.Prompt(pb.PromptRequest(session_id=session_id, text=text), timeout=60):
        yield event


@needs_bwrap
async def test_ld_preload_from_a_sandboxed_agent_never_runs_on_the_host(
    make_gate: GateFactory, host_only: Path
) -> None:
    gate = await make_gate(agents={"boxed": boxed()})
    sid = (await gate.create(agent="boxed")).session_id
    marker = host_only / "marker"
    library = build_payload(gate.workdir.resolve(), marker)
    for name in ("LD_PRELOAD", "LD_AUDIT"):
        events = [e async for e in prompt(gate, sid, f"/terminal-env {name}={library} true")]
        reply = reply_text(events)
        assert not marker.exists(), marker.read_text()  # "ran uid=0 ..." before the fix
        assert reply.startswith("terminal error -32602:") and name in reply, reply


def host_side(token: str) -> list[tuple[list[str], bytes]]:
    """(argv, environment) of every bwrap or setpriv process whose arguments hold `token`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if any(token in a for a in argv) and Path(argv[0]).name in ("bwrap", "setpriv"):
                found.append((argv, (entry / "environ").read_bytes()))
        except OSError:  # gone meanwhile
            continue
    return found


@needs_bwrap
async def test_a_terminals_env_reaches_the_sandboxed_command_and_no_host_side_process(
    make_gate: GateFactory,
) -> None:
    gate = await make_gate(agents={"boxed": boxed()})
    sid = (await gate.create(agent="boxed")).session_id
    token = f"env-test-{os.getpid()}"
    release = gate.workdir / "release"
    # Prints FOO as it sees it, then waits (bounded) until the test has looked at the host side.
    command = f'echo "[$FOO]"; for i in $(seq 300); do [ -e release ] && break; sleep 0.1; done # {token}'
    events, seen = [], None
    async for event in prompt(gate, sid, f"/terminal-env FOO=bar-{token} {command}"):
        events.append(event)
        if seen is None and event.HasField("terminal_output") and "[" in event.terminal_output.output:
            seen = await asyncio.to_thread(host_side, token)
            release.touch()
    assert reply_text(events) == f"terminal exit 0 truncated=false: [bar-{token}]\n"
    assert seen, "the terminal's bwrap process was not found"
    for argv, environ in seen:
        assert b"PATH=" in environ  # read for real
        assert b"FOO=" not in environ, argv


# ---- unit level: every path, the Spawn the launcher builds -----------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The argv and environment of every process the terminals start on the host."""
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    def spy(argv: Any, **kwargs: Any) -> Any:
        calls.append({"argv": list(argv), "env": dict(kwargs.get("env") or {})})
        return real(argv, **kwargs)

    monkeypatch.setattr(terminals.subprocess, "Popen", spy)
    return calls


async def run(owner: Terminals, cwd: Path, argv: list[str], env: list[schema.EnvVariable]) -> str:
    tid = await owner.create("s", str(cwd), argv[0], argv[1:], env)
    try:
        exited = await asyncio.wait_for(owner.wait_for_exit("s", tid), 30)
        output = owner.output("s", tid).output
        assert exited.exit_code == 0, output
        return output
    finally:
        await owner.release("s", tid)


@pytest.mark.parametrize(
    "user", ["", pytest.param("nobody", marks=needs_root)], ids=["unconfined", "setpriv"]
)
async def test_unsandboxed_the_env_skips_setpriv_and_ld_preload_is_refused(
    user: str, reachable: Path, host_only: Path, started: list[dict[str, Any]]
) -> None:
    config = AgentConfig(name="t", command="sh", sandbox="none", user=user, home=str(reachable / "home"))
    owner = Terminals(config, Launcher(), lambda _sid, _report: None, inherited=("PATH",))
    cwd = reachable / "cwd"
    cwd.mkdir(mode=0o777)
    marker = host_only / "marker"
    library = build_payload(reachable, marker)
    started.clear()  # gcc's
    try:
        refused: acp.RequestError | None = None
        try:
            tid = await owner.create(
                "s", str(cwd), "true", [], [schema.EnvVariable(name="LD_PRELOAD", value=str(library))]
            )
        except acp.RequestError as exc:
            refused = exc
        else:
            await asyncio.wait_for(owner.wait_for_exit("s", tid), 30)
        assert not marker.exists(), marker.read_text()  # "ran uid=0 ..." (setpriv) before the fix
        assert refused is not None and refused.code == -32602 and "LD_PRELOAD" in str(refused)

        output = await run(
            owner, cwd, ["sh", "-c", 'echo "[$FOO] $(id -u)"'], [schema.EnvVariable(name="FOO", value="bar")]
        )
        assert output == f"[bar] {os.getuid() if not user else 65534}\n"
        (call,) = started
        assert "FOO" not in call["env"]  # not in what setpriv (or env) starts with...
        assert call["argv"].index("FOO=bar") > (call["argv"].index("--") if user else -1)  # ...only after it
    finally:
        await owner.release_all()


@pytest.fixture
async def owner(tmp_path: Path) -> AsyncIterator[tuple[Terminals, Path]]:
    config = AgentConfig(name="t", command="sh", sandbox="none")
    terms = Terminals(config, Launcher(), lambda _sid, _report: None, inherited=("PATH",))
    yield terms, tmp_path
    await terms.release_all()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LD_PRELOAD", "/x.so"),
        ("LD_LIBRARY_PATH", "/x"),
        ("LD_AUDIT", "/x.so"),
        ("GCONV_PATH", "/x"),
        ("GLIBC_TUNABLES", "glibc.malloc.check=3"),
        ("SESSIONGATE_AGENT_ID", "0"),
        ("", "x"),
        ("A=B", "x"),
        ("A\0B", "x"),
        ("N" * (terminals.MAX_ENV_NAME_BYTES + 1), "x"),
        ("LD_" + "x" * 100_000, "x"),
        ("FOO", "a\0b"),
        ("FOO", "x" * (terminals.MAX_ENV_VALUE_BYTES + 1)),
    ],
)
async def test_names_that_load_code_and_malformed_ones_are_refused_briefly(
    owner: tuple[Terminals, Path], name: str, value: str, started: list[dict[str, Any]]
) -> None:
    terms, cwd = owner
    with pytest.raises(acp.RequestError) as refused:
        await terms.create("s", str(cwd), "true", [], [schema.EnvVariable(name=name, value=value)])
    assert refused.value.code == -32602
    assert len(str(refused.value)) < 600  # never the whole name or value
    assert not started and len(terms) == 0


async def test_env_is_set_after_the_command_starts_not_parsed_from_it(
    owner: tuple[Terminals, Path], started: list[dict[str, Any]]
) -> None:
    terms, cwd = owner
    odd = [schema.EnvVariable(name="-u", value="PATH"), schema.EnvVariable(name="--x", value="y z")]
    assert (
        await run(terms, cwd, ["printenv", "--", "-u", "--x", "PATH"], odd)
        == f"PATH\ny z\n{os.environ['PATH']}\n"
    )
    # `env` would take a command named like a variable for one: refused, clearly.
    with pytest.raises(acp.RequestError, match="'='"):
        await terms.create("s", str(cwd), "a=b", [], [schema.EnvVariable(name="FOO", value="bar")])
