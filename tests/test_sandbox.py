"""Agents in a bubblewrap sandbox, for real: what a sandboxed agent can see and touch.

bwrap comes from Debian's `bubblewrap` package, which `.ci/run` installs when it runs as
root. Where it is missing these tests skip, saying so; the refusal to start a `bwrap` agent
without it is tested everywhere.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sessiongate.server.sandbox import launcher as sandbox
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ECHO, GateFactory, expect_error, reply_text

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bwrap is not installed (Debian package bubblewrap; .ci/run installs it as root)",
)


def boxed(**overrides: object) -> AgentConfig:
    """The built-in agent in the sandbox, keeping its sessions in its own (sandbox) home."""
    return AgentConfig(name="boxed", command=ECHO[0], args=ECHO[1:], sandbox="bwrap", **overrides)  # type: ignore[arg-type]


@pytest.fixture
def state_outside_tmp() -> Iterator[Path]:
    """A state dir outside /tmp (which the sandbox replaces anyway), to see it hidden."""
    path = Path(tempfile.mkdtemp(prefix="sessiongate-test-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def say(gate: object, session_id: str, text: str) -> str:
    stub = gate.stub  # type: ignore[attr-defined]
    return reply_text(
        [e async for e in stub.Prompt(pb.PromptRequest(session_id=session_id, text=text), timeout=30)]
    )


@needs_bwrap
async def test_a_sandboxed_agent_sees_no_server_process_no_state_and_writes_only_its_cwd(
    make_gate: GateFactory, tmp_path: Path, state_outside_tmp: Path
) -> None:
    state_db = state_outside_tmp / "sessions.db"
    gate = await make_gate(agents={"boxed": boxed()}, state_db=state_db)
    (gate.workdir / "project").mkdir()
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed", cwd="project"), timeout=30)
    sid = session.session_id

    # Its own PID namespace: the server's /proc entry (and environment) does not exist there.
    assert state_db.exists() and (Path("/proc") / str(os.getpid()) / "environ").exists()
    missing = "cannot read: No such file or directory"
    assert await say(gate, sid, f"/read /proc/{os.getpid()}/environ") == missing
    assert await say(gate, sid, f"/read {state_db}") == missing

    # Read-write in its cwd; nowhere else (the host's /tmp is not its /tmp, the root is read-only).
    assert await say(gate, sid, "/write made-inside.txt hello") == "wrote made-inside.txt"
    assert (gate.workdir / "project" / "made-inside.txt").read_text() == "hello"
    outside = tmp_path / "escaped.txt"
    await say(gate, sid, f"/write {outside} x")  # lands in its private /tmp, if anywhere
    await say(gate, sid, f"/write {state_outside_tmp}/escaped.txt x")  # its state dir is an empty tmpfs
    assert (await say(gate, sid, "/write /var/tmp/sessiongate-escaped.txt x")).startswith("cannot write")
    assert not outside.exists() and not Path("/var/tmp/sessiongate-escaped.txt").exists()
    assert not (state_outside_tmp / "escaped.txt").exists()

    # Its home is its own, read-write, under the state dir: the built-in agent keeps its
    # sessions there (so /history survives a restart of the agent).
    home = (await say(gate, sid, "/env HOME")).removeprefix("HOME=")
    assert home == str(state_outside_tmp / "homes" / "boxed")
    stored = list((Path(home) / ".local" / "state" / "sessiongate" / "echo-agent" / "sessions").iterdir())
    assert stored, "the agent's session record was written into its home"


@needs_bwrap
async def test_a_symlink_swapped_in_after_create_does_not_move_the_agent_out_of_its_roots(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await make_gate(agents={"boxed": boxed()})
    project = gate.workdir / "project"
    project.mkdir()
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed", cwd="project"), timeout=30)
    sid = session.session_id
    assert await say(gate, sid, "/write first.txt 1") == "wrote first.txt"

    # Swap the directory for a symlink to a place outside the allowed roots.
    outside = tmp_path / "outside"
    outside.mkdir()
    project.rename(gate.workdir / "project.moved")
    project.symlink_to(outside)

    # The running agent stays in the directory it was started in.
    assert await say(gate, sid, "/write second.txt 2") == "wrote second.txt"
    assert (gate.workdir / "project.moved" / "second.txt").read_text() == "2"
    assert not (outside / "second.txt").exists()

    # A restarted agent is checked again: the session's directory now leads outside the roots.
    await expect_error(gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="/crash"), timeout=30))
    error = await expect_error(gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="hi"), timeout=30))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "CWD_NOT_ALLOWED"
    # Named as the caller knows it, never where it leads as the server resolves it.
    assert "outside the allowed roots" in error.message and str(outside) not in error.message
    assert not list(outside.iterdir()), "no agent ran in the outside directory"

    # The session stays listed; put the directory back and it works again.
    listed = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
    assert sid in [s.session_id for s in listed.sessions]
    project.unlink()
    (gate.workdir / "project.moved").rename(project)
    assert await say(gate, sid, "/write third.txt 3") == "wrote third.txt"
    assert (project / "third.txt").exists()


@needs_bwrap
async def test_network_false_leaves_the_agent_only_a_loopback_of_its_own(make_gate: GateFactory) -> None:
    gate = await make_gate(agents={"boxed": boxed(network=False)})
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    interfaces = await say(gate, session.session_id, "/read /proc/net/dev")
    assert "lo:" in interfaces
    names = [line.split(":")[0].strip() for line in interfaces.splitlines()[2:] if ":" in line]
    assert names == ["lo"]


async def test_without_bwrap_a_bwrap_agent_is_refused_and_others_run_unconfined(
    make_gate: GateFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    default = AgentConfig(name="plain", command=ECHO[0], args=ECHO[1:])  # sandbox unset
    gate = await make_gate(agents={"boxed": boxed(), "plain": default})
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "agent 'boxed' must run in a bubblewrap sandbox, and bwrap is not installed" in messages
    assert "agent=plain runs unconfined: bwrap is not installed" in messages

    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30))
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "AGENT_UNAVAILABLE"
    assert "bubblewrap" in error.message
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="plain"), timeout=30)
    assert await say(gate, session.session_id, "unconfined works") == "unconfined works"


@needs_bwrap
@pytest.mark.skipif(
    os.geteuid() != 0, reason="starting an agent as another user needs the server to run as root"
)
async def test_an_agent_with_a_user_runs_as_that_user_in_the_sandbox(
    make_gate: GateFactory, state_outside_tmp: Path
) -> None:
    # The built-in agent's interpreter may live where another user cannot reach it (/root), so
    # this agent is a shell that records who it runs as, and where, then exits: the create
    # fails, the record stays. Its directories must be reachable by that user (not /tmp/pytest-of-root).
    state_outside_tmp.chmod(0o755)
    workdir, home = state_outside_tmp / "work", state_outside_tmp / "home-of-nobody"
    (workdir / "shared").mkdir(parents=True)
    (workdir / "shared").chmod(0o777)
    record = 'echo "$(id -u) $(id -g) $HOME $PWD" > who.txt; ls /proc | grep -c "^[0-9]" >> who.txt'
    agent = AgentConfig(
        name="shell", command="/bin/sh", args=("-c", record), sandbox="bwrap", user="nobody", home=str(home)
    )
    gate = await make_gate(agents={"shell": agent}, settings={"workdir": workdir})
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="shell", cwd="shared")))
    assert error.reason == "AGENT_UNAVAILABLE"
    identity, processes = (workdir / "shared" / "who.txt").read_text().splitlines()
    nobody = pwd.getpwnam("nobody")
    assert identity.split() == [str(nobody.pw_uid), str(nobody.pw_gid), str(home), str(workdir / "shared")]
    assert home.stat().st_uid == nobody.pw_uid
    assert int(processes) <= 5, "its own PID namespace: bwrap's init, sh, ls, grep"


@needs_bwrap
async def test_a_cwd_that_contains_the_state_dir_does_not_show_it_again(
    make_gate: GateFactory, state_outside_tmp: Path
) -> None:
    # The server runs in the project whose tree holds its state (a server started in $HOME
    # with its state under ~/.local/state is the common case).
    project = state_outside_tmp / "project"
    state_db = project / "state" / "sessions.db"
    project.mkdir()
    gate = await make_gate(
        agents={"boxed": boxed()}, state_db=state_db, settings={"workdir": project, "allowed_roots": ()}
    )
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    sid = session.session_id
    assert state_db.exists()
    assert await say(gate, sid, "/read state/sessions.db") == "cannot read: No such file or directory"
    await say(gate, sid, "/write state/planted.txt x")  # into an empty tmpfs, if anywhere
    assert not (project / "state" / "planted.txt").exists()
    # Its own home, under the state dir, is still its own and works.
    assert await say(gate, sid, "/write made-here.txt y") == "wrote made-here.txt"
    assert (await say(gate, sid, "/history")).startswith("3 earlier turns")


@needs_bwrap
async def test_a_cwd_inside_the_state_dir_is_the_agents_own_and_the_rest_stays_hidden(
    make_gate: GateFactory, state_outside_tmp: Path
) -> None:
    state = state_outside_tmp / "state"
    workdir = state / "work"
    workdir.mkdir(parents=True)
    gate = await make_gate(
        agents={"boxed": boxed()},
        state_db=state / "sessions.db",
        settings={"workdir": workdir, "allowed_roots": ()},
    )
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    sid = session.session_id
    assert await say(gate, sid, "/write mine.txt z") == "wrote mine.txt"
    assert (workdir / "mine.txt").read_text() == "z"
    assert await say(gate, sid, f"/read {state / 'sessions.db'}") == "cannot read: No such file or directory"
