"""Local leases of tokens from the shared buckets, so most checks of a busy bucket need no
Redis round trip.

Batching (:mod:`ratelimit.redis`) makes concurrent checks cheap; a client that opens its
connections one after another gets no batch, and each check is a whole round trip through
redis-py (a few hundred microseconds of CPU). A lease fixes that: a node whose lease of a bucket
is empty takes several tokens from Redis in one script call (``take_up_to``) and hands them out
here, for at most ``lease_seconds``. Checks that arrive while that refill is in flight wait for
it. Tokens left when a lease ends are dropped, never given back.

**Bound on over-admission.** Every admitted connection's token was granted by the shared bucket,
at most ``lease_seconds`` before it was used. Over any window of ``w`` seconds an app gets at
most ``rate * (w + lease_seconds) + burst`` connections across all nodes: at most
``rate * lease_seconds`` more than without leases (5% of a second's worth at the default 50 ms).

**Bound on under-admission.** A lease grows with demand and no further: the first check of a
bucket takes one token (no lease at all); a lease used up before it ended is followed by one
twice its size, one that ended with tokens left by one the size of what was used (plus one),
and after a quiet spell the size starts again from one. So the tokens dropped at the end of a
lease are about what demand fell by meanwhile. The size never exceeds ``max_lease``,
``rate * lease_seconds`` or half the burst: a slow or small bucket (size 1) goes to Redis for
every check, exactly as without leases.

**Refusals are remembered.** When Redis answers that a bucket has no token for ``wait``
seconds, checks of that bucket on this node are refused here until then, with the remaining
wait: the bucket's TAT is past that moment for every node, so the answer is the one Redis would
give, and an app hammering over its limit costs no round trip per refused connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from ratelimit.base import ALLOWED, LimitResult
from ratelimit.gcra import Rate
from ratelimit.redis import RedisBuckets

__all__ = ["LeasedBuckets"]


@dataclass(slots=True)
class _Lease:
    rate: Rate
    size: int  # tokens asked for
    granted: int  # tokens Redis gave
    left: int  # not handed out yet
    until: float  # monotonic seconds


class LeasedBuckets:
    """A :class:`ratelimit.base.Buckets` that leases tokens from a :class:`RedisBuckets`."""

    name = "redis"

    def __init__(
        self,
        shared: RedisBuckets,
        *,
        lease_seconds: float = 0.05,
        max_lease: int = 64,
        max_leases: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = shared
        self.lease_seconds = lease_seconds
        self.max_lease = max_lease
        self.max_leases = max_leases
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._refills: dict[str, asyncio.Future[tuple[int, float]]] = {}
        self._empty: dict[str, tuple[Rate, float]] = {}  # key -> (rate, no token before)

    def largest(self, rate: Rate) -> int:
        """The largest lease of a bucket with ``rate``."""
        return max(
            1, min(self.max_lease, int(rate.per_second * self.lease_seconds), rate.burst // 2)
        )

    def _next_size(self, lease: _Lease | None, rate: Rate, now: float) -> int:
        largest = self.largest(rate)
        if lease is None or lease.rate != rate or now > lease.until + self.lease_seconds:
            return 1  # nothing known of the demand (or it went quiet): no lease yet
        used = lease.granted - lease.left
        grown = 2 * lease.size if lease.left == 0 else used + 1
        return max(1, min(largest, grown))

    def _from_lease(self, key: str, rate: Rate, now: float) -> bool:
        lease = self._leases.get(key)
        if lease is None or lease.left <= 0 or lease.rate != rate or lease.until <= now:
            return False
        lease.left -= 1
        return True

    async def take(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        now = self._clock()
        empty = self._empty.get(key)
        if empty is not None and empty[0] == rate and empty[1] > now:
            return LimitResult(False, empty[1] - now)  # Redis said so; nobody gets one sooner
        if cost != 1 or self.largest(rate) <= 1:
            return self._note(key, rate, await self._shared.take(key, rate, cost))
        if self._from_lease(key, rate, now):
            return ALLOWED
        refill = self._refills.get(key)
        if refill is None:  # this check asks for the next lease, and takes its first token
            refill = asyncio.ensure_future(self._refill(key, rate))
            refill.add_done_callback(_retrieved)
            self._refills[key] = refill
            granted, wait = await asyncio.shield(refill)  # cancelling us keeps it
            return ALLOWED if granted else self._note(key, rate, LimitResult(False, wait))
        await asyncio.wait([refill])  # a waiter's cancellation must not cancel the refill
        if refill.exception() is None:
            granted, wait = refill.result()
            if not granted:
                return LimitResult(False, wait)  # the bucket was empty a moment ago
            if self._from_lease(key, rate, self._clock()):
                return ALLOWED
        # the lease ran out (or failed): ask alone
        return self._note(key, rate, await self._shared.take(key, rate))

    def _note(self, key: str, rate: Rate, result: LimitResult) -> LimitResult:
        """Remember a refusal until the bucket's next token: until then the answer is the same
        for every node (the TAT is past it), so it is given here without asking Redis."""
        wait = result.retry_after_seconds
        if not result.allowed and 0 < wait < float("inf"):
            if len(self._empty) >= self.max_leases and key not in self._empty:
                self._empty.clear()
            self._empty[key] = (rate, self._clock() + wait)
        return result

    async def _refill(self, key: str, rate: Rate) -> tuple[int, float]:
        try:
            size = self._next_size(self._leases.get(key), rate, self._clock())
            granted, wait = await self._shared.take_up_to(key, rate, size)
            if len(self._leases) >= self.max_leases and key not in self._leases:
                self._leases.clear()  # bounded: forgetting leases only drops their tokens
            self._leases[key] = _Lease(
                rate, size, granted, max(0, granted - 1), self._clock() + self.lease_seconds
            )
            return granted, wait
        finally:
            self._refills.pop(key, None)

    async def ping(self) -> None:
        await self._shared.ping()

    def lease_size(self, key: str) -> int:
        """The size of ``key``'s current lease (0: none); for tests and debugging."""
        lease = self._leases.get(key)
        return 0 if lease is None else lease.size

    async def aclose(self) -> None:
        await self._shared.aclose()


def _retrieved(refill: asyncio.Future[tuple[int, float]]) -> None:
    """A refill whose first waiter was cancelled may fail with nobody left to look."""
    if not refill.cancelled():
        refill.exception()
