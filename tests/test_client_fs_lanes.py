"""The client file system under a hung mount (server/sandbox/files.py): one agent's requests stuck
in the kernel never time out another agent's, and a write reported as not done never lands.

A hung file system is a monkeypatched blocking call that waits on a threading.Event the test
sets at the end (bounded, so a failing test never leaves a thread behind for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import acp
import pytest
from sessiongate.server.sandbox import files as client_fs

from tests.conftest import GateFactory, echo_agent, eventually, reply_text

HUNG_FOR = 60.0  # seconds a hung call waits at most for the test to release it


@pytest.fixture
def hang(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[str]]]:
    """Reads of a path holding "hang" block until the event is set; the list records each
    such read as it starts."""
    release = threading.Event()
    started: list[str] = []
    real = client_fs.read_text_file

    def read_text_file(cwd: str, path: str, *args: Any) -> str:
        if "hang" in path:
            started.append(path)
            release.wait(HUNG_FOR)
        return real(cwd, path, *args)

    monkeypatch.setattr(client_fs, "read_text_file", read_text_file)
    try:
        yield release, started
    finally:
        release.set()


def expect_fs_error(task: asyncio.Task[Any]) -> acp.RequestError:
    exc = task.exception()
    assert isinstance(exc, acp.RequestError), exc
    return exc


async def test_one_directorys_hung_reads_do_not_starve_another(
    tmp_path: Path, hang: tuple[threading.Event, list[str]]
) -> None:
    """Twice as many hung reads in one directory as it may run at once: a read in another
    directory is still served at once (it used to wait behind them for a shared pool's 4
    threads and time out)."""
    release, started = hang
    hung_dir, other_dir = tmp_path / "hung", tmp_path / "other"
    for directory in (hung_dir, other_dir):
        directory.mkdir()
        (directory / "notes.txt").write_text("fine\n")
    hung = [asyncio.create_task(client_fs.read(str(hung_dir), f"hang-{i}.txt")) for i in range(8)]
    try:
        await eventually(lambda: len(started) >= 4, 10, "4 reads to hang")
        text = await asyncio.wait_for(client_fs.read(str(other_dir), "notes.txt"), 10)
        assert text == "fine\n"
        assert len(started) == client_fs.LANE_THREADS  # the hung directory held no more threads
    finally:
        release.set()
        await asyncio.gather(*hung, return_exceptions=True)


async def test_a_read_waiting_for_its_lane_times_out_and_never_runs(
    tmp_path: Path, hang: tuple[threading.Event, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    release, started = hang
    monkeypatch.setattr(client_fs, "FS_TIMEOUT", 3.0)
    lane = object()
    hung = [
        asyncio.create_task(client_fs.read(str(tmp_path), f"hang-{i}.txt", lane=lane))
        for i in range(client_fs.LANE_THREADS)
    ]
    try:
        late = asyncio.create_task(client_fs.read(str(tmp_path), "hang-late.txt", lane=lane))
        await asyncio.wait([late], timeout=30)
        assert late.done() and expect_fs_error(late).code == -32603
        assert "hang-late.txt" not in started
        await asyncio.wait(hung, timeout=30)
        assert all(expect_fs_error(task).code == -32603 for task in hung)
        assert client_fs._ADMISSION.running(lane) == client_fs.LANE_THREADS  # their threads still hang
    finally:
        release.set()
        await asyncio.gather(*hung, return_exceptions=True)
    # places given back when the threads return
    await eventually(lambda: client_fs._ADMISSION.running(lane) == 0, 10, "the lane to empty")
    assert "hang-late.txt" not in started


def blocking_write(monkeypatch: pytest.MonkeyPatch, block: Callable[[], object]) -> threading.Event:
    """Writes run `block` before walking to their directory; the event is set when a write's
    thread is done, whatever it did."""
    finished = threading.Event()
    real_open_dir, real_write = client_fs._open_dir, client_fs.write_text_file

    def open_dir(*args: Any, **kwargs: Any) -> int:
        block()
        return real_open_dir(*args, **kwargs)

    def write_text_file(*args: Any) -> client_fs.FileWriteReport:
        try:
            return real_write(*args)
        finally:
            finished.set()

    monkeypatch.setattr(client_fs, "_open_dir", open_dir)
    monkeypatch.setattr(client_fs, "write_text_file", write_text_file)
    return finished


async def test_a_write_reported_as_timed_out_never_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount hangs until after the write's deadline, then recovers: the write's thread
    goes on, but the file is never replaced (it used to land after the timeout was reported)."""
    monkeypatch.setattr(client_fs, "FS_TIMEOUT", 1.0)
    release = threading.Event()
    finished = blocking_write(monkeypatch, lambda: release.wait(HUNG_FOR))
    (tmp_path / "kept.txt").write_text("before")
    try:
        with pytest.raises(acp.RequestError) as caught:
            await asyncio.wait_for(client_fs.write(str(tmp_path), "kept.txt", "after"), 30)
        with pytest.raises(acp.RequestError):
            await asyncio.wait_for(client_fs.write(str(tmp_path), "new/made.txt", "after"), 30)
    finally:
        release.set()
    assert await asyncio.to_thread(finished.wait, 30)
    await asyncio.sleep(0.2)  # the second write's thread too, had it gone on
    assert (tmp_path / "kept.txt").read_text() == "before"
    assert not (tmp_path / "new" / "made.txt").exists()
    assert not [p for p in tmp_path.rglob(".sessiongate-*")]  # temp files removed
    assert caught.value.code == -32603 and "not written within" in str(caught.value)


async def test_a_write_being_renamed_at_its_deadline_lands_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write already renaming at its deadline lands: it is awaited (LANDING_GRACE) and
    reported as written, not as timed out."""
    monkeypatch.setattr(client_fs, "FS_TIMEOUT", 2.0)
    real_rename = client_fs.os.rename

    def slow_rename(*args: Any, **kwargs: Any) -> None:
        time.sleep(3.0)  # past the deadline, within the grace
        real_rename(*args, **kwargs)

    monkeypatch.setattr(client_fs.os, "rename", slow_rename)
    report = await asyncio.wait_for(client_fs.write(str(tmp_path), "made.txt", "hello"), 30)
    assert report.created and (tmp_path / "made.txt").read_text() == "hello"


# ---- end to end: two agents sharing the server's default directory ---------------------------


async def test_one_agents_hung_mount_does_not_time_out_another_agents_files(
    make_gate: GateFactory,
    tmp_path: Path,
    hang: tuple[threading.Event, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session A's reads hang, one turn after another, each timing out for A; session B, in
    the same directory but with an agent of its own, still reads its file (it used to time
    out once A's hung reads held the shared pool's 4 threads)."""
    _, started = hang
    monkeypatch.setattr(client_fs, "FS_TIMEOUT", 3.0)
    config = echo_agent("capable", tmp_path / "agent-state")
    config = dataclasses.replace(config, client_fs=True)
    gate = await make_gate(agents={"capable": config})
    (gate.workdir / "notes.txt").write_text("served\n")
    a = (await gate.create(agent="capable")).session_id
    b = (await gate.create(agent="capable")).session_id
    for _ in range(client_fs.LANE_THREADS):
        events = await gate.prompt(a, "/fs-read hang.txt")
        assert reply_text(events).startswith("fs error -32603:")
    assert len(started) == client_fs.LANE_THREADS
    events = await gate.prompt(b, "/fs-read notes.txt")
    assert reply_text(events) == "served\n"
    with contextlib.suppress(Exception):
        await gate.prompt(a, "/fs-read hang.txt")  # A's next waits for its own share, not run
    assert len(started) == client_fs.LANE_THREADS
