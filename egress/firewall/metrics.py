"""Firewall controller metrics, on a registry of their own (the controller is its own process).

Labels come from closed sets (result, family, table, backend) or configured app names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from egress.firewall.sync import SyncResult
from egress.metrics import register_process_metrics

__all__ = ["FirewallMetrics"]

_SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FirewallMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_process_metrics(r)
        self.sync_total = Counter(
            "egress_firewall_sync",
            "Reconcile passes by result (ok, error, config_error).",
            ["result"],
            registry=r,
        )
        self.sync_seconds = Histogram(
            "egress_firewall_sync_seconds",
            "Duration of a reconcile pass.",
            buckets=_SYNC_BUCKETS,
            registry=r,
        )
        self.drift_repairs = Counter(
            "egress_firewall_drift_repairs",
            "Rule changes that undid drift (edits to our chains made outside egress).",
            ["family", "table"],
            registry=r,
        )
        self.rules = Gauge(
            "egress_firewall_rules",
            "Rules of ours installed, by family and table.",
            ["family", "table"],
            registry=r,
        )
        self.blocked_packets = Gauge(
            "egress_firewall_blocked_packets",
            "Packets from an app's sandbox uids rejected by the firewall (bypass attempts),"
            " from the kernel counters; resets when the counting rule is rewritten.",
            ["app"],
            registry=r,
        )
        self.last_success = Gauge(
            "egress_firewall_last_sync_success_timestamp_seconds",
            "Unix time of the last pass that left the kernel matching the plan.",
            registry=r,
        )
        self.backend_info = Gauge(
            "egress_firewall_backend_info", "The backend in use (value 1).", ["backend"], registry=r
        )

    def record_success(self, result: SyncResult, now: float) -> None:
        self.sync_total.labels("ok").inc()
        self.sync_seconds.observe(result.seconds)
        for table in result.tables:
            if table.drift_repairs:
                self.drift_repairs.labels(table.family, table.table).inc(table.drift_repairs)
            self.rules.labels(table.family, table.table).set(table.rules)
        for app, packets in result.counters.items():
            self.blocked_packets.labels(app).set(packets)
        self.last_success.set(now)

    def record_error(self, result: str, seconds: float | None = None) -> None:
        self.sync_total.labels(result).inc()
        if seconds is not None:
            self.sync_seconds.observe(seconds)

    def set_backend(self, name: str) -> None:
        self.backend_info.clear()
        self.backend_info.labels(name).set(1)
