"""An idle CPU cgroup for agents that flood: they run only when no other task wants the core.

nice 19 (priority.py) leaves a flooding agent a small share, but on busy cores every wake-up of
the gateway, of a healthy session's agent or of a client still waits for the flood's task to
give its core back: on 2 cores beside 8 floods, a healthy session's p99 time to first event was
about 3x its quiet figure. A cgroup whose `cpu.idle` is 1 is scheduled like SCHED_IDLE as a
whole: any other task that wakes takes the core at once (1.2-1.6x in the same runs).

Where the server may make one: a child `sessiongate-idle-PID-N` of its own cgroup of the CPU
controller (`idle_cgroup = "auto"`, the default; it needs write access there: root, or a
delegated cgroup v1 hierarchy; under cgroup v2 only where the cpu controller is already
enabled for that cgroup's children, which v2 allows only for a cgroup without processes, the
root), or a cgroup directory the operator names (made if missing). "off", or an "auto" that
finds none, leaves nice alone to do it. Each server has its own (several may run in one
process); it goes at the server's end, and empty ones of servers gone are cleared at a start.

This is scheduling, not confinement, as nice is: an agent that may write to the cgroup tree
may move itself out (a sandboxed agent has no /sys; an unsandboxed one that runs as our user
could signal us anyway). Only processes of the agent's own process group are moved: only the
agent and its descendants can be in it, as it leads a session of its own.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sessiongate")

PREFIX = "sessiongate-idle-"
_serial = itertools.count(1)  # servers started in this process
_ESCAPED = re.compile(r"\\([0-7]{3})")  # mountinfo's octal escapes (a space is \040)


class IdleCgroup:
    """A cgroup directory whose cpu.idle is 1, made (and removed) by us or named by the operator."""

    def __init__(self, path: Path, owned: bool, home: Path | None) -> None:
        self.path = path
        self.home = home  # where agents go back to: the server's own cgroup (None: they stay)
        self._owned = owned  # made by us: removed by `remove()`
        self._failed = False  # a move failed and was logged (once per server)

    def adopt(self, pgid: int, alive: Callable[[], bool]) -> int:
        """Move every process of group `pgid` (led by a child of ours that `alive` says still
        runs, so the group cannot be someone else's) into the cgroup; how many moved. (A /proc
        scan: a thread's work.)"""
        return self._move(pgid, alive, self.path)

    def release(self, pgid: int, alive: Callable[[], bool]) -> int:
        """Move the processes of group `pgid` back to the server's own cgroup; how many moved."""
        return self._move(pgid, alive, self.home) if self.home is not None else 0

    def _move(self, pgid: int, alive: Callable[[], bool], cgroup: Path) -> int:
        moved = 0
        try:
            members = group_members(pgid) if alive() else []
        except OSError:  # no /proc to read
            return 0
        for pid in members:
            try:
                write_control(cgroup / "cgroup.procs", str(pid))
                moved += 1
            except ProcessLookupError:  # gone meanwhile
                continue
            except OSError as exc:  # the cgroup went, or we may not move this one (another user's)
                if not self._failed:
                    self._failed = True
                    log.warning("cannot move flooding agents into %s: %s", cgroup, exc.strerror or exc)
                if exc.errno in (errno.ENOENT, errno.ENODEV):
                    break
        return moved

    def remove(self) -> None:
        """rmdir the cgroup if we made it and no process is left in it (best effort)."""
        if self._owned:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def write_control(path: Path, value: str) -> None:
    """Write a cgroup control file, which must exist: never creates one (a directory that is not
    a cgroup then fails, rather than filling up with plain files)."""
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.write(descriptor, value.encode())
    finally:
        os.close(descriptor)


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


def _unescape(field: str) -> str:
    return _ESCAPED.sub(lambda octal: chr(int(octal.group(1), 8)), field)


def own_cpu_cgroup(proc: Path = Path("/proc/self"), *, with_cpu: bool = True) -> Path | None:
    """The directory of our own cgroup of the CPU controller: cgroup v1's `cpu` hierarchy when
    there is one, else cgroup v2's where it has the cpu controller (or without it: `with_cpu`
    False, where agents go back to from a named idle cgroup); None if neither (or our cgroup
    is outside the mount's view, as in a cgroup namespace's parent)."""
    mounts: dict[str, tuple[str, str]] = {}  # "v1" / "v2" -> (mount point, root within)
    for line in (proc / "mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype, options = _unescape(fields[3]), _unescape(fields[4]), tail[0], tail[2].split(",")
        if fstype == "cgroup" and "cpu" in options:
            mounts.setdefault("v1", (point, root))
        elif fstype == "cgroup2":
            mounts.setdefault("v2", (point, root))
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        version = "v2" if controllers == "" else "v1" if "cpu" in controllers.split(",") else ""
        if not version or version not in mounts:
            continue
        point, root = mounts[version]
        if root != "/":
            if path != root and not path.startswith(root + "/"):
                return None
            path = path[len(root) :]
        if ".." in Path(path).parts:
            return None
        where = Path(point) / path.lstrip("/")
        if version == "v1" or not with_cpu:
            return where
        try:
            return where if "cpu" in (where / "cgroup.controllers").read_text().split() else None
        except OSError:
            return None
    return None


def clear_stale(parent: Path) -> None:
    """Remove empty idle cgroups that servers now gone left behind (a crash, a SIGKILL)."""
    for child in parent.glob(PREFIX + "*"):
        pid = child.name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                child.rmdir()


def _make_idle(path: Path) -> None:
    """Make `path` (if missing) a cgroup with cpu.idle 1; OSError where we may not, or where it
    is not a cgroup of the CPU controller (a directory we made for nothing is removed)."""
    made = False
    with contextlib.suppress(FileExistsError):
        path.mkdir()
        made = True
    try:
        write_control(path / "cpu.idle", "1")
    except OSError as exc:
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
        if exc.errno == errno.ENOENT:
            raise OSError(
                errno.ENOTDIR, "not a cgroup of the CPU controller (no cpu.idle: Linux 5.15 or later)"
            ) from None
        raise


def open_idle_cgroup(setting: str) -> IdleCgroup | None:
    """The idle cgroup the setting asks for ("auto", "off" or a directory), or None. An "auto"
    that finds none logs why and returns None; a named directory that cannot be made idle
    raises OSError (the operator asked for it)."""
    if setting == "off":
        return None
    if setting != "auto":
        _make_idle(Path(setting))
        return IdleCgroup(Path(setting), owned=False, home=_own_or_none())
    try:
        parent = own_cpu_cgroup()
        if parent is None:
            raise OSError(errno.ENOENT, "no cgroup of the CPU controller of our own")
        controls = parent / "cgroup.subtree_control"  # v2: the children need cpu enabled...
        if controls.exists() and "cpu" not in controls.read_text().split():  # ...not by us: host-wide
            raise OSError(errno.EPERM, f"the cpu controller is not enabled below {parent}")
        clear_stale(parent)
        path = parent / f"{PREFIX}{os.getpid()}-{next(_serial)}"
        _make_idle(path)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.info("no idle cgroup for flooding agents (nice 19 alone): %s", why[:200])
        return None
    return IdleCgroup(path, owned=True, home=parent)


def _own_or_none() -> Path | None:
    """Where agents go back to from a named idle cgroup: the server's own cgroup; None (a
    warning: none is moved into it then, as it could not leave) where it cannot be found."""
    try:
        home = own_cpu_cgroup(with_cpu=False)
    except (OSError, ValueError):
        home = None
    if home is None:
        log.warning("the server's own cgroup was not found: flooding agents stay out of idle_cgroup")
    return home
