"""The bucket backends' contract, run against every backend, then what only Redis can get wrong.

Every contract test drives a :class:`ratelimit.base.Buckets`: ``MemoryBuckets`` on an injected
clock (time moves only when the test says so) and ``RedisBuckets`` on a real ``redis-server``
(tests/redisserver.py), whose clock is real: there the tests pick rates so slow that the few
milliseconds a test takes do not matter, or sleep briefly and allow for it (``tolerance``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from ratelimit.base import Buckets, LimiterUnavailable, LimitResult
from ratelimit.gcra import Rate
from ratelimit.memory import MemoryBuckets
from ratelimit.redis import RedisBuckets, redis_key
from tests.polling import eventually
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401  (redis_server)
from tests.support import run

SLOW = 0.001  # tokens per second: no token comes back while a test runs
CONTRACT_DEADLINE = 2.0  # seconds: generous, so a busy machine does not fail contract tests
FAILURE_DEADLINE = 0.2  # seconds: the deadline of the failure tests
NOT_A_HANG = 2.0  # seconds beyond the deadline that still count as "about the deadline"

RoundTrip = tuple[float, str | None]


# --- backends under test ----------------------------------------------------------------------
@dataclass
class Backend:
    """One backend under test: how to open it, how to let time pass, and how exact it is."""

    name: str
    make: Callable[..., Buckets]  # called on the test's loop
    advance: Callable[[float], Awaitable[None]]
    tolerance: float  # seconds a retry_after may be off by (real time passing)
    round_trips: list[RoundTrip] = field(default_factory=list)
    server: RedisServer | None = None

    @contextlib.asynccontextmanager
    async def opened(self, **options: Any) -> AsyncIterator[Buckets]:
        buckets = self.make(**options)
        try:
            yield buckets
        finally:
            await buckets.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.now_us = 1_000_000_000

    def __call__(self) -> int:
        return self.now_us


def _memory() -> Backend:
    clock = FakeClock()

    async def advance(seconds: float) -> None:
        clock.now_us += round(seconds * 1_000_000)

    return Backend("memory", lambda **_: MemoryBuckets(clock), advance, tolerance=0.0)


def _redis_client(server: RedisServer) -> redis.asyncio.Redis:
    """A client as the proxy should make one: one quick retry of a dropped connection."""
    return redis.asyncio.Redis.from_url(
        server.url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=2.0
    )


def _redis(server: RedisServer) -> Backend:
    backend: Backend

    def make(**options: Any) -> RedisBuckets:
        options.setdefault("timeout", CONTRACT_DEADLINE)
        return RedisBuckets(
            _redis_client(server),
            observe=lambda seconds, kind: backend.round_trips.append((seconds, kind)),
            **options,
        )

    backend = Backend("redis", make, asyncio.sleep, tolerance=0.5, server=server)
    return backend


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return _memory()
    return _redis(request.getfixturevalue("redis_server"))


@pytest.fixture
def redis_backend(redis_server: RedisServer) -> Backend:
    return _redis(redis_server)


def _approx(backend: Backend, seconds: float) -> Any:
    return pytest.approx(seconds, abs=backend.tolerance or 1e-9)


async def _takes(buckets: Buckets, key: str, rate: Rate, n: int, cost: int = 1) -> list[bool]:
    return [(await buckets.take(key, rate, cost)).allowed for _ in range(n)]


# --- the contract -----------------------------------------------------------------------------
def test_burst_then_deny_with_retry_after(backend: Backend) -> None:
    rate = Rate(0.1, 3)  # a token every 10 s

    async def main() -> None:
        async with backend.opened() as buckets:
            assert await _takes(buckets, "blog/conn", rate, 4) == [True, True, True, False]
            denied = await buckets.take("blog/conn", rate)
            assert not denied.allowed
            assert denied.retry_after_seconds == _approx(backend, 10.0)
            assert denied.retry_after_seconds <= 10.0

    run("asyncio", main())


def test_refills_at_the_rate(backend: Backend) -> None:
    rate = Rate(4, 1)  # a token every 250 ms

    async def main() -> None:
        async with backend.opened() as buckets:
            assert (await buckets.take("blog/conn", rate)).allowed
            denied = await buckets.take("blog/conn", rate)
            assert not denied.allowed
            assert 0 < denied.retry_after_seconds <= 0.25
            await backend.advance(denied.retry_after_seconds + 0.02)
            assert (await buckets.take("blog/conn", rate)).allowed  # one token came back
            again = await buckets.take("blog/conn", rate)  # and only one
            assert not again.allowed
            assert again.retry_after_seconds == _approx(backend, 0.25)  # burst 1: no credit
            assert again.retry_after_seconds <= 0.25

    run("asyncio", main())


def test_sustained_rate_over_many_intervals(backend: Backend) -> None:
    """A caller that keeps asking for 1.2 s at 20 a second gets the burst plus 20 a second."""
    rate = Rate(20, 2)

    async def main() -> None:
        async with backend.opened() as buckets:
            granted = 0
            first = last = time.monotonic()
            for _ in range(120):
                last = time.monotonic()
                granted += (await buckets.take("blog/conn", rate)).allowed
                await backend.advance(0.01)
            if backend.tolerance == 0:
                assert granted == 2 + 23  # the last take is 1.19 s after the first
            else:
                assert granted == pytest.approx(2 + (last - first) * 20, abs=2)

    run("asyncio", main())


def test_cost_above_one(backend: Backend) -> None:
    rate = Rate(SLOW, 5)

    async def main() -> None:
        async with backend.opened() as buckets:
            assert (await buckets.take("blog/bytes", rate, 3)).allowed
            denied = await buckets.take("blog/bytes", rate, 3)  # 3 of 2 left: none taken
            assert not denied.allowed
            assert denied.retry_after_seconds == _approx(backend, 1 / SLOW)
            assert (await buckets.take("blog/bytes", rate, 2)).allowed
            assert not (await buckets.take("blog/bytes", rate, 1)).allowed

    run("asyncio", main())


def test_cost_above_burst_never_fits(backend: Backend) -> None:
    rate = Rate(100, 5)

    async def main() -> None:
        async with backend.opened() as buckets:
            never = await buckets.take("blog/bytes", rate, 6)
            assert never == LimitResult(False, float("inf"))
            assert await _takes(buckets, "blog/bytes", rate, 5) == [True] * 5  # nothing taken

    run("asyncio", main())


def test_keys_are_independent(backend: Backend) -> None:
    rate = Rate(SLOW, 2)

    async def main() -> None:
        async with backend.opened() as buckets:
            assert await _takes(buckets, "blog/conn", rate, 3) == [True, True, False]
            assert await _takes(buckets, "blog/dest/api.example.com:443", rate, 2) == [True] * 2
            assert await _takes(buckets, "shop/conn", rate, 2) == [True, True]
            assert not (await buckets.take("blog/conn", rate)).allowed

    run("asyncio", main())


def test_a_changed_rate_keeps_the_state(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened() as buckets:
            assert await _takes(buckets, "blog/conn", Rate(SLOW, 2), 3) == [True, True, False]
            bigger = Rate(SLOW, 4)  # two more tokens of room, not a fresh bucket
            assert await _takes(buckets, "blog/conn", bigger, 3) == [True, True, False]
            smaller = Rate(SLOW, 1)  # four tokens owed, one of room: three intervals to wait
            denied = await buckets.take("blog/conn", smaller)
            assert denied.retry_after_seconds == _approx(backend, 4 / SLOW)

    run("asyncio", main())


def test_concurrent_takes_grant_exactly_the_burst(backend: Backend) -> None:
    rate = Rate(SLOW, 50)

    async def main() -> None:
        async with backend.opened() as buckets:
            results = await asyncio.gather(*(buckets.take("blog/conn", rate) for _ in range(500)))
            assert sum(result.allowed for result in results) == 50
            assert [result.allowed for result in results[:50]] == [True] * 50  # arrival order
            for result in results[50:]:
                assert result.retry_after_seconds == _approx(backend, 1 / SLOW)

    run("asyncio", main())


def test_concurrent_takes_over_keys_and_costs(backend: Backend) -> None:
    """Mixed keys and costs in one burst of calls: each key grants exactly its burst."""
    bursts = {"blog/conn": 7, "shop/conn": 30, "blog/dest/a.example:443": 1}

    async def main() -> None:
        async with backend.opened() as buckets:
            calls = []
            for index in range(600):
                key = list(bursts)[index % 3]
                calls.append((key, 2 if index % 5 == 0 else 1))
            results = await asyncio.gather(
                *(buckets.take(key, Rate(SLOW, bursts[key]), cost) for key, cost in calls)
            )
            for key, burst in bursts.items():
                tokens = sum(
                    cost
                    for (k, cost), result in zip(calls, results, strict=True)
                    if k == key and result.allowed
                )
                assert burst - 1 <= tokens <= burst, key  # a cost of 2 may not fit the last 1
                last = await buckets.take(key, Rate(SLOW, burst))
                assert last.allowed == (tokens < burst), key

    run("asyncio", main())


# --- Redis: the same arithmetic as gcra.py ----------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_redis_matches_memory_on_random_sequences(redis_server: RedisServer, seed: int) -> None:
    """The Lua script and gcra.py agree, call by call, on random keys, rates and costs."""
    rng = random.Random(seed)
    keys = [f"app{n}/conn" for n in range(3)]
    rates = {key: Rate(SLOW * rng.choice([1, 2, 3]), rng.randint(1, 12)) for key in keys}
    ops = [(rng.choice(keys), rng.choice([1, 1, 1, 2, 3, 13])) for _ in range(300)]
    memory = MemoryBuckets(FakeClock())

    async def main() -> None:
        async with _redis(redis_server).opened() as shared:
            for key, cost in ops:
                expected = memory.take_now(key, rates[key], cost)
                got = await shared.take(key, rates[key], cost)
                assert got.allowed == expected.allowed, (key, cost)
                assert got.retry_after_seconds == pytest.approx(
                    expected.retry_after_seconds, abs=0.5
                )

    run("asyncio", main())


# --- Redis: keys and expiry -------------------------------------------------------------------
def test_redis_key_is_hash_tagged_per_app() -> None:
    assert redis_key("egress", "blog/conn") == "{egress:blog}:rl:conn"
    assert redis_key("p", "blog/dest/api.example.com:443") == "{p:blog}:rl:dest/api.example.com:443"
    keys = [
        "blog/conn",
        "blog/dest/api.example.com:443",
        "blog/dest/[2001:db8::1]:443",
        "blog/x{y}",
    ]
    assert len({key_slot(redis_key("egress", key).encode()) for key in keys}) == 1
    assert key_slot(redis_key("egress", "blog/conn").encode()) == key_slot(b"egress:blog")


@pytest.mark.parametrize(
    "key", ["conn", "blog/", "/conn", "Blog/conn", "-blog/conn", "b" * 64 + "/conn", "a b/c"]
)
def test_redis_key_refuses_a_key_without_an_app(key: str) -> None:
    with pytest.raises(ValueError, match="app name"):
        redis_key("egress", key)


def test_redis_refuses_a_prefix_that_breaks_the_hash_tag(redis_server: RedisServer) -> None:
    for prefix in ["", "a{b", "a}b", "a b"]:
        with pytest.raises(ValueError, match="prefix"):
            RedisBuckets(_redis_client(redis_server), prefix=prefix)


def test_redis_bucket_key_has_a_ttl_and_disappears(redis_backend: Backend) -> None:
    server = redis_backend.server
    assert server is not None

    async def main() -> None:
        async with redis_backend.opened(prefix="t") as buckets:
            inspect = _redis_client(server)
            try:
                await buckets.take("blog/slow", Rate(SLOW, 50))
                ttl_ms = await inspect.pttl("{t:blog}:rl:slow")
                assert 1_000_000 - 1_000 <= ttl_ms <= 1_000_001  # one token owed: 1000 s

                await buckets.take("blog/fast", Rate(20, 1))  # full again in 50 ms
                assert 0 < await inspect.pttl("{t:blog}:rl:fast") <= 51
                await eventually(
                    lambda: not _command(server, "EXISTS", "{t:blog}:rl:fast"),
                    "the key of a bucket that is full again expires",
                    timeout=2.0,
                )
                assert (await buckets.take("blog/fast", Rate(20, 1))).allowed
                assert sorted(await inspect.keys("*")) == [b"{t:blog}:rl:fast", b"{t:blog}:rl:slow"]
            finally:
                await inspect.aclose()

    run("asyncio", main())


# --- Redis: batching --------------------------------------------------------------------------
def test_redis_batches_concurrent_takes(redis_backend: Backend, loop_kind: str) -> None:
    rate = Rate(SLOW, 50)

    async def main() -> None:
        async with redis_backend.opened() as buckets:
            assert (await buckets.take("warm/conn", rate)).allowed  # loads the script
            redis_backend.round_trips.clear()
            results = await asyncio.gather(*(buckets.take("blog/conn", rate) for _ in range(500)))
            assert sum(result.allowed for result in results) == 50
            trips = len(redis_backend.round_trips)
            assert 1 <= trips <= 5, redis_backend.round_trips
            assert all(kind is None for _, kind in redis_backend.round_trips)

            redis_backend.round_trips.clear()  # a lone take: one round trip of its own
            assert not (await buckets.take("blog/conn", rate)).allowed
            assert len(redis_backend.round_trips) == 1

    run(loop_kind, main())


def test_redis_bounds_the_batch(redis_backend: Backend) -> None:
    """2,000 takes on 2,000 keys go out in pipelines of at most ``max_batch`` calls."""
    rate = Rate(SLOW, 1)

    async def main() -> None:
        async with redis_backend.opened(max_batch=100) as buckets:
            results = await asyncio.gather(*(buckets.take(f"blog/k{n}", rate) for n in range(2000)))
            assert all(result.allowed for result in results)
            assert len(redis_backend.round_trips) >= 20  # at least 2,000 / 100 pipelines
            assert len(redis_backend.round_trips) <= 25  # plus the script load

    run("asyncio", main())


def test_redis_cancelled_callers_do_not_break_a_batch(redis_backend: Backend) -> None:
    """Callers cancelled while their batch is in flight leave their tokens to the others in
    it; callers cancelled while queued are not counted at all."""
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 5)
    queued_rate = Rate(SLOW, 8)

    async def main() -> None:
        async with redis_backend.opened() as buckets:
            assert (await buckets.take("warm/conn", rate)).allowed
            _freeze(server)
            try:
                in_flight = [asyncio.create_task(buckets.take("blog/a", rate)) for _ in range(10)]
                await asyncio.sleep(0.2)  # sent, held by the frozen server
                queued = [
                    asyncio.create_task(buckets.take("blog/b", queued_rate)) for _ in range(10)
                ]
                await asyncio.sleep(0.05)
                for task in in_flight[:3] + queued[:4]:
                    task.cancel()
            finally:
                _thaw(server)
            a = [(await task).allowed for task in in_flight[3:]]
            b = [(await task).allowed for task in queued[4:]]
            assert a == [True] * 5 + [False] * 2
            assert b == [True] * 6
            assert await _takes(buckets, "blog/b", queued_rate, 3) == [True, True, False]
            for task in in_flight[:3] + queued[:4]:
                assert task.cancelled()

    run("asyncio", main())


# --- Redis: trouble ---------------------------------------------------------------------------
def test_redis_script_flush_mid_run(redis_backend: Backend) -> None:
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 3)

    async def main() -> None:
        async with redis_backend.opened() as buckets:
            assert await _takes(buckets, "blog/conn", rate, 2) == [True, True]
            await asyncio.to_thread(_command, server, "SCRIPT", "FLUSH")
            assert await _takes(buckets, "blog/conn", rate, 2) == [True, False]  # state kept
            results = await asyncio.gather(*(buckets.take(f"a{n}/conn", rate) for n in range(50)))
            assert all(result.allowed for result in results)
            assert all(kind is None for _, kind in redis_backend.round_trips)

    run("asyncio", main())


def test_redis_restart_mid_run(redis_backend: Backend) -> None:
    """A restarted Redis (empty, no scripts, every pooled connection dead) just works again."""
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 3)

    async def main() -> None:
        async with redis_backend.opened() as buckets:
            assert await _takes(buckets, "blog/conn", rate, 4) == [True] * 3 + [False]
            await asyncio.to_thread(server.restart)
            assert await _takes(buckets, "blog/conn", rate, 4) == [True] * 3 + [False]

    run("asyncio", main())


def test_redis_stopped_fails_fast_as_connection(redis_backend: Backend) -> None:
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 3)

    async def main() -> None:
        async with redis_backend.opened(timeout=FAILURE_DEADLINE) as buckets:
            assert (await buckets.take("blog/conn", rate)).allowed
            await asyncio.to_thread(server.stop)
            started = time.monotonic()
            results = await asyncio.gather(
                *(buckets.take("blog/conn", rate) for _ in range(20)), return_exceptions=True
            )
            assert time.monotonic() - started < FAILURE_DEADLINE + NOT_A_HANG
            for result in results:
                assert isinstance(result, LimiterUnavailable), result
                assert result.kind == "connection"
                assert f"127.0.0.1:{server.port}" in str(result)
                assert "is it running" in str(result)
            assert redis_backend.round_trips[-1][1] == "connection"

            await asyncio.to_thread(server.start)
            assert (await buckets.take("blog/conn", rate)).allowed  # back (an empty Redis)

    run("asyncio", main())


def test_redis_blackholed_times_out_within_the_deadline() -> None:
    """A server that accepts connections and never answers: a timeout, not a hang."""
    with _silent_listener() as port:

        async def main() -> None:
            client = redis.asyncio.Redis(
                host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 1), socket_timeout=30
            )
            trips: list[RoundTrip] = []
            buckets = RedisBuckets(
                client, timeout=FAILURE_DEADLINE, observe=lambda s, k: trips.append((s, k))
            )
            try:
                started = time.monotonic()
                results = await asyncio.gather(
                    *(buckets.take("blog/conn", Rate(1, 1)) for _ in range(10)),
                    return_exceptions=True,
                )
                elapsed = time.monotonic() - started
                assert FAILURE_DEADLINE * 0.9 <= elapsed < FAILURE_DEADLINE + NOT_A_HANG
                for result in results:
                    assert isinstance(result, LimiterUnavailable), result
                    assert result.kind == "timeout"
                    assert f"127.0.0.1:{port}" in str(result)
                    assert "200 ms" in str(result)
                assert trips and all(kind == "timeout" for _, kind in trips)
            finally:
                await buckets.aclose()

        run("asyncio", main())


def test_redis_frozen_times_out_then_answers_correctly(
    redis_backend: Backend, loop_kind: str
) -> None:
    """After a timed-out round trip, the next reply belongs to the next command: a stale reply
    to the timed-out take (an allowed) would show as an allowed here, where a deny is due."""
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 1)

    async def main() -> None:
        async with redis_backend.opened(timeout=FAILURE_DEADLINE) as buckets:
            inspect = _redis_client(server)
            try:
                await inspect.set("probe", b"value")
                assert (await buckets.take("blog/spent", rate)).allowed
                _freeze(server)
                try:
                    started = time.monotonic()
                    results = await asyncio.gather(
                        *(buckets.take(f"blog/fresh{n}", rate) for n in range(30)),
                        return_exceptions=True,
                    )
                    assert time.monotonic() - started < 2 * FAILURE_DEADLINE + NOT_A_HANG
                finally:
                    _thaw(server)
                for result in results:
                    assert isinstance(result, LimiterUnavailable), result
                    assert result.kind == "timeout"
                assert "timeout" in {kind for _, kind in redis_backend.round_trips}

                for _ in range(3):  # the pool's connections answer their own commands
                    assert not (await buckets.take("blog/spent", rate)).allowed
                assert await inspect.get("probe") == b"value"
            finally:
                await inspect.aclose()

    run(loop_kind, main())


def test_redis_queued_takes_fail_when_a_round_trip_is_stuck(redis_backend: Backend) -> None:
    """Takes queued behind a stuck round trip fail at about twice the deadline, not later."""
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 1)

    async def main() -> None:
        async with redis_backend.opened(timeout=FAILURE_DEADLINE) as buckets:
            assert (await buckets.take("warm/conn", rate)).allowed
            _freeze(server)
            try:
                first = asyncio.create_task(buckets.take("blog/a", rate))
                await asyncio.sleep(FAILURE_DEADLINE / 2)
                started = time.monotonic()
                later = await asyncio.gather(
                    *(buckets.take(f"blog/b{n}", rate) for n in range(20)),
                    return_exceptions=True,
                )
                waited = time.monotonic() - started
            finally:
                _thaw(server)
            with pytest.raises(LimiterUnavailable):
                await first
            assert waited < 2 * FAILURE_DEADLINE + NOT_A_HANG
            assert all(isinstance(r, LimiterUnavailable) and r.kind == "timeout" for r in later), (
                later
            )

    run("asyncio", main())


def test_redis_aclose_fails_waiting_callers(redis_backend: Backend) -> None:
    server = redis_backend.server
    assert server is not None
    rate = Rate(SLOW, 5)

    async def main() -> None:
        buckets = redis_backend.make()
        assert (await buckets.take("warm/conn", rate)).allowed
        _freeze(server)
        try:
            waiting = [asyncio.create_task(buckets.take(f"blog/k{n}", rate)) for n in range(5)]
            await asyncio.sleep(0.1)
            await buckets.aclose()
        finally:
            _thaw(server)
        for task in waiting:
            with pytest.raises(LimiterUnavailable, match="closing"):
                await task
        with pytest.raises(LimiterUnavailable, match="closing"):
            await buckets.take("blog/conn", rate)
        await buckets.aclose()  # again: nothing happens

    run("asyncio", main())


# --- helpers ----------------------------------------------------------------------------------
def _command(server: RedisServer, *args: str | int) -> Any:
    with server.client() as client:
        return client.execute_command(*args)


def _freeze(server: RedisServer) -> None:
    """Stop the server process (SIGSTOP): connections stay open, nothing is answered, until
    :func:`_thaw`. (``CLIENT PAUSE ALL`` would hold the ``CLIENT UNPAUSE`` too.)"""
    os.kill(server.pid, signal.SIGSTOP)


def _thaw(server: RedisServer) -> None:
    os.kill(server.pid, signal.SIGCONT)


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A loopback port whose kernel completes connections that nobody ever reads from."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]
