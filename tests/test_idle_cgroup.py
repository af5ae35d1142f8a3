"""The idle cgroup for flooding agents (server/sandbox/idle_cgroup.py): where it is found, made
at the server's start and removed at its end (one per server), "off", a directory the operator
names, and what a server killed before its end left behind. (That a flooding agent is moved
into it is in test_client_capabilities.py, beside its nice 19.)"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from sessiongate.server.sandbox import idle_cgroup
from sessiongate.server.sandbox.idle_cgroup import PREFIX, own_cpu_cgroup
from sessiongate.server.settings import ConfigError, Settings, validate

from tests.conftest import GateFactory, echo_agent, idle_cgroup_parent, proc_stat

V1_HYBRID = """\
25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_ONLY = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_our_cpu_cgroup_is_cgroup_v1s_cpu_hierarchy_where_there_is_one(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, V1_HYBRID, "4:memory:/a\n2:cpu:/system.slice/gw.service\n0::/b\n")
    assert own_cpu_cgroup(proc) == Path("/sys/fs/cgroup/cpu/system.slice/gw.service")
    joined = fake_proc(tmp_path / "j", V1_HYBRID.replace("rw,cpu", "rw,cpu,cpuacct"), "2:cpu,cpuacct:/\n")
    assert own_cpu_cgroup(joined) == Path("/sys/fs/cgroup/cpu")


def test_mountinfos_escapes_and_a_mounts_root_are_read_as_the_kernel_writes_them(tmp_path: Path) -> None:
    spaced = V1_HYBRID.replace("/sys/fs/cgroup/cpu ", "/sys/fs/my\\040cpu ")
    assert own_cpu_cgroup(fake_proc(tmp_path / "s", spaced, "2:cpu:/x\n")) == Path("/sys/fs/my cpu/x")
    rooted = V1_HYBRID.replace("0:23 / ", "0:23 /docker/abc ")  # a container's view of the hierarchy
    inside = fake_proc(tmp_path / "r", rooted, "2:cpu:/docker/abc/x\n")
    assert own_cpu_cgroup(inside) == Path("/sys/fs/cgroup/cpu/x")
    beside = fake_proc(tmp_path / "o", rooted, "2:cpu:/docker/abcdef\n")  # a sibling, not below it
    assert own_cpu_cgroup(beside) is None
    outside = fake_proc(tmp_path / "n", V1_HYBRID, "2:cpu:/../other\n")  # outside the namespace's view
    assert own_cpu_cgroup(outside) is None


def test_under_cgroup_v2_only_a_cgroup_with_the_cpu_controller_counts(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup2"
    (mount / "svc").mkdir(parents=True)
    mountinfo = V2_ONLY.replace("/sys/fs/cgroup", str(mount))
    assert own_cpu_cgroup(fake_proc(tmp_path / "missing", mountinfo, "0::/svc\n")) is None
    (mount / "svc" / "cgroup.controllers").write_text("memory pids\n")
    assert own_cpu_cgroup(fake_proc(tmp_path / "nocpu", mountinfo, "0::/svc\n")) is None
    (mount / "svc" / "cgroup.controllers").write_text("cpu memory pids\n")
    assert own_cpu_cgroup(fake_proc(tmp_path / "cpu", mountinfo, "0::/svc\n")) == mount / "svc"
    no_cgroups = "1 0 0:1 / / rw - ext4 /dev/vda rw\n"
    assert own_cpu_cgroup(fake_proc(tmp_path / "none", no_cgroups, "0::/\n")) is None


needs_cgroup = pytest.mark.skipif(
    idle_cgroup_parent() is None, reason="no CPU cgroup we may make one in (CI runs as root)"
)


@needs_cgroup
async def test_auto_makes_an_idle_cgroup_per_server_and_removes_it_at_the_end(make_gate: GateFactory) -> None:
    parent = idle_cgroup_parent()
    assert parent is not None
    stale = parent / f"{PREFIX}{2**22 + 1}-1"  # above any pid_max: a server gone without its end
    stale.mkdir(exist_ok=True)
    try:
        first, second = await make_gate(), await make_gate()
    finally:
        with contextlib.suppress(OSError):
            stale.rmdir()
    assert first.running.idle is not None and second.running.idle is not None
    paths = (first.running.idle.path, second.running.idle.path)
    assert paths[0] != paths[1] and all(p.parent == parent for p in paths)
    assert all(p.name.startswith(f"{PREFIX}{os.getpid()}-") for p in paths)
    assert all((p / "cpu.idle").read_text().strip() == "1" for p in paths)
    assert not stale.exists(), "an empty idle cgroup of a server that is gone was left behind"
    await first.running.drain(0)
    assert not paths[0].exists() and paths[1].exists()  # each server's own
    await second.running.drain(0)
    assert not paths[1].exists()


async def test_off_leaves_flooding_agents_where_they_are(make_gate: GateFactory, tmp_path: Path) -> None:
    gate = await make_gate(settings={"idle_cgroup": "off"})
    assert gate.running.idle is None
    sid = (await gate.create()).session_id
    before = set(gate.agent_pids())
    events = await gate.prompt(sid, "/flood 20000 64")  # 1.25 MiB of text: it floods
    assert events[-1].HasField("result")
    for pid in before:
        assert proc_stat(pid)[16] == "19"  # lowered...
        assert PREFIX not in Path(f"/proc/{pid}/cgroup").read_text()  # ...and nowhere else


@needs_cgroup
async def test_a_named_cgroup_is_made_idle_used_and_left_in_place(make_gate: GateFactory) -> None:
    parent = idle_cgroup_parent()
    assert parent is not None
    named = parent / f"sessiongate-test-{os.getpid()}"
    try:
        gate = await make_gate(settings={"idle_cgroup": str(named)})
        assert gate.running.idle is not None and gate.running.idle.path == named
        assert (named / "cpu.idle").read_text().strip() == "1"
        await gate.running.drain(0)
        assert named.exists(), "the operator's cgroup was removed"
    finally:
        with contextlib.suppress(FileNotFoundError):
            named.rmdir()


@pytest.mark.parametrize("where", ["/proc/nope", "new", "existing"])
async def test_a_named_directory_that_is_no_cpu_cgroup_refuses_to_start(
    make_gate: GateFactory, tmp_path: Path, where: str
) -> None:
    """Nothing is made where it is not a cgroup: a directory made for it goes again, and an
    existing plain one is left empty (no cpu.idle file)."""
    path = Path(where) if where.startswith("/") else tmp_path / where
    if where == "existing":
        path.mkdir()
    with pytest.raises(ConfigError, match="cannot be made idle"):
        await make_gate(settings={"idle_cgroup": str(path)})
    assert (list(path.iterdir()) == []) if where == "existing" else not path.exists()


@pytest.mark.parametrize("value", ["relative/dir", "", "AUTO"])
def test_idle_cgroup_is_auto_off_or_an_absolute_directory(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="idle_cgroup must be auto, off or an absolute"):
        validate(Settings(workdir=tmp_path, agents={"echo": echo_agent("echo", tmp_path)}, idle_cgroup=value))


def test_only_the_process_group_asked_for_is_moved() -> None:
    """group_members reads each process's group from /proc: ours holds this process, and not
    the one that started it, which leads a group of its own (pytest's, make's or the shell's)."""
    members = idle_cgroup.group_members(os.getpgrp())
    assert os.getpid() in members
    if os.getpgid(os.getppid()) != os.getpgrp():
        assert os.getppid() not in members
    assert idle_cgroup.group_members(2**22 + 1) == []
