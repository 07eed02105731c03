"""The file store's audit trail: one JSON object per line, newest last.

Appended by the committer while it holds the store's lock, so lines are in version order and
never interleave. Readers take the file as it is: a torn last line (a writer killed mid-append)
or any line that is not a record is skipped. The file is kept to about ``max_records`` lines:
once it holds 10% more, it is rewritten atomically with only the newest ``max_records``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from rules.document import canonical_json
from rules.stores.atomic import fsync_directory, replace_file, write_all
from rules.stores.base import AuditRecord
from rules.stores.errors import StoreUnavailableError

__all__ = ["AuditFacts", "AuditLog"]

log = logging.getLogger(__name__)

_MODE: Final = 0o640
_CHUNK: Final = 1 << 16
_REVOKE_MARK: Final = b'"revoke":true'  # as canonical_json writes it; no string can contain it


@dataclass(frozen=True, slots=True)
class AuditFacts:
    """What a state needs from the trail: when its version was committed (``None``: no record
    of it) and the newest version committed with ``revoke`` (0: none on record)."""

    committed_at: float | None
    revoke_version: int


class AuditLog:
    """A JSON-lines audit file. Appends must be made under the store's lock."""

    def __init__(self, path: Path, max_records: int) -> None:
        self.path = path
        self.max_records = max_records
        self._count: tuple[tuple[int, int, int], int] | None = None  # (dev, ino, size), lines

    # --- writing ---------------------------------------------------------------------------

    def open_for_append(self, *, owner: int, group: int) -> int:
        """A descriptor to append to, opened before the commit so that a trail which cannot be
        written stops the edit before anything changed. A new trail is created 0640, owned as
        the config is (``owner``, ``group``): whoever may edit the config may go on writing its
        trail (root's first edit must not lock the proxy's own user out of it), and whoever
        may read the config by its group may read the trail."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _MODE)
        except OSError as error:
            raise StoreUnavailableError(
                f"{self.path}: cannot write the audit trail ({error.strerror or error});"
                " nothing was changed"
            ) from None
        with contextlib.suppress(OSError):
            status = os.fstat(fd)
            if status.st_size == 0 and status.st_uid == os.geteuid():
                os.fchown(fd, owner if os.geteuid() == 0 else -1, group)
        return fd

    def append(self, fd: int, record: AuditRecord) -> None:
        """Append ``record`` as one line and make it durable; then keep the file bounded.
        The commit has happened by now: a failure here is logged, not raised."""
        line = canonical_json(record.to_data()).encode() + b"\n"
        try:
            before = os.fstat(fd)
            if before.st_size > 0 and os.pread(fd, 1, before.st_size - 1) != b"\n":
                line = b"\n" + line  # end a torn last line first, so this record stands alone
            write_all(fd, line)
            os.fsync(fd)
            if before.st_size == 0:
                fsync_directory(self.path.parent)
            after = os.fstat(fd)
            self._bound(before, after, line.count(b"\n"))
        except OSError as error:
            log.error(
                "an edit was committed but its audit record may be missing or untrimmed",
                extra={"audit_log": str(self.path), "version": record.version, "error": str(error)},
            )

    def _bound(self, before: os.stat_result, after: os.stat_result, added: int) -> None:
        if self._count is not None and self._count[0] == _identity(before):
            lines = self._count[1] + added
        else:  # first append by this process, or someone else wrote: count again
            lines = self._count_lines()
        self._count = (_identity(after), lines)
        if lines <= self.max_records + self.max_records // 10:
            return
        with open(self.path, "rb") as f:
            newest = f.read().splitlines(keepends=True)[-self.max_records :]
        replace_file(self.path, b"".join(newest), like=after)
        self._count = (_identity(os.stat(self.path)), len(newest))

    def _count_lines(self) -> int:
        count = 0
        with open(self.path, "rb") as f:
            while block := f.read(_CHUNK):
                count += block.count(b"\n")
        return count

    # --- reading ---------------------------------------------------------------------------

    def history(self, app: str | None, limit: int) -> list[AuditRecord]:
        """The newest ``limit`` records (touching ``app``, if given), newest first."""
        found: list[AuditRecord] = []
        if limit <= 0:
            return found
        needle = None if app is None else b'"app":' + canonical_json(app).encode()
        for record in self._newest(needle):
            if app is None or record.touches(app):
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    def facts(self, version: int) -> AuditFacts:
        """When ``version`` was committed, and the newest revoke at or below it."""
        committed_at: float | None = None
        for record in self._newest(None):
            if record.version <= version:
                if record.version == version:
                    committed_at = record.at
                break
        for record in self._newest(_REVOKE_MARK):
            if record.revoke and record.version <= version:
                return AuditFacts(committed_at, record.version)
        return AuditFacts(committed_at, 0)

    def _newest(self, needle: bytes | None) -> Iterator[AuditRecord]:
        """Records among the newest ``max_records`` lines, newest first; with ``needle``, only
        lines containing it are parsed (a block without it is skipped whole). A line that is
        not a record (a torn last line) is passed over."""
        seen = 0
        for chunk in self._chunks_backwards():
            if not chunk:
                continue
            if needle is not None and needle not in chunk:
                seen += chunk.count(b"\n") + (not chunk.endswith(b"\n"))
                if seen >= self.max_records:
                    return
                continue
            for line in reversed(chunk.split(b"\n")):
                if not line:
                    continue
                if seen >= self.max_records:
                    return
                seen += 1
                if needle is None or needle in line:
                    record = _record(line)
                    if record is not None:
                        yield record

    def _chunks_backwards(self) -> Iterator[bytes]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115  (a generator holds it; closed below)
        except FileNotFoundError:
            return
        except OSError as error:
            raise StoreUnavailableError(
                f"{self.path}: cannot read the audit trail ({error.strerror or error})"
            ) from None
        with f:
            yield from _chunks_backwards(f)


def _chunks_backwards(f: BinaryIO) -> Iterator[bytes]:
    """``f`` as runs of whole lines, the last run first, read a block at a time."""
    position = f.seek(0, os.SEEK_END)
    rest = b""
    while position > 0:
        step = min(_CHUNK, position)
        position -= step
        f.seek(position)
        block = f.read(step) + rest
        if position == 0:
            yield block
            return
        cut = block.find(b"\n")
        if cut < 0:  # one line longer than a block: read on
            rest = block
            continue
        rest = block[: cut + 1]  # the end of a line that starts in an earlier block
        yield block[cut + 1 :]


def _record(line: bytes) -> AuditRecord | None:
    try:
        data = json.loads(line)
        return AuditRecord.from_data(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    return (status.st_dev, status.st_ino, status.st_size)
