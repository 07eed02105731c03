"""The file store: the ``[[app]]`` tables of the TOML config file are the rules.

``[rules].version`` in the same file is the store's version; every commit rewrites the file
with the next one, editing the document in place (:mod:`rules.stores.toml_edit`) so the
operator's comments and layout survive, and appends a line to a JSON-lines audit trail
(:mod:`rules.stores.audit_file`).

Writers (any number of processes: the CLI, the admin API) serialise on an exclusive ``flock``
of ``<config>.lock`` beside the file, and under it read the file again: a commit goes through
only if the file is still exactly what the edit was computed from, so neither another writer's
commit nor an operator's hand edit is ever overwritten unseen. The lock is a separate file
because the config itself is replaced by a rename (readers and crashes then see the whole old
file or the whole new one), which gives it a new inode: a lock on the old inode would not
exclude a writer that opened the new one.

Readers take no lock. Followers learn of changes by polling the file's inode, mtime and size,
so a hand edit is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rules.apps import RuleSet
from rules.edits import Change
from rules.problems import InvalidRuleSetError, Problem, value_repr
from rules.stores.atomic import remove_stale_temporaries, replace_file
from rules.stores.audit_file import AuditFacts, AuditLog
from rules.stores.base import AuditDraft, AuditRecord, StoreState
from rules.stores.errors import StoreError, StoreUnavailableError

__all__ = ["FileBackend"]

log = logging.getLogger(__name__)

_BOM: Final = "\ufeff"
_LOCK_POLL_MAX: Final = 0.02


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A state and the exact bytes it was read from (equal bytes: the same state)."""

    raw: bytes
    state: StoreState


class FileBackend:
    """A :class:`rules.stores.base.StoreBackend` over one TOML config file.

    ``validate(text, source)`` is given the whole new file before it replaces the old one and
    raises if the config would no longer load (nothing is written then). ``lock_timeout``:
    how long a writer waits for another one before giving up (``StoreUnavailableError``).
    """

    def __init__(
        self,
        path: Path,
        *,
        audit_path: Path,
        audit_max_records: int = 10_000,
        validate: Callable[[str, str], None] | None = None,
        poll_interval: float = 0.5,
        lock_timeout: float = 30.0,
    ) -> None:
        self._path = Path(path)
        self._audit = AuditLog(Path(audit_path), audit_max_records)
        self._validate = validate
        self._poll_interval = poll_interval
        self._lock_timeout = lock_timeout
        self._parsed: _Parsed | None = None
        self._closed = False

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    # --- the StoreBackend protocol ---------------------------------------------------------

    async def read(self, cached: StoreState | None = None) -> StoreState:
        return await asyncio.to_thread(self._read_state)

    async def write(self, base: StoreState, change: Change, audit: AuditDraft) -> StoreState | None:
        return await asyncio.to_thread(self._write, base, change, audit)

    async def version(self) -> int:
        return await asyncio.to_thread(self._read_version)

    async def history(self, app: str | None = None, limit: int = 50) -> list[AuditRecord]:
        return await asyncio.to_thread(self._audit.history, app, limit)

    def changes(self) -> AsyncIterator[int]:
        """The file's version each time the file changes after this call (commits and hand
        edits alike; a file that cannot be read or parsed just now is looked at again at the
        next poll)."""
        return self._follow(self._signature())

    async def _follow(self, seen: tuple[int, int, int] | None) -> AsyncIterator[int]:
        while not self._closed:
            await asyncio.sleep(self._poll_interval)
            now = await asyncio.to_thread(self._signature)
            if now is None or now == seen or self._closed:
                continue
            try:
                version = await self.version()
            except (StoreError, InvalidRuleSetError):
                continue
            seen = now
            yield version

    async def aclose(self) -> None:
        self._closed = True

    # --- reading ---------------------------------------------------------------------------

    def _read_raw(self, path: Path) -> tuple[bytes, os.stat_result]:
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno())
        except OSError as error:
            raise StoreUnavailableError(
                f"{self.name}: cannot read the rule store ({error.strerror or error})"
            ) from None

    def _read_state(self) -> StoreState:
        raw, status = self._read_raw(self._path)
        return self._state_of(raw, status)

    def _state_of(
        self, raw: bytes, status: os.stat_result, data: dict[str, Any] | None = None
    ) -> StoreState:
        parsed = self._parsed
        if parsed is not None and parsed.raw == raw:
            return parsed.state
        if data is None:
            data = _toml(raw, self.name)
        rule_set = _rule_set(data, self.name)
        try:
            facts = self._audit.facts(rule_set.version)
        except StoreUnavailableError as error:  # the rules do not depend on the trail
            log.warning(
                "cannot read the audit trail; rules read without it",
                extra={"store": self.name, "error": str(error)},
            )
            facts = AuditFacts(None, 0)
        committed_at = facts.committed_at if facts.committed_at is not None else status.st_mtime
        revoke_version = max(facts.revoke_version, _revoke_version(data))
        state = StoreState(rule_set, revoke_version, committed_at)
        self._parsed = _Parsed(raw, state)
        return state

    def _read_version(self) -> int:
        raw, _ = self._read_raw(self._path)
        parsed = self._parsed
        if parsed is not None and parsed.raw == raw:
            return parsed.state.version
        return _version(_toml(raw, self.name), self.name)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self._path)
        except OSError:
            return None
        return (status.st_ino, status.st_mtime_ns, status.st_size)

    # --- writing ---------------------------------------------------------------------------

    def _write(self, base: StoreState, change: Change, audit: AuditDraft) -> StoreState | None:
        target = Path(os.path.realpath(self._path))  # a symlinked config keeps its link
        _, status = self._read_raw(target)
        with self._locked(target, status):
            raw, status = self._read_raw(target)
            fresh = self._unchanged_since(base, raw, status)
            if fresh is None:
                return None  # another commit, or a hand edit, since `base` was read
            version = base.version + 1
            text = _text(raw, self.name)
            # tomlkit (4 MiB) only for writers: a proxy that never edits never loads it.
            from rules.stores.toml_edit import LayoutError, edit_apps  # noqa: PLC0415

            try:
                new_text = edit_apps(
                    text.removeprefix(_BOM), change.apps, version=version, revoke=audit.revoke
                )
            except LayoutError as error:
                raise StoreError(f"{self.name}: cannot edit the file in place: {error}") from None
            if text.startswith(_BOM):
                new_text = _BOM + new_text
            rule_set = self._read_back(new_text, change, version)
            if self._validate is not None:
                self._validate(new_text, self.name)
            audit_fd = self._audit.open_for_append(owner=status.st_uid, group=status.st_gid)
            try:
                new_raw = new_text.encode()
                self._replace(target, new_raw, status)
                now = time.time()
                self._audit.append(audit_fd, AuditRecord.of(audit, version, now))
            finally:
                os.close(audit_fd)
        revoke_version = version if audit.revoke else fresh.revoke_version
        state = StoreState(rule_set, revoke_version, now)
        self._parsed = _Parsed(new_raw, state)
        return state

    def _unchanged_since(
        self, base: StoreState, raw: bytes, status: os.stat_result
    ) -> StoreState | None:
        """The state of ``raw`` if it holds what ``base`` holds, else ``None`` (cheaply when
        the bytes are those ``base`` was read from, or the version differs)."""
        parsed = self._parsed
        if parsed is not None and parsed.state is base and parsed.raw == raw:
            return base
        data = _toml(raw, self.name)
        if _version(data, self.name) != base.version:
            return None
        fresh = self._state_of(raw, status, data)
        return fresh if fresh.rule_set.apps == base.rule_set.apps else None

    def _read_back(self, text: str, change: Change, version: int) -> RuleSet:
        """The edited text read as a store read would: it must hold exactly the apps of the
        change (a guard against an edit in the wrong place; nothing is written otherwise)."""
        try:
            rule_set = _rule_set(_toml(text.encode(), self.name), self.name)
        except InvalidRuleSetError as invalid:
            raise StoreError(
                f"{self.name}: editing the file in place gave a file that does not read back"
                f" ({invalid}); nothing was written. This is a bug: please report it with the"
                " file's layout"
            ) from None
        wanted = {app.name: app for app in change.rule_set.apps}
        got = {app.name: app for app in rule_set.apps}
        if rule_set.version != version or got != wanted:
            wrong = sorted(n for n in wanted.keys() | got.keys() if wanted.get(n) != got.get(n))
            raise StoreError(
                f"{self.name}: editing the file in place would not give the intended rules"
                f" (apps {', '.join(wrong) or '-'}, version {rule_set.version} for {version});"
                " nothing was written. This is a bug: please report it with the file's layout"
            )
        return rule_set

    def _replace(self, target: Path, data: bytes, like: os.stat_result) -> None:
        try:
            replace_file(target, data, like=like)
        except PermissionError as error:
            raise StoreUnavailableError(
                f"{self.name}: cannot write the rule store ({error.strerror or error}); it must"
                f" stay owned by uid {like.st_uid} gid {like.st_gid}: edit it as that user or"
                " as root. Nothing was changed"
            ) from None
        except OSError as error:
            raise StoreUnavailableError(
                f"{self.name}: cannot write the rule store ({error.strerror or error});"
                " nothing was changed"
            ) from None

    @contextlib.contextmanager
    def _locked(self, target: Path, like: os.stat_result) -> Iterator[None]:
        """Hold the exclusive lock of ``<config>.lock``, created with the config's owner and
        group and its mode less any access for others: a sandboxed app that may read a
        world-readable config still cannot open the lock to stall the writers."""
        lock_path = target.with_name(target.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, like.st_mode & 0o660)
        except OSError as error:
            raise StoreUnavailableError(
                f"{self.name}: cannot open the lock file {lock_path} ({error.strerror or error})"
            ) from None
        try:
            with contextlib.suppress(OSError):
                status = os.fstat(fd)
                if status.st_size == 0 and (status.st_uid, status.st_gid) != (
                    like.st_uid,
                    like.st_gid,
                ):
                    os.fchown(fd, like.st_uid, like.st_gid)
            self._acquire(fd, lock_path)
            remove_stale_temporaries(target)
            remove_stale_temporaries(self._audit.path)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _acquire(self, fd: int, lock_path: Path) -> None:
        deadline = time.monotonic() + self._lock_timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailableError(
                        f"{self.name}: another writer has held {lock_path} for"
                        f" {self._lock_timeout:g} s; try again (is an `egress rules` command"
                        " stuck?)"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, _LOCK_POLL_MAX)


# --- reading the file -------------------------------------------------------------------------


def _text(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InvalidRuleSetError(
            [Problem(source, f"line {line}", "bytes that are not UTF-8", "UTF-8 text")]
        ) from None


def _toml(raw: bytes, source: str) -> dict[str, Any]:
    text = _text(raw, source).removeprefix(_BOM)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InvalidRuleSetError([_syntax_problem(source, text, str(error))]) from None
    except RecursionError:
        raise InvalidRuleSetError(
            [Problem(source, "", "values nested too deeply", "valid TOML")]
        ) from None


def _syntax_problem(source: str, text: str, message: str) -> Problem:
    """Where tomllib stopped ("... (at line 3, column 18)") and the line it stopped at."""
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    lines = text.splitlines()
    if match is not None:
        number = int(match[1])
        found = lines[number - 1].strip() if number <= len(lines) else ""
        key = f"line {number}, column {match[2]}"
    else:
        found = next((line.strip() for line in reversed(lines) if line.strip()), "")
        key = "end of document"
    reason = re.sub(r"\s*\(at [^)]*\)$", "", message)
    return Problem(source, key, value_repr(found), "valid TOML", reason)


def _version(data: Mapping[str, Any], source: str) -> int:
    rules = data.get("rules", {})
    version = rules.get("version", 0) if isinstance(rules, Mapping) else 0
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidRuleSetError(
            [Problem(source, "rules.version", value_repr(version), "an integer >= 0")]
        )
    return version


def _rule_set(data: Mapping[str, Any], source: str) -> RuleSet:
    """The ``[[app]]`` tables and ``[rules].version``, read by the one reader of apps."""
    apps = {"app": data["app"]} if "app" in data else {}
    return RuleSet.from_data(apps, version=_version(data, source), source=source)


def _revoke_version(data: Mapping[str, Any]) -> int:
    """``[rules].revoke_version``: the newest version committed with revoke (0: none)."""
    rules = data.get("rules")
    value = rules.get("revoke_version", 0) if isinstance(rules, Mapping) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
