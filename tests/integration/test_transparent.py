"""Transparent mode: iptables REDIRECT sends a sandbox uid's TCP to the transparent listener.

Each test runs in a fresh network namespace whose loopback also carries 10.77.0.1 and fd77::1
(the "internet" for these tests). The REDIRECT rules here are written by hand so this file
tests the listener alone; the firewall controller's own transparent plan has its own tests.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from egress.net.connection import ListenerKind
from tests.configs import base_config
from tests.dnsstub import DnsStub
from tests.netns import network_namespace
from tests.processes import python_for_uid
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    EchoUpstream,
    open_as_uid,
    run,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.netns

UPSTREAM_V4 = "10.77.0.1"
UPSTREAM_V6 = "fd77::1"
INTERNET = (f"{UPSTREAM_V4}/32", f"{UPSTREAM_V6}/128")  # on the namespace's loopback


def redirect(port: int, *, family: int = 4, uids: str = f"{APP_UID}-{OTHER_APP_UID}") -> None:
    """What the firewall controller installs in transparent mode, reduced to one rule (only
    for the test "internet", so the app can still reach the proxy's explicit listeners)."""
    tool, network = ("iptables", "10.77.0.0/16") if family == 4 else ("ip6tables", "fd77::/16")
    subprocess.run(
        [tool, "-t", "nat", "-A", "OUTPUT", "-d", network, "-p", "tcp",
         "-m", "owner", "--uid-owner", uids, "-j", "REDIRECT", "--to-ports", str(port)],
        check=True,
    )  # fmt: skip


def transparent_config(allow: list[str], **sections: Any) -> dict[str, Any]:
    return base_config(
        proxy={"transparent_listen": "[::]:0", **sections.pop("proxy", {})},
        security={"allow_special": ["10.77.0.0/16", "fd77::/16"]},
        app=[{"name": "blog", "uids": [str(APP_UID)], "allow": allow}],
        **sections,
    )


async def exchange(uid: int, host: str, port: int, payload: bytes = b"ping") -> bytes:
    """Connect as ``uid`` straight to host:port (no proxy settings) and echo a payload."""
    try:
        reader, writer = await open_as_uid(uid, host, port)
    except ConnectionError:
        return b"<refused>"
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(len(payload)), 5)
    except ConnectionError:
        return b"<reset>"
    finally:
        writer.close()


def test_redirected_connection_is_checked_and_relayed(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream(UPSTREAM_V4) as allowed, EchoUpstream(UPSTREAM_V4) as other:
            config = transparent_config([f"{UPSTREAM_V4}:{allowed.port}"])
            async with running_proxy(config, tmp_path) as proxy:
                redirect(proxy.address(ListenerKind.TRANSPARENT)[1])
                assert await exchange(APP_UID, UPSTREAM_V4, allowed.port) == b"ping"
                assert await exchange(APP_UID, UPSTREAM_V4, other.port) in (b"", b"<reset>")
                assert await exchange(OTHER_APP_UID, UPSTREAM_V4, allowed.port) in (b"", b"<reset>")
                records = await proxy.wait_records(3)
            assert other.accepted == 0
        # Records are written at close, so pick them out by who and where rather than order.
        by_key = {(r["uid"], r["dest"]): r for r in records}
        first = by_key[(APP_UID, f"{UPSTREAM_V4}:{allowed.port}")]
        denied = by_key[(APP_UID, f"{UPSTREAM_V4}:{other.port}")]
        stranger = by_key[(OTHER_APP_UID, f"{UPSTREAM_V4}:{allowed.port}")]
        assert first["listener"] == "transparent"
        assert (first["uid"], first["app"], first["decision"]) == (APP_UID, "blog", "allowed")
        assert first["dest"] == first["dialed"] == f"{UPSTREAM_V4}:{allowed.port}"
        assert first["bytes_up"] == first["bytes_down"] == 4
        assert denied["reason"] == "not_allowed"
        assert (stranger["uid"], stranger["reason"]) == (OTHER_APP_UID, "unknown_client")

    with network_namespace(addresses=INTERNET):
        run(loop_kind, main())


def test_ipv6_redirect(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream(UPSTREAM_V6) as upstream:
            config = transparent_config([f"[{UPSTREAM_V6}]:{upstream.port}"])
            async with running_proxy(config, tmp_path) as proxy:
                redirect(proxy.address(ListenerKind.TRANSPARENT)[1], family=6)
                assert await exchange(APP_UID, UPSTREAM_V6, upstream.port) == b"ping"
                (record,) = await proxy.wait_records(1)
        assert record["dialed"] == f"[{UPSTREAM_V6}]:{upstream.port}"
        assert record["uid"] == APP_UID

    with network_namespace(addresses=INTERNET):
        run(loop_kind, main())


def test_name_rules_match_only_through_the_proxys_own_resolution(
    loop_kind: str, tmp_path: Path
) -> None:
    """A name rule covers a redirected address only once the proxy itself resolved the name
    to that address; before that the same connection is denied."""

    async def main() -> None:
        with DnsStub({"svc.example.test": [UPSTREAM_V4]}, ttl=300) as dns:
            async with EchoUpstream(UPSTREAM_V4) as upstream:
                config = transparent_config(
                    [f"svc.example.test:{upstream.port}"],
                    resolver={"nameservers": [dns.address]},
                )
                async with running_proxy(config, tmp_path) as proxy:
                    redirect(proxy.address(ListenerKind.TRANSPARENT)[1])
                    before = await exchange(APP_UID, UPSTREAM_V4, upstream.port)
                    # The app asks the proxy for the name once (explicit SOCKS5 path) ...
                    socks = proxy.address(ListenerKind.SOCKS5)
                    reader, writer = await open_as_uid(APP_UID, *socks)
                    assert (
                        await socks5_connect(reader, writer, b"svc.example.test", upstream.port)
                        == 0
                    )
                    writer.close()
                    # ... and now the redirected connection to that address is covered.
                    after = await exchange(APP_UID, UPSTREAM_V4, upstream.port)
                    records = await proxy.wait_records(3)
        assert before in (b"", b"<reset>")
        assert after == b"ping"
        transparent = [r for r in records if r["listener"] == "transparent"]
        assert sorted(r["reason"] for r in transparent) == ["allowed", "not_allowed"]
        (matched,) = (r for r in transparent if r["reason"] == "allowed")
        assert matched["rule"] == f"svc.example.test:{upstream.port}"

    with network_namespace(addresses=INTERNET):
        run(loop_kind, main())


def test_direct_connection_to_the_transparent_port_is_refused(
    loop_kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with running_proxy(transparent_config([f"{UPSTREAM_V4}:*"]), tmp_path) as proxy:
            port = proxy.address(ListenerKind.TRANSPARENT)[1]
            assert await exchange(APP_UID, "127.0.0.1", port) in (b"", b"<reset>")
            (record,) = await proxy.wait_records(1)
        assert record["reason"] == "bad_request"

    with network_namespace(addresses=INTERNET):
        run(loop_kind, main())


def test_unmodified_curl_under_a_sandbox_uid(loop_kind: str, tmp_path: Path) -> None:
    """curl with no proxy settings reaches an allowed origin and is refused for another one."""

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\norigin")
        await writer.drain()
        writer.close()

    async def curl(url: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            "setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
            "curl", "--silent", "--max-time", "5", "--noproxy", "*", url,
            cwd="/", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    async def main() -> None:
        servers = [
            await asyncio.start_server(origin, host, 0)
            for host in (UPSTREAM_V4, UPSTREAM_V4, UPSTREAM_V6)
        ]
        allowed4, denied4, allowed6 = (s.sockets[0].getsockname()[1] for s in servers)
        try:
            config = transparent_config(
                [f"{UPSTREAM_V4}:{allowed4}", f"[{UPSTREAM_V6}]:{allowed6}"]
            )
            async with running_proxy(config, tmp_path) as proxy:
                port = proxy.address(ListenerKind.TRANSPARENT)[1]
                redirect(port)
                redirect(port, family=6)
                ok4 = await curl(f"http://{UPSTREAM_V4}:{allowed4}/")
                refused = await curl(f"http://{UPSTREAM_V4}:{denied4}/")
                ok6 = await curl(f"http://[{UPSTREAM_V6}]:{allowed6}/")
                records = await proxy.wait_records(3)
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()
        assert ok4 == (0, "origin")
        assert ok6 == (0, "origin")
        assert refused[0] != 0  # curl: (56) connection reset / (52) empty reply
        reasons = {r["dest"]: r["reason"] for r in records}
        assert reasons == {
            f"{UPSTREAM_V4}:{allowed4}": "allowed",
            f"{UPSTREAM_V4}:{denied4}": "not_allowed",
            f"[{UPSTREAM_V6}]:{allowed6}": "allowed",
        }
        assert {r["uid"] for r in records} == {APP_UID}

    assert python_for_uid(APP_UID)  # the uid can run programs at all (sanity for CI images)
    with network_namespace(addresses=INTERNET):
        run(loop_kind, main())
