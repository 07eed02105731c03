"""Bad input: garbage, slow and oversized clients, and many stalled clients at once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from egress.net.connection import ListenerKind
from tests.configs import base_config
from tests.polling import eventually
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    STRANGER_UID,
    EchoUpstream,
    http_connect,
    open_as_uid,
    refused_at_accept,
    run,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.root


def config(port: int, **proxy: object) -> dict[str, object]:
    return base_config(
        proxy={"handshake_timeout": 0.5, **proxy},
        security={"allow_special": ["127.0.0.0/8"]},
        app=[{"name": "blog", "uids": [str(APP_UID)], "allow": [f"127.0.0.1:{port}"]}],
    )


@pytest.mark.parametrize("listener", [ListenerKind.SOCKS5, ListenerKind.HTTP])
@pytest.mark.parametrize(
    "garbage",
    [
        b"\x04\x09\x00\x50\x7f\x00\x00\x01\x00",  # SOCKS4 with a command that does not exist
        b"GET\x00\xff\xfe\r\n\r\n",
        b"\x16\x03\x01\x02\x00",
        b"\r\n\r\n",
    ],
    ids=["socks4-bad-command", "binary", "tls-hello", "empty-lines"],
)
def test_garbage_gets_an_error_and_a_close(
    loop_kind: str, tmp_path: Path, listener: ListenerKind, garbage: bytes
) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(listener))
            writer.write(garbage)
            reply = await asyncio.wait_for(reader.read(), 2)  # closes well before the deadline
            writer.close()
            (record,) = await proxy.wait_records(1)
        if listener is ListenerKind.HTTP:
            assert reply.startswith(b"HTTP/1.1 400")
        assert record["decision"] == "error"  # a protocol error, not a policy denial
        assert record["reason"] in {"bad_request", "bad_address", "unsupported_command"}

    run(loop_kind, main())


@pytest.mark.parametrize("listener", [ListenerKind.SOCKS5, ListenerKind.HTTP])
def test_slow_client_hits_the_handshake_deadline(
    loop_kind: str, tmp_path: Path, listener: ListenerKind
) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(listener))
            writer.write(b"\x05" if listener is ListenerKind.SOCKS5 else b"CONNECT 127.0.0.1:")
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            waited = asyncio.get_running_loop().time() - started
            writer.close()
            (record,) = await proxy.wait_records(1)
        assert 0.3 < waited < 2.5
        assert record["reason"] == "handshake_timeout"

    run(loop_kind, main())


def test_oversized_http_head_is_refused(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port, max_handshake_bytes=1024), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.HTTP))
            writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Fill: " + b"a" * 4096)
            reply = await asyncio.wait_for(reader.read(), 2)
            writer.close()
            (record,) = await proxy.wait_records(1)
        assert reply.startswith(b"HTTP/1.1 431")
        assert record["reason"] == "bad_request"

    run(loop_kind, main())


def test_oversized_socks5_domain_within_limits_is_handled(loop_kind: str, tmp_path: Path) -> None:
    """A 255-byte name (the wire maximum) is a bad address, not a crash."""

    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port), tmp_path) as proxy,
        ):
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            code = await socks5_connect(reader, writer, b"a" * 255, 443)
            writer.close()
            (record,) = await proxy.wait_records(1)
        assert code == 0x08
        assert record["reason"] == "bad_address"

    run(loop_kind, main())


def test_one_apps_stalled_clients_do_not_block_another_app(loop_kind: str, tmp_path: Path) -> None:
    """300 of one app's clients stall in their handshake: the app holds at most
    max_handshakes_per_app of them (the rest are refused at once), and another app's client
    still gets through at once."""

    async def main() -> None:
        async with EchoUpstream() as upstream:
            allow = [f"127.0.0.1:{upstream.port}"]
            settings = config(upstream.port, handshake_timeout=5.0, max_handshakes_per_app=40)
            settings["app"] = [
                {"name": "noisy", "uids": [str(APP_UID)], "allow": allow},
                {"name": "quiet", "uids": [str(OTHER_APP_UID)], "allow": allow},
            ]
            async with running_proxy(settings, tmp_path) as proxy:
                stalled = []
                for index in range(300):
                    listener = ListenerKind.SOCKS5 if index % 2 else ListenerKind.HTTP
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(listener))
                    writer.write(
                        b"\x05\x02" if listener is ListenerKind.SOCKS5 else b"CONNECT 127.0.0.1"
                    )
                    stalled.append(writer)
                refused = await proxy.wait_records(260)
                assert {r["reason"] for r in refused} == {"handshake_limit"}
                assert proxy.runtime.registry.handshakes("noisy") == 40
                started = asyncio.get_running_loop().time()
                quiet = proxy.address(ListenerKind.HTTP)
                reader, writer = await open_as_uid(OTHER_APP_UID, *quiet)
                status, _, _ = await http_connect(reader, writer, f"127.0.0.1:{upstream.port}")
                assert status == 200
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                assert asyncio.get_running_loop().time() - started < 1.0
                writer.close()
                for stale in stalled:
                    stale.close()
                await eventually(lambda: proxy.connections() == [], "every connection closed")

    run(loop_kind, main())


def test_uids_in_no_app_cannot_fill_max_connections(loop_kind: str, tmp_path: Path) -> None:
    """A local uid in no app is refused at accept, so it holds nothing: not even for the
    handshake timeout."""

    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(
                config(upstream.port, max_connections=10, handshake_timeout=5.0), tmp_path
            ) as proxy,
        ):
            strangers = []
            for _ in range(50):
                reader, writer = await open_as_uid(
                    STRANGER_UID, *proxy.address(ListenerKind.SOCKS5)
                )
                strangers.append(writer)
                assert await refused_at_accept(reader)
            records = await proxy.wait_records(50)
            assert {r["reason"] for r in records} == {"unknown_client"}
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
            writer.close()
            for stranger in strangers:
                stranger.close()

    run(loop_kind, main())


def test_connection_limit_refuses_beyond_max(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port, max_connections=5), tmp_path) as proxy,
        ):
            held = [
                await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5)) for _ in range(5)
            ]
            await eventually(lambda: len(proxy.connections()) == 5, "the proxy holds all five")
            reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
            writer.write(b"\x05\x01\x00")
            assert await asyncio.wait_for(refused_at_accept(reader), 2)
            writer.close()
            (refused,) = await proxy.wait_records(1)
            assert refused["reason"] == "connection_limit"
            for _, w in held:
                w.close()

    run(loop_kind, main())


def test_no_file_descriptor_leak_after_many_connections(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port, max_handshakes_per_app=1000), tmp_path) as proxy,
        ):

            async def one(index: int) -> None:
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                port = upstream.port if index % 3 else 1  # mix allowed and denied
                code = await socks5_connect(reader, writer, "127.0.0.1", port)
                if code == 0:
                    writer.write(b"x")
                    await reader.readexactly(1)
                writer.close()
                await writer.wait_closed()

            await asyncio.gather(*(one(i) for i in range(50)))
            await proxy.wait_records(50)
            before = open_fds()
            await asyncio.gather(*(one(i) for i in range(300)))
            await proxy.wait_records(350)
            await eventually(lambda: proxy.connections() == [], "every connection closed")
            # Transports close their sockets a loop turn or two after the connection ends.
            await eventually(
                lambda: open_fds() - before <= 2,
                "the descriptors are back to where they were",
                detail=lambda: (before, open_fds()),
            )
            after = open_fds()
            assert proxy.connections() == []
        assert after - before <= 2, (before, after)

    run(loop_kind, main())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_client_that_hangs_up_is_client_closed_not_an_error(loop_kind: str, tmp_path: Path) -> None:
    """Port scanners and health checks connect and close: that is not a protocol violation."""

    async def main() -> None:
        async with (
            EchoUpstream() as upstream,
            running_proxy(config(upstream.port), tmp_path) as proxy,
        ):
            for listener in (ListenerKind.SOCKS5, ListenerKind.HTTP):
                _, writer = await open_as_uid(APP_UID, *proxy.address(listener))
                writer.close()
            records = await proxy.wait_records(2)
        assert {r["reason"] for r in records} == {"client_closed"}
        assert {r["decision"] for r in records} == {"error"}

    run(loop_kind, main())
