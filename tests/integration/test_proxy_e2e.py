"""End to end through real listeners, real upstreams, a real DNS stub and real socket owners.

The proxy runs in-process on the test's event loop (asyncio and uvloop). Client sockets are
created under test uids (see ``tests.support.socket_as_uid``), so the proxy identifies them
through the kernel exactly as in production. Anything that could make the proxy dial a
non-loopback special-purpose address runs in a network namespace with only loopback in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from egress.net.connection import ListenerKind
from egress.net.relay import WRITE_HIGH_WATER
from tests.configs import base_config
from tests.dnsstub import DnsStub
from tests.netns import network_namespace
from tests.polling import eventually
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    STRANGER_UID,
    EchoUpstream,
    http_connect,
    open_as_uid,
    open_unix_as_uid,
    refused_at_accept,
    run,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.root


def app(name: str, uid: int, allow: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "uids": [str(uid)], "allow": allow, **extra}


def loopback_config(upstream_port: int, **sections: Any) -> dict[str, Any]:
    """Upstreams in tests listen on loopback, a special-purpose range the operator must open."""
    sections.setdefault("security", {"allow_special": ["127.0.0.0/8", "::1/128"]})
    sections.setdefault("app", [app("blog", APP_UID, [f"127.0.0.1:{upstream_port}"])])
    return base_config(**sections)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    writer.write(payload)
    return await reader.readexactly(len(payload))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


# --- SOCKS5 ---------------------------------------------------------------------------------
def test_socks5_ipv4_allowed_relays_and_logs(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
            assert (
                await roundtrip(reader, writer, b"hello through egress") == b"hello through egress"
            )
            await close(writer)
            (record,) = await proxy.wait_records(1)
        assert record["app"] == "blog"
        assert record["uid"] == APP_UID
        assert record["listener"] == "socks5"
        assert record["decision"] == "allowed"
        assert record["reason"] == "allowed"
        assert record["rule"] == f"127.0.0.1:{upstream.port}"
        assert record["dest"] == f"127.0.0.1:{upstream.port}"
        assert record["dialed"] == f"127.0.0.1:{upstream.port}"
        assert record["bytes_up"] == len(b"hello through egress")
        assert record["bytes_down"] == len(b"hello through egress")

    run(loop_kind, main())


def test_socks5_denied_without_rule_never_dials(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            EchoUpstream() as other,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", other.port) == 0x02
            assert await reader.read() == b""  # closed after the reply
            await close(writer)
            (record,) = await proxy.wait_records(1)
            assert other.accepted == 0
        assert record["decision"] == "denied"
        assert record["reason"] == "not_allowed"
        assert record["dialed"] is None

    run(loop_kind, main())


def test_special_address_needs_operator_exception(loop_kind: str, tmp_path: Path) -> None:
    """A rule alone does not open loopback: [security].allow_special must list it too."""

    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(
                loopback_config(upstream.port, security={"allow_special": []}), tmp_path
            ) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0x02
            await close(writer)
            (record,) = await proxy.wait_records(1)
            assert upstream.accepted == 0
        assert record["reason"] == "special_address"

    run(loop_kind, main())


def test_unknown_uid_is_denied(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            # Refused at accept, before the proxy reads a byte: a uid in no app cannot even
            # hold a connection through the handshake timeout.
            reader, writer = await open_as_uid(STRANGER_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await refused_at_accept(reader)
            await close(writer)
            (record,) = await proxy.wait_records(1)
            assert upstream.accepted == 0
        assert record["reason"] == "unknown_client"
        assert record["decision"] == "denied"
        assert record["app"] is None
        assert record["uid"] == STRANGER_UID
        assert record["dest"] is None

    run(loop_kind, main())


def test_socks5_ipv6(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream("::1") as upstream:
            config = base_config(
                proxy={"socks5_listen": ["[::1]:0"]},
                security={"allow_special": ["::1/128"]},
                app=[app("blog", APP_UID, [f"[::1]:{upstream.port}"])],
            )
            async with running_proxy(config, tmp_path) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, "::1", upstream.port) == 0
                assert await roundtrip(reader, writer, b"v6") == b"v6"
                await close(writer)
                (record,) = await proxy.wait_records(1)
        assert record["dialed"] == f"[::1]:{upstream.port}"
        assert record["uid"] == APP_UID

    run(loop_kind, main())


def test_socks5_over_unix_socket_uses_peercred(loop_kind: str, tmp_path: Path) -> None:
    # The socket's directory must be reachable by the test uids; pytest's tmp_path is 0700.
    socket_dir = Path(tempfile.mkdtemp(prefix="egress-sock-"))
    socket_dir.chmod(0o755)
    path = str(socket_dir / "socks.sock")

    async def main() -> None:
        async with EchoUpstream() as upstream:
            # Mode 0666 so both test uids can connect; the kernel's SO_PEERCRED decides.
            config = loopback_config(
                upstream.port,
                proxy={
                    "unix_socket": path,
                    "unix_socket_mode": "0666",
                    "unix_socket_group": str(OTHER_APP_UID),
                },
            )
            async with running_proxy(config, tmp_path) as proxy:
                status = Path(path).stat()
                assert (status.st_mode & 0o777, status.st_gid) == (0o666, OTHER_APP_UID)
                reader, writer = await open_unix_as_uid(APP_UID, path)
                assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
                assert await roundtrip(reader, writer, b"unix") == b"unix"
                await close(writer)
                reader, writer = await open_unix_as_uid(STRANGER_UID, path)
                assert await refused_at_accept(reader)
                await close(writer)
                records = await proxy.wait_records(2)
        by_uid = {r["uid"]: r for r in records}
        assert (by_uid[APP_UID]["listener"], by_uid[APP_UID]["decision"]) == (
            "socks5_unix",
            "allowed",
        )
        assert by_uid[STRANGER_UID]["reason"] == "unknown_client"

    try:
        run(loop_kind, main())
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_socks5_bind_and_udp_associate_are_refused(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            for command in (0x02, 0x03):
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                writer.write(b"\x05\x01\x00")
                assert await reader.readexactly(2) == b"\x05\x00"
                writer.write(
                    bytes([5, command, 0, 1, 127, 0, 0, 1]) + upstream.port.to_bytes(2, "big")
                )
                reply = await reader.readexactly(10)
                assert reply[1] == 0x07
                await close(writer)
            records = await proxy.wait_records(2)
        assert {r["reason"] for r in records} == {"unsupported_command"}

    run(loop_kind, main())


def test_socks5_bad_address_type(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_proxy(loopback_config(9), tmp_path) as proxy:
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            writer.write(b"\x05\x01\x00")
            await reader.readexactly(2)
            writer.write(b"\x05\x01\x00\x09\x00\x00")
            reply = await reader.readexactly(10)
            assert reply[1] == 0x08
            await close(writer)
            (record,) = await proxy.wait_records(1)
        assert record["reason"] == "bad_address"

    run(loop_kind, main())


# --- names, DNS and odd spellings ----------------------------------------------------------
@pytest.mark.parametrize(
    "asked", ["svc.example.test", "SVC.Example.TEST", "svc.example.test.", "Svc.EXAMPLE.test."]
)
def test_hostname_rule_with_canonical_variants(loop_kind: str, tmp_path: Path, asked: str) -> None:
    async def main() -> None:
        with DnsStub({"svc.example.test": ["127.0.0.1"]}) as dns:
            async with (
                EchoUpstream() as upstream,
                running_proxy(
                    loopback_config(
                        upstream.port,
                        resolver={"nameservers": [dns.address]},
                        app=[app("blog", APP_UID, [f"svc.example.test:{upstream.port}"])],
                    ),
                    tmp_path,
                ) as proxy,
            ):
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, asked.encode(), upstream.port) == 0
                assert await roundtrip(reader, writer, b"named") == b"named"
                await close(writer)
                (record,) = await proxy.wait_records(1)
        assert record["rule"] == f"svc.example.test:{upstream.port}"
        assert record["dialed"] == f"127.0.0.1:{upstream.port}"

    run(loop_kind, main())


ODD_IPV4 = [
    "127.1",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f000001",
    "2130706433",
    "127.0.0.01",
    "017700000001",
    "127.0.1",
    "1.2.3.4.5",
    "0x7F.1",
]


@pytest.mark.parametrize("spelling", ODD_IPV4)
def test_odd_ipv4_spellings_never_reach_dns_or_a_socket(
    loop_kind: str, tmp_path: Path, spelling: str
) -> None:
    async def main() -> None:
        with DnsStub() as dns:
            async with (
                EchoUpstream() as upstream,
                running_proxy(
                    loopback_config(
                        upstream.port,
                        resolver={"nameservers": [dns.address]},
                        app=[
                            app(
                                "blog",
                                APP_UID,
                                [f"*.example.test:{upstream.port}", f"127.0.0.1:{upstream.port}"],
                            )
                        ],
                    ),
                    tmp_path,
                ) as proxy,
            ):
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                code = await socks5_connect(reader, writer, spelling.encode(), upstream.port)
                await close(writer)
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
                status, _, _ = await http_connect(reader, writer, f"{spelling}:{upstream.port}")
                await close(writer)
                records = await proxy.wait_records(2)
            assert dns.queries == []
            assert upstream.accepted == 0
        assert code == 0x08
        assert status == 400
        assert {r["reason"] for r in records} == {"bad_address"}

    run(loop_kind, main())


@pytest.mark.netns
def test_name_with_special_and_allowed_addresses_dials_only_the_allowed(
    loop_kind: str, tmp_path: Path
) -> None:
    """mixed.example.test -> 10.20.30.40 (special, not opened) and 127.0.0.1 (opened).

    10.20.30.40 exists in this namespace with a listener on it, so a bug would show up as an
    accepted connection there instead of leaving the machine.
    """

    async def main() -> None:
        with DnsStub({"mixed.example.test": ["10.20.30.40", "127.0.0.1"]}) as dns:
            async with EchoUpstream() as upstream, EchoUpstream("10.20.30.40") as trap:
                assert trap.port
                config = loopback_config(
                    upstream.port,
                    security={"allow_special": ["127.0.0.0/8"]},
                    resolver={"nameservers": [dns.address]},
                    app=[app("blog", APP_UID, ["mixed.example.test:*"])],
                )
                async with running_proxy(config, tmp_path) as proxy:
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                    assert (
                        await socks5_connect(reader, writer, b"mixed.example.test", upstream.port)
                        == 0
                    )
                    assert await roundtrip(reader, writer, b"x") == b"x"
                    await close(writer)
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                    code = await socks5_connect(reader, writer, b"mixed.example.test", trap.port)
                    await close(writer)
                    records = await proxy.wait_records(2)
                assert trap.accepted == 0
        assert records[0]["dialed"] == f"127.0.0.1:{upstream.port}"
        # The trap port is not listening on 127.0.0.1: refused, never redirected to 10.20.30.40.
        assert code == 0x05
        assert records[1]["reason"] == "connect_refused"

    with network_namespace(addresses=("10.20.30.40/32",)):
        run(loop_kind, main())


@pytest.mark.netns
def test_name_resolving_only_to_metadata_address_is_denied(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub({"metadata.example.test": ["169.254.169.254"]}) as dns:
            async with EchoUpstream("169.254.169.254") as trap:
                config = base_config(
                    resolver={"nameservers": [dns.address]},
                    app=[app("blog", APP_UID, ["metadata.example.test:*", "169.254.169.254:*"])],
                )
                async with running_proxy(config, tmp_path) as proxy:
                    for host in (b"metadata.example.test", "169.254.169.254"):
                        reader, writer = await open_as_uid(
                            APP_UID, *proxy.address(ListenerKind.SOCKS5)
                        )
                        assert await socks5_connect(reader, writer, host, trap.port) == 0x02
                        await close(writer)
                    records = await proxy.wait_records(2)
                assert trap.accepted == 0
        assert [r["reason"] for r in records] == ["special_address", "special_address"]

    with network_namespace(addresses=("169.254.169.254/32",)):
        run(loop_kind, main())


@pytest.mark.netns
def test_allow_special_opens_a_private_range_for_a_rule(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream("10.8.0.5") as internal:
            rules = [app("blog", APP_UID, [f"10.8.0.5:{internal.port}"])]
            closed = base_config(app=rules)
            opened = base_config(app=rules, security={"allow_special": ["10.8.0.0/16"]})
            async with running_proxy(closed, tmp_path) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, "10.8.0.5", internal.port) == 0x02
                await close(writer)
            assert internal.accepted == 0
            async with running_proxy(opened, tmp_path) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, "10.8.0.5", internal.port) == 0
                assert await roundtrip(reader, writer, b"inside") == b"inside"
                await close(writer)
            assert internal.accepted == 1

    with network_namespace(addresses=("10.8.0.5/32",)):
        run(loop_kind, main())


@pytest.mark.netns
def test_dns_rebinding_dials_only_what_was_checked(loop_kind: str, tmp_path: Path) -> None:
    """First answer 127.0.0.1 (opened), second answer 169.254.169.254: the second connection is
    denied and nothing ever reaches the metadata address."""

    async def main() -> None:
        with DnsStub(ttl=0) as dns:
            dns.set_sequence("rebind.example.test", [["127.0.0.1"], ["169.254.169.254"]])
            async with EchoUpstream() as upstream, EchoUpstream("169.254.169.254") as trap:
                config = loopback_config(
                    upstream.port,
                    security={"allow_special": ["127.0.0.0/8"]},
                    resolver={"nameservers": [dns.address], "min_ttl": 0.001, "max_ttl": 0.001},
                    app=[app("blog", APP_UID, ["rebind.example.test:*"])],
                )
                async with running_proxy(config, tmp_path) as proxy:
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                    assert (
                        await socks5_connect(reader, writer, b"rebind.example.test", upstream.port)
                        == 0
                    )
                    await close(writer)
                    resolver = proxy.runtime.resolver
                    loopback = ipaddress.ip_address("127.0.0.1")
                    await eventually(
                        lambda: "rebind.example.test" not in resolver.cached_names_for(loopback),
                        "the first answer's 1 ms TTL lapses",
                    )
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                    assert (
                        await socks5_connect(reader, writer, b"rebind.example.test", upstream.port)
                        == 0x02
                    )
                    await close(writer)
                    records = await proxy.wait_records(2)
                assert trap.accepted == 0
        assert [r["reason"] for r in records] == ["allowed", "special_address"]

    with network_namespace(addresses=("169.254.169.254/32",)):
        run(loop_kind, main())


def test_dns_failure_reply(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub() as dns:
            async with running_proxy(
                base_config(
                    resolver={"nameservers": [dns.address]},
                    app=[app("blog", APP_UID, ["missing.example.test:443"])],
                ),
                tmp_path,
            ) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, b"missing.example.test", 443) == 0x04
                await close(writer)
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
                status, headers, _ = await http_connect(reader, writer, "missing.example.test:443")
                await close(writer)
                records = await proxy.wait_records(2)
        assert status == 502
        assert "error=dns_error" in headers["proxy-status"]
        assert {r["reason"] for r in records} == {"dns_failure"}

    run(loop_kind, main())


def test_denied_names_are_not_resolved(loop_kind: str, tmp_path: Path) -> None:
    """No rule can match: the proxy must not look the name up (no DNS exfiltration channel)."""

    async def main() -> None:
        with DnsStub({"secret-data.evil.test": ["203.0.113.9"]}) as dns:
            async with running_proxy(
                base_config(
                    resolver={"nameservers": [dns.address]},
                    app=[app("blog", APP_UID, ["api.example.test:443"])],
                ),
                tmp_path,
            ) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, b"secret-data.evil.test", 443) == 0x02
                await close(writer)
                (record,) = await proxy.wait_records(1)
            assert dns.queries == []
        assert record["reason"] == "not_allowed"

    run(loop_kind, main())


# --- HTTP -----------------------------------------------------------------------------------
def test_http_connect_allowed_and_denied(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
            status, _, _ = await http_connect(reader, writer, f"127.0.0.1:{upstream.port}")
            assert status == 200
            assert await roundtrip(reader, writer, b"tls-ish bytes") == b"tls-ish bytes"
            await close(writer)
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
            status, headers, body = await http_connect(reader, writer, "127.0.0.1:1")
            await close(writer)
            reader, writer = await open_as_uid(STRANGER_UID, *proxy.address(ListenerKind.HTTP))
            assert await refused_at_accept(reader)
            await close(writer)
            records = await proxy.wait_records(3)
        assert status == 403
        assert b"not_allowed" in body and body.count(b"\n") == 1
        assert headers["proxy-status"].startswith("egress; error=destination_ip_prohibited")
        assert sorted(r["reason"] for r in records) == ["allowed", "not_allowed", "unknown_client"]
        assert records[0]["listener"] == "http"

    run(loop_kind, main())


def test_http_connect_ipv6_literal_in_brackets(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream("::1") as upstream,
            running_proxy(
                base_config(
                    security={"allow_special": ["::1/128"]},
                    app=[app("blog", APP_UID, [f"[::1]:{upstream.port}"])],
                ),
                tmp_path,
            ) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
            status, _, _ = await http_connect(reader, writer, f"[::1]:{upstream.port}")
            assert status == 200
            assert await roundtrip(reader, writer, b"six") == b"six"
            await close(writer)

    run(loop_kind, main())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def forward(
    tmp_path: Path, origin: Handler, request: Callable[[int], bytes]
) -> tuple[bytes, dict[str, Any]]:
    """Send ``request(origin_port)`` through the proxy's HTTP listener to a real origin server
    running ``origin``; return the whole response and the connection's log record."""
    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_proxy(loopback_config(port), tmp_path) as proxy:
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
            writer.write(request(port))
            await writer.drain()
            response = await reader.read()
            await close(writer)
            (record,) = await proxy.wait_records(1)
    finally:
        server.close()
        await server.wait_closed()
    return response, record


def test_plain_http_forwarding_strips_hop_by_hop_headers(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            seen["head"] = head.decode()
            body = b"hello from origin"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nKeep-Alive: timeout=5\r\n"
                b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nX-End: 1\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
            writer.close()

        response, record = await forward(
            tmp_path,
            origin,
            lambda port: (
                f"GET http://127.0.0.1:{port}/path?q=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Proxy-Connection: keep-alive\r\nConnection: X-Drop-Me\r\nX-Drop-Me: yes\r\n"
                "X-Keep: yes\r\n\r\n"
            ).encode(),
        )
        head = seen["head"]
        assert head.startswith("GET /path?q=1 HTTP/1.1\r\n")
        lowered = head.lower()
        assert "x-keep: yes" in lowered
        assert "proxy-connection" not in lowered and "x-drop-me" not in lowered
        assert response.startswith(b"HTTP/1.1 200")
        assert response.endswith(b"hello from origin")
        lowered_response = response.lower()
        assert b"keep-alive: " not in lowered_response and b"x-secret-hop" not in lowered_response
        assert b"x-end: 1" in lowered_response
        assert record["decision"] == "allowed"
        # Counted as relayed: the rewritten request head went up, the re-framed response down.
        assert record["bytes_up"] == len(head)
        assert record["bytes_down"] == len(response)

    run(loop_kind, main())


@pytest.mark.parametrize("size", [5_000, 1_000_000])
def test_plain_http_forwarding_counts_every_body_byte(
    loop_kind: str, tmp_path: Path, size: int
) -> None:
    """A POST's body is counted whether it arrived with the head or after the tunnel began."""

    async def main() -> None:
        received = bytearray()

        async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.extend(await reader.readuntil(b"\r\n\r\n"))
            received.extend(await reader.readexactly(size))
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            writer.close()

        response, record = await forward(
            tmp_path,
            origin,
            lambda port: (
                (
                    f"POST http://127.0.0.1:{port}/up HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Content-Length: {size}\r\n\r\n"
                ).encode()
                + b"b" * size
            ),
        )
        assert response.startswith(b"HTTP/1.1 204")
        assert record["bytes_up"] == len(received) > size

    run(loop_kind, main())


# --- credentials, report mode ---------------------------------------------------------------
def test_proxy_credentials_are_an_extra_factor(loop_kind: str, tmp_path: Path) -> None:
    import hashlib

    async def main() -> None:
        auth = {"username": "blog", "password_sha256": hashlib.sha256(b"s3cret").hexdigest()}
        async with EchoUpstream() as upstream:
            config = loopback_config(
                upstream.port,
                app=[app("blog", APP_UID, [f"127.0.0.1:{upstream.port}"], proxy_auth=auth)],
            )
            async with running_proxy(config, tmp_path) as proxy:
                socks = proxy.address(ListenerKind.SOCKS5)
                reader, writer = await open_as_uid(APP_UID, *socks)
                assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == -1
                await close(writer)
                reader, writer = await open_as_uid(APP_UID, *socks)
                bad = (b"blog", b"wrong")
                assert (
                    await socks5_connect(
                        reader, writer, "127.0.0.1", upstream.port, credentials=bad
                    )
                    == -2
                )
                await close(writer)
                reader, writer = await open_as_uid(APP_UID, *socks)
                good = (b"blog", b"s3cret")
                assert (
                    await socks5_connect(
                        reader, writer, "127.0.0.1", upstream.port, credentials=good
                    )
                    == 0
                )
                await close(writer)
                # The right password from the wrong uid still gets nothing.
                reader, writer = await open_as_uid(STRANGER_UID, *socks)
                assert await refused_at_accept(reader)
                await close(writer)
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
                status, headers, _ = await http_connect(
                    reader, writer, f"127.0.0.1:{upstream.port}"
                )
                await close(writer)
                records = await proxy.wait_records(5)
        assert status == 407
        assert headers["proxy-authenticate"] == 'Basic realm="egress"'
        assert sorted(r["reason"] for r in records) == [
            "allowed",
            "auth_failed",
            "auth_required",
            "auth_required",
            "unknown_client",
        ]
        assert all("s3cret" not in str(r) and "wrong" not in str(r) for r in records)

    run(loop_kind, main())


PUBLIC_IN_NETNS = "93.184.216.34"  # a public address, put on the test namespace's loopback


@pytest.mark.netns
def test_report_mode_allows_and_reports_but_keeps_special_ranges_closed(
    loop_kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with EchoUpstream(PUBLIC_IN_NETNS) as public, EchoUpstream() as local:
            config = base_config(
                security={"allow_special": ["127.0.0.0/8"]},
                app=[app("trial", OTHER_APP_UID, ["api.example.test:443"], mode="report")],
            )
            async with running_proxy(config, tmp_path) as proxy:
                socks = proxy.address(ListenerKind.SOCKS5)
                reader, writer = await open_as_uid(OTHER_APP_UID, *socks)
                assert await socks5_connect(reader, writer, PUBLIC_IN_NETNS, public.port) == 0
                assert await roundtrip(reader, writer, b"r") == b"r"
                await close(writer)
                # Report mode never opens a special range, not even one the operator opened.
                for host, port in (("127.0.0.1", local.port), ("10.1.2.3", 80)):
                    reader, writer = await open_as_uid(OTHER_APP_UID, *socks)
                    assert await socks5_connect(reader, writer, host, port) == 0x02
                    await close(writer)
                first, second, third = await proxy.wait_records(3)
            assert local.accepted == 0
        # Let through, and the reason says why enforce mode would have denied it.
        assert (first["decision"], first["reason"]) == ("reported", "not_allowed")
        assert (second["decision"], second["reason"]) == ("denied", "special_address")
        assert (third["decision"], third["reason"]) == ("denied", "special_address")

    with network_namespace(addresses=(f"{PUBLIC_IN_NETNS}/32",)):
        run(loop_kind, main())


# --- relay behaviour ------------------------------------------------------------------------
def test_half_close_is_propagated(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
            writer.write(b"last words")
            writer.write_eof()
            # The echo server only replies with EOF after it saw ours: the whole echo arrives.
            assert await reader.read() == b"last words"
            await close(writer)

    run(loop_kind, main())


def test_idle_tunnel_is_closed(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(
                loopback_config(upstream.port, proxy={"idle_timeout": 0.2}), tmp_path
            ) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
            assert await asyncio.wait_for(reader.read(), 3) == b""
            await close(writer)
            (record,) = await proxy.wait_records(1)
        assert record["error"] == "idle_timeout"

    run(loop_kind, main())


def test_large_transfer_keeps_every_byte(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
            payload = bytes(range(256)) * 40_000  # ~10 MB, far above every buffer limit
            sender = asyncio.create_task(_send_all(writer, payload))
            received = await reader.readexactly(len(payload))
            await sender
            assert received == payload
            await close(writer)

    run(loop_kind, main())


async def _send_all(writer: asyncio.StreamWriter, payload: bytes) -> None:
    view = memoryview(payload)
    for start in range(0, len(view), 1 << 20):
        writer.write(view[start : start + (1 << 20)])
        await writer.drain()


def test_plain_http_forwarding_malformed_response_is_a_502(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            writer.close()

        response, record = await forward(
            tmp_path,
            origin,
            lambda port: f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        )
        assert response.startswith(b"HTTP/1.1 502")
        assert b"Proxy-Status: egress; error=http_protocol_error" in response
        assert record["error"].startswith("protocol error")
        # Counted as what it was, and the reply's bytes are what the client got.
        assert (record["decision"], record["reason"]) == ("error", "upstream_protocol_error")
        assert record["bytes_down"] == len(response)

    run(loop_kind, main())


@pytest.mark.netns
def test_connect_timeout_reply(loop_kind: str, tmp_path: Path) -> None:
    """10.66.0.1 exists in the namespace but drops every SYN: the dial times out."""

    async def main() -> None:
        config = base_config(
            proxy={"connect_timeout": 0.3},
            security={"allow_special": ["10.66.0.0/16"]},
            app=[app("blog", APP_UID, ["10.66.0.1:80"])],
        )
        async with running_proxy(config, tmp_path) as proxy:
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "10.66.0.1", 80) == 0x06
            await close(writer)
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
            status, headers, _ = await http_connect(reader, writer, "10.66.0.1:80")
            await close(writer)
            records = await proxy.wait_records(2)
        assert status == 504
        assert "error=connection_timeout" in headers["proxy-status"]
        assert {r["reason"] for r in records} == {"connect_timeout"}

    with network_namespace(addresses=("10.66.0.1/32",)):
        subprocess.run(["iptables", "-A", "OUTPUT", "-d", "10.66.0.1", "-j", "DROP"], check=True)
        run(loop_kind, main())


def test_next_checked_address_is_tried_when_one_fails(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        # 127.0.0.2 has no listener on the upstream's port: refused, then 127.0.0.1 answers.
        with DnsStub({"two.example.test": ["127.0.0.2", "127.0.0.1"]}) as dns:
            async with (
                EchoUpstream() as upstream,
                running_proxy(
                    loopback_config(
                        upstream.port,
                        resolver={"nameservers": [dns.address]},
                        app=[app("blog", APP_UID, [f"two.example.test:{upstream.port}"])],
                    ),
                    tmp_path,
                ) as proxy,
            ):
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, b"two.example.test", upstream.port) == 0
                assert await roundtrip(reader, writer, b"second") == b"second"
                await close(writer)
                (record,) = await proxy.wait_records(1)
        assert record["dialed"] == f"127.0.0.1:{upstream.port}"

    run(loop_kind, main())


def test_both_legs_have_tcp_nodelay(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
            assert await roundtrip(reader, writer, b"x") == b"x"
            (connection,) = proxy.connections()
            assert connection.transport is not None and connection.dialled is not None
            upstream_transport = connection.dialled.upstream.transport
            assert upstream_transport is not None
            for transport in (connection.transport, upstream_transport):
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            await close(writer)

    run(loop_kind, main())


def test_a_stalled_upstream_bounds_what_the_proxy_buffers(loop_kind: str, tmp_path: Path) -> None:
    """The upstream never reads; the client tries to push 64 MiB. The proxy must stop reading
    from the client instead of buffering: its upstream write buffer stays near the high-water
    mark and the client's own writes stall."""

    async def main() -> None:
        held: list[asyncio.StreamWriter] = []
        release = asyncio.Event()

        async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await release.wait()
            writer.close()

        server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with running_proxy(loopback_config(port), tmp_path) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, "127.0.0.1", port) == 0
                chunk = b"z" * 65536
                sent = 0

                async def push() -> None:
                    nonlocal sent
                    for _ in range(1024):  # at most 64 MiB
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)

                pusher = asyncio.create_task(push())
                client_high_water = writer.transport.get_write_buffer_limits()[1]

                def upstream_buffered() -> int:
                    connections = proxy.connections()
                    dialled = connections[0].dialled if connections else None
                    transport = dialled.upstream.transport if dialled else None
                    return transport.get_write_buffer_size() if transport else 0

                def stalled() -> bool:
                    # Both ends full: the proxy holds a high-water mark for the upstream and
                    # stopped reading, so the pusher's own buffer fills and its drain() waits.
                    assert not pusher.done(), f"pushed all {sent} bytes: nothing held it back"
                    return (
                        upstream_buffered() >= WRITE_HIGH_WATER
                        and writer.transport.get_write_buffer_size() > client_high_water
                    )

                await eventually(
                    stalled,
                    "the upstream write buffer reaches the high-water mark and the pusher stalls",
                    timeout=10.0,
                    detail=lambda: {"upstream buffered": upstream_buffered(), "sent": sent},
                )
                (connection,) = proxy.connections()
                assert connection.dialled is not None and connection.dialled.upstream.transport
                buffered = connection.dialled.upstream.transport.get_write_buffer_size()
                pusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pusher
                writer.transport.abort()
                release.set()
        finally:
            server.close()
            await server.wait_closed()
        assert WRITE_HIGH_WATER <= buffered <= 2 * 1024 * 1024, buffered
        assert sent < 32 * 1024 * 1024, sent  # kernel buffers + bounded proxy buffer, not 64 MiB

    run(loop_kind, main())


def test_server_first_protocols_keep_their_banner(loop_kind: str, tmp_path: Path) -> None:
    """An upstream that talks first (SMTP, SSH) may send before the tunnel exists: not a byte
    of its banner may be lost, whichever side speaks next."""

    async def main() -> None:
        banner = b"220 upstream ready\r\n"
        async with (
            EchoUpstream(greeting=banner) as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            for _ in range(20):
                for listener in (ListenerKind.SOCKS5, ListenerKind.HTTP):
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(listener))
                    if listener is ListenerKind.SOCKS5:
                        assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
                    else:
                        status, _, _ = await http_connect(
                            reader, writer, f"127.0.0.1:{upstream.port}"
                        )
                        assert status == 200
                    assert await asyncio.wait_for(reader.readexactly(len(banner)), 5) == banner
                    await close(writer)

    run(loop_kind, main())
