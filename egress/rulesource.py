"""Where rules come from, and the holder of the snapshot every new connection decides against.

A :class:`RuleSource` yields rule sets: :class:`FileRuleSource` is the ``[[app]]`` tables of the
config file (the runtime publishes each good reload into it); a Redis source will yield each
committed version. The :class:`SnapshotHolder`, run by the runtime's task group, follows a
source, compiles each new set into a :class:`rules.snapshot.PolicySnapshot` a few apps at a time
(yielding to the event loop between slices, so a 10,000-app compile does not stall connections),
and swaps it in atomically: connections accepted before the swap keep what they were decided
under, new ones see the new snapshot. An update that fails to compile keeps the last good
snapshot and is counted; an update older than the current version is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from egress.gcpolicy import freeze_long_lived, full_collections_deferred
from egress.metrics import ProxyMetrics
from rules.apps import RuleSet
from rules.problems import InvalidRuleSetError
from rules.snapshot import PolicySnapshot, SnapshotBuilder
from rules.special import SpecialExceptions
from rules.stores.base import RuleStore, StoreState
from rules.stores.errors import StoreError

__all__ = ["FileRuleSource", "RuleSource", "RulesUpdate", "SnapshotHolder", "StoreRuleSource"]

log = logging.getLogger("egress.rules")

COMPILE_SLICE_SECONDS = 0.002
"""How long one compile step may hold the event loop before it yields."""
_APPS_PER_STEP = 16
_RETIRED_PER_STEP = 256  # old apps freed per loop turn after a swap


@dataclass(frozen=True, slots=True)
class RulesUpdate:
    """A rule set to install; ``revoke``: close the tunnels it no longer allows (an operator
    asked for that on some edit since the last update); ``committed_at``: when the store
    committed it (its clock, Unix seconds), for the propagation-lag metric."""

    rule_set: RuleSet
    revoke: bool = False
    committed_at: float | None = None
    replaces: bool = False  # install even if its version is not newer (the store went back)


def _version_of(state: StoreState | None) -> int | None:
    return None if state is None else state.version


def _same_commit(a: StoreState, b: StoreState) -> bool:
    return a.version == b.version and a.committed_at == b.committed_at


class RuleSource(Protocol):
    """Yields every new rule set, the current one first."""

    def updates(self) -> AsyncIterator[RulesUpdate]: ...


class FileRuleSource:
    """The ``[[app]]`` tables of the config file, versioned by this process (never behind the
    file's ``[rules].version``).

    The runtime reads the file (at start and on SIGHUP) and :meth:`publish`-es the rule set it
    found; a set equal to the current one is not a new version.
    """

    def __init__(self, initial: RuleSet) -> None:
        # The file's own version (0 until `egress rules` first edits it): the version an edit
        # prints is then the version in force (hand edits and [security] changes add one).
        self._latest = initial
        self._revoke = False
        self._committed_at: float | None = None
        self._changed = asyncio.Event()

    @property
    def latest(self) -> RuleSet:
        return self._latest

    def prepare(self, rule_set: RuleSet, *, always: bool = False) -> RuleSet | None:
        """The next version for a freshly read rule set, or ``None`` when its apps are the
        current ones (``always``: a new version anyway, because what the apps compile under,
        ``[security]``, changed; a version names one policy). Pure, and costly for big sets (it
        compares every app): the runtime calls it in the thread that read the file, then
        :meth:`publish`-es the result on the loop."""
        ahead = rule_set.version > self._latest.version  # store commits (they may cancel out)
        if not always and not ahead and rule_set.apps == self._latest.apps:
            return None
        # The file's own [rules].version (bumped by `egress rules` edits) when it is ahead, so
        # the version in force matches the one the edit printed; else one more than ours.
        return rule_set.with_version(max(self._latest.version + 1, rule_set.version))

    def publish(
        self, prepared: RuleSet, *, revoke: bool = False, committed_at: float | None = None
    ) -> None:
        """Make a rule set from :meth:`prepare` the latest (on the event loop); ``revoke`` and
        ``committed_at`` as the file store's audit trail recorded the edits it holds."""
        if prepared.version <= self._latest.version:
            raise ValueError(f"version {prepared.version} is not newer than {self._latest.version}")
        self._latest = prepared
        self._revoke = self._revoke or revoke
        self._committed_at = committed_at
        self._changed.set()

    async def updates(self) -> AsyncIterator[RulesUpdate]:
        yield RulesUpdate(self._latest)
        while True:
            await self._changed.wait()
            self._changed.clear()
            update = RulesUpdate(self._latest, self._revoke, self._committed_at)
            self._revoke = False
            yield update


class StoreRuleSource:
    """A shared store (Redis): every committed version, heard through the store's change feed,
    with a version check every ``check_interval`` seconds as the backstop for a lost message
    or a restarted store. A read that fails (store down, a bad app in the store) keeps what
    was last yielded, is counted and logged, and is tried again at the next check."""

    def __init__(
        self,
        store: RuleStore,
        metrics: ProxyMetrics,
        *,
        check_interval: float,
        retry_interval: float = 1.0,
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._check_interval = check_interval
        self._retry_interval = retry_interval
        self._latest: StoreState | None = None
        self._hint = asyncio.Event()
        self.empty = False  # the store holds nothing egress wrote (version 0): not ready
        self._reachable = False
        metrics.rule_store_up.set(0)

    @property
    def reachable(self) -> bool:
        """Whether the store answered the last read or version check."""
        return self._reachable

    @reachable.setter
    def reachable(self, value: bool) -> None:
        self._reachable = value
        self._metrics.rule_store_up.set(1 if value else 0)

    @property
    def loaded(self) -> bool:
        return self._latest is not None

    async def first(self, timeout: float) -> StoreState | None:
        """The store's state for start-up, or ``None`` when it cannot be read in time (the
        proxy starts anyway, denying everyone, and keeps trying)."""
        try:
            async with asyncio.timeout(timeout):
                state = await self._read()
        except (StoreError, InvalidRuleSetError, TimeoutError) as error:
            self._failed(error)
            return None
        self._latest = state
        self.empty = state.version == 0
        if self.empty:
            log.error(
                "the rule store is empty (version 0): no app is known until it is seeded"
                " (`egress rules import FILE --config THIS_CONFIG`)",
                extra={"store": self.store.name},
            )
        return state

    async def updates(self) -> AsyncIterator[RulesUpdate]:
        # A plain task, not a TaskGroup: a task group must not span the generator's yields.
        hints = self.store.hint_changes(self._hint, retry_interval=self._retry_interval)
        feed = asyncio.get_running_loop().create_task(hints, name="rules change feed")
        try:
            if self._latest is not None:
                yield RulesUpdate(self._latest.rule_set, False, self._latest.committed_at)
            while True:
                update = await self._next()
                if update is not None:
                    yield update
        finally:
            feed.cancel()
            with contextlib.suppress(BaseException):
                await feed

    async def _next(self) -> RulesUpdate | None:
        interval = self._check_interval if self.reachable else self._retry_interval
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await self._hint.wait()
        self._hint.clear()
        before = self._latest
        try:
            # A read, not a version check: the backend answers an unchanged store from what it
            # has, and it tells a store that went back (same or lower version, other commit).
            state = await self._read()
        except (StoreError, InvalidRuleSetError) as error:
            self._failed(error)
            return None
        if state.version == 0:
            # Nothing egress ever wrote: a Redis restarted without persistence, flushed, or
            # not seeded yet. Emptying every node would refuse every tenant: keep the rules in
            # force, say so, and stay not ready until the store is seeded again.
            if not self.empty:
                log.error(
                    "the rule store is empty (version 0); keeping the rules in force until it"
                    " is seeded again (`egress rules import`)",
                    extra={"store": self.store.name, "rules_version": _version_of(before)},
                )
            self.empty = True
            if before is None:
                self._latest = state
            return None
        self.empty = False
        self._latest = state
        if before is None:
            return RulesUpdate(state.rule_set, False, state.committed_at)
        if state is before or _same_commit(state, before):
            return None
        if state.version > before.version:
            revoke = state.revoke_version > before.version
            return RulesUpdate(state.rule_set, revoke, state.committed_at)
        # The store went back: a failover to a replica that had not seen the last commits, a
        # restore, a restart without persistence. What it holds now is the truth; what was
        # lost may have been removals, so nothing stays open that it does not allow.
        log.warning(
            "the rule store went back (a failover or a restore?); applying what it holds now",
            extra={
                "store": self.store.name,
                "version": state.version,
                "had_version": before.version,
            },
        )
        return RulesUpdate(state.rule_set, True, state.committed_at, replaces=True)

    async def _read(self) -> StoreState:
        state = await self.store.read()
        if not self.reachable:
            log.info("rule store reachable", extra={"store": self.store.name})
        self.reachable = True
        return state

    def _failed(self, error: BaseException) -> None:
        self._metrics.rules_update(ok=False)
        if isinstance(error, InvalidRuleSetError):
            self.reachable = True
            log.error(
                "the rule store holds an invalid rule set; keeping the previous rules",
                extra={"store": self.store.name, "problems": [str(p) for p in error.problems]},
            )
            return
        if self.reachable or self._latest is None:
            kept = "keeping the rules in force" if self._latest else "no app is known yet"
            log.error(
                f"rule store unreachable; {kept}",
                extra={"store": self.store.name, "error": str(error) or type(error).__name__},
            )
        self.reachable = False


class SnapshotHolder:
    """Owns the current :class:`PolicySnapshot`; :attr:`current` is read by every connection."""

    def __init__(
        self,
        first: PolicySnapshot,
        metrics: ProxyMetrics,
        *,
        slice_seconds: float = COMPILE_SLICE_SECONDS,
    ) -> None:
        self.current = first
        self._metrics = metrics
        self._slice = slice_seconds
        self._pending_rules: RuleSet | None = None
        self._pending_revoke = False
        self._pending_replaces = False
        self._pending_committed_at: float | None = None
        self.on_installed: Callable[[PolicySnapshot, bool], None] | None = None
        """Called after each swap with the new snapshot and whether to revoke (the runtime
        closes the tunnels the new rules no longer allow)."""
        self._exceptions = first.exceptions
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._attempted = first.version  # newest version installed or rejected so far
        self._settled = asyncio.Condition()
        metrics.rules_installed(first.version, 0.0, apps=len(first.ruleset))

    def set_exceptions(self, exceptions: SpecialExceptions) -> None:
        """New ``[security].allow_special``: recompile the current rules under it."""
        if exceptions.networks == self._exceptions.networks:
            return
        self._exceptions = exceptions
        if self._pending_rules is None:
            self._pending_rules = self.current.ruleset
        self._idle.clear()
        self._wake.set()

    def offer(
        self,
        rule_set: RuleSet,
        *,
        revoke: bool = False,
        committed_at: float | None = None,
        replaces: bool = False,
    ) -> None:
        """Queue a rule set; only the newest queued one is compiled (a revoke asked for by a
        replaced one is kept). ``replaces``: install it even if its version is older (the
        store went back; its state is the truth)."""
        self._pending_rules = rule_set
        self._pending_revoke = self._pending_revoke or revoke
        self._pending_replaces = replaces
        self._pending_committed_at = committed_at
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until everything offered so far is installed (or rejected)."""
        await self._idle.wait()

    async def wait_for_version(self, version: int) -> None:
        """Until ``version`` (or a newer one) has been installed or rejected: the version a
        source published may reach the holder a loop turn later, through :meth:`follow`."""
        async with self._settled:
            await self._settled.wait_for(lambda: self._attempted >= version)

    async def follow(self, source: RuleSource) -> None:
        """Feed every update of ``source`` to the holder (a task of the runtime's group)."""
        async for update in source.updates():
            if update.rule_set is not self.current.ruleset:
                self.offer_update(update)

    def offer_update(self, update: RulesUpdate) -> None:
        self.offer(
            update.rule_set,
            revoke=update.revoke,
            committed_at=update.committed_at,
            replaces=update.replaces,
        )

    async def run(self) -> None:
        """Compile and install what is offered, one at a time (a task of the runtime's group)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            rule_set, self._pending_rules = self._pending_rules, None
            revoke, self._pending_revoke = self._pending_revoke, False
            replaces, self._pending_replaces = self._pending_replaces, False
            committed_at, self._pending_committed_at = self._pending_committed_at, None
            if rule_set is not None:
                try:
                    if await self._install(rule_set, self._exceptions, replaces=replaces):
                        self._installed(revoke, committed_at)
                finally:
                    self._attempted = (
                        rule_set.version if replaces else max(self._attempted, rule_set.version)
                    )
                    async with self._settled:
                        self._settled.notify_all()
            if self._pending_rules is None:
                self._idle.set()

    def _installed(self, revoke: bool, committed_at: float | None) -> None:
        if committed_at is not None:
            self._metrics.rules_propagated(max(0.0, time.time() - committed_at))
        if self.on_installed is not None:
            try:
                self.on_installed(self.current, revoke)
            except Exception:  # a bug here must not stop rule updates
                log.exception("after installing rules")

    async def _install(
        self, rule_set: RuleSet, exceptions: SpecialExceptions, *, replaces: bool = False
    ) -> bool:
        """Compile and swap; False when the set was refused (older, or failed to compile)."""
        current = self.current
        if rule_set.version < current.version and not replaces:
            log.warning(
                "ignored an older rules version",
                extra={"version": rule_set.version, "current": current.version},
            )
            self._metrics.rules_update(ok=False)
            return False
        started = time.perf_counter()
        with full_collections_deferred():
            try:
                snapshot = await self._compile(rule_set, exceptions)
            except Exception as exc:  # any failure keeps the last good snapshot
                log.error(
                    "rules update failed, keeping the previous rules",
                    extra={"version": rule_set.version, "error": repr(exc)[:300]},
                )
                self._metrics.rules_update(ok=False)
                return False
            # Freeing the old snapshot at once would stall the loop (about 10 µs per app):
            # hold its apps here and let them go a few at a time.
            retiring = [*current.apps.values(), *current.ruleset.apps]
            self.current = snapshot
            del current
            seconds = time.perf_counter() - started
            while retiring:
                del retiring[-_RETIRED_PER_STEP:]
                await asyncio.sleep(0)
            freeze_long_lived(clients_connected=True)
        self._metrics.rules_update(ok=True)
        self._metrics.rules_installed(snapshot.version, seconds, apps=len(rule_set))
        log.info(
            "rules installed",
            extra={
                "version": snapshot.version,
                "apps": len(rule_set),
                "compile_ms": round(seconds * 1000, 1),
            },
        )
        return True

    async def _compile(self, rule_set: RuleSet, exceptions: SpecialExceptions) -> PolicySnapshot:
        builder = SnapshotBuilder(rule_set, exceptions, previous=self.current)  # reuse unchanged
        slice_end = time.perf_counter() + self._slice
        while not builder.compile_some(_APPS_PER_STEP):
            if time.perf_counter() >= slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + self._slice
        return builder.result()
