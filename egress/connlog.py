"""The canonical log line: one JSON object per client connection, written when it closes.

Lines are buffered in memory and written in batches (on a short timer, when the buffer grows,
and at shutdown) so the per-connection cost is one ``json.dumps`` and a list append. Strings
that came from a client are bounded and escaped before they get here (:func:`untrusted`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

_MAX_UNTRUSTED = 256
_FLUSH_INTERVAL_SECONDS = 0.5
_FLUSH_BYTES = 64 * 1024


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


class ConnectionLog:
    """Buffered JSON-lines writer to a file descriptor (stderr or an opened file)."""

    def __init__(self, target: str) -> None:
        self.target = target
        if target == "-":
            self._fd = sys.stderr.fileno()
            self._owns_fd = False
        else:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owns_fd = True
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

    def emit(self, record: dict[str, Any]) -> None:
        line = self._encode(record)
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(_FLUSH_INTERVAL_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode()
        self._lines.clear()
        self._size = 0
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BlockingIOError:
            # stderr may be a non-blocking pipe; losing log lines beats stalling every tunnel.
            pass

    def close(self) -> None:
        self.flush()
        if self._owns_fd:
            os.close(self._fd)
            self._owns_fd = False
