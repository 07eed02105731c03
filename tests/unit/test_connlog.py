"""Connection log: ordering, back-pressure on full pipes, logrotate reopen, errors and close.

Real files, FIFOs, pipes and /dev/full; conditions are polled with a deadline (tests.polling),
never slept on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import select
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress.connlog import ConnectionLog, ConnectionLogStatistics, untrusted
from tests.polling import eventually, wait_until

PAD = "x" * 500  # ~560-byte lines: several MB is ~10k emits


def record(phase: int, seq: int) -> dict[str, Any]:
    return {"phase": phase, "seq": seq, "pad": PAD}


def contents(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def json_lines(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode("ascii").splitlines()]


def fds_open_on(path: Path) -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
    return found


class Drops:
    """An ``on_dropped`` callback that remembers what it got and on which thread."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()

    def __call__(self, count: int) -> None:
        self.calls.append(count)
        self.threads.add(threading.get_ident())

    @property
    def total(self) -> int:
        return sum(self.calls)


class Reader:
    """Drains a pipe on a thread once started; ``finish`` collects everything still in it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(20) and not self._read_available():
                return

    def _read_available(self) -> bool:
        """Read until the pipe is empty; False at end of file."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.data += chunk

    def finish(self) -> bytes:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._read_available()
        return bytes(self.data)


@contextlib.contextmanager
def pipe_target(kind: str, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A log target backed by a pipe, and the (non-blocking) read end nobody reads yet.

    ``fifo`` is a named pipe given as a path; ``stderr-*`` put a pipe on the stderr descriptor
    (what ``"-"`` writes to) with a blocking or a non-blocking write end.
    """
    if kind == "fifo":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            yield str(fifo), read_fd
        finally:
            os.close(read_fd)
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, kind == "stderr-blocking")
    stderr_fd = sys.stderr.fileno()
    saved = os.dup(stderr_fd)
    os.dup2(write_fd, stderr_fd)
    os.close(write_fd)
    try:
        yield "-", read_fd
    finally:
        os.dup2(saved, stderr_fd)
        os.close(saved)
        os.close(read_fd)


# -- untrusted() -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("", ""),
        ("GET / HTTP/1.1", "GET / HTTP/1.1"),
        (b"host.example", "host.example"),
        ("line\r\nbreak", "line\\r\\nbreak"),
        ("it's \n", "it's \\n"),
        ("\x1b[31m", "\\x1b[31m"),
        ("é", "é"),  # printable non-ASCII: repr leaves it, the JSON encoder escapes it
        (b"\xff\x00ab", "\\\\xff\\x00ab"),  # backslashreplace, then repr escaping
        ("a" * 300, "a" * 256 + "..."),
    ],
)
def test_untrusted_bounds_and_escapes(text: str | bytes | None, expected: str | None) -> None:
    assert untrusted(text) == expected


def test_untrusted_limit_counts_characters_before_escaping() -> None:
    assert untrusted("abcdef", limit=3) == "abc..."
    assert untrusted("\n" * 5, limit=2) == "\\n\\n..."


# -- basic writing ---------------------------------------------------------------------------


def test_lines_reach_the_file_in_order_as_json(tmp_path: Path) -> None:
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path))
    for seq in range(2000):
        log.emit({"seq": seq, "client": untrusted("évil\n"), "pad": PAD})
    log.close()
    records = json_lines(path.read_bytes())
    assert [r["seq"] for r in records] == list(range(2000))
    assert records[0]["client"] == "\u00e9vil\\n"
    assert b"\\u00e9" in path.read_bytes().splitlines()[0]  # ASCII only on disk
    assert log.statistics() == ConnectionLogStatistics(
        lines_written=2000, lines_dropped=0, bytes_pending=0, write_errors=0
    )
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_without_a_loop_emit_hands_the_line_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path))
    try:
        log.emit({"seq": 1})
        wait_until(lambda: contents(path) == b'{"seq":1}\n', "the line is in the file")
    finally:
        log.close()


def test_on_a_loop_the_timer_flushes(tmp_path: Path) -> None:
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path))

    async def scenario() -> None:
        log.emit({"seq": 1})
        log.emit({"seq": 2})
        await asyncio.sleep(0)
        assert path.read_bytes() == b""  # buffered until the timer
        await eventually(
            lambda: contents(path) == b'{"seq":1}\n{"seq":2}\n', "the timer flushed", timeout=3.0
        )

    try:
        asyncio.run(scenario())
    finally:
        log.close()


def test_writer_is_one_daemon_thread_named_egress_connlog(tmp_path: Path) -> None:
    before = {t for t in threading.enumerate() if t.name == "egress-connlog"}
    log = ConnectionLog(str(tmp_path / "conn.log"))
    (thread,) = {t for t in threading.enumerate() if t.name == "egress-connlog"} - before
    assert thread.daemon
    log.close()
    assert not thread.is_alive()


# -- back-pressure ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "stderr-blocking", "stderr-nonblocking"])
def test_a_full_pipe_never_stalls_the_loop_and_drops_are_counted(kind: str, tmp_path: Path) -> None:
    max_pending = 256 * 1024
    phase1, phase2 = 10_000, 200  # ~5.6 MB into a pipe nobody reads, then ~110 KB
    drops = Drops()

    with pipe_target(kind, tmp_path) as (target, read_fd):
        log = ConnectionLog(target, max_pending_bytes=max_pending, on_dropped=drops)
        reader = Reader(read_fd)
        try:

            async def scenario() -> tuple[float, ConnectionLogStatistics]:
                ticks: list[float] = []
                running = True

                async def heartbeat() -> None:
                    while running:
                        ticks.append(time.monotonic())
                        await asyncio.sleep(0.005)  # the beat: gaps between ticks are measured

                beat = asyncio.create_task(heartbeat())
                await eventually(lambda: len(ticks) >= 3, "the heartbeat is ticking")
                for seq in range(phase1):
                    log.emit(record(1, seq))
                    if seq % 100 == 0:
                        await asyncio.sleep(0)
                log.flush()
                # The writer is stuck on the full pipe now; the loop must keep beating.
                flushed_at = len(ticks)
                await eventually(
                    lambda: len(ticks) >= flushed_at + 3, "the heartbeat beats on after the flush"
                )
                running = False
                await beat
                ticks.append(time.monotonic())
                max_gap = max(b - a for a, b in itertools.pairwise(ticks))
                stalled = log.statistics()

                reader.start()
                await eventually(lambda: log.statistics().bytes_pending == 0, "the log drained")
                for seq in range(phase2):
                    log.emit(record(2, seq))
                log.flush()
                await eventually(lambda: log.statistics().bytes_pending == 0, "the log drained")
                return max_gap, stalled

            max_gap, stalled = asyncio.run(scenario())
        finally:
            log.close()
        data = reader.finish()

    assert max_gap < 0.25, f"the loop stalled for {max_gap:.3f}s"
    assert stalled.bytes_pending <= max_pending
    assert stalled.lines_dropped > phase1 // 2  # a 64 KiB pipe and 256 KiB pending hold little
    assert stalled.write_errors == 0

    stats = log.statistics()
    assert stats.lines_dropped == stalled.lines_dropped  # nothing dropped once it drained
    assert stats.lines_written + stats.lines_dropped == phase1 + phase2
    assert drops.total == stats.lines_dropped
    assert len(drops.calls) < 10  # coalesced by the flush, not one call per line
    assert drops.threads == {threading.get_ident()}

    records = json_lines(data)  # every line complete
    assert len(records) == stats.lines_written
    first = [r["seq"] for r in records if r["phase"] == 1]
    assert first == sorted(first)
    assert [r["seq"] for r in records if r["phase"] == 2] == list(range(phase2))


def test_close_gives_up_on_a_pipe_nobody_reads(tmp_path: Path) -> None:
    drops = Drops()
    with pipe_target("fifo", tmp_path) as (target, read_fd):
        log = ConnectionLog(target, on_dropped=drops)
        for seq in range(1000):  # ~560 KB: far more than the pipe holds
            log.emit(record(1, seq))
        wait_until(lambda: log.statistics().lines_written > 0, "a line written")
        started = time.monotonic()
        log.close(timeout=0.2)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0
        assert fds_open_on(Path(target)) == [read_fd]  # the writer noticed and closed its fd
    stats = log.statistics()
    assert 0 < stats.lines_written < 1000
    assert stats.lines_written + stats.lines_dropped == 1000
    assert stats.bytes_pending == 0
    assert drops.total == stats.lines_dropped


# -- reopen ----------------------------------------------------------------------------------


def test_logrotate_rename_then_reopen(tmp_path: Path) -> None:
    path = tmp_path / "connection_log"
    rotated = tmp_path / "connection_log.1"
    log = ConnectionLog(str(path))
    try:

        async def scenario() -> None:
            for seq in range(300):
                log.emit(record(1, seq))
            # logrotate renames while lines are still buffered on the loop and in the thread
            os.rename(path, rotated)
            assert log.reopen() is True
            for seq in range(300):
                log.emit(record(2, seq))

        asyncio.run(scenario())
    finally:
        log.close()
    old = json_lines(rotated.read_bytes())
    new = json_lines(path.read_bytes())
    assert [(r["phase"], r["seq"]) for r in old] == [(1, seq) for seq in range(300)]
    assert [(r["phase"], r["seq"]) for r in new] == [(2, seq) for seq in range(300)]
    assert log.statistics().lines_written == 600
    assert log.target == str(path)


def test_reopen_to_another_path_and_the_old_fd_is_closed(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    log = ConnectionLog(str(first))
    log.emit({"seq": 1})
    assert log.reopen(str(second)) is True
    log.emit({"seq": 2})
    wait_until(lambda: contents(second) == b'{"seq":2}\n', "the line in the new file")
    assert fds_open_on(first) == []
    assert log.target == str(second)
    log.close()
    assert first.read_bytes() == b'{"seq":1}\n'


def test_reopen_into_a_missing_directory_fails_softly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path))
    log.emit({"seq": 1})
    assert log.reopen(str(tmp_path / "missing" / "conn.log")) is True
    log.emit({"seq": 2})
    log.close()
    assert path.read_bytes() == b'{"seq":1}\n{"seq":2}\n'
    stats = log.statistics()
    assert (stats.write_errors, stats.lines_written, stats.lines_dropped) == (1, 2, 0)
    assert log.target == str(path)
    assert any("cannot reopen" in r.getMessage() for r in caplog.records)


def test_reopen_of_stderr_and_after_close_does_nothing(tmp_path: Path) -> None:
    log = ConnectionLog("-")
    assert log.reopen() is False
    log.close()
    file_log = ConnectionLog(str(tmp_path / "conn.log"))
    file_log.close()
    assert file_log.reopen() is False


# -- write errors ----------------------------------------------------------------------------


def test_write_errors_are_counted_and_the_writer_keeps_going(tmp_path: Path) -> None:
    drops = Drops()
    log = ConnectionLog("/dev/full", on_dropped=drops)  # every write fails with ENOSPC
    try:
        for seq in range(3):  # no loop: three batches of one line
            log.emit({"seq": seq})
        wait_until(lambda: log.statistics().write_errors == 3, "three write errors")
        assert drops.calls == []  # never called from the writer thread
        log.flush()
        assert drops.calls == [3]
        assert drops.threads == {threading.get_ident()}

        good = tmp_path / "conn.log"
        assert log.reopen(str(good)) is True
        log.emit({"seq": 3})
        wait_until(lambda: contents(good) == b'{"seq":3}\n', "the line in the good file")
    finally:
        log.close()
    assert log.statistics() == ConnectionLogStatistics(
        lines_written=1, lines_dropped=3, bytes_pending=0, write_errors=3
    )


def test_a_write_cut_short_does_not_tear_the_next_line(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel write part of a line, then fail with EFBIG (Python ignores
    # SIGXFSZ); the line after the error must still start on a line of its own.
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path))
    lines = [json.dumps(record(1, seq), separators=(",", ":")).encode() for seq in range(110)]
    limit = sum(len(x) + 1 for x in lines[:100]) + 200  # 200 bytes into line 100
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        for seq in range(110):  # no loop: one batch per line
            log.emit(record(1, seq))
        wait_until(lambda: log.statistics().bytes_pending == 0, "nothing pending")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    log.emit(record(2, 0))
    log.close()
    stats = log.statistics()
    assert (stats.lines_written, stats.lines_dropped, stats.write_errors) == (101, 10, 10)
    *complete, torn, after = path.read_bytes().splitlines()
    assert [json.loads(x)["seq"] for x in complete] == list(range(100))
    assert torn == lines[100][:200]
    assert json.loads(after) == record(2, 0)


def test_drops_on_a_loop_are_reported_by_the_timer(tmp_path: Path) -> None:
    drops = Drops()
    log = ConnectionLog(str(tmp_path / "conn.log"), max_pending_bytes=10, on_dropped=drops)

    async def scenario() -> None:
        for seq in range(5):
            log.emit({"seq": seq, "pad": PAD})  # none fits
        assert drops.calls == []
        await eventually(lambda: drops.calls == [5], "the drops reported", timeout=3.0)

    try:
        asyncio.run(scenario())
    finally:
        log.close()
    assert log.statistics().lines_dropped == 5


def test_a_reader_that_goes_away_is_a_counted_error(tmp_path: Path) -> None:
    drops = Drops()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = ConnectionLog(str(fifo), on_dropped=drops)
    try:
        log.emit({"seq": 1})
        wait_until(lambda: log.statistics().lines_written == 1, "the line written")
        assert os.read(read_fd, 100) == b'{"seq":1}\n'
        os.close(read_fd)
        log.emit({"seq": 2})  # EPIPE
        wait_until(lambda: log.statistics().write_errors == 1, "the EPIPE counted")
        log.emit({"seq": 3})
        wait_until(lambda: log.statistics().write_errors == 2, "the second error counted")
    finally:
        log.close()
    assert drops.total == 2
    stats = log.statistics()
    assert (stats.lines_written, stats.lines_dropped, stats.bytes_pending) == (1, 2, 0)


# -- close -----------------------------------------------------------------------------------


def test_close_is_idempotent_and_closes_the_owned_fd(tmp_path: Path) -> None:
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path))
    (fd,) = fds_open_on(path)
    log.emit({"seq": 1})
    log.close()
    assert fds_open_on(path) == []
    log.close()
    assert path.read_bytes() == b'{"seq":1}\n'
    os.fstat(2)
    os.fstat(sys.stderr.fileno())
    with contextlib.suppress(OSError):  # the number may be reused, but not by our file
        assert os.readlink(f"/proc/self/fd/{fd}") != str(path)


def test_close_never_closes_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    log = ConnectionLog("-")
    log.emit({"seq": 1})
    log.close()
    log.close()
    os.fstat(2)
    os.fstat(sys.stderr.fileno())
    assert capfd.readouterr().err == '{"seq":1}\n'


def test_emit_after_close_is_dropped(tmp_path: Path) -> None:
    drops = Drops()
    path = tmp_path / "conn.log"
    log = ConnectionLog(str(path), on_dropped=drops)
    log.close()
    log.emit({"seq": 1})
    log.flush()
    assert drops.calls == [1]
    assert log.statistics().lines_dropped == 1
    assert path.read_bytes() == b""
