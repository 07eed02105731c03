"""In-memory buckets: the embedded default, the ``local`` fallback while Redis is away, and the
byte buckets of bandwidth shaping. The clock is injected (tests drive it; no sleeps).

Memory stays bounded whatever tenants do: a bucket whose TAT has passed is full, the same as no
bucket, so it has no entry; at ``max_buckets`` entries the least recently used tenth is dropped
(the table is kept in use order), which can only refill a bucket early: a bounded
over-admission, for buckets idle longest, and only while a table that large is being churned
(by many destinations, say). Dropping a tenth at a time keeps each pause short (about a
millisecond for 10,000 entries) and the cost per take constant on average.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from ratelimit.base import LimitResult
from ratelimit.gcra import MICROSECONDS, Rate, Taken, charge, take

__all__ = ["MemoryBuckets", "monotonic_us"]


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryBuckets:
    """Named buckets in a dict: ``key -> TAT`` in the clock's units."""

    name = "memory"

    __slots__ = ("_clock", "_tats", "_units", "max_buckets")

    def __init__(
        self,
        clock: Callable[[], int] = monotonic_us,
        *,
        units_per_second: int = MICROSECONDS,
        max_buckets: int = 100_000,
    ) -> None:
        self._clock = clock
        self._units = units_per_second
        self._tats: dict[str, int] = {}
        self.max_buckets = max_buckets

    def __len__(self) -> int:
        return len(self._tats)

    def take_now(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        """The synchronous take (no I/O); :meth:`take` is the same for the async interface."""
        now = self._clock()
        units = self._units
        taken = take(
            self._tats.get(key, now), now, rate.interval(units), rate.capacity(units), cost
        )
        return self._store(key, taken, now)

    async def take(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        return self.take_now(key, rate, cost)

    def charge(self, key: str, rate: Rate, cost: int) -> float:
        """Spend ``cost`` tokens already used; the seconds to pause so the rate holds."""
        now = self._clock()
        units = self._units
        taken = charge(
            self._tats.get(key, now), now, rate.interval(units), rate.capacity(units), cost
        )
        self._remember(key, taken.tat, now)
        return taken.wait / units

    def _store(self, key: str, taken: Taken, now: int) -> LimitResult:
        if taken.granted:
            self._remember(key, taken.tat, now)
            return LimitResult(True)
        tats = self._tats
        tat = tats.pop(key, None)
        if tat is not None:
            tats[key] = tat  # denied, but in use: last in the order of use
        wait = float("inf") if taken.wait < 0 else taken.wait / self._units
        return LimitResult(False, wait)

    def _remember(self, key: str, tat: int, now: int) -> None:
        tats = self._tats
        if tats.pop(key, None) is None and len(tats) >= self.max_buckets:
            self._drop_least_recent()
        if tat > now:  # a full bucket needs no entry
            tats[key] = tat  # (re)inserted last: the dict is in order of use

    def _drop_least_recent(self) -> None:
        tats = self._tats
        for key in list(itertools.islice(tats, max(1, self.max_buckets // 10))):
            del tats[key]

    async def ping(self) -> None:
        return None  # always here

    async def aclose(self) -> None:
        return None
