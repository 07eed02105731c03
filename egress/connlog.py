"""The canonical log line: one JSON object per client connection, written when it closes.

Lines are buffered in memory and handed over in batches (on a short timer, when the buffer
grows, and at shutdown), so the per-connection cost on the event loop is formatting the line
(the driver formats it itself; :meth:`ConnectionLog.emit` encodes a dict) and a list append.
The blocking ``write`` calls happen on one writer thread, because the loop must never stall on
a slow disk or on a full pipe (stderr read by a wedged log shipper): every tunnel would stall
with it. What the thread cannot keep up with is dropped, whole lines only, and counted.

Strings that came from a client are bounded and escaped before they get here (:func:`untrusted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

log = logging.getLogger("egress.connlog")

_MAX_UNTRUSTED = 256
_FLUSH_INTERVAL_SECONDS = 0.5
_FLUSH_BYTES = 64 * 1024
_MAX_PENDING_BYTES = 8 * 1024 * 1024
_CLOSE_TIMEOUT_SECONDS = 5.0
# How often a writer waiting for a non-blocking fd to drain looks whether close() gave up on it.
_POLL_MILLISECONDS = 250
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_OPEN_MODE = 0o640


def untrusted(text: str | bytes | None, limit: int = _MAX_UNTRUSTED) -> str | None:
    """Bound and escape a client-supplied string for the log (``repr`` escaping, no quotes)."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("ascii", "backslashreplace")
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isascii() and text.isprintable():
        return text
    return repr(text)[1:-1]


@dataclass(frozen=True, slots=True)
class ConnectionLogStatistics:
    """Counters of a :class:`ConnectionLog`; ``written + dropped`` never exceeds what was emitted.

    ``bytes_pending`` is what was handed to the writer thread and is not written yet.
    """

    lines_written: int
    lines_dropped: int
    bytes_pending: int
    write_errors: int


@dataclass(frozen=True, slots=True)
class _Batch:
    data: bytes
    lines: int


@dataclass(frozen=True, slots=True)
class _Reopen:
    target: str | None


class _Stop:
    pass


_Item: TypeAlias = _Batch | _Reopen | _Stop


def _open_target(target: str) -> int:
    fd = os.open(target, _OPEN_FLAGS, _OPEN_MODE)
    # Our own open file description, so making it non-blocking affects nobody else. For a regular
    # file it changes nothing; for a FIFO it lets the writer notice that close() gave up on it.
    os.set_blocking(fd, False)
    return fd


class ConnectionLog:
    """JSON-lines writer to stderr (``"-"``) or a file, written by a background thread.

    ``emit``, ``flush``, ``reopen`` and ``close`` are called on the event loop thread. The loop
    never waits for the writer thread (except in ``close``, bounded): batches go through a queue,
    and when more than ``max_pending_bytes`` would be waiting for the thread, new lines are
    dropped and reported to ``on_dropped(n_lines)``, always on the loop thread.
    """

    def __init__(
        self,
        target: str,
        *,
        max_pending_bytes: int = _MAX_PENDING_BYTES,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        # The path currently written to; the writer thread updates it after a successful reopen.
        self.target = target
        if target == "-":
            fd, owns_fd = sys.stderr.fileno(), False
        else:
            fd, owns_fd = _open_target(target), True
        self._max_pending = max_pending_bytes
        self._on_dropped = on_dropped
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

        # Loop side: only the loop thread touches these.
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._lines_handed = 0
        self._bytes_handed = 0
        self._dropped_loop = 0
        self._dropped_reported = 0
        self._dropped_thread_seen = 0

        # Writer side: only the writer thread changes these (and close(), once it gave up on the
        # thread), under _lock, which is never held across a write. The loop reads them unlocked.
        self._lock = threading.Lock()
        self._lines_written = 0
        self._bytes_done = 0
        self._dropped_thread = 0
        self._write_errors = 0
        self._abandoned = False
        self._fd = fd
        self._owns_fd = owns_fd
        self._torn = False  # the last write error left a partial line in the output
        self._failing = False  # writes are failing (logged once, until one succeeds)

        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="egress-connlog", daemon=True)
        self._thread.start()

    # -- loop side ---------------------------------------------------------------------------

    def emit(self, record: dict[str, Any]) -> None:
        """Buffer one line; never blocks (a line that does not fit is dropped and counted)."""
        self.emit_line(self._encode(record))

    def emit_line(self, line: str) -> None:
        """Like :meth:`emit`, for a line already encoded as ASCII JSON (no newline)."""
        size = len(line) + 1  # ASCII: characters are bytes
        pending = self._bytes_handed - self._bytes_done
        if self._closed or pending + self._size + size > self._max_pending:
            self._dropped_loop += 1
            # Reported in one call by the next flush (the timer), not once per line.
            if self._closed or (self._timer is None and not self._start_timer()):
                self._report_dropped()
            return
        if self._dropped_thread != self._dropped_thread_seen:
            self._report_dropped()
        self._lines.append(line)
        self._size += size
        if self._size >= _FLUSH_BYTES or (self._timer is None and not self._start_timer()):
            self.flush()

    def _start_timer(self) -> bool:
        """Schedule a flush on the running loop; False when there is none."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._timer = loop.call_later(_FLUSH_INTERVAL_SECONDS, self.flush)
        return True

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (does not wait for them to be written)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            data = ("\n".join(self._lines) + "\n").encode()
            self._lines_handed += len(self._lines)
            self._bytes_handed += len(data)
            self._queue.put(_Batch(data, len(self._lines)))
            self._lines.clear()
            self._size = 0
        self._report_dropped()

    def reopen(self, target: str | None = None) -> bool:
        """Reopen the log file (or switch to ``target``) after what was emitted so far.

        For logrotate (``postrotate kill -HUP``): the writer thread closes the current file and
        opens the path again, in order with the writes. A failure to open keeps the old file and
        counts a write error (logged by the thread). Returns whether a reopen was queued: stderr
        is never reopened, and nothing is after :meth:`close`.
        """
        if self._closed or (target is None and self.target == "-"):
            return False
        self.flush()
        self._queue.put(_Reopen(target))
        return True

    def statistics(self) -> ConnectionLogStatistics:
        """A consistent snapshot (the lock is only ever held for a few counter updates)."""
        with self._lock:
            return ConnectionLogStatistics(
                lines_written=self._lines_written,
                lines_dropped=self._dropped_loop + self._dropped_thread,
                bytes_pending=self._bytes_handed - self._bytes_done,
                write_errors=self._write_errors,
            )

    def close(self, timeout: float = _CLOSE_TIMEOUT_SECONDS) -> None:
        """Write what is pending (waiting at most ``timeout`` seconds), stop the writer thread.

        This is the one call that waits for the thread (at shutdown, bounded). What is still
        unwritten after the timeout is counted as dropped. The file is closed by the writer
        thread; stderr is never closed. Calling it again does nothing.
        """
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(_Stop())
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._abandoned = True
                unwritten = self._lines_handed - self._lines_written - self._dropped_thread
                self._dropped_thread += unwritten
                self._bytes_done = self._bytes_handed
            log.warning(
                "connection log writer did not finish in time, dropping the rest",
                extra={"target": self.target, "lines": unwritten},
            )
            # A writer waiting in poll() notices within _POLL_MILLISECONDS; one stuck in a
            # blocking write (a wedged stderr pipe) stays behind as a daemon thread.
            self._thread.join(2 * _POLL_MILLISECONDS / 1000)
        self._report_dropped()

    def _report_dropped(self) -> None:
        self._dropped_thread_seen = dropped_thread = self._dropped_thread
        total = self._dropped_loop + dropped_thread
        count = total - self._dropped_reported
        if count <= 0 or self._on_dropped is None:
            return
        self._dropped_reported = total
        try:
            self._on_dropped(count)
        except Exception:
            log.exception("connection log on_dropped callback failed")

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._abandoned:
                item = self._queue.get()
                if isinstance(item, _Stop):
                    break
                try:
                    if isinstance(item, _Batch):
                        self._write_batch(item)
                    else:
                        self._reopen_now(item.target)
                except Exception:  # a bug must not silently stop the log; count and go on
                    log.exception("connection log writer failed")
                    with self._lock:
                        self._write_errors += 1
                        if isinstance(item, _Batch) and not self._abandoned:
                            self._dropped_thread += item.lines
                            self._bytes_done += len(item.data)
        finally:
            if self._owns_fd:
                self._owns_fd = False
                with contextlib.suppress(OSError):
                    os.close(self._fd)

    def _write_batch(self, batch: _Batch) -> None:
        data = b"\n" + batch.data if self._torn else batch.data
        start = 1 if self._torn else 0
        view = memoryview(data)
        written = 0
        error: OSError | None = None
        while written < len(data) and not self._abandoned:
            try:
                written += os.write(self._fd, view[written:])
            except BlockingIOError:  # stderr may be a non-blocking pipe; wait, never spin
                self._wait_writable()
            except OSError as exc:
                error = exc
                break
        lines = data.count(b"\n", start, written) if error is not None else batch.lines
        if error is not None:
            if written > 0:
                self._torn = data[written - 1] != ord("\n")
            if not self._failing:  # once per run of failures, not once per batch
                self._failing = True
                log.error(
                    "connection log write failed, dropping lines until it works again",
                    extra={"target": self.target, "error": str(error)},
                )
        elif written == len(data):
            self._torn = False
            if self._failing:
                self._failing = False
                log.warning("connection log writes work again", extra={"target": self.target})
        with self._lock:
            if self._abandoned:  # close() already counted this batch as dropped
                return
            self._lines_written += lines
            self._dropped_thread += batch.lines - lines
            self._bytes_done += len(batch.data)
            if error is not None:
                self._write_errors += 1

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        # POLLERR/POLLHUP also end the wait: the next write then reports the error.
        while not self._abandoned and not poller.poll(_POLL_MILLISECONDS):
            pass

    def _reopen_now(self, target: str | None) -> None:
        path = self.target if target is None else target
        if path == "-":
            if not self._owns_fd:
                return  # already stderr, which is never reopened
            try:
                fd = sys.stderr.fileno()
            except (AttributeError, ValueError, OSError) as exc:
                self._reopen_failed(path, exc)
                return
            owns_fd = False
        else:
            try:
                fd = _open_target(path)
            except OSError as exc:
                self._reopen_failed(path, exc)
                return
            owns_fd = True
        old_fd, old_owns = self._fd, self._owns_fd
        self._fd, self._owns_fd, self._torn = fd, owns_fd, False
        self.target = path
        if old_owns:
            with contextlib.suppress(OSError):
                os.close(old_fd)
        log.info("connection log reopened", extra={"target": path})

    def _reopen_failed(self, path: str, exc: Exception) -> None:
        with self._lock:
            self._write_errors += 1
        log.error(
            "cannot reopen the connection log, keeping the old one",
            extra={"target": path, "error": str(exc)},
        )
