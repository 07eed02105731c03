"""The typed, immutable settings a config file becomes.

The apps (``[[app]]``) are a :class:`rules.apps.RuleSet`, the one app model every reader of rules
builds. Defaults live in one place: the dataclass field defaults below. Reading and checking a file
is :mod:`egress.config.reader`; the human summary is :mod:`egress.config.summary`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Final

from egress.redisurl import redact_redis_url
from rules.apps import App, Limits, RuleSet, UidRange
from rules.special import SpecialExceptions

UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


# --- choices ---------------------------------------------------------------------------------


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class RuleStore(StrEnum):
    FILE = "file"  # the [[app]] tables of this file
    REDIS = "redis"  # shared by every node: [redis].url, keys under [rules].redis_prefix


class RatelimitBackend(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class Concurrency(StrEnum):
    """Where ``max_concurrent`` counts an app's tunnels."""

    NODE = "node"  # this node's own
    GLOBAL = "global"  # every node's, in Redis (needs backend = "redis")


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
    # The sandbox DNS listener (UDP and TCP on one address): the firewall redirects sandbox
    # port-53 traffic here in transparent mode.
    dns_listen: ListenAddress | None = None
    dns_queries_per_second: float = 100.0  # per app, on this node (over it: REFUSED)
    dns_burst: int = 200
    handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    drain_timeout: float = 30.0
    max_handshake_bytes: int = 8192
    max_connections: int = 10000  # connections beyond this are refused at accept
    max_handshakes_per_app: int = 64  # one app's clients still in their handshake


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    nameservers: tuple[ListenAddress, ...] = ()  # empty: the system's
    timeout: float = 2.0
    attempts: int = 2
    min_ttl: float = 5.0
    max_ttl: float = 300.0
    negative_ttl: float = 5.0
    max_addresses_per_family: int = 32  # A and AAAA answers kept per name, each
    max_cache_bytes: int = 16 * 1024 * 1024


def _no_exceptions() -> SpecialExceptions:
    return SpecialExceptions.parse([])


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    allow_special: tuple[str, ...] = ()  # as written, for display
    special_exceptions: SpecialExceptions = field(default_factory=_no_exceptions)


@dataclass(frozen=True, slots=True)
class RulesConfig:
    store: RuleStore = RuleStore.FILE
    version: int = 0  # file store: the version of the [[app]] tables (`egress rules` bumps it)
    revoke_version: int = 0  # file store: the newest version committed with revoke
    redis_prefix: str = "egress"  # Redis keys are "{<prefix>}:rules:..." (one Cluster slot)
    check_interval: float = 2.0  # the change feed's backstop: compare versions this often
    audit_max_records: int = 10_000  # the audit trail keeps this many newest records
    audit_log: Path | None = None  # file store's audit trail; None: "<config>.audit.jsonl"


@dataclass(frozen=True, slots=True)
class RatelimitConfig:
    backend: RatelimitBackend = RatelimitBackend.MEMORY
    on_redis_error: RedisErrorPolicy = RedisErrorPolicy.LOCAL
    local_share: float = 1.0  # "local" fallback: the share of each app's rate one node admits
    redis_timeout: float = 0.05  # seconds: the deadline of every limiter call to Redis
    redis_prefix: str = "egress"  # bucket keys are "{<prefix>:<app>}:rl:..." (a slot per app)
    breaker_failures: int = 3  # failed calls in a row that stop the limiter waiting on Redis
    breaker_open: float = 0.5  # seconds before Redis is tried again (doubling, up to 8 s)
    defaults: Limits | None = None  # [ratelimit.defaults]: limits for keys an app leaves unset
    concurrency: Concurrency = Concurrency.NODE  # where max_concurrent counts tunnels
    tunnel_ttl: float = 15.0  # "global": a node's counts expire this long after its last write


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


class SandboxListen(StrEnum):
    """What a sandboxed app's bind()/listen() may do (the shim's EGRESS_SANDBOX_LISTEN)."""

    ANY = "any"
    LOOPBACK = "loopback"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Settings ``egress sandbox`` hands to the socket shim of the programs it starts."""

    proxy: ListenAddress | None = None  # default: the first loopback proxy.socks5_listen
    listen: SandboxListen = SandboxListen.ANY


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
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    ruleset: RuleSet = field(default_factory=RuleSet)
    source: Path = Path("<memory>")

    @property
    def apps(self) -> tuple[App, ...]:
        """The apps of :attr:`ruleset`, in config order."""
        return self.ruleset.apps


def _redact_url(url: str) -> str:
    # Every [redis].url form, a password holding "/" or "@" included (see egress.redisurl).
    return redact_redis_url(url)
