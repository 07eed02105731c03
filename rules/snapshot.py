"""A compiled rule set: what every new connection decides against, replaced whole on change.

Compiling is pure but not free (tens of µs for an app with a few rules, a few hundred ms for one
with 100,000), so a big set is built in steps: :class:`SnapshotBuilder` does a bounded amount of
work per call (a few apps, or a slice of one big app's rules), and the asyncio holder
(:mod:`egress.rulesource`) yields to the event loop between calls so that connections keep
flowing while 10,000 apps compile.

A new set mostly repeats the one in force: given the ``previous`` snapshot, the builder keeps
the compiled rules of every app whose rules are unchanged (under unchanged special-purpose
exceptions), so an edit to one app compiles one app. What a reused app gets is a new
:class:`AppPolicy` around the same compiled rules: it belongs to the new snapshot (its memo, its
exceptions), and nothing in it leads back to the old snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from rules.apps import App, RuleSet
from rules.decide import AppCompiler, AppPolicy
from rules.special import SpecialExceptions

__all__ = ["RULES_PER_APP", "PolicySnapshot", "SnapshotBuilder"]

RULES_PER_APP: Final = 16
"""The rules one unit of :meth:`SnapshotBuilder.compile_some`'s ``count`` stands for: an app
with more rules than a call's share is compiled (or compared) over several calls."""


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
    def build(
        cls,
        ruleset: RuleSet,
        exceptions: SpecialExceptions,
        *,
        previous: PolicySnapshot | None = None,
    ) -> PolicySnapshot:
        """Compile everything at once (start-up, tests, small sets), reusing what ``previous``
        compiled for apps whose rules are unchanged."""
        builder = SnapshotBuilder(ruleset, exceptions, previous=previous)
        builder.compile_all()
        return builder.result()


def same_exceptions(a: SpecialExceptions, b: SpecialExceptions) -> bool:
    """Whether rules compiled under ``a`` are compiled under ``b`` too."""
    return a is b or a.networks == b.networks


class _AppJob:
    """One app on its way into the new snapshot, in steps of a bounded number of rules.

    When the previous snapshot has an app of this name with the same rules (the same objects,
    or equal ones: compared a slice per step), its compiled rules are reused; else the app is
    compiled (all at once when it is small, else a slice per step).
    """

    __slots__ = ("_app", "_compared", "_compiler", "_exceptions", "_memo", "_previous", "reused")

    def __init__(
        self,
        app: App,
        previous: AppPolicy | None,
        exceptions: SpecialExceptions,
        memo: dict[Any, Any],
    ) -> None:
        self._app = app
        self._exceptions = exceptions
        self._memo = memo
        self._compiler: AppCompiler | None = None
        self._compared = 0
        self.reused = False
        # Only rules decide what is compiled (name and mode are read from the app itself).
        self._previous = (
            previous if previous is not None and len(previous.app.allow) == len(app.allow) else None
        )

    def step(self, budget: int) -> tuple[AppPolicy | None, int]:
        """Work on the app for at most about ``budget`` rules: the policy once it is ready,
        and the work done (in rules, at least 1)."""
        previous = self._previous
        rules = self._app.allow
        if previous is not None:
            old = previous.app.allow
            if previous.app is self._app or old is rules:
                return self._reuse(previous), 1
            start = self._compared
            end = min(start + budget, len(rules))
            whole = start == 0 and end == len(rules)
            if old == rules if whole else old[start:end] == rules[start:end]:  # identity first
                self._compared = end
                if end == len(rules):
                    return self._reuse(previous), max(end - start, 1)
                return None, end - start
            self._previous = None  # changed: compile it (the work spent counts)
            budget -= end - start
            if budget <= 0:
                return None, end - start
        if self._compiler is None and len(rules) <= budget:
            policy = AppPolicy.compile(self._app, self._exceptions, self._memo)
            return policy, max(len(rules), 1)
        if self._compiler is None:
            self._compiler = AppCompiler(self._app, self._exceptions, self._memo)
        before = self._compiler.indexed
        done = self._compiler.step(budget)
        spent = max(self._compiler.indexed - before, 1)
        return (self._compiler.result() if done else None), spent

    def _reuse(self, previous: AppPolicy) -> AppPolicy:
        self.reused = True
        return AppPolicy(self._app, previous.rules, previous.opened, self._exceptions, self._memo)


class SnapshotBuilder:
    """Compiles a rule set a bounded amount at a time; :meth:`result` once
    :meth:`compile_some` says it is done.

    ``previous``: the snapshot in force; apps it compiled under the same exceptions with the
    same rules are not compiled again (see :attr:`reused`).
    """

    __slots__ = (
        "_apps",
        "_compiled",
        "_exceptions",
        "_job",
        "_memo",
        "_next",
        "_previous",
        "_ruleset",
        "reused",
    )

    def __init__(
        self,
        ruleset: RuleSet,
        exceptions: SpecialExceptions,
        *,
        previous: PolicySnapshot | None = None,
    ) -> None:
        self._ruleset = ruleset
        self._exceptions = exceptions
        self._apps = ruleset.apps
        self._compiled: dict[str, AppPolicy] = {}
        self._memo: dict[Any, Any] = {}  # one for the whole snapshot, empty: see egress.policy
        self._next = 0
        self._job: _AppJob | None = None
        self._previous: dict[str, AppPolicy] = (
            previous.apps
            if previous is not None and same_exceptions(previous.exceptions, exceptions)
            else {}
        )
        self.reused = 0
        """How many apps kept the previous snapshot's compiled rules so far."""

    def compile_some(self, count: int) -> bool:
        """Do about ``count`` apps' worth of work: at most ``count`` apps, and at most
        ``count * RULES_PER_APP`` rules compiled or compared (a bigger app goes on in the next
        call). True when every app is compiled."""
        count = max(count, 1)
        budget = count * RULES_PER_APP
        apps = self._apps
        started = 0
        while self._next < len(apps):
            job = self._job
            if job is None:
                if started >= count or budget <= 0:
                    break
                app = apps[self._next]
                job = self._job = _AppJob(
                    app, self._previous.get(app.name), self._exceptions, self._memo
                )
                started += 1
            policy, spent = job.step(budget)
            budget -= spent
            if policy is None:
                break  # this call's share is spent; the app goes on in the next one
            self.reused += job.reused
            self._compiled[policy.name] = policy
            self._job = None
            self._next += 1
        return self._next == len(apps)

    def compile_all(self) -> None:
        """Compile everything that is left, at once."""
        total = len(self._apps) + sum(len(app.allow) for app in self._apps)
        while not self.compile_some(total // RULES_PER_APP + 1):
            pass

    def result(self) -> PolicySnapshot:
        if self._next != len(self._apps):
            raise RuntimeError("the snapshot is not compiled yet")
        return PolicySnapshot(self._ruleset, self._exceptions, self._compiled)
