"""AnsweredNames: what the DNS listener told each app, for how long, and within which bounds
(a fake clock; the bounds are made small so every eviction path runs)."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.dnsnames import GRACE_SECONDS, AnsweredNames

IPAddress = IPv4Address | IPv6Address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ip(n: int) -> IPv4Address:
    return IPv4Address(0xCB007100 + n)  # 203.0.113.n


def held(names: AnsweredNames) -> int:
    """The real number of addresses held, counted from the tables themselves."""
    return sum(len(table) for table in names._apps.values())


def test_names_count_until_ttl_plus_grace() -> None:
    clock = Clock()
    names = AnsweredNames(clock=clock, grace=5.0)
    names.remember("blog", "api.example.com", [ip(1)], ttl=30.0)
    assert names.names_for("blog", ip(1)) == ("api.example.com",)
    clock.now += 34.999
    assert names.names_for("blog", ip(1)) == ("api.example.com",)  # inside the grace
    clock.now += 0.001
    assert names.names_for("blog", ip(1)) == ()  # expired at exactly ttl + grace
    assert names.count == 1  # still held until a sweep or an eviction


def test_default_grace_and_negative_ttl() -> None:
    clock = Clock()
    names = AnsweredNames(clock=clock)
    names.remember("blog", "a.example.com", [ip(1)], ttl=-10.0)  # counts as 0
    clock.now += GRACE_SECONDS - 0.01
    assert names.names_for("blog", ip(1)) == ("a.example.com",)
    clock.now += 0.01
    assert names.names_for("blog", ip(1)) == ()


def test_names_are_per_app() -> None:
    names = AnsweredNames(clock=Clock())
    names.remember("blog", "api.example.com", [ip(1)], ttl=30)
    assert names.names_for("shop", ip(1)) == ()
    assert names.names_for("blog", ip(2)) == ()
    assert names.names_for("nobody", ip(1)) == ()


def test_each_name_has_its_own_expiry() -> None:
    clock = Clock()
    names = AnsweredNames(clock=clock, grace=0.0)
    names.remember("blog", "short.example.com", [ip(1)], ttl=10)
    names.remember("blog", "long.example.com", [ip(1)], ttl=100)
    assert names.names_for("blog", ip(1)) == ("short.example.com", "long.example.com")
    clock.now += 50
    assert names.names_for("blog", ip(1)) == ("long.example.com",)
    assert names.sweep() == 0  # one name still counts: the address stays
    clock.now += 50
    assert names.sweep() == 1
    assert names.count == 0


def test_per_app_cap_evicts_that_apps_oldest_only() -> None:
    names = AnsweredNames(per_app=3, total=100, clock=Clock())
    names.remember("shop", "shop.example.com", [ip(100)], ttl=60)
    for n in range(1, 4):
        names.remember("blog", f"n{n}.example.com", [ip(n)], ttl=60)
    names.remember("blog", "n1.example.com", [ip(1)], ttl=60)  # answered again: newest now
    names.remember("blog", "n4.example.com", [ip(4)], ttl=60)
    assert names.names_for("blog", ip(2)) == ()  # the least recently answered went
    for n in (1, 3, 4):
        assert names.names_for("blog", ip(n)) == (f"n{n}.example.com",)
    assert names.names_for("shop", ip(100)) == ("shop.example.com",)
    assert names.count == held(names) == 4


def test_expired_entries_make_room_before_live_ones_are_evicted() -> None:
    clock = Clock()
    names = AnsweredNames(per_app=2, total=100, grace=0.0, clock=clock)
    names.remember("blog", "old.example.com", [ip(1)], ttl=1)
    names.remember("blog", "live.example.com", [ip(2)], ttl=600)
    clock.now += 2
    names.remember("blog", "new.example.com", [ip(3)], ttl=600)
    assert names.names_for("blog", ip(2)) == ("live.example.com",)
    assert names.names_for("blog", ip(3)) == ("new.example.com",)
    assert names.count == held(names) == 2


def test_total_cap_evicts_from_the_largest_app() -> None:
    names = AnsweredNames(per_app=100, total=5, clock=Clock())
    names.remember("big", "big.example.com", [ip(n) for n in range(1, 5)], ttl=60)
    names.remember("small", "small.example.com", [ip(50)], ttl=60)
    assert names.count == 5
    names.remember("small", "small2.example.com", [ip(51)], ttl=60)
    assert names.count == held(names) == 5
    assert names.names_for("big", ip(1)) == ()  # the largest app's oldest
    assert [names.names_for("big", ip(n)) for n in range(2, 5)] == [("big.example.com",)] * 3
    assert names.names_for("small", ip(50)) == ("small.example.com",)
    assert names.names_for("small", ip(51)) == ("small2.example.com",)


def test_names_per_address_keeps_the_newest() -> None:
    names = AnsweredNames(names_per_address=2, clock=Clock())
    names.remember("blog", "a.example.com", [ip(1)], ttl=60)
    names.remember("blog", "b.example.com", [ip(1)], ttl=60)
    names.remember("blog", "a.example.com", [ip(1)], ttl=60)  # a is the newest again
    names.remember("blog", "c.example.com", [ip(1)], ttl=60)
    assert names.names_for("blog", ip(1)) == ("a.example.com", "c.example.com")
    assert names.count == 1


def test_ipv4_mapped_ipv6_is_found_by_its_ipv4_form() -> None:
    names = AnsweredNames(clock=Clock())
    names.remember("blog", "mapped.example.com", [ip_address("::ffff:203.0.113.9")], ttl=60)
    assert names.names_for("blog", ip(9)) == ("mapped.example.com",)
    assert names.names_for("blog", ip_address("::ffff:203.0.113.9")) == ("mapped.example.com",)
    names.remember("blog", "plain.example.com", [ip(9)], ttl=60)
    assert names.count == 1  # one address, two spellings
    names.remember("blog", "v6.example.com", [ip_address("2001:db8::9")], ttl=60)
    assert names.names_for("blog", ip_address("2001:db8::9")) == ("v6.example.com",)
    assert names.count == 2


def test_sweep_drops_expired_addresses_and_empty_apps() -> None:
    clock = Clock()
    names = AnsweredNames(grace=0.0, clock=clock)
    names.remember("blog", "a.example.com", [ip(1), ip(2)], ttl=10)
    names.remember("shop", "s.example.com", [ip(3)], ttl=100)
    assert names.sweep() == 0
    clock.now += 10
    assert names.sweep() == 2
    assert names.count == held(names) == 1
    assert "blog" not in names._apps
    assert names.names_for("shop", ip(3)) == ("s.example.com",)


def test_forget_drops_apps_not_kept() -> None:
    names = AnsweredNames(clock=Clock())
    names.remember("blog", "a.example.com", [ip(1), ip(2)], ttl=60)
    names.remember("shop", "s.example.com", [ip(3)], ttl=60)
    names.forget(["shop", "unknown"])
    assert names.names_for("blog", ip(1)) == ()
    assert names.names_for("shop", ip(3)) == ("s.example.com",)
    assert names.count == held(names) == 1
    names.forget([])
    assert names.count == held(names) == 0


def test_bounds_must_be_positive() -> None:
    for bounds in ({"per_app": 0}, {"total": 0}, {"names_per_address": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            AnsweredNames(**bounds)  # type: ignore[arg-type]


# --- `count` stays exact --------------------------------------------------------------------

APPS = ("blog", "shop", "wiki")
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("remember"),
            st.sampled_from(APPS),
            st.integers(0, 5),  # name
            st.lists(st.integers(0, 11), max_size=5),  # addresses (some mapped, below)
            st.sampled_from([0.0, 1.0, 5.0, 30.0]),  # ttl
        ),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 3.0, 10.0, 40.0])),
        st.tuples(st.just("sweep")),
        st.tuples(st.just("forget"), st.sets(st.sampled_from(APPS))),
    ),
    max_size=60,
)


def address(n: int) -> IPAddress:
    """Some addresses come as IPv4-mapped IPv6: the same address as ``ip(n - 6)``."""
    return ip_address(f"::ffff:{ip(n - 6)}") if n >= 6 else ip(n)


def run_operations(operations: list[tuple[object, ...]], per_app: int, total: int) -> None:
    clock = Clock()
    names = AnsweredNames(per_app=per_app, total=total, names_per_address=2, grace=1.0, clock=clock)
    model_until: dict[tuple[str, IPAddress, str], float] = {}  # what may be returned, and until
    for operation in operations:
        kind = operation[0]
        if kind == "remember":
            _, app, name, numbers, ttl = operation
            assert isinstance(app, str) and isinstance(numbers, list) and isinstance(ttl, float)
            for n in numbers:
                key = (app, ip(n - 6) if n >= 6 else ip(n), f"n{name}.example")
                model_until[key] = clock.now + ttl + 1.0
            names.remember(app, f"n{name}.example", [address(n) for n in numbers], ttl)
        elif kind == "tick":
            seconds = operation[1]
            assert isinstance(seconds, float)
            clock.now += seconds
        elif kind == "sweep":
            before = names.count
            dropped = names.sweep()
            assert names.count == before - dropped
        else:
            kept = operation[1]
            assert isinstance(kept, set)
            names.forget(kept)
            model_until = {k: v for k, v in model_until.items() if k[0] in kept}
        assert names.count == held(names)
        assert names.count <= total
        assert all(len(table) <= per_app for table in names._apps.values())
        # Whatever is returned was answered to that app and still counts (never a guess).
        for app in APPS:
            for n in range(6):
                for name in names.names_for(app, ip(n)):
                    assert model_until[(app, ip(n), name)] > clock.now


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, st.integers(1, 4), st.integers(1, 8))
def test_count_is_exact_after_any_operations(
    operations: list[tuple[object, ...]], per_app: int, total: int
) -> None:
    run_operations(operations, per_app, total)


def test_count_is_exact_after_a_long_random_sequence() -> None:
    rng = random.Random(20240610)
    operations: list[tuple[object, ...]] = []
    for _ in range(5000):
        roll = rng.random()
        if roll < 0.7:
            numbers = [rng.randrange(12) for _ in range(rng.randrange(4))]
            ttl = rng.choice([0.0, 1.0, 5.0, 30.0])
            operations.append(("remember", rng.choice(APPS), rng.randrange(6), numbers, ttl))
        elif roll < 0.9:
            operations.append(("tick", rng.choice([0.5, 3.0, 10.0])))
        elif roll < 0.97:
            operations.append(("sweep",))
        else:
            operations.append(("forget", set(rng.sample(APPS, rng.randrange(4)))))
    run_operations(operations, per_app=5, total=12)
