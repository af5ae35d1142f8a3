"""A session's working directory, opened and checked against the allowed roots.

The directory is opened once (`O_DIRECTORY`), and its real path is read back from the open
file descriptor, not from the name: a symlink swapped in between the check and the spawn
cannot move the agent, because the agent is started in exactly the directory that was
checked (`chdir` through the descriptor, or bubblewrap's `--bind-fd`). The check runs on
every agent start (create, resume after suspend or restart), against the roots in force then:
the own roots of the session's principal (the tokens file's `roots`) where it has some, else the server's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sessiongate.server.errors import CwdNotAllowed, clip

log = logging.getLogger("sessiongate.workdir")

CHECK_TIMEOUT = 10.0  # seconds to open and resolve a directory: a hung file system never hangs us
# Threads of their own: checks stuck on a hung mount never starve the loop's default executor
# (token reloads, the descendants sweep, other sessions' cwd checks on healthy file systems).
_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cwd-check")


class Roots(tuple[Path, ...]):
    """The server's roots (the tuple itself, so it goes wherever they go), and a principal's
    own looked up by name: `of(principal)`."""

    own: Callable[[str], tuple[Path, ...]]

    def __new__(cls, roots: Iterable[Path], own: Callable[[str], tuple[Path, ...]]) -> Roots:
        made = super().__new__(cls, roots)
        made.own = own
        return made

    def of(self, principal: str) -> tuple[Path, ...]:
        return (self.own(principal) if principal else ()) or tuple(self)


def roots_of(roots: tuple[Path, ...], principal: str) -> tuple[Path, ...]:
    """The roots in force for `principal`'s sessions (the principal's, never the caller's: an admin
    resuming alice's session is held to alice's roots)."""
    return roots.of(principal) if isinstance(roots, Roots) else roots


def make_first_root(path: Path) -> None:
    """A principal's first root (its default cwd), made 0700 if missing: only that last
    directory (its parent is the administrator's), and never through a symlink (mkdir does not
    follow one; a symlink there is resolved and checked against the roots like any cwd)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


@dataclass(frozen=True, slots=True)
class WorkDir:
    """An open, checked directory: `path` is its real path, `fd` keeps that exact directory."""

    path: str
    fd: int

    @property
    def fd_path(self) -> str:
        """A name for this exact directory in this process and in a child it forks."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def open_checked(path: str, roots: tuple[Path, ...]) -> WorkDir:
    """Open `path` and check its real path against `roots` (empty: no check); blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CwdNotAllowed(
            f"the session's directory {clip(path)} cannot be opened: {exc.strerror or exc}",
            metadata={"cwd": path},
        ) from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the best we have is the name's resolution now
        real = os.path.realpath(path)
    if os.fstat(fd).st_nlink == 0:  # removed after we opened it ("... (deleted)")
        os.close(fd)
        raise CwdNotAllowed(f"the session's directory {clip(path)} was removed", metadata={"cwd": path})
    if roots and not any(Path(real).is_relative_to(root) for root in roots):
        os.close(fd)
        where = ", ".join(str(r) for r in roots)
        # Where it leads now is the server's to know (a symlink to /proc/self/cwd would show our
        # own cwd): the log has it, the caller gets only the path it knows.
        log.warning(
            "a session's directory leads outside the allowed roots cwd=%s real_path=%s",
            clip(path),
            clip(real),
        )
        raise CwdNotAllowed(
            f"the session's directory {clip(path)} now leads outside the allowed roots ({clip(where)})",
            metadata={"cwd": path},
        )
    return WorkDir(real, fd)


async def open_workdir(path: str, roots: tuple[Path, ...]) -> WorkDir:
    """`open_checked` on a worker thread, within CHECK_TIMEOUT; a late result is closed, not leaked."""
    future = asyncio.get_running_loop().run_in_executor(_CHECKS, open_checked, path, roots)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await asyncio.shield(future)
    except (TimeoutError, asyncio.CancelledError) as exc:
        future.add_done_callback(_close_result)
        if isinstance(exc, TimeoutError):
            raise CwdNotAllowed(
                f"the session's directory {clip(path)} could not be opened within {CHECK_TIMEOUT:g}s",
                metadata={"cwd": path},
            ) from None
        raise


def _close_result(future: asyncio.Future[WorkDir]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
