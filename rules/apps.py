"""The app model: who an app is (uids), what it may reach (rules), how (mode, limits, credentials).

A :class:`RuleSet` is every app plus a version. The TOML reader, the firewall plan and every
future store or API build and read this one type, and its constructors validate everything, so
an edit that reaches a proxy is an edit that was checked, whichever way it came in:

* :class:`App`, :class:`UidRange`, :class:`Limits` and :class:`ProxyAuth` check their own values;
* :class:`RuleSet` checks what only the whole set can: unique names, no uid claimed twice;
* :func:`read_rule_set` / :meth:`RuleSet.from_data` read plain values (parsed TOML, JSON) and
  report every problem at once, with the key path, the value, what was expected and the nearest
  valid key for a misspelt one.

Nothing here does I/O or knows about rate limiting; :mod:`egress.policy` joins the two.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from rules.model import Rule
from rules.parse import RuleSyntaxError, parse_rule
from rules.problems import InvalidRuleSetError, Problem, value_repr
from rules.reading import (
    Reader,
    RejectedError,
    Table,
    choice,
    integer,
    positive_number,
    secret_shown,
    sha256_hex,
)

__all__ = [
    "MAX_UID",
    "App",
    "Limits",
    "Mode",
    "ProxyAuth",
    "RuleSet",
    "UidRange",
    "read_rule_set",
    "sandboxed_uids",
]

MAX_UID: Final = 2**32 - 1
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_UID_EXPECTED: Final = 'a uid (0 to 4294967295) or a "FIRST-LAST" range'
_APPS_EXPECTED: Final = "[[app]] tables"


class Mode(StrEnum):
    """``enforce`` denies what the rules do not allow; ``report`` lets it through, flagged."""

    ENFORCE = "enforce"
    REPORT = "report"


@dataclass(frozen=True, slots=True, order=True)
class UidRange:
    """Uids ``first`` to ``last``, both included."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= MAX_UID or not 0 <= self.last <= MAX_UID:
            raise ValueError(f"uids go from 0 to {MAX_UID}")
        if self.first > self.last:
            raise ValueError("the first uid of a range must not exceed the last")

    def contains(self, uid: int) -> bool:
        return self.first <= uid <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @classmethod
    def parse(cls, value: object) -> UidRange:
        """An int, a ``"N"`` string or a ``"FIRST-LAST"`` string. Raises ``ValueError``."""
        if isinstance(value, int) and not isinstance(value, bool):
            first = last = value
        elif isinstance(value, str):
            match = re.fullmatch(r"([0-9]{1,10})(?:-([0-9]{1,10}))?", value)
            if match is None:
                raise ValueError('write a uid as digits, a range as "FIRST-LAST"')
            first = int(match[1])
            last = first if match[2] is None else int(match[2])
        else:
            raise ValueError("a uid is an integer or a string")
        return cls(first, last)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the limiter enforces for an app; ``None`` means no limit of that kind (or the
    ``[ratelimit.defaults]`` value, where one is configured).

    ``burst`` defaults to one second's worth of ``connections_per_second``;
    ``bandwidth_burst_bytes`` to a tenth of a second's worth of bandwidth, at least 64 KiB;
    ``destination_*`` limit each destination (host and port as asked for) of the app on its own.
    """

    connections_per_second: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    bandwidth_bytes_per_second: int | None = None
    bandwidth_burst_bytes: int | None = None
    destination_connections_per_second: float | None = None
    destination_burst: int | None = None

    def __post_init__(self) -> None:
        problems = _limits_problems(self)
        if problems:
            key, value, expected = problems[0]
            raise ValueError(f"{key}: got {value_repr(value)}; expected {expected}")

    def over(self, defaults: Limits | None) -> Limits:
        """These limits, with ``defaults`` for the keys they leave unset."""
        if defaults is None:
            return self
        return Limits(
            **{
                key: value if (value := getattr(self, key)) is not None else getattr(defaults, key)
                for key in _LIMIT_FIELDS
            }
        )


@dataclass(frozen=True, slots=True)
class ProxyAuth:
    """Credentials an app's clients must also present (RFC 1929 or Proxy-Authorization).

    An extra factor on top of the kernel-reported uid, never a replacement for it.
    """

    username: str
    password_sha256: str = field(repr=False)  # lower-case hex

    def __post_init__(self) -> None:
        try:
            _username(self.username)
            if sha256_hex(self.password_sha256) != self.password_sha256:
                raise RejectedError("lower-case hex")
        except RejectedError as invalid:
            raise ValueError(f"proxy_auth: expected {invalid.expected}") from None


@dataclass(frozen=True, slots=True)
class App:
    """One app. Construction checks every field (``InvalidRuleSetError``, keys relative to the
    app: ``name``, ``uids[0]``, ``allow[1]``)."""

    name: str
    uids: tuple[UidRange, ...]
    allow: tuple[Rule, ...] = ()
    mode: Mode = Mode.ENFORCE
    limits: Limits | None = None
    proxy_auth: ProxyAuth | None = None

    def __post_init__(self) -> None:
        problems: list[Problem] = []

        def check(key: str, value: object, convert: Any) -> None:
            try:
                convert(value)
            except RejectedError as invalid:
                problems.append(Problem("", key, value_repr(value), invalid.expected, invalid.hint))

        check("name", self.name, _app_name)
        # Typed fields are checked too: code that builds an App from a request must not be able
        # to slip in what the type says cannot be there.
        uid_items: tuple[object, ...] = self.uids
        if not uid_items:
            problems.append(Problem("", "uids", "()", _UIDS_EXPECTED))
        for index, uids in enumerate(uid_items):
            if not isinstance(uids, UidRange):
                problems.append(Problem("", f"uids[{index}]", value_repr(uids), _UID_EXPECTED))
            elif uids.first == 0:
                problems.append(Problem("", f"uids[{index}]", repr(str(uids)), *_NOT_ROOT))
        rule_items: tuple[object, ...] = self.allow
        for index, rule in enumerate(rule_items):
            if not isinstance(rule, Rule):
                check(f"allow[{index}]", rule, _rule_object)
        mode: object = self.mode
        if not isinstance(mode, Mode):
            check("mode", mode, _MODE)
        for key, value, kind in (
            ("limits", self.limits, Limits),
            ("proxy_auth", self.proxy_auth, ProxyAuth),
        ):
            if value is not None and not isinstance(value, kind):
                problems.append(Problem("", key, value_repr(value), f"a {kind.__name__} or None"))
        if problems:
            raise InvalidRuleSetError(problems)


_UIDS_EXPECTED: Final = 'a non-empty list of uids or "FIRST-LAST" ranges'
_NOT_ROOT: Final = ("uids other than 0", "root is never sandboxed")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every app, and the version of the set (stores increase it with every commit).

    Construction checks what no single app can: names are unique and no uid belongs to two
    apps (``InvalidRuleSetError``, keys ``app[i]...``, naming both apps). ``source`` says where
    the set came from, for messages.
    """

    apps: tuple[App, ...] = ()
    version: int = 0
    source: str = field(default="<rules>", compare=False)
    # uid -> app lookup, built once; app_for_uid runs for every connection.
    _single_uids: dict[int, App] = field(init=False, repr=False, compare=False)
    _range_firsts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _ranges: tuple[tuple[UidRange, App], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        version: object = self.version
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            problems.append(Problem(self.source, "version", value_repr(version), "an integer >= 0"))
        drafts = []
        app_items: tuple[object, ...] = self.apps
        for index, app in enumerate(app_items):
            path = f"app[{index}]"
            if not isinstance(app, App):
                problems.append(Problem(self.source, path, value_repr(app), "an App"))
                continue
            claims = [(f"{path}.uids[{i}]", uids) for i, uids in enumerate(app.uids)]
            drafts.append(_Draft(path, app.name, claims))
        problems += _set_problems(self.source, drafts)
        if problems:
            raise InvalidRuleSetError(problems)
        single: dict[int, App] = {}
        ranges: list[tuple[UidRange, App]] = []
        for app in self.apps:
            for uids in app.uids:
                if uids.first == uids.last:
                    single[uids.first] = app
                else:
                    ranges.append((uids, app))
        ranges.sort(key=lambda entry: entry[0])
        object.__setattr__(self, "_single_uids", single)
        object.__setattr__(self, "_range_firsts", tuple(r.first for r, _ in ranges))
        object.__setattr__(self, "_ranges", tuple(ranges))

    def app_for_uid(self, uid: int) -> App | None:
        """The app that owns ``uid``, or ``None``: a dict probe, then a binary search."""
        app = self._single_uids.get(uid)
        if app is not None:
            return app
        index = bisect.bisect_right(self._range_firsts, uid) - 1
        if index >= 0:
            uids, app = self._ranges[index]
            if uid <= uids.last:
                return app
        return None

    def __len__(self) -> int:
        return len(self.apps)

    def with_version(self, version: int) -> RuleSet:
        """The same apps under another version, without checking them again (they were)."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidRuleSetError(
                [Problem(self.source, "version", value_repr(version), "an integer >= 0")]
            )
        copy = object.__new__(RuleSet)
        for each in dataclasses.fields(self):
            object.__setattr__(copy, each.name, getattr(self, each.name))
        object.__setattr__(copy, "version", version)
        return copy

    @classmethod
    def from_data(cls, data: Mapping[str, Any], *, version: int, source: str) -> RuleSet:
        """Read ``{"app": [{...}, ...]}`` (parsed TOML or JSON); raise ``InvalidRuleSetError``
        listing every problem, unknown keys included."""
        reader = Reader(source)
        root = reader.root(data)
        rule_set = read_rule_set(
            reader, root.tables("app", name="[[app]]", expected=_APPS_EXPECTED)
        )
        reader.report_unknown_keys()
        if reader.problems or rule_set is None:
            raise InvalidRuleSetError(reader.problems)
        return rule_set.with_version(version)  # checked once, by read_rule_set


# --- reading apps from plain values ----------------------------------------------------------


@dataclass(slots=True)
class _Draft:
    """An app as far as it could be read: enough to check names and uids across the set."""

    path: str
    name: str
    uids: list[tuple[str, UidRange]]

    @property
    def label(self) -> str:
        """How messages name the app: ``'blog'``, or ``app[2]`` when the name is missing."""
        return repr(self.name) if self.name else self.path


def read_rule_set(reader: Reader, tables: Sequence[Table], *, version: int = 0) -> RuleSet | None:
    """Read ``[[app]]`` tables into a rule set, reporting every problem to ``reader``.

    Returns ``None`` when anything was wrong (the problems are in ``reader.problems``).
    """
    apps: list[App | None] = []
    drafts: list[_Draft] = []
    before = len(reader.problems)
    for t in tables:
        app, draft = _read_app(t)
        apps.append(app)
        drafts.append(draft)
    reader.problems.extend(_set_problems(reader.source, drafts))
    if len(reader.problems) > before or any(app is None for app in apps):
        return None
    return RuleSet(tuple(app for app in apps if app is not None), version, reader.source)


def _read_app(t: Table) -> tuple[App | None, _Draft]:
    before = len(t.reader.problems)
    name = t.value("name", _app_name, "", required='an app name such as "blog"')
    uid_entries = t.entries(
        "uids", sandboxed_uids, expected=_UIDS_EXPECTED, required=True, non_empty=True
    )
    uids = list(uid_entries or ())
    limits_table = t.table("limits", name=f"{t.path}.limits")
    auth_table = t.table("proxy_auth", name=f"{t.path}.proxy_auth")
    allow = t.items("allow", _rule, (), expected="a list of rule strings")
    mode = t.value("mode", _MODE, Mode.ENFORCE)
    limits = read_limits(limits_table) if limits_table.present else None
    proxy_auth = _read_proxy_auth(auth_table) if auth_table.present else None
    draft = _Draft(t.path, name, uids)
    if len(t.reader.problems) > before:
        return None, draft
    app = App(
        name=name,
        uids=tuple(u for _, u in uids),
        allow=allow,
        mode=mode,
        limits=limits,
        proxy_auth=proxy_auth,
    )
    return app, draft


def read_limits(t: Table) -> Limits | None:
    """A ``limits`` table (an app's, or ``[ratelimit.defaults]``); ``None`` if invalid."""
    before = len(t.reader.problems)
    values: dict[str, Any] = {}
    for key, convert in _LIMIT_FIELDS.items():
        values[key] = t.value(key, convert, None)
    if len(t.reader.problems) > before:
        return None
    return Limits(**values)


def _read_proxy_auth(t: Table) -> ProxyAuth | None:
    before = len(t.reader.problems)
    username = t.value("username", _username, "", required="a user name")
    digest = t.value(
        "password_sha256",
        sha256_hex,
        "",
        required="the SHA-256 (hex) of the password",
        show=secret_shown,
    )
    if len(t.reader.problems) > before:
        return None
    return ProxyAuth(username=username, password_sha256=digest)


def _set_problems(source: str, drafts: Sequence[_Draft]) -> list[Problem]:
    """Problems only the whole set shows: a name used twice, a uid claimed twice."""
    problems: list[Problem] = []
    names: dict[str, str] = {}
    for draft in drafts:
        if draft.name in names:
            problems.append(
                Problem(
                    source,
                    f"{draft.path}.name",
                    value_repr(draft.name),
                    "a name no other app uses",
                    f"also {names[draft.name]}",
                )
            )
        elif draft.name:
            names[draft.name] = draft.path
    claims = sorted(
        ((uids, draft.label, key) for draft in drafts for key, uids in draft.uids),
        key=lambda claim: (claim[0].first, claim[0].last),
    )
    widest: tuple[UidRange, str, str] | None = (
        None  # of the claims so far, the one reaching furthest
    )
    for uids, label, key in claims:
        if widest is not None and uids.first <= widest[0].last:
            other = (
                f"another entry of app {widest[1]}" if widest[1] == label else f"app {widest[1]}"
            )
            problems.append(
                Problem(
                    source,
                    key,
                    value_repr(str(uids)),
                    "uids no other app claims",
                    f"app {label} overlaps {other} at {widest[2]} = {str(widest[0])!r}",
                )
            )
        if widest is None or uids.last > widest[0].last:
            widest = (uids, label, key)
    return problems


# --- converters ------------------------------------------------------------------------------


def _app_name(raw: Any) -> str:
    if not isinstance(raw, str) or not _NAME.fullmatch(raw):
        raise RejectedError(
            "1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return raw


def sandboxed_uids(raw: Any) -> UidRange:
    """Converter for a uid or range a sandbox may use: never root."""
    try:
        uids = UidRange.parse(raw)
    except ValueError as error:
        raise RejectedError(_UID_EXPECTED, str(error)) from None
    if uids.first == 0:
        raise RejectedError(*_NOT_ROOT)
    return uids


# Rules are immutable values, and a reload re-reads mostly the same strings: parse each once.
_parse_rule = functools.lru_cache(maxsize=1 << 16)(parse_rule)


def _rule(raw: Any) -> Rule:
    if not isinstance(raw, str):
        raise RejectedError('a rule string such as "api.example.com:443"')
    try:
        return _parse_rule(raw)
    except RuleSyntaxError as error:
        raise RejectedError(str(error)) from None


def _rule_object(raw: Any) -> Rule:
    """For typed construction: a Rule, never text (a string is parsed only to say why not)."""
    if isinstance(raw, Rule):
        return raw
    _rule(raw)
    raise RejectedError("a parsed Rule", "parse rule strings with rules.parse.parse_rule")


def _username(raw: Any) -> str:
    if (
        not isinstance(raw, str)
        or not 1 <= len(raw.encode()) <= 255
        or ":" in raw
        or not raw.isprintable()
    ):
        raise RejectedError("1 to 255 bytes of printable text without ':'")
    return raw


_MODE: Final = choice(Mode)


def _connection_rate(raw: Any) -> float:
    """A rate the buckets can hold exactly: from one a quarter-hour to a million a second
    (the Redis script keeps times in microseconds as doubles, exact below 2**53)."""
    expected = "a number of connections per second from 0.001 to 1000000"
    rate = positive_number(expected)(raw)
    if not 0.001 <= rate <= 1_000_000:
        raise RejectedError(expected)
    return rate


_COUNT: Final = integer(1, 1_000_000)
_BYTES: Final = integer(1, 10**12)
_LIMIT_FIELDS: Final = {
    "connections_per_second": _connection_rate,
    "burst": _COUNT,
    "max_concurrent": _COUNT,
    "bandwidth_bytes_per_second": _BYTES,
    "bandwidth_burst_bytes": _BYTES,
    "destination_connections_per_second": _connection_rate,
    "destination_burst": _COUNT,
}


def _limits_problems(limits: Limits) -> list[tuple[str, object, str]]:
    found = []
    for key, convert in _LIMIT_FIELDS.items():
        value = getattr(limits, key)
        if value is None:
            continue
        try:
            convert(value)
        except RejectedError as invalid:
            found.append((key, value, invalid.expected))
    return found
