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
within FS_TIMEOUT. Errors reach the agent as JSON-RPC errors with bounded messages.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

import acp

from server.errors import clip

MAX_READ_BYTES = 10 * 1024 * 1024  # content one fs/read_text_file returns
MAX_SCAN_BYTES = 256 * 1024 * 1024  # of a file read to find the lines asked for
MAX_WRITE_BYTES = 10 * 1024 * 1024  # content one fs/write_text_file writes (UTF-8)
FS_TIMEOUT = 30.0  # seconds one fs request may take
READ_CHUNK = 256 * 1024
NOT_FOUND = -32002  # ACP's "resource not found"
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
P = ParamSpec("P")
T = TypeVar("T")
# Threads of their own: requests stuck on a hung mount never starve the loop's default executor.
_FS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="client-fs")


@dataclass(frozen=True, slots=True)
class FileWriteReport:
    """A file the gateway wrote for the agent (fs/write_text_file), as the turn reports it."""

    path: str  # absolute, inside the session's directory
    bytes: int
    created: bool  # the file did not exist before


# ---- the requests, off the loop --------------------------------------------------------------


async def read(
    cwd: str, path: str, line: int | None = None, limit: int | None = None, hidden: Iterable[Path] = ()
) -> str:
    """`read_text_file` on a worker thread within FS_TIMEOUT."""
    return await _off_loop(path, read_text_file, cwd, path, line, limit, tuple(hidden))


async def write(cwd: str, path: str, content: str, hidden: Iterable[Path] = ()) -> FileWriteReport:
    """`write_text_file` on a worker thread within FS_TIMEOUT."""
    return await _off_loop(path, write_text_file, cwd, path, content, tuple(hidden))


async def open_directory_async(cwd: str, path: str, hidden: Iterable[Path] = ()) -> tuple[str, int]:
    """`open_directory` on a worker thread within FS_TIMEOUT (the descriptor is the caller's).
    A result that comes too late is closed."""
    future = asyncio.get_running_loop().run_in_executor(_FS, open_directory, cwd, path, tuple(hidden))
    try:
        async with asyncio.timeout(FS_TIMEOUT):
            return await asyncio.shield(future)
    except (TimeoutError, asyncio.CancelledError) as exc:
        future.add_done_callback(_close_late)
        if isinstance(exc, TimeoutError):
            raise _failed(path, f"not opened within {FS_TIMEOUT:g}s") from None
        raise


def _close_late(future: asyncio.Future[tuple[str, int]]) -> None:
    if not future.cancelled() and future.exception() is None:
        os.close(future.result()[1])


async def _off_loop(path: str, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    call = functools.partial(func, *args, **kwargs)
    future = asyncio.get_running_loop().run_in_executor(_FS, call)
    try:
        async with asyncio.timeout(FS_TIMEOUT):
            return await future
    except TimeoutError:
        raise _failed(path, f"not done within {FS_TIMEOUT:g}s") from None


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


def write_text_file(cwd: str, path: str, content: str, hidden: tuple[Path, ...] = ()) -> FileWriteReport:
    """Replace (or create) the file with `content` (UTF-8), making missing directories; blocking.
    The content goes to a new file renamed over the name: links there are replaced, not followed."""
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
        created = _replace(directory, name, data, path)
    finally:
        os.close(directory)
    return FileWriteReport(path=os.path.join(cwd, *parts), bytes=len(data), created=created)


def _replace(directory: int, name: str, data: bytes, path: str) -> bool:
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
