"""The sandbox DNS listener's transports under bad and awkward input: what arrives from a
sandboxed program is behaviour to pin down, not an error to hope away.

Each test runs the in-process proxy with ``proxy.dns_listen`` on a free loopback port, in a
fresh network namespace (so the UDP owner lookups see only this test's sockets), and talks to it
straight, with sockets the kernel records as owned by app uids (``tests.support.socket_as_uid``);
no firewall is involved. The proxy's upstream is a DNS stub that records every question. The
answers are public addresses (outside every special-purpose range) that nothing connects to.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from egress import dnslistener
from egress.proto.dns import MAX_QUERY_BYTES
from tests.configs import base_config, write_config
from tests.dnsstub import DnsStub
from tests.polling import eventually
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    STRANGER_UID,
    ProxyHandle,
    open_as_uid,
    run,
    running_proxy,
    socket_as_uid,
)

pytestmark = pytest.mark.netns

WEB_V4 = "93.184.215.14"
SHOP_V4 = "93.184.215.15"
SLOW_V4 = "93.184.215.16"
WEB_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
NO_REPLY_SECONDS = 0.5  # how long "no reply" is waited for


@pytest.fixture(autouse=True)
def _namespace(netns: object) -> Iterator[None]:
    """Every test runs in its own network namespace (the ``netns`` fixture)."""
    yield


def config(stub: DnsStub, dns_listen: str = "127.0.0.1:0") -> dict[str, Any]:
    return base_config(
        proxy={"dns_listen": dns_listen, "dns_queries_per_second": 1000.0, "dns_burst": 1000},
        resolver={"nameservers": [stub.address], "timeout": 5.0, "attempts": 1},
        app=[
            {
                "name": "blog",
                "uids": [str(APP_UID)],
                "allow": ["web.example.test:443", "slow.example.test:443"],
            },
            {"name": "shop", "uids": [str(OTHER_APP_UID)], "allow": ["shop.example.test:443"]},
        ],
    )


def stub_records() -> dict[str, list[str]]:
    return {
        "web.example.test": [WEB_V4, WEB_V6],
        "shop.example.test": [SHOP_V4],
        "slow.example.test": [SLOW_V4],
    }


def listener(proxy: ProxyHandle) -> tuple[str, int]:
    dns = proxy.runtime.dns_listener
    assert dns is not None
    host, _, port = dns.address.rpartition(":")
    return host.strip("[]"), int(port)


def query(name: str, qtype: str = "A", *, qid: int = 0x4242, edns: bool = False) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        record.add_ar(EDNS0(udp_len=1232))
    return bytes(record.pack())


def addresses(reply: DNSRecord) -> list[str]:
    return [str(record.rdata) for record in reply.rr]


def ede_text(reply: DNSRecord) -> str:
    """The Extended DNS Error text of ``reply``, as bytes decoded loosely (dnslib keeps the
    option raw)."""
    for record in reply.ar:
        if record.rtype == QTYPE.OPT:
            return b"".join(bytes(option.data) for option in record.rdata).decode(
                "utf-8", "replace"
            )
    return ""


# --- UDP --------------------------------------------------------------------------------------


def udp_socket(uid: int, family: int = socket.AF_INET) -> socket.socket:
    sock = socket_as_uid(uid, family, socket.SOCK_DGRAM)
    sock.setblocking(True)
    return sock


def _exchange(
    sock: socket.socket, data: bytes, address: tuple[str, int] | None, timeout: float
) -> bytes | None:
    """Send ``data`` (to ``address``, or the connected peer) and wait for one datagram.
    Blocking: called through ``asyncio.to_thread`` so the proxy's loop keeps running."""
    if address is None:
        sock.send(data)
    else:
        sock.sendto(data, address)
    return _receive([sock], timeout)


def _receive(socks: list[socket.socket], timeout: float) -> bytes | None:
    """The first datagram any of ``socks`` receives within ``timeout``."""
    ready, _, _ = select.select(socks, [], [], timeout)
    return ready[0].recv(65535) if ready else None


async def ask_udp(
    sock: socket.socket,
    data: bytes,
    address: tuple[str, int] | None,
    *,
    timeout: float = 5.0,
) -> DNSRecord:
    raw = await asyncio.to_thread(_exchange, sock, data, address, timeout)
    assert raw is not None, "no reply from the DNS listener"
    return DNSRecord.parse(raw)


async def no_udp_reply(sock: socket.socket, data: bytes, address: tuple[str, int]) -> bool:
    return await asyncio.to_thread(_exchange, sock, data, address, NO_REPLY_SECONDS) is None


GARBAGE = [
    b"",
    b"\x00",
    b"\x12\x34\x01",  # a header cut short
    b"\xff" * 11,
    bytes(range(256)) * 5,  # over MAX_QUERY_BYTES
    query("web.example.test").replace(b"\x01\x00", b"\x81\x80", 1),  # QR set: a response
]


def test_garbage_datagrams_get_no_reply_and_the_next_query_is_answered(
    loop_kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                address = listener(proxy)
                with udp_socket(APP_UID) as sock:
                    for junk in GARBAGE:
                        assert await no_udp_reply(sock, junk, address), junk[:16]
                    reply = await ask_udp(sock, query("web.example.test"), address)
                assert reply.header.rcode == RCODE.NOERROR
                assert addresses(reply) == [WEB_V4]
                assert proxy.runtime.dns_listener is not None
                assert proxy.runtime.dns_listener.handler.in_flight == 0
                counts = proxy.runtime.metrics.dns_listener_queries
                # every garbage datagram was read and counted, none was answered
                assert counts[("_unknown", "refused")] == len(GARBAGE)
        assert ("web.example.test", "A") in stub.queries
        assert {name for name, _ in stub.queries} == {"web.example.test"}

    run(loop_kind, main())


def test_query_with_trailing_junk_gets_formerr(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                address = listener(proxy)
                with udp_socket(APP_UID) as sock:
                    bad = await ask_udp(sock, query("web.example.test", qid=7) + b"junk", address)
                    # two questions, answer records, class CH: each answered by its rcode
                    two = DNSRecord(DNSHeader(id=8, rd=1))
                    two.add_question(DNSQuestion("web.example.test"))
                    two.add_question(DNSQuestion("shop.example.test"))
                    formerr = await ask_udp(sock, bytes(two.pack()), address)
                    chaos = DNSRecord(
                        DNSHeader(id=9, rd=1), q=DNSQuestion("version.bind", QTYPE.TXT, 3)
                    )
                    refused = await ask_udp(sock, bytes(chaos.pack()), address)
                    good = await ask_udp(sock, query("web.example.test", qid=10), address)
        assert (bad.header.id, bad.header.qr, bad.header.rcode) == (7, 1, RCODE.FORMERR)
        assert (formerr.header.id, formerr.header.rcode) == (8, RCODE.FORMERR)
        assert (refused.header.id, refused.header.rcode) == (9, RCODE.REFUSED)
        assert (good.header.id, good.header.rcode) == (10, RCODE.NOERROR)
        assert {name for name, _ in stub.queries} == {"web.example.test"}

    run(loop_kind, main())


def test_big_two_question_query_gets_formerr(loop_kind: str, tmp_path: Path) -> None:
    """Its FORMERR reply, questions echoed, would not fit 512 bytes (once: TooBig in the
    query's task, an unhandled loop error and no reply)."""

    async def main() -> None:
        names = [".".join([c * 63] * 3 + [c * 61]) for c in "ab"]  # two 253-character names
        big = DNSRecord(DNSHeader(id=11, rd=1))
        for name in names:
            big.add_question(DNSQuestion(name))
        wire = bytes(big.pack())
        assert 512 < len(wire) <= MAX_QUERY_BYTES
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                with udp_socket(APP_UID) as sock:
                    reply = await ask_udp(sock, wire, listener(proxy), timeout=2.0)
        assert (reply.header.id, reply.header.rcode) == (11, RCODE.FORMERR)

    run(loop_kind, main())


def test_identity_of_unconnected_connected_and_dual_stack_udp_sockets(
    loop_kind: str, tmp_path: Path
) -> None:
    """Each query is answered for the app the kernel says sent it: web.example.test is blog's,
    so blog's sockets get its address and shop's get NXDOMAIN; a uid in no app is refused."""

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                host, port = listener(proxy)
                web = query("web.example.test", edns=True)
                with udp_socket(APP_UID) as unconnected:
                    first = await ask_udp(unconnected, web, (host, port))
                with udp_socket(APP_UID) as connected:
                    connected.connect((host, port))
                    second = await ask_udp(connected, web, None)
                with udp_socket(APP_UID, socket.AF_INET6) as dual:
                    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    third = await ask_udp(dual, web, (f"::ffff:{host}", port))
                with udp_socket(OTHER_APP_UID) as shop:
                    other = await ask_udp(shop, web, (host, port))
                    own = await ask_udp(shop, query("shop.example.test"), (host, port))
                with udp_socket(STRANGER_UID) as stranger:
                    refused = await ask_udp(stranger, web, (host, port))
                records = await proxy.wait_records(6)
        for reply in (first, second, third):
            assert reply.header.rcode == RCODE.NOERROR and addresses(reply) == [WEB_V4]
        assert other.header.rcode == RCODE.NXDOMAIN
        assert "may not connect to web.example.test" in ede_text(other)
        assert own.header.rcode == RCODE.NOERROR and addresses(own) == [SHOP_V4]
        assert refused.header.rcode == RCODE.REFUSED
        assert f"uid {STRANGER_UID} belongs to no app" in ede_text(refused)
        uids = sorted(r["uid"] for r in records if r["listener"] == "dns")
        assert uids == sorted([APP_UID] * 3 + [OTHER_APP_UID] * 2 + [STRANGER_UID])

    run(loop_kind, main())


def _reuse(sock: socket.socket, host: str, port: int) -> int:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return int(sock.getsockname()[1])


def test_two_uids_sharing_a_port_are_refused_as_ambiguous(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                address = listener(proxy)
                with udp_socket(APP_UID) as blog, udp_socket(OTHER_APP_UID) as shop:
                    port = _reuse(blog, "127.0.0.1", 0)
                    _reuse(shop, "127.0.0.1", port)
                    shop.sendto(query("shop.example.test", edns=True), address)
                    raw = await asyncio.to_thread(_receive, [blog, shop], 5.0)
                records = await proxy.wait_records(1)
        assert raw is not None
        reply = DNSRecord.parse(raw)
        assert reply.header.rcode == RCODE.REFUSED
        assert f"UDP port {port} is shared by sockets of uids" in ede_text(reply)
        (record,) = [r for r in records if r["listener"] == "dns"]
        assert (record["app"], record["reason"]) == (None, "identity_error")
        assert {name for name, _ in stub.queries}.isdisjoint({"shop.example.test"})

    run(loop_kind, main())


def test_ipv4_and_dual_stack_sockets_of_two_uids_sharing_a_port_are_ambiguous(
    loop_kind: str, tmp_path: Path
) -> None:
    """Both families are consulted for an IPv4 sender (AF_INET6 sockets were once consulted
    only when no AF_INET socket held the port, so shop's query was judged as blog's)."""

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                host, port = listener(proxy)
                blog = udp_socket(APP_UID)
                shop = udp_socket(OTHER_APP_UID, socket.AF_INET6)
                with blog, shop:
                    shared = _reuse(blog, "0.0.0.0", 0)
                    shop.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    _reuse(shop, "::", shared)
                    # shop sends; the kernel delivers the reply to blog's (IPv4) socket
                    shop.sendto(query("web.example.test", edns=True), (f"::ffff:{host}", port))
                    raw = await asyncio.to_thread(_receive, [blog, shop], 5.0)
        assert raw is not None
        assert DNSRecord.parse(raw).header.rcode == RCODE.REFUSED  # not blog's NOERROR

    run(loop_kind, main())


def test_ipv6_listener(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub, "[::1]:0"), tmp_path) as proxy:
                host, port = listener(proxy)
                assert host == "::1"
                with udp_socket(APP_UID, socket.AF_INET6) as sock:
                    udp = await ask_udp(sock, query("web.example.test", "AAAA"), (host, port))
                with udp_socket(OTHER_APP_UID, socket.AF_INET6) as sock:
                    denied = await ask_udp(sock, query("web.example.test", "AAAA"), (host, port))
                reader, writer = await open_as_uid(APP_UID, host, port)
                try:
                    tcp = await ask_tcp(reader, writer, query("web.example.test"))
                finally:
                    writer.close()
        assert udp.header.rcode == RCODE.NOERROR and addresses(udp) == [WEB_V6]
        assert denied.header.rcode == RCODE.NXDOMAIN
        assert tcp.header.rcode == RCODE.NOERROR and addresses(tcp) == [WEB_V4]

    run(loop_kind, main())


def test_one_app_over_its_queries_in_flight_is_refused_another_is_answered(
    loop_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One app's slow lookups hold only its own share: past MAX_IN_FLIGHT_PER_APP it is
    refused at once, and another app's query is answered meanwhile, without waiting."""
    monkeypatch.setattr(dnslistener, "MAX_IN_FLIGHT_PER_APP", 2)
    delay = 2.0

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            stub.set("slow.example.test", [SLOW_V4], delay=delay)
            async with running_proxy(config(stub), tmp_path) as proxy:
                address = listener(proxy)
                handler = proxy.runtime.dns_listener.handler  # type: ignore[union-attr]
                slow = [udp_socket(APP_UID) for _ in range(2)]
                try:
                    started = time.monotonic()
                    waiting = [
                        asyncio.create_task(
                            ask_udp(s, query("slow.example.test", qid=i), address, timeout=10)
                        )
                        for i, s in enumerate(slow)
                    ]
                    await eventually(lambda: handler.in_flight == 2 or None, "2 in flight")
                    with udp_socket(APP_UID) as third:
                        over = await ask_udp(third, query("web.example.test", edns=True), address)
                    refused_after = time.monotonic() - started
                    with udp_socket(OTHER_APP_UID) as shop:
                        other = await ask_udp(shop, query("shop.example.test"), address)
                    other_after = time.monotonic() - started
                    assert handler.in_flight == 2  # blog's two are still waiting upstream
                    answered = await asyncio.gather(*waiting)
                finally:
                    for s in slow:
                        s.close()
                counts = dict(proxy.runtime.metrics.dns_listener_queries)
        assert over.header.rcode == RCODE.REFUSED
        assert 'app "blog" has 2 DNS queries in flight' in ede_text(over)
        assert other.header.rcode == RCODE.NOERROR and addresses(other) == [SHOP_V4]
        assert refused_after < delay and other_after < delay
        for reply in answered:
            assert reply.header.rcode == RCODE.NOERROR and addresses(reply) == [SLOW_V4]
        assert counts[("blog", "refused")] == 1
        assert counts[("blog", "answered")] == 2
        assert counts[("shop", "answered")] == 1

    run(loop_kind, main())


# --- TCP ------------------------------------------------------------------------------------


async def ask_tcp(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> DNSRecord:
    writer.write(len(data).to_bytes(2, "big") + data)
    return await read_tcp_reply(reader)


async def read_tcp_reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> DNSRecord:
    async with asyncio.timeout(timeout):
        length = int.from_bytes(await reader.readexactly(2), "big")
        return DNSRecord.parse(await reader.readexactly(length))


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """Whether the listener closes the connection (EOF or reset) within ``timeout``, having
    sent nothing."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def tcp_as(uid: int, proxy: ProxyHandle) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await open_as_uid(uid, *listener(proxy))


def test_tcp_query_split_byte_by_byte(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                reader, writer = await tcp_as(APP_UID, proxy)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                data = query("web.example.test", qid=21)
                try:
                    for byte in len(data).to_bytes(2, "big") + data:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.002)
                    reply = await read_tcp_reply(reader)
                    again = await ask_tcp(reader, writer, query("web.example.test", qid=22))
                finally:
                    writer.close()
        assert (reply.header.id, reply.header.rcode) == (21, RCODE.NOERROR)
        assert addresses(reply) == [WEB_V4]
        assert again.header.id == 22  # the connection goes on

    run(loop_kind, main())


def test_tcp_pipelined_queries_are_answered_in_order(loop_kind: str, tmp_path: Path) -> None:
    """Two queries in one write, the first slow upstream: the second waits for it (answers
    in order, RFC 7766 allows either; this listener keeps order)."""

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            stub.set("slow.example.test", [SLOW_V4], delay=0.5)
            async with running_proxy(config(stub), tmp_path) as proxy:
                reader, writer = await tcp_as(APP_UID, proxy)
                first = query("slow.example.test", qid=31)
                second = query("web.example.test", qid=32)
                try:
                    writer.write(
                        len(first).to_bytes(2, "big")
                        + first
                        + len(second).to_bytes(2, "big")
                        + second
                    )
                    replies = [await read_tcp_reply(reader), await read_tcp_reply(reader)]
                finally:
                    writer.close()
        assert [(r.header.id, r.header.rcode) for r in replies] == [
            (31, RCODE.NOERROR),
            (32, RCODE.NOERROR),
        ]
        assert addresses(replies[0]) == [SLOW_V4] and addresses(replies[1]) == [WEB_V4]

    run(loop_kind, main())


def test_tcp_many_pipelined_queries_are_all_answered(loop_kind: str, tmp_path: Path) -> None:
    """More queries in one write than the connection answers at once: reading pauses and
    resumes, and every one is answered, in order."""

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                reader, writer = await tcp_as(APP_UID, proxy)
                queries = [query("web.example.test", qid=100 + i) for i in range(20)]
                try:
                    writer.write(b"".join(len(q).to_bytes(2, "big") + q for q in queries))
                    replies = [await read_tcp_reply(reader) for _ in queries]
                finally:
                    writer.close()
        assert [r.header.id for r in replies] == list(range(100, 120))
        assert all(r.header.rcode == RCODE.NOERROR for r in replies)

    run(loop_kind, main())


@pytest.mark.parametrize(
    "prefix",
    [(MAX_QUERY_BYTES + 1).to_bytes(2, "big"), b"\xff\xff", b"\x00\x00"],
    ids=["1025", "65535", "zero"],
)
def test_tcp_bad_length_prefix_closes_the_connection(
    loop_kind: str, tmp_path: Path, prefix: bytes
) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                reader, writer = await tcp_as(APP_UID, proxy)
                try:
                    writer.write(prefix + b"\x00" * 16)
                    assert await closed_by_peer(reader)
                finally:
                    writer.close()
                # the listener itself goes on
                reader, writer = await tcp_as(APP_UID, proxy)
                try:
                    reply = await ask_tcp(reader, writer, query("web.example.test"))
                finally:
                    writer.close()
        assert reply.header.rcode == RCODE.NOERROR

    run(loop_kind, main())


def test_tcp_length_of_max_query_bytes_is_read(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                reader, writer = await tcp_as(APP_UID, proxy)
                data = query("web.example.test", qid=41)
                data += b"\x00" * (MAX_QUERY_BYTES - len(data))  # trailing junk: FORMERR
                try:
                    reply = await ask_tcp(reader, writer, data)
                finally:
                    writer.close()
        assert (reply.header.id, reply.header.rcode) == (41, RCODE.FORMERR)

    run(loop_kind, main())


def test_tcp_garbage_query_with_no_header_closes_the_connection(
    loop_kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                reader, writer = await tcp_as(APP_UID, proxy)
                try:
                    writer.write(b"\x00\x03abc")  # a "query" too short for a header
                    assert await closed_by_peer(reader)
                finally:
                    writer.close()

    run(loop_kind, main())


def test_idle_tcp_connection_is_closed(
    loop_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dnslistener, "TCP_IDLE_SECONDS", 0.3)

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                dns = proxy.runtime.dns_listener
                assert dns is not None
                reader, writer = await tcp_as(APP_UID, proxy)
                try:
                    started = time.monotonic()
                    assert await closed_by_peer(reader, timeout=5.0)
                    assert time.monotonic() - started < 3.0
                finally:
                    writer.close()
                # after a query, idle again: closed too
                reader, writer = await tcp_as(APP_UID, proxy)
                try:
                    reply = await ask_tcp(reader, writer, query("web.example.test"))
                    assert reply.header.rcode == RCODE.NOERROR
                    assert await closed_by_peer(reader, timeout=5.0)
                finally:
                    writer.close()
                await eventually(lambda: not dns.tcp_connections or None, "connections gone")

    run(loop_kind, main())


def test_tcp_connections_over_the_cap_are_refused(
    loop_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dnslistener, "MAX_TCP_CONNECTIONS", 3)

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            async with running_proxy(config(stub), tmp_path) as proxy:
                dns = proxy.runtime.dns_listener
                assert dns is not None
                held = [await tcp_as(APP_UID, proxy) for _ in range(3)]
                try:
                    await eventually(lambda: len(dns.tcp_connections) == 3 or None, "3 held")
                    reader, writer = await tcp_as(OTHER_APP_UID, proxy)
                    try:
                        shop = query("shop.example.test")
                        writer.write(len(shop).to_bytes(2, "big") + shop)
                        assert await closed_by_peer(reader)
                    finally:
                        writer.close()
                    # the held ones still work
                    reply = await ask_tcp(*held[0], query("web.example.test"))
                    assert reply.header.rcode == RCODE.NOERROR
                    # one goes: room for another
                    held.pop()[1].close()
                    await eventually(lambda: len(dns.tcp_connections) == 2 or None, "2 held")
                    reader, writer = await tcp_as(OTHER_APP_UID, proxy)
                    try:
                        again = await ask_tcp(reader, writer, query("shop.example.test"))
                    finally:
                        writer.close()
                    assert again.header.rcode == RCODE.NOERROR
                finally:
                    for _, w in held:
                        w.close()

    run(loop_kind, main())


def test_a_reload_removing_an_app_lets_go_of_its_answers(loop_kind: str, tmp_path: Path) -> None:
    """What the listener told an app is kept for that app's transparent connections; once a
    reload removes the app, its entries go with it (the app that remains keeps its own)."""

    async def main() -> None:
        with DnsStub(stub_records()) as stub:
            data = config(stub)
            async with running_proxy(data, tmp_path) as proxy:
                address = listener(proxy)
                for uid, name in (
                    (APP_UID, "web.example.test"),
                    (OTHER_APP_UID, "shop.example.test"),
                ):
                    with udp_socket(uid) as sock:
                        reply = await ask_udp(sock, query(name), address)
                    assert reply.header.rcode == RCODE.NOERROR
                answered = proxy.runtime.answered
                assert answered.names_for("shop", IPv4Address(SHOP_V4)) == ("shop.example.test",)
                data["app"] = [app for app in data["app"] if app["name"] != "shop"]
                write_config(tmp_path / "test.toml", data)
                assert await proxy.runtime.reload()
                await eventually(
                    lambda: answered.names_for("shop", IPv4Address(SHOP_V4)) == () or None,
                    "shop's answers let go",
                )
                assert answered.names_for("blog", IPv4Address(WEB_V4)) == ("web.example.test",)
                assert answered.count == 1

    run(loop_kind, main())
