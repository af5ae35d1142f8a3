"""The client capabilities the gateway offers agents: a file system confined to the session's
directory (`client_fs`) and terminals run like the agent itself (`client_terminal`).

Unit tests pin down the confinement of server/sandbox/files.py and the life of a terminal in
server/sandbox/terminals.py; end-to-end tests drive them through the built-in agent's directives
`/fs-read`, `/fs-write` and `/terminal` against a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import acp
import pytest
from acp import schema
from sessiongate.server.sandbox import files as client_fs
from sessiongate.server.sandbox import terminals
from sessiongate.server.sandbox.files import FileWriteReport
from sessiongate.server.sandbox.launcher import Launcher
from sessiongate.server.sandbox.terminals import TerminalReport, Terminals
from sessiongate.server.settings import AgentConfig, ConfigError, _agent_from_toml
from sessiongate.server.turns.translate import to_event
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import (
    ECHO,
    Gate,
    GateFactory,
    alive,
    echo_agent,
    eventually,
    idle_cgroup_parent,
    proc_stat,
    reply_text,
)

# ---- client_fs: confinement, unit level ------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A session directory (real path) and a directory outside it holding a secret."""
    cwd = (tmp_path / "cwd").resolve()
    outside = (tmp_path / "outside").resolve()
    (cwd / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (cwd / "notes.txt").write_text("one\ntwo\nthree\nfour\n")
    (cwd / "link.txt").symlink_to(outside / "secret.txt")
    (cwd / "dirlink").symlink_to(outside)
    return cwd, outside


def fs_error(call: Callable[..., object], *args: object) -> acp.RequestError:
    with pytest.raises(acp.RequestError) as caught:
        call(*args)
    return caught.value


def test_read_returns_the_lines_asked_for(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    notes = str(cwd / "notes.txt")
    assert client_fs.read_text_file(str(cwd), notes) == "one\ntwo\nthree\nfour\n"
    assert client_fs.read_text_file(str(cwd), notes, 2, 2) == "two\nthree\n"
    assert client_fs.read_text_file(str(cwd), notes, 4) == "four\n"
    assert client_fs.read_text_file(str(cwd), notes, 9) == ""
    assert client_fs.read_text_file(str(cwd), notes, 1, 0) == ""
    assert client_fs.read_text_file(str(cwd), "notes.txt", None, 1) == "one\n"  # relative: in the cwd


def test_paths_outside_the_cwd_are_refused(tree: tuple[Path, Path]) -> None:
    cwd, outside = tree
    secret = str(outside / "secret.txt")
    for path in (f"{cwd}/../outside/secret.txt", "../outside/secret.txt", secret, "/etc/passwd", f"{cwd}x/a"):
        error = fs_error(client_fs.read_text_file, str(cwd), path)
        assert error.code == -32602, path
        error = fs_error(client_fs.write_text_file, str(cwd), path, "pwned")
        assert error.code == -32602, path
    assert (outside / "secret.txt").read_text() == "secret\n"
    assert fs_error(client_fs.read_text_file, str(cwd), str(cwd)).code == -32602  # a directory


def test_symbolic_links_are_never_followed(tree: tuple[Path, Path]) -> None:
    cwd, outside = tree
    for path in (cwd / "link.txt", cwd / "dirlink" / "secret.txt", cwd / "dirlink" / "new.txt"):
        error = fs_error(client_fs.read_text_file, str(cwd), str(path))
        assert error.code == -32602 and "symbolic link" in str(error), path
        error = fs_error(client_fs.write_text_file, str(cwd), str(path), "pwned")
        assert error.code == -32602 and "symbolic link" in str(error), path
    assert (outside / "secret.txt").read_text() == "secret\n"
    assert not (outside / "new.txt").exists()
    assert (cwd / "link.txt").is_symlink()  # not replaced either


def test_a_session_directory_reached_through_a_link_is_refused(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    cwd, _ = tree
    (tmp_path / "cwdlink").symlink_to(cwd)
    error = fs_error(
        client_fs.read_text_file, str(tmp_path / "cwdlink"), str(tmp_path / "cwdlink" / "notes.txt")
    )
    assert error.code == -32603 and "symbolic link" in str(error)


def test_hidden_paths_are_refused_unless_the_cwd_is_inside_them(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    (cwd / "sub" / "sessions.db").write_text("db")
    hidden = (cwd / "sub",)
    error = fs_error(client_fs.read_text_file, str(cwd), str(cwd / "sub" / "sessions.db"), None, None, hidden)
    assert error.code == -32602 and "hidden" in str(error)
    assert client_fs.read_text_file(str(cwd / "sub"), "sessions.db", None, None, hidden) == "db"


def test_writes_replace_the_file_make_directories_and_report(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    report = client_fs.write_text_file(str(cwd), str(cwd / "new" / "deep" / "file.txt"), "héllo")
    assert report == FileWriteReport(str(cwd / "new" / "deep" / "file.txt"), len("héllo".encode()), True)
    (cwd / "notes.txt").chmod(0o640)
    report = client_fs.write_text_file(str(cwd), "notes.txt", "replaced")
    assert report.created is False and report.bytes == 8
    assert (cwd / "notes.txt").read_text() == "replaced"
    assert (cwd / "notes.txt").stat().st_mode & 0o777 == 0o640  # its permissions kept
    assert not [p for p in cwd.iterdir() if p.name.startswith(".sessiongate-")]  # no temp file left


def test_fifos_and_devices_are_not_files(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    os.mkfifo(cwd / "fifo")
    assert fs_error(client_fs.read_text_file, str(cwd), "fifo").code == -32602  # and it did not block
    assert fs_error(client_fs.write_text_file, str(cwd), "fifo", "x").code == -32602


def test_size_limits(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    with open(cwd / "big.log", "wb") as handle:
        handle.truncate(client_fs.MAX_READ_BYTES + 1)
    error = fs_error(client_fs.read_text_file, str(cwd), "big.log")
    assert error.code == -32602 and "read limit" in str(error)
    error = fs_error(client_fs.write_text_file, str(cwd), "huge.txt", "x" * (client_fs.MAX_WRITE_BYTES + 1))
    assert error.code == -32602 and "write limit" in str(error)
    assert not (cwd / "huge.txt").exists()


def test_error_messages_are_bounded(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    error = fs_error(client_fs.read_text_file, str(cwd), "/" + "x" * 100_000)
    assert len(str(error).encode()) <= 500 and len(str(error.data).encode()) <= 500


async def test_missing_files_are_not_found(tree: tuple[Path, Path]) -> None:
    cwd, _ = tree
    for path in ("nope.txt", "nope/deeper.txt"):
        with pytest.raises(acp.RequestError) as caught:
            await client_fs.read(str(cwd), path)
        assert caught.value.code == -32002


def test_capability_settings_are_validated() -> None:
    table = {"command": "agent", "client_fs": True, "client_terminal": True}
    config = _agent_from_toml("a", table)
    assert config.client_fs and config.client_terminal
    assert not _agent_from_toml("b", {"command": "agent"}).client_fs
    with pytest.raises(ConfigError, match="client_fs"):
        _agent_from_toml("c", {"command": "agent", "client_fs": "yes"})


# ---- terminals, unit level -------------------------------------------------------------------


@pytest.fixture
async def terms(tmp_path: Path) -> AsyncIterator[tuple[Terminals, list[TerminalReport], Path]]:
    reports: list[TerminalReport] = []
    config = AgentConfig(name="t", command="sh", sandbox="none")
    owner = Terminals(config, Launcher(), lambda _sid, report: reports.append(report), inherited=("PATH",))
    cwd = (tmp_path / "cwd").resolve()
    (cwd / "sub").mkdir(parents=True)
    yield owner, reports, cwd
    await owner.release_all()


async def test_a_terminal_runs_in_the_session_directory_and_reports(
    terms: tuple[Terminals, list[TerminalReport], Path],
) -> None:
    owner, reports, cwd = terms
    env = [schema.EnvVariable(name="GREETING", value="hi")]
    tid = await owner.create("s", str(cwd), "sh", ["-c", 'pwd; echo "$GREETING"; exit 3'], env, "sub")
    exited = await asyncio.wait_for(owner.wait_for_exit("s", tid), 10)
    assert exited.exit_code == 3 and exited.signal is None
    output = owner.output("s", tid)
    assert output.output == f"{cwd / 'sub'}\nhi\n" and not output.truncated
    assert output.exit_status is not None and output.exit_status.exit_code == 3
    assert "".join(r.output_delta for r in reports) == output.output
    assert reports[-1].exited and reports[-1].exit_code == 3
    await owner.release("s", tid)
    assert len(owner) == 0
    with pytest.raises(acp.RequestError):
        owner.output("s", tid)


async def test_terminal_output_is_cut_from_the_start_at_a_character_boundary(
    terms: tuple[Terminals, list[TerminalReport], Path],
) -> None:
    owner, _, cwd = terms
    tid = await owner.create(
        "s", str(cwd), "sh", ["-c", "for i in $(seq 50); do printf 'é%03d' $i; done"], None, None, 11
    )
    await asyncio.wait_for(owner.wait_for_exit("s", tid), 10)
    output = owner.output("s", tid)
    assert output.truncated and len(output.output.encode()) <= 11
    assert output.output.endswith("é050") and "\ufffd" not in output.output


async def test_terminal_directories_outside_the_session_are_refused(
    terms: tuple[Terminals, list[TerminalReport], Path],
) -> None:
    owner, _, cwd = terms
    (cwd / "escape").symlink_to("/")
    for where in ("..", "/tmp", "escape"):
        with pytest.raises(acp.RequestError) as caught:
            await owner.create("s", str(cwd), "true", None, None, where)
        assert caught.value.code == -32602, where
    with pytest.raises(acp.RequestError):
        await owner.create("s", None, "true")  # a session we never opened
    assert len(owner) == 0


async def test_terminals_are_bounded_killed_and_reaped(
    terms: tuple[Terminals, list[TerminalReport], Path],
) -> None:
    owner, reports, cwd = terms
    ids = [
        await owner.create("s", str(cwd), "sh", ["-c", "sleep 60 & echo $! > tmp-$$; mv tmp-$$ pid-$$; wait"])
        for _ in range(terminals.MAX_TERMINALS)
    ]
    with pytest.raises(acp.RequestError, match="too many terminals"):
        await owner.create("s", str(cwd), "true")
    # Each pid file is written aside and renamed into place, so a file seen is a whole pid.
    await eventually(lambda: len(list(cwd.glob("pid-*"))) == len(ids), what="every command started")
    pids = {int(p.read_text()) for p in cwd.glob("pid-*")}
    try:
        owner.kill("s", ids[0])
        exited = await asyncio.wait_for(owner.wait_for_exit("s", ids[0]), 10)
        assert exited.signal == "SIGKILL"
        await owner.release_session("other")  # not theirs
        assert len(owner) == len(ids)
        await owner.release_session("s")
        assert len(owner) == 0
        await eventually(lambda: not any(alive(p) for p in pids), what="the background children ended")
        assert any(r.exited for r in reports)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("cleanup", ["release_session", "release_all", "kill_all"])
async def test_a_terminal_created_during_a_cleanup_is_refused(
    terms: tuple[Terminals, list[TerminalReport], Path], monkeypatch: pytest.MonkeyPatch, cleanup: str
) -> None:
    """A create still opening its directories when its turn ends (or the agent stops) does not
    start its command afterwards: the clean-up did not see it, so nothing would end it."""
    owner, _, cwd = terms
    opened = client_fs.open_directory_async
    inside, go_on = asyncio.Event(), asyncio.Event()

    async def slow_open(*args: object) -> tuple[str, int]:
        inside.set()
        await go_on.wait()
        return await opened(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(client_fs, "open_directory_async", slow_open)
    other = asyncio.create_task(owner.create("other", str(cwd), "true"))  # another session's
    create = asyncio.create_task(owner.create("s", str(cwd), "sh", ["-c", "echo $$ > pid; exec sleep 60"]))
    try:
        await asyncio.wait_for(inside.wait(), 10)
        if cleanup == "release_session":
            await owner.release_session("s")
        elif cleanup == "release_all":
            await owner.release_all()
        else:
            owner.kill_all()
        go_on.set()
        with pytest.raises(acp.RequestError) as caught:
            await asyncio.wait_for(create, 10)
        assert caught.value.code == -32603
        if cleanup == "release_session":  # only that session's creates are refused
            tid = await asyncio.wait_for(other, 10)
            assert list(owner._terminals) == [tid]
        else:
            with pytest.raises(acp.RequestError):
                await asyncio.wait_for(other, 10)
            assert len(owner) == 0
            with pytest.raises(acp.RequestError, match="being stopped"):  # and none from now on
                await owner.create("s", str(cwd), "true")
        assert all(t.session_id != "s" for t in owner._terminals.values())
        await asyncio.sleep(0.2)
        assert not (cwd / "pid").exists()  # the command never ran
    finally:
        go_on.set()
        for task in (create, other):
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int((cwd / "pid").read_text()), signal.SIGKILL)


def test_reports_translate_to_events() -> None:
    event = to_event(3, FileWriteReport("/w/a.txt", 5, True))
    assert event.seq == 3 and event.file_write == pb.FileWrite(path="/w/a.txt", bytes=5, created=True)
    event = to_event(4, TerminalReport("term-1", "out", True, exited=True, signal="SIGKILL"))
    assert event.terminal_output == pb.TerminalOutput(
        terminal_id="term-1", output="out", truncated=True, exited=True, signal="SIGKILL"
    )


# ---- end to end, through the built-in agent ---------------------------------------------------


def capable(tmp_path: Path, name: str = "capable") -> AgentConfig:
    config = echo_agent(name, tmp_path / "agent-state")
    return dataclasses.replace(config, client_fs=True, client_terminal=True)


async def say(gate: Gate, session_id: str, text: str) -> tuple[str, list[pb.PromptEvent]]:
    events = await gate.prompt(session_id, text)
    assert events[-1].HasField("result"), events[-1]
    return reply_text(events), events


async def capable_session(make_gate: GateFactory, tmp_path: Path) -> tuple[Gate, str]:
    gate = await make_gate(agents={"capable": capable(tmp_path)})
    session = await gate.create(agent="capable")
    return gate, session.session_id


async def test_fs_read_and_write_through_the_agent(make_gate: GateFactory, tmp_path: Path) -> None:
    gate, sid = await capable_session(make_gate, tmp_path)
    work = gate.workdir.resolve()
    (work / "notes.txt").write_text("alpha\nbeta\ngamma\ndelta\n")
    assert (await say(gate, sid, "/fs-read notes.txt 2 2"))[0] == "beta\ngamma\n"

    reply, events = await say(gate, sid, "/fs-write made.txt hello there")
    assert reply == "fs wrote made.txt"
    assert (work / "made.txt").read_text() == "hello there"
    writes = [e.file_write for e in events if e.HasField("file_write")]
    assert writes == [pb.FileWrite(path=str(work / "made.txt"), bytes=11, created=True)]
    _, events = await say(gate, sid, "/fs-write made.txt again")
    assert [e.file_write.created for e in events if e.HasField("file_write")] == [False]


async def test_fs_escapes_are_refused_through_the_agent(make_gate: GateFactory, tmp_path: Path) -> None:
    gate, sid = await capable_session(make_gate, tmp_path)
    work = gate.workdir.resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (work / "link.txt").symlink_to(outside / "secret.txt")
    (work / "dirlink").symlink_to(outside)
    for text in (
        "/fs-read ../outside/secret.txt",
        f"/fs-read {outside / 'secret.txt'}",
        "/fs-read link.txt",
        "/fs-read dirlink/secret.txt",
        "/fs-write ../outside/new.txt x",
        "/fs-write link.txt pwned",
        "/fs-write dirlink/new.txt pwned",
    ):
        reply, events = await say(gate, sid, text)
        assert reply.startswith("fs error -32602:"), (text, reply)
        assert not [e for e in events if e.HasField("file_write")]
    assert (outside / "secret.txt").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    (work / "big.txt").touch()
    os.truncate(work / "big.txt", client_fs.MAX_READ_BYTES + 1)  # sparse
    reply, _ = await say(gate, sid, "/fs-read big.txt")
    assert reply.startswith("fs error -32602:") and "read limit" in reply


async def test_capabilities_are_off_by_default(make_gate: GateFactory) -> None:
    gate = await make_gate()
    sid = (await gate.create()).session_id
    (gate.workdir / "notes.txt").write_text("hello")
    assert (await say(gate, sid, "/fs-read notes.txt"))[0].startswith("fs error -32601:")
    assert (await say(gate, sid, "/fs-write notes.txt x"))[0].startswith("fs error -32601:")
    assert (await say(gate, sid, "/terminal echo hi"))[0].startswith("terminal error -32601:")
    assert (gate.workdir / "notes.txt").read_text() == "hello"


async def test_terminal_output_reaches_the_client_bounded(make_gate: GateFactory, tmp_path: Path) -> None:
    gate, sid = await capable_session(make_gate, tmp_path)
    reply, events = await say(gate, sid, "/terminal echo hello from the terminal")
    assert reply == "terminal exit 0 truncated=false: hello from the terminal\n"
    outputs = [e.terminal_output for e in events if e.HasField("terminal_output")]
    shown = [c.terminal_id for e in events if e.HasField("tool_call") for c in e.tool_call.content]
    assert outputs and {o.terminal_id for o in outputs} == set(shown)
    assert "".join(o.output for o in outputs) == "hello from the terminal\n"
    assert outputs[-1].exited and outputs[-1].exit_code == 0

    reply, _ = await say(gate, sid, "/terminal --limit 100 head -c 5000 /dev/zero | tr '\\0' a; exit 2")
    head, _, output = reply.partition(": ")
    assert head == "terminal exit 2 truncated=true"
    assert 0 < len(output.encode()) <= 100 and set(output) == {"a"}


async def test_a_silent_command_longer_than_the_stall_timeout_does_not_stall_the_turn(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    """The agent waiting for a command we run (terminal/wait_for_exit) is not silence."""
    gate = await make_gate(agents={"capable": capable(tmp_path)}, stall_timeout=1.0)
    sid = (await gate.create(agent="capable")).session_id
    reply, _ = await say(gate, sid, "/terminal sleep 3; echo done")
    assert reply == "terminal exit 0 truncated=false: done\n"


async def test_a_kept_terminal_ends_with_its_turn(make_gate: GateFactory, tmp_path: Path) -> None:
    gate, sid = await capable_session(make_gate, tmp_path)
    pid_file = gate.workdir / "sleeper.pid"
    reply, _ = await say(gate, sid, f"/terminal --keep sleep 60 & echo $! > {pid_file}; echo started; wait")
    assert reply.startswith("terminal kept ")
    pid = int(pid_file.read_text())  # written before the output the agent waited for
    try:
        await eventually(lambda: not alive(pid), timeout=5, what="the kept command ended with the turn")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_a_kept_terminal_ends_when_the_session_closes(make_gate: GateFactory, tmp_path: Path) -> None:
    gate, sid = await capable_session(make_gate, tmp_path)
    pid_file = gate.workdir / "closer.pid"
    reply, _ = await say(gate, sid, f"/terminal --keep echo $$ > {pid_file}; echo started; exec sleep 60")
    assert reply.startswith("terminal kept ")
    pid = int(pid_file.read_text())  # written before the output the agent waited for
    try:
        await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=15)
        await eventually(lambda: not alive(pid), timeout=5, what="the kept command ended with its session")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def autogroups_on() -> bool:
    """Whether the kernel schedules each session as a group (so agents' sessions are lowered too)."""
    switch = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return switch.exists() and switch.read_text().strip() == "1"


def niceness(pid: int) -> int:
    return int(proc_stat(pid)[16])


async def test_agents_and_their_terminals_run_below_the_gateways_cpu_priority(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    """An agent starts `nice` steps below the gateway (so does what it has the client run), and
    an agent at 0 (the default) at the gateway's own priority: agents taking every core leave the gateway's
    work, which every session waits on, to run first. Where the kernel schedules each session
    as a group (autogroups), the agent's and each terminal's session get that nice too."""
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    grouped = autogroups_on()
    agents = {
        "low": dataclasses.replace(capable(tmp_path / "low", "low"), nice=7),
        "level": dataclasses.replace(capable(tmp_path / "level", "level"), nice=0),
    }
    gate = await make_gate(agents=agents)
    for name, below in (("low", 7), ("level", 0)):
        sid = (await gate.create(agent=name)).session_id
        (pid,) = (int(p.name) for p in (tmp_path / name / "agent-state" / "pids").iterdir())
        assert niceness(pid) == min(ours + below, 19)
        # (after a moment: the group is lowered right after the command starts)
        reply, _ = await say(gate, sid, "/terminal sleep 0.2; echo $(cut -d' ' -f19 /proc/self/stat)")
        assert reply == f"terminal exit 0 truncated=false: {min(ours + below, 19)}\n"
        if grouped:  # the kernel schedules sessions as groups: each one's group is lowered too
            assert Path(f"/proc/{pid}/autogroup").read_text().split()[-1] == str(below)
            reply, _ = await say(gate, sid, "/terminal sleep 0.2; cat /proc/self/autogroup")
            assert reply.endswith(f" nice {below}\n"), reply


async def test_an_agent_that_floods_drops_to_the_lowest_cpu_priority(
    make_gate: GateFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past FLOOD_CHARS of text within a second an agent is demoted to nice 19 (its session's
    autogroup too, where there are autogroups), whatever its `nice`, and while it floods it runs
    in the idle cgroup (where the gateway may make one: as root here and in CI), which it leaves
    once its flood is over; an agent that answers stays where it started (the default: the
    gateway's own priority and cgroup)."""
    caplog.set_level(logging.INFO, logger="sessiongate")
    agents = {name: capable(tmp_path / name, name) for name in ("quiet", "loud")}
    gate = await make_gate(agents=agents, cancel_grace=10.0)  # the flood answers it at nice 19
    idle = gate.running.idle
    if idle_cgroup_parent() is not None:  # "auto" can make one here
        assert idle is not None and (idle.path / "cpu.idle").read_text().strip() == "1"

    def idling(pid: int) -> bool:
        return idle is not None and idle.path.name in Path(f"/proc/{pid}/cgroup").read_text()

    grouped = autogroups_on()
    pids, sids = {}, {}
    for name in ("quiet", "loud"):
        sids[name] = (await gate.create(agent=name)).session_id
        (pids[name],) = (int(p.name) for p in (tmp_path / name / "agent-state" / "pids").iterdir())
    assert (await gate.prompt(sids["quiet"], "hi"))[-1].HasField("result")
    flood = gate.stub.Prompt(pb.PromptRequest(session_id=sids["loud"], text="/flood 10000000 64"), timeout=60)
    if idle is not None:
        await eventually(lambda: idling(pids["loud"]), timeout=15, what="the flood in the idle cgroup")
        assert str(pids["loud"]) in (idle.path / "cgroup.procs").read_text().split()
    else:
        await eventually(lambda: niceness(pids["loud"]) == 19, timeout=15, what="the flooding agent lowered")
    await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=sids["loud"]), timeout=10)
    events = [event async for event in flood]
    assert events[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    assert niceness(pids["quiet"]) == os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness(pids["loud"]) == 19
    if grouped:
        assert Path(f"/proc/{pids['quiet']}/autogroup").read_text().split()[-1] == "0"
        assert Path(f"/proc/{pids['loud']}/autogroup").read_text().split()[-1] == "19"
    assert f"agent=loud pid={pids['loud']} floods its output" in caplog.text
    assert not idling(pids["quiet"])
    if idle is not None:  # the flood is over: back to the gateway's cgroup, nice 19 for good
        await eventually(lambda: not idling(pids["loud"]), timeout=15, what="the agent out of it")
        assert niceness(pids["loud"]) == 19


@pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bwrap is not installed (Debian package bubblewrap)"
)
async def test_a_sandboxed_agents_terminal_is_sandboxed_like_it(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    config = AgentConfig(
        name="boxed", command=ECHO[0], args=ECHO[1:], sandbox="bwrap", client_fs=True, client_terminal=True
    )
    gate = await make_gate(agents={"boxed": config})
    sid = (await gate.create(agent="boxed")).session_id
    escape = Path(f"/var/tmp/sessiongate-terminal-escape-{os.getpid()}")
    reply, _ = await say(gate, sid, f"/terminal pwd; touch {escape}; echo inside > inside.txt")
    try:
        assert reply.startswith("terminal exit 0 truncated=false: "), reply
        assert str(gate.workdir.resolve()) in reply
        # Outside the allow-list /var/tmp is not there at all (it was read-only before issue 20).
        assert f"cannot touch '{escape}': No such file or directory" in reply
        assert (gate.workdir / "inside.txt").read_text() == "inside\n"
        assert not escape.exists()
    finally:
        escape.unlink(missing_ok=True)
