"""Request bodies and query parameters of the admin API, read into edits.

Pure: bytes and plain values in, rule objects (or every problem, as
:class:`rules.problems.InvalidRuleSetError`) out. Apps are read by the reader the config file
uses (:func:`rules.document.app_from_data`), so a rule refused here is refused with the same
words as in a file. Password hashes never leave the API, so a body may leave
``proxy_auth.password_sha256`` out to keep the password the stored app has
(:meth:`AppBody.resolved` fills it in from the state the edit is applied to).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from multidict import MultiMapping

from egress.admin.errors import ApiError, invalid
from rules.apps import App, Limits, Mode, ProxyAuth, RuleSet, UidRange, sandboxed_uids
from rules.document import app_from_data, app_to_data
from rules.edits import (
    KEEP,
    AddRules,
    Edit,
    RemoveRules,
    UpdateApp,
    limits_from_pairs,
)
from rules.model import Rule
from rules.parse import RuleSyntaxError, parse_rule
from rules.problems import InvalidRuleSetError, Problem, value_repr
from rules.reading import Reader, RejectedError, choice, did_you_mean
from rules.stores.base import StoreState

__all__ = [
    "SOURCE",
    "AppBody",
    "AppPatch",
    "ImportBody",
    "check_query",
    "decode_json",
    "public_app",
    "query_bool",
    "query_limit",
    "query_name",
    "read_app_body",
    "read_destination_body",
    "read_import_body",
    "read_patch",
]

SOURCE: Final = "admin API"
_NO_PASSWORD: Final = "0" * 64  # stands in for a kept password while the body is read
_LIMIT_KEYS: Final = tuple(field.name for field in dataclasses.fields(Limits))
_PATCH_KEYS: Final = ("add_rules", "remove_rules", "uids", "mode", "limits", "revoke")
_UIDS_EXPECTED: Final = 'a non-empty list of uids or "FIRST-LAST" ranges'
_RULES_EXPECTED: Final = "a list of rule strings"


# --- JSON ----------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKeyError(key)
        data[key] = value
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(raw: bytes) -> Any:
    """The JSON value of a request body (strict: UTF-8, no NaN, no key given twice)."""
    if not raw.strip():
        raise ApiError(400, "bad_json", "the request has no body; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, "bad_json", f"the body is not UTF-8 (byte {error.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKeyError as error:
        raise ApiError(400, "bad_json", f"the body gives key {error} twice") from None
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            "bad_json",
            f"the body is not JSON: {error.msg} at line {error.lineno} column {error.colno}",
        ) from None
    except ValueError as error:
        raise ApiError(400, "bad_json", f"the body is not JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the body nests too deeply") from None


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise invalid([Problem(SOURCE, "", value_repr(data), what)])
    return data


# --- apps out --------------------------------------------------------------------------------


def public_app(app: App) -> dict[str, Any]:
    """An app as the API shows it: :func:`rules.document.app_to_data` without the password
    hash."""
    data = app_to_data(app)
    if "proxy_auth" in data:
        data["proxy_auth"] = {"username": data["proxy_auth"]["username"]}
    return data


# --- apps in ---------------------------------------------------------------------------------


def _without_password(data: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``data`` with a stand-in hash when ``proxy_auth`` leaves the password out (and whether
    it did)."""
    fields = dict(data)
    auth = fields.get("proxy_auth")
    if isinstance(auth, Mapping) and "password_sha256" not in auth:
        fields["proxy_auth"] = {**auth, "password_sha256": _NO_PASSWORD}
        return fields, True
    return fields, False


def _kept_password(app: App, stored: App | None, key: str) -> App:
    if stored is None or stored.proxy_auth is None:
        raise InvalidRuleSetError(
            [
                Problem(
                    SOURCE,
                    f"{key}proxy_auth.password_sha256",
                    "nothing",
                    "the SHA-256 (hex) of the password",
                    f"it may be left out only to keep the password of an app that has one;"
                    f" app {app.name!r} has none",
                )
            ]
        )
    assert app.proxy_auth is not None
    auth = ProxyAuth(app.proxy_auth.username, stored.proxy_auth.password_sha256)
    return dataclasses.replace(app, proxy_auth=auth)


@dataclass(frozen=True, slots=True)
class AppBody:
    """A whole app from a ``PUT`` body."""

    app: App
    keep_password: bool

    def resolved(self, state: StoreState) -> App:
        """The app, with the stored password where the body left it out."""
        if not self.keep_password:
            return self.app
        return _kept_password(self.app, state.app(self.app.name), "")


def read_app_body(data: Any, name: str) -> AppBody:
    """The app ``PUT /v1/apps/{name}`` describes; its ``name``, if given, must be ``name``."""
    body = _object(data, "an app object")
    problems: list[Problem] = []
    given = body.get("name", name)
    if given != name:
        problems.append(
            Problem(
                SOURCE,
                "name",
                value_repr(given),
                f"the name in the path, {name!r}",
                "leave the name out of the body, or make it match the path",
            )
        )
    fields, keep = _without_password({**body, "name": name})
    app: App | None = None
    try:
        app = app_from_data(fields, source=SOURCE, key="app")
    except InvalidRuleSetError as error:
        problems += [_unprefixed(problem, "app") for problem in error.problems]
    if problems or app is None:
        raise InvalidRuleSetError(problems)
    return AppBody(app, keep)


def _unprefixed(problem: Problem, prefix: str) -> Problem:
    key = problem.key
    if key == prefix:
        key = ""
    elif key.startswith(prefix + "."):
        key = key[len(prefix) + 1 :]
    return Problem(problem.file, key, problem.value, problem.expected, problem.hint)


@dataclass(frozen=True, slots=True)
class ImportBody:
    """A whole rule set from a ``POST /v1/import`` body."""

    rule_set: RuleSet
    keep_password: frozenset[int]  # indexes of apps that left the password out

    def resolved(self, state: StoreState) -> RuleSet:
        if not self.keep_password:
            return self.rule_set
        apps = list(self.rule_set.apps)
        for index in sorted(self.keep_password):
            apps[index] = _kept_password(apps[index], state.app(apps[index].name), f"app[{index}].")
        return RuleSet(tuple(apps), self.rule_set.version, self.rule_set.source)


def read_import_body(data: Any) -> ImportBody:
    """``{"app": [...]}`` (an export's ``version`` may stay in; it is not used)."""
    body = _object(data, 'an object such as {"app": [...]}')
    problems: list[Problem] = []
    for key in body:
        if key not in ("app", "version"):
            hint = did_you_mean(key, ["app", "version"]) or "known keys: app, version"
            problems.append(
                Problem(SOURCE, key, f"unknown key {value_repr(key)}", "a key of the body", hint)
            )
    version = body.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        problems.append(Problem(SOURCE, "version", value_repr(version), "an integer >= 0"))
    apps = body.get("app")
    if "app" not in body:
        problems.append(
            Problem(
                SOURCE,
                "app",
                "nothing",
                "a list of app objects",
                "an empty list deletes every app; it must be said, not implied",
            )
        )
        apps = []
    kept: set[int] = set()
    if isinstance(apps, list):
        fixed = []
        for index, item in enumerate(apps):
            if isinstance(item, Mapping):
                fields, keep = _without_password(item)
                if keep:
                    kept.add(index)
                fixed.append(fields)
            else:
                fixed.append(item)
        apps = fixed
    rule_set: RuleSet | None = None
    try:
        rule_set = RuleSet.from_data({"app": apps}, version=0, source=SOURCE)
    except InvalidRuleSetError as error:
        problems += error.problems
    if problems or rule_set is None:
        raise InvalidRuleSetError(problems)
    return ImportBody(rule_set, frozenset(kept))


# --- PATCH -----------------------------------------------------------------------------------


def _rule(raw: Any) -> Rule:
    if not isinstance(raw, str):
        raise RejectedError('a rule string such as "api.example.com:443"')
    try:
        return parse_rule(raw)
    except RuleSyntaxError as error:
        raise RejectedError(str(error)) from None


def _boolean(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise RejectedError("true or false")
    return raw


def _limits_patch(raw: Any) -> Mapping[str, Any] | None:
    if raw is not None and not isinstance(raw, Mapping):
        raise RejectedError(
            "an object of limits to set (a limit set to null is cleared), or null to clear all"
        )
    return raw


@dataclass(frozen=True, slots=True)
class AppPatch:
    """What a ``PATCH /v1/apps/{name}`` body asks for; ``None`` fields are left as they are.

    ``limits`` merges like a JSON merge patch: keys given are set, keys given as ``null``
    cleared, the rest kept; ``clear_limits`` (the body's ``"limits": null``) clears them all.
    """

    add: tuple[Rule, ...] = ()
    remove: tuple[Rule, ...] = ()
    uids: tuple[UidRange, ...] | None = None
    mode: Mode | None = None
    limits: Mapping[str, Any] | None = None
    clear_limits: bool = False
    revoke: bool = False

    def edits(self, app: App) -> list[Edit]:
        """The edits, in order, that make this patch of ``app``."""
        edits: list[Edit] = []
        if self.remove:
            edits.append(RemoveRules(app.name, self.remove))
        if self.add:
            edits.append(AddRules(app.name, self.add))
        update = UpdateApp(
            app.name,
            uids=KEEP if self.uids is None else self.uids,
            mode=KEEP if self.mode is None else self.mode,
            limits=(
                None
                if self.clear_limits
                else KEEP
                if self.limits is None
                else limits_from_pairs(self.limits, base=app.limits, source=SOURCE)
            ),
        )
        if update != UpdateApp(app.name):
            edits.append(update)
        return edits


def read_patch(data: Any) -> AppPatch:
    """Every problem of a PATCH body, or the patch."""
    body = _object(data, 'an object of changes such as {"add_rules": [...]}')
    reader = Reader(SOURCE)
    root = reader.root(body, name="a PATCH body")
    add = root.items("add_rules", _rule, (), expected=_RULES_EXPECTED)
    remove = root.items("remove_rules", _rule, (), expected=_RULES_EXPECTED)
    uid_entries = root.entries("uids", sandboxed_uids, expected=_UIDS_EXPECTED, non_empty=True)
    mode = root.value("mode", choice(Mode), None)
    limits = root.value("limits", _limits_patch, None)
    revoke = root.value("revoke", _boolean, False)
    reader.report_unknown_keys()
    problems = list(reader.problems)
    both = sorted({rule.text for rule in add} & {rule.text for rule in remove})
    for text in both:
        problems.append(
            Problem(
                SOURCE,
                "remove_rules",
                repr(text),
                "rules not also in add_rules",
                "a rule is either added or removed by one edit",
            )
        )
    if isinstance(limits, Mapping):
        problems += _limit_problems(limits)
    if problems:
        raise InvalidRuleSetError(problems)
    return AppPatch(
        add=add,
        remove=remove,
        uids=None if uid_entries is None else tuple(uids for _, uids in uid_entries),
        mode=mode,
        limits=limits if isinstance(limits, Mapping) else None,
        clear_limits="limits" in body and limits is None,
        revoke=revoke,
    )


def _limit_problems(limits: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for key in limits:
        if key not in _LIMIT_KEYS:
            hint = did_you_mean(key, _LIMIT_KEYS) or "known keys: " + ", ".join(_LIMIT_KEYS)
            problems.append(
                Problem(SOURCE, f"limits.{key}", f"unknown key {value_repr(key)}", "a limit", hint)
            )
    wanted = {
        key: value for key, value in limits.items() if key in _LIMIT_KEYS and value is not None
    }
    if wanted:
        try:
            limits_from_pairs(wanted, base=None, source=SOURCE)
        except InvalidRuleSetError as error:
            problems += error.problems
    return problems


# --- check -------------------------------------------------------------------------------------


def read_destination_body(data: Any) -> str:
    """``{"destination": "host:port"}`` -> the destination text (parsed by the caller)."""
    body = _object(data, 'an object such as {"destination": "api.example.com:443"}')
    reader = Reader(SOURCE)
    root = reader.root(body, name="a check body")
    destination = root.value("destination", _string, "", required='"HOST:PORT"')
    reader.report_unknown_keys()
    if reader.problems:
        raise InvalidRuleSetError(reader.problems)
    return destination


def _string(raw: Any) -> str:
    if not isinstance(raw, str):
        raise RejectedError('"HOST:PORT"')
    return raw


# --- query parameters -------------------------------------------------------------------------


def check_query(query: MultiMapping[str], known: tuple[str, ...]) -> None:
    """Refuse a parameter the route does not take (a misspelt ``dry_run`` must not become a
    real import), and one given twice."""
    problems = []
    for key in dict.fromkeys(query):
        if key not in known:
            hint = did_you_mean(key, known) or (
                "it takes " + ", ".join(known) if known else "it takes none"
            )
            problems.append(
                Problem(
                    SOURCE,
                    key,
                    f"unknown query parameter {value_repr(key)}",
                    "a parameter of this route",
                    hint,
                )
            )
        elif len(query.getall(key)) > 1:
            problems.append(Problem(SOURCE, key, "given more than once", "one value"))
    if problems:
        raise invalid(problems, "the query")


def query_bool(query: Mapping[str, str], key: str) -> bool:
    raw = query.get(key)
    if raw is None or raw == "false":
        return False
    if raw == "true":
        return True
    raise invalid([Problem(SOURCE, key, value_repr(raw), "true or false")])


def query_limit(query: Mapping[str, str], key: str, *, default: int, most: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise invalid([Problem(SOURCE, key, value_repr(raw), f"an integer from 1 to {most}")])
    return int(raw)


def query_name(query: Mapping[str, str], key: str) -> str | None:
    """An app name from the query (checked like one), or ``None``."""
    raw = query.get(key)
    if raw is None:
        return None
    try:
        App(raw, (UidRange(1, 1),))
    except InvalidRuleSetError:
        raise invalid(
            [
                Problem(
                    SOURCE,
                    key,
                    value_repr(raw),
                    "an app name: 1 to 63 characters of a-z, 0-9, '_' and '-'",
                )
            ]
        ) from None
    return raw
