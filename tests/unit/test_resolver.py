"""Resolver against a real DNS server on loopback (tests/dnsstub.py), on asyncio and uvloop.

Time is an injected fake clock for everything the resolver caches; the only real waits are the
stub's answer delays and the resolver's own timeout, both fractions of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TypeVar

import pycares
import pytest
import uvloop

import egress.resolver as resolver_module
from egress.resolver import (
    Resolution,
    ResolveError,
    ResolveFailure,
    Resolver,
    _family,
    parse_nameserver,
)
from tests.dnsstub import DnsStub
from tests.polling import eventually

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(
    params=[
        pytest.param(asyncio.new_event_loop, id="asyncio"),
        pytest.param(uvloop.new_event_loop, id="uvloop"),
    ]
)
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a coroutine on a fresh loop of each kind; fail on anything the loop logged."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = request.param

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        errors: list[dict[str, Any]] = []
        with asyncio.Runner(loop_factory=loop_factory) as r:
            r.get_loop().set_exception_handler(lambda _loop, context: errors.append(context))
            result = r.run(asyncio.wait_for(coro, timeout=10))
        assert not errors, errors
        return result

    return runner


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    with DnsStub() as stub:
        yield stub


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@contextlib.asynccontextmanager
async def open_resolver(stub: DnsStub, **kwargs: Any) -> AsyncIterator[Resolver]:
    resolver = Resolver(nameservers=[stub.address], **kwargs)
    try:
        yield resolver
    finally:
        await resolver.aclose()


def ips(*texts: str) -> tuple[IPv4Address | IPv6Address, ...]:
    return tuple(ip_address(t) for t in texts)


async def resolve_error(resolver: Resolver, name: str) -> ResolveError:
    with pytest.raises(ResolveError) as info:
        await resolver.resolve(name)
    return info.value


def v4(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def v6(i: int) -> str:
    return f"2001:db8::{i:x}"


def distinct(texts: list[str], limit: int) -> tuple[IPv4Address | IPv6Address, ...]:
    """The first ``limit`` distinct addresses of ``texts``, in order."""
    return ips(*list(dict.fromkeys(texts))[:limit])


# -- answers ------------------------------------------------------------------------------------


def test_a_only(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    dns.set("v4.test", ["192.0.2.1", "192.0.2.2"])

    async def main() -> Resolution:
        async with open_resolver(dns, clock=clock) as resolver:
            return await resolver.resolve("v4.test")

    assert run(main()) == Resolution("v4.test", ips("192.0.2.1", "192.0.2.2"), 60.0, False)
    assert sorted(dns.queries) == [("v4.test", "A"), ("v4.test", "AAAA")]


def test_aaaa_only(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    dns.set("v6.test", ["2001:db8::1"])

    async def main() -> Resolution:
        async with open_resolver(dns, clock=clock) as resolver:
            return await resolver.resolve("v6.test")

    assert run(main()).addresses == ips("2001:db8::1")


def test_both_families_a_first_order_kept_deduplicated(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("both.test", ["2001:db8::2", "192.0.2.9", "2001:db8::1", "192.0.2.3", "192.0.2.9"])

    async def main() -> Resolution:
        async with open_resolver(dns, clock=clock) as resolver:
            return await resolver.resolve("both.test")

    assert run(main()).addresses == ips("192.0.2.9", "192.0.2.3", "2001:db8::2", "2001:db8::1")


def test_name_matching_is_case_insensitive_in_the_stub(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("MiXeD.Test.", ["192.0.2.1"])

    async def main() -> Resolution:
        async with open_resolver(dns, clock=clock) as resolver:
            return await resolver.resolve("mixed.test")

    assert run(main()).addresses == ips("192.0.2.1")


@pytest.mark.parametrize(("dns_ttl", "expected"), [(1, 5.0), (100000, 300.0), (42, 42.0)])
def test_ttl_is_clamped(
    run: Run[Any], dns: DnsStub, clock: FakeClock, dns_ttl: int, expected: float
) -> None:
    dns.set("ttl.test", ["192.0.2.1"], ttl=dns_ttl)

    async def main() -> Resolution:
        async with open_resolver(dns, clock=clock, min_ttl=5, max_ttl=300) as resolver:
            return await resolver.resolve("ttl.test")

    assert run(main()).ttl == expected


def test_ttl_is_the_minimum_over_cname_chain_and_records(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("target.test", ["192.0.2.7", "2001:db8::7"], ttl=90)
    dns.set_cname("alias.test", "target.test", ttl=30)

    async def main() -> Resolution:
        async with open_resolver(dns, clock=clock) as resolver:
            return await resolver.resolve("alias.test")

    result = run(main())
    assert result.addresses == ips("192.0.2.7", "2001:db8::7")
    assert result.ttl == 30.0


# -- cache --------------------------------------------------------------------------------------


def test_cache_hit_then_expiry(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    # DNS TTL 0 keeps c-ares' own cache out of the way; our min_ttl makes the entry live 10 s.
    dns.set("cached.test", ["192.0.2.1"], ttl=0)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, min_ttl=10) as resolver:
            first = await resolver.resolve("cached.test")
            assert (first.from_cache, first.ttl) == (False, 10.0)
            clock.advance(4)
            second = await resolver.resolve("cached.test")
            assert (second.from_cache, second.ttl, second.addresses) == (True, 6.0, first.addresses)
            assert dns.query_count("cached.test", "A") == 1
            clock.advance(6)  # exactly at expiry: gone
            third = await resolver.resolve("cached.test")
            assert third.from_cache is False
            assert dns.query_count("cached.test", "A") == 2
            stats = resolver.statistics()
            assert (stats.cache_hits, stats.cache_misses, stats.cached_entries) == (1, 2, 1)
            assert stats.lookups_in_flight == 0

    run(main())


def test_cache_is_bounded_oldest_evicted(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    for name in ("one.test", "two.test", "three.test"):
        dns.set(name, ["192.0.2.1"], ttl=0)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, max_cache_entries=2) as resolver:
            for name in ("one.test", "two.test", "three.test"):
                await resolver.resolve(name)
            assert resolver.statistics().cached_entries == 2
            assert (await resolver.resolve("three.test")).from_cache
            assert (await resolver.resolve("two.test")).from_cache
            assert not (await resolver.resolve("one.test")).from_cache

    run(main())


def test_cached_names_for(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    dns.set("a.test", ["192.0.2.1", "2001:db8::1"], ttl=0)
    dns.set("b.test", ["192.0.2.1"], ttl=0)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, min_ttl=10) as resolver:
            await resolver.resolve("b.test")
            await resolver.resolve("a.test")
            assert resolver.cached_names_for(IPv4Address("192.0.2.1")) == ("a.test", "b.test")
            assert resolver.cached_names_for(IPv6Address("::ffff:192.0.2.1")) == (
                "a.test",
                "b.test",
            )
            assert resolver.cached_names_for(IPv6Address("2001:db8::1")) == ("a.test",)
            assert resolver.cached_names_for(IPv4Address("192.0.2.2")) == ()
            clock.advance(10)
            assert resolver.cached_names_for(IPv4Address("192.0.2.1")) == ()

    run(main())


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "kind"),
    [
        (lambda s: None, ResolveFailure.NXDOMAIN),  # unknown names get NXDOMAIN
        (lambda s: s.set_failure("x.test", "NXDOMAIN"), ResolveFailure.NXDOMAIN),
        (lambda s: s.set("x.test", []), ResolveFailure.NO_ADDRESS),
        (lambda s: s.set_failure("x.test", "SERVFAIL"), ResolveFailure.SERVFAIL),
        (lambda s: s.set_failure("x.test", "REFUSED"), ResolveFailure.ERROR),
        (lambda s: s.set_failure("x.test", "MALFORMED"), ResolveFailure.ERROR),
    ],
    ids=["unknown", "nxdomain", "no_address", "servfail", "refused", "malformed"],
)
def test_failure_kinds_and_negative_cache(
    run: Run[Any],
    dns: DnsStub,
    clock: FakeClock,
    setup: Callable[[DnsStub], None],
    kind: ResolveFailure,
) -> None:
    setup(dns)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, negative_ttl=5) as resolver:
            error = await resolve_error(resolver, "x.test")
            assert error.kind is kind
            assert error.name == "x.test"
            assert error.message and "x.test" in str(error)
            queries = len(dns.queries)
            clock.advance(4.9)
            assert (await resolve_error(resolver, "x.test")).kind is kind
            assert len(dns.queries) == queries  # served from the negative cache
            clock.advance(0.1)
            assert (await resolve_error(resolver, "x.test")).kind is kind
            assert len(dns.queries) > queries

    run(main())


def test_timeout_is_bounded_and_not_cached(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    dns.set_failure("silent.test", "TIMEOUT")

    async def main() -> None:
        async with open_resolver(dns, clock=clock, timeout=0.3, attempts=1) as resolver:
            started = time.monotonic()
            error = await resolve_error(resolver, "silent.test")
            assert error.kind is ResolveFailure.TIMEOUT
            assert time.monotonic() - started < 1.5
            await resolve_error(resolver, "silent.test")
            assert dns.query_count("silent.test", "A") == 2  # asked again, once per resolve

    run(main())


def test_unreachable_nameserver_is_an_error(run: Run[Any], clock: FakeClock) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed below: nobody listens there

    async def main() -> ResolveError:
        resolver = Resolver(nameservers=[f"127.0.0.1:{port}"], clock=clock, timeout=1)
        try:
            return await resolve_error(resolver, "x.test")
        finally:
            await resolver.aclose()

    assert run(main()).kind in {ResolveFailure.ERROR, ResolveFailure.TIMEOUT}


def test_malformed_records_are_dropped() -> None:
    def record(rtype: int, addr: object, ttl: int = 60) -> pycares.DNSRecord:
        data = pycares.ARecordData(addr=addr)  # type: ignore[arg-type]
        return pycares.DNSRecord("x.test", rtype, 1, ttl, data)

    answer = [
        record(1, "not-an-ip", ttl=1),
        record(1, "2001:db8::1", ttl=1),  # wrong family for an A record
        record(1, None, ttl=1),
        record(1, "192.0.2.1"),
        record(1, "192.0.2.1"),
        record(28, "2001:db8::1"),  # AAAA record in an A answer: not ours to use
    ]
    family = _family("x.test", pycares.DNSResult(answer, [], []), 1, 4)
    assert family.addresses == list(ips("192.0.2.1"))
    assert family.ttls == [60, 60]
    assert family.failure is None


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_resolves_share_one_lookup(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("shared.test", ["192.0.2.1"], delay=0.1)

    async def main() -> None:
        async with open_resolver(dns, clock=clock) as resolver:
            first, second = await asyncio.gather(
                resolver.resolve("shared.test"), resolver.resolve("shared.test")
            )
            assert first == second
            assert not first.from_cache
            assert dns.query_count("shared.test", "A") == 1
            assert resolver.statistics().lookups_in_flight == 0

    run(main())


def test_cancelling_one_waiter_keeps_the_lookup_for_others(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("slow.test", ["192.0.2.1"], delay=0.3)

    async def main() -> None:
        async with open_resolver(dns, clock=clock) as resolver:
            first = asyncio.create_task(resolver.resolve("slow.test"))
            second = asyncio.create_task(resolver.resolve("slow.test"))
            await eventually(lambda: dns.query_count("slow.test", "A") == 1, "the query is out")
            assert resolver.statistics().lookups_in_flight == 1
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert (await second).addresses == ips("192.0.2.1")
            assert (await resolver.resolve("slow.test")).from_cache
            assert dns.query_count("slow.test", "A") == 1

    run(main())


def test_aclose_fails_waiters_and_later_calls(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("slow.test", ["192.0.2.1"], delay=0.5)

    async def main() -> None:
        resolver = Resolver(nameservers=[dns.address], clock=clock)
        waiter = asyncio.create_task(resolver.resolve("slow.test"))
        await eventually(lambda: dns.query_count("slow.test", "A") == 1, "the query is out")
        await resolver.aclose()
        with pytest.raises(ResolveError) as info:
            await waiter
        assert info.value.kind is ResolveFailure.ERROR
        with pytest.raises(RuntimeError):
            await resolver.resolve("slow.test")
        await resolver.aclose()  # idempotent

    run(main())


def test_no_thread_per_lookup(run: Run[Any], dns: DnsStub, clock: FakeClock) -> None:
    names = [f"n{i}.test" for i in range(30)]
    for name in names:
        dns.set(name, ["192.0.2.1"], delay=0.05)

    async def main() -> None:
        async with open_resolver(dns, clock=clock) as resolver:
            await resolver.resolve("n0.test")
            before = len(os.listdir("/proc/self/task"))
            await asyncio.gather(*(resolver.resolve(name) for name in names[1:]))
            assert len(os.listdir("/proc/self/task")) == before

    run(main())


# -- inputs -------------------------------------------------------------------------------------


def test_ip_literal_is_refused(run: Run[Any], dns: DnsStub) -> None:
    async def main() -> None:
        async with open_resolver(dns) as resolver:
            for literal in ("192.0.2.1", "2001:db8::1"):
                with pytest.raises(ValueError):
                    await resolver.resolve(literal)

    run(main())
    assert dns.queries == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("192.0.2.53", "192.0.2.53:53"),
        ("127.0.0.1:5353", "127.0.0.1:5353"),
        (" 127.0.0.1:5353 ", "127.0.0.1:5353"),
        ("::1", "[::1]:53"),
        ("[::1]", "[::1]:53"),
        ("[2001:DB8::1]:5353", "[2001:db8::1]:5353"),
    ],
)
def test_parse_nameserver(entry: str, expected: str) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "dns.example",
        "127.1",
        "127.0.0.01",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:",
        "127.0.0.1:\uff15\uff13",  # full-width digits
        "[127.0.0.1]:53",
        "[::1]53",
        "[::1",
        "::1:53:x",
    ],
)
def test_parse_nameserver_rejects(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid nameserver"):
        parse_nameserver(entry)


def test_resolver_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Resolver(nameservers=["127.1"])
    with pytest.raises(TypeError):
        Resolver(nameservers="127.0.0.1")
    with pytest.raises(ValueError):
        Resolver(min_ttl=10, max_ttl=5)
    with pytest.raises(ValueError):
        Resolver(timeout=0)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_ipv6_nameserver_with_port(run: Run[Any], clock: FakeClock) -> None:
    assert _has_ipv6_loopback(), "no IPv6 loopback (::1): the IPv6 nameserver path must be tested"
    with DnsStub({"v6ns.test": ["192.0.2.6"]}, host="::1") as stub:
        assert stub.address.startswith("[::1]:")

        async def main() -> Resolution:
            async with open_resolver(stub, clock=clock) as resolver:
                return await resolver.resolve("v6ns.test")

        assert run(main()).addresses == ips("192.0.2.6")


# -- bounds on untrusted answers ----------------------------------------------------------------

DEFAULT_MAX_ADDRESSES = 32  # the documented default of max_addresses_per_family


@pytest.mark.parametrize("cap", [None, 5])
def test_huge_answer_is_cut_to_the_cap_per_family(
    run: Run[Any], clock: FakeClock, cap: int | None
) -> None:
    # Thousands of records per family, every address twice: ~56 KB, so the stub truncates the
    # UDP reply and c-ares asks again over TCP, as with a real server.
    a_records = [v4(i // 2) for i in range(2000)]
    aaaa_records = [v6(i // 2) for i in range(2000)]
    limit = DEFAULT_MAX_ADDRESSES if cap is None else cap
    settings: dict[str, Any] = {} if cap is None else {"max_addresses_per_family": cap}
    with DnsStub(truncate_udp=True) as stub:
        stub.set(
            "big.test", [x for pair in zip(aaaa_records, a_records, strict=True) for x in pair]
        )
        stub.set("cap.test", [v4(i) for i in range(limit)] + [v6(i) for i in range(limit)])

        async def main() -> None:
            async with open_resolver(stub, clock=clock, **settings) as resolver:
                result = await resolver.resolve("big.test")
                expected = distinct(a_records, limit) + distinct(aaaa_records, limit)
                assert result.addresses == expected
                assert stub.query_count("big.test", "AAAA", transport="tcp") == 1
                assert stub.query_count("big.test", "A", transport="tcp") == 1
                stats = resolver.statistics()
                assert (stats.answers_truncated, stats.cached_entries) == (1, 1)
                cached = await resolver.resolve("big.test")
                assert (cached.from_cache, cached.addresses) == (True, expected)
                # What the cache holds for the name depends on the cap, not on the answer: the
                # same as for a name with exactly `limit` addresses per family.
                big_bytes = resolver.statistics().cached_bytes
                await resolver.resolve("cap.test")
                stats = resolver.statistics()
                assert stats.cached_bytes - big_bytes == big_bytes
                assert stats.answers_truncated == 1  # exactly at the cap is not truncated

        run(main())


@pytest.mark.parametrize(
    "case",
    [
        (["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.1"], 8, ["192.0.2.1", "192.0.2.2"], 0),
        (
            ["2001:db8::3", "192.0.2.3", "2001:db8::1", "2001:db8::3", "192.0.2.3", "192.0.2.1"],
            8,
            ["192.0.2.3", "192.0.2.1", "2001:db8::3", "2001:db8::1"],
            0,
        ),
        # duplicates past the cap are not addresses left out
        (["192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.2"], 2, ["192.0.2.1", "192.0.2.2"], 0),
        (["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"], 2, ["192.0.2.1", "192.0.2.2"], 1),
    ],
    ids=["a", "both-families", "duplicates-past-cap", "cut"],
)
def test_duplicate_records_are_deduplicated_in_order(
    run: Run[Any], dns: DnsStub, clock: FakeClock, case: tuple[list[str], int, list[str], int]
) -> None:
    records, cap, expected, truncated = case  # truncated: answers counted as cut
    dns.set("dup.test", records)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, max_addresses_per_family=cap) as resolver:
            assert (await resolver.resolve("dup.test")).addresses == ips(*expected)
            assert resolver.statistics().answers_truncated == truncated

    run(main())


def _a(addr: object, ttl: int = 60, rtype: int = 1) -> pycares.DNSRecord:
    data = pycares.ARecordData(addr=addr)  # type: ignore[arg-type]
    return pycares.DNSRecord("x.test", rtype, 1, ttl, data)


def test_records_past_the_cap_are_not_parsed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    parsed: list[str] = []

    def counting_ip_address(text: str) -> IPv4Address | IPv6Address:
        parsed.append(text)
        return ip_address(text)

    monkeypatch.setattr(resolver_module, "ip_address", counting_ip_address)
    answer = [_a(v4(0))] * 20  # duplicates before the cap: parsed once
    answer += [_a("alias.test", ttl=7, rtype=5)]  # a CNAME bounds the TTL
    answer += [_a(v4(i)) for i in range(40)]
    answer += [_a(v4(0))] * 20  # duplicates of a kept address past the cap: their TTL is used
    answer += [_a("not-an-ip", ttl=1)] * 40  # garbage past the cap: never parsed
    # Past 4 x limit records nothing is looked at: not even a CNAME's TTL.
    answer += [_a(v4(i), ttl=1) for i in range(40, 5000)]
    answer += [_a("late-alias.test", ttl=2, rtype=5)]
    caplog.set_level(logging.DEBUG, logger="egress.resolver")
    family = _family("x.test", pycares.DNSResult(answer, [], []), 1, 4, limit=32)
    assert family.addresses == list(ips(*(v4(i) for i in range(32))))
    assert family.truncated
    assert min(family.ttls) == 7
    assert sorted(set(family.ttls)) == [7, 60]  # the skipped records' TTLs 1 and 2 are not used
    assert len(parsed) == 32
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(caplog.records) <= 1


def test_malformed_records_are_logged_once_per_answer(caplog: pytest.LogCaptureFixture) -> None:
    answer = [_a(f"bad-{i}") for i in range(100)] + [_a("192.0.2.1")]
    caplog.set_level(logging.WARNING, logger="egress.resolver")
    family = _family("x.test", pycares.DNSResult(answer, [], []), 1, 4)
    assert family.addresses == list(ips("192.0.2.1"))
    assert not family.truncated
    [record] = caplog.records
    assert "100" in record.getMessage() and "bad-0" in record.getMessage()


def test_no_more_than_four_records_per_address_kept_are_looked_at() -> None:
    """Thousands of malformed records in a tenant's answer cost as little as a few."""
    answer = [_a(f"bad-{i}") for i in range(5000)] + [_a("192.0.2.1")]
    family = _family("x.test", pycares.DNSResult(answer, [], []), 1, 4, limit=8)
    assert family.addresses == []
    assert family.truncated


@pytest.mark.parametrize("trigger", ["resolve", "sweep"])
def test_expired_entries_leave_the_cache_on_time(
    run: Run[Any], dns: DnsStub, clock: FakeClock, trigger: str
) -> None:
    # The long-lived entry is the oldest: expiry must not wait for it, nor for a full cache.
    dns.set("keep.test", ["192.0.2.1"], ttl=100)
    dns.set("next.test", ["192.0.2.2"], ttl=100)  # same shape as keep.test
    short = [f"short{i:03d}.test" for i in range(200)]
    for i, name in enumerate(short):
        dns.set(name, [v4(i), v6(i)], ttl=20)

    async def main() -> None:
        async with open_resolver(dns, clock=clock) as resolver:
            await resolver.resolve("keep.test")
            keep_bytes = resolver.statistics().cached_bytes
            for name in short:
                await resolver.resolve(name)
            full = resolver.statistics()
            assert full.cached_entries == 1 + len(short)
            assert full.cached_bytes > len(short) * keep_bytes
            assert resolver.sweep() == 0  # nothing expired yet: nothing dropped
            assert resolver.statistics() == full
            clock.advance(20)
            if trigger == "sweep":
                assert resolver.sweep() == len(short)
                stats = resolver.statistics()
                assert (stats.cached_entries, stats.cached_bytes) == (1, keep_bytes)
            else:
                await resolver.resolve("next.test")  # unrelated to the expired names
                stats = resolver.statistics()
                assert (stats.cached_entries, stats.cached_bytes) == (2, 2 * keep_bytes)
            assert (await resolver.resolve("keep.test")).from_cache
            assert resolver.cached_names_for(IPv4Address(v4(0))) == ()
            clock.advance(100)
            assert resolver.sweep() == stats.cached_entries
            assert resolver.statistics().cached_entries == 0
            assert resolver.statistics().cached_bytes == 0

    run(main())


def test_cache_bytes_are_bounded_oldest_evicted(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    names = [f"n{i:02d}.test" for i in range(20)]  # one shape: one size
    for i, name in enumerate(names):
        dns.set(name, [v4(i)], ttl=0)
    dns.set("wide.test", [v4(1000 + i) for i in range(3)] + [v6(i) for i in range(3)], ttl=0)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, min_ttl=60) as probe:
            await probe.resolve(names[0])
            size = probe.statistics().cached_bytes
            await probe.resolve("wide.test")
            wide_size = probe.statistics().cached_bytes - size
        fit = 4  # small entries the bound holds
        bound = fit * size + size // 2
        assert 0 < size < wide_size <= bound - size  # the test's premise: wide needs room
        async with open_resolver(dns, clock=clock, min_ttl=60, max_cache_bytes=bound) as resolver:
            for name in names:
                await resolver.resolve(name)
                assert resolver.statistics().cached_bytes <= bound
            stats = resolver.statistics()
            assert (stats.cached_entries, stats.cached_bytes) == (fit, fit * size)
            for name in names[-fit:]:
                assert (await resolver.resolve(name)).from_cache, name
            assert resolver.statistics().cache_hits == fit
            # A bigger entry pushes out as many of the oldest as it needs, and no more.
            await resolver.resolve("wide.test")
            stats = resolver.statistics()
            room = (bound - wide_size) // size
            assert 1 <= room < fit
            assert (stats.cached_entries, stats.cached_bytes) == (1 + room, wide_size + room * size)
            assert (await resolver.resolve("wide.test")).from_cache
            kept = [
                name for i, name in enumerate(names) if resolver.cached_names_for(ips(v4(i))[0])
            ]
            assert kept == names[-room:]

    run(main())


def test_entry_larger_than_the_byte_bound_is_not_cached(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    dns.set("x.test", ["192.0.2.1"], ttl=0)

    async def main() -> None:
        async with open_resolver(dns, clock=clock, max_cache_bytes=1) as resolver:
            assert (await resolver.resolve("x.test")).addresses == ips("192.0.2.1")
            assert not (await resolver.resolve("x.test")).from_cache
            stats = resolver.statistics()
            assert (stats.cached_entries, stats.cached_bytes) == (0, 0)

    run(main())


def test_expiry_heap_stays_proportional_to_the_cache(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    # Evicted entries leave stale heap items; churning names through a small cache must not make
    # the heap grow with the number of names ever seen.
    names = [f"churn{i:03d}.test" for i in range(300)]
    for name in names:
        dns.set(name, ["192.0.2.1"])

    async def main() -> None:
        async with open_resolver(dns, clock=clock, max_cache_entries=4) as resolver:
            for name in names:
                await resolver.resolve(name)
            assert resolver.statistics().cached_entries == 4
            assert len(resolver._expiry) < len(names) // 3

    run(main())


def test_cached_names_for_keeps_the_newest_names_per_address(
    run: Run[Any], dns: DnsStub, clock: FakeClock
) -> None:
    older = [f"n{i:02d}.test" for i in range(30)]
    newer = [f"m{i:02d}.test" for i in range(10)]
    for name in older:
        dns.set(name, ["192.0.2.1"])
    for name in newer:
        dns.set(name, ["::ffff:c000:201"])  # ::ffff:192.0.2.1; dnslib takes only hex groups

    async def main() -> None:
        async with open_resolver(dns, clock=clock, max_names_per_address=16) as resolver:
            for name in older + newer:
                await resolver.resolve(name)
            # Answers are indexed by their canonical form: the mapped AAAA answers and the A
            # answers are one address, and the bound holds for all its names, newest kept.
            newest = tuple(sorted(newer + older[-6:]))
            assert resolver.cached_names_for(IPv4Address("192.0.2.1")) == newest
            assert resolver.cached_names_for(IPv6Address("::ffff:192.0.2.1")) == newest
            # What the loop walks per connection stays at the bound, however many names point
            # at the address: the index forgets old names; the cache still answers for them.
            assert max(len(names) for names in resolver._names_by_address.values()) == 16
            assert (await resolver.resolve(older[0])).from_cache
            clock.advance(60)
            assert resolver.cached_names_for(IPv4Address("192.0.2.1")) == ()

    run(main())


@pytest.mark.parametrize(
    "setting", ["max_addresses_per_family", "max_cache_bytes", "max_names_per_address"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_resolver_rejects_bad_bounds(setting: str, value: int) -> None:
    with pytest.raises(ValueError, match=setting):
        Resolver(**{setting: value})
    Resolver(**{setting: 1})  # the smallest bound is fine
