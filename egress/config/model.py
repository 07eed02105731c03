"""The typed, immutable settings a config file becomes.

Defaults live in one place: the dataclass field defaults below. Reading and checking a file
is :mod:`egress.config.reader`; the human summary is :mod:`egress.config.summary`.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from rules.decide import Mode
from rules.model import Rule
from rules.special import SpecialExceptions

MAX_UID: Final = 2**32 - 1
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


# --- choices ---------------------------------------------------------------------------------


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class RuleStore(StrEnum):
    FILE = "file"  # the [[app]] tables of this file; "redis" is planned, not yet available


class RatelimitBackend(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class RedisErrorPolicy(StrEnum):
    """What the limiter does while Redis is unreachable."""

    LOCAL = "local"  # fall back to per-node buckets
    DENY = "deny"
    ALLOW = "allow"


class AdminRole(StrEnum):
    READ = "read"
    WRITE = "write"


class FirewallMode(StrEnum):
    EXPLICIT = "explicit"  # apps talk to the proxy; everything else from a sandbox uid is rejected
    TRANSPARENT = "transparent"  # sandbox TCP is REDIRECTed to proxy.transparent_listen


class FirewallBackend(StrEnum):
    IPTC = "iptc"
    IPTABLES_RESTORE = "iptables-restore"
    AUTO = "auto"


# --- value types -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """An IP literal and a port. ``host`` is canonical (``ipaddress`` compressed form)."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(
        cls, text: str, *, default_port: int | None = None, min_port: int = 0
    ) -> ListenAddress:
        """Parse ``"HOST:PORT"`` or ``"[V6]:PORT"``; HOST must be an IP literal, strictly spelt.

        With ``default_port``, a bare ``"IP"`` (IPv6 with or without brackets) is accepted too.
        Raises ``ValueError`` with a readable message.
        """
        if text.startswith("["):
            host_text, bracket, rest = text[1:].partition("]")
            if not bracket:
                raise ValueError("missing ']' after the IPv6 address")
            if rest == "" and default_port is not None:
                return cls(str(_parse_ip(host_text, version=6)), default_port)
            if rest.startswith(":"):
                port_text = rest[1:]
            else:
                raise ValueError("expected ':PORT' after ']'")
            ip = _parse_ip(host_text, version=6)
        else:
            if default_port is not None and _is_ip(text):
                return cls(str(ipaddress.ip_address(text)), default_port)
            host_text, colon, port_text = text.rpartition(":")
            if not colon:
                raise ValueError("missing ':PORT'")
            if ":" in host_text:
                raise ValueError('write IPv6 addresses in brackets, e.g. "[::1]:1080"')
            ip = _parse_ip(host_text)
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not min_port <= int(port_text) <= 65535:
            raise ValueError(f"port must be a number from {min_port} to 65535")
        return cls(str(ip), int(port_text))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_ip(
    text: str, *, version: int | None = None
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (hostnames are not accepted here)"
        ) from None
    if version is not None and ip.version != version:
        raise ValueError(f"expected an IPv{version} address here")
    return ip


@dataclass(frozen=True, slots=True, order=True)
class UidRange:
    """Uids ``first`` to ``last``, both included."""

    first: int
    last: int

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
        if not 0 <= first <= MAX_UID or not 0 <= last <= MAX_UID:
            raise ValueError(f"uids go from 0 to {MAX_UID}")
        if first > last:
            raise ValueError("the first uid of a range must not exceed the last")
        return cls(first, last)


# --- sections --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    socks5_listen: tuple[ListenAddress, ...] = ()
    http_listen: tuple[ListenAddress, ...] = ()
    unix_socket: Path | None = None
    # 0660, not 0666: only the socket's owner and group can even reach the handshake parser.
    # Identity comes from SO_PEERCRED either way, so "0666" is safe when the sandbox uids share
    # no group; with "0660" put them in unix_socket_group.
    unix_socket_mode: int = 0o660
    unix_socket_owner: str | int | None = None
    unix_socket_group: str | int | None = None
    transparent_listen: ListenAddress | None = None
    handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    drain_timeout: float = 30.0
    max_handshake_bytes: int = 8192
    max_connections: int = 10000  # connections beyond this are refused


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    nameservers: tuple[ListenAddress, ...] = ()  # empty: the system's
    timeout: float = 2.0
    attempts: int = 2
    min_ttl: float = 5.0
    max_ttl: float = 300.0
    negative_ttl: float = 5.0


def _no_exceptions() -> SpecialExceptions:
    return SpecialExceptions.parse([])


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    allow_special: tuple[str, ...] = ()  # as written, for display
    special_exceptions: SpecialExceptions = field(default_factory=_no_exceptions)


@dataclass(frozen=True, slots=True)
class RulesConfig:
    store: RuleStore = RuleStore.FILE


@dataclass(frozen=True, slots=True)
class RatelimitConfig:
    backend: RatelimitBackend = RatelimitBackend.MEMORY
    on_redis_error: RedisErrorPolicy = RedisErrorPolicy.LOCAL


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password

    @property
    def display_url(self) -> str:
        """The URL with any password replaced by ``***``."""
        return _redact_url(self.url)


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    sha256: str = field(repr=False)  # lower-case hex of the bearer token's SHA-256
    role: AdminRole = AdminRole.READ


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenAddress | None = None
    tokens: tuple[AdminToken, ...] = ()


@dataclass(frozen=True, slots=True)
class FirewallConfig:
    sandbox_uids: tuple[UidRange, ...] = (UidRange(10000, 59999),)
    mode: FirewallMode = FirewallMode.EXPLICIT
    backend: FirewallBackend = FirewallBackend.AUTO
    interval: float = 10.0
    metrics_listen: ListenAddress | None = None  # /metrics of `egress firewall run`; None: off


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO
    connection_log: str = "-"  # "-" is stderr, anything else a file path


@dataclass(frozen=True, slots=True)
class AppLimits:
    """Stored for the limiter; ``None`` means no limit of that kind."""

    connections_per_second: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    bandwidth_bytes_per_second: int | None = None


@dataclass(frozen=True, slots=True)
class ProxyAuth:
    """Credentials an app's clients must also present (RFC 1929 or Proxy-Authorization).

    An extra factor on top of the kernel-reported uid, never a replacement for it.
    """

    username: str
    password_sha256: str = field(repr=False)  # lower-case hex


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    uids: tuple[UidRange, ...]
    allow: tuple[Rule, ...] = ()
    mode: Mode = Mode.ENFORCE
    limits: AppLimits | None = None
    proxy_auth: ProxyAuth | None = None


@dataclass(frozen=True, slots=True)
class Config:
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    ratelimit: RatelimitConfig = field(default_factory=RatelimitConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    log: LogConfig = field(default_factory=LogConfig)
    apps: tuple[AppConfig, ...] = ()
    source: Path = Path("<memory>")
    # uid -> app lookup, built once; app_for_uid runs for every connection.
    _single_uids: dict[int, AppConfig] = field(init=False, repr=False, compare=False)
    _range_firsts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _ranges: tuple[tuple[UidRange, AppConfig], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        single: dict[int, AppConfig] = {}
        ranges: list[tuple[UidRange, AppConfig]] = []
        for app in self.apps:
            for uids in app.uids:
                if uids.first == uids.last:
                    single.setdefault(uids.first, app)
                else:
                    ranges.append((uids, app))
        ranges.sort(key=lambda entry: entry[0])
        object.__setattr__(self, "_single_uids", single)
        object.__setattr__(self, "_range_firsts", tuple(r.first for r, _ in ranges))
        object.__setattr__(self, "_ranges", tuple(ranges))

    def app_for_uid(self, uid: int) -> AppConfig | None:
        """The app that owns ``uid``, or ``None``. Relies on apps' uids not overlapping, which
        :func:`parse_config` guarantees."""
        app = self._single_uids.get(uid)
        if app is not None:
            return app
        index = bisect.bisect_right(self._range_firsts, uid) - 1
        if index >= 0:
            uids, app = self._ranges[index]
            if uid <= uids.last:
                return app
        return None


def _redact_url(url: str) -> str:
    url = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)
