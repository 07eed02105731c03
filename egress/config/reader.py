"""Read a TOML config file into :mod:`egress.config.model`, checking every key.

A bad config stops the process at start-up with *every* problem listed: file, key path, the value
found, what was expected, and the nearest valid key for a misspelt one. The tree is walked with
the reader of :mod:`rules.reading`; the ``[[app]]`` tables are read by :mod:`rules.apps`, the same
code every other reader of rules uses.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Final

from egress.config.model import (
    UNIX_PATH_MAX,
    AdminConfig,
    AdminRole,
    AdminToken,
    Concurrency,
    Config,
    FirewallBackend,
    FirewallConfig,
    FirewallMode,
    ListenAddress,
    LogConfig,
    LogLevel,
    ProxyConfig,
    RatelimitBackend,
    RatelimitConfig,
    RedisConfig,
    RedisErrorPolicy,
    ResolverConfig,
    RulesConfig,
    RuleStore,
    SandboxConfig,
    SandboxListen,
    SecurityConfig,
    _no_exceptions,
    _redact_url,
)
from egress.errors import ConfigError, ConfigProblem, value_repr
from egress.redisurl import RedisUrlError, parse_redis_url
from rules.apps import MAX_UID, RuleSet, read_limits, read_rule_set, sandboxed_uids
from rules.problems import InvalidRuleSetError, utf8_text
from rules.reading import (
    Reader,
    RejectedError,
    Table,
    choice,
    integer,
    is_int,
    non_empty_string,
    positive_number,
    secret_shown,
    sha256_hex,
    string_of,
    via,
)
from rules.special import SpecialExceptions


def _url_shown(raw: object) -> str:
    return value_repr(_redact_url(raw) if isinstance(raw, str) else raw)


_seconds = positive_number("a number of seconds > 0")


_listen = via(
    string_of(ListenAddress.parse),
    '"HOST:PORT" with an IP address as HOST, e.g. "127.0.0.1:1080" or "[::1]:1080"',
)
_nameserver = via(
    string_of(lambda text: ListenAddress.parse(text, default_port=53, min_port=1)),
    'an IP address, optionally with a port: "192.0.2.53", "127.0.0.1:5353", "[::1]:53"',
)


def _octal_mode(raw: Any) -> int:
    if not isinstance(raw, str) or not re.fullmatch(r"0?[0-7]{3}", raw):
        hint = "quote it, as a string" if is_int(raw) else None
        raise RejectedError('an octal permission string such as "0660"', hint)
    return int(raw, 8)


def _principal(kind: str) -> Callable[[Any], str | int]:
    expected = f"a {kind} name or a numeric id"

    def convert(raw: Any) -> str | int:
        if is_int(raw) and 0 <= raw <= MAX_UID:
            return int(raw)
        if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,10}", raw) and int(raw) <= MAX_UID:
            return int(raw)
        if isinstance(raw, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", raw):
            return raw
        raise RejectedError(expected)

    return convert


def _unix_socket_path(raw: Any) -> Path:
    expected = f"an absolute path of at most {UNIX_PATH_MAX} bytes"
    if not isinstance(raw, str) or not raw.startswith("/") or "\0" in raw:
        raise RejectedError(expected)
    if len(os.fsencode(raw)) > UNIX_PATH_MAX:
        raise RejectedError(expected, "the kernel limits Unix socket paths")
    return Path(raw)


def _redis_url(raw: Any) -> str:
    """One of the forms of :mod:`egress.redisurl` (one server, Sentinel or Cluster)."""
    if not isinstance(raw, str):
        raise RejectedError('a Redis URL string, e.g. "redis://127.0.0.1:6379/0"')
    try:
        parse_redis_url(raw)
    except RedisUrlError as error:
        raise RejectedError(error.expected, error.problem) from None
    return raw


def _special_range(raw: Any) -> str:
    if not isinstance(raw, str):
        raise RejectedError('a network such as "10.8.0.0/16"')
    try:
        SpecialExceptions.parse([raw])
    except ValueError as error:
        message = str(error).removeprefix("invalid [security].allow_special: ")
        raise RejectedError('a network such as "10.8.0.0/16"', message) from None
    return raw


# --- reading each section -------------------------------------------------------------------

_LISTENER_KEYS: Final = ("socks5_listen", "http_listen", "unix_socket", "transparent_listen")
_LISTEN_LIST = 'a list of "HOST:PORT" strings'


def _dns_listen(raw: Any) -> ListenAddress:
    address = _listen(raw)
    if not ip_address(address.host).is_loopback:
        raise RejectedError(
            'a loopback address such as "127.0.0.1:15053"',
            "the DNS listener identifies apps by the uid owning the local socket",
        )
    return address


def _read_proxy(t: Table) -> ProxyConfig:
    d = ProxyConfig()
    proxy = ProxyConfig(
        socks5_listen=t.items("socks5_listen", _listen, d.socks5_listen, expected=_LISTEN_LIST),
        http_listen=t.items("http_listen", _listen, d.http_listen, expected=_LISTEN_LIST),
        unix_socket=t.value("unix_socket", _unix_socket_path, d.unix_socket),
        unix_socket_mode=t.value("unix_socket_mode", _octal_mode, d.unix_socket_mode),
        unix_socket_owner=t.value("unix_socket_owner", _principal("user"), d.unix_socket_owner),
        unix_socket_group=t.value("unix_socket_group", _principal("group"), d.unix_socket_group),
        transparent_listen=t.value("transparent_listen", _listen, d.transparent_listen),
        dns_listen=t.value("dns_listen", _dns_listen, d.dns_listen),
        dns_queries_per_second=t.value(
            "dns_queries_per_second", _seconds, d.dns_queries_per_second
        ),
        dns_burst=t.value("dns_burst", integer(1), d.dns_burst),
        handshake_timeout=t.value("handshake_timeout", _seconds, d.handshake_timeout),
        connect_timeout=t.value("connect_timeout", _seconds, d.connect_timeout),
        idle_timeout=t.value("idle_timeout", _seconds, d.idle_timeout),
        drain_timeout=t.value("drain_timeout", _seconds, d.drain_timeout),
        max_handshake_bytes=t.value(
            "max_handshake_bytes", integer(512, 65536), d.max_handshake_bytes
        ),
        max_connections=t.value("max_connections", integer(1), d.max_connections),
        max_handshakes_per_app=t.value(
            "max_handshakes_per_app", integer(1), d.max_handshakes_per_app
        ),
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


def _read_resolver(t: Table) -> ResolverConfig:
    d = ResolverConfig()
    resolver = ResolverConfig(
        nameservers=t.items(
            "nameservers", _nameserver, d.nameservers, expected="a list of nameserver addresses"
        ),
        timeout=t.value("timeout", _seconds, d.timeout),
        attempts=t.value("attempts", integer(1, 10), d.attempts),
        min_ttl=t.value("min_ttl", _seconds, d.min_ttl),
        max_ttl=t.value("max_ttl", _seconds, d.max_ttl),
        negative_ttl=t.value("negative_ttl", _seconds, d.negative_ttl),
        max_addresses_per_family=t.value(
            "max_addresses_per_family", integer(1, 1024), d.max_addresses_per_family
        ),
        max_cache_bytes=t.value("max_cache_bytes", integer(65536), d.max_cache_bytes),
    )
    if resolver.min_ttl > resolver.max_ttl:
        t.reader.report(
            t.key_path("min_ttl"),
            resolver.min_ttl,
            f"at most max_ttl ({resolver.max_ttl:g})",
        )
    return resolver


def _read_security(t: Table) -> SecurityConfig:
    allowed = t.items("allow_special", _special_range, (), expected="a list of networks")
    try:
        exceptions = SpecialExceptions.parse(list(allowed))
    except ValueError as error:  # each item parsed alone; only a combination can get here
        t.reader.report(t.key_path("allow_special"), list(allowed), str(error))
        exceptions = _no_exceptions()
    return SecurityConfig(allow_special=allowed, special_exceptions=exceptions)


def _redis_prefix(raw: Any) -> str:
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", raw):
        raise RejectedError("1 to 64 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'")
    return raw


def _audit_log(raw: Any) -> Path:
    return Path(non_empty_string(raw))


def _read_rules(t: Table) -> RulesConfig:
    d = RulesConfig()
    return RulesConfig(
        store=t.value("store", choice(RuleStore), d.store),
        version=t.value("version", integer(0, 2**63 - 1), d.version),
        revoke_version=t.value("revoke_version", integer(0, 2**63 - 1), d.revoke_version),
        redis_prefix=t.value("redis_prefix", _redis_prefix, d.redis_prefix),
        check_interval=t.value("check_interval", _seconds, d.check_interval),
        audit_max_records=t.value(
            "audit_max_records", integer(10, 10_000_000), d.audit_max_records
        ),
        audit_log=t.value("audit_log", _audit_log, d.audit_log),
    )


def _read_ratelimit(t: Table) -> RatelimitConfig:
    d = RatelimitConfig()
    defaults = t.table("defaults", name="ratelimit.defaults")
    config = RatelimitConfig(
        backend=t.value("backend", choice(RatelimitBackend), d.backend),
        on_redis_error=t.value("on_redis_error", choice(RedisErrorPolicy), d.on_redis_error),
        local_share=t.value("local_share", _share, d.local_share),
        redis_timeout=t.value("redis_timeout", _redis_timeout, d.redis_timeout),
        redis_prefix=t.value("redis_prefix", _redis_prefix, d.redis_prefix),
        breaker_failures=t.value("breaker_failures", integer(1, 1000), d.breaker_failures),
        breaker_open=t.value("breaker_open", _breaker_open, d.breaker_open),
        defaults=read_limits(defaults) if defaults.present else None,
        concurrency=t.value("concurrency", choice(Concurrency), d.concurrency),
        tunnel_ttl=t.value("tunnel_ttl", _tunnel_ttl, d.tunnel_ttl),
    )
    if config.concurrency is Concurrency.GLOBAL and config.backend is RatelimitBackend.MEMORY:
        t.reader.report(
            t.key_path("concurrency"),
            "global",
            'backend = "redis": tunnels are counted across nodes in Redis',
        )
    return config


def _share(raw: Any) -> float:
    share = positive_number("a number greater than 0 and at most 1")(raw)
    if share > 1:
        raise RejectedError("a number greater than 0 and at most 1")
    return share


def _redis_timeout(raw: Any) -> float:
    seconds = positive_number("a number of seconds from 0.001 to 5")(raw)
    if not 0.001 <= seconds <= 5:
        raise RejectedError("a number of seconds from 0.001 to 5")
    return seconds


def _tunnel_ttl(raw: Any) -> float:
    seconds = positive_number("a number of seconds from 1 to 300")(raw)
    if not 1 <= seconds <= 300:
        raise RejectedError("a number of seconds from 1 to 300")
    return seconds


def _breaker_open(raw: Any) -> float:
    seconds = positive_number("a number of seconds from 0.01 to 8")(raw)
    if not 0.01 <= seconds <= 8:
        raise RejectedError("a number of seconds from 0.01 to 8")
    return seconds


def _read_admin(t: Table) -> AdminConfig:
    tokens: list[AdminToken] = []
    seen: dict[str, str] = {}
    for entry in t.tables("tokens", name="an admin.tokens entry", expected="a list of tables"):
        token = AdminToken(
            name=entry.value("name", non_empty_string, "", required="a token name"),
            sha256=entry.value(
                "sha256", sha256_hex, "", required="the token's SHA-256 (hex)", show=secret_shown
            ),
            role=entry.value("role", choice(AdminRole), AdminRole.READ),
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


def _read_firewall(t: Table) -> FirewallConfig:
    d = FirewallConfig()
    return FirewallConfig(
        sandbox_uids=t.items(
            "sandbox_uids", sandboxed_uids, d.sandbox_uids, expected="a list of uids or ranges"
        ),
        mode=t.value("mode", choice(FirewallMode), d.mode),
        backend=t.value("backend", choice(FirewallBackend), d.backend),
        interval=t.value("interval", _seconds, d.interval),
        metrics_listen=t.value("metrics_listen", _listen, d.metrics_listen),
    )


def _check_listeners(reader: Reader, proxy: ProxyConfig, admin: AdminConfig) -> None:
    """The same fixed address configured for two listeners can never start."""
    used: list[tuple[str, ListenAddress]] = []
    used += [(f"proxy.socks5_listen[{i}]", a) for i, a in enumerate(proxy.socks5_listen)]
    used += [(f"proxy.http_listen[{i}]", a) for i, a in enumerate(proxy.http_listen)]
    if proxy.transparent_listen is not None:
        used.append(("proxy.transparent_listen", proxy.transparent_listen))
    if proxy.dns_listen is not None:  # its TCP side; UDP ports are another space
        used.append(("proxy.dns_listen", proxy.dns_listen))
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
    reader = Reader(source)
    root = reader.root(data)
    proxy = _read_proxy(root.table("proxy"))
    resolver = _read_resolver(root.table("resolver"))
    security = _read_security(root.table("security"))
    rules = _read_rules(root.table("rules"))
    ratelimit = _read_ratelimit(root.table("ratelimit"))
    redis_section = root.table("redis")
    redis = RedisConfig(
        url=redis_section.value("url", _redis_url, RedisConfig().url, show=_url_shown)
    )
    admin = _read_admin(root.table("admin"))
    firewall = _read_firewall(root.table("firewall"))
    log_section = root.table("log")
    log = LogConfig(
        level=log_section.value("level", choice(LogLevel), LogLevel.INFO),
        connection_log=log_section.value("connection_log", non_empty_string, "-"),
    )
    sandbox_section = root.table("sandbox")
    sandbox = SandboxConfig(
        proxy=sandbox_section.value("proxy", _listen, None),
        listen=sandbox_section.value("listen", choice(SandboxListen), SandboxListen.ANY),
    )
    if sandbox.proxy is not None and not ip_address(sandbox.proxy.host).is_loopback:
        reader.report(
            "sandbox.proxy",
            str(sandbox.proxy),
            "a loopback address such as 127.0.0.1:1080",
            "the proxy identifies apps by the uid that owns the local socket",
        )
    ruleset = read_rule_set(
        reader,
        root.tables("app", name="[[app]]", expected="[[app]] tables"),
        version=rules.version,
    )

    if firewall.mode is FirewallMode.TRANSPARENT and proxy.transparent_listen is None:
        reader.report(
            "firewall.mode",
            firewall.mode.value,
            '"explicit", or set proxy.transparent_listen',
            "transparent mode redirects sandbox traffic to proxy.transparent_listen",
        )
    _check_listeners(reader, proxy, admin)
    if rules.store is RuleStore.REDIS and ruleset is not None and len(ruleset):
        reader.report(
            "[[app]]",
            f"{len(ruleset)} app tables",
            'no [[app]] tables when rules.store = "redis" (the apps live in Redis)',
            "seed the store once with `egress rules import FILE --config THIS_FILE`",
        )
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
        sandbox=sandbox,
        ruleset=ruleset if ruleset is not None else RuleSet(source=source),
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
        text = utf8_text(raw, source)
    except InvalidRuleSetError as invalid:
        raise ConfigError(invalid.problems) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(source, text, str(error))]) from None
    except RecursionError:  # tomllib recurses per nesting level: [[[[...]]]] runs out of stack
        raise ConfigError(
            [ConfigProblem(source, "", "values nested too deeply", "valid TOML")]
        ) from None
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
