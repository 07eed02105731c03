"""Revoke, in every phase of a connection: an edit with revoke closes what the new rules deny
whether the connection is relaying, dialing, resolving or still in its handshake, and never
what they still allow (transparent tunnels allowed by a name rule included, after the DNS
cache has forgotten the name).

The connection drivers run on fake transports, a fake resolver and a fake dialer the test
steps through (``tests/unit/fakes.py``): phases as narrow as "between the lookup and the dial"
cannot be hit on purpose with real sockets.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from typing import Any

from egress.net.connection import ClientConnection
from egress.net.transparent import TransparentConnection
from egress.policy import decide_again
from rules.snapshot import PolicySnapshot
from tests.unit.fakes import Harness, make_snapshot, run, until
from tests.unit.test_connection import (
    API,
    SOCKS5,
    UPSTREAM_SOCKNAME,
    WWW,
    assert_released,
    transparent_extra,
)

BOTH: dict[str, Any] = {
    "app": [
        {"name": "blog", "uids": [10001], "allow": ["api.example.com:443", "www.example.com:80"]},
    ]
}
WWW_ONLY: dict[str, Any] = {
    "app": [{"name": "blog", "uids": [10001], "allow": ["www.example.com:80"]}],
}


def sweep(h: Harness, snapshot: PolicySnapshot) -> int:
    """What the runtime does after installing rules with revoke."""
    h.rules.current = snapshot
    return sum(
        1
        for connection in h.registry.live()
        if isinstance(connection, ClientConnection) and connection.recheck(snapshot)
    )


def test_an_open_tunnel_the_new_rules_deny_is_closed_and_logged_as_revoked() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        _, client = h.accept(SOCKS5.factory)
        SOCKS5.request(client, "api.example.com", 443)
        (await h.dialer.next_attempt()).complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: client.written.endswith(SOCKS5.success), "the tunnel is up")
        assert sweep(h, make_snapshot(version=4, data=BOTH)) == 0  # still allowed: kept
        assert not client.aborted
        assert sweep(h, make_snapshot(version=5, data=WWW_ONLY)) == 1
        [record] = await h.log.wait_for(1)
        assert (record["decision"], record["reason"]) == ("denied", "revoked")
        assert "not_allowed" in record["error"]
        assert h.sample("egress_rules_revoked_tunnels_total") == 1
        assert_released(h)

    run(main())


def test_a_connection_being_resolved_is_decided_again_after_its_lookup() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        h.resolver.delay = 0.05  # the revoke lands while the name is being resolved
        _, client = h.accept(SOCKS5.factory)
        SOCKS5.request(client, "api.example.com", 443)
        await until(lambda: h.resolver.lookups, "the lookup started")
        assert sweep(h, make_snapshot(version=5, data=WWW_ONLY)) == 0  # closed once decided
        [record] = await h.log.wait_for(1)
        assert (record["decision"], record["reason"]) == ("denied", "revoked")
        assert h.dialer.attempts == []  # never dialed
        assert_released(h)

    run(main())


def test_a_connection_being_dialed_is_checked_on_the_address_it_reaches() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        _, client = h.accept(SOCKS5.factory)
        SOCKS5.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        assert sweep(h, make_snapshot(version=5, data=WWW_ONLY)) == 1  # denied outright
        await until(lambda: attempt.cancelled, "the dial is cancelled")
        [record] = await h.log.wait_for(1)
        assert record["reason"] == "revoked"
        assert SOCKS5.success not in client.written
        assert_released(h)

    run(main())


def test_a_dial_that_completes_after_a_revoke_that_still_allows_it_goes_on() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        _, client = h.accept(SOCKS5.factory)
        SOCKS5.request(client, "api.example.com", 443)
        attempt = await h.dialer.next_attempt()
        assert sweep(h, make_snapshot(version=4, data=BOTH)) == 0
        attempt.complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: client.written.endswith(SOCKS5.success), "the tunnel is up")
        assert not client.aborted

    run(main())


def test_a_handshake_in_progress_decides_under_the_new_rules() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        _, client = h.accept(SOCKS5.factory)
        client.feed(b"\x05\x01\x00")  # greeting only
        await until(lambda: client.written == b"\x05\x00", "method chosen")
        assert sweep(h, make_snapshot(version=5, data=WWW_ONLY)) == 0
        name = b"api.example.com"
        client.feed(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + (443).to_bytes(2, "big"))
        [record] = await h.log.wait_for(1)
        assert (record["decision"], record["reason"]) == ("denied", "not_allowed")
        assert_released(h)

    run(main())


def test_a_uid_moved_to_another_app_loses_its_tunnels() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        _, client = h.accept(SOCKS5.factory)
        SOCKS5.request(client, "www.example.com", 80)
        (await h.dialer.next_attempt()).complete(sockname=UPSTREAM_SOCKNAME)
        await until(lambda: client.written.endswith(SOCKS5.success), "the tunnel is up")
        moved = {"app": [{"name": "shop", "uids": [10001], "allow": ["www.example.com:80"]}]}
        assert sweep(h, make_snapshot(version=5, data=moved)) == 1
        [record] = await h.log.wait_for(1)
        assert record["reason"] == "revoked"
        assert "no longer in app 'blog'" in record["error"]

    run(main())


def test_a_transparent_tunnel_allowed_by_a_name_rule_survives_an_expired_cache() -> None:
    async def main() -> None:
        h = Harness(snapshot=make_snapshot(data=BOTH))
        h.resolver.cached[API] = ("api.example.com",)
        _, client = h.accept(TransparentConnection, extra=transparent_extra((API, 443)))
        (await h.dialer.next_attempt()).complete(sockname=UPSTREAM_SOCKNAME)
        await asyncio.sleep(0)
        h.resolver.cached.clear()  # the DNS cache has forgotten the name since
        assert sweep(h, make_snapshot(version=4, data=BOTH)) == 0  # its rule still stands
        assert not client.aborted
        assert sweep(h, make_snapshot(version=5, data=WWW_ONLY)) == 1  # its rule is gone

    run(main())


def test_decide_again_folds_a_name_over_the_dialed_address_only() -> None:
    snapshot = make_snapshot(
        data={"app": [{"name": "blog", "uids": [10001], "allow": ["api.example.com:443"]}]}
    )
    policy = snapshot.apps["blog"]
    allowed = decide_again(policy, "api.example.com", 443, (API,), allowed_by=None)
    assert allowed.allowed
    narrowed = make_snapshot(
        data={"app": [{"name": "blog", "uids": [10001], "allow": ["93.184.216.35:443"]}]}
    ).apps["blog"]
    assert not decide_again(narrowed, "api.example.com", 443, (API,), allowed_by=None).allowed
    assert decide_again(narrowed, "api.example.com", 443, (WWW,), allowed_by=None).allowed
    special = decide_again(
        policy, "api.example.com", 443, (IPv4Address("169.254.169.254"),), allowed_by=None
    )
    assert special.reason == "special_address"
