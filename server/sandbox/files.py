"""The client file system an agent may use (`client_fs`): ACP `fs/read_text_file` and
`fs/write_text_file`, confined to the session's directory.

Agents name files by absolute path (a relative one is taken from the session's directory).
A path is served only when it lies inside that directory, and it is opened one component
at a time by descriptor (`openat` with `O_NOFOLLOW`), starting from `/`: no `..` component,
no symbolic link anywhere (in the session's directory's own path, in a directory on the way,
or as the file itself) and nothing the sandbox hides from agents (the server's state and
secrets, should they lie inside the directory) is ever followed, whatever is swapped in
while we walk. A write goes to a new file in the same directory, renamed over the name at
the end: it never writes through a symbolic or hard link to a file elsewhere, and a reader
never sees half a file.

Everything here blocks; `read` and `write` run it on threads of their own (a hung file
system never blocks the event loop, nor starves other work of the loop's default executor),
within FS_TIMEOUT, and each agent only on its share of them (a hung mount under one agent
never times out another's requests). A write reported as not done never lands afterwards.
Errors reach the agent as JSON-RPC errors with bounded messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import os
import secrets
import stat
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import acp
from sessiongate.server.errors import clip

MAX_READ_BYTES = 10 * 1024 * 1024  # content one fs/read_text_file returns
MAX_SCAN_BYTES = 256 * 1024 * 1024  # of a file read to find the lines asked for
MAX_WRITE_BYTES = 10 * 1024 * 1024  # content one fs/write_text_file writes (UTF-8)
FS_TIMEOUT = 30.0  # seconds one fs request may take
READ_CHUNK = 256 * 1024
NOT_FOUND = -32002  # ACP's "resource not found"
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Threads of their own (_POOL): requests stuck on a hung mount never starve the loop's default
# executor, and each agent has its share of them (_Admission): one agent's never starve another's.
LANE_THREADS = 4  # calls one agent (or, without one, one directory) runs at once
POOL_THREADS = 64  # in all: it takes POOL_THREADS / LANE_THREADS hung agents to starve the rest
LANDING_GRACE = 10.0  # seconds more for a write already being renamed into place at its deadline
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FileWriteReport:
    """A file the gateway wrote for the agent (fs/write_text_file), as the turn reports it."""

    path: str  # absolute, inside the session's directory
    bytes: int
    created: bool  # the file did not exist before


# ---- the requests, off the loop --------------------------------------------------------------


async def read(
    cwd: str,
    path: str,
    line: int | None = None,
    limit: int | None = None,
    hidden: Iterable[Path] = (),
    lane: Hashable | None = None,
) -> str:
    """`read_text_file` on a worker thread of `lane` (see _Admission) within FS_TIMEOUT."""
    call = functools.partial(read_text_file, cwd, path, line, limit, tuple(hidden))
    return await _off_loop(_lane(lane, cwd), path, call)


async def write(
    cwd: str, path: str, content: str, hidden: Iterable[Path] = (), lane: Hashable | None = None
) -> FileWriteReport:
    """`write_text_file` on a worker thread of `lane` within FS_TIMEOUT. One reported as not
    done never lands later: its rename happens only if it is claimed before the deadline."""
    landing = Landing()
    call = functools.partial(write_text_file, cwd, path, content, tuple(hidden), landing)
    return await _off_loop(_lane(lane, cwd), path, call, landing)


async def open_directory_async(
    cwd: str, path: str, hidden: Iterable[Path] = (), lane: Hashable | None = None
) -> tuple[str, int]:
    """`open_directory` on a worker thread of `lane` within FS_TIMEOUT (the descriptor is the
    caller's). A result that comes too late is closed."""
    call = functools.partial(open_directory, cwd, path, tuple(hidden))
    return await _off_loop(_lane(lane, cwd), path, call, late=_close_late)


def _close_late(result: tuple[str, int]) -> None:
    os.close(result[1])


def _lane(lane: Hashable | None, cwd: str) -> Hashable:
    """Whose share of the threads a call takes: its agent's, else its directory's."""
    return ("cwd", cwd) if lane is None else lane


class Landing:
    """Whether a write may still land: its worker claims it right before the rename, the caller
    gives it up at its deadline; whichever comes first wins. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None  # "claimed" or "abandoned"

    def claim(self) -> bool:
        with self._lock:
            self._state = self._state or "claimed"
            return self._state == "claimed"

    def abandon(self) -> bool:
        with self._lock:
            self._state = self._state or "abandoned"
            return self._state == "abandoned"


class _Abandoned(Exception):
    """A write given up before its rename (its caller was told it was not done)."""


class _Admission:
    """Who may use the pool's threads now: at most LANE_THREADS calls of one lane (one agent's,
    or one directory's) and POOL_THREADS in all. A call keeps its place until its thread is
    done, even after its caller gave up on it: a lane stuck on a hung mount holds at most
    LANE_THREADS threads, and other lanes still find one. The rest wait in order (none that
    fits ever waits), each within its caller's deadline; a call that never started never runs.
    Thread-safe: places are given back from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, int] = {}
        self._total = 0
        self._waiting: deque[tuple[Hashable, concurrent.futures.Future[None]]] = deque()

    def running(self, lane: Hashable) -> int:
        return self._running.get(lane, 0)

    async def enter(self, lane: Hashable) -> None:
        """A place for one call of `lane`; cancelling gives up the wait (or the place)."""
        with self._lock:
            if self._fits(lane):
                self._take(lane)
                return
            ticket: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._waiting.append((lane, ticket))
        try:
            await asyncio.wrap_future(ticket)
        except asyncio.CancelledError:
            if not ticket.cancel():  # given a place meanwhile: pass it on
                self.leave(lane)
            raise

    def leave(self, lane: Hashable) -> None:
        with self._lock:
            self._total -= 1
            self._running[lane] -= 1
            if not self._running[lane]:
                del self._running[lane]  # no reference kept to an idle lane (an agent)
            waiting, self._waiting = self._waiting, deque()
            for entry in waiting:
                waiter, ticket = entry
                if ticket.done():
                    continue  # gave up
                if self._fits(waiter) and ticket.set_running_or_notify_cancel():
                    self._take(waiter)
                    ticket.set_result(None)
                elif not ticket.cancelled():
                    self._waiting.append(entry)

    def _fits(self, lane: Hashable) -> bool:
        return self._total < POOL_THREADS and self._running.get(lane, 0) < LANE_THREADS

    def _take(self, lane: Hashable) -> None:
        self._total += 1
        self._running[lane] = self._running.get(lane, 0) + 1


_ADMISSION = _Admission()
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="client-fs")


async def _off_loop(
    lane: Hashable,
    path: str,
    call: Callable[[], T],
    landing: Landing | None = None,
    late: Callable[[T], None] | None = None,
) -> T:
    """`call` on a pool thread once `lane` has a place, within FS_TIMEOUT in all. A write
    (`landing`) that is not claimed by then is abandoned; one claimed (renaming) gets
    LANDING_GRACE more. `late` gets a result nobody waited for."""
    future: concurrent.futures.Future[T] | None = None
    try:
        async with asyncio.timeout(FS_TIMEOUT):
            await _ADMISSION.enter(lane)
            future = _POOL.submit(call)
            future.add_done_callback(lambda _: _ADMISSION.leave(lane))
            return await asyncio.wrap_future(future)  # cancelled while queued: it never runs
    except (TimeoutError, asyncio.CancelledError) as exc:
        if future is not None and landing is not None and not landing.abandon():
            if isinstance(exc, TimeoutError):  # being renamed into place: it lands, tell so
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LANDING_GRACE):
                        return await asyncio.shield(asyncio.wrap_future(future))
                raise _failed(
                    path, f"not done within {FS_TIMEOUT + LANDING_GRACE:g}s while renaming: it may land"
                ) from None
        elif future is not None and late is not None:
            future.add_done_callback(functools.partial(_hand_late, late))
        if isinstance(exc, TimeoutError):
            what = "written within {}s: the file was left as it was" if landing else "done within {}s"
            raise _failed(path, "not " + what.format(f"{FS_TIMEOUT:g}")) from None
        raise


def _hand_late(late: Callable[[T], None], future: concurrent.futures.Future[T]) -> None:
    if not future.cancelled() and future.exception() is None:
        late(future.result())


# ---- blocking ------------------------------------------------------------------------------


def read_text_file(
    cwd: str, path: str, line: int | None = None, limit: int | None = None, hidden: tuple[Path, ...] = ()
) -> str:
    """The file's text (UTF-8; undecodable bytes replaced) from 1-based `line`, at most `limit`
    lines; blocking. Refuses what is outside `cwd`, links and files that are not regular."""
    parts = relative_parts(cwd, path, hidden)
    if not parts:
        raise _invalid(path, "is the session's directory itself, not a file")
    directory = _open_dir(cwd, parts[:-1], path, create=False)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks us
        fd = os.open(parts[-1], flags, dir_fd=directory)
    except OSError as exc:
        raise _os_error(path, exc, directory, parts[-1]) from None
    finally:
        os.close(directory)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _invalid(path, "is not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as handle:
        first = max(line or 1, 1)
        if first == 1 and limit is None and info.st_size > MAX_READ_BYTES:
            raise _invalid(path, _too_large(info.st_size))
        try:
            data = _select_lines(handle, first, limit, path)
        except OSError as exc:
            raise _os_error(path, exc) from None
    return data.decode("utf-8", errors="replace")


def write_text_file(
    cwd: str, path: str, content: str, hidden: tuple[Path, ...] = (), landing: Landing | None = None
) -> FileWriteReport:
    """Replace (or create) the file with `content` (UTF-8), making missing directories; blocking.
    The content goes to a new file renamed over the name: links there are replaced, not followed.
    With a `landing`, the rename happens only if it can be claimed (the caller still waits)."""
    data = content.encode("utf-8", errors="replace")
    if len(data) > MAX_WRITE_BYTES:
        raise _invalid(
            path, f"content of {len(data)} bytes is over the write limit ({MAX_WRITE_BYTES} bytes)"
        )
    parts = relative_parts(cwd, path, hidden)
    if not parts:
        raise _invalid(path, "is the session's directory itself, not a file")
    name = parts[-1]
    directory = _open_dir(cwd, parts[:-1], path, create=True)
    try:
        created = _replace(directory, name, data, path, landing)
    finally:
        os.close(directory)
    return FileWriteReport(path=os.path.join(cwd, *parts), bytes=len(data), created=created)


def _replace(directory: int, name: str, data: bytes, path: str, landing: Landing | None = None) -> bool:
    """Write `data` to a new file in `directory` and rename it to `name`; True if `name` was new."""
    try:
        before = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        before = None
    except OSError as exc:
        raise _os_error(path, exc) from None
    if before is not None and stat.S_ISLNK(before.st_mode):
        raise _invalid(path, "is a symbolic link (symbolic links are not followed)")
    if before is not None and not stat.S_ISREG(before.st_mode):
        raise _invalid(path, "is not a regular file")
    temp = f".sessiongate-{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # A new file gets the permissions open(2) gives (umask); a replaced one keeps its own.
        fd = os.open(temp, flags, 0o666 if before is None else 0o600, dir_fd=directory)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            view = memoryview(data)
            while view:
                view = view[handle.write(view) or 0 :]
            if before is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(before.st_mode) & 0o777)
        if landing is not None and not landing.claim():
            raise _Abandoned  # its caller was told it was not done: the temp file goes
        os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        if isinstance(exc, OSError):
            raise _os_error(path, exc) from None
        raise
    return before is None


def open_directory(cwd: str, path: str, hidden: tuple[Path, ...] = ()) -> tuple[str, int]:
    """The directory `path` inside `cwd` (`cwd` itself when `path` is empty), walked by
    descriptor like the files above: its absolute path and an `O_PATH` descriptor of it, which
    the caller closes; blocking. Used for a terminal's working directory."""
    parts = relative_parts(cwd, path or cwd, hidden)
    return os.path.join(cwd, *parts), _open_dir(cwd, parts, path or cwd, create=False)


def relative_parts(cwd: str, path: str, hidden: Iterable[Path] = ()) -> list[str]:
    """`path`'s components below `cwd` (an absolute, real path), or an invalid-params error when
    it is not inside (a `..` is never accepted), or it is something the sandbox hides."""
    if not path:
        raise _invalid(path, "is empty")
    if "\0" in path:
        raise _invalid(path, "contains a NUL character")
    base = _components(cwd)
    parts = _components(path)
    if ".." in parts:
        raise _invalid(path, "contains '..': paths must stay inside the session's directory")
    if os.path.isabs(path):
        if parts[: len(base)] != base:
            raise _invalid(path, f"is outside the session's directory {clip(cwd, 200)}")
        parts = parts[len(base) :]
    root = Path("/", *base)
    target = root.joinpath(*parts)
    for secret in hidden:
        if target.is_relative_to(secret) and not root.is_relative_to(secret):
            raise _invalid(path, "is hidden from agents")
    return parts


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _open_dir(cwd: str, parts: list[str], path: str, create: bool) -> int:
    """An `O_PATH` descriptor of `cwd`/`parts`, reached one component at a time from `/` without
    following any symbolic link; `create` makes missing directories below `cwd`."""
    fd = os.open("/", DIR_FLAGS)
    try:
        for part in _components(cwd):
            try:
                fd = _step(fd, part)
            except OSError as exc:
                why = _why(exc, fd, part)
                raise _failed(path, f"the session's directory cannot be opened: {why}") from None
        for part in parts:
            try:
                fd = _step(fd, part)
            except FileNotFoundError:
                if not create:
                    raise _not_found(path) from None
                try:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    fd = _step(fd, part)
                except OSError as exc:
                    raise _os_error(path, exc, fd, part) from None
            except OSError as exc:
                raise _os_error(path, exc, fd, part) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _step(directory: int, part: str) -> int:
    """Open the directory `part` (not a link) in `directory`, then close `directory`."""
    fd = os.open(part, DIR_FLAGS, dir_fd=directory)
    os.close(directory)
    return fd


def _select_lines(handle: BinaryIO, first: int, limit: int | None, path: str) -> bytes:
    """Lines `first`.. (1-based), at most `limit` of them, as bytes; within the read limits."""
    out = bytearray()
    number = 1  # the line the next piece belongs to
    scanned = 0
    while limit is None or number < first + limit:
        chunk = handle.read(READ_CHUNK)
        if not chunk:
            break
        scanned += len(chunk)
        if scanned > MAX_SCAN_BYTES:
            raise _invalid(path, f"would be read past {MAX_SCAN_BYTES} bytes to find the lines asked for")
        for piece in _lines(chunk):
            if limit is not None and number >= first + limit:
                break
            if number >= first:
                out += piece
                if len(out) > MAX_READ_BYTES:
                    raise _invalid(path, f"lines asked for are {_too_large(len(out))}")
            if piece.endswith(b"\n"):
                number += 1
    return bytes(out)


def _lines(chunk: bytes) -> Iterator[bytes]:
    """`chunk` cut after each newline (the last piece may be the start of a longer line)."""
    start = 0
    while start < len(chunk):
        end = chunk.find(b"\n", start)
        end = len(chunk) if end < 0 else end + 1
        yield chunk[start:end]
        start = end


def _too_large(size: int) -> str:
    return f"over the read limit ({size} > {MAX_READ_BYTES} bytes): read it in parts with line and limit"


# ---- errors, bounded -----------------------------------------------------------------------


def _why(exc: OSError, directory: int | None = None, part: str | None = None) -> str:
    if directory is not None and part is not None and exc.errno in (errno.ENOTDIR, errno.ELOOP):
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(part, dir_fd=directory, follow_symlinks=False).st_mode):
                return f"{clip(part, 100)!r} is a symbolic link"
    if exc.errno == errno.ELOOP:
        return "a symbolic link"
    return exc.strerror or str(exc.errno)


def _os_error(
    path: str, exc: OSError, directory: int | None = None, part: str | None = None
) -> acp.RequestError:
    if exc.errno == errno.ENOENT:
        return _not_found(path)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ENXIO):
        why = _why(exc, directory, part)
        return _invalid(
            path, f"cannot be used: {why} (symbolic links are not followed)" if "link" in why else why
        )
    return _failed(path, exc.strerror or str(exc.errno))


def _invalid(path: str, why: str) -> acp.RequestError:
    message = f"{clip(path, 200)} {why}"
    return acp.RequestError(-32602, clip(message, 400), {"path": clip(path, 200)})


def _not_found(path: str) -> acp.RequestError:
    return acp.RequestError(NOT_FOUND, f"no such file: {clip(path, 200)}", {"uri": clip(path, 200)})


def _failed(path: str, why: str) -> acp.RequestError:
    message = f"{clip(path, 200)}: {why}"
    return acp.RequestError(-32603, clip(message, 400), {"path": clip(path, 200)})
