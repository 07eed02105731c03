"""Apps as plain data: what stores keep, exports write and the admin API speaks.

One spelling for every place an app leaves the process (a Redis hash field, a JSON export, an API
body, an audit record), and one way back in: :func:`app_from_data` goes through
:meth:`rules.apps.RuleSet.from_data`, the reader the config file uses, so an app read from a
store is checked exactly as one read from a file. :func:`app_etag` names an app's content, which
is what optimistic concurrency compares (``If-Match``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from rules.apps import App, Limits, RuleSet
from rules.problems import InvalidRuleSetError, Problem, value_repr

__all__ = [
    "app_etag",
    "app_from_data",
    "app_summary",
    "app_to_data",
    "apps_from_data",
    "canonical_json",
    "limits_to_data",
    "rule_set_to_data",
]

_LIMIT_KEYS = (
    "connections_per_second",
    "burst",
    "max_concurrent",
    "bandwidth_bytes_per_second",
    "bandwidth_burst_bytes",
    "destination_connections_per_second",
    "destination_burst",
)


def limits_to_data(limits: Limits) -> dict[str, Any]:
    """The limits that are set, by their config key."""
    return {key: getattr(limits, key) for key in _LIMIT_KEYS if getattr(limits, key) is not None}


def app_to_data(app: App) -> dict[str, Any]:
    """An app as the ``[[app]]`` table that would read back as the same app."""
    data: dict[str, Any] = {
        "name": app.name,
        "uids": [str(uids) for uids in app.uids],
        "allow": [rule.text for rule in app.allow],
        "mode": app.mode.value,
    }
    if app.limits is not None:
        data["limits"] = limits_to_data(app.limits)
    if app.proxy_auth is not None:
        data["proxy_auth"] = {
            "username": app.proxy_auth.username,
            "password_sha256": app.proxy_auth.password_sha256,
        }
    return data


def rule_set_to_data(rule_set: RuleSet) -> dict[str, Any]:
    """``{"app": [...]}``: the shape of a config file's apps, and of an export."""
    return {"app": [app_to_data(app) for app in rule_set.apps]}


def app_from_data(data: object, *, source: str, key: str = "app") -> App:
    """One app from plain data, checked like an ``[[app]]`` table (``InvalidRuleSetError``;
    problem keys start with ``key``)."""
    if not isinstance(data, Mapping):
        raise InvalidRuleSetError([Problem(source, key, value_repr(data), "an app object")])
    try:
        rule_set = RuleSet.from_data({"app": [data]}, version=0, source=source)
    except InvalidRuleSetError as invalid:
        raise InvalidRuleSetError(_rekeyed(invalid.problems, "app[0]", key)) from None
    return rule_set.apps[0]


def apps_from_data(data: Mapping[str, Any], *, version: int, source: str) -> RuleSet:
    """A whole rule set from ``{"app": [...]}`` (an import, a store's full read)."""
    return RuleSet.from_data(data, version=version, source=source)


def _rekeyed(problems: tuple[Problem, ...], old: str, new: str) -> list[Problem]:
    fixed = []
    for problem in problems:
        key = problem.key
        if key == old or key.startswith((old + ".", old + "[")):
            key = new + key[len(old) :]
        fixed.append(Problem(problem.file, key, problem.value, problem.expected, problem.hint))
    return fixed


def canonical_json(data: object) -> str:
    """Sorted keys, no spaces: equal data, equal text (hashes, Redis values, audit)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def app_etag(app: App) -> str:
    """A short name for the app's content: equal apps, equal tags, whichever store holds them.

    A content hash rather than a counter, so the file store (which keeps no per-app counter)
    and the Redis store give the same answer for the same app.
    """
    data = app_to_data(app)
    if "proxy_auth" in data:
        # Not the password's hash: the tag is shown to read-only tokens, and a hash of a hash
        # would let them test password guesses offline. A password change alone keeps the
        # tag; API writes that leave the hash out keep the stored one, so none is lost.
        data["proxy_auth"] = {"username": data["proxy_auth"]["username"]}
    digest = hashlib.sha256(canonical_json(data).encode()).hexdigest()
    return digest[:20]


def app_summary(app: App) -> dict[str, Any]:
    """One row of a listing (the CLI's ``list --json``, the API's ``GET /v1/apps``)."""
    return {
        "name": app.name,
        "uids": [str(uids) for uids in app.uids],
        "mode": app.mode.value,
        "rules": len(app.allow),
        "limits": None if app.limits is None else limits_to_data(app.limits),
        "etag": app_etag(app),
    }
