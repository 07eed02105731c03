"""A compiled rule set: what every new connection decides against, replaced whole on change.

Compiling is pure but not free (about 10 µs per app with a few rules), so a big set is built in
steps: :class:`SnapshotBuilder` compiles a bounded number of apps per call, and the asyncio
holder (:mod:`egress.rulesource`) yields to the event loop between calls so that connections keep
flowing while 10,000 apps compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rules.apps import RuleSet
from rules.decide import AppPolicy
from rules.special import SpecialExceptions

__all__ = ["PolicySnapshot", "SnapshotBuilder"]


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """Every app compiled, under one version. Immutable."""

    ruleset: RuleSet
    exceptions: SpecialExceptions
    apps: dict[str, AppPolicy]

    @property
    def version(self) -> int:
        return self.ruleset.version

    def app_for_uid(self, uid: int) -> AppPolicy | None:
        app = self.ruleset.app_for_uid(uid)
        return None if app is None else self.apps[app.name]

    @classmethod
    def build(cls, ruleset: RuleSet, exceptions: SpecialExceptions) -> PolicySnapshot:
        """Compile everything at once (start-up, tests, small sets)."""
        builder = SnapshotBuilder(ruleset, exceptions)
        while not builder.compile_some(len(ruleset) + 1):
            pass
        return builder.result()


class SnapshotBuilder:
    """Compiles a rule set a few apps at a time; :meth:`result` once :meth:`compile_some` says
    it is done."""

    __slots__ = ("_apps", "_compiled", "_exceptions", "_memo", "_next", "_ruleset")

    def __init__(self, ruleset: RuleSet, exceptions: SpecialExceptions) -> None:
        self._ruleset = ruleset
        self._exceptions = exceptions
        self._apps = ruleset.apps
        self._compiled: dict[str, AppPolicy] = {}
        self._memo: dict[Any, Any] = {}  # one for the whole snapshot
        self._next = 0

    def compile_some(self, count: int) -> bool:
        """Compile up to ``count`` more apps; True when every app is compiled."""
        end = min(self._next + count, len(self._apps))
        exceptions = self._exceptions
        compiled = self._compiled
        for app in self._apps[self._next : end]:
            compiled[app.name] = AppPolicy.compile(app, exceptions, self._memo)
        self._next = end
        return end == len(self._apps)

    def result(self) -> PolicySnapshot:
        if self._next != len(self._apps):
            raise RuntimeError("the snapshot is not compiled yet")
        return PolicySnapshot(self._ruleset, self._exceptions, self._compiled)
