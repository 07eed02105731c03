"""Read a TOML config file into :mod:`egress.config.model`, checking every key.

A bad config stops the process at start-up with *every* problem listed: file, key path, the value
found, what was expected, and the nearest valid key for a misspelt one. Parsing walks the TOML
tree with one small reader (:class:`_Table`) that converts values, records problems instead of
raising at the first, and remembers which keys it was asked for, so unknown keys are found
without a second list of names to keep in sync.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

from egress.config.model import (
    MAX_UID,
    UNIX_PATH_MAX,
    AdminConfig,
    AdminRole,
    AdminToken,
    AppConfig,
    AppLimits,
    Config,
    FirewallBackend,
    FirewallConfig,
    FirewallMode,
    ListenAddress,
    LogConfig,
    LogLevel,
    ProxyAuth,
    ProxyConfig,
    RatelimitBackend,
    RatelimitConfig,
    RedisConfig,
    RedisErrorPolicy,
    ResolverConfig,
    RulesConfig,
    RuleStore,
    SecurityConfig,
    UidRange,
    _no_exceptions,
    _redact_url,
)
from egress.errors import ConfigError, ConfigProblem, value_repr
from rules.decide import Mode
from rules.model import Rule
from rules.parse import RuleSyntaxError, parse_rule
from rules.special import SpecialExceptions

# --- the reader ------------------------------------------------------------------------------

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


class _RejectedError(Exception):
    """Raised by a converter: the value is not acceptable."""

    def __init__(self, expected: str, hint: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


class _Missing:
    pass


_MISSING: Final = _Missing()


class _Reader:
    """Collects the problems found in one config source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[ConfigProblem] = []
        self.tables: list[_Table] = []

    def report(
        self,
        key: str,
        value: object,
        expected: str,
        hint: str | None = None,
        *,
        shown: str | None = None,
    ) -> None:
        text = value_repr(value) if shown is None else shown
        self.problems.append(ConfigProblem(self.source, key, text, expected, hint))

    def report_unknown_keys(self) -> None:
        for table in self.tables:
            table.report_unknown_keys()


class _Table:
    """One TOML table being read. Every key asked for becomes a known key of the table."""

    def __init__(
        self, reader: _Reader, data: Mapping[str, Any], path: str, *, name: str, present: bool
    ) -> None:
        self.reader = reader
        self.data = data
        self.path = path
        self.name = name
        self.present = present
        self.known: list[str] = []
        reader.tables.append(self)

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _take(self, key: str) -> Any:
        self.known.append(key)
        return self.data.get(key, _MISSING)

    def value(
        self,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        *,
        required: str | None = None,
        show: Callable[[Any], str] = value_repr,
    ) -> T:
        """The converted value of ``key``; ``default`` when absent or invalid (and reported).

        ``required`` is the text that says what was expected when the key is absent; ``show``
        renders a bad value for the report (to keep secrets out of it).
        """
        raw = self._take(key)
        if isinstance(raw, _Missing):
            if required is not None:
                self.reader.report(self.key_path(key), None, required, shown="nothing")
            return default
        try:
            return convert(raw)
        except _RejectedError as invalid:
            self.reader.report(
                self.key_path(key), raw, invalid.expected, invalid.hint, shown=show(raw)
            )
            return default

    def entries(
        self,
        key: str,
        convert: Callable[[Any], T],
        *,
        expected: str,
        required: bool = False,
        non_empty: bool = False,
    ) -> list[tuple[str, T]] | None:
        """``(key path, value)`` for each valid item of the list at ``key``; ``None`` when
        absent or not a list. Each bad item is reported at its own ``key[i]`` path."""
        raw = self._take(key)
        path = self.key_path(key)
        if isinstance(raw, _Missing):
            if required:
                self.reader.report(path, None, expected, shown="nothing")
            return None
        if not isinstance(raw, list):
            hint = (
                f"write it as a list: [{json.dumps(raw)}]" if isinstance(raw, str | int) else None
            )
            self.reader.report(path, raw, expected, hint)
            return None
        if non_empty and not raw:
            self.reader.report(path, raw, expected)
        found: list[tuple[str, T]] = []
        for index, item in enumerate(raw):
            item_path = f"{path}[{index}]"
            try:
                found.append((item_path, convert(item)))
            except _RejectedError as invalid:
                self.reader.report(item_path, item, invalid.expected, invalid.hint)
        return found

    def items(
        self, key: str, convert: Callable[[Any], T], default: tuple[T, ...], *, expected: str
    ) -> tuple[T, ...]:
        found = self.entries(key, convert, expected=expected)
        return default if found is None else tuple(value for _, value in found)

    def table(self, key: str, *, name: str | None = None) -> _Table:
        """The sub-table at ``key``; an empty, not ``present`` one when absent or not a table."""
        raw = self._take(key)
        path = self.key_path(key)
        name = name or f"[{path}]"
        if isinstance(raw, Mapping):
            return _Table(self.reader, raw, path, name=name, present=True)
        if not isinstance(raw, _Missing):
            self.reader.report(path, raw, "a table")
        return _Table(self.reader, {}, path, name=name, present=False)

    def tables(self, key: str, *, name: str, expected: str) -> list[_Table]:
        """The tables of an array of tables (``[[app]]``, or a list of inline tables)."""
        raw = self._take(key)
        path = self.key_path(key)
        if isinstance(raw, _Missing):
            return []
        if isinstance(raw, Mapping):
            self.reader.report(path, raw, expected, f"write [[{path}]], not [{path}]")
            return []
        if not isinstance(raw, list):
            self.reader.report(path, raw, expected)
            return []
        found: list[_Table] = []
        for index, item in enumerate(raw):
            item_path = f"{path}[{index}]"
            if isinstance(item, Mapping):
                found.append(_Table(self.reader, item, item_path, name=name, present=True))
            else:
                self.reader.report(item_path, item, "a table")
        return found

    def report_unknown_keys(self) -> None:
        for key, raw in self.data.items():
            if key in self.known:
                continue
            hint = _did_you_mean(key, self.known)
            if hint is None and self.known:
                hint = "known keys: " + ", ".join(sorted(self.known))
            shown = f"unknown key {value_repr(key)}"
            self.reader.report(self.key_path(key), raw, f"a key of {self.name}", hint, shown=shown)


def _secret_shown(raw: object) -> str:
    if isinstance(raw, str):
        return f"a {len(raw)}-character string (not shown)"
    return value_repr(raw)


def _url_shown(raw: object) -> str:
    return value_repr(_redact_url(raw) if isinstance(raw, str) else raw)


def _did_you_mean(text: str, options: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(text, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


# --- converters: Any -> T, raising _RejectedError -------------------------------------------


def _is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def _quote_hint(raw: object) -> str | None:
    return "write numbers without quotes" if isinstance(raw, str) else None


def _positive_number(expected: str) -> Callable[[Any], float]:
    def convert(raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _RejectedError(expected, _quote_hint(raw))
        if not math.isfinite(raw) or raw <= 0:
            raise _RejectedError(expected)
        return float(raw)

    return convert


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def convert(raw: Any) -> int:
        if not _is_int(raw):
            raise _RejectedError(expected, _quote_hint(raw))
        if raw < low or (high is not None and raw > high):
            raise _RejectedError(expected)
        return int(raw)

    return convert


_seconds = _positive_number("a number of seconds > 0")


def _choice(options: type[E]) -> Callable[[Any], E]:
    values = [member.value for member in options]
    expected = "one of " + ", ".join(json.dumps(value) for value in values)

    def convert(raw: Any) -> E:
        if isinstance(raw, str):
            try:
                return options(raw)
            except ValueError:
                raise _RejectedError(expected, _did_you_mean(raw.lower(), values)) from None
        raise _RejectedError(expected)

    return convert


def _via(parse: Callable[[Any], T], expected: str) -> Callable[[Any], T]:
    """A converter from a parser that raises ``ValueError`` with a readable message."""

    def convert(raw: Any) -> T:
        try:
            return parse(raw)
        except ValueError as error:
            raise _RejectedError(expected, str(error) or None) from None

    return convert


def _string_of(parse: Callable[[str], T]) -> Callable[[Any], T]:
    def convert(raw: Any) -> T:
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return parse(raw)

    return convert


_listen = _via(
    _string_of(ListenAddress.parse),
    '"HOST:PORT" with an IP address as HOST, e.g. "127.0.0.1:1080" or "[::1]:1080"',
)
_nameserver = _via(
    _string_of(lambda text: ListenAddress.parse(text, default_port=53, min_port=1)),
    'an IP address, optionally with a port: "192.0.2.53", "127.0.0.1:5353", "[::1]:53"',
)
_UID_EXPECTED = 'a uid (0 to 4294967295) or a "FIRST-LAST" range'
_uid_range = _via(UidRange.parse, _UID_EXPECTED)


def _sandboxed_uids(raw: Any) -> UidRange:
    uids = _uid_range(raw)
    if uids.first == 0:
        raise _RejectedError("uids other than 0", "root is never sandboxed")
    return uids


def _non_empty_string(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise _RejectedError("a non-empty string")
    return raw


def _app_name(raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", raw):
        raise _RejectedError(
            "1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return raw


def _sha256_hex(raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", raw):
        raise _RejectedError(
            "64 hex characters (a SHA-256 digest)", "the digest of the secret, not the secret"
        )
    return raw.lower()


def _octal_mode(raw: Any) -> int:
    if not isinstance(raw, str) or not re.fullmatch(r"0?[0-7]{3}", raw):
        hint = "quote it, as a string" if _is_int(raw) else None
        raise _RejectedError('an octal permission string such as "0660"', hint)
    return int(raw, 8)


def _principal(kind: str) -> Callable[[Any], str | int]:
    expected = f"a {kind} name or a numeric id"

    def convert(raw: Any) -> str | int:
        if _is_int(raw) and 0 <= raw <= MAX_UID:
            return int(raw)
        if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,10}", raw) and int(raw) <= MAX_UID:
            return int(raw)
        if isinstance(raw, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", raw):
            return raw
        raise _RejectedError(expected)

    return convert


def _unix_socket_path(raw: Any) -> Path:
    expected = f"an absolute path of at most {UNIX_PATH_MAX} bytes"
    if not isinstance(raw, str) or not raw.startswith("/") or "\0" in raw:
        raise _RejectedError(expected)
    if len(os.fsencode(raw)) > UNIX_PATH_MAX:
        raise _RejectedError(expected, "the kernel limits Unix socket paths")
    return Path(raw)


def _redis_url(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.startswith(("redis://", "rediss://", "unix://")):
        raise _RejectedError("a URL starting with redis://, rediss:// or unix://")
    return raw


def _username(raw: Any) -> str:
    if (
        not isinstance(raw, str)
        or not 1 <= len(raw.encode()) <= 255
        or ":" in raw
        or not raw.isprintable()
    ):
        raise _RejectedError("1 to 255 bytes of printable text without ':'")
    return raw


def _rule(raw: Any) -> Rule:
    if not isinstance(raw, str):
        raise _RejectedError('a rule string such as "api.example.com:443"')
    try:
        return parse_rule(raw)
    except RuleSyntaxError as error:
        raise _RejectedError(str(error)) from None


def _special_range(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _RejectedError('a network such as "10.8.0.0/16"')
    try:
        SpecialExceptions.parse([raw])
    except ValueError as error:
        message = str(error).removeprefix("invalid [security].allow_special: ")
        raise _RejectedError('a network such as "10.8.0.0/16"', message) from None
    return raw


# --- reading each section -------------------------------------------------------------------

_LISTENER_KEYS: Final = ("socks5_listen", "http_listen", "unix_socket", "transparent_listen")
_LISTEN_LIST = 'a list of "HOST:PORT" strings'


def _read_proxy(t: _Table) -> ProxyConfig:
    d = ProxyConfig()
    proxy = ProxyConfig(
        socks5_listen=t.items("socks5_listen", _listen, d.socks5_listen, expected=_LISTEN_LIST),
        http_listen=t.items("http_listen", _listen, d.http_listen, expected=_LISTEN_LIST),
        unix_socket=t.value("unix_socket", _unix_socket_path, d.unix_socket),
        unix_socket_mode=t.value("unix_socket_mode", _octal_mode, d.unix_socket_mode),
        unix_socket_owner=t.value("unix_socket_owner", _principal("user"), d.unix_socket_owner),
        unix_socket_group=t.value("unix_socket_group", _principal("group"), d.unix_socket_group),
        transparent_listen=t.value("transparent_listen", _listen, d.transparent_listen),
        handshake_timeout=t.value("handshake_timeout", _seconds, d.handshake_timeout),
        connect_timeout=t.value("connect_timeout", _seconds, d.connect_timeout),
        idle_timeout=t.value("idle_timeout", _seconds, d.idle_timeout),
        drain_timeout=t.value("drain_timeout", _seconds, d.drain_timeout),
        max_handshake_bytes=t.value(
            "max_handshake_bytes", _integer(512, 65536), d.max_handshake_bytes
        ),
        max_connections=t.value("max_connections", _integer(1), d.max_connections),
    )
    listeners = (
        proxy.socks5_listen,
        proxy.http_listen,
        proxy.unix_socket,
        proxy.transparent_listen,
    )
    # A bad or misspelt listener is reported already; "no listener" would only repeat it.
    tried = any(t.data.get(key) for key in _LISTENER_KEYS) or any(
        key not in t.known for key in t.data
    )
    if not any(listeners) and not tried:
        t.reader.report(
            t.path, None, "at least one of " + ", ".join(_LISTENER_KEYS), shown="no listener"
        )
    return proxy


def _read_resolver(t: _Table) -> ResolverConfig:
    d = ResolverConfig()
    resolver = ResolverConfig(
        nameservers=t.items(
            "nameservers", _nameserver, d.nameservers, expected="a list of nameserver addresses"
        ),
        timeout=t.value("timeout", _seconds, d.timeout),
        attempts=t.value("attempts", _integer(1, 10), d.attempts),
        min_ttl=t.value("min_ttl", _seconds, d.min_ttl),
        max_ttl=t.value("max_ttl", _seconds, d.max_ttl),
        negative_ttl=t.value("negative_ttl", _seconds, d.negative_ttl),
    )
    if resolver.min_ttl > resolver.max_ttl:
        t.reader.report(
            t.key_path("min_ttl"),
            resolver.min_ttl,
            f"at most max_ttl ({resolver.max_ttl:g})",
        )
    return resolver


def _read_security(t: _Table) -> SecurityConfig:
    allowed = t.items("allow_special", _special_range, (), expected="a list of networks")
    try:
        exceptions = SpecialExceptions.parse(list(allowed))
    except ValueError as error:  # each item parsed alone; only a combination can get here
        t.reader.report(t.key_path("allow_special"), list(allowed), str(error))
        exceptions = _no_exceptions()
    return SecurityConfig(allow_special=allowed, special_exceptions=exceptions)


def _rule_store(raw: Any) -> RuleStore:
    if raw == "redis":
        raise _RejectedError(
            '"file"', 'the "redis" store is not available in this version yet; use "file"'
        )
    return _choice(RuleStore)(raw)


def _read_admin(t: _Table) -> AdminConfig:
    tokens: list[AdminToken] = []
    seen: dict[str, str] = {}
    for entry in t.tables("tokens", name="an admin.tokens entry", expected="a list of tables"):
        token = AdminToken(
            name=entry.value("name", _non_empty_string, "", required="a token name"),
            sha256=entry.value(
                "sha256", _sha256_hex, "", required="the token's SHA-256 (hex)", show=_secret_shown
            ),
            role=entry.value("role", _choice(AdminRole), AdminRole.READ),
        )
        if token.name in seen:
            entry.reader.report(
                entry.key_path("name"),
                token.name,
                "a name no other token uses",
                f"also used at {seen[token.name]}",
            )
        elif token.name:
            seen[token.name] = entry.key_path("name")
        tokens.append(token)
    return AdminConfig(listen=t.value("listen", _listen, None), tokens=tuple(tokens))


def _read_firewall(t: _Table) -> FirewallConfig:
    d = FirewallConfig()
    return FirewallConfig(
        sandbox_uids=t.items(
            "sandbox_uids", _sandboxed_uids, d.sandbox_uids, expected="a list of uids or ranges"
        ),
        mode=t.value("mode", _choice(FirewallMode), d.mode),
        backend=t.value("backend", _choice(FirewallBackend), d.backend),
        interval=t.value("interval", _seconds, d.interval),
        metrics_listen=t.value("metrics_listen", _listen, d.metrics_listen),
    )


def _read_limits(t: _Table) -> AppLimits:
    positive = _integer(1)
    return AppLimits(
        connections_per_second=t.value(
            "connections_per_second", _positive_number("a number > 0"), None
        ),
        burst=t.value("burst", positive, None),
        max_concurrent=t.value("max_concurrent", positive, None),
        bandwidth_bytes_per_second=t.value("bandwidth_bytes_per_second", positive, None),
    )


def _read_proxy_auth(t: _Table) -> ProxyAuth:
    return ProxyAuth(
        username=t.value("username", _username, "", required="a user name"),
        password_sha256=t.value(
            "password_sha256",
            _sha256_hex,
            "",
            required="the SHA-256 (hex) of the password",
            show=_secret_shown,
        ),
    )


@dataclass(slots=True)
class _UidClaim:
    uids: UidRange
    app: str  # "'blog'", or "app[2]" when the name is missing or invalid
    key: str


def _read_app(t: _Table, claims: list[_UidClaim]) -> AppConfig:
    name = t.value("name", _app_name, "", required='an app name such as "blog"')
    uid_entries = t.entries(
        "uids",
        _sandboxed_uids,
        expected='a non-empty list of uids or "FIRST-LAST" ranges',
        required=True,
        non_empty=True,
    )
    label = repr(name) if name else t.path  # for messages naming the app
    claims.extend(_UidClaim(uids, label, key) for key, uids in uid_entries or ())
    limits = t.table("limits", name=f"{t.path}.limits")
    proxy_auth = t.table("proxy_auth", name=f"{t.path}.proxy_auth")
    return AppConfig(
        name=name,
        uids=tuple(uids for _, uids in uid_entries or ()),
        allow=t.items("allow", _rule, (), expected="a list of rule strings"),
        mode=t.value("mode", _choice(Mode), Mode.ENFORCE),
        limits=_read_limits(limits) if limits.present else None,
        proxy_auth=_read_proxy_auth(proxy_auth) if proxy_auth.present else None,
    )


def _read_apps(root: _Table) -> tuple[AppConfig, ...]:
    apps: list[AppConfig] = []
    claims: list[_UidClaim] = []
    names: dict[str, str] = {}
    for t in root.tables("app", name="[[app]]", expected="[[app]] tables"):
        app = _read_app(t, claims)
        if app.name in names:
            t.reader.report(
                t.key_path("name"), app.name, "a name no other app uses", f"also {names[app.name]}"
            )
        elif app.name:
            names[app.name] = t.path
        apps.append(app)
    _check_uid_overlaps(root.reader, claims)
    return tuple(apps)


def _check_uid_overlaps(reader: _Reader, claims: list[_UidClaim]) -> None:
    """Report every uid entry that overlaps an earlier-starting one, naming both apps."""
    claims = sorted(claims, key=lambda claim: (claim.uids.first, claim.uids.last))
    widest: _UidClaim | None = None  # of the claims so far, the one reaching furthest
    for claim in claims:
        if widest is not None and claim.uids.first <= widest.uids.last:
            if widest.app == claim.app:
                other = f"another entry of app {widest.app}"
            else:
                other = f"app {widest.app}"
            reader.report(
                claim.key,
                str(claim.uids),
                "uids no other app claims",
                f"app {claim.app} overlaps {other} at {widest.key} = {str(widest.uids)!r}",
            )
        if widest is None or claim.uids.last > widest.uids.last:
            widest = claim


def _check_listeners(reader: _Reader, proxy: ProxyConfig, admin: AdminConfig) -> None:
    """The same fixed address configured for two listeners can never start."""
    used: list[tuple[str, ListenAddress]] = []
    used += [(f"proxy.socks5_listen[{i}]", a) for i, a in enumerate(proxy.socks5_listen)]
    used += [(f"proxy.http_listen[{i}]", a) for i, a in enumerate(proxy.http_listen)]
    if proxy.transparent_listen is not None:
        used.append(("proxy.transparent_listen", proxy.transparent_listen))
    if admin.listen is not None:
        used.append(("admin.listen", admin.listen))
    first_use: dict[ListenAddress, str] = {}
    for key, address in used:
        if address.port == 0:
            continue
        if address in first_use:
            reader.report(
                key, str(address), "an address no other listener uses", f"also {first_use[address]}"
            )
        else:
            first_use[address] = key


# --- entry points ----------------------------------------------------------------------------


def parse_config(data: Mapping[str, Any], *, source: str) -> Config:
    """Check and convert parsed TOML. Raises :class:`ConfigError` listing every problem."""
    reader = _Reader(source)
    root = _Table(reader, data, "", name="the top level", present=True)
    proxy = _read_proxy(root.table("proxy"))
    resolver = _read_resolver(root.table("resolver"))
    security = _read_security(root.table("security"))
    rules_section = root.table("rules")
    rules = RulesConfig(store=rules_section.value("store", _rule_store, RuleStore.FILE))
    ratelimit_section = root.table("ratelimit")
    ratelimit = RatelimitConfig(
        backend=ratelimit_section.value(
            "backend", _choice(RatelimitBackend), RatelimitBackend.MEMORY
        ),
        on_redis_error=ratelimit_section.value(
            "on_redis_error", _choice(RedisErrorPolicy), RedisErrorPolicy.LOCAL
        ),
    )
    redis_section = root.table("redis")
    redis = RedisConfig(
        url=redis_section.value("url", _redis_url, RedisConfig().url, show=_url_shown)
    )
    admin = _read_admin(root.table("admin"))
    firewall = _read_firewall(root.table("firewall"))
    log_section = root.table("log")
    log = LogConfig(
        level=log_section.value("level", _choice(LogLevel), LogLevel.INFO),
        connection_log=log_section.value("connection_log", _non_empty_string, "-"),
    )
    apps = _read_apps(root)

    if firewall.mode is FirewallMode.TRANSPARENT and proxy.transparent_listen is None:
        reader.report(
            "firewall.mode",
            firewall.mode.value,
            '"explicit", or set proxy.transparent_listen',
            "transparent mode redirects sandbox traffic to proxy.transparent_listen",
        )
    _check_listeners(reader, proxy, admin)
    reader.report_unknown_keys()
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        proxy=proxy,
        resolver=resolver,
        security=security,
        rules=rules,
        ratelimit=ratelimit,
        redis=redis,
        admin=admin,
        firewall=firewall,
        log=log,
        apps=apps,
        source=Path(source),
    )


def load_config(path: str | Path) -> Config:
    """Read, parse and check the TOML file at ``path``. Raises :class:`ConfigError`."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise ConfigError([ConfigProblem(source, "", reason, "a readable TOML file")]) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigProblem(source, f"line {line}", "bytes that are not UTF-8", "UTF-8 text")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(source, text, str(error))]) from None
    return parse_config(data, source=source)


def _syntax_problem(source: str, text: str, message: str) -> ConfigProblem:
    """tomllib (3.11) puts the location in the message: "... (at line 3, column 18)"."""
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match is not None:
        line = int(match[1])
        lines = text.splitlines()
        found = lines[line - 1].strip() if line <= len(lines) else ""
        key = f"line {line}, column {match[2]}"
    else:
        found = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        key = "end of document"
    reason = re.sub(r"\s*\(at [^)]*\)$", "", message)
    return ConfigProblem(source, key, value_repr(found), "valid TOML", reason)
