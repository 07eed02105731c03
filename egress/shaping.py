"""Bandwidth shaping: byte buckets per app and direction, shared by all of the app's tunnels.

A tunnel does not ask before it reads; it reads, relays, and then *charges* the bytes to its
app's bucket (:meth:`ratelimit.memory.MemoryBuckets.charge`, the debt form of GCRA). The answer
is how long to stop reading so the average stays at the rate. Nothing is ever dropped or
refused: an app over its rate just sees its reads held, and the kernel's flow control pushes
back on the peer. One bucket per app and direction (``"<app>/up"``, ``"<app>/down"``) means all
of an app's tunnels on this node share the rate, however many it opens.

Time is kept in picoseconds, not the nanoseconds of the clock: a rate becomes a whole number
of time units per byte, and in nanoseconds that rounding is already 5% at 100 MB/s (10 ns a
byte, give or take half) and caps every limit at 1 GB/s. In picoseconds it stays under 0.5%
up to 10 GB/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from ratelimit.gcra import NANOSECONDS, Rate
from ratelimit.memory import MemoryBuckets

__all__ = [
    "DOWN",
    "MIN_BANDWIDTH_BURST_BYTES",
    "UP",
    "AppTunnelShaper",
    "BandwidthShaper",
    "bandwidth_rate",
]

UP: Final = "up"  # client to upstream
DOWN: Final = "down"  # upstream to client
MIN_BANDWIDTH_BURST_BYTES: Final = 64 * 1024

_PICOSECONDS: Final = 1_000_000_000_000
_PS_PER_NS: Final = _PICOSECONDS // NANOSECONDS


def bandwidth_rate(bytes_per_second: int, burst_bytes: int | None = None) -> Rate:
    """The byte rate of an app's ``bandwidth_bytes_per_second`` and ``bandwidth_burst_bytes``.

    The default burst is a tenth of a second's worth, at least 64 KiB: one socket read (up to
    256 KiB) is allowed to overdraw the bucket, so a smaller burst would not make the traffic
    smoother, only the pauses more frequent.
    """
    if burst_bytes is None:
        burst_bytes = max(MIN_BANDWIDTH_BURST_BYTES, bytes_per_second // 10)
    return Rate(float(bytes_per_second), burst_bytes)


class BandwidthShaper:
    """The byte buckets of every app on this node, and how long each app's reads were held.

    ``shaped_seconds[(app, direction)]`` adds up, over the app's tunnels, the time each tunnel
    was told to hold its reads (overlapping holds of one tunnel counted once); it is what a
    metrics exporter reads. Memory is bounded by :class:`MemoryBuckets` (a full bucket has no
    entry) and by the number of apps.
    """

    __slots__ = ("_buckets", "_clock", "shaped_seconds")

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock  # nanoseconds
        self._buckets = MemoryBuckets(lambda: clock() * _PS_PER_NS, units_per_second=_PICOSECONDS)
        self.shaped_seconds: dict[tuple[str, str], float] = {}

    def for_app(self, app: str, rate: Rate) -> AppTunnelShaper:
        """The shaper of one new tunnel of ``app``: its reads charge the app's shared buckets.
        A tunnel keeps the rate it started with; the buckets keep their state when it changes.
        """
        return AppTunnelShaper(self, app, rate)

    def _charge(self, key: str, rate: Rate, nbytes: int) -> float:
        return self._buckets.charge(key, rate, nbytes)

    def _now_seconds(self) -> float:
        return self._clock() / NANOSECONDS


class AppTunnelShaper:
    """One tunnel's view of its app's byte buckets: ``up(n)`` / ``down(n)`` charge ``n`` bytes
    just read from the client / the upstream and return the seconds to hold that side's reads.
    """

    __slots__ = ("_app", "_down_key", "_held_until", "_rate", "_shaper", "_up_key")

    def __init__(self, shaper: BandwidthShaper, app: str, rate: Rate) -> None:
        self._shaper = shaper
        self._app = app
        self._rate = rate
        self._up_key = f"{app}/{UP}"
        self._down_key = f"{app}/{DOWN}"
        # when this tunnel's current hold of each side ends (seconds on the shaper's clock)
        self._held_until = {UP: 0.0, DOWN: 0.0}

    @property
    def app(self) -> str:
        return self._app

    @property
    def rate(self) -> Rate:
        return self._rate

    def up(self, nbytes: int) -> float:
        delay = self._shaper._charge(self._up_key, self._rate, nbytes)
        if delay > 0:
            self._count(UP, delay)
        return delay

    def down(self, nbytes: int) -> float:
        delay = self._shaper._charge(self._down_key, self._rate, nbytes)
        if delay > 0:
            self._count(DOWN, delay)
        return delay

    def _count(self, direction: str, delay: float) -> None:
        """Add the part of this hold that does not overlap the side's previous one (a read
        that arrives while held, which uvloop can deliver, extends the hold, not doubles it)."""
        now = self._shaper._now_seconds()
        until = now + delay
        held_until = self._held_until[direction]
        added = until - (held_until if held_until > now else now)
        if added > 0:
            self._held_until[direction] = until
            totals = self._shaper.shaped_seconds
            key = (self._app, direction)
            totals[key] = totals.get(key, 0.0) + added
