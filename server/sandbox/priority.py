"""Agents' CPU priority: below the gateway's, so that on busy cores the gateway's own work
(reading and relaying every session's events, answering RPCs), which every session waits on,
runs before agents' work.

An agent (and each terminal command it has us run) leads a process group and a session of its
own. `lower()` sets its group's nice right after the spawn, for every process in the group then
(a sandbox's too: bwrap keeps the group), and all they start inherit it: raising nice needs no
privilege, lowering it again does. Where the kernel schedules each session as a group
(autogroups, /proc/sys/kernel/sched_autogroup_enabled), a process's nice weighs only against its
own session's, so the session's autogroup gets the same nice. The kernel takes one autogroup
change per AUTOGROUP_RETRY from an unprivileged server (EAGAIN otherwise), so a change that
came too soon after another is retried, a bounded number of times, while the process lives.

This is scheduling, not confinement: an agent may set its own autogroup back to 0, or start a
session of its own, and take a full group's share again; a hard bound would be a cgroup's
cpu.weight. Nothing here reaches anything but the processes we started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from sessiongate.server.settings import MAX_NICE

AUTOGROUP_RETRY = 0.11  # seconds: the kernel's rate for unprivileged autogroup changes is 1/0.1 s
AUTOGROUP_TRIES = 100  # ...so even many agents started together each get theirs within seconds


def lower(pgid: int, nice: int, alive: Callable[[], bool]) -> None:
    """Put process group `pgid` (led by a child of ours that `alive` says still runs, so the id
    cannot be someone else's) and its session `nice` steps below our own CPU priority."""
    if nice <= 0 or not alive():
        return
    with contextlib.suppress(OSError):  # gone meanwhile
        os.setpriority(os.PRIO_PGRP, pgid, min(os.getpriority(os.PRIO_PROCESS, 0) + nice, MAX_NICE))
    _lower_autogroup(pgid, nice, alive, AUTOGROUP_TRIES)


def _lower_autogroup(pid: int, nice: int, alive: Callable[[], bool], tries: int) -> None:
    if not alive():
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w") as autogroup:
            autogroup.write(str(min(nice, MAX_NICE)))
    except BlockingIOError:  # EAGAIN: another autogroup changed within the kernel's 0.1 s
        if tries > 1:
            loop = asyncio.get_running_loop()
            loop.call_later(AUTOGROUP_RETRY, _lower_autogroup, pid, nice, alive, tries - 1)
    except OSError:  # no autogroups here (or no such process any more): the group's nice is all
        pass
