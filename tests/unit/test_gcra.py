"""The bucket math (ratelimit/gcra.py) against its promises, for any rate, burst and timing:
a batched take is the same as single takes, integers do not drift, and shaping holds the rate."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.gcra import MICROSECONDS, NANOSECONDS, Rate, Taken, charge, take, take_up_to

intervals = st.integers(min_value=1, max_value=10**9)
bursts = st.integers(min_value=1, max_value=1000)
times = st.integers(min_value=0, max_value=2**52)  # µs since some epoch, as Redis TIME gives


@given(
    interval=intervals,
    burst=bursts,
    now=times,
    tat_offset=st.integers(min_value=-(10**12), max_value=10**12),
    count=st.integers(min_value=1, max_value=2000),
)
def test_take_up_to_is_count_sequential_takes(
    interval: int, burst: int, now: int, tat_offset: int, count: int
) -> None:
    capacity = burst * interval
    tat = max(0, min(now + tat_offset, now + capacity))  # a TAT a bucket can have
    sequential = Taken(0, tat, 0)
    for _ in range(count):
        one = take(sequential.tat, now, interval, capacity)
        sequential = Taken(sequential.granted + one.granted, one.tat, one.wait)
    batched = take_up_to(tat, now, interval, capacity, count)
    if tat <= now:
        assert batched.granted == min(count, burst)  # a full bucket has the whole burst
    assert batched.granted == sequential.granted
    assert batched.wait == sequential.wait
    assert batched.tat == max(tat, now) + batched.granted * interval
    assert sequential.tat == (batched.tat if batched.granted else tat)


@settings(max_examples=40, deadline=None)
@given(
    per_second=st.floats(min_value=0.5, max_value=50_000),
    burst=st.integers(min_value=1001, max_value=5000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_no_drift_over_a_million_tokens(per_second: float, burst: int, seed: int) -> None:
    """A caller that keeps taking all it can gets exactly burst + floor(elapsed / interval)
    tokens, over a million of them: nothing is lost or made up by rounding as time goes on."""
    rng = random.Random(seed)  # the gaps between takes (hypothesis picks the seed)
    rate = Rate(per_second, burst)
    interval = rate.interval(MICROSECONDS)
    capacity = rate.capacity(MICROSECONDS)
    start = now = rng.randrange(2**40)
    tat = now
    total = 0
    while total < 10**6:
        got = take_up_to(tat, now, interval, capacity, 10**9)
        total += got.granted
        tat = got.tat
        now += rng.randint(0, capacity - interval)  # never long enough to overflow the bucket
    got = take_up_to(tat, now, interval, capacity, 10**9)
    total += got.granted
    assert total == burst + (now - start) // interval
    # and the rounded interval is within half a unit of the configured rate
    assert abs(interval - MICROSECONDS / per_second) <= 0.5


@settings(max_examples=60, deadline=None)
@given(
    per_second=st.floats(min_value=1_000, max_value=10**8),  # bytes per second
    burst=st.integers(min_value=1, max_value=10**6),
    reads=st.lists(st.integers(min_value=1, max_value=256 * 1024), min_size=1, max_size=300),
    pauses=st.lists(st.integers(min_value=0, max_value=5 * 10**6), min_size=1, max_size=300),
)
def test_charge_wait_keeps_the_average_at_the_rate(
    per_second: float, burst: int, reads: list[int], pauses: list[int]
) -> None:
    """Bytes already read are charged; the reader then waits ``wait``. It never gets ahead of
    the rate (plus the burst), and the wait is no longer than the rate needs: a reader that
    does nothing but read and wait moves exactly at the rate."""
    rate = Rate(per_second, burst)
    interval = rate.interval(NANOSECONDS)
    capacity = rate.capacity(NANOSECONDS)

    start = now = 10**12
    tat = now
    charged = 0
    for index, cost in enumerate(reads):
        got = charge(tat, now, interval, capacity, cost)
        assert got.granted == cost
        assert got.wait >= 0
        tat = got.tat
        charged += cost
        now += got.wait  # the reader pauses as told
        assert charged * interval <= (now - start) + capacity  # never ahead of the rate
        now += pauses[index % len(pauses)] if index % 2 else 0  # sometimes it is busy elsewhere

    busy_free_start = now
    tat = now  # a full bucket, then a reader with no pauses of its own
    charged = 0
    for cost in reads:
        got = charge(tat, now, interval, capacity, cost)
        tat = got.tat
        charged += cost
        now += got.wait
    assert now - busy_free_start == max(0, charged * interval - capacity)  # exactly the rate
