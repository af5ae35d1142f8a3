"""The idle cgroup for flooding agents (server/sandbox/idle_cgroup.py): where it is found, made
at the server's start and removed at its end, "off", a directory the operator names, and what
a gateway killed before its end left behind. (That a flooding agent is moved into it is in
test_client_capabilities.py, beside its nice 19.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sessiongate.server.sandbox import idle_cgroup, priority
from sessiongate.server.sandbox.idle_cgroup import PREFIX, own_cpu_cgroup
from sessiongate.server.settings import ConfigError, Settings, validate

from tests.conftest import GateFactory, echo_agent

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


def test_under_cgroup_v2_only_a_cgroup_with_the_cpu_controller_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = tmp_path / "cgroup2"
    (mount / "svc").mkdir(parents=True)
    (mount / "svc" / "cgroup.controllers").write_text("memory pids\n")
    mountinfo = V2_ONLY.replace("/sys/fs/cgroup", str(mount))
    assert own_cpu_cgroup(fake_proc(tmp_path, mountinfo, "0::/svc\n")) is None
    (mount / "svc" / "cgroup.controllers").write_text("cpu memory pids\n")
    assert own_cpu_cgroup(fake_proc(tmp_path / "again", mountinfo, "0::/svc\n")) == mount / "svc"
    no_cgroups = "1 0 0:1 / / rw - ext4 /dev/vda rw\n"
    assert own_cpu_cgroup(fake_proc(tmp_path / "none", no_cgroups, "0::/\n")) is None


def can_make_one() -> Path | None:
    """Our own CPU cgroup where this process may make children in it (root here and in CI)."""
    parent = own_cpu_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        return None
    return parent


needs_cgroup = pytest.mark.skipif(
    can_make_one() is None, reason="no writable cgroup of the CPU controller (the tests run as root in CI)"
)


@needs_cgroup
async def test_auto_makes_an_idle_cgroup_at_start_and_removes_it_at_the_end(make_gate: GateFactory) -> None:
    parent = can_make_one()
    assert parent is not None
    stale = parent / f"{PREFIX}{2**22 + 1}"  # above any pid_max: a gateway gone without its end
    stale.mkdir(exist_ok=True)
    gate = await make_gate()
    idle = gate.running.idle
    assert idle is not None and priority.idle_cgroup is idle
    assert idle.path == parent / f"{PREFIX}{os.getpid()}"
    assert (idle.path / "cpu.idle").read_text().strip() == "1"
    assert not stale.exists(), "an empty idle cgroup of a gateway that is gone was left behind"
    await gate.running.drain(0)
    assert not idle.path.exists() and priority.idle_cgroup is None


async def test_off_leaves_agents_to_nice_alone(make_gate: GateFactory) -> None:
    gate = await make_gate(settings={"idle_cgroup": "off"})
    assert gate.running.idle is None and priority.idle_cgroup is None


@needs_cgroup
async def test_a_named_cgroup_is_made_idle_used_and_left_in_place(make_gate: GateFactory) -> None:
    parent = can_make_one()
    assert parent is not None
    named = parent / f"sessiongate-test-{os.getpid()}"
    try:
        gate = await make_gate(settings={"idle_cgroup": str(named)})
        assert gate.running.idle is not None and gate.running.idle.path == named
        assert (named / "cpu.idle").read_text().strip() == "1"
        await gate.running.drain(0)
        assert named.exists(), "the operator's cgroup was removed"
    finally:
        named.rmdir()


async def test_a_named_cgroup_that_cannot_be_made_idle_refuses_to_start(make_gate: GateFactory) -> None:
    with pytest.raises(ConfigError, match="idle_cgroup '/proc/nope' cannot be made idle"):
        await make_gate(settings={"idle_cgroup": "/proc/nope"})


@pytest.mark.parametrize("value", ["relative/dir", "", "AUTO"])
def test_idle_cgroup_is_auto_off_or_an_absolute_directory(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="idle_cgroup must be auto, off or an absolute"):
        validate(Settings(workdir=tmp_path, agents={"echo": echo_agent("echo", tmp_path)}, idle_cgroup=value))


def test_only_the_agents_own_process_group_is_moved(tmp_path: Path) -> None:
    """group_members reads each process's group from /proc: ours holds this process."""
    members = idle_cgroup.group_members(os.getpgrp())
    assert os.getpid() in members
    assert idle_cgroup.group_members(2**22 + 1) == []
