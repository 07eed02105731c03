"""What a connection driver may use, and nothing else of the server.

Drivers (:mod:`egress.net.connection`, :mod:`egress.net.transparent`) get a
:class:`ConnectionContext`: the settings, the resolver, metrics, the connection log, the kernel
identity lookup, the dialer, the current rules snapshot and the registry. Each is a small typed
interface, so a driver can be unit-tested with fake transports and fakes for these, and nothing
here imports the server (no import cycle).

``limits`` (:class:`egress.limits.ConnectionLimits`) checks an app's rate, concurrency and
bandwidth limits; ``None`` in tests that need none.

``settings`` and ``resolver`` are replaced on a live reload: a connection keeps the settings it
was accepted under, and uses the resolver current when it looks a name up. The admission limits
(``max_connections``, ``max_handshakes_per_app``) live in the registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

from egress.config import ProxyConfig
from egress.connlog import ConnectionLog
from egress.dnsnames import AnsweredNames
from egress.limits import ConnectionLimits
from egress.metrics import ProxyMetrics
from egress.net.dialer import Dialled
from egress.net.registry import ConnectionRegistry
from egress.resolver import Resolution, ResolveError
from rules.snapshot import PolicySnapshot

__all__ = [
    "ConnectionContext",
    "Dial",
    "Identify",
    "NameResolver",
    "OwnListener",
    "ProxySettings",
    "SnapshotSource",
]

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The per-connection knobs, copied out of the config once (the hot path reads these)."""

    handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    drain_timeout: float = 30.0
    max_handshake_bytes: int = 8192

    @classmethod
    def from_config(cls, proxy: ProxyConfig) -> ProxySettings:
        return cls(
            handshake_timeout=proxy.handshake_timeout,
            connect_timeout=proxy.connect_timeout,
            idle_timeout=proxy.idle_timeout,
            drain_timeout=proxy.drain_timeout,
            max_handshake_bytes=proxy.max_handshake_bytes,
        )


class NameResolver(Protocol):
    """The resolver as drivers use it (:class:`egress.resolver.Resolver`)."""

    async def resolve(self, name: str) -> Resolution: ...

    def cached_names_for(self, address: IPAddress) -> tuple[str, ...]: ...


class Identify(Protocol):
    """The uid owning the client end of an accepted connection, bound to that connection
    (:class:`egress.net.identity.ConnectionOwners`). ``remote`` is the address the client
    socket is connected to, when it is not our listener's (transparent mode). ``None``: no
    local socket owns it. Raises ``OSError`` or ``ValueError`` when the kernel cannot say."""

    def __call__(self, transport: Any, *, remote: tuple[str, int] | None = None) -> int | None: ...


class Dial(Protocol):
    """Connect to the first of ``addresses`` that accepts, by ``deadline`` (loop time)
    (:func:`egress.net.dialer.dial`); raises :class:`egress.net.dialer.DialError`."""

    async def __call__(
        self, addresses: Sequence[IPAddress], port: int, *, deadline: float
    ) -> Dialled: ...


class SnapshotSource(Protocol):
    """Holds the rules snapshot new connections decide against."""

    @property
    def current(self) -> PolicySnapshot: ...


class OwnListener(Protocol):
    """Whether ``address:port`` is one of the proxy's own TCP listeners (a redirect loop)."""

    def __call__(self, address: IPAddress, port: int) -> bool: ...


class ConnectionContext:
    """Everything a connection driver needs, as narrow interfaces."""

    __slots__ = (
        "answered",
        "connlog",
        "dial",
        "identify",
        "is_own_listener",
        "limits",
        "loop",
        "metrics",
        "registry",
        "resolver",
        "rules",
        "settings",
    )

    def __init__(
        self,
        *,
        settings: ProxySettings,
        resolver: NameResolver,
        metrics: ProxyMetrics,
        connlog: ConnectionLog,
        identify: Identify,
        dial: Dial,
        rules: SnapshotSource,
        registry: ConnectionRegistry,
        is_own_listener: OwnListener,
        limits: ConnectionLimits | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        answered: AnsweredNames | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.metrics = metrics
        self.connlog = connlog
        self.identify = identify
        self.dial = dial
        self.rules = rules
        self.registry = registry
        self.is_own_listener = is_own_listener
        self.limits = limits
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.answered = answered

    def names_for(self, app: str) -> Callable[[IPAddress], tuple[str, ...]]:
        """Transparent mode: the names an address is known by to ``app``: those the resolver
        has cached for it (whoever asked), and those the DNS listener answered ``app`` with
        (kept per app, so another app's lookups cannot push them out)."""
        cached = self.resolver.cached_names_for
        answered = self.answered
        if answered is None:
            return cached

        def names(address: IPAddress) -> tuple[str, ...]:
            given = answered.names_for(app, address)
            found = cached(address)
            return tuple(dict.fromkeys((*given, *found))) if given else found

        return names

    async def resolve(self, name: str) -> Resolution:
        """Resolve through the current resolver, timing and counting the lookup."""
        metrics = self.metrics
        started = time.perf_counter()
        try:
            resolution = await self.resolver.resolve(name)
        except ResolveError as exc:
            metrics.dns_seconds.observe(time.perf_counter() - started)
            metrics.dns_lookup(str(exc.kind))
            raise
        metrics.dns_seconds.observe(time.perf_counter() - started)
        metrics.dns_lookup("cached" if resolution.from_cache else "ok")
        return resolution
