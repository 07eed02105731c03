"""Bandwidth shaping: the byte buckets (:mod:`egress.shaping`) on an injected clock, and the
relay's holds (:class:`Tunnel` with a shaper) driven with fake transports.

The shaper's clock is a :class:`FakeClock` that only moves when a test moves it, so every delay
it computes is exact. The tunnel's holds are real ``loop.call_later`` timers: what is asserted
about them is order (held, then released; released only when backpressure has cleared too),
and durations only as "not before the computed time", never as speed.
"""

from __future__ import annotations

import asyncio

import pytest

from egress.net.relay import WRITE_HIGH_WATER, Tunnel, UpstreamSide
from egress.shaping import DOWN, UP, BandwidthShaper, bandwidth_rate
from ratelimit.gcra import Rate
from tests.polling import eventually
from tests.unit.fakes import FakeTransport, connected_upstream, run, until
from tests.unit.test_relay import Ends, client_transport, closed

# 10,000 bytes a second with room for 1,000: 1,500 bytes at once overdraw by 500, a 50 ms hold
RATE = Rate(10_000.0, 1_000)
HOLD = 0.05


class FakeClock:
    """Nanoseconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)


# --- the buckets -----------------------------------------------------------------------------
def test_within_the_burst_no_hold_and_over_it_the_hold_pays_the_debt() -> None:
    clock = FakeClock()
    shaper = BandwidthShaper(clock).for_app("blog", RATE)
    assert shaper.up(1_000) == 0.0  # the burst
    assert shaper.up(500) == pytest.approx(HOLD)  # 500 bytes over at 10,000 B/s
    clock.advance(HOLD)
    assert shaper.up(100) == pytest.approx(0.01)  # the debt was paid, the bucket is empty
    clock.advance(0.2)  # 2,000 bytes' worth of time: full again (only 1,000 of room)
    assert shaper.up(1_000) == 0.0
    assert shaper.up(1) == pytest.approx(0.0001)


def test_directions_and_apps_have_their_own_buckets_and_tunnels_of_an_app_share_one() -> None:
    shaper = BandwidthShaper(FakeClock())
    first, second = shaper.for_app("blog", RATE), shaper.for_app("blog", RATE)
    other = shaper.for_app("worker", RATE)
    assert first.up(1_000) == 0.0
    assert second.up(500) == pytest.approx(HOLD), "a second tunnel of the app shares the rate"
    assert first.down(1_000) == 0.0, "downloads are limited apart from uploads"
    assert other.up(1_000) == 0.0 and other.down(1_000) == 0.0, "another app is not slowed"


def test_shaped_seconds_add_up_holds_per_app_and_direction_without_double_counting() -> None:
    clock = FakeClock()
    shaper = BandwidthShaper(clock)
    tunnel = shaper.for_app("blog", RATE)
    assert tunnel.up(1_500) == pytest.approx(HOLD)
    # a read that arrives while held (uvloop may deliver one) extends the hold to 60 ms
    clock.advance(0.02)
    assert tunnel.up(300) == pytest.approx(0.06)
    assert shaper.shaped_seconds == {("blog", UP): pytest.approx(0.08)}
    other = shaper.for_app("blog", RATE)  # another tunnel's hold is its own time held
    assert other.up(100) == pytest.approx(0.07)
    tunnel.down(2_000)
    assert shaper.shaped_seconds == {
        ("blog", UP): pytest.approx(0.15),
        ("blog", DOWN): pytest.approx(0.1),
    }


def test_a_high_rate_holds_to_a_small_fraction_of_a_percent() -> None:
    """300 MB/s is 3.33 ns a byte: whole nanoseconds would make it 333 MB/s (11% too fast)."""
    clock = FakeClock()
    rate = Rate(300e6, 65_536)
    shaper = BandwidthShaper(clock).for_app("blog", rate)
    assert shaper.down(65_536 + 300_000_000) == pytest.approx(1.0, rel=1e-3)


def test_bandwidth_rate_defaults_the_burst_to_a_tenth_of_a_second_and_at_least_64_kib() -> None:
    assert bandwidth_rate(1_048_576) == Rate(1_048_576.0, 104_857)
    assert bandwidth_rate(10_000) == Rate(10_000.0, 65_536)
    assert bandwidth_rate(10_000, 2_000) == Rate(10_000.0, 2_000)
    with pytest.raises(ValueError, match="burst"):
        bandwidth_rate(10_000, 0)


# --- the relay -------------------------------------------------------------------------------
def shaped_tunnel(
    client: FakeTransport,
    side: UpstreamSide,
    ends: Ends,
    shaper: BandwidthShaper,
    *,
    app: str = "blog",
    rate: Rate = RATE,
    idle_timeout: float = 300.0,
) -> Tunnel:
    return Tunnel(
        client, side, idle_timeout=idle_timeout, on_closed=ends, shaper=shaper.for_app(app, rate)
    )


async def reading_again(transport: FakeTransport, *, timeout: float = 2.0) -> float:
    """The loop time at which ``transport`` reads again (polled every few milliseconds)."""
    await eventually(transport.is_reading, "reading resumed", timeout=timeout, every=0.002)
    return asyncio.get_running_loop().time()


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_a_read_over_the_rate_holds_that_side_for_the_computed_time(direction: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        shaper = BandwidthShaper(FakeClock())
        tunnel = shaped_tunnel(client, side, ends, shaper)
        tunnel.start()
        sender, receiver = (client, upstream) if direction == UP else (upstream, client)
        other = upstream if direction == UP else client
        fed_at = loop.time()
        assert sender.feed(b"a" * 1_500)
        assert receiver.written == b"a" * 1_500, "the bytes read are relayed, not dropped"
        assert not sender.is_reading(), "over the rate: that side stops reading"
        assert other.is_reading(), "the other direction has its own bucket"
        assert shaper.shaped_seconds == {("blog", direction): pytest.approx(HOLD)}
        assert not sender.feed(b"b" * 10)  # held back by the kernel, as it were
        released_at = await reading_again(sender)
        assert released_at - fed_at >= HOLD - 0.002
        await until(lambda: sender.pending_inbound == 0, "held bytes delivered")
        assert receiver.written == b"a" * 1_500 + b"b" * 10
        tunnel.abort("test over")
        await closed(ends, client, upstream)

    run(main())


@pytest.mark.parametrize("clears_first", ["shaping", "backpressure"])
def test_reading_resumes_only_when_both_backpressure_and_shaping_let_go(clears_first: str) -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream(auto_drain=False)  # a slow upstream reader
        ends = Ends()
        # one read of just over the high-water mark: 196,609 bytes over the burst, ~49 ms held
        hold = (WRITE_HIGH_WATER + 1 - 65_536) / 4_000_000
        shaper = BandwidthShaper(FakeClock())
        tunnel = shaped_tunnel(client, side, ends, shaper, rate=Rate(4_000_000.0, 65_536))
        tunnel.start()
        client.feed(b"x" * (WRITE_HIGH_WATER + 1))
        assert upstream.protocol_paused and not client.is_reading()
        if clears_first == "shaping":
            await asyncio.sleep(hold + 0.05)  # the hold's timer has fired
            assert not client.is_reading(), "the upstream's full buffer still holds the client"
            upstream.drain()
            assert client.is_reading()
        else:
            upstream.drain()
            assert not client.is_reading(), "the shaping hold outlasts the backpressure"
            await reading_again(client)
        tunnel.abort("test over")
        await closed(ends, client, upstream)

    run(main())


def test_early_bytes_over_the_rate_keep_the_client_held_when_the_tunnel_starts() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = shaped_tunnel(client, side, ends, BandwidthShaper(FakeClock()))
        tunnel.start(b"e" * 1_500)
        assert upstream.written == b"e" * 1_500
        assert not client.is_reading(), "start() resumed a side that shaping holds"
        assert upstream.is_reading()
        await reading_again(client)
        tunnel.abort("test over")
        await closed(ends, client, upstream)

    run(main())


def test_closing_the_tunnel_cancels_its_hold_timers() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = shaped_tunnel(client, side, ends, BandwidthShaper(FakeClock()))
        tunnel.start()
        client.feed(b"u" * 1_000_000)  # ~100 s of debt each way
        upstream.feed(b"d" * 1_000_000)
        # private, but the point: a pending timer would keep the closed tunnel (and both
        # transports) alive on the loop for as long as the hold lasts
        holds = [tunnel._client_held, tunnel._upstream_held]
        assert all(hold is not None and not hold.cancelled() for hold in holds)
        client.feed_eof(ignore_pause=True)
        upstream.feed_eof(ignore_pause=True)
        ended = await closed(ends, client, upstream)
        assert ended.end_reason == "closed"
        assert all(hold is not None and hold.cancelled() for hold in holds)
        assert tunnel._client_held is None and tunnel._upstream_held is None

    run(main())


def test_two_tunnels_of_one_app_share_the_rate_and_another_app_is_not_slowed() -> None:
    async def main() -> None:
        shaper = BandwidthShaper(FakeClock())
        ends = Ends()
        legs = []
        for app in ("blog", "blog", "worker"):
            client = client_transport()
            side, upstream = connected_upstream()
            tunnel = shaped_tunnel(client, side, ends, shaper, app=app)
            tunnel.start()
            legs.append((tunnel, client, upstream))
        (_, first_client, _), (_, second_client, _), (_, other_client, _) = legs
        first_client.feed(b"1" * 1_000)  # the app's whole burst
        assert first_client.is_reading()
        second_client.feed(b"2")
        assert not second_client.is_reading(), "the second tunnel pays for the first one's bytes"
        other_client.feed(b"3" * 1_000)
        assert other_client.is_reading()
        for tunnel, _, _ in legs:
            tunnel.abort("test over")
        await until(lambda: len(ends.closed) == 3, "all three tunnels closed")
        assert all(client.lost and upstream.lost for _, client, upstream in legs)

    run(main())


def test_without_a_shaper_nothing_is_ever_held() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = Tunnel(client, side, idle_timeout=300, on_closed=ends)
        tunnel.start()
        before = (client.pause_reading_calls, upstream.pause_reading_calls)
        for _ in range(64):
            assert client.feed(b"u" * 65_536)
            assert upstream.feed(b"d" * 65_536)
        assert (client.pause_reading_calls, upstream.pause_reading_calls) == before
        assert tunnel.bytes_up == tunnel.bytes_down == 64 * 65_536
        tunnel.abort("test over")
        await closed(ends, client, upstream)

    run(main())


def test_a_shaped_tunnel_is_not_idle_while_held_but_times_out_once_really_idle() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        shaper = BandwidthShaper(FakeClock())
        tunnel = shaped_tunnel(client, side, ends, shaper, idle_timeout=0.05)
        tunnel.start()
        fed_at = loop.time()
        upstream.feed(b"d" * 3_000)  # 0.2 s of debt: four idle timeouts long
        await asyncio.sleep(0.15)
        assert not ends.closed and not client.aborted, "a held tunnel was killed as idle"
        ended = await closed(ends, client, upstream)
        assert ended.end_reason == "idle_timeout"  # nothing more came after the hold
        assert loop.time() - fed_at >= 0.2 + 0.05 - 0.005
        assert client.written == b"d" * 3_000

    run(main())
