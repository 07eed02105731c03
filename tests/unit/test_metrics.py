"""The hot-path metrics are plain numbers exported at scrape time: what Prometheus reads must be
exactly what prometheus_client's own objects would have said."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from egress.metrics import _LATENCY_BUCKETS, ProxyMetrics


def _series(registry: CollectorRegistry, prefixes: tuple[str, ...]) -> dict[str, float]:
    found = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_the_plain_number_series_match_prometheus_client() -> None:
    ours = ProxyMetrics()
    reference = CollectorRegistry()
    connections = Counter(
        "egress_connections", "x", ["app", "listener", "decision", "reason"], registry=reference
    )
    tunnels = Gauge("egress_open_tunnels", "x", ["app"], registry=reference)
    open_connections = Gauge("egress_open_connections", "x", registry=reference)
    relayed = Counter("egress_bytes", "x", ["app", "direction"], registry=reference)
    handshakes = Histogram(
        "egress_handshake_seconds", "x", ["listener"], buckets=_LATENCY_BUCKETS, registry=reference
    )
    connect = Histogram(
        "egress_upstream_connect_seconds", "x", buckets=_LATENCY_BUCKETS, registry=reference
    )
    lookups = Counter("egress_dns_lookups", "x", ["result"], registry=reference)
    rng = random.Random(7)
    for _ in range(2000):
        app = rng.choice(["blog", "shop", "_unknown"])
        listener = rng.choice(["socks5", "http"])
        decision, reason = rng.choice([("allowed", "allowed"), ("denied", "not_allowed")])
        seconds = rng.choice([0.0001, 0.00025, 10.0, 11.0]) if rng.random() < 0.2 else rng.random()
        ours.connection(app, listener, decision, reason)
        connections.labels(app, listener, decision, reason).inc()
        ours.handshake(listener, seconds)
        handshakes.labels(listener).observe(seconds)
        ours.connect_seconds.observe(seconds / 3)
        connect.observe(seconds / 3)
        ours.open_connections.inc()
        open_connections.inc()
        ours.tunnel_opened(app)
        tunnels.labels(app).inc()
        up, down = rng.randrange(0, 5000), rng.randrange(1, 5000)
        ours.tunnel_closed(app, up, down)
        tunnels.labels(app).dec()
        if up:
            relayed.labels(app, "up").inc(up)
        relayed.labels(app, "down").inc(down)
        result = rng.choice(["ok", "cached", "nxdomain"])
        ours.dns_lookup(result)
        lookups.labels(result).inc()
        if rng.random() < 0.5:
            ours.open_connections.dec()
            open_connections.dec()
    prefixes = (
        "egress_connections_total",
        "egress_open_tunnels",
        "egress_open_connections",
        "egress_bytes_total",
        "egress_handshake_seconds",
        "egress_upstream_connect_seconds",
        "egress_dns_lookups_total",
    )
    expected = _series(reference, prefixes)
    got = _series(ours.registry, prefixes)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert abs(got[name] - value) <= 1e-9 * max(1.0, abs(value)), name


def test_no_created_series_and_build_info() -> None:
    text = generate_latest(ProxyMetrics(loop="uvloop").registry).decode()
    assert "_created" not in text
    assert 'egress_build_info{loop="uvloop"' in text
    assert "process_open_fds" in text
