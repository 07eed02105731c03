"""The limiter's failure handling: the circuit breaker and the ``on_redis_error`` policies.

The shared backend here is a stand-in that answers from memory or raises
``LimiterUnavailable`` on command, because these tests are about what the limiter does with
each answer, on an injected clock; the real Redis backend failing for real (stopped, paused,
blackholed) is in tests/test_ratelimit_contract.py and tests/integration/test_ratelimit_redis.py.
"""

from __future__ import annotations

import asyncio

import pytest

from ratelimit.base import LimiterUnavailable, LimitResult
from ratelimit.breaker import BreakerState, CircuitBreaker
from ratelimit.failover import FailurePolicy, Limiter, Mode
from ratelimit.gcra import Rate
from ratelimit.memory import MemoryBuckets


class Clock:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds

    def us(self) -> int:
        return round(self.seconds * 1_000_000)


class SwitchableBackend:
    """Memory buckets that can be made to fail, counting the calls that reached it."""

    name = "switchable"

    def __init__(self, clock: Clock) -> None:
        self.buckets = MemoryBuckets(clock.us)
        self.down = False
        self.calls = 0

    async def take(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        self.calls += 1
        if self.down:
            raise LimiterUnavailable(
                "redis at 127.0.0.1:1 refused the connection", kind="connection"
            )
        return self.buckets.take_now(key, rate, cost)

    async def aclose(self) -> None:
        return None


def limiter_for(
    policy: FailurePolicy, *, share: float = 1.0
) -> tuple[Limiter, SwitchableBackend, Clock, list[Mode]]:
    clock = Clock()
    shared = SwitchableBackend(clock)
    modes: list[Mode] = []
    limiter = Limiter(
        shared,
        MemoryBuckets(clock.us),
        policy=policy,
        local_share=share,
        breaker=CircuitBreaker(failures_to_open=3, open_for=0.5, max_open_for=4.0, clock=clock),
        on_mode=modes.append,
    )
    return limiter, shared, clock, modes


TEN_A_SECOND = Rate(10, 5)


def take(limiter: Limiter, key: str = "blog/conn", rate: Rate = TEN_A_SECOND) -> LimitResult:
    return asyncio.run(limiter.take(key, rate))


def test_breaker_opens_after_failures_in_a_row_and_probes_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=3, open_for=0.5, max_open_for=2.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    breaker.succeeded()  # a success in between resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(0.5)
    clock.seconds = 0.5
    assert breaker.allow()  # the probe
    assert str(breaker.state) == "half_open"
    assert not breaker.allow()  # only one probe at a time
    breaker.failed()  # the probe failed: open twice as long
    clock.seconds = 1.4
    assert not breaker.allow()
    clock.seconds = 1.5
    assert breaker.allow()
    breaker.failed()
    clock.seconds = 1.5 + 2.0  # capped at max_open_for
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_a_failed_call_falls_back_at_once_and_the_breaker_stops_the_waiting() -> None:
    limiter, shared, clock, modes = limiter_for(FailurePolicy.LOCAL)
    assert take(limiter).allowed and limiter.mode is Mode.REDIS
    shared.down = True
    for _ in range(3):
        assert take(limiter).allowed  # each failed call is answered locally
    assert shared.calls == 4
    assert modes == [Mode.LOCAL]
    assert "refused the connection" in str(limiter.last_error)
    for _ in range(2):
        take(limiter)
    assert shared.calls == 4  # open: Redis is not waited on
    clock.seconds = 0.5
    shared.down = False
    assert take(limiter).allowed  # the probe reaches Redis and closes the circuit
    assert shared.calls == 5
    assert modes == [Mode.LOCAL, Mode.REDIS] and limiter.mode is Mode.REDIS


def test_local_fallback_enforces_the_configured_share_of_the_rate() -> None:
    limiter, shared, _, _ = limiter_for(FailurePolicy.LOCAL, share=0.5)
    shared.down = True
    results = [take(limiter, rate=Rate(10, 8)) for _ in range(10)]
    assert sum(r.allowed for r in results) == 4  # half the burst of 8
    assert not results[-1].allowed
    assert results[-1].retry_after_seconds == pytest.approx(0.2)  # half the rate: 5/s


def test_deny_fallback_refuses_with_the_breakers_wait() -> None:
    limiter, shared, _, modes = limiter_for(FailurePolicy.DENY)
    shared.down = True
    result = take(limiter)
    assert not result.allowed and result.unavailable
    assert result.retry_after_seconds >= 1.0
    assert modes == [Mode.DENY]


def test_allow_fallback_lets_everything_through() -> None:
    limiter, shared, _, modes = limiter_for(FailurePolicy.ALLOW)
    shared.down = True
    assert all(take(limiter, rate=Rate(1, 1)).allowed for _ in range(20))
    assert modes == [Mode.ALLOW]


def test_policy_and_share_change_live() -> None:
    limiter, shared, _, modes = limiter_for(FailurePolicy.ALLOW)
    shared.down = True
    assert take(limiter).allowed
    limiter.policy = FailurePolicy.DENY
    assert take(limiter).unavailable
    limiter.policy = FailurePolicy.LOCAL
    limiter.local_share = 0.25
    assert sum(take(limiter, "other/conn", Rate(10, 8)).allowed for _ in range(5)) == 2
    assert modes == [Mode.ALLOW, Mode.DENY, Mode.LOCAL]


def test_the_memory_backend_has_nothing_to_fail() -> None:
    clock = Clock()
    limiter = Limiter(None, MemoryBuckets(clock.us))
    assert limiter.mode is Mode.MEMORY and not limiter.shared
    assert [take(limiter, rate=Rate(1, 2)).allowed for _ in range(3)] == [True, True, False]


def test_local_share_outside_zero_to_one_is_refused() -> None:
    clock = Clock()
    for share in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="local_share"):
            Limiter(None, MemoryBuckets(clock.us), local_share=share)


class SwitchableTunnels:
    """Tunnel counts across nodes that can be made to fail (ratelimit.tunnels on real Redis is
    tested in tests/test_tunnel_counts.py)."""

    ttl = 15.0

    def __init__(self) -> None:
        self.down = False
        self.others = 0  # tunnels the other nodes hold
        self.written: list[int] = []

    async def admit(self, app: str, mine: int, cap: int) -> tuple[bool, int]:
        if self.down:
            raise LimiterUnavailable(
                "redis at 127.0.0.1:1 refused the connection", kind="connection"
            )
        if self.others + mine > cap:
            return False, self.others + mine - 1
        self.written.append(mine)
        return True, self.others + mine

    async def set(self, app: str, mine: int) -> int:
        if self.down:
            raise LimiterUnavailable("down", kind="connection")
        self.written.append(mine)
        return self.others + mine


@pytest.mark.parametrize(
    ("policy", "admitted_while_down"),
    [(FailurePolicy.LOCAL, [True, True, False]), (FailurePolicy.ALLOW, [True, True, True])],
)
def test_tunnels_across_nodes_fall_back_like_the_buckets(
    policy: FailurePolicy, admitted_while_down: list[bool]
) -> None:
    clock = Clock()
    tunnels = SwitchableTunnels()
    limiter = Limiter(
        SwitchableBackend(clock),
        MemoryBuckets(clock.us),
        policy=policy,
        local_share=0.5,
        tunnels=tunnels,  # type: ignore[arg-type]
    )
    tunnels.others = 3
    result, total = asyncio.run(limiter.admit_tunnel("blog", 1, 4))
    assert result.allowed and total == 4
    result, total = asyncio.run(limiter.admit_tunnel("blog", 2, 4))
    assert not result.allowed and not result.unavailable and total == 4
    tunnels.down = True  # this node on its own: half of the cap of 4
    results = [asyncio.run(limiter.admit_tunnel("blog", mine, 4))[0] for mine in (1, 2, 3)]
    assert [r.allowed for r in results] == admitted_while_down
    assert limiter.mode is Mode(policy.value)


def test_tunnels_across_nodes_deny_while_down() -> None:
    clock = Clock()
    tunnels = SwitchableTunnels()
    tunnels.down = True
    limiter = Limiter(
        SwitchableBackend(clock),
        MemoryBuckets(clock.us),
        policy=FailurePolicy.DENY,
        tunnels=tunnels,  # type: ignore[arg-type]
    )
    result, _ = asyncio.run(limiter.admit_tunnel("blog", 1, 4))
    assert not result.allowed and result.unavailable
    asyncio.run(limiter.set_tunnels("blog", 0))  # a failed write is left for the next one
    assert tunnels.written == []


def test_a_cancelled_probe_does_not_hold_the_circuit_half_open() -> None:
    """The probe's caller may be cancelled (a revoke cancels the connection's task): the
    circuit must be tried again soon, not stay half-open with every check on the fallback."""
    limiter, shared, clock, _ = limiter_for(FailurePolicy.DENY)
    shared.down = True
    for _ in range(3):
        take(limiter)
    clock.seconds = 0.5  # the breaker lets a probe go now
    shared.down = False

    async def cancelled_probe() -> None:
        started = asyncio.Event()
        original = shared.take

        async def hang(key: str, rate: Rate, cost: int = 1) -> LimitResult:
            started.set()
            await asyncio.sleep(10)
            return await original(key, rate, cost)

        shared.take = hang  # type: ignore[method-assign]
        task = asyncio.create_task(limiter.take("blog/conn", TEN_A_SECOND))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        shared.take = original  # type: ignore[method-assign]

    asyncio.run(cancelled_probe())
    clock.seconds = 1.0  # open again for the shortest time, then probed anew
    assert take(limiter).allowed and limiter.mode is Mode.REDIS


def test_a_lost_probe_times_out() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures_to_open=1, open_for=0.5, probe_timeout=1.0, clock=clock)
    breaker.failed()
    clock.seconds = 0.5
    assert breaker.allow()  # a probe that never reports back
    assert not breaker.allow()
    clock.seconds = 1.5
    assert breaker.allow()  # another one


def test_one_failed_round_trip_is_one_failure_however_many_checks_it_carried() -> None:
    limiter, shared, _, modes = limiter_for(FailurePolicy.DENY)
    failure = LimiterUnavailable("reset by peer", kind="connection", incident=7)

    async def fail(key: str, rate: Rate, cost: int = 1) -> LimitResult:
        raise failure

    shared.take = fail  # type: ignore[method-assign]
    for _ in range(5):
        take(limiter)  # five checks of one batch: the breaker counts one
    assert str(limiter._breaker.state) == "closed"
    assert modes == [Mode.DENY]
