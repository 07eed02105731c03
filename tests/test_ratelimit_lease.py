"""Leases of tokens (ratelimit/lease.py) over real Redis buckets: fewer round trips for a
busy bucket, never more than the bucket granted, and the documented bounds on over- and
under-admission across two nodes sharing one bucket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratelimit.gcra import Rate
from ratelimit.lease import LeasedBuckets
from ratelimit.redis import RedisBuckets
from tests.redisserver import RedisServer, redis_server_fixture

redis_server = redis_server_fixture


class Node:
    """One proxy's leased buckets, counting its round trips to Redis."""

    def __init__(self, server: RedisServer, clock: Callable[[], float] = time.monotonic) -> None:
        self.round_trips = 0
        client = redis.asyncio.Redis.from_url(server.url, retry=Retry(NoBackoff(), 1))
        self.buckets = LeasedBuckets(
            RedisBuckets(client, timeout=1.0, observe=self._count), clock=clock
        )

    def _count(self, seconds: float, kind: str | None) -> None:
        self.round_trips += 1


def run(body: Callable[[list[Node]], Awaitable[None]]) -> None:
    async def main() -> None:
        nodes: list[Node] = []
        try:
            await asyncio.wait_for(body(nodes), 60)
        finally:
            for node in nodes:
                await node.buckets.aclose()

    asyncio.run(main())


def test_a_sequential_client_needs_few_round_trips(redis_server: RedisServer) -> None:
    async def body(nodes: list[Node]) -> None:
        node = Node(redis_server)
        nodes.append(node)
        fast = Rate(1_000_000, 1_000_000)
        results = [await node.buckets.take("blog/conn", fast) for _ in range(2_000)]
        assert all(r.allowed for r in results)
        assert node.round_trips < 2_000 / 20  # leases grew to 64 tokens
        assert node.buckets.lease_size("blog/conn") == 64

    run(body)


def test_a_lease_never_grants_more_than_the_bucket_holds(redis_server: RedisServer) -> None:
    async def body(nodes: list[Node]) -> None:
        node = Node(redis_server)
        nodes.append(node)
        held = Rate(0.001, 40)  # 40 tokens and no refill to speak of
        sequential = [await node.buckets.take("blog/conn", held) for _ in range(60)]
        concurrent = await asyncio.gather(
            *(node.buckets.take("shop/conn", held) for _ in range(60))
        )
        assert sum(r.allowed for r in sequential) <= 40
        assert sum(r.allowed for r in concurrent) <= 40
        denied = next(r for r in sequential if not r.allowed)
        assert denied.retry_after_seconds > 100

    run(body)


def test_sizes_grow_with_demand_and_start_over_after_a_quiet_spell(
    redis_server: RedisServer,
) -> None:
    async def body(nodes: list[Node]) -> None:
        now = [0.0]
        node = Node(redis_server, clock=lambda: now[0])
        nodes.append(node)
        fast = Rate(100_000, 100_000)
        sizes = []
        for _ in range(40):
            assert (await node.buckets.take("blog/conn", fast)).allowed
            sizes.append(node.buckets.lease_size("blog/conn"))
        assert sizes[:4] == [1, 2, 2, 4] and max(sizes) == 32  # doubles while used up
        now[0] += 1.0  # quiet for far longer than a lease
        assert (await node.buckets.take("blog/conn", fast)).allowed
        assert node.buckets.lease_size("blog/conn") == 1

    run(body)


def test_two_nodes_stay_within_the_documented_bounds(redis_server: RedisServer) -> None:
    """Rate 400/s, burst 40, leases of up to 20 tokens for 50 ms: over one second the two
    nodes together admit no more than rate * (w + 0.05) + burst, and not much less than
    rate * w + burst (every lease is used up while demand lasts)."""

    async def body(nodes: list[Node]) -> None:
        nodes += [Node(redis_server), Node(redis_server)]
        rate = Rate(400, 40)
        admitted = 0
        started = time.monotonic()

        async def hammer(node: Node) -> None:
            nonlocal admitted
            while time.monotonic() - started < 1.0:
                if (await node.buckets.take("blog/conn", rate)).allowed:
                    admitted += 1
                await asyncio.sleep(0.0005)  # ~2,000 attempts a second per node: 10x the rate

        await asyncio.gather(*(hammer(node) for node in nodes))
        window = time.monotonic() - started
        assert admitted <= 400 * (window + 0.05) + 40 + 1
        assert admitted >= 0.9 * (400 * window + 40)

    run(body)


def test_a_refusal_is_remembered_until_the_next_token(redis_server: RedisServer) -> None:
    """An app hammering an empty bucket costs no round trip per refused connection: Redis's
    answer holds for every node until the bucket's next token."""

    async def body(nodes: list[Node]) -> None:
        now = [0.0]
        node = Node(redis_server, clock=lambda: now[0])
        nodes.append(node)
        slow = Rate(0.001, 1)  # one token, the next in 1000 s
        assert (await node.buckets.take("blog/conn", slow)).allowed
        first = await node.buckets.take("blog/conn", slow)
        assert not first.allowed and first.retry_after_seconds > 999
        trips = node.round_trips
        now[0] += 10.0
        again = [await node.buckets.take("blog/conn", slow) for _ in range(100)]
        assert not any(r.allowed for r in again)
        assert node.round_trips == trips  # answered here
        assert again[0].retry_after_seconds == first.retry_after_seconds - 10.0
        assert (await node.buckets.take("blog/conn", Rate(0.002, 1))).allowed is False
        assert node.round_trips == trips + 1  # another rate: asked again
        now[0] += 1000.0  # the remembered refusal ran out: Redis is asked again
        await node.buckets.take("blog/conn", slow)
        assert node.round_trips == trips + 2

    run(body)
