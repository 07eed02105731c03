"""The proxy's side of rate limiting: which limits an app has, and checking them per connection.

An app's effective limits are its own ``limits`` over ``[ratelimit.defaults]``, worked out once
per (limits, defaults) pair and turned into :class:`ratelimit.gcra.Rate` values. A connection
whose request the rules allow is then admitted in this order, cheapest first, so a refusal
costs as little as possible:

1. ``max_concurrent``: a tunnel slot of the app on this node (the registry holds it from here
   until the connection closes, dialing included), and with ``concurrency = "global"`` a place
   under the cap over every node (:class:`TunnelsAcrossNodes`); else ``too_many_connections``;
2. ``connections_per_second`` / ``burst``: a token from the app's bucket, shared by every
   listener (SOCKS5 on TCP and Unix, HTTP, transparent) and, with ``backend = "redis"``, by
   every node;
3. ``destination_connections_per_second`` / ``destination_burst``: a token from the bucket of
   the app and the destination (host and port, an address in its canonical form).

A refusal at step 3 has spent the step-2 token: the app did try to connect. The connection
bounds the whole admission by its connect deadline (``egress.net.connection``).

An app without limits costs nothing here: :meth:`ConnectionLimits.for_app` returns ``None`` and
the connection never awaits the limiter.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from egress.config import Concurrency, RatelimitBackend, RatelimitConfig
from egress.metrics import ProxyMetrics
from egress.net.registry import ConnectionRegistry, Tracked
from egress.outcomes import Outcome
from egress.policy import Refusal
from egress.shaping import BandwidthShaper, bandwidth_rate
from ratelimit.base import LimitResult
from ratelimit.breaker import CircuitBreaker
from ratelimit.failover import FailurePolicy, Limiter, Mode
from ratelimit.gcra import MICROSECONDS, Rate, take
from ratelimit.memory import MemoryBuckets
from rules.apps import App, Limits

log = logging.getLogger("egress.limits")

PROBE_INTERVAL_S = 1.0
BREAKER_MAX_OPEN_S = 2.0  # how long a Redis that came back may go untried, at most

__all__ = ["AppLimits", "ConnectionLimits", "build_connection_limits", "effective_limits"]


@dataclass(frozen=True, slots=True)
class AppLimits:
    """An app's limits, ready to check (``None``: not limited that way)."""

    connections: Rate | None = None
    destination: Rate | None = None
    max_concurrent: int | None = None
    bandwidth: Rate | None = None  # bytes; each direction on its own


def effective_limits(limits: Limits | None, defaults: Limits | None = None) -> AppLimits | None:
    """The limits to enforce for an app, or ``None`` when it has none at all."""
    merged = (limits or Limits()).over(defaults)
    connections = destination = bandwidth = None
    if merged.connections_per_second is not None:
        rate = merged.connections_per_second
        connections = Rate(rate, merged.burst or max(1, math.ceil(rate)))
    if merged.destination_connections_per_second is not None:
        rate = merged.destination_connections_per_second
        destination = Rate(rate, merged.destination_burst or max(1, math.ceil(rate)))
    if merged.bandwidth_bytes_per_second is not None:
        bandwidth = bandwidth_rate(merged.bandwidth_bytes_per_second, merged.bandwidth_burst_bytes)
    unlimited = connections is None and destination is None and bandwidth is None
    if unlimited and merged.max_concurrent is None:
        return None
    return AppLimits(connections, destination, merged.max_concurrent, bandwidth)


class ConnectionLimits:
    """Checks an app's limits for one connection; see the module docstring for the order."""

    __slots__ = ("_defaults", "_effective", "across_nodes", "limiter", "metrics", "shaper")

    def __init__(
        self,
        limiter: Limiter,
        metrics: ProxyMetrics,
        *,
        defaults: Limits | None = None,
        shaper: BandwidthShaper | None = None,
        registry: ConnectionRegistry | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.across_nodes: TunnelsAcrossNodes | None = None
        if limiter.counts_tunnels:
            assert registry is not None, "tunnels counted across nodes need the registry"
            self.across_nodes = TunnelsAcrossNodes(limiter, registry)
        self.shaper = shaper if shaper is not None else BandwidthShaper()
        metrics.shaped_seconds = self.shaper.shaped_seconds
        self._defaults = defaults
        self._effective: dict[Limits | None, AppLimits | None] = {}
        metrics.ratelimit_mode = limiter.mode
        limiter.on_mode = self.mode_changed

    @property
    def defaults(self) -> Limits | None:
        return self._defaults

    @defaults.setter
    def defaults(self, defaults: Limits | None) -> None:
        """A reload changed ``[ratelimit.defaults]``: work every app's limits out again."""
        if defaults != self._defaults:
            self._defaults = defaults
            self._effective = {}

    def reconfigure(self, config: RatelimitConfig) -> None:
        """A reload: the keys that apply live (``defaults``, ``on_redis_error``,
        ``local_share``); the others need a restart (the runtime says so)."""
        self.defaults = config.defaults
        self.limiter.set_policy(FailurePolicy(config.on_redis_error.value))
        self.limiter.local_share = config.local_share

    def for_app(self, app: App) -> AppLimits | None:
        """The app's effective limits (memoised: apps with equal limits share one entry)."""
        key = app.limits
        try:
            return self._effective[key]
        except KeyError:
            if len(self._effective) > 10_000:
                self._effective.clear()
            found = self._effective[key] = effective_limits(key, self._defaults)
            return found

    def mode_changed(self, mode: Mode) -> None:
        """The limiter's mode changed: metrics, and one log line per change (not per call)."""
        self.metrics.ratelimit_mode = mode
        if mode is Mode.REDIS:
            log.warning("rate limiter: Redis answers again; shared limits in force")
        else:
            error = self.limiter.last_error
            log.error(
                "rate limiter: Redis is unreachable; on_redis_error applies",
                extra={"mode": mode.value, "error": str(error) if error else None},
            )

    def describe_mode(self) -> str:
        """The mode in force, for ``/readyz``: ``redis``, or the fallback and why."""
        mode = self.limiter.mode
        if mode in (Mode.MEMORY, Mode.REDIS):
            return mode.value
        return f"{mode.value} (Redis unreachable: {self.limiter.last_error})"

    async def admit(
        self,
        connection: Tracked,
        slots: ConnectionRegistry,
        app: str,
        limits: AppLimits,
        destination: str,
    ) -> Refusal | None:
        """Check ``limits`` for a connection of ``app`` to ``destination`` ("host:port")."""
        metrics = self.metrics
        cap = limits.max_concurrent
        if cap is not None:
            held = slots.take_tunnel_slot(connection, app, cap)
            if held is not None:
                metrics.ratelimit_decision(app, "concurrent", "limited")
                return Refusal(
                    Outcome.TOO_MANY_CONNECTIONS,
                    f"{held} tunnels open on this node; max_concurrent is {cap}",
                )
            if self.across_nodes is not None:
                refusal = await self.across_nodes.admit(connection, app, cap)
                if refusal is not None:
                    metrics.ratelimit_decision(
                        app, "concurrent", "unavailable" if refusal.retry_after else "limited"
                    )
                    return refusal
            metrics.ratelimit_decision(app, "concurrent", "allowed")
        if limits.connections is not None:
            refusal = await self._take(f"{app}/conn", limits.connections, app, "connections")
            if refusal is not None:
                return refusal
        if limits.destination is not None:
            return await self._take(
                f"{app}/dest/{destination}", limits.destination, app, "destination"
            )
        return None

    async def _take(self, key: str, rate: Rate, app: str, limit: str) -> Refusal | None:
        result = await self.limiter.take(key, rate)
        if result.allowed:
            self.metrics.ratelimit_decision(app, limit, "allowed")
            return None
        return self._refusal(result, app, limit, rate)

    async def watch(self) -> None:
        """Ask a shared backend every second whether it is there (runs until cancelled), so
        metrics and ``/readyz`` show an outage, and its end, without waiting for traffic."""
        if not self.limiter.shared:
            return
        while True:
            try:
                await self.limiter.probe()
            except Exception:  # a bug: keep probing, never take the proxy's background down
                log.exception("rate limiter probe failed")
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def aclose(self) -> None:
        self.limiter.on_mode = None  # a cycle through self, frozen at start: break it
        if self.across_nodes is not None:
            await self.across_nodes.aclose()
        await self.limiter.aclose()

    def _refusal(self, result: LimitResult, app: str, limit: str, rate: Rate) -> Refusal:
        retry = result.retry_after_seconds
        if result.unavailable:
            self.metrics.ratelimit_decision(app, limit, "unavailable")
            return _unavailable(retry)
        self.metrics.ratelimit_decision(app, limit, "limited")
        noun = "connection" if rate.per_second == 1 else "connections"
        what = noun if limit == "connections" else f"{noun} to this destination"
        return Refusal(
            Outcome.RATE_LIMITED,
            f"over {rate.per_second:g} {what} per second (burst {rate.burst});"
            f" retry in {retry:.3g} s",
            retry,
        )


class TunnelsAcrossNodes:
    """``max_concurrent`` counted over every node (``concurrency = "global"``): this node's
    count of each app's tunnels, kept in Redis in step with the registry's slots
    (:mod:`ratelimit.tunnels`).

    Writes for one app are made one at a time, each with the count as it is when it is sent, so
    a later count never lands before an earlier one. A close writes the new count soon after
    (closes that come together share one write), and every count is written again every
    ``ttl / 3`` seconds, which repairs anything a Redis outage lost.
    """

    def __init__(self, limiter: Limiter, registry: ConnectionRegistry) -> None:
        self._limiter = limiter
        self._registry = registry
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        registry.on_slot_released = self._released

    def _lock(self, app: str) -> asyncio.Lock:
        lock = self._locks.get(app)
        if lock is None:
            lock = self._locks[app] = asyncio.Lock()
        return lock

    async def admit(self, connection: Tracked, app: str, cap: int) -> Refusal | None:
        """The connection holds one of this node's slots: does it fit across nodes? If not,
        the slot is given back."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh(), name="egress tunnel counts"
            )
        async with self._lock(app):
            mine = self._registry.tunnel_slots(app)
            result, total = await self._limiter.admit_tunnel(app, mine, cap)
        if result.allowed:
            return None
        self._registry.give_back_tunnel_slot(connection)
        if result.unavailable:
            return _unavailable(result.retry_after_seconds)
        return Refusal(
            Outcome.TOO_MANY_CONNECTIONS,
            f"{total} tunnels open across nodes; max_concurrent is {cap}",
        )

    def _released(self, app: str) -> None:
        if app in self._dirty:
            return  # a write is already on its way; it will send the count as it is then
        self._dirty.add(app)
        task = asyncio.get_running_loop().create_task(self._write(app))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, app: str) -> None:
        async with self._lock(app):
            self._dirty.discard(app)
            await self._limiter.set_tunnels(app, self._registry.tunnel_slots(app))

    async def _refresh(self) -> None:
        tunnels = self._limiter.tunnel_counts
        assert tunnels is not None
        while True:
            await asyncio.sleep(tunnels.ttl / 3)
            for app, count in self._registry.slots_held().items():
                async with self._lock(app):
                    await self._limiter.set_tunnels(app, count)

    async def aclose(self) -> None:
        self._registry.on_slot_released = None  # (a cycle, as above)
        tasks = [*self._tasks, *([self._refresher] if self._refresher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _unavailable(retry: float) -> Refusal:
    """The refusal of on_redis_error = "deny" while Redis is away."""
    return Refusal(
        Outcome.LIMITER_UNAVAILABLE,
        f'Redis is unreachable and ratelimit.on_redis_error = "deny"; retry in {retry:.3g} s',
        retry,
    )


def build_connection_limits(
    config: RatelimitConfig,
    redis_url: str,
    metrics: ProxyMetrics,
    registry: ConnectionRegistry,
) -> ConnectionLimits:
    """The limits of a proxy configured by ``[ratelimit]`` (and ``[redis].url`` for Redis).
    Nothing connects yet: the Redis client connects on the first check. The client retries a
    command once, after a pause of a tenth of the deadline, when its connection failed: after a
    Redis restart every pooled connection is dead, and without the retry each node's first
    check would count as Redis being down."""
    local = MemoryBuckets()
    shared = tunnels = None
    if config.backend is RatelimitBackend.REDIS:
        from egress.redisclient import make_client  # noqa: PLC0415  (redis only when used)
        from ratelimit.lease import LeasedBuckets  # noqa: PLC0415
        from ratelimit.redis import RedisBuckets  # noqa: PLC0415
        from ratelimit.tunnels import RedisTunnelCounts  # noqa: PLC0415

        client = make_client(redis_url, timeout=config.redis_timeout, retries=1)
        shared = LeasedBuckets(
            RedisBuckets(
                client,
                prefix=config.redis_prefix,
                timeout=config.redis_timeout,
                observe=metrics.ratelimit_redis_call,
            )
        )
        if config.concurrency is Concurrency.GLOBAL:
            tunnels = RedisTunnelCounts(
                client,
                node=node_id(),
                prefix=config.redis_prefix,
                timeout=config.redis_timeout,
                ttl=config.tunnel_ttl,
                observe=metrics.ratelimit_redis_call,
            )
    limiter = Limiter(
        shared,
        local,
        policy=FailurePolicy(config.on_redis_error.value),
        local_share=config.local_share,
        breaker=CircuitBreaker(
            failures_to_open=config.breaker_failures,
            open_for=config.breaker_open,
            max_open_for=max(BREAKER_MAX_OPEN_S, config.breaker_open),
        ),
        tunnels=tunnels,
    )
    return ConnectionLimits(limiter, metrics, defaults=config.defaults, registry=registry)


def node_id() -> str:
    """This process among the nodes: host, pid and a random part (a restarted proxy is a new
    node; the old one's counts expire)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class KeyedRate:
    """One node-local GCRA bucket per key (an app name): the sandbox DNS listener's query rate.
    A dict of integers, one per app that asked; an app's entry is its theoretical arrival time,
    so an idle app costs one int and nothing ever needs refilling."""

    __slots__ = ("_capacity", "_clock", "_interval", "_tats")

    def __init__(
        self, per_second: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        rate = Rate(per_second, burst)
        self._interval = rate.interval(MICROSECONDS)
        self._capacity = rate.capacity(MICROSECONDS)
        self._tats: dict[str, int] = {}
        self._clock = clock

    def take(self, key: str) -> bool:
        """One token for ``key`` now, or False (over its rate)."""
        now = int(self._clock() * MICROSECONDS)
        taken = take(self._tats.get(key, now), now, self._interval, self._capacity)
        if not taken.granted:
            return False
        self._tats[key] = taken.tat
        return True
