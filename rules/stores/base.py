"""The store interface: a backend keeps versions; :class:`RuleStore` turns edits into commits.

A backend does three things atomically and nothing else: read the current state, write a change
if and only if the store is still at the version the change was computed from (compare and
swap), and keep an audit trail. :class:`RuleStore` does the rest the same way for every
backend: apply the edit to the state it read (the one validator, :mod:`rules.edits`), honour
``If-Match``, and retry a write that lost a race, so two writers never lose an edit and never
overwrite one another unseen.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
import random
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rules.apps import App, RuleSet
from rules.document import app_etag
from rules.edits import Change, CreateApp, Edit, PutApp, ReplaceAll, apply_edit
from rules.stores.errors import StoreConflictError, StoreError

__all__ = [
    "Actor",
    "AuditDraft",
    "AuditRecord",
    "Committed",
    "RuleStore",
    "StoreBackend",
    "StoreState",
]

_MAX_ATTEMPTS = 100
AUDIT_APPS_SHOWN = 1000
"""An audit record describes at most this many apps of one commit (and counts the rest)."""
_EDIT_ON_LOOP_MAX_APPS = 500


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made an edit: an admin token's name or an OS user, through which face, from where."""

    name: str
    via: str  # "cli" | "api"
    host: str

    @classmethod
    def os_user(cls) -> Actor:
        """The user this process runs as, on this host (the CLI's actor): from the uid, never
        from ``$USER``/``$LOGNAME``, which anyone can set. Under sudo the invoking user is
        noted too (sudo sets ``SUDO_USER``, and only root could have set it otherwise)."""
        uid = os.getuid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = f"uid {uid}"
        invoker = os.environ.get("SUDO_USER")
        if uid == 0 and invoker and invoker != user:
            user = f"{user} (sudo by {invoker})"
        return cls(user, "cli", socket.gethostname())

    def to_data(self) -> dict[str, str]:
        return {"name": self.name, "via": self.via, "host": self.host}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Actor:
        return cls(
            str(data.get("name", "?")), str(data.get("via", "?")), str(data.get("host", "?"))
        )


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """An audit record before the store gives it a version and a time."""

    actor: Actor
    summary: str
    changes: tuple[dict[str, Any], ...]
    revoke: bool = False

    def apps(self) -> list[str]:
        return [str(change["app"]) for change in self.changes]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One committed edit: version, when (the store's clock, Unix seconds), who, what."""

    version: int
    at: float
    actor: Actor
    summary: str
    changes: tuple[dict[str, Any], ...]
    revoke: bool = False

    @classmethod
    def of(cls, draft: AuditDraft, version: int, at: float) -> AuditRecord:
        return cls(version, at, draft.actor, draft.summary, draft.changes, draft.revoke)

    def touches(self, app: str) -> bool:
        return any(change.get("app") == app for change in self.changes)

    def to_data(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "at": self.at,
            "actor": self.actor.to_data(),
            "summary": self.summary,
            "changes": list(self.changes),
            "revoke": self.revoke,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> AuditRecord:
        return cls(
            version=int(data["version"]),
            at=float(data["at"]),
            actor=Actor.from_data(data.get("actor", {})),
            summary=str(data.get("summary", "")),
            changes=tuple(data.get("changes", ())),
            revoke=bool(data.get("revoke", False)),
        )


@dataclass(frozen=True, slots=True)
class StoreState:
    """What a store holds at one version. ``rule_set.version`` is the store's version;
    ``revoke_version`` the newest version committed with ``revoke``; ``committed_at`` when
    this version was committed (the store's clock), if known."""

    rule_set: RuleSet
    revoke_version: int = 0
    committed_at: float | None = None
    _by_name: dict[str, App] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def version(self) -> int:
        return self.rule_set.version

    def app(self, name: str) -> App | None:
        """The app called ``name`` (a dict, made at the first call: imports ask per app)."""
        by_name = self._by_name
        if by_name is None:
            by_name = {app.name: app for app in self.rule_set.apps}
            object.__setattr__(self, "_by_name", by_name)
        return by_name.get(name)


@dataclass(frozen=True, slots=True)
class Committed:
    """The result of :meth:`RuleStore.commit`: the state after it, what changed, and the audit
    record (``None`` for a dry run or an edit that changed nothing)."""

    state: StoreState
    change: Change
    record: AuditRecord | None = None
    dry_run: bool = False


class StoreBackend(Protocol):
    """Storage for a :class:`RuleStore`. Every method may raise ``StoreUnavailableError``."""

    @property
    def name(self) -> str:
        """How messages and problems name the store (``redis://host:port/0``, a file path)."""
        ...

    async def read(self, cached: StoreState | None = None) -> StoreState:
        """The current state, consistent (one version). ``cached`` is an earlier state the
        backend may reuse unchanged apps from."""
        ...

    async def write(self, base: StoreState, change: Change, audit: AuditDraft) -> StoreState | None:
        """Commit ``change`` (computed from ``base``) as version ``base.version + 1`` with its
        audit record, atomically, if the store is still at ``base.version``; ``None`` if it is
        not (someone else committed first: nothing was written)."""
        ...

    async def version(self) -> int:
        """The current version, cheaply (the backstop of change feeds)."""
        ...

    async def history(self, app: str | None = None, limit: int = 50) -> list[AuditRecord]:
        """The newest audit records, newest first (only those touching ``app``, if given)."""
        ...

    def changes(self) -> AsyncIterator[int]:
        """Versions as they are committed, as far as the backend hears of them (a hint: a
        follower reads the state and also polls :meth:`version` as a backstop). A backend may
        start with the version it found when it began listening."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class RuleStore:
    """Edits and reads over one backend; the object the CLI, the admin API and the followers
    use."""

    backend: StoreBackend
    max_attempts: int = _MAX_ATTEMPTS
    _cached: StoreState | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.backend.name

    async def read(self) -> StoreState:
        """The current state (reusing what the last read parsed)."""
        self._cached = await self.backend.read(self._cached)
        return self._cached

    async def commit(
        self,
        edit: Edit | Callable[[StoreState], Edit],
        actor: Actor,
        *,
        if_match: str | None = None,
        revoke: bool = False,
        dry_run: bool = False,
    ) -> Committed:
        """Apply ``edit`` to the current state and commit it as the next version.

        ``edit`` may be a function of the state (an edit that depends on what is stored).
        ``if_match``: for an edit of one app, that app's :func:`rules.document.app_etag` (or
        ``"*"``: it must exist); for ``ReplaceAll``, the store version as a decimal string. A
        mismatch raises ``StoreConflictError`` naming the current value. Invalid edits raise
        the errors of :func:`rules.edits.apply_edit`.
        A lost race is retried on the fresh state (and ``if_match`` checked again there).
        """
        for attempt in range(self.max_attempts):
            base = await self.read()
            work = functools.partial(
                _prepared, base, edit, self.name, actor=actor, revoke=revoke, if_match=if_match
            )
            if len(base.rule_set) > _EDIT_ON_LOOP_MAX_APPS or _is_bulk(edit):
                # Checking the whole set costs ~5 µs an app: off the loop of a proxy's API.
                change, draft = await asyncio.to_thread(work)
            else:
                change, draft = work()
            if dry_run or not change.changed:
                return Committed(base, change, None, dry_run)
            after = await self.backend.write(base, change, draft)
            if after is not None:
                self._cached = after
                record = AuditRecord.of(draft, after.version, after.committed_at or 0.0)
                return Committed(after, change, record)
            # Someone committed first: back off a little (more each time) and redo the edit.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * (attempt + 1))))  # noqa: S311
        raise StoreConflictError(
            f"{self.name}: gave up after {self.max_attempts} attempts: other writers kept"
            " committing first; try again"
        )

    async def history(self, app: str | None = None, limit: int = 50) -> list[AuditRecord]:
        return await self.backend.history(app, limit)

    async def hint_changes(self, hint: asyncio.Event, *, retry_interval: float = 1.0) -> None:
        """Set ``hint`` at every change the backend's feed reports, for ever (a follower's
        task: it reads the store when hinted, and on its own interval as the backstop). A
        feed that fails is started again after ``retry_interval``."""
        while True:
            try:
                async for _ in self.backend.changes():
                    hint.set()
            except StoreError:
                pass
            await asyncio.sleep(retry_interval)

    async def version(self) -> int:
        return await self.backend.version()

    async def aclose(self) -> None:
        await self.backend.aclose()


def _is_bulk(edit: Edit | Callable[[StoreState], Edit]) -> bool:
    """Work to keep off the loop whatever the store's size: a big import, or a function of
    the state (the API's PATCH and import, whose cost the store cannot see)."""
    if callable(edit):
        return True
    return isinstance(edit, ReplaceAll) and len(edit.rule_set) > _EDIT_ON_LOOP_MAX_APPS


def _prepared(
    base: StoreState,
    edit: Edit | Callable[[StoreState], Edit],
    source: str,
    *,
    actor: Actor,
    revoke: bool,
    if_match: str | None,
) -> tuple[Change, AuditDraft]:
    """The edit worked out on ``base``: pure, so it may run in a thread."""
    wanted = edit(base) if callable(edit) else edit
    if if_match is not None:
        _check_precondition(base, wanted, if_match)
    change = apply_edit(base.rule_set, wanted, source=source)
    # Bounded like each app's rule lists: an import of 10,000 apps leaves a record of a
    # sensible size (the summary still counts every app).
    records = tuple(each.describe() for each in change.apps[:AUDIT_APPS_SHOWN])
    if len(change.apps) > AUDIT_APPS_SHOWN:
        records += ({"apps_not_shown": len(change.apps) - AUDIT_APPS_SHOWN},)
    return change, AuditDraft(actor, change.summary(), records, revoke)


def _check_precondition(base: StoreState, edit: Edit, if_match: str) -> None:
    if isinstance(edit, ReplaceAll):
        current = str(base.version)
        if if_match.strip('"') != current:
            raise StoreConflictError(
                f"the store is at version {current}, not {if_match}: someone else changed it;"
                " read it again",
                current=current,
            )
        return
    name = edit.app.name if isinstance(edit, CreateApp | PutApp) else edit.name
    app = base.app(name)
    current_tag = None if app is None else app_etag(app)
    wanted = if_match.strip()
    if wanted == "*":
        if app is None:
            raise StoreConflictError(f"no app named {name!r} (If-Match: * needs one)")
        return
    if current_tag is None or wanted.strip('"') != current_tag:
        shown = "it does not exist" if current_tag is None else f"its ETag is now {current_tag}"
        raise StoreConflictError(
            f"app {name!r} changed since you read it ({shown}); read it again and redo the edit",
            current=current_tag,
        )
