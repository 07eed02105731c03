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
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from egress.gcpolicy import freeze_long_lived, full_collections_deferred
from egress.metrics import ProxyMetrics
from rules.apps import RuleSet
from rules.snapshot import PolicySnapshot, SnapshotBuilder
from rules.special import SpecialExceptions

__all__ = ["FileRuleSource", "RuleSource", "SnapshotHolder"]

log = logging.getLogger("egress.rules")

COMPILE_SLICE_SECONDS = 0.002
"""How long one compile step may hold the event loop before it yields."""
_APPS_PER_STEP = 16
_RETIRED_PER_STEP = 256  # old apps freed per loop turn after a swap


class RuleSource(Protocol):
    """Yields every new rule set, the current one first."""

    def updates(self) -> AsyncIterator[RuleSet]: ...


class FileRuleSource:
    """The ``[[app]]`` tables of the config file, versioned by this process.

    The runtime reads the file (at start and on SIGHUP) and :meth:`publish`-es the rule set it
    found; a set equal to the current one is not a new version.
    """

    def __init__(self, initial: RuleSet) -> None:
        self._latest = initial.with_version(max(initial.version, 1))
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
        if not always and rule_set.apps == self._latest.apps:
            return None
        return rule_set.with_version(self._latest.version + 1)

    def publish(self, prepared: RuleSet) -> None:
        """Make a rule set from :meth:`prepare` the latest (on the event loop)."""
        if prepared.version <= self._latest.version:
            raise ValueError(f"version {prepared.version} is not newer than {self._latest.version}")
        self._latest = prepared
        self._changed.set()

    async def updates(self) -> AsyncIterator[RuleSet]:
        yield self._latest
        while True:
            await self._changed.wait()
            self._changed.clear()
            yield self._latest


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
        self._exceptions = first.exceptions
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._attempted = first.version  # newest version installed or rejected so far
        self._settled = asyncio.Condition()
        metrics.rules_installed(first.version, 0.0)

    def set_exceptions(self, exceptions: SpecialExceptions) -> None:
        """New ``[security].allow_special``: recompile the current rules under it."""
        if exceptions.networks == self._exceptions.networks:
            return
        self._exceptions = exceptions
        if self._pending_rules is None:
            self._pending_rules = self.current.ruleset
        self._idle.clear()
        self._wake.set()

    def offer(self, rule_set: RuleSet) -> None:
        """Queue a rule set; only the newest queued one is compiled."""
        self._pending_rules = rule_set
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
        async for rule_set in source.updates():
            if rule_set is not self.current.ruleset:
                self.offer(rule_set)

    async def run(self) -> None:
        """Compile and install what is offered, one at a time (a task of the runtime's group)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            rule_set, self._pending_rules = self._pending_rules, None
            if rule_set is not None:
                try:
                    await self._install(rule_set, self._exceptions)
                finally:
                    self._attempted = max(self._attempted, rule_set.version)
                    async with self._settled:
                        self._settled.notify_all()
            if self._pending_rules is None:
                self._idle.set()

    async def _install(self, rule_set: RuleSet, exceptions: SpecialExceptions) -> None:
        current = self.current
        if rule_set.version < current.version:
            log.warning(
                "ignored an older rules version",
                extra={"version": rule_set.version, "current": current.version},
            )
            self._metrics.rules_update(ok=False)
            return
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
                return
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
        self._metrics.rules_installed(snapshot.version, seconds)
        log.info(
            "rules installed",
            extra={
                "version": snapshot.version,
                "apps": len(rule_set),
                "compile_ms": round(seconds * 1000, 1),
            },
        )

    async def _compile(self, rule_set: RuleSet, exceptions: SpecialExceptions) -> PolicySnapshot:
        builder = SnapshotBuilder(rule_set, exceptions)
        slice_end = time.perf_counter() + self._slice
        while not builder.compile_some(_APPS_PER_STEP):
            if time.perf_counter() >= slice_end:
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + self._slice
        return builder.result()
