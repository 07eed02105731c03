"""Sentinel and Cluster for real: the deployments the tests start (tests/redisdeploy.py), the
clients :func:`egress.redisclient.make_client` makes for them, and the rule store and the rate
limiter's buckets through each, a forced Sentinel failover in the middle of the traffic included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio
import redis.exceptions

from egress.config import parse_config
from egress.redisclient import ClusterClient, SentinelMasterClient, make_client
from egress.stores import open_store
from ratelimit.base import LimiterUnavailable, LimitResult
from ratelimit.gcra import Rate
from ratelimit.redis import RedisBuckets, redis_key
from rules.apps import App, UidRange
from rules.edits import CreateApp
from rules.parse import parse_rule
from rules.stores.base import Actor, RuleStore
from rules.stores.errors import StoreUnavailableError
from rules.stores.redis import RedisBackend
from tests.polling import eventually
from tests.redisdeploy import (
    SLOTS,
    RedisCluster3,
    SentinelDeployment,
    sentinel_deployment_fixture,  # noqa: F401  (sentinel_deployment)
)
from tests.redisserver import _free_port
from tests.support import run

OPS = Actor("ops", "test", "node-1")
FOLLOW_WITHIN_S = 3.0  # a client uses the new master this soon after the sentinel names it
TIMEOUT_S = 1.0


def _app(name: str, uid: int) -> App:
    return App(name=name, uids=(UidRange(uid, uid),), allow=(parse_rule("api.example.com:443"),))


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster(shared_cluster: RedisCluster3) -> RedisCluster3:
    """The module's cluster, emptied for this test."""
    for node in shared_cluster.nodes:
        with node.client() as client:
            client.flushall()
            client.script_flush()
    return shared_cluster


def _keys_per_node(cluster: RedisCluster3) -> dict[int, set[bytes]]:
    found: dict[int, set[bytes]] = {}
    for node in cluster.nodes:
        with node.client() as client:
            found[node.port] = set(client.keys("*"))
    return found


# --- the deployments themselves ----------------------------------------------------------------


def test_cluster_has_three_masters_serving_every_slot(cluster: RedisCluster3) -> None:
    masters = cluster.masters()
    assert sorted(port for port, _ in masters) == sorted(node.port for node in cluster.nodes)
    assert sum(slots for _, slots in masters) == SLOTS
    assert all(slots > 5000 for _, slots in masters)
    assert cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{node.port}" for node in cluster.nodes
    )


def test_sentinel_failover_promotes_the_replica(sentinel_deployment: SentinelDeployment) -> None:
    before, replica = sentinel_deployment.master.port, sentinel_deployment.replica.port
    assert sentinel_deployment.master_port() == before
    with sentinel_deployment.master.client() as client:
        client.set("written-before", "1")
        assert client.wait(1, 5000) == 1  # replication is asynchronous: until the replica has it
    took = sentinel_deployment.failover()
    assert took < 10.0
    assert sentinel_deployment.master_port() == replica == sentinel_deployment.master.port
    assert sentinel_deployment.replica.port == before
    with sentinel_deployment.master.client() as client:
        assert client.get("written-before") == b"1"  # replicated before the switch
        assert client.info("replication")["role"] == "master"


# --- make_client -------------------------------------------------------------------------------


def test_cluster_client_reads_and_writes_keys_on_every_node(cluster: RedisCluster3) -> None:
    keys = [f"key-{i}" for i in range(60)]

    async def scenario() -> list[Any]:
        client = make_client(cluster.url, timeout=TIMEOUT_S)
        assert isinstance(client, ClusterClient)
        try:
            for key in keys:
                await client.set(key, key.upper())
            return [await client.get(key) for key in keys]
        finally:
            await client.aclose()

    assert run("asyncio", scenario()) == [key.upper().encode() for key in keys]
    per_node = _keys_per_node(cluster)
    assert all(per_node.values()), f"some node holds none of 60 keys: {per_node}"
    assert set().union(*per_node.values()) == {key.encode() for key in keys}


def test_cluster_client_that_reaches_no_node_raises_a_connection_error() -> None:
    """redis-py says RedisClusterException (not a RedisError); callers that catch RedisError
    (the store, the buckets) must see the outage as one."""
    url = f"redis+cluster://127.0.0.1:{_free_port()},127.0.0.1:{_free_port()}"  # nobody there

    async def scenario() -> None:
        client = make_client(url, timeout=0.5)
        try:
            with pytest.raises(redis.exceptions.ConnectionError, match="Redis Cluster unavailable"):
                await client.get("anything")
        finally:
            await client.aclose()

    run("asyncio", scenario())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_sentinel_client_follows_a_forced_failover_within_seconds(
    sentinel_deployment: SentinelDeployment, loop_kind: str
) -> None:
    """Writes every 5 ms while the sentinel switches masters: nothing but RedisErrors (if
    any) reach the caller, and the writes land on the new master soon after the switch."""
    deployment = sentinel_deployment

    async def scenario() -> tuple[float, list[str]]:
        client = make_client(deployment.url, timeout=TIMEOUT_S)
        assert isinstance(client, SentinelMasterClient)
        errors: list[str] = []
        stop = asyncio.Event()

        async def writes() -> None:
            count = 0
            deadline = time.monotonic() + 15.0  # bounded whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                count += 1
                try:
                    await client.set("counter", count)
                except redis.exceptions.RedisError as error:
                    errors.append(type(error).__name__)
                await asyncio.sleep(0.005)

        try:
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(writes())
                await asyncio.sleep(0.3)
                await asyncio.to_thread(deployment.failover)
                switched = time.monotonic()
                new_master = deployment.master.client()
                with contextlib.closing(new_master):
                    first = await asyncio.to_thread(new_master.get, "counter")
                    await eventually(
                        lambda: new_master.get("counter") != first,
                        "writes reach the new master",
                        timeout=FOLLOW_WITHIN_S + 2,
                    )
                followed = time.monotonic() - switched
                await asyncio.sleep(0.2)
                stop.set()
            assert writer.done()
        finally:
            await client.aclose()
        return followed, errors

    followed, errors = run(loop_kind, scenario())
    assert followed < FOLLOW_WITHIN_S, f"writes reached the new master {followed:.2f} s late"
    assert len(errors) < 50, errors


# --- the rule store ----------------------------------------------------------------------------


def test_rule_store_commits_reads_and_follows_through_the_cluster(cluster: RedisCluster3) -> None:
    async def scenario() -> None:
        backend = RedisBackend(make_client(cluster.url, timeout=TIMEOUT_S))  # type: ignore[arg-type]
        store = RuleStore(backend)
        feed = cast(AsyncGenerator[int, None], backend.changes())
        try:
            # The change feed first, before any other command loaded the slot map.
            assert await asyncio.wait_for(anext(feed), 5) == 0
            await store.commit(CreateApp(_app("blog", 10001)), OPS)
            assert await asyncio.wait_for(anext(feed), 5) == 1
            await store.commit(CreateApp(_app("shop", 10002)), OPS)
            assert await asyncio.wait_for(anext(feed), 5) == 2
            state = await store.read()
            assert [app.name for app in state.rule_set.apps] == ["blog", "shop"]
            assert [record.version for record in await store.history()] == [2, 1]
        finally:
            await feed.aclose()
            await store.aclose()

    run("asyncio", scenario())
    per_node = _keys_per_node(cluster)
    holding = [port for port, keys in per_node.items() if keys]
    assert len(holding) == 1, f"the store's keys are spread over nodes: {per_node}"


def test_rule_store_commits_and_reads_across_a_sentinel_failover(
    sentinel_deployment: SentinelDeployment,
) -> None:
    deployment = sentinel_deployment

    async def commit_soon(store: RuleStore, app: App) -> float:
        started = time.monotonic()
        while True:
            try:
                await store.commit(CreateApp(app), OPS)
                return time.monotonic() - started
            except StoreUnavailableError:
                if time.monotonic() - started > 10:
                    raise
                await asyncio.sleep(0.05)

    async def scenario() -> None:
        client = make_client(deployment.url, timeout=TIMEOUT_S)
        assert isinstance(client, SentinelMasterClient)
        backend = RedisBackend(client)
        store = RuleStore(backend)
        heard: list[int] = []

        async def follow() -> None:  # as a proxy follows the store: always reading the feed
            async for version in backend.changes():
                heard.append(version)

        try:
            async with asyncio.TaskGroup() as tasks:
                follower = tasks.create_task(follow())
                await eventually(lambda: heard == [0], "the feed reports version 0")
                await store.commit(CreateApp(_app("blog", 10001)), OPS)
                await eventually(lambda: heard[-1] == 1, "the feed reports version 1")
                await asyncio.sleep(1.0)  # idle a while, as a store between two edits
                await asyncio.to_thread(deployment.failover)
                # The old master still takes writes (until the sentinel demotes it, ~8 s
                # later): the commit must go to the new one, or the edit would be lost.
                took = await commit_soon(store, _app("shop", 10002))
                assert _master_port(client) == deployment.master.port
                assert took < FOLLOW_WITHIN_S
                state = await store.read()
                assert [app.name for app in state.rule_set.apps] == ["blog", "shop"]
                # The feed moved too. It may miss version 2: redis-py resubscribes a dropped
                # pub/sub connection by itself, and a commit published meanwhile is not heard.
                await store.commit(CreateApp(_app("wiki", 10003)), OPS)
                await eventually(lambda: heard[-1] == 3, "the feed reports version 3")
                follower.cancel()
        finally:
            await store.aclose()
        fresh_client = make_client(deployment.url, timeout=TIMEOUT_S)
        assert isinstance(fresh_client, SentinelMasterClient)
        fresh = RuleStore(RedisBackend(fresh_client))
        try:
            state = await fresh.read()
            names = [a.name for a in state.rule_set.apps]
            assert (state.version, names) == (3, ["blog", "shop", "wiki"])
        finally:
            await fresh.aclose()

    run("asyncio", scenario())
    with deployment.master.client() as client:
        assert client.get("{egress}:rules:version") == b"3"


def _master_port(client: SentinelMasterClient) -> int | None:
    """The port of the master a Sentinel client connects to now."""
    address = client.connection_pool.master_address  # type: ignore[attr-defined]
    return None if address is None else int(address[1])


def test_config_with_a_sentinel_url_opens_a_working_store(
    sentinel_deployment: SentinelDeployment, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "proxy": {"socks5_listen": ["127.0.0.1:0"]},
            "rules": {"store": "redis", "redis_prefix": "conf"},
            "redis": {"url": sentinel_deployment.url},
        },
        source=str(tmp_path / "egress.toml"),
    )

    async def scenario() -> int:
        store = open_store(config)
        try:
            assert store.name == sentinel_deployment.url
            await store.commit(CreateApp(_app("blog", 10001)), OPS)
            return (await store.read()).version
        finally:
            await store.aclose()

    assert run("asyncio", scenario()) == 1
    with sentinel_deployment.master.client() as client:
        assert client.get("{conf}:rules:version") == b"1"


# --- the rate limiter's buckets ----------------------------------------------------------------

NEGLIGIBLE = 0.001  # tokens per second: nothing refills while a test runs


def _apps_on_every_node(client: Any, want_per_node: int = 2) -> list[str]:
    """App names whose buckets live on each of the cluster's three masters."""
    by_node: dict[str, list[str]] = {}
    for index in range(1000):
        name = f"app{index}"
        node = client.get_node_from_key(redis_key("egress", f"{name}/conn")).name
        if len(by_node.setdefault(node, [])) < want_per_node:
            by_node[node].append(name)
        if len(by_node) == 3 and all(len(v) == want_per_node for v in by_node.values()):
            break
    assert len(by_node) == 3
    return [name for names in by_node.values() for name in names]


def test_buckets_through_the_cluster_keep_each_app_in_one_slot(cluster: RedisCluster3) -> None:
    keys = ["blog/conn", "blog/bandwidth", "blog/dest/api.example.com:443", "blog/x{y}z"]

    async def scenario() -> set[int]:
        client = make_client(cluster.url, timeout=TIMEOUT_S, retries=0)
        assert isinstance(client, ClusterClient)
        buckets = RedisBuckets(client, timeout=TIMEOUT_S)
        try:
            for key in keys:
                assert (await buckets.take(key, Rate(10, 10))).allowed
            return {await client.cluster_keyslot(redis_key("egress", key)) for key in keys}
        finally:
            await buckets.aclose()

    slots = run("asyncio", scenario())
    assert len(slots) == 1, f"one app's buckets are in slots {slots}"
    per_node = _keys_per_node(cluster)
    assert sorted(len(keys_) for keys_ in per_node.values()) == [0, 0, len(keys)]


def test_buckets_through_the_cluster_hold_limits_exactly_on_every_node(
    cluster: RedisCluster3,
) -> None:
    """Burst N, 3N concurrent takes per app, apps on all three nodes in the same batches:
    exactly N granted per app."""
    burst = 40

    async def scenario() -> dict[str, list[LimitResult]]:
        client = make_client(cluster.url, timeout=TIMEOUT_S, retries=0)
        buckets = RedisBuckets(client, timeout=TIMEOUT_S)
        try:
            await client.initialize()  # the slot map, to pick apps on every node
            apps = _apps_on_every_node(client)
            rate = Rate(NEGLIGIBLE, burst)
            takes = [
                (app, buckets.take(f"{app}/conn", rate)) for app in apps for _ in range(3 * burst)
            ]
            results = await asyncio.gather(*(take for _, take in takes))
            outcome: dict[str, list[LimitResult]] = {}
            for (app, _), result in zip(takes, results, strict=True):
                outcome.setdefault(app, []).append(result)
            return outcome
        finally:
            await buckets.aclose()

    outcome = run("asyncio", scenario())
    assert len(outcome) == 6
    for app, results in outcome.items():
        granted = sum(result.allowed for result in results)
        assert granted == burst, f"{app}: {granted} of {3 * burst} granted, burst {burst}"
        assert all(r.retry_after_seconds > 100 for r in results if not r.allowed)
    per_node = _keys_per_node(cluster)
    assert all(len(keys) == 2 for keys in per_node.values()), per_node


def test_buckets_through_the_cluster_survive_a_script_flush(cluster: RedisCluster3) -> None:
    async def scenario() -> list[bool]:
        client = make_client(cluster.url, timeout=TIMEOUT_S, retries=0)
        buckets = RedisBuckets(client, timeout=TIMEOUT_S)
        try:
            await client.initialize()
            apps = _apps_on_every_node(client, want_per_node=1)
            rate = Rate(NEGLIGIBLE, 2)
            first = [(await buckets.take(f"{app}/conn", rate)).allowed for app in apps]
            for node in cluster.nodes:  # every node forgets the script
                with node.client() as sync:
                    await asyncio.to_thread(sync.script_flush)
            second = [(await buckets.take(f"{app}/conn", rate)).allowed for app in apps]
            third = [(await buckets.take(f"{app}/conn", rate)).allowed for app in apps]
            return first + second + third
        finally:
            await buckets.aclose()

    assert run("asyncio", scenario()) == [True] * 6 + [False] * 3


def test_buckets_through_sentinel_follow_a_forced_failover(
    sentinel_deployment: SentinelDeployment,
) -> None:
    """A take every 5 ms while the sentinel switches masters: only LimiterUnavailable (if
    anything) escapes, and takes reach the new master within a few seconds of the switch."""
    deployment = sentinel_deployment
    rate = Rate(10_000, 10_000)  # every take allowed: this is about getting an answer at all
    key = redis_key("egress", "blog/conn")

    async def scenario() -> tuple[float, list[str], int, int]:
        client = make_client(deployment.url, timeout=0.05, retries=0)  # as egress/limits.py
        buckets = RedisBuckets(client, timeout=0.05)
        unavailable: list[str] = []
        answered_after: list[float] = []
        stop = asyncio.Event()
        switched = float("inf")

        async def takes() -> None:
            deadline = time.monotonic() + 15.0  # bounded whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    result = await buckets.take("blog/conn", rate)
                    assert result.allowed
                    if time.monotonic() > switched:
                        answered_after.append(time.monotonic())
                except LimiterUnavailable as error:
                    unavailable.append(error.kind)
                await asyncio.sleep(0.005)

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(takes())
                await asyncio.sleep(0.3)
                await asyncio.to_thread(deployment.failover)
                switched = time.monotonic()
                new_master = deployment.master.client()
                with contextlib.closing(new_master):
                    first = await asyncio.to_thread(new_master.get, key)
                    await eventually(
                        lambda: new_master.get(key) != first,
                        "takes change the bucket on the new master",
                        timeout=FOLLOW_WITHIN_S + 2,
                    )
                followed = time.monotonic() - switched
                await asyncio.sleep(0.5)  # and keep being answered there
                stop.set()
        finally:
            await buckets.aclose()
        late = sum(1 for at in answered_after if at > switched + followed)
        return followed, unavailable, len(answered_after), late

    followed, unavailable, answered, late = run("asyncio", scenario())
    assert followed < FOLLOW_WITHIN_S, f"takes reached the new master {followed:.2f} s late"
    assert set(unavailable) <= {"connection", "timeout"}, unavailable
    assert late >= 20, f"only {late} takes answered after the limiter moved ({answered} in all)"
