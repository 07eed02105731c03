"""Prometheus metrics for the proxy, on a registry the runtime owns (not the global one).

Label values come from closed sets (listener kind, decision, outcome, direction, DNS result) or
from the configured app names, never from destinations, so cardinality stays bounded. Labelled
children are cached in dicts because ``Counter.labels()`` is measurably slow on the
per-connection path.
"""

from __future__ import annotations

import platform
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from egress import __version__

# The app label for a client whose uid maps to no app. App names cannot start with "_".
UNKNOWN_APP = "_unknown"

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def register_process_metrics(registry: CollectorRegistry, *, loop: str = "") -> None:
    """The standard ``process_*`` and ``python_info`` series, and ``egress_build_info``.

    Also turns off the ``*_created`` series, which double every counter's series for a timestamp
    nobody graphs (the switch is process-wide in prometheus_client; egress owns its processes).
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("egress_build", "The running egress build.", registry=registry).info(
        {"version": __version__, "python": platform.python_version(), "loop": loop}
    )


class ProxyMetrics:
    """Every metric the proxy exports, with cheap accessors for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None, *, loop: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_process_metrics(r, loop=loop)
        self._connections = Counter(
            "egress_connections",
            "Client connections by app, listener, decision (allowed/denied/reported) and reason.",
            ["app", "listener", "decision", "reason"],
            registry=r,
        )
        self._open_tunnels = Gauge(
            "egress_open_tunnels", "Tunnels currently relaying bytes.", ["app"], registry=r
        )
        self.open_connections = Gauge(
            "egress_open_connections",
            "Client connections currently open, in any phase.",
            registry=r,
        )
        self._bytes = Counter(
            "egress_bytes",
            "Bytes relayed, by app and direction (up = client to upstream).",
            ["app", "direction"],
            registry=r,
        )
        self._handshake_seconds = Histogram(
            "egress_handshake_seconds",
            "Time from accept to a complete proxy request.",
            ["listener"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dns_seconds = Histogram(
            "egress_dns_seconds",
            "Time to resolve a destination name (cache hits included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connect_seconds = Histogram(
            "egress_upstream_connect_seconds",
            "Time to establish the upstream TCP connection.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._dns_lookups = Counter(
            "egress_dns_lookups",
            "Name resolutions by result: ok, cached, nxdomain, no_address, timeout, servfail,"
            " error.",
            ["result"],
            registry=r,
        )
        self._reloads = Counter(
            "egress_config_reloads",
            "Config file reloads (SIGHUP) by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.last_reload_success = Gauge(
            "egress_config_last_reload_success_timestamp_seconds",
            "Unix time the config file was last read successfully (start or SIGHUP).",
            registry=r,
        )
        self.connections_refused_over_limit = Counter(
            "egress_connections_over_limit",
            "Connections closed at accept because [proxy].max_connections was reached.",
            registry=r,
        )
        self.connection_log_dropped = Counter(
            "egress_connection_log_dropped_lines",
            "Connection log lines dropped because the log could not keep up or failed.",
            registry=r,
        )
        self._rules_updates = Counter(
            "egress_rules_updates",
            "Rule set updates by result: ok (installed) or error (kept the previous rules).",
            ["result"],
            registry=r,
        )
        self.rules_version = Gauge(
            "egress_rules_version", "Version of the rules snapshot in force.", registry=r
        )
        self.rules_compile_seconds = Gauge(
            "egress_rules_compile_seconds",
            "Time the last installed rules snapshot took to compile (event loop yielding).",
            registry=r,
        )
        self.rules_last_update_success = Gauge(
            "egress_rules_last_update_success_timestamp_seconds",
            "Unix time the rules snapshot in force was installed.",
            registry=r,
        )
        self._children: dict[tuple[str, ...], object] = {}

    def connection(self, app: str, listener: str, decision: str, reason: str) -> None:
        key = ("c", app, listener, decision, reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._connections.labels(app, listener, decision, reason)
        child.inc()  # type: ignore[attr-defined]

    def tunnel_opened(self, app: str) -> None:
        self._gauge_child(app).inc()

    def tunnel_closed(self, app: str, bytes_up: int, bytes_down: int) -> None:
        self._gauge_child(app).dec()
        if bytes_up:
            self._bytes_child(app, "up").inc(bytes_up)
        if bytes_down:
            self._bytes_child(app, "down").inc(bytes_down)

    def handshake(self, listener: str, seconds: float) -> None:
        key = ("h", listener)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._handshake_seconds.labels(listener)
        child.observe(seconds)  # type: ignore[attr-defined]

    def dns_lookup(self, result: str) -> None:
        key = ("d", result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._dns_lookups.labels(result)
        child.inc()  # type: ignore[attr-defined]

    def reload(self, *, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "error").inc()
        if ok:
            self.last_reload_success.set(time.time())

    def rules_update(self, *, ok: bool) -> None:
        self._rules_updates.labels("ok" if ok else "error").inc()

    def rules_installed(self, version: int, seconds: float) -> None:
        self.rules_version.set(version)
        self.rules_compile_seconds.set(seconds)
        self.rules_last_update_success.set(time.time())

    def _gauge_child(self, app: str) -> Gauge:
        key = ("t", app)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._open_tunnels.labels(app)
        return child  # type: ignore[return-value]

    def _bytes_child(self, app: str, direction: str) -> Counter:
        key = ("b", app, direction)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._bytes.labels(app, direction)
        return child  # type: ignore[return-value]
