"""The connection drivers (SOCKS5, HTTP CONNECT and forwarding, transparent) on fake transports.

Each test plays the client and the upstream byte by byte (see :mod:`tests.unit.fakes` for why
fakes) and checks what a user would notice: what the client receives and when, what reaches the
upstream, the connection's log line, the metrics and the registry.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import socket
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from egress.context import ConnectionContext, ProxySettings
from egress.net.connection import ClientConnection, HttpConnection, Socks5Connection
from egress.net.dialer import Dialled
from egress.net.relay import StreamFilter
from egress.net.transparent import TransparentConnection
from egress.outcomes import Outcome
from rules.decide import AppPolicy
from rules.snapshot import PolicySnapshot
from tests.unit.fakes import (
    APP_UID,
    OTHER_APP_UID,
    RULES,
    STRANGER_UID,
    FakeSocket,
    FakeTransport,
    Harness,
    make_snapshot,
    run,
    until,
)

API = IPv4Address("93.184.216.34")  # api.example.com in the fake resolver
WWW = IPv4Address("93.184.216.35")  # www.example.com
UPSTREAM_SOCKNAME = ("10.9.8.7", 40000)  # where the fake dial connects from


async def turns(count: int = 5) -> None:
    """Let the loop run ``count`` iterations (for asserting that nothing happens)."""
    for _ in range(count):
        await asyncio.sleep(0)


# --- the two proxy protocols, written from the RFCs (independent of egress.proto) -----------
def socks5_reply(code: int, bind: tuple[IPv4Address | IPv6Address, int] | None = None) -> bytes:
    address, port = bind if bind is not None else (IPv4Address(0), 0)
    atyp = 1 if address.version == 4 else 4
    return bytes((5, code, 0, atyp)) + address.packed + struct.pack("!H", port)


@dataclass(frozen=True)
class Flavour:
    """How a client of one listener asks for ``host:port`` and what it hears back."""

    listener: str
    factory: Callable[[ConnectionContext], ClientConnection]
    preamble: bytes  # what the client has received by the time its request is complete
    success: bytes  # the reply that turns the connection into a tunnel

    def request(self, client: FakeTransport, host: str, port: int, early: bytes = b"") -> None:
        if self.listener == "socks5":
            client.feed(b"\x05\x01\x00")  # version 5, one method: no authentication
            name = host.encode()
            head = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port)
        else:
            head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        client.feed(head + early)  # payload pipelined right behind the request

    def status(self, client: FakeTransport) -> int:
        """The reply code (SOCKS5) or HTTP status the client got after its request."""
        reply = bytes(client.written[len(self.preamble) :])
        if self.listener == "socks5":
            return reply[1]
        return int(reply.split(b" ", 2)[1])


SOCKS5 = Flavour(
    "socks5",
    Socks5Connection,
    preamble=b"\x05\x00",
    success=socks5_reply(0, (IPv4Address(UPSTREAM_SOCKNAME[0]), UPSTREAM_SOCKNAME[1])),
)
HTTP = Flavour(
    "http", HttpConnection, preamble=b"", success=b"HTTP/1.1 200 Connection established\r\n\r\n"
)
FLAVOURS = pytest.mark.parametrize("flavour", [SOCKS5, HTTP], ids=lambda f: f.listener)


def assert_released(h: Harness, connections: int = 1) -> None:
    """Every connection was released exactly once and nothing is left open or negative."""
    assert len(h.registry) == 0
    assert h.open_connections == 0
    assert min(h.registry.gauge_after_release, default=0.0) >= 0
    assert len(h.registry.releases) == connections
    assert set(h.registry.releases.values()) == {1}


def connections_counted(h: Harness, app: str, listener: str, decision: str, reason: str) -> float:
    labels = {"app": app, "listener": listener, "decision": decision, "reason": reason}
    return h.sample("egress_connections_total", **labels)


# --- happy paths -----------------------------------------------------------------------------
@FLAVOURS
def test_success_is_sent_only_after_the_dial_then_bytes_flow_both_ways(
    flavour: Flavour, tmp_path: Path
) -> None:
    async def main() -> None:
        h = Harness(connlog_path=tmp_path / "connections.log")  # the real log, via its thread
        try:
            _, client = h.accept(flavour.factory)
            flavour.request(client, "api.example.com", 443, early=b"hello")
            attempt = await h.dialer.next_attempt()
            assert (attempt.addresses, attempt.port) == ((API,), 443)
            await turns()
            assert client.written == flavour.preamble, "no success before the upstream connected"
            assert not client.is_reading()  # nothing more is read while deciding and dialling
            upstream = attempt.complete(sockname=UPSTREAM_SOCKNAME)
            await until(lambda: client.written != flavour.preamble, "the success reply")
            assert client.written == flavour.preamble + flavour.success
            assert upstream.written == b"hello"  # pipelined bytes go first
            assert h.sample("egress_open_tunnels", app="blog") == 1
            assert client.is_reading() and upstream.is_reading()
            client.feed(b" more")
            client.feed_eof()  # the client half-closes inside the tunnel...
            assert upstream.written == b"hello more" and upstream.eof_written
            upstream.feed(b"world")  # ...and still gets the answer
            assert client.written == flavour.preamble + flavour.success + b"world"
            assert not client.is_closing()
            upstream.feed_eof()
            [record] = await h.records()
        finally:
            h.close()
        assert record == record | {
            "listener": flavour.listener,
            "uid": APP_UID,
            "app": "blog",
            "rules_version": 3,
            "dest": "api.example.com:443",
            "dialed": "93.184.216.34:443",
            "decision": "allowed",
            "reason": "allowed",
            "rule": "api.example.com:443",
            "bytes_up": 10,
            "bytes_down": 5,
            "error": None,
        }
        assert connections_counted(h, "blog", flavour.listener, "allowed", "allowed") == 1
        assert h.sample("egress_bytes_total", app="blog", direction="up") == 10
        assert h.sample("egress_bytes_total", app="blog", direction="down") == 5
        assert h.sample("egress_open_tunnels", app="blog") == 0
        assert_released(h)

    run(main())


# --- refused at accept -----------------------------------------------------------------------
REFUSALS = [
    pytest.param(STRANGER_UID, "unknown_client", "denied", id="uid-in-no-app"),
    pytest.param(None, "unknown_client", "denied", id="no-local-owner"),
    pytest.param(
        OSError(errno.ENOENT, "No such file or directory"),
        "identity_error",
        "error",
        id="identify-raises-oserror",
    ),
]


@FLAVOURS
@pytest.mark.parametrize(("answer", "reason", "decision"), REFUSALS)
def test_refused_at_accept_without_reading_a_byte(
    flavour: Flavour, answer: int | OSError | None, reason: str, decision: str
) -> None:
    """Refused at accept: nothing is read. SOCKS5 clients get one fixed answer written in the
    same turn ("no acceptable method" and the reason record the sandbox shim reads); HTTP
    clients get nothing."""

    async def main() -> None:
        h = Harness()
        h.identify.answer = answer
        _, client = h.accept(flavour.factory)
        assert client.aborted
        written_at_accept = bytes(client.written)
        flavour.request(client, "api.example.com", 443)  # too late: nobody reads it
        [record] = await h.log.wait_for(1)
        await turns()
        assert client.written == written_at_accept  # nothing more after the request
        if flavour.listener == "socks5":
            fields = accept_refusal(client)
            assert fields["reason"] == reason and fields["decision"] == decision
            assert fields["uid"] == (answer if isinstance(answer, int) else None)
        else:
            assert written_at_accept == b""
        assert h.dialer.attempts == [] and h.resolver.lookups == []
        assert record["decision"] == decision and record["reason"] == reason
        assert record["app"] is None and record["dest"] is None
        assert record["uid"] == (answer if isinstance(answer, int) else None)
        if isinstance(answer, OSError):
            assert record["error"] == "identity lookup failed: No such file or directory"
        assert connections_counted(h, "_unknown", flavour.listener, decision, reason) == 1
        assert_released(h)
        assert len(h.log.records) == 1

    run(main())


def accept_refusal(client: FakeTransport) -> dict[str, object]:
    """The reason record of a SOCKS5 refusal at accept: ``05 FF``, two bytes of length, JSON."""
    written = bytes(client.written)
    assert written[:2] == b"\x05\xff", written
    length = int.from_bytes(written[2:4], "big")
    assert len(written) == 4 + length
    fields = json.loads(written[4:])
    assert isinstance(fields, dict)
    return fields


def test_over_max_connections_is_refused_before_identification() -> None:
    async def main() -> None:
        h = Harness(max_connections=2)
        held = [h.accept(Socks5Connection)[1] for _ in range(2)]
        assert h.open_connections == 2
        _, refused = h.accept(Socks5Connection)
        assert refused.aborted
        [record] = await h.log.wait_for(1)
        assert refused.written == b""  # a cap is transient: a bare reset, no "no method"
        assert (record["decision"], record["reason"], record["uid"]) == (
            "denied",
            "connection_limit",
            None,
        )
        assert len(h.identify.remotes) == 2  # the kernel was not even asked about the third
        assert h.sample("egress_connections_over_limit_total") == 1
        assert h.open_connections == 2 and len(h.registry) == 2
        for client in held:
            assert not client.is_closing()
            client.feed_eof()
        records = await h.log.wait_for(3)
        assert [r["reason"] for r in records[1:]] == ["client_closed"] * 2
        assert_released(h, connections=3)

    run(main())


def test_over_max_handshakes_per_app_is_refused_and_other_apps_are_not() -> None:
    async def main() -> None:
        h = Harness(max_handshakes_per_app=1)
        _, first = h.accept(Socks5Connection)
        _, second = h.accept(Socks5Connection)
        assert second.aborted and not first.is_closing()
        [record] = await h.log.wait_for(1)
        assert second.written == b""  # a cap is transient: a bare reset, no "no method"
        assert record | {"app": "blog", "uid": APP_UID} == record
        assert (record["decision"], record["reason"]) == ("denied", "handshake_limit")
        assert connections_counted(h, "blog", "socks5", "denied", "handshake_limit") == 1
        h.identify.answer = OTHER_APP_UID
        _, other_app = h.accept(Socks5Connection)
        assert not other_app.is_closing()
        assert h.registry.handshakes("blog") == 1 and h.registry.handshakes("worker") == 1
        # a complete request gives the slot back: the next blog client gets in
        SOCKS5.request(first, "api.example.com", 443)
        assert h.registry.handshakes("blog") == 0
        h.identify.answer = APP_UID
        _, third = h.accept(Socks5Connection)
        assert not third.is_closing()
        attempt = await h.dialer.next_attempt()
        attempt.fail(Outcome.CONNECT_REFUSED, "93.184.216.34:443: Connection refused")
        other_app.feed_eof()
        third.feed_eof()
        records = await h.log.wait_for(4)
        assert first.written == SOCKS5.preamble + socks5_reply(0x05)  # connection refused
        assert sorted(r["reason"] for r in records) == [
            "client_closed",
            "client_closed",
            "connect_refused",
            "handshake_limit",
        ]
        assert h.registry.handshakes("blog") == 0 and h.registry.handshakes("worker") == 0
        assert_released(h, connections=4)

    run(main())


def test_a_handshake_that_never_completes_times_out() -> None:
    async def main() -> None:
        h = Harness(settings=ProxySettings(handshake_timeout=0.05))
        _, client = h.accept(Socks5Connection)
        client.feed(b"\x05\x01\x00\x05\x01")  # greeting, then half a request
        [record] = await h.log.wait_for(1)
        assert client.aborted and client.written == b"\x05\x00"
        assert (record["decision"], record["reason"]) == ("error", "handshake_timeout")
        assert_released(h)

    run(main())


# --- the upstream before and after the success reply ----------------------------------------
@FLAVOURS
def test_upstream_bytes_before_the_tunnel_reach_the_client_after_the_success(
    flavour: Flavour,
) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        upstream = attempt.connect(sockname=UPSTREAM_SOCKNAME)
        # a server that talks first, read (the loop ignoring the pause) before dial() returned
        upstream.feed(b"220 ready\r\n", ignore_pause=True)
        upstream.feed(b"220 still ready\r\n", ignore_pause=True)
        await turns()
        assert client.written == flavour.preamble
        attempt.finish()
        await until(lambda: client.written != flavour.preamble, "the success reply")
        upstream.feed(b"later\r\n")
        expected = b"220 ready\r\n220 still ready\r\nlater\r\n"
        assert client.written == flavour.preamble + flavour.success + expected
        client.feed_eof()
        upstream.feed_eof()
        [record] = await h.log.wait_for(1)
        assert record["bytes_down"] == len(expected)
        assert h.sample("egress_bytes_total", app="blog", direction="down") == len(expected)
        assert_released(h)

    run(main())


RESET = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
RESET_REASON = "upstream: ConnectionResetError: [Errno 104] Connection reset by peer"


@FLAVOURS
@pytest.mark.parametrize("when", ["before-the-tunnel", "in-the-tunnel"])
def test_upstream_eof_is_passed_through_and_the_client_may_go_on(
    flavour: Flavour, when: str
) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        upstream = attempt.connect(sockname=UPSTREAM_SOCKNAME)
        if when == "before-the-tunnel":
            upstream.feed(b"bye\r\n", ignore_pause=True)
            upstream.feed_eof(ignore_pause=True)
            await turns()
        attempt.finish()
        await until(lambda: client.written != flavour.preamble, "the success reply")
        if when == "in-the-tunnel":
            upstream.feed(b"bye\r\n")
            upstream.feed_eof()
        assert client.written == flavour.preamble + flavour.success + b"bye\r\n"
        assert client.eof_written and not client.is_closing()  # a half-close, passed on
        client.feed(b"ack")
        assert upstream.written == b"ack"
        client.feed_eof()
        [record] = await h.log.wait_for(1)
        assert client.lost and upstream.lost
        assert (record["decision"], record["reason"], record["error"]) == (
            "allowed",
            "allowed",
            None,
        )
        assert (record["bytes_up"], record["bytes_down"]) == (3, 5)
        assert_released(h)

    run(main())


@FLAVOURS
@pytest.mark.parametrize("when", ["before-the-tunnel", "in-the-tunnel"])
def test_upstream_reset_closes_the_client_and_is_logged(flavour: Flavour, when: str) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443, early=b"request")
        attempt = await h.dialer.next_attempt()
        upstream = attempt.connect(sockname=UPSTREAM_SOCKNAME)
        if when == "before-the-tunnel":
            upstream.feed(b"partial", ignore_pause=True)
            upstream.peer_reset(RESET)
            await until(lambda: upstream.lost, "the reset reached the upstream side")
        attempt.finish()
        await until(lambda: client.written != flavour.preamble, "the success reply")
        if when == "in-the-tunnel":
            upstream.feed(b"partial")
            upstream.peer_reset(RESET)
        [record] = await h.log.wait_for(1)
        assert client.written == flavour.preamble + flavour.success + b"partial"
        assert client.closed_by_protocol and not client.aborted  # what was relayed gets out
        assert (record["decision"], record["reason"]) == ("allowed", "allowed")
        assert record["error"] == RESET_REASON
        assert record["bytes_down"] == 7
        assert record["bytes_up"] == (7 if when == "in-the-tunnel" else 0)
        assert_released(h)

    run(main())


@FLAVOURS
def test_a_failed_dial_is_answered_with_its_outcome(flavour: Flavour) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        attempt.fail(Outcome.CONNECT_REFUSED, "93.184.216.34:443: Connection refused")
        [record] = await h.log.wait_for(1)
        assert flavour.status(client) == (0x05 if flavour is SOCKS5 else 502)
        assert client.closed_by_protocol
        assert (record["decision"], record["reason"]) == ("error", "connect_refused")
        assert record["error"] == "93.184.216.34:443: Connection refused"
        assert_released(h)

    run(main())


# --- client half-close in every state ---------------------------------------------------------
@FLAVOURS
def test_client_half_close_during_the_handshake_ends_it(flavour: Flavour) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(flavour.factory)
        if flavour is SOCKS5:
            client.feed(b"\x05\x01\x00\x05\x01\x00")  # greeting and a partial request
        else:
            client.feed(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api")
        client.feed_eof()
        [record] = await h.log.wait_for(1)
        assert client.written == flavour.preamble  # no reply to an unfinished request
        assert client.closed_by_protocol
        assert (record["decision"], record["reason"]) == ("error", "client_closed")
        assert record["dest"] is None
        assert h.dialer.attempts == [] and h.resolver.lookups == []
        assert connections_counted(h, "blog", flavour.listener, "error", "client_closed") == 1
        assert_released(h)

    run(main())


@FLAVOURS
@pytest.mark.parametrize("delivery", ["despite-the-pause", "after-resume"])
def test_client_half_close_before_the_dial_completes_is_kept_and_passed_upstream(
    flavour: Flavour, delivery: str
) -> None:
    """The request is complete and the client half-closes (it sent all it had) while the dial
    is under way: its EOF reaches the upstream after its bytes, and the reply still flows."""

    async def main() -> None:
        h = Harness()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443, early=b"last words")
        # uvloop may deliver the EOF although reading is paused; asyncio holds it back
        client.feed_eof(ignore_pause=delivery == "despite-the-pause")
        attempt = await h.dialer.next_attempt()
        await turns()
        assert not client.is_closing(), "a half-closed client must not be torn down"
        upstream = attempt.complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: upstream.eof_written, "the client's EOF passed upstream")
        assert upstream.written == b"last words"
        assert client.written == flavour.preamble + flavour.success
        upstream.feed(b"the reply")
        assert client.written.endswith(b"the reply")
        upstream.feed_eof()
        [record] = await h.log.wait_for(1)
        assert (record["decision"], record["reason"], record["error"]) == (
            "allowed",
            "allowed",
            None,
        )
        assert (record["bytes_up"], record["bytes_down"]) == (10, 9)
        assert_released(h)

    run(main())


def test_client_going_away_during_the_dial_cancels_it() -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(Socks5Connection)
        SOCKS5.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        client.peer_reset()
        [record] = await h.log.wait_for(1)
        await until(lambda: attempt.cancelled, "the dial cancelled")
        assert (record["decision"], record["reason"]) == ("error", "client_closed")
        assert record["error"] == "client went away before the upstream connected"
        assert_released(h)

    run(main())


# --- transparent ------------------------------------------------------------------------------
def transparent_extra(original: tuple[IPv4Address, int] | None) -> dict[str, Any]:
    return {"socket": FakeSocket(original=original), "peername": ("10.0.0.2", 50000)}


def test_transparent_half_close_before_the_dial_is_not_torn_down() -> None:
    async def main() -> None:
        h = Harness()
        h.resolver.cached[API] = ("api.example.com",)  # the proxy resolved this name earlier
        _, client = h.accept(TransparentConnection, extra=transparent_extra((API, 443)))
        assert h.identify.remotes == [("93.184.216.34", 443)]  # looked up by the original dst
        attempt = await h.dialer.next_attempt()
        assert (attempt.addresses, attempt.port) == ((API,), 443)
        assert h.resolver.lookups == []  # no DNS: the client gave an address
        # the client believes it is connected: it talks and half-closes before the dial is done
        client.feed(b"GET / HTTP/1.0\r\n\r\n", ignore_pause=True)
        client.feed_eof(ignore_pause=True)
        await turns()
        assert not client.is_closing() and not client.aborted
        upstream = attempt.complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: upstream.eof_written, "the client's EOF passed upstream")
        assert upstream.written == b"GET / HTTP/1.0\r\n\r\n"
        upstream.feed(b"HTTP/1.0 200 OK\r\n\r\nhi")
        upstream.feed_eof()
        [record] = await h.log.wait_for(1)
        assert client.written == b"HTTP/1.0 200 OK\r\n\r\nhi"  # no proxy reply of any kind
        assert record == record | {
            "listener": "transparent",
            "dest": "93.184.216.34:443",
            "rule": "api.example.com:443",  # matched through the proxy's own DNS cache
            "decision": "allowed",
            "bytes_up": 18,
            "bytes_down": 21,
        }
        assert_released(h)

    run(main())


def test_transparent_connection_that_was_not_redirected_is_refused() -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(TransparentConnection, extra=transparent_extra(None))
        [record] = await h.log.wait_for(1)
        assert client.aborted and client.written == b""
        assert h.identify.remotes == []
        assert (record["reason"], record["error"]) == ("bad_request", "not a redirected connection")
        assert_released(h)

    run(main())


class _GoneSocket(FakeSocket):
    """A socket whose client reset before the protocol saw it: no peer name any more."""

    def getpeername(self) -> tuple[str, int]:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


def test_transparent_client_gone_before_connection_made_is_logged_not_raised() -> None:
    async def main() -> None:
        h = Harness()
        extra = {"socket": _GoneSocket(original=(API, 443)), "peername": None}
        _, client = h.accept(TransparentConnection, extra=extra)
        [record] = await h.log.wait_for(1)
        assert client.aborted
        assert h.identify.remotes == []
        assert (record["decision"], record["reason"]) == ("error", "client_closed")
        assert record["ts"] > 0 and record["duration_ms"] < 60_000
        assert_released(h)

    run(main())


# --- plain HTTP forwarding ------------------------------------------------------------------
def test_forwarded_get_counts_the_rewritten_head_as_bytes_up() -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(HttpConnection)
        client.feed(
            b"GET http://www.example.com/index.html?q=1 HTTP/1.1\r\n"
            b"Host: www.example.com\r\nProxy-Connection: keep-alive\r\nUser-Agent: t\r\n\r\n"
        )
        attempt = await h.dialer.next_attempt()
        assert (attempt.addresses, attempt.port) == ((WWW,), 80)
        upstream = attempt.complete()
        await until(lambda: upstream.written, "the request upstream")
        assert upstream.written.startswith(b"GET /index.html?q=1 HTTP/1.1\r\n")
        assert b"proxy-connection" not in upstream.written.lower()
        assert client.written == b""  # no "200 Connection established" for forwarding
        upstream.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        [record] = await h.log.wait_for(1)
        assert client.written.startswith(b"HTTP/1.1 200 OK\r\n")
        assert client.written.endswith(b"\r\n\r\nok")
        assert record["dest"] == "www.example.com:80" and record["rule"] == "www.example.com:80"
        assert record["bytes_up"] == len(upstream.written) > 0
        assert record["bytes_down"] == len(client.written)
        assert h.sample("egress_bytes_total", app="blog", direction="up") == record["bytes_up"]
        assert_released(h)

    run(main())


@pytest.mark.parametrize("arrival", ["with-the-head", "after-the-head"])
def test_forwarded_post_counts_the_body_as_bytes_up(arrival: str) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(HttpConnection)
        body = bytes(range(256)) * 20  # 5,120 bytes
        head = (
            b"POST http://www.example.com/upload HTTP/1.1\r\nHost: www.example.com\r\n"
            b"Content-Type: application/octet-stream\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        if arrival == "with-the-head":
            client.feed(head + body)
        else:
            client.feed(head + body[:1000])
            client.feed(body[1000:], ignore_pause=True)  # read before the dial completed
        attempt = await h.dialer.next_attempt()
        upstream = attempt.complete()
        await until(lambda: upstream.written.endswith(body), "the whole body upstream")
        upstream.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        [record] = await h.log.wait_for(1)
        assert upstream.written.startswith(b"POST /upload HTTP/1.1\r\n")
        assert record["bytes_up"] == len(upstream.written)
        assert record["bytes_up"] >= 5000 + len(b"POST /upload HTTP/1.1\r\n")
        assert client.written.startswith(b"HTTP/1.1 201 Created\r\n")
        assert_released(h)

    run(main())


# --- a bug while starting the tunnel ---------------------------------------------------------
class RaisingSuccess(Socks5Connection):
    def send_success(self, dialled: Dialled) -> None:
        raise RuntimeError("boom")


class RaisingStreamFilter(Socks5Connection):
    def stream_filter(self) -> StreamFilter | None:
        raise RuntimeError("boom")


class _BrokenFilter:
    done = False

    def client_data(self, data: bytes) -> bytes:
        raise RuntimeError("boom")  # not a protocol error (ValueError): a bug

    def upstream_data(self, data: bytes) -> bytes:
        return data

    def upstream_eof(self) -> bytes:
        return b""

    def failure_reply(self, error: ValueError) -> bytes:
        return b""


class FilterRaisingInStart(Socks5Connection):
    def stream_filter(self) -> StreamFilter | None:
        return _BrokenFilter()


class RaisingUpstreamHead(Socks5Connection):
    def upstream_head(self) -> bytes:
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "factory",
    [RaisingSuccess, RaisingStreamFilter, FilterRaisingInStart, RaisingUpstreamHead],
    ids=lambda f: f.__name__,
)
def test_an_exception_while_starting_the_tunnel_tears_both_sides_down(
    factory: Callable[[ConnectionContext], ClientConnection], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(factory)
        SOCKS5.request(client, "api.example.com", 443, early=b"early bytes")
        attempt = await h.dialer.next_attempt()
        upstream = attempt.complete()
        [record] = await h.log.wait_for(1)
        await until(lambda: client.lost and upstream.lost, "both transports gone")
        assert client.aborted and upstream.aborted
        assert (record["decision"], record["reason"]) == ("error", "upstream_error")
        assert record["error"] == "internal error starting the tunnel: RuntimeError"
        assert h.sample("egress_open_tunnels", app="blog") == 0
        await turns()
        assert len(h.log.records) == 1
        assert_released(h)

    run(main())
    assert "tunnel start failed" in caplog.text


# --- one deadline for the connect phase -----------------------------------------------------
@FLAVOURS
def test_dns_and_dial_share_one_connect_deadline(flavour: Flavour) -> None:
    async def main() -> None:
        timeout = 0.2
        h = Harness(settings=ProxySettings(connect_timeout=timeout))
        h.resolver.delay = 0.12  # a slow DNS server uses up most of the budget...
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()  # ...and this dial never completes
        assert attempt.deadline <= started + timeout + 0.01, "the dial got a fresh deadline"
        [record] = await h.log.wait_for(1, timeout=2 * timeout + 1)
        elapsed = loop.time() - started
        assert elapsed <= timeout + 0.1, f"connect phase took {elapsed:.3f} s"
        assert attempt.cancelled
        assert flavour.status(client) == (0x06 if flavour is SOCKS5 else 504)
        assert (record["decision"], record["reason"]) == ("error", "connect_timeout")
        assert_released(h)

    run(main())


@FLAVOURS
def test_dns_that_never_answers_ends_at_the_connect_deadline(flavour: Flavour) -> None:
    async def main() -> None:
        timeout = 0.1
        h = Harness(settings=ProxySettings(connect_timeout=timeout))
        h.resolver.hang = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, client = h.accept(flavour.factory)
        flavour.request(client, "api.example.com", 443)
        [record] = await h.log.wait_for(1, timeout=2 * timeout + 1)
        assert loop.time() - started <= timeout + 0.1
        assert h.dialer.attempts == []
        assert flavour.status(client) == (0x04 if flavour is SOCKS5 else 504)
        assert (record["decision"], record["reason"]) == ("error", "dns_timeout")
        assert_released(h)

    run(main())


# --- rate limiting ----------------------------------------------------------------------------
LIMITED_RULES: dict[str, Any] = {
    "app": [
        {
            "name": "blog",
            "uids": [APP_UID],
            "allow": ["api.example.com:443", "www.example.com:80"],
            # one connection, then one every 2.5 s
            "limits": {"connections_per_second": 0.4, "burst": 1},
        },
        {"name": "worker", "uids": [OTHER_APP_UID], "allow": ["*.example.org:443"]},
    ]
}


@FLAVOURS
def test_over_the_rate_is_429_with_retry_after_or_socks5_not_allowed(flavour: Flavour) -> None:
    """The app's bucket holds one connection: the second, at the same instant, is refused
    with the bucket's wait; once the clock has moved on by the interval, one goes through."""

    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=LIMITED_RULES))
        _, first = h.accept(flavour.factory)
        flavour.request(first, "api.example.com", 443)
        await until(lambda: len(h.dialer.attempts) == 1, "the first connection dials")
        _, client = h.accept(flavour.factory)
        flavour.request(client, "www.example.com", 80)
        [record] = await h.log.wait_for(1)
        assert len(h.dialer.attempts) == 1  # the second never dialled
        reply = bytes(client.written[len(flavour.preamble) :])
        if flavour is SOCKS5:
            assert reply == socks5_reply(0x02)  # connection not allowed by ruleset
        else:
            head = reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            assert head[0] == b"HTTP/1.1 429 Too Many Requests"
            assert b"Retry-After: 3" in head  # 2.5 s, rounded up to whole seconds
            assert any(
                line.startswith(b"Proxy-Status: egress; error=connection_limit_reached")
                for line in head
            )
        assert client.closed_by_protocol
        assert (record["decision"], record["reason"]) == ("denied", "rate_limited")
        assert record["rule"] == "www.example.com:80"
        assert "retry in 2.5 s" in record["error"]
        assert connections_counted(h, "blog", flavour.listener, "denied", "rate_limited") == 1
        assert (
            h.sample(
                "egress_ratelimit_decisions_total",
                app="blog",
                limit="connections",
                result="limited",
            )
            == 1
        )
        # another app has its own bucket (none); the blog's refills after 2.5 s
        h.now_us += 2_500_000
        _, again = h.accept(flavour.factory)
        flavour.request(again, "www.example.com", 80)
        await until(lambda: len(h.dialer.attempts) == 2, "a connection after the interval dials")

    run(main())


def limited_rules(limits: dict[str, Any], *, mode: str = "enforce") -> dict[str, Any]:
    blog = {
        "name": "blog",
        "uids": [APP_UID],
        "allow": ["api.example.com:443", "www.example.com:80"],
        "limits": limits,
        "mode": mode,
    }
    return {
        "app": [blog, {"name": "worker", "uids": [OTHER_APP_UID], "allow": ["*.example.org:443"]}]
    }


@FLAVOURS
def test_max_concurrent_holds_slots_from_the_decision_to_the_close(flavour: Flavour) -> None:
    """Two tunnels of the app may be open (or dialing); the third is refused until one
    closes; another app is not affected."""

    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=limited_rules({"max_concurrent": 2})))
        clients = []
        for index in range(2):
            _, client = h.accept(flavour.factory)
            flavour.request(client, "api.example.com", 443)
            await h.dialer.next_attempt(index)
            clients.append(client)
        attempt = h.dialer.attempts[0]
        attempt.complete(sockname=UPSTREAM_SOCKNAME)  # one tunnel open, one still dialing
        await until(lambda: h.registry.tunnel_slots("blog") == 2, "two slots held")
        _, third = h.accept(flavour.factory)
        flavour.request(third, "api.example.com", 443)
        [record] = await h.log.wait_for(1)
        assert len(h.dialer.attempts) == 2
        reply = bytes(third.written[len(flavour.preamble) :])
        if flavour is SOCKS5:
            assert reply == socks5_reply(0x02)
        else:
            head = reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            assert head[0] == b"HTTP/1.1 429 Too Many Requests"
            assert not any(line.startswith(b"Retry-After") for line in head)
        assert (record["decision"], record["reason"]) == ("denied", "too_many_connections")
        assert "2 tunnels open on this node; max_concurrent is 2" in record["error"]
        # the open tunnel closes: its slot is free for the next connection
        clients[0].peer_reset()
        await until(lambda: h.registry.tunnel_slots("blog") == 1, "the slot given back")
        _, fourth = h.accept(flavour.factory)
        flavour.request(fourth, "api.example.com", 443)
        await h.dialer.next_attempt(2)

    run(main())


def test_transparent_connection_over_the_rate_is_reset() -> None:
    async def main() -> None:
        rules = limited_rules({"connections_per_second": 1, "burst": 1})
        h = Harness(snapshot=make_snapshot(data=rules))
        h.resolver.cached[API] = ("api.example.com",)
        h.accept(TransparentConnection, extra=transparent_extra((API, 443)))
        await h.dialer.next_attempt()
        extra = transparent_extra((API, 443))
        _, second = h.accept(TransparentConnection, extra=extra)
        [record] = await h.log.wait_for(1)
        assert second.aborted and second.written == b""  # a reset: no reply to speak of
        linger = extra["socket"].options[socket.SOL_SOCKET, socket.SO_LINGER]
        assert struct.unpack("ii", linger) == (1, 0)  # so the close is a RST, not a FIN
        assert (record["listener"], record["reason"]) == ("transparent", "rate_limited")

    run(main())


@FLAVOURS
def test_report_mode_is_still_held_to_its_limits(flavour: Flavour) -> None:
    async def main() -> None:
        rules = limited_rules({"connections_per_second": 1, "burst": 1}, mode="report")
        h = Harness(snapshot=make_snapshot(data=rules))
        _, first = h.accept(flavour.factory)
        flavour.request(first, "api.example.com", 443)
        await h.dialer.next_attempt()
        _, second = h.accept(flavour.factory)
        flavour.request(second, "www.example.com", 80)
        [record] = await h.log.wait_for(1)
        assert (record["decision"], record["reason"]) == ("denied", "rate_limited")

    run(main())


@FLAVOURS
def test_a_denied_destination_spends_no_token(flavour: Flavour) -> None:
    """The rules decide first: a connection they deny never reaches the limiter."""

    async def main() -> None:
        h = Harness(
            snapshot=make_snapshot(data=limited_rules({"connections_per_second": 1, "burst": 1}))
        )
        _, denied = h.accept(flavour.factory)
        flavour.request(denied, "evil.example.net", 443)
        [record] = await h.log.wait_for(1)
        assert record["reason"] == "not_allowed"
        _, allowed = h.accept(flavour.factory)
        flavour.request(allowed, "api.example.com", 443)
        await h.dialer.next_attempt()

    run(main())


@FLAVOURS
def test_a_destination_limit_counts_each_destination_alone(flavour: Flavour) -> None:
    async def main() -> None:
        rules = limited_rules({"destination_connections_per_second": 1, "destination_burst": 1})
        h = Harness(snapshot=make_snapshot(data=rules))
        _, first = h.accept(flavour.factory)
        flavour.request(first, "api.example.com", 443)
        await h.dialer.next_attempt(0)
        _, other = h.accept(flavour.factory)
        flavour.request(other, "www.example.com", 80)  # another destination: its own bucket
        await h.dialer.next_attempt(1)
        _, again = h.accept(flavour.factory)
        flavour.request(again, "api.example.com", 443)
        [record] = await h.log.wait_for(1)
        assert record["reason"] == "rate_limited"
        assert "over 1 connection to this destination per second" in record["error"]

    run(main())


@FLAVOURS
def test_a_destination_spelled_another_way_is_the_same_destination(flavour: Flavour) -> None:
    """::ffff:93.184.216.34 is 93.184.216.34 to the rules, so it is to the destination limit."""

    async def main() -> None:
        rules = limited_rules({"destination_connections_per_second": 1, "destination_burst": 1})
        rules["app"][0]["allow"].append("93.184.216.34:443")
        h = Harness(snapshot=make_snapshot(data=rules))
        _, first = h.accept(flavour.factory)
        flavour.request(first, "93.184.216.34", 443)
        await h.dialer.next_attempt(0)
        _, again = h.accept(flavour.factory)
        spelled = "::ffff:93.184.216.34" if flavour is SOCKS5 else "[::ffff:93.184.216.34]"
        flavour.request(again, spelled, 443)
        [record] = await h.log.wait_for(1)
        assert record["reason"] == "rate_limited"

    run(main())


# --- snapshots --------------------------------------------------------------------------------
class WeakSnapshot(PolicySnapshot):
    """PolicySnapshot is a slots dataclass without ``__weakref__``; this test-only subclass
    adds one so a test can see whether anything still holds it."""

    __slots__ = ("__weakref__",)


class WeakAppPolicy(AppPolicy):
    __slots__ = ("__weakref__",)


def weak_snapshot(version: int) -> WeakSnapshot:
    built = make_snapshot(version)
    apps = {
        name: WeakAppPolicy(p.app, p.rules, p.opened, p.exceptions)
        for name, p in built.apps.items()
    }
    return WeakSnapshot(built.ruleset, built.exceptions, apps)


def test_a_long_lived_tunnel_keeps_neither_the_snapshot_nor_its_app_alive() -> None:
    async def main() -> None:
        snapshot = weak_snapshot(3)
        snapshot_ref = weakref.ref(snapshot)
        app_ref = weakref.ref(snapshot.apps["blog"])
        h = Harness(snapshot=snapshot)
        del snapshot
        conn, client = h.accept(Socks5Connection)
        SOCKS5.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        upstream = attempt.complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: client.written == SOCKS5.preamble + SOCKS5.success, "the tunnel")
        await turns()  # the connection's task has finished
        gc.collect()
        assert snapshot_ref() is not None  # the holder still has it: the probe can see life
        h.rules.current = make_snapshot(4)  # a reload
        gc.collect()
        assert snapshot_ref() is None, "a tunnel keeps the old snapshot alive"
        assert app_ref() is None, "a tunnel keeps its app's compiled rules alive"
        client.feed(b"ping")
        upstream.feed(b"pong")
        assert upstream.written == b"ping" and client.written.endswith(b"pong")
        client.feed_eof()
        upstream.feed_eof()
        [record] = await h.log.wait_for(1)
        assert (record["rules_version"], record["app"]) == (3, "blog")
        assert conn.finished
        assert_released(h)

    run(main())


def test_a_connection_decides_under_the_rules_it_was_accepted_with() -> None:
    async def main() -> None:
        snapshot = weak_snapshot(3)
        app_ref = weakref.ref(snapshot.apps["blog"])
        h = Harness(snapshot=snapshot)
        del snapshot
        _, client = h.accept(Socks5Connection)
        # a reload that takes api.example.com away from blog lands mid-handshake
        stricter = {"app": [{**RULES["app"][0], "allow": ["www.example.com:80"]}]}
        h.rules.current = make_snapshot(4, stricter)
        gc.collect()
        assert app_ref() is not None  # the connection holds its app until it is decided
        SOCKS5.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        attempt.complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: client.written == SOCKS5.preamble + SOCKS5.success, "the tunnel")
        client.peer_reset()
        [record] = await h.log.wait_for(1)
        assert (record["rules_version"], record["decision"]) == (3, "allowed")
        _, late = h.accept(Socks5Connection)  # a new client gets the new rules
        SOCKS5.request(late, "api.example.com", 443)
        records = await h.log.wait_for(2)
        assert late.written == SOCKS5.preamble + socks5_reply(0x02)
        assert (records[1]["rules_version"], records[1]["reason"]) == (4, "not_allowed")
        assert_released(h, connections=2)

    run(main())


# --- the reason channel (egress's private SOCKS5 method, 0xE5) ---------------------------------
def egress_request(client: FakeTransport, host: str, port: int) -> None:
    """What the sandbox shim sends: a greeting offering 0xE5 and no-auth, the request behind it."""
    name = host.encode()
    client.feed(
        b"\x05\x02\xe5\x00"
        + b"\x05\x01\x00\x03"
        + bytes([len(name)])
        + name
        + port.to_bytes(2, "big")
    )


def reason_record(after: bytes) -> dict[str, object]:
    length = int.from_bytes(after[:2], "big")
    assert len(after) == 2 + length, after
    fields = json.loads(after[2:])
    assert isinstance(fields, dict)
    return fields


def test_a_denial_under_the_private_method_says_who_where_and_why() -> None:
    async def main() -> None:
        h = Harness()
        _, client = h.accept(Socks5Connection)
        egress_request(client, "evil.example.net", 443)
        [record] = await h.log.wait_for(1)
        written = bytes(client.written)
        assert written[:2] == b"\x05\xe5"  # the private method was chosen
        assert written[2:12] == socks5_reply(0x02)
        fields = reason_record(written[12:])
        assert fields == {
            "reason": "not_allowed",
            "decision": "denied",
            "app": "blog",
            "uid": APP_UID,
            "destination": "evil.example.net:443",
            "detail": fields["detail"],
            "retry_after": None,
        }
        assert record["reason"] == "not_allowed"

    run(main())


def test_a_rate_limited_refusal_under_the_private_method_carries_the_wait() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=LIMITED_RULES))
        _, first = h.accept(Socks5Connection)
        egress_request(first, "api.example.com", 443)
        await until(lambda: len(h.dialer.attempts) == 1, "the first connection dials")
        _, client = h.accept(Socks5Connection)
        egress_request(client, "www.example.com", 80)
        await h.log.wait_for(1)
        fields = reason_record(bytes(client.written)[12:])
        assert (fields["reason"], fields["app"]) == ("rate_limited", "blog")
        assert fields["retry_after"] == 2.5

    run(main())


CREDENTIALS_RULES = {
    "app": [
        {
            "name": "blog",
            "uids": [APP_UID],
            "allow": ["api.example.com:443"],
            "proxy_auth": {"username": "u", "password_sha256": "0" * 64},
        }
    ]
}


def test_no_record_follows_a_method_the_client_chose_other_than_0xe5() -> None:
    """A client offering 0xE5 and username/password to an app that needs credentials gets
    username/password, and its refusals are plain RFC 1928/1929 bytes."""

    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=CREDENTIALS_RULES))
        _, client = h.accept(Socks5Connection)
        client.feed(b"\x05\x02\xe5\x02" + b"\x01\x01u\x01p")
        await h.log.wait_for(1)
        assert bytes(client.written) == b"\x05\x02" + b"\x01\x01"  # auth failure, no record

    run(main())


def test_plain_socks5_clients_never_see_a_record() -> None:
    """The same denial for a client that did not offer 0xE5: the RFC 1928 reply, nothing else."""

    async def main() -> None:
        h = Harness()
        _, client = h.accept(Socks5Connection)
        SOCKS5.request(client, "evil.example.net", 443)
        await h.log.wait_for(1)
        assert bytes(client.written) == b"\x05\x00" + socks5_reply(0x02)

    run(main())


def test_an_app_that_needs_credentials_tells_the_shim_so() -> None:
    """The shim sends no credentials: 'no acceptable method' and the record saying why."""

    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=CREDENTIALS_RULES))
        _, client = h.accept(Socks5Connection)
        egress_request(client, "api.example.com", 443)
        [record] = await h.log.wait_for(1)
        written = bytes(client.written)
        assert written[:2] == b"\x05\xff"
        fields = reason_record(written[2:])
        assert (fields["reason"], fields["app"]) == ("auth_required", "blog")
        assert "credentials" in str(fields["detail"])
        assert record["reason"] == "auth_required"

    run(main())
