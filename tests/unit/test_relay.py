"""The relay (Tunnel, UpstreamSide, ClientSide) driven callback by callback with fake transports.

What is asserted is what a peer would notice: the bytes and EOFs each side receives, in order,
when reading stops and starts again, how the tunnel ends and what it counted.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from egress.net.relay import WRITE_HIGH_WATER, WRITE_LOW_WATER, Tunnel, UpstreamSide
from tests.unit.fakes import FakeTransport, connected_upstream, run, until

CHUNK = 64 * 1024


class Ends:
    """Collects the tunnel's one end-of-life report."""

    def __init__(self) -> None:
        self.closed: list[Tunnel] = []
        self.event = asyncio.Event()

    def __call__(self, tunnel: Tunnel) -> None:
        self.closed.append(tunnel)
        self.event.set()


def client_transport(*, auto_drain: bool = True) -> FakeTransport:
    """A client whose handshake is done: the driver paused its reading before the dial."""
    client = FakeTransport(auto_drain=auto_drain)
    client.connect(asyncio.Protocol())
    client.pause_reading()
    return client


def make_tunnel(
    client: FakeTransport, side: UpstreamSide, ends: Ends, *, idle_timeout: float = 300.0
) -> Tunnel:
    return Tunnel(client, side, idle_timeout=idle_timeout, on_closed=ends)


async def closed(ends: Ends, *transports: FakeTransport, timeout: float = 2.0) -> Tunnel:
    """The tunnel's report, once: both transports are gone by then."""
    async with asyncio.timeout(timeout):
        await ends.event.wait()
    assert all(t.lost for t in transports)
    await asyncio.sleep(0)
    assert len(ends.closed) == 1, "on_closed must be called exactly once"
    return ends.closed[0]


def test_upstream_bytes_before_the_tunnel_reach_the_client_first_in_order() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        assert not upstream.is_reading()  # paused until the tunnel starts
        # uvloop may deliver reads despite the pause: two of them, before the tunnel exists
        upstream.feed(b"220 banner ", ignore_pause=True)
        upstream.feed(b"part two\r\n", ignore_pause=True)
        upstream.feed(b"queued while paused")  # a well-behaved loop holds this one back
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        assert client.written == b""  # nothing reaches the client before start()
        tunnel.start(b"EHLO me\r\n")
        assert client.written == b"220 banner part two\r\n"
        assert upstream.written == b"EHLO me\r\n"
        await until(lambda: upstream.pending_inbound == 0, "queued bytes delivered")
        upstream.feed(b" and later")
        assert client.written == b"220 banner part two\r\nqueued while paused and later"
        assert tunnel.bytes_down == len(client.written)
        assert tunnel.bytes_up == len(b"EHLO me\r\n")
        client.feed_eof()
        upstream.feed_eof()
        ended = await closed(ends, client, upstream)
        assert ended.end_reason == "closed"

    run(main())


def test_upstream_eof_before_the_tunnel_reaches_the_client_after_the_early_bytes() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        upstream.feed(b"bye", ignore_pause=True)
        upstream.feed_eof(ignore_pause=True)
        assert not upstream.is_closing()  # a half-close, kept for the tunnel
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        tunnel.start()
        assert client.written == b"bye"
        assert client.eof_written  # EOF passed through, after the bytes (write() would raise)
        assert not client.is_closing()
        client.feed(b"still talking")  # the other direction stays open
        assert upstream.written == b"still talking"
        client.feed_eof()
        ended = await closed(ends, client, upstream)
        assert (ended.bytes_up, ended.bytes_down) == (13, 3)
        assert ended.end_reason == "closed"

    run(main())


def test_upstream_reset_before_the_tunnel_closes_the_client_and_is_the_end_reason() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        upstream.feed(b"partial", ignore_pause=True)
        upstream.peer_reset(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
        await until(lambda: upstream.lost, "the reset reached the upstream side")
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        tunnel.start(b"request")
        assert client.written == b"partial"
        assert upstream.written == b""  # nothing is written to a connection that is gone
        assert client.closed_by_protocol and not client.aborted  # the bytes still get out
        ended = await closed(ends, client)
        assert ended.bytes_down == 7 and ended.bytes_up == 0
        assert ended.end_reason is not None and "ConnectionResetError" in ended.end_reason

    run(main())


def test_upstream_reset_during_the_tunnel_closes_the_client_and_is_the_end_reason() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        tunnel.start()
        upstream.feed(b"data")
        upstream.peer_reset(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
        ended = await closed(ends, client, upstream)
        assert client.written == b"data" and client.closed_by_protocol
        reason = "upstream: ConnectionResetError: [Errno 104] Connection reset by peer"
        assert ended.end_reason == reason

    run(main())


@pytest.mark.parametrize("direction", ["to-client", "to-upstream"])
def test_a_slow_reader_pauses_the_other_side_until_it_drains(direction: str) -> None:
    async def main() -> None:
        to_client = direction == "to-client"
        client = client_transport(auto_drain=not to_client)
        side, upstream = connected_upstream(auto_drain=to_client)
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        tunnel.start()
        slow, fast = (client, upstream) if to_client else (upstream, client)
        assert fast.is_reading()
        for _ in range(WRITE_HIGH_WATER // CHUNK):  # exactly at the mark: still reading
            fast.feed(b"x" * CHUNK)
        assert fast.is_reading()
        assert fast.feed(b"y")  # one byte over the high-water mark
        assert not fast.is_reading(), "the sender must be paused while the reader is slow"
        assert not fast.feed(b"z")  # held back by the pause, not relayed
        slow.drain(slow.buffered - WRITE_LOW_WATER - 1)
        assert not fast.is_reading()  # above the low-water mark: still paused
        slow.drain(1)
        assert fast.is_reading(), "reading resumes once the reader drained to the low mark"
        await until(lambda: fast.pending_inbound == 0, "held bytes delivered after resume")
        total = WRITE_HIGH_WATER + 2
        assert len(slow.written) == total and slow.written.endswith(b"yz")
        assert (tunnel.bytes_down if to_client else tunnel.bytes_up) == total
        slow.drain()
        tunnel.abort("test over")
        await closed(ends, client, upstream)

    run(main())


@pytest.mark.parametrize("direction", ["to-client", "to-upstream"])
def test_backpressure_from_early_bytes_holds_when_the_tunnel_starts(direction: str) -> None:
    """Bytes held from before the tunnel can fill the slow side's buffer inside start(): the
    pause that causes must not be undone by start() resuming both sides."""

    async def main() -> None:
        to_client = direction == "to-client"
        client = client_transport(auto_drain=not to_client)
        side, upstream = connected_upstream(auto_drain=to_client)
        early = b"e" * (WRITE_HIGH_WATER + 1)
        if to_client:
            upstream.feed(early, ignore_pause=True)
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        tunnel.start(b"" if to_client else early)
        slow, fast = (client, upstream) if to_client else (upstream, client)
        assert slow.buffered == len(early) and slow.protocol_paused
        assert not fast.is_reading(), "start() resumed a side the slow reader had paused"
        slow.drain()
        assert fast.is_reading()
        tunnel.abort("test over")
        await closed(ends, client, upstream)

    run(main())


def test_client_half_close_reaches_the_upstream_and_its_reply_still_flows() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        tunnel.start()
        client.feed(b"request")
        client.feed_eof()
        assert upstream.written == b"request" and upstream.eof_written
        assert not client.is_closing() and not upstream.is_closing()
        upstream.feed(b"reply")
        assert client.written == b"reply"
        assert not ends.closed
        upstream.feed_eof()
        ended = await closed(ends, client, upstream)
        assert ended.end_reason == "closed"
        assert (ended.bytes_up, ended.bytes_down) == (7, 5)

    run(main())


def test_client_eof_before_the_tunnel_goes_upstream_after_the_early_bytes() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = make_tunnel(client, side, ends)
        # the head first, then the client's early bytes, then its EOF (write() after
        # write_eof() would raise in the fake, as in asyncio)
        tunnel.start(b"body", upstream_bytes=b"head|", client_eof=True)
        assert upstream.written == b"head|body" and upstream.eof_written
        assert not client.is_closing()
        upstream.feed(b"answer")
        upstream.feed_eof()
        ended = await closed(ends, client, upstream)
        assert client.written == b"answer"
        assert (ended.bytes_up, ended.bytes_down) == (9, 6)

    run(main())


def test_an_idle_tunnel_is_aborted_and_activity_rearms_the_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = make_tunnel(client, side, ends, idle_timeout=0.05)
        started = loop.time()
        tunnel.start()
        await asyncio.sleep(0.03)  # the loop clock is what is under test here
        client.feed(b"ping")  # activity pushes the deadline out
        ended = await closed(ends, client, upstream)
        assert ended.end_reason == "idle_timeout"
        assert client.aborted and upstream.aborted
        assert loop.time() - started >= 0.08  # 0.03 of activity + 0.05 idle

    run(main())


class FailingFilter:
    """A stream filter whose upstream side sees a protocol violation."""

    done = False

    def client_data(self, data: bytes) -> bytes:
        return data

    def upstream_data(self, data: bytes) -> bytes:
        raise ValueError("bad status line")

    def upstream_eof(self) -> bytes:
        return b""

    def failure_reply(self, error: ValueError) -> bytes:
        return b"HTTP/1.1 502 Bad Gateway\r\n\r\n"


def test_a_filter_error_sends_its_reply_and_closes_both_sides() -> None:
    async def main() -> None:
        client = client_transport()
        side, upstream = connected_upstream()
        ends = Ends()
        tunnel = Tunnel(
            client, side, idle_timeout=300, on_closed=ends, stream_filter=FailingFilter()
        )
        tunnel.start()
        upstream.feed(b"garbage\r\n")
        ended = await closed(ends, client, upstream)
        assert client.written == b"HTTP/1.1 502 Bad Gateway\r\n\r\n"
        assert ended.end_reason == "protocol error: bad status line"

    run(main())
