"""Ending every process an unsandboxed agent started, also those that left its process group.

Stopping an agent signals its process group. A descendant that called `setsid` (or
`setpgid`) left that group, and outlives the agent, CloseSession and the server. Sandboxed
agents need nothing more: bwrap gives them their own PID namespace, and when its first
process ends the kernel ends every other process in it (`--die-with-parent` ends it with
the server).

Unsandboxed agents get a marker instead: a random id in their environment
(`SESSIONGATE_AGENT_ID`), which every descendant inherits, across `setsid`, double forks
and re-parenting to init. When the agent is stopped, or its leader exits, `Descendants.end`
scans /proc once per round for processes whose environment holds the marker and SIGKILLs
them; rounds repeat (a few at most) while a round still found some, so children forked
during a scan go too. Each process is signalled through a pidfd opened before its
environment is read, so a PID reused by someone else in between is never hit. The scan
reads only what we may read (our own uid's processes; any when the server runs as root)
and runs in a worker thread with a timeout: a process stuck in the kernel never stalls the
event loop.

Limitation: a descendant that drops the variable from its environment before exec (`env
-i`, or a program that builds a new environment) carries no marker and escapes, as does one
whose /proc entry we may not read (a setuid program). A cgroup per agent would catch those
too; it needs a delegated, writable cgroup v2 hierarchy, which containers and unprivileged
servers mostly lack, so this is the portable floor. Without pidfds (Linux before 5.3) no
process is signalled at all rather than one by a possibly reused PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import threading

log = logging.getLogger("sessiongate.descendants")

MARKER_ENV = "SESSIONGATE_AGENT_ID"
END_TIMEOUT = 5.0  # seconds to wait for the scans of one agent's end
MAX_ROUNDS = 5  # scans per end: each one kills what the one before missed (forked meanwhile)
PROC = "/proc"


class Descendants:
    """The processes one agent started, recognised by the marker in their environment."""

    def __init__(self) -> None:
        self.marker = secrets.token_hex(16)
        self._entry = f"{MARKER_ENV}={self.marker}".encode()

    def mark(self, env: dict[str, str]) -> None:
        """Put the marker into the agent's environment (last: its own settings cannot replace it)."""
        env[MARKER_ENV] = self.marker

    async def end(self, timeout: float = END_TIMEOUT) -> int:
        """SIGKILL every marked process, within `timeout`; returns how many were signalled.

        The scan goes on in its thread if we stop waiting (timeout, cancellation): it is
        bounded by MAX_ROUNDS, and the process does not exit before it is done.
        """
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.to_thread(self.sweep)
        except TimeoutError:
            log.warning("scan for the agent's descendants took over %gs", timeout)
            return 0

    def end_in_background(self) -> None:
        """`end` for a path that cannot wait (a cancelled stop): a thread the process joins at exit."""
        threading.Thread(target=self.sweep, name="end-descendants", daemon=False).start()

    def sweep(self) -> int:
        """Blocking: kill marked processes, round after round until a round finds none."""
        signalled: set[int] = set()
        for _ in range(MAX_ROUNDS):
            before = len(signalled)
            self._kill_marked(signalled)
            if len(signalled) == before:  # nothing new (a dying one may still show its environment)
                break
        if signalled:
            log.info("ended %d process(es) the agent left running", len(signalled))
        return len(signalled)

    def _kill_marked(self, signalled: set[int]) -> None:
        """One scan of /proc: SIGKILL each marked process and add its PID to `signalled`."""
        me, uid = os.getpid(), os.getuid()
        try:
            entries = os.listdir(PROC)
        except OSError:
            return
        for name in entries:
            if not name.isdigit() or int(name) == me:
                continue
            pidfd = _pidfd(int(name), uid)
            if pidfd is None:
                continue
            try:
                # The pidfd is opened first: if the PID was reused since, the environment read
                # is the newcomer's, but the signal goes to the process that is gone (ESRCH).
                if self._marked(name):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        signalled.add(int(name))
            finally:
                os.close(pidfd)

    def _marked(self, pid: str) -> bool:
        try:
            with open(f"{PROC}/{pid}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:  # gone, or not ours to read
            return False
        return environ.startswith(self._entry + b"\0") or b"\0" + self._entry + b"\0" in environ


def _pidfd(pid: int, uid: int) -> int | None:
    """A pidfd for `pid` if it is a process we may signal (our uid, or any as root), else None."""
    try:
        if uid != 0 and os.stat(f"{PROC}/{pid}").st_uid != uid:
            return None
        return os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone; or no pidfds here: never signal by a bare PID
        return None
