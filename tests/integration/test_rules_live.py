"""A running proxy follows its rule store: edits apply without a signal, and an edit with
revoke closes the tunnels it no longer allows (logged and counted as ``revoked``) while an edit
without it lets open tunnels finish.

In-process proxies on the file store (the config file itself) and on a real ``redis-server``;
real SOCKS5 clients under the app's uid, real TCP upstreams.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from egress.net.connection import ListenerKind
from egress.stores import open_store
from rules.apps import RuleSet
from rules.edits import AddRules, RemoveRules, ReplaceAll
from rules.parse import parse_rule
from rules.stores.base import Actor, RuleStore
from tests.configs import base_config, config_from
from tests.polling import eventually
from tests.redisserver import RedisServer
from tests.support import (
    APP_UID,
    EchoUpstream,
    ProxyHandle,
    open_as_uid,
    run,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.root

ACTOR = Actor("tester", "cli", "here")


def loopback_config(*ports: int, **sections: Any) -> dict[str, Any]:
    sections.setdefault("security", {"allow_special": ["127.0.0.0/8"]})
    sections.setdefault(
        "app",
        [{"name": "blog", "uids": [str(APP_UID)], "allow": [f"127.0.0.1:{p}" for p in ports]}],
    )
    return base_config(**sections)


async def connect(proxy: ProxyHandle, port: int) -> tuple[int, asyncio.StreamWriter]:
    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
    return await socks5_connect(reader, writer, "127.0.0.1", port), writer


async def code_of(proxy: ProxyHandle, port: int) -> int:
    code, writer = await connect(proxy, port)
    writer.close()
    return code


async def in_force(proxy: ProxyHandle, version: int) -> None:
    """Until the proxy decides under the store's ``version`` (with the file store, its own
    version is never behind the file's but may run ahead of it)."""
    runtime = proxy.runtime

    def reached() -> bool:
        if runtime.store_source is None:
            return runtime.config.rules.version >= version
        return runtime.holder.current.version >= version

    await eventually(reached, f"rules version {version} read", timeout=5.0)
    await runtime.holder.wait_for_version(runtime.source.latest.version)


def store_of(proxy: ProxyHandle) -> RuleStore:
    return open_store(proxy.runtime.config)


def test_a_file_store_edit_applies_without_a_signal(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            EchoUpstream() as first,
            EchoUpstream() as second,
            running_proxy(loopback_config(first.port), tmp_path) as proxy,
        ):
            assert await code_of(proxy, second.port) == 0x02
            store = store_of(proxy)
            committed = await store.commit(
                AddRules("blog", (parse_rule(f"127.0.0.1:{second.port}"),)), ACTOR
            )
            await in_force(proxy, committed.state.version)
            # The version the edit printed is the version in force (no hand edit between).
            assert proxy.runtime.holder.current.version == committed.state.version == 1
            assert await code_of(proxy, second.port) == 0
            await store.aclose()

    run("uvloop", main())


@pytest.mark.parametrize("revoke", [True, False], ids=["revoke", "no-revoke"])
def test_revoke_closes_only_what_the_new_rules_deny(tmp_path: Path, revoke: bool) -> None:
    async def main() -> None:
        async with EchoUpstream() as kept, EchoUpstream() as dropped:
            data = loopback_config(kept.port, dropped.port)
            async with running_proxy(data, tmp_path) as proxy:
                reader_kept, writer_kept = await open_as_uid(
                    APP_UID, *proxy.address(ListenerKind.SOCKS5)
                )
                assert await socks5_connect(reader_kept, writer_kept, "127.0.0.1", kept.port) == 0
                reader_drop, writer_drop = await open_as_uid(
                    APP_UID, *proxy.address(ListenerKind.SOCKS5)
                )
                assert (
                    await socks5_connect(reader_drop, writer_drop, "127.0.0.1", dropped.port) == 0
                )
                store = store_of(proxy)
                committed = await store.commit(
                    RemoveRules("blog", (parse_rule(f"127.0.0.1:{dropped.port}"),)),
                    ACTOR,
                    revoke=revoke,
                )
                await in_force(proxy, committed.state.version)
                assert await code_of(proxy, dropped.port) == 0x02  # new connections: denied
                # The kept tunnel still relays either way.
                writer_kept.write(b"ping")
                assert await asyncio.wait_for(reader_kept.readexactly(4), 2) == b"ping"
                if revoke:
                    assert await asyncio.wait_for(reader_drop.read(1), 2) == b""
                    records = await proxy.wait_records(2)  # the denied probe and the revoked one
                    revoked = [r for r in records if r["reason"] == "revoked"]
                    assert len(revoked) == 1
                    assert revoked[0]["dest"] == f"127.0.0.1:{dropped.port}"
                    assert revoked[0]["decision"] == "denied"
                    assert "revoked by a rules edit" in revoked[0]["error"]
                    registry = proxy.runtime.metrics.registry
                    assert registry.get_sample_value("egress_rules_revoked_tunnels_total") == 1
                else:
                    writer_drop.write(b"pong")
                    assert await asyncio.wait_for(reader_drop.readexactly(4), 2) == b"pong"
                    assert all(r["reason"] != "revoked" for r in proxy.records())
                for writer in (writer_kept, writer_drop):
                    writer.close()
                await store.aclose()

    run("uvloop", main())


def test_a_redis_store_edit_applies_through_the_change_feed(tmp_path: Path) -> None:
    """Start-up reads the store; a commit (with revoke) reaches the proxy through pub/sub
    well inside the backstop interval, and the tunnel it no longer allows is closed."""

    async def main(server: RedisServer) -> None:
        async with EchoUpstream() as first, EchoUpstream() as second:
            seed = loopback_config(first.port, second.port)
            data = loopback_config(
                app=[],
                rules={"store": "redis", "check_interval": 30.0},
                redis={"url": server.url},
            )
            store = open_store(config_from(data))
            await store.commit(
                ReplaceAll(RuleSet.from_data({"app": seed["app"]}, version=0, source="seed")), ACTOR
            )
            async with running_proxy(data, tmp_path) as proxy:
                assert proxy.runtime.ready()
                reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                assert await socks5_connect(reader, writer, "127.0.0.1", second.port) == 0
                committed = await store.commit(
                    RemoveRules("blog", (parse_rule(f"127.0.0.1:{second.port}"),)),
                    ACTOR,
                    revoke=True,
                )
                loop = asyncio.get_running_loop()
                started = loop.time()
                await in_force(proxy, committed.state.version)
                assert loop.time() - started < 1.0  # the feed, not the 30 s backstop
                assert await asyncio.wait_for(reader.read(1), 2) == b""
                assert await code_of(proxy, second.port) == 0x02
                assert await code_of(proxy, first.port) == 0
                writer.close()
            await store.aclose()

    with RedisServer(tmp_path / "redis") as server:
        run("uvloop", main(server))


def test_a_redis_store_that_went_back_is_followed_and_revokes(tmp_path: Path) -> None:
    """Redis lost its last commits (a failover to a lagging replica, a restore): the proxy
    applies what the store holds now, even at a version it saw before, and closes what that
    no longer allows; a later commit that lands on a version number seen before is applied
    too (a version is not an identity). A store left empty (version 0: flushed, restarted
    without persistence) is not applied: the rules in force stay and the node is not ready
    until the store is seeded again."""

    async def main(server: RedisServer) -> None:
        async with EchoUpstream() as first, EchoUpstream() as second:
            data = loopback_config(
                app=[],
                rules={"store": "redis", "check_interval": 0.3},
                redis={"url": server.url},
            )
            both = loopback_config(first.port, second.port)["app"]
            only_first = loopback_config(first.port)["app"]
            writer = open_store(config_from(data))
            for _ in range(3):  # version 3: both allowed
                await writer.commit(
                    ReplaceAll(RuleSet.from_data({"app": both}, version=0, source="seed")),
                    ACTOR,
                )
                both[0]["allow"] = list(reversed(both[0]["allow"]))
            async with running_proxy(data, tmp_path) as proxy:
                assert proxy.runtime.holder.current.version == 3
                reader, writer_tunnel = await open_as_uid(
                    APP_UID, *proxy.address(ListenerKind.SOCKS5)
                )
                assert await socks5_connect(reader, writer_tunnel, "127.0.0.1", second.port) == 0
                with server.client() as client:
                    client.flushall()  # the commits are gone
                # An empty store is not the truth: the rules in force stay, and it says so.
                source = proxy.runtime.store_source
                assert source is not None
                await eventually(lambda: source.empty, "the empty store noticed", timeout=5.0)
                assert not await proxy.runtime._store_answers()  # /readyz: 503
                assert proxy.runtime.holder.current.version == 3
                assert await code_of(proxy, second.port) == 0
                await writer.aclose()
                writer = open_store(config_from(data))
                lost = await writer.commit(
                    ReplaceAll(RuleSet.from_data({"app": only_first}, version=0, source="again")),
                    ACTOR,
                )
                assert lost.state.version == 1
                await eventually(
                    lambda: proxy.runtime.holder.current.version == 1,
                    "the proxy follows the store back to version 1",
                    timeout=5.0,
                )
                assert await code_of(proxy, second.port) == 0x02
                assert await asyncio.wait_for(reader.read(1), 2) == b""  # revoked
                # Versions 2 and 3 again, with other content than the proxy saw at 3 before.
                await writer.commit(AddRules("blog", (parse_rule("a.example.com:443"),)), ACTOR)
                third = await writer.commit(
                    AddRules("blog", (parse_rule(f"127.0.0.1:{second.port}"),)), ACTOR
                )
                assert third.state.version == 3
                await eventually(
                    lambda: (
                        "a.example.com:443"
                        in {r.text for r in proxy.runtime.holder.current.ruleset.apps[0].allow}
                    ),
                    "version 3 as the store holds it now",
                    timeout=5.0,
                )
                assert await code_of(proxy, second.port) == 0
                writer_tunnel.close()
            await writer.aclose()

    with RedisServer(tmp_path / "redis") as server:
        run("uvloop", main(server))
