"""Edits to a rule set, as values, and what applying one changes.

Every face (the CLI, the admin API, an import) expresses what an operator asked for as one of
the edits below, and :func:`apply_edit` turns it into a new :class:`rules.apps.RuleSet` and a
:class:`Change` (the apps touched, before and after). The new set is built with the checked
constructors, so an invalid edit raises before anything is stored and says what is wrong in
the words of :mod:`rules.problems`. Pure: stores decide where the result goes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from rules.apps import App, Limits, Mode, ProxyAuth, RuleSet, UidRange
from rules.document import app_to_data, limits_to_data
from rules.model import Rule
from rules.problems import InvalidRuleSetError, Problem

__all__ = [
    "AUDIT_RULES_SHOWN",
    "AddRules",
    "AppChange",
    "Change",
    "CreateApp",
    "DeleteApp",
    "Edit",
    "EditConflictError",
    "PutApp",
    "RemoveRules",
    "ReplaceAll",
    "UnknownAppError",
    "UpdateApp",
    "apply_edit",
]

AUDIT_RULES_SHOWN: Final = 1000
"""An audit record lists at most this many added and removed rules (and counts the rest)."""
_SUMMARY_APPS: Final = 20  # a summary names apps one by one up to this many


class UnknownAppError(LookupError):
    """The edit names an app the store does not have."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no app named {name!r}")


class EditConflictError(ValueError):
    """The edit contradicts what is stored: creating an app that exists, removing a rule the
    app does not have."""


@dataclass(frozen=True, slots=True)
class CreateApp:
    app: App


@dataclass(frozen=True, slots=True)
class PutApp:
    """Create the app, or replace it whole."""

    app: App


@dataclass(frozen=True, slots=True)
class AddRules:
    """Add rules to an app; rules it already has are left as they are."""

    name: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class RemoveRules:
    """Remove rules from an app; each must be one of its rules (same canonical text)."""

    name: str
    rules: tuple[Rule, ...]


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


@dataclass(frozen=True, slots=True)
class UpdateApp:
    """Change some fields of an app; ``KEEP`` leaves a field as it is, ``None`` clears an
    optional one (limits, proxy_auth)."""

    name: str
    uids: tuple[UidRange, ...] | _Keep = KEEP
    mode: Mode | _Keep = KEEP
    limits: Limits | _Keep | None = KEEP
    proxy_auth: ProxyAuth | _Keep | None = KEEP


@dataclass(frozen=True, slots=True)
class DeleteApp:
    name: str


@dataclass(frozen=True, slots=True)
class ReplaceAll:
    """Make the store hold exactly these apps (an import)."""

    rule_set: RuleSet


Edit = CreateApp | PutApp | AddRules | RemoveRules | UpdateApp | DeleteApp | ReplaceAll


@dataclass(frozen=True, slots=True)
class AppChange:
    """One app before and after an edit (``None``: it did not exist / no longer does)."""

    name: str
    before: App | None
    after: App | None

    def describe(self) -> dict[str, Any]:
        """For the audit trail: fields before and after, and rules added and removed (bounded,
        so an app of 100,000 rules leaves a record of a sensible size)."""
        record: dict[str, Any] = {"app": self.name}
        if self.before is None:
            record["action"] = "created"
        elif self.after is None:
            record["action"] = "deleted"
        else:
            record["action"] = "changed"
        before = _fields(self.before)
        after = _fields(self.after)
        fields = sorted(
            key for key in before.keys() | after.keys() if before.get(key) != after.get(key)
        )
        if fields:
            record["before"] = {key: before[key] for key in fields if key in before}
            record["after"] = {key: after[key] for key in fields if key in after}
        old = [] if self.before is None else [rule.text for rule in self.before.allow]
        new = [] if self.after is None else [rule.text for rule in self.after.allow]
        old_set, new_set = set(old), set(new)
        added = [text for text in new if text not in old_set]
        removed = [text for text in old if text not in new_set]
        for key, texts in (("rules_added", added), ("rules_removed", removed)):
            if texts:
                record[key] = texts[:AUDIT_RULES_SHOWN]
                if len(texts) > AUDIT_RULES_SHOWN:
                    record[key + "_not_shown"] = len(texts) - AUDIT_RULES_SHOWN
        record["rules"] = len(new)
        return record


def _fields(app: App | None) -> dict[str, Any]:
    if app is None:
        return {}
    data = app_to_data(app)
    del data["allow"], data["name"]
    if "proxy_auth" in data:
        data["proxy_auth"] = {"username": data["proxy_auth"]["username"], "password_sha256": "***"}
    return data


@dataclass(frozen=True, slots=True)
class Change:
    """The rule set an edit produced and the apps it touched (empty: nothing to commit)."""

    rule_set: RuleSet
    apps: tuple[AppChange, ...]

    @property
    def changed(self) -> bool:
        return bool(self.apps)

    def summary(self) -> str:
        """One line for humans: ``changed blog (+2 rules); created shop``; for a commit of
        many apps, counts (``created 9000 apps, changed 12 apps (app1, app2, ...)``)."""
        if len(self.apps) > _SUMMARY_APPS:
            by_action: dict[str, list[str]] = {}
            for each in self.apps:
                action = (
                    "created"
                    if each.before is None
                    else "deleted"
                    if each.after is None
                    else "changed"
                )
                by_action.setdefault(action, []).append(each.name)
            parts = []
            for action, names in by_action.items():
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                parts.append(f"{action} {len(names)} apps ({shown})")
            return "; ".join(parts)
        parts = []
        for each in self.apps:
            record = each.describe()
            detail = []
            if "rules_added" in record:
                detail.append(
                    f"+{len(record['rules_added']) + record.get('rules_added_not_shown', 0)}"
                )
            if "rules_removed" in record:
                detail.append(
                    f"-{len(record['rules_removed']) + record.get('rules_removed_not_shown', 0)}"
                )
            if detail:
                detail = [" ".join(detail) + " rules"]
            if "after" in record and record["action"] == "changed":
                detail.append(
                    ", ".join(sorted(record["after"].keys() | record.get("before", {}).keys()))
                )
            suffix = f" ({'; '.join(detail)})" if detail else ""
            parts.append(f"{record['action']} {each.name}{suffix}")
        return "; ".join(parts) or "no change"


def apply_edit(rule_set: RuleSet, edit: Edit, *, source: str) -> Change:
    """What ``edit`` makes of ``rule_set``: a checked new set (same version; the store gives
    it the next) and the apps it changed. Raises ``UnknownAppError``, ``EditConflictError``
    or ``InvalidRuleSetError`` and changes nothing."""
    apps = {app.name: app for app in rule_set.apps}
    order = [app.name for app in rule_set.apps]
    if isinstance(edit, ReplaceAll):
        return _replace_all(rule_set, edit.rule_set, source)
    if isinstance(edit, CreateApp | PutApp):
        name = edit.app.name
        if isinstance(edit, CreateApp) and name in apps:
            raise EditConflictError(f"app {name!r} exists already; edit it or delete it first")
        if name not in apps:
            order.append(name)
        new: App | None = edit.app
    else:
        name = edit.name
        if name not in apps:
            raise UnknownAppError(name)
        new = _edited(apps[name], edit)
    before = apps.get(name)
    if new == before:
        return Change(rule_set, ())
    if new is None:
        order.remove(name)
        apps.pop(name)
    else:
        apps[name] = new
    result = _rebuilt(rule_set, tuple(apps[n] for n in order), source)
    return Change(result, (AppChange(name, before, new),))


def _edited(app: App, edit: Edit) -> App | None:
    if isinstance(edit, DeleteApp):
        return None
    if isinstance(edit, AddRules):
        have = {rule.text for rule in app.allow}
        extra: list[Rule] = []
        for rule in edit.rules:
            if rule.text not in have:
                have.add(rule.text)
                extra.append(rule)
        return dataclasses.replace(app, allow=app.allow + tuple(extra))
    if isinstance(edit, RemoveRules):
        drop = {rule.text for rule in edit.rules}
        missing = sorted(drop - {rule.text for rule in app.allow})
        if missing:
            raise EditConflictError(
                f"app {app.name!r} has no rule {', '.join(map(repr, missing))}"
                f" (`egress rules show {app.name}` lists its rules)"
            )
        return dataclasses.replace(app, allow=tuple(r for r in app.allow if r.text not in drop))
    if isinstance(edit, UpdateApp):
        changes: dict[str, Any] = {
            key: getattr(edit, key)
            for key in ("uids", "mode", "limits", "proxy_auth")
            if getattr(edit, key) is not KEEP
        }
        return dataclasses.replace(app, **changes)
    raise TypeError(f"not an app edit: {edit!r}")


def _rebuilt(rule_set: RuleSet, apps: tuple[App, ...], source: str) -> RuleSet:
    """The set of ``apps``, checked across apps; problems name apps, not list positions."""
    try:
        return RuleSet(apps, rule_set.version, source)
    except InvalidRuleSetError as invalid:
        names = {f"app[{i}]": app.name for i, app in enumerate(apps)}
        raise InvalidRuleSetError(_by_name(invalid.problems, names)) from None


def _by_name(problems: tuple[Problem, ...], names: Mapping[str, str]) -> list[Problem]:
    fixed = []
    for problem in problems:
        head, dot, rest = problem.key.partition(".")
        key = f"app {names[head]!r}{dot}{rest}" if head in names else problem.key
        fixed.append(Problem(problem.file, key, problem.value, problem.expected, problem.hint))
    return fixed


def _replace_all(current: RuleSet, wanted: RuleSet, source: str) -> Change:
    old = {app.name: app for app in current.apps}
    new = {app.name: app for app in wanted.apps}
    changes = [
        AppChange(name, old.get(name), app) for name, app in new.items() if old.get(name) != app
    ]
    changes += [AppChange(name, app, None) for name, app in old.items() if name not in new]
    result = RuleSet(wanted.apps, current.version, source)
    return Change(result, tuple(changes))


def limits_from_pairs(
    pairs: Mapping[str, Any], *, base: Limits | None, source: str
) -> Limits | None:
    """``--limit key=value`` edits on top of ``base`` (``value`` ``none`` clears one key);
    ``None`` when no limit is left."""
    current = {} if base is None else limits_to_data(base)
    for key, value in pairs.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    if not current:
        return None
    app = {"name": "x", "uids": ["1"], "limits": current}
    try:
        parsed = RuleSet.from_data({"app": [app]}, version=0, source=source)
    except InvalidRuleSetError as invalid:
        raise InvalidRuleSetError(
            [
                Problem(p.file, p.key.replace("app[0].", ""), p.value, p.expected, p.hint)
                for p in invalid.problems
            ]
        ) from None
    return parsed.apps[0].limits
