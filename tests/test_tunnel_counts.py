"""Tunnel counts across nodes (ratelimit/tunnels.py) on a real redis-server: the cap over
every node's count, absolute writes that repair what was lost, and a dead node's counts expiring
on the server's clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratelimit.base import LimiterUnavailable
from ratelimit.tunnels import RedisTunnelCounts
from tests.redisserver import RedisServer, redis_server_fixture

redis_server = redis_server_fixture


CLIENTS: list[redis.asyncio.Redis] = []


def counts(server: RedisServer, node: str, *, ttl: float = 15.0) -> RedisTunnelCounts:
    client = redis.asyncio.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    CLIENTS.append(client)
    return RedisTunnelCounts(client, node=node, timeout=0.5, ttl=ttl)


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(body(), 30)
        finally:
            while CLIENTS:
                await CLIENTS.pop().aclose()

    asyncio.run(main())


def test_the_cap_counts_every_nodes_tunnels(redis_server: RedisServer) -> None:
    async def body() -> None:
        a, b = counts(redis_server, "a"), counts(redis_server, "b")
        assert await a.admit("blog", 1, 3) == (True, 1)
        assert await a.admit("blog", 2, 3) == (True, 2)
        assert await b.admit("blog", 1, 3) == (True, 3)
        assert await b.admit("blog", 2, 3) == (False, 3)  # b's second would make four
        assert await a.admit("shop", 1, 3) == (True, 1)  # another app: its own count
        assert await a.set("blog", 1) == 2  # a closed one
        assert await b.admit("blog", 2, 3) == (True, 3)
        assert await b.set("blog", 0) == 1  # b closed both: its field goes
        with redis_server.client() as admin:
            assert admin.hkeys("{egress:blog}:rl:tunnels") == [b"a"]
            assert admin.pttl("{egress:blog}:rl:tunnels") > 0

    run(body)


def test_writes_are_absolute_so_the_next_one_repairs_a_lost_one(redis_server: RedisServer) -> None:
    async def body() -> None:
        a, b = counts(redis_server, "a"), counts(redis_server, "b")
        assert await a.admit("blog", 3, 3) == (True, 3)
        # a's release of two tunnels was lost (Redis was away); its next write says 1
        assert await b.admit("blog", 1, 3) == (False, 3)
        assert await a.set("blog", 1) == 1
        assert await b.admit("blog", 2, 3) == (True, 3)

    run(body)


def test_a_dead_nodes_tunnels_expire(redis_server: RedisServer) -> None:
    async def body() -> None:
        dead = counts(redis_server, "dead", ttl=1.0)
        alive = counts(redis_server, "alive", ttl=1.0)
        assert await dead.admit("blog", 2, 2) == (True, 2)
        assert await alive.admit("blog", 1, 2) == (False, 2)
        started = time.monotonic()
        while not (await alive.admit("blog", 1, 2))[0]:
            assert time.monotonic() - started < 3.0, "the dead node's count never expired"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.9  # not before its TTL
        with redis_server.client() as admin:
            assert admin.hkeys("{egress:blog}:rl:tunnels") == [b"alive"]  # pruned

    run(body)


def test_redis_down_is_limiter_unavailable(redis_server: RedisServer) -> None:
    redis_server.stop()

    async def body() -> None:
        with pytest.raises(LimiterUnavailable) as raised:
            await counts(redis_server, "a").admit("blog", 1, 3)
        assert raised.value.kind == "connection"
        assert "tunnel counts: Redis" in str(raised.value)

    run(body)
