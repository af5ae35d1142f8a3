"""An idle CPU cgroup for agents that flood: they run only when no other task wants the core.

nice 19 (priority.py) leaves a flooding agent a small share, but on busy cores every wake-up of
the gateway, of a healthy session's agent or of a client still waits for the flood's task to
give its core back: on 2 cores beside 8 floods, a healthy session's p99 time to first event was
about 3x its quiet figure. A cgroup whose `cpu.idle` is 1 is scheduled like SCHED_IDLE as a
whole: any other task that wakes takes the core at once (1.2-1.5x in the same runs).

Where the gateway may make one: under its own cgroup of the CPU controller, a child
`sessiongate-idle-PID` (`idle_cgroup = "auto"`, the default; it needs write access to that
cgroup: root, or a delegated cgroup v1 hierarchy; under cgroup v2 the cpu controller cannot be
enabled below a cgroup that holds processes, so "auto" only works from v2's root there), or a
directory the operator names (one in a delegated v2 subtree with the cpu controller enabled).
"off", or an "auto" that finds no writable cgroup, leaves nice alone to do it.

This is scheduling, not confinement, as nice is: an agent with the rights to may move itself
out. Only processes of the agent's own process group (which only it and its descendants can
be in) are moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sessiongate.agent")

PREFIX = "sessiongate-idle-"


class IdleCgroup:
    """A cgroup directory whose cpu.idle is 1, made (and removed) by us or named by the operator."""

    def __init__(self, path: Path, owned: bool) -> None:
        self.path = path
        self._owned = owned  # made by us: removed by `remove()`

    def adopt(self, pgid: int, alive: Callable[[], bool]) -> int:
        """Move every process of group `pgid` (led by a child of ours that `alive` says still
        runs, so the group cannot be someone else's) into the cgroup; how many moved."""
        if not alive():
            return 0
        moved = 0
        for pid in group_members(pgid):
            with contextlib.suppress(OSError):  # gone meanwhile
                (self.path / "cgroup.procs").write_text(str(pid))
                moved += 1
        return moved

    def remove(self) -> None:
        """rmdir the cgroup if we made it and no process is left in it (best effort)."""
        if self._owned:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def group_members(pgid: int) -> list[int]:
    """Processes whose process group is `pgid` (/proc/PID/stat's 5th field)."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(pgid):
                members.append(int(entry.name))
    return members


def own_cpu_cgroup(proc: Path = Path("/proc/self")) -> Path | None:
    """The directory of our own cgroup of the CPU controller: cgroup v1's `cpu` hierarchy when
    there is one, else cgroup v2's where it has the cpu controller; None if neither."""
    mounts: dict[str, tuple[str, str]] = {}  # "v1" / "v2" -> (mount point, root within)
    for line in (proc / "mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = fields[3], fields[4], tail[0], tail[2].split(",")
        if fstype == "cgroup" and "cpu" in options:
            mounts.setdefault("v1", (point, root))
        elif fstype == "cgroup2":
            mounts.setdefault("v2", (point, root))
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        version = "v2" if controllers == "" else "v1" if "cpu" in controllers.split(",") else ""
        if version and version in mounts:
            point, root = mounts[version]
            relative = path[len(root) :] if root != "/" and path.startswith(root) else path
            where = Path(point) / relative.lstrip("/")
            if version == "v1" or "cpu" in (where / "cgroup.controllers").read_text().split():
                return where
    return None


def _clear_stale(parent: Path) -> None:
    """Remove empty idle cgroups that gateways now gone left behind (a crash, a SIGKILL)."""
    for child in parent.glob(PREFIX + "*"):
        pid = child.name[len(PREFIX) :]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                child.rmdir()


def _make_idle(path: Path) -> None:
    """Make `path` (if missing) a cgroup with cpu.idle 1; OSError where we may not."""
    path.mkdir(exist_ok=True)
    (path / "cpu.idle").write_text("1")


def open_idle_cgroup(setting: str) -> IdleCgroup | None:
    """The idle cgroup the setting asks for ("auto", "off" or a directory), or None. An "auto"
    that finds none logs why once and returns None; a named directory that cannot be made idle
    raises OSError (the operator asked for it)."""
    if setting == "off":
        return None
    if setting != "auto":
        path = Path(setting)
        _make_idle(path)
        return IdleCgroup(path, owned=False)
    try:
        parent = own_cpu_cgroup()
        if parent is None:
            raise FileNotFoundError("no cgroup of the CPU controller")
        _clear_stale(parent)
        if (parent / "cgroup.subtree_control").exists():  # v2: children get cpu.idle once enabled
            (parent / "cgroup.subtree_control").write_text("+cpu")
        path = parent / f"{PREFIX}{os.getpid()}"
        try:
            _make_idle(path)
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise
    except (OSError, ValueError) as exc:
        log.info("no idle cgroup for flooding agents (nice 19 only): %s", str(exc)[:200])
        return None
    return IdleCgroup(path, owned=True)
