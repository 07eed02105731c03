"""The proxy's side of rate limiting: which limits an app has, and checking them per connection.

An app's effective limits are its own ``limits`` over ``[ratelimit.defaults]``, worked out once
per (limits, defaults) pair and turned into :class:`ratelimit.gcra.Rate` values. A connection
whose request the rules allow is then admitted in this order, cheapest first, so a refusal
costs as little as possible:

1. ``max_concurrent``: a tunnel slot of the app on this node (the registry holds it from here
   until the connection closes, dialing included), else ``too_many_connections``;
2. ``connections_per_second`` / ``burst``: a token from the app's bucket, shared by every
   listener (SOCKS5, HTTP, transparent) and, with ``backend = "redis"``, by every node;
3. ``destination_connections_per_second`` / ``destination_burst``: a token from the bucket of
   the app and the destination as asked for (host and port).

A refusal at step 3 has spent the step-2 token: the app did try to connect.

An app without limits costs nothing here: :meth:`ConnectionLimits.for_app` returns ``None`` and
the connection never awaits the limiter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

from egress.config import RatelimitBackend, RatelimitConfig
from egress.metrics import ProxyMetrics
from egress.net.registry import ConnectionRegistry, Tracked
from egress.outcomes import Outcome
from egress.policy import Refusal
from egress.shaping import BandwidthShaper, bandwidth_rate
from ratelimit.base import LimitResult
from ratelimit.breaker import CircuitBreaker
from ratelimit.failover import FailurePolicy, Limiter, Mode
from ratelimit.gcra import Rate
from ratelimit.memory import MemoryBuckets
from rules.apps import App, Limits

log = logging.getLogger("egress.limits")

__all__ = ["AppLimits", "ConnectionLimits", "build_connection_limits", "effective_limits"]


@dataclass(frozen=True, slots=True)
class AppLimits:
    """An app's limits, ready to check (``None``: not limited that way)."""

    connections: Rate | None = None
    destination: Rate | None = None
    max_concurrent: int | None = None
    bandwidth: Rate | None = None  # bytes; each direction on its own


def _merged(limits: Limits | None, defaults: Limits | None) -> Limits:
    if defaults is None:
        return limits if limits is not None else Limits()
    if limits is None:
        return defaults
    values = {}
    for field in fields(Limits):
        own = getattr(limits, field.name)
        values[field.name] = own if own is not None else getattr(defaults, field.name)
    return Limits(**values)


def effective_limits(limits: Limits | None, defaults: Limits | None = None) -> AppLimits | None:
    """The limits to enforce for an app, or ``None`` when it has none at all."""
    merged = _merged(limits, defaults)
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

    __slots__ = ("_defaults", "_effective", "limiter", "metrics", "shaper")

    def __init__(
        self,
        limiter: Limiter,
        metrics: ProxyMetrics,
        *,
        defaults: Limits | None = None,
        shaper: BandwidthShaper | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
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
        self.limiter.policy = FailurePolicy(config.on_redis_error.value)
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

    def _refusal(self, result: LimitResult, app: str, limit: str, rate: Rate) -> Refusal:
        retry = result.retry_after_seconds
        if result.unavailable:
            self.metrics.ratelimit_decision(app, limit, "unavailable")
            return Refusal(
                Outcome.LIMITER_UNAVAILABLE,
                'Redis is unreachable and ratelimit.on_redis_error = "deny";'
                f" retry in {retry:.3g} s",
                retry,
            )
        self.metrics.ratelimit_decision(app, limit, "limited")
        what = "connections" if limit == "connections" else "connections to this destination"
        return Refusal(
            Outcome.RATE_LIMITED,
            f"over {rate.per_second:g} {what} per second (burst {rate.burst});"
            f" retry in {retry:.3g} s",
            retry,
        )


def build_connection_limits(
    config: RatelimitConfig, redis_url: str, metrics: ProxyMetrics
) -> ConnectionLimits:
    """The limits of a proxy configured by ``[ratelimit]`` (and ``[redis].url`` for Redis).
    Nothing connects yet: the Redis client connects on the first check. The client does not
    retry a failed command: within a deadline of tens of milliseconds a retry's backoff only
    delays the fallback, and the breaker's probe is the retry."""
    local = MemoryBuckets()
    shared = None
    if config.backend is RatelimitBackend.REDIS:
        from egress.redisclient import make_client  # noqa: PLC0415  (redis only when used)
        from ratelimit.redis import RedisBuckets  # noqa: PLC0415

        shared = RedisBuckets(
            make_client(redis_url, timeout=config.redis_timeout, retries=0),
            prefix=config.redis_prefix,
            timeout=config.redis_timeout,
            observe=metrics.ratelimit_redis_call,
        )
    limiter = Limiter(
        shared,
        local,
        policy=FailurePolicy(config.on_redis_error.value),
        local_share=config.local_share,
        breaker=CircuitBreaker(
            failures_to_open=config.breaker_failures, open_for=config.breaker_open
        ),
    )
    return ConnectionLimits(limiter, metrics, defaults=config.defaults)
