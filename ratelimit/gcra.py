"""The bucket math: GCRA (the generic cell rate algorithm), in integers, with no I/O.

Why GCRA rather than a token bucket with a refill loop: it is the same limit (a rate and a
burst), but its whole state is one integer per bucket, the *theoretical arrival time* (TAT), the
time at which the bucket would be full again. Taking a token is arithmetic on that one number
and the current time: nothing to refill, nothing to schedule, and an idle bucket needs no state
at all (a TAT in the past is a full bucket), so a Redis key can simply expire. The Redis
backend runs this same arithmetic in Lua on the server's clock (:mod:`ratelimit.redis`).

Time is an integer count of some unit (microseconds for connection buckets, since Lua numbers
are doubles and ``TIME`` in microseconds stays exact to 2**53; nanoseconds for byte buckets).
A rate becomes an integer *interval* (units per token) once, rounded: the error is a fixed
relative error of at most half a unit per interval (under 0.05% for 1,000 connections per
second in microseconds), and it never accumulates, because nothing is added up in floating
point.

With ``interval`` per token and room for ``burst`` tokens (``capacity = burst * interval``):

* a take of ``cost`` tokens at ``now`` moves the TAT to ``max(tat, now) + cost * interval``;
* it is allowed when the new TAT is at most ``now + capacity``;
* otherwise the TAT stays, and the wait until it would be allowed is ``new_tat - capacity -
  now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "MICROSECONDS",
    "NANOSECONDS",
    "Rate",
    "Taken",
    "charge",
    "take",
    "take_up_to",
]

MICROSECONDS: Final = 1_000_000
NANOSECONDS: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Rate:
    """A limit: ``per_second`` tokens a second on average, up to ``burst`` at once."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise ValueError(f"a rate must be a finite number > 0, not {self.per_second!r}")
        if self.burst < 1:
            raise ValueError(f"a burst must be at least 1, not {self.burst!r}")

    def interval(self, units_per_second: int) -> int:
        """Time units per token (at least one)."""
        return max(1, round(units_per_second / self.per_second))

    def capacity(self, units_per_second: int) -> int:
        """Time units of room in a full bucket."""
        return self.burst * self.interval(units_per_second)


class Taken(NamedTuple):
    """What a take did: how many tokens it got, the bucket's TAT after it, and how long (in
    the same units) until the next token it did not get could be had (0 when it got all)."""

    granted: int
    tat: int
    wait: int


def take(tat: int, now: int, interval: int, capacity: int, cost: int = 1) -> Taken:
    """Take ``cost`` tokens at once, or none. A cost larger than the burst never fits: its
    wait is -1 (it would never be allowed)."""
    if cost * interval > capacity:
        return Taken(0, tat, -1)
    base = tat if tat > now else now
    new_tat = base + cost * interval
    allow_at = new_tat - capacity
    if allow_at <= now:
        return Taken(cost, new_tat, 0)
    return Taken(0, tat, allow_at - now)


def take_up_to(tat: int, now: int, interval: int, capacity: int, count: int) -> Taken:
    """Take as many of ``count`` single tokens as fit now: the batched form of ``count``
    calls to :func:`take` with cost 1, made at the same instant, with the same result."""
    base = tat if tat > now else now
    room = (now + capacity - base) // interval
    granted = min(count, room) if room > 0 else 0
    new_tat = base + granted * interval
    if granted == count:
        return Taken(granted, new_tat, 0)
    return Taken(granted, new_tat, new_tat + interval - capacity - now)


def charge(tat: int, now: int, interval: int, capacity: int, cost: int) -> Taken:
    """Take ``cost`` tokens that were already spent (bytes already read): always granted, and
    ``wait`` is how long to hold off so the average stays at the rate (shaping, not dropping).
    The debt is what makes the rate hold: a big read is paid for by a longer pause."""
    base = tat if tat > now else now
    new_tat = base + cost * interval
    wait = new_tat - capacity - now
    return Taken(cost, new_tat, wait if wait > 0 else 0)
