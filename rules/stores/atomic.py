"""Replacing a file so that readers and crashes see the old content or the new, never a mix.

The new content goes to a temporary file in the same directory (same file system, so the rename
is atomic), with the old file's mode and owner, is flushed to disk, renamed over the old name,
and the directory is flushed too so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Final

__all__ = [
    "TEMP_SUFFIX",
    "fsync_directory",
    "remove_stale_temporaries",
    "replace_file",
    "write_all",
]

TEMP_SUFFIX: Final = ".egress-tmp"


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, like: os.stat_result) -> None:
    """Atomically make ``data`` the content of ``path``, keeping the mode and owner ``like``
    describes. Raises ``OSError`` (``PermissionError`` when the owner cannot be kept: only
    root, or the owner with a group it belongs to, can give a file to someone)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, stat.S_IMODE(like.st_mode))
        if (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, like.st_uid, like.st_gid)
        write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by a writer that was killed mid-write. Call only
    while holding the lock every writer of ``path`` takes (no live writer has one then)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX))
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
