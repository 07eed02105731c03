"""Prometheus metrics for the proxy, on a registry the runtime owns (not the global one).

Label values come from closed sets (listener kind, decision, outcome, direction, DNS result) or
from the configured app names, never from destinations, so cardinality stays bounded.

The series updated for every connection (connections, tunnels, bytes, latencies) are kept as
plain Python numbers and turned into metric families only when Prometheus scrapes: a
prometheus_client child costs a lock and a few calls per update, about 50,000 instructions per
connection in all, a dict update a fraction of that. Everything is updated and scraped on the
event loop's thread, so no lock is needed. The rare series stay prometheus_client objects.
"""

from __future__ import annotations

import math
import platform
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator

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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from egress import __version__

# The app label for a client whose uid maps to no app. App names cannot start with "_".
UNKNOWN_APP = "_unknown"

# Rate limiter round trips to Redis: loopback is tens of microseconds, the deadline tens of ms.
_REDIS_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

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


class LoopGauge:
    """A gauge that is a plain number (see the module docstring)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class LoopHistogram:
    """A histogram that is a list of bucket counts and a sum (see the module docstring)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def samples(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets, and the sum."""
        buckets, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
        return buckets, self.total


class _HotPath(Collector):
    """Exports the plain-number series of a :class:`ProxyMetrics` at scrape time.

    Holds the metrics weakly: the metrics hold the registry, which holds this collector, and a
    cycle would outlive the proxy until a full collection.
    """

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterator[Metric]:
        m = self._metrics()
        if m is None:
            return
        connections = CounterMetricFamily(
            "egress_connections",
            "Client connections by app, listener, decision (allowed/reported/denied/error) and"
            " reason.",
            labels=["app", "listener", "decision", "reason"],
        )
        for key, count in m.connections.items():
            connections.add_metric(key, count)
        yield connections
        tunnels = GaugeMetricFamily(
            "egress_open_tunnels", "Tunnels currently relaying bytes.", labels=["app"]
        )
        for app, count in m.open_tunnels.items():
            tunnels.add_metric([app], count)
        yield tunnels
        yield GaugeMetricFamily(
            "egress_open_connections",
            "Client connections currently open, in any phase.",
            value=m.open_connections.value,
        )
        relayed = CounterMetricFamily(
            "egress_bytes",
            "Bytes relayed, by app and direction (up = client to upstream).",
            labels=["app", "direction"],
        )
        for pair, count in m.relayed_bytes.items():
            relayed.add_metric(pair, count)
        yield relayed
        handshakes = HistogramMetricFamily(
            "egress_handshake_seconds",
            "Time from accept to a complete proxy request.",
            labels=["listener"],
        )
        for listener, histogram in m.handshake_seconds.items():
            buckets, total = histogram.samples()
            handshakes.add_metric([listener], buckets, total)
        yield handshakes
        for name, text, histogram in (
            ("egress_dns_seconds", "Time to resolve a destination name (cache hits included).",
             m.dns_seconds),
            ("egress_upstream_connect_seconds", "Time to establish the upstream TCP connection.",
             m.connect_seconds),
            ("egress_dns_listener_query_seconds",
             "Time from a sandbox DNS query to its answer (lookups included).",
             m.dns_listener_seconds),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, text)
            buckets, total = histogram.samples()
            family.add_metric([], buckets, total)
            yield family
        lookups = CounterMetricFamily(
            "egress_dns_lookups",
            "Name resolutions by result: ok, cached, nxdomain, no_address, timeout, servfail,"
            " error.",
            labels=["result"],
        )
        for result, count in m.dns_lookups.items():
            lookups.add_metric([result], count)
        yield lookups
        queries = CounterMetricFamily(
            "egress_dns_listener_queries",
            "Sandbox DNS listener queries by app and answer: answered, nodata, denied (NXDOMAIN"
            " by policy), refused (unknown sender, malformed, over the in-flight cap), error.",
            labels=["app", "answer"],
        )
        for pair, count in m.dns_listener_queries.items():
            queries.add_metric(pair, count)
        yield queries
        yield from _ratelimit_families(m)


_LIMITER_MODES = ("memory", "redis", "local", "deny", "allow")


def _ratelimit_families(m: ProxyMetrics) -> Iterator[Metric]:
    decisions = CounterMetricFamily(
        "egress_ratelimit_decisions",
        "Rate-limit decisions by app, limit (connections, destination, concurrent) and result"
        " (allowed, limited, unavailable: denied because Redis is away and on_redis_error ="
        " deny).",
        labels=["app", "limit", "result"],
    )
    for key, count in m.ratelimit_decisions.items():
        decisions.add_metric(key, count)
    yield decisions
    latency = HistogramMetricFamily(
        "egress_ratelimit_redis_seconds",
        "Round trips of the rate limiter to Redis (one may carry a batch of checks).",
    )
    buckets, total = m.ratelimit_redis_seconds.samples()
    latency.add_metric([], buckets, total)
    yield latency
    errors = CounterMetricFamily(
        "egress_ratelimit_redis_errors",
        "Failed rate-limiter round trips to Redis by kind (timeout, connection, script, error).",
        labels=["kind"],
    )
    for kind, count in m.ratelimit_redis_errors.items():
        errors.add_metric([kind], count)
    yield errors
    mode = GaugeMetricFamily(
        "egress_ratelimit_mode",
        "1 for the rate limiter's mode in force: memory, redis, or while Redis is away the"
        " on_redis_error policy (local, deny, allow).",
        labels=["mode"],
    )
    for name in _LIMITER_MODES:
        mode.add_metric([name], 1.0 if m.ratelimit_mode == name else 0.0)
    yield mode
    yield GaugeMetricFamily(
        "egress_ratelimit_fallback_active",
        "1 while Redis is away and the on_redis_error policy decides, else 0.",
        value=1.0 if m.ratelimit_mode in ("local", "deny", "allow") else 0.0,
    )
    shaped = CounterMetricFamily(
        "egress_bandwidth_shaped_seconds",
        "Time reads were held to keep an app within bandwidth_bytes_per_second, by app and"
        " direction (summed over its tunnels).",
        labels=["app", "direction"],
    )
    for pair, seconds in m.shaped_seconds.items():
        shaped.add_metric(pair, seconds)
    yield shaped


class ProxyMetrics:
    """Every metric the proxy exports, with cheap accessors for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None, *, loop: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_process_metrics(r, loop=loop)
        # The hot path (see the module docstring): exported by _HotPath.
        self.connections: dict[tuple[str, str, str, str], int] = {}
        self.open_tunnels: dict[str, int] = {}
        self.open_connections = LoopGauge()
        self.relayed_bytes: dict[tuple[str, str], int] = {}
        self.handshake_seconds: dict[str, LoopHistogram] = {}
        self.dns_seconds = LoopHistogram(_LATENCY_BUCKETS)
        self.connect_seconds = LoopHistogram(_LATENCY_BUCKETS)
        self.dns_lookups: dict[str, int] = {}
        self.ratelimit_decisions: dict[tuple[str, str, str], int] = {}
        self.ratelimit_redis_seconds = LoopHistogram(_REDIS_BUCKETS)
        self.ratelimit_redis_errors: dict[str, int] = {}
        self.ratelimit_mode = "memory"
        self.shaped_seconds: dict[tuple[str, str], float] = {}
        self.dns_listener_queries: dict[tuple[str, str], int] = {}
        self.dns_listener_seconds = LoopHistogram(_LATENCY_BUCKETS)
        r.register(_HotPath(self))
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
        self.rules_apps = Gauge(
            "egress_rules_apps", "Apps in the rules snapshot in force.", registry=r
        )
        self.rules_propagation_seconds = Histogram(
            "egress_rules_propagation_seconds",
            "From a rule store commit (the store's clock) to its snapshot in force here.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.rules_revoked = Counter(
            "egress_rules_revoked_tunnels",
            "Open tunnels closed because an edit with revoke no longer allowed them.",
            registry=r,
        )
        self.rule_store_up = Gauge(
            "egress_rule_store_up",
            "1 when the shared rule store answered the last check, 0 when not (file: 1).",
            registry=r,
        )

    def connection(self, app: str, listener: str, decision: str, reason: str) -> None:
        key = (app, listener, decision, reason)  # StrEnum values are str: no conversion
        counts = self.connections
        counts[key] = counts.get(key, 0) + 1

    def tunnel_opened(self, app: str) -> None:
        tunnels = self.open_tunnels
        tunnels[app] = tunnels.get(app, 0) + 1

    def tunnel_closed(self, app: str, bytes_up: int, bytes_down: int) -> None:
        tunnels = self.open_tunnels
        tunnels[app] = tunnels.get(app, 0) - 1
        relayed = self.relayed_bytes
        if bytes_up:
            key = (app, "up")
            relayed[key] = relayed.get(key, 0) + bytes_up
        if bytes_down:
            key = (app, "down")
            relayed[key] = relayed.get(key, 0) + bytes_down

    def handshake(self, listener: str, seconds: float) -> None:
        histogram = self.handshake_seconds.get(listener)
        if histogram is None:
            histogram = self.handshake_seconds[listener] = LoopHistogram(_LATENCY_BUCKETS)
        histogram.observe(seconds)

    def ratelimit_decision(self, app: str, limit: str, result: str) -> None:
        key = (app, limit, result)
        counts = self.ratelimit_decisions
        counts[key] = counts.get(key, 0) + 1

    def ratelimit_redis_call(self, seconds: float, error: str | None) -> None:
        self.ratelimit_redis_seconds.observe(seconds)
        if error is not None:
            errors = self.ratelimit_redis_errors
            errors[error] = errors.get(error, 0) + 1

    def dns_listener_query(self, app: str, answer: str, seconds: float) -> None:
        key = (app, answer)
        counts = self.dns_listener_queries
        counts[key] = counts.get(key, 0) + 1
        self.dns_listener_seconds.observe(seconds)

    def dns_lookup(self, result: str) -> None:
        lookups = self.dns_lookups
        lookups[result] = lookups.get(result, 0) + 1

    def reload(self, *, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "error").inc()
        if ok:
            self.last_reload_success.set(time.time())

    def rules_update(self, *, ok: bool) -> None:
        self._rules_updates.labels("ok" if ok else "error").inc()

    def rules_propagated(self, seconds: float) -> None:
        self.rules_propagation_seconds.observe(seconds)

    def rules_installed(self, version: int, seconds: float, *, apps: int | None = None) -> None:
        if apps is not None:
            self.rules_apps.set(apps)
        self.rules_version.set(version)
        self.rules_compile_seconds.set(seconds)
        self.rules_last_update_success.set(time.time())
