"""The in-memory buckets stay bounded whatever keys tenants make them hold, and the buckets
in use are not the ones dropped."""

from __future__ import annotations

from ratelimit.gcra import Rate
from ratelimit.memory import MemoryBuckets

SLOW = Rate(0.001, 1)  # one token, then one every 1000 s: a drained bucket stays drained


def test_the_table_is_bounded_and_a_busy_bucket_survives_churn() -> None:
    now = [0]
    buckets = MemoryBuckets(lambda: now[0], max_buckets=100)
    assert buckets.take_now("victim/conn", SLOW).allowed
    for index in range(10_000):  # another tenant's destinations, each a new key
        assert buckets.take_now(f"other/dest/host{index}.example:443", SLOW).allowed
        assert len(buckets) <= 100
        if index % 20 == 0:  # the victim keeps trying: its bucket is in use, never dropped
            assert not buckets.take_now("victim/conn", SLOW).allowed
        now[0] += 1
    assert not buckets.take_now("victim/conn", SLOW).allowed


def test_a_full_bucket_has_no_entry() -> None:
    now = [0]
    buckets = MemoryBuckets(lambda: now[0])
    buckets.take_now("blog/conn", Rate(10, 5))
    assert len(buckets) == 1
    now[0] += 1_000_000  # a second later it is full again
    buckets.take_now("other/conn", Rate(10, 5))
    assert buckets.take_now("blog/conn", Rate(10, 5)).allowed
    assert len(buckets) == 2
