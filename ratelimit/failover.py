"""The limiter the proxy calls: a bucket backend, and what to do while it cannot answer.

With the memory backend there is nothing to fail. With Redis, every call is bounded by the
backend's deadline, and a :class:`ratelimit.breaker.CircuitBreaker` stops waiting on a Redis
that keeps failing. Meanwhile ``on_redis_error`` decides:

* ``local``: in-memory buckets on this node, at ``local_share`` of each app's global rate (with
  N nodes, a share of 1/N keeps the global rate; 1.0 lets every node admit the full rate);
* ``deny``: nothing limited gets through (``LimitResult.unavailable``);
* ``allow``: everything limited gets through, unlimited.

Recovery is automatic: the breaker probes, and the first answer from Redis puts it back in
force. :attr:`Limiter.mode` is what is in force now, for metrics and ``/readyz``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Final, TypeVar

from ratelimit.base import ALLOWED, Buckets, LimiterUnavailable, LimitResult
from ratelimit.breaker import CircuitBreaker
from ratelimit.gcra import Rate
from ratelimit.memory import MemoryBuckets

if TYPE_CHECKING:  # it imports redis; a memory-only proxy never loads it
    from ratelimit.tunnels import RedisTunnelCounts

__all__ = ["FailurePolicy", "Limiter", "Mode"]


class FailurePolicy(StrEnum):
    LOCAL = "local"
    DENY = "deny"
    ALLOW = "allow"


class Mode(StrEnum):
    """What decides now: the one backend, or the failure policy."""

    MEMORY = "memory"  # the memory backend (nothing shared, nothing to fail)
    REDIS = "redis"  # Redis answers
    LOCAL = "local"  # Redis is away: local buckets
    DENY = "deny"  # Redis is away: denied
    ALLOW = "allow"  # Redis is away: let through


_FALLBACK_MODE: Final = {
    FailurePolicy.LOCAL: Mode.LOCAL,
    FailurePolicy.DENY: Mode.DENY,
    FailurePolicy.ALLOW: Mode.ALLOW,
}
T = TypeVar("T")
_NO_SLOT: Final = LimitResult(False)


class Limiter:
    """Takes tokens from shared buckets; never raises for a backend failure."""

    __slots__ = (
        "_breaker",
        "_last_incident",
        "_local",
        "_local_rates",
        "_shared",
        "_tunnels",
        "last_error",
        "local_share",
        "mode",
        "on_mode",
        "policy",
    )

    def __init__(
        self,
        shared: Buckets | None,
        local: MemoryBuckets,
        *,
        policy: FailurePolicy = FailurePolicy.LOCAL,
        local_share: float = 1.0,
        breaker: CircuitBreaker | None = None,
        on_mode: Callable[[Mode], None] | None = None,
        tunnels: RedisTunnelCounts | None = None,
    ) -> None:
        if not 0 < local_share <= 1:
            raise ValueError(f"local_share must be in (0, 1], not {local_share!r}")
        self._shared = shared
        self._tunnels = tunnels  # max_concurrent across nodes (concurrency = "global")
        self._local = local
        self.policy = policy
        self.local_share = local_share
        self._breaker = breaker if breaker is not None else CircuitBreaker()
        self.on_mode = on_mode  # told of every change of mode
        self._last_incident = 0
        self.last_error: LimiterUnavailable | None = None  # why the shared backend last failed
        self._local_rates: dict[tuple[Rate, float], Rate] = {}
        self.mode = Mode.MEMORY if shared is None else Mode.REDIS

    @property
    def shared(self) -> bool:
        """Whether the buckets are shared between nodes (Redis)."""
        return self._shared is not None

    async def take(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        shared = self._shared
        if shared is None:
            return self._local.take_now(key, rate, cost)
        result = await self._ask(lambda: shared.take(key, rate, cost))
        return result if result is not None else self._fallback(key, rate, cost)

    @property
    def counts_tunnels(self) -> bool:
        """Whether ``max_concurrent`` is counted across nodes."""
        return self._tunnels is not None

    @property
    def tunnel_counts(self) -> RedisTunnelCounts | None:
        return self._tunnels

    async def admit_tunnel(self, app: str, mine: int, cap: int) -> tuple[LimitResult, int]:
        """With tunnels counted across nodes: may this node hold ``mine`` tunnels of ``app``
        (the new one included) under ``cap`` in all? Also the total seen. While Redis is away
        the policy applies: ``local`` caps this node at ``local_share`` of ``cap``."""
        tunnels = self._tunnels
        assert tunnels is not None
        answer = await self._ask(lambda: tunnels.admit(app, mine, cap))
        if answer is not None:
            admitted, total = answer
            return (ALLOWED if admitted else _NO_SLOT), total
        mode = self._fallback_mode()
        if mode is Mode.LOCAL:
            local_cap = max(1, math.floor(cap * self.local_share))
            return (ALLOWED if mine <= local_cap else _NO_SLOT), mine
        if mode is Mode.ALLOW:
            return ALLOWED, mine
        return LimitResult(False, max(1.0, self._breaker.retry_in()), unavailable=True), mine

    async def set_tunnels(self, app: str, mine: int) -> None:
        """Write this node's tunnel count for ``app`` (after a close, and as a refresh); a
        failure is left to the next write to repair."""
        tunnels = self._tunnels
        if tunnels is not None:
            await self._ask(lambda: tunnels.set(app, mine))

    async def probe(self) -> None:
        """Ask the shared backend whether it is there, as a check would (the breaker decides
        whether to ask now): an outage shows, and a recovery is found, without traffic."""
        shared = self._shared
        if shared is None:
            return

        async def ping() -> bool:
            await shared.ping()
            return True

        if await self._ask(ping) is None:
            self._fallback_mode()

    def set_policy(self, policy: FailurePolicy) -> None:
        """A reload changed ``on_redis_error``: while Redis is away the new one is in force
        (and shown) at once."""
        self.policy = policy
        if self.mode not in (Mode.MEMORY, Mode.REDIS):
            self._fallback_mode()

    async def _ask(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()``'s answer from the shared backend, or ``None`` when there is none: the
        breaker says not to ask now, or the call failed (counted). A call that ends without
        an answer either way (cancelled) gives the breaker's probe back."""
        breaker = self._breaker
        if not breaker.allow():
            return None
        try:
            answer = await call()
        except LimiterUnavailable as error:
            self._failed(error)
            return None
        except BaseException:
            breaker.abandoned()
            raise
        breaker.succeeded()
        if self.mode is not Mode.REDIS:
            self._set_mode(Mode.REDIS)
        return answer

    def _failed(self, error: LimiterUnavailable) -> None:
        """Count a failure once per failed round trip: every check that shared one carries the
        same ``incident``, so one reset connection under load is one failure, not many."""
        if error.incident == 0 or error.incident != self._last_incident:
            self._breaker.failed()
        self._last_incident = error.incident
        self.last_error = error

    def _fallback_mode(self) -> Mode:
        mode = _FALLBACK_MODE[self.policy]
        if self.mode is not mode:
            self._set_mode(mode)
        return mode

    def _fallback(self, key: str, rate: Rate, cost: int) -> LimitResult:
        mode = self._fallback_mode()
        if mode is Mode.LOCAL:
            return self._local.take_now(key, self._local_rate(rate), cost)
        if mode is Mode.ALLOW:
            return ALLOWED
        return LimitResult(False, max(1.0, self._breaker.retry_in()), unavailable=True)

    def _local_rate(self, rate: Rate) -> Rate:
        share = self.local_share
        if share == 1.0:
            return rate
        local = self._local_rates.get((rate, share))
        if local is None:
            if len(self._local_rates) > 10_000:
                self._local_rates.clear()
            local = Rate(rate.per_second * share, max(1, math.ceil(rate.burst * share)))
            self._local_rates[rate, share] = local
        return local

    def _set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if self.on_mode is not None:
            self.on_mode(mode)

    async def aclose(self) -> None:
        if self._shared is not None:
            await self._shared.aclose()
