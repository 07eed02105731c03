"""SOCKS4 and SOCKS4a on the SOCKS listener: real proxy, real uids, real upstreams, real curl.

The proxy runs in-process on the test's loop (asyncio and uvloop); client sockets are owned
by test uids, so identity is the kernel's, exactly as for SOCKS5. The raw client below is
written from the SOCKS4 / SOCKS4A protocol documents, independently of ``egress.proto``; the
curl tests run the real ``curl --socks4`` / ``--socks4a`` as the app's uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress.net.connection import ListenerKind
from tests.dnsstub import DnsStub
from tests.httpupstream import HttpUpstream
from tests.integration.test_proxy_e2e import app, close, loopback_config, roundtrip
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    STRANGER_UID,
    EchoUpstream,
    open_as_uid,
    run,
    run_as_uid,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.root

GRANTED, REJECTED = 0x5A, 0x5B


def socks4_request(host: str | bytes, port: int, user: bytes = b"", cmd: int = 1) -> bytes:
    """VN=4 CD DSTPORT DSTIP USERID NUL, and for a name (SOCKS4a) DSTIP 0.0.0.1 and NAME NUL."""
    if isinstance(host, bytes):
        return bytes((4, cmd)) + struct.pack("!H", port) + b"\0\0\0\1" + user + b"\0" + host + b"\0"
    ip = socket.inet_pton(socket.AF_INET, host)
    return bytes((4, cmd)) + struct.pack("!H", port) + ip + user + b"\0"


async def socks4_connect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str | bytes,
    port: int,
    *,
    user: bytes = b"",
    cmd: int = 1,
    early: bytes = b"",
) -> int:
    """Send a SOCKS4 (address) or SOCKS4a (name as bytes) request; return the reply's CD."""
    writer.write(socks4_request(host, port, user, cmd) + early)
    reply = await reader.readexactly(8)
    assert reply[0] == 0, reply  # VN of a reply is 0
    return reply[1]


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


# --- the raw protocol -------------------------------------------------------------------------
def test_socks4_allowed_relays_and_logs(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            code = await socks4_connect(reader, writer, "127.0.0.1", upstream.port, user=b"u1")
            assert code == GRANTED
            assert await roundtrip(reader, writer, b"hello over socks4") == b"hello over socks4"
            await close(writer)
            (record,) = await proxy.wait_records(1)
        assert record["listener"] == "socks5"  # the listener, whichever SOCKS version spoke
        assert (record["app"], record["uid"]) == ("blog", APP_UID)
        assert (record["decision"], record["reason"]) == ("allowed", "allowed")
        assert record["dest"] == record["dialed"] == f"127.0.0.1:{upstream.port}"
        assert record["bytes_up"] == record["bytes_down"] == len(b"hello over socks4")

    run(loop_kind, main())


def test_socks4a_name_is_resolved_by_the_proxy_and_early_bytes_pass(
    loop_kind: str, tmp_path: Path
) -> None:
    """The name reaches the proxy's resolver (the DNS stub), canonicalised like SOCKS5's, and
    payload pipelined behind the request reaches the upstream."""

    async def main() -> None:
        with DnsStub({"svc.example.test": ["127.0.0.1"]}) as dns:
            async with EchoUpstream() as upstream:
                config = loopback_config(
                    upstream.port,
                    resolver={"nameservers": [dns.address]},
                    app=[app("blog", APP_UID, [f"svc.example.test:{upstream.port}"])],
                )
                async with running_proxy(config, tmp_path) as proxy:
                    socks = proxy.address(ListenerKind.SOCKS5)
                    reader, writer = await open_as_uid(APP_UID, *socks)
                    code = await socks4_connect(
                        reader, writer, b"Svc.Example.TEST.", upstream.port, early=b"early!"
                    )
                    assert code == GRANTED
                    assert await reader.readexactly(6) == b"early!"
                    assert await roundtrip(reader, writer, b"named") == b"named"
                    await close(writer)
                    (record,) = await proxy.wait_records(1)
            assert ("svc.example.test", "A") in dns.queries
        assert record["rule"] == f"svc.example.test:{upstream.port}"
        assert record["dest"] == f"Svc.Example.TEST.:{upstream.port}"
        assert record["dialed"] == f"127.0.0.1:{upstream.port}"

    run(loop_kind, main())


def test_socks4_denials_never_dial_nor_resolve(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub({"secret-data.evil.test": ["127.0.0.1"]}) as dns:
            async with EchoUpstream() as upstream, EchoUpstream() as other:
                config = loopback_config(upstream.port, resolver={"nameservers": [dns.address]})
                async with running_proxy(config, tmp_path) as proxy:
                    socks = proxy.address(ListenerKind.SOCKS5)
                    reader, writer = await open_as_uid(APP_UID, *socks)
                    assert await socks4_connect(reader, writer, "127.0.0.1", other.port) == REJECTED
                    assert await reader.read() == b""  # closed after the reply
                    await close(writer)
                    reader, writer = await open_as_uid(APP_UID, *socks)
                    name = b"secret-data.evil.test"
                    assert await socks4_connect(reader, writer, name, other.port) == REJECTED
                    await close(writer)
                    records = await proxy.wait_records(2)
                assert other.accepted == 0
            assert dns.queries == []  # no rule can match: the name is never looked up
        assert [(r["decision"], r["reason"]) for r in records] == [("denied", "not_allowed")] * 2
        assert {r["dest"] for r in records} == {
            f"127.0.0.1:{other.port}",
            f"secret-data.evil.test:{other.port}",
        }

    run(loop_kind, main())


def test_user_ids_are_not_identity(loop_kind: str, tmp_path: Path) -> None:
    """Claiming another app's name (or root) as the user id changes nothing: the kernel's uid
    decides, and the claimed id never reaches the log."""

    async def main() -> None:
        async with EchoUpstream() as upstream:
            config = loopback_config(
                upstream.port,
                app=[
                    app("blog", APP_UID, [f"127.0.0.1:{upstream.port}"]),
                    app("shop", OTHER_APP_UID, ["127.0.0.1:1"]),
                ],
            )
            async with running_proxy(config, tmp_path) as proxy:
                socks = proxy.address(ListenerKind.SOCKS5)
                reader, writer = await open_as_uid(OTHER_APP_UID, *socks)
                code = await socks4_connect(
                    reader, writer, "127.0.0.1", upstream.port, user=b"blog-userid-claim"
                )
                assert code == REJECTED
                await close(writer)
                reader, writer = await open_as_uid(APP_UID, *socks)
                code = await socks4_connect(
                    reader, writer, "127.0.0.1", upstream.port, user=b"root-userid-claim"
                )
                assert code == GRANTED
                assert await roundtrip(reader, writer, b"mine") == b"mine"
                await close(writer)
                shop, blog = await proxy.wait_records(2)
        assert (shop["app"], shop["uid"], shop["reason"]) == ("shop", OTHER_APP_UID, "not_allowed")
        assert (blog["app"], blog["uid"], blog["reason"]) == ("blog", APP_UID, "allowed")
        assert "userid-claim" not in proxy.log_path.read_text()

    run(loop_kind, main())


def test_unknown_uid_is_refused_at_accept_and_never_granted(loop_kind: str, tmp_path: Path) -> None:
    """The refusal at accept is written before the first byte is read, so a SOCKS4 client gets
    SOCKS5's "05 FF" and the reason record: its reply's VN is 5 (not 0) and CD 0xFF (not
    0x5A), which no SOCKS4 client can take for a grant."""

    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(STRANGER_UID, *proxy.address(ListenerKind.SOCKS5))
            writer.write(socks4_request("127.0.0.1", upstream.port))
            data = await read_to_end(reader)
            await close(writer)
            (record,) = await proxy.wait_records(1)
            assert upstream.accepted == 0
        assert data[:2] == b"\x05\xff"
        length = int.from_bytes(data[2:4], "big")
        assert len(data) == 4 + length
        assert json.loads(data[4:])["reason"] == "unknown_client"
        assert (record["reason"], record["uid"], record["dest"]) == (
            "unknown_client",
            STRANGER_UID,
            None,
        )

    run(loop_kind, main())


def test_an_app_with_proxy_auth_is_refused_over_socks4(loop_kind: str, tmp_path: Path) -> None:
    """SOCKS4 cannot carry a password, so the extra factor can never be met: auth_required."""

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
                # The password as user id is no way in either.
                code = await socks4_connect(
                    reader, writer, "127.0.0.1", upstream.port, user=b"blog:s3cret"
                )
                assert code == REJECTED
                await close(writer)
                # The same app over SOCKS5 with its credentials still gets through.
                reader, writer = await open_as_uid(APP_UID, *socks)
                good = (b"blog", b"s3cret")
                assert (
                    await socks5_connect(
                        reader, writer, "127.0.0.1", upstream.port, credentials=good
                    )
                    == 0
                )
                await close(writer)
                denied, allowed = await proxy.wait_records(2)
                assert upstream.accepted == 1
        assert (denied["decision"], denied["reason"]) == ("denied", "auth_required")
        assert denied["dest"] == f"127.0.0.1:{upstream.port}"
        assert "SOCKS4" in denied["error"]
        assert allowed["reason"] == "allowed"
        assert "s3cret" not in proxy.log_path.read_text()

    run(loop_kind, main())


BAD_REQUESTS: dict[str, tuple[bytes, str]] = {
    "bind": (socks4_request("127.0.0.1", 80, cmd=2), "unsupported_command"),
    "bind-4a": (socks4_request(b"a.test", 80, cmd=2), "unsupported_command"),
    "ip-0.0.0.0": (b"\x04\x01\x00\x50\0\0\0\0\0", "bad_address"),
    "port-0": (socks4_request("127.0.0.1", 0), "bad_request"),
    "name-with-space": (socks4_request(b"a b.test", 80), "bad_address"),
    "name-with-nul-trick": (socks4_request(b"a\x01.test", 80), "bad_address"),
    "empty-name": (socks4_request(b"", 80), "bad_address"),
    "name-too-long": (socks4_request(b"n" * 256, 80), "bad_address"),
    "user-id-too-long": (socks4_request("127.0.0.1", 80, user=b"u" * 256), "bad_request"),
    "odd-ipv4-name": (socks4_request(b"0x7f.1", 80), "bad_address"),
    # Both fields at their bound (520 bytes), over a max_handshake_bytes of 513.
    "over-max-handshake-bytes": (socks4_request(b"n" * 255, 80, user=b"u" * 255), "bad_request"),
}


def test_bad_requests_get_0x5b_and_their_outcome(loop_kind: str, tmp_path: Path) -> None:
    """Every malformed request: one 0x5B reply, a close, the outcome table's reason, no dial."""

    async def main() -> None:
        async with EchoUpstream() as upstream:
            config = loopback_config(
                upstream.port,
                proxy={"max_handshake_bytes": 513},
                app=[app("blog", APP_UID, ["127.0.0.1:80"])],
            )
            async with running_proxy(config, tmp_path) as proxy:
                socks = proxy.address(ListenerKind.SOCKS5)
                for data, _ in BAD_REQUESTS.values():
                    reader, writer = await open_as_uid(APP_UID, *socks)
                    writer.write(data)
                    reply = await read_to_end(reader)
                    assert reply == b"\x00\x5b" + bytes(6), (data, reply)
                    await close(writer)
                records = await proxy.wait_records(len(BAD_REQUESTS))
        reasons = [r["reason"] for r in records]
        assert reasons == [reason for _, reason in BAD_REQUESTS.values()]
        assert all(r["dialed"] is None and r["app"] == "blog" for r in records)

    run(loop_kind, main())


def test_a_stalled_socks4_request_times_out_without_a_reply(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream() as upstream:
            config = loopback_config(upstream.port, proxy={"handshake_timeout": 0.3})
            async with running_proxy(config, tmp_path) as proxy:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                writer.write(socks4_request("127.0.0.1", upstream.port, user=b"slow")[:-1])
                assert await asyncio.wait_for(read_to_end(reader), 5) == b""
                await close(writer)
                (record,) = await proxy.wait_records(1)
        assert record["reason"] == "handshake_timeout"

    run(loop_kind, main())


def test_socks5_and_socks4_share_the_listener(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(loopback_config(upstream.port), tmp_path) as proxy,
        ):
            socks = proxy.address(ListenerKind.SOCKS5)
            reader5, writer5 = await open_as_uid(APP_UID, *socks)
            reader4, writer4 = await open_as_uid(APP_UID, *socks)
            assert await socks5_connect(reader5, writer5, "127.0.0.1", upstream.port) == 0
            assert await socks4_connect(reader4, writer4, "127.0.0.1", upstream.port) == GRANTED
            assert await roundtrip(reader5, writer5, b"five") == b"five"
            assert await roundtrip(reader4, writer4, b"four") == b"four"
            await close(writer5)
            await close(writer4)
            records = await proxy.wait_records(2)
        assert [r["reason"] for r in records] == ["allowed", "allowed"]

    run(loop_kind, main())


# --- real curl --------------------------------------------------------------------------------
def curl(uid: int, flag: str, proxy: tuple[str, int], url: str) -> subprocess.CompletedProcess[str]:
    """The real curl as ``uid``, through the proxy's SOCKS listener (blocking: run it in a
    thread so the in-process proxy keeps serving)."""
    argv = ["curl", "--silent", "--show-error", "--max-time", "10", flag, f"{proxy[0]}:{proxy[1]}"]
    return run_as_uid(uid, [*argv, url])


@contextlib.contextmanager
def curl_setup(tmp_path: Path) -> Iterator[tuple[DnsStub, HttpUpstream]]:
    with DnsStub({"web.example.test": ["127.0.0.1"]}) as dns, HttpUpstream("web") as web:
        yield dns, web


@pytest.mark.parametrize("flag", ["--socks4", "--socks4a"])
def test_curl_through_socks4(loop_kind: str, tmp_path: Path, flag: str) -> None:
    """curl as the app's uid: an allowed GET gets the upstream's body; a denied one fails with
    curl's "rejected or failed" and the log says who, where and why."""

    async def main() -> None:
        with curl_setup(tmp_path) as (dns, web):
            # --socks4 resolves locally (an address then); --socks4a sends the name.
            host = "127.0.0.1" if flag == "--socks4" else "web.example.test"
            config = loopback_config(
                web.port,
                resolver={"nameservers": [dns.address]},
                app=[app("blog", APP_UID, [f"{host}:{web.port}"])],
            )
            async with running_proxy(config, tmp_path) as proxy:
                socks = proxy.address(ListenerKind.SOCKS5)
                ok = await asyncio.to_thread(
                    curl, APP_UID, flag, socks, f"http://{host}:{web.port}/hi"
                )
                assert (ok.returncode, ok.stdout) == (0, "hello /hi from web\n"), ok
                denied = await asyncio.to_thread(curl, APP_UID, flag, socks, f"http://{host}:1/no")
                assert denied.returncode != 0
                assert "rejected or failed" in denied.stderr, denied.stderr
                allowed, refused = await proxy.wait_records(2)
            assert [(r["path"], r["host"]) for r in web.requests] == [("/hi", f"{host}:{web.port}")]
            if flag == "--socks4a":
                assert dns.queries and {q[0] for q in dns.queries} == {"web.example.test"}
        assert (allowed["app"], allowed["uid"], allowed["reason"]) == ("blog", APP_UID, "allowed")
        assert (refused["app"], refused["reason"], refused["dest"]) == (
            "blog",
            "not_allowed",
            f"{host}:1",
        )

    run(loop_kind, main())


def test_curl_from_a_uid_in_no_app_fails_closed(loop_kind: str, tmp_path: Path) -> None:
    """The accept-time refusal (SOCKS5's 05 FF) reaches curl's SOCKS4 code as a reply with the
    wrong version: curl gives up, with nothing relayed."""

    async def main() -> None:
        with curl_setup(tmp_path) as (dns, web):
            config = loopback_config(web.port, resolver={"nameservers": [dns.address]})
            async with running_proxy(config, tmp_path) as proxy:
                socks = proxy.address(ListenerKind.SOCKS5)
                for flag, host in (("--socks4", "127.0.0.1"), ("--socks4a", "web.example.test")):
                    url = f"http://{host}:{web.port}/"
                    result = await asyncio.to_thread(curl, STRANGER_UID, flag, socks, url)
                    assert result.returncode != 0 and result.stdout == ""
                    assert "SOCKS4" in result.stderr, result.stderr
                records = await proxy.wait_records(2)
            assert web.requests == []
        assert [r["reason"] for r in records] == ["unknown_client"] * 2

    run(loop_kind, main())
