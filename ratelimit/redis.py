"""Token buckets in Redis, shared by every node: the GCRA of :mod:`ratelimit.gcra` in one Lua
script, on the Redis server's clock, with concurrent checks batched into pipelines.

Why a script on the server's clock: nodes' clocks disagree, Redis's is one clock for all of
them, and a read-modify-write in Lua is atomic without a transaction. A bucket is one string
key holding its TAT in microseconds, with a TTL that ends when the bucket would be full again,
so an idle bucket costs nothing and disappears.

Why batching: one call per check costs about 150 µs of client CPU, pipelined calls a sixth of
that (DESIGN.md, "What a Redis check costs"). Checks made while a round trip is in flight wait
for the next one, which carries them all in one pipeline (``transaction=False``); checks with the
same key, rate and cost in one batch become one script call with a ``count`` (the first
``granted`` callers, in arrival order, are allowed). A lone check goes out at once.

One script serves ``take`` and ``take_up_to``: it takes *up to* ``count`` units of ``cost``
tokens each, as ``count`` sequential calls of :func:`ratelimit.gcra.take` at one instant would
(once one is denied, the rest are too: a denial leaves the TAT alone). With ``count = 1`` it is
``take``; with ``cost = 1`` it is ``take_up_to``.

Failures never hang a caller: each batch has ``timeout`` seconds for all its round trips, and a
check that waited longer than that in the queue (behind a stuck round trip) fails too, so a
caller waits at most about twice the deadline. Any failure becomes
:class:`ratelimit.base.LimiterUnavailable` with a bounded ``kind`` and a message that names
the server. A timed-out round trip cannot hand its reply to the next command: redis-py drops a
connection whose read is cancelled. It may still have taken its tokens on the server (a
deadline says nothing about whether the command ran).

Scripts are called by SHA (EVALSHA). A server that does not know the script (``SCRIPT FLUSH``,
a restart, a failover to a replica that never saw it) gets the failed calls again as EVAL, which
runs the script and caches it on the node that owns the key (which is the node a Cluster
``SCRIPT LOAD`` would have to reach), in one more round trip and within the same deadline.

Give the backend a client whose retries fit inside the deadline (for example one retry, no
backoff): redis-py's default retries a refused connection with backoff for longer than tens of
milliseconds, and a Redis that is down is then reported as ``timeout`` instead of
``connection``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import redis.asyncio
import redis.exceptions

from ratelimit.base import ALLOWED, LimiterUnavailable, LimitResult
from ratelimit.gcra import MICROSECONDS, Rate

__all__ = ["GCRA_LUA", "GCRA_SHA", "RedisBuckets", "describe_client", "redis_key"]

_log = logging.getLogger(__name__)

GCRA_LUA: Final = """\
-- GCRA on the server's clock (ratelimit/gcra.py does the same arithmetic in Python).
-- KEYS[1]: the bucket's TAT, integer microseconds as a string (absent = a full bucket).
-- ARGV: interval (us per token), capacity (us of room), cost (tokens per unit), count (units).
-- Takes up to `count` units of `cost` tokens; returns {granted units, wait in us}: wait is 0
-- when all were granted, -1 when one unit can never fit (cost above the burst).
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local step = cost * interval
if step > capacity then return {0, -1} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local base = tonumber(redis.call('GET', KEYS[1]) or '')
if base == nil or base < now then base = now end
local room = math.floor((now + capacity - base) / step)
if room < 0 then room = 0 end
if room > 0 and base + room * step > now + capacity then room = room - 1 end
local granted = math.min(count, room)
local tat = base + granted * step
if granted > 0 then
  local ttl_ms = math.ceil((tat - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', string.format('%d', ttl_ms))
end
if granted == count then return {granted, 0} end
return {granted, tat + step - capacity - now}
"""

GCRA_SHA: Final = hashlib.sha1(GCRA_LUA.encode(), usedforsecurity=False).hexdigest()
_LUA_BYTES: Final = GCRA_LUA.encode()
_SHA_BYTES: Final = GCRA_SHA.encode()

_APP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PREFIX = re.compile(r"[^{}\s]{1,64}")
_ERROR_TEXT_MAX = 300
# What a Redis call may raise when Redis (not our code) failed; RuntimeError only for uvloop's
# closed transport (closed_transport), others are re-raised as bugs.
_FAILURES: Final = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    RuntimeError,
)
_INCIDENTS: Final = itertools.count(1)  # numbers failed round trips (LimiterUnavailable.incident)

Client: TypeAlias = "redis.asyncio.Redis | redis.asyncio.RedisCluster"
Observe: TypeAlias = Callable[[float, str | None], None]
_CallKey: TypeAlias = tuple[str, int, int, int]
"""One script call: (Redis key, interval µs, capacity µs, cost)."""


def redis_key(prefix: str, key: str) -> str:
    """The Redis key of bucket ``key`` (``"<app>/<rest>"``): ``{<prefix>:<app>}:rl:<rest>``.
    The braces are a Cluster hash tag, so all of one app's buckets live in one slot."""
    app, slash, rest = key.partition("/")
    if not slash or not rest or _APP_NAME.fullmatch(app) is None:
        raise ValueError(
            f"a bucket key is '<app>/<name>' with an app name like 'blog' "
            f"(a-z, 0-9, '_', '-'), not {key[:100]!r}"
        )
    return f"{{{prefix}:{app}}}:rl:{rest}"


def describe_client(client: Client) -> str:
    """Where ``client`` points, for messages (never a password)."""
    if isinstance(client, redis.asyncio.RedisCluster):
        nodes = sorted(node.name for node in client.get_nodes())  # empty before the first call
        nodes = nodes or sorted(client.nodes_manager.startup_nodes)
        return f"cluster {','.join(nodes[:6])}{',...' if len(nodes) > 6 else ''}"
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if service is not None:
        return f"sentinel service {service!r}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


@dataclass(slots=True)
class _Waiter:
    call: _CallKey
    future: asyncio.Future[tuple[int, float]]  # (units granted, seconds until the next)
    queued_at: float  # loop time
    units: int = 1  # > 1: a lease, taking up to this many


class RedisBuckets:
    """A :class:`ratelimit.base.Buckets` over a ``redis.asyncio`` client (single, Sentinel or
    Cluster; ``decode_responses=False``), which it owns and closes.

    ``observe(seconds, error_kind_or_None)`` is called once per Redis round trip. At most
    ``max_batch`` script calls go in one pipeline, and at most ``max_in_flight`` pipelines are
    in flight at once: one measured as cheap per check as two or four (within the noise, from 1
    to 256 concurrent callers) and keeps the batches largest.
    """

    name = "redis"

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = "egress",
        timeout: float = 0.05,
        observe: Observe | None = None,
        max_batch: int = 512,
        max_in_flight: int = 1,
    ) -> None:
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(
                f"a key prefix is 1-64 characters without braces or spaces: {prefix!r}"
            )
        if not timeout > 0:
            raise ValueError(f"the Redis deadline must be > 0 seconds, not {timeout!r}")
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._client = client
        self._prefix = prefix
        self.timeout = timeout
        self._observe = observe
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self.where = describe_client(client)
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    async def take(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        if cost < 1:
            raise ValueError(f"a take costs at least 1 token, not {cost!r}")
        granted, wait = await self._queued(key, rate, cost, 1)
        return ALLOWED if granted else LimitResult(False, wait)

    async def take_up_to(self, key: str, rate: Rate, count: int) -> tuple[int, float]:
        """Take as many of ``count`` single tokens as fit now: (granted, seconds until the
        first one not granted could be had; 0 when all were)."""
        return await self._queued(key, rate, 1, count)

    async def _queued(self, key: str, rate: Rate, cost: int, units: int) -> tuple[int, float]:
        if self._closed:
            raise LimiterUnavailable(self._closing_message(), kind="error")
        call = (
            redis_key(self._prefix, key),
            rate.interval(MICROSECONDS),
            rate.capacity(MICROSECONDS),
            cost,
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, float]] = loop.create_future()
        self._queue.append(_Waiter(call, future, loop.time(), units))
        if not self._workers:
            self._start_workers()
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # settled as we were cancelled: nobody else will look
            raise

    async def ping(self) -> None:
        """Is Redis there? (the limiter asks every second, so an outage shows without traffic).
        Raises :class:`LimiterUnavailable` like a check."""
        async with one_call(f"rate-limit buckets: Redis {self.where}", self.timeout, self._observe):
            await self._client.ping()

    async def aclose(self) -> None:
        """Fail queued checks (``LimiterUnavailable``), stop the batching tasks, close the
        client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._fail([*self._queue], self._closing_message(), "error")
        self._queue.clear()
        await self._client.aclose()

    # --- batching ---------------------------------------------------------------------------
    def _start_workers(self) -> None:
        self._workers = [
            asyncio.get_running_loop().create_task(self._work(), name=f"redis-buckets-{index}")
            for index in range(self._max_in_flight)
        ]

    async def _work(self) -> None:
        """One round trip at a time: wait for queued checks, send them, settle them."""
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._next_batch()
            if not batch:
                continue
            try:
                await self._exchange(batch)
            except Exception:  # a bug: never leave callers waiting, never stop batching
                _log.exception("rate-limit batch to Redis %s failed unexpectedly", self.where)
                self._fail(
                    [w for waiters in batch.values() for w in waiters],
                    f"rate-limit buckets on Redis {self.where}: internal error (see the log)",
                    "error",
                )

    def _next_batch(self) -> dict[_CallKey, list[_Waiter]]:
        """Queued checks grouped into script calls, oldest first, at most ``max_batch`` calls.
        Cancelled checks are dropped; checks that waited past the deadline fail."""
        queue = self._queue
        calls: dict[_CallKey, list[_Waiter]] = {}
        stale: list[_Waiter] = []
        too_old = asyncio.get_running_loop().time() - self.timeout
        while queue:
            waiter = queue[0]
            if waiter.future.done():
                queue.popleft()
                continue
            if waiter.queued_at < too_old:
                stale.append(queue.popleft())
                continue
            same = calls.get(waiter.call)
            if same is None:
                if len(calls) >= self._max_batch:
                    break
                calls[waiter.call] = same = []
            same.append(queue.popleft())
        if stale:
            self._fail(
                stale,
                f"rate-limit buckets: a check waited over the {self._deadline_ms()} deadline "
                f"for a busy or slow Redis {self.where}",
                "timeout",
            )
        return calls

    async def _exchange(self, batch: dict[_CallKey, list[_Waiter]]) -> None:
        """Send one batch (and, for calls the server did not know the script for, once more
        as EVAL), all within the deadline, then settle every waiter."""
        calls = list(batch.items())
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._round_trip(calls, load=False)
                unknown = [
                    index
                    for index, reply in enumerate(replies)
                    if isinstance(reply, redis.exceptions.NoScriptError)
                ]
                if unknown:
                    started = time.perf_counter()
                    again = await self._round_trip([calls[i] for i in unknown], load=True)
                    for index, reply in zip(unknown, again, strict=True):
                        replies[index] = reply
        except asyncio.CancelledError:
            self._fail(_waiters(calls), self._closing_message(), "error")
            raise
        except TimeoutError:
            self._report(started, "timeout")
            self._fail(
                _waiters(calls),
                f"rate-limit buckets: Redis {self.where} did not answer within the "
                f"{self._deadline_ms()} deadline (overloaded, blocked by a slow command, paused, "
                f"or packets are being dropped)",
                "timeout",
            )
            return
        except _FAILURES as error:
            if isinstance(error, RuntimeError) and not closed_transport(error):
                raise  # a bug: the worker logs it and fails the batch
            kind = _kind_of(error)
            self._report(started, kind)
            self._fail(_waiters(calls), self._error_message(error, kind), kind)
            return
        for (_, waiters), reply in zip(calls, replies, strict=True):
            self._settle(waiters, reply)

    async def _round_trip(
        self, calls: Sequence[tuple[_CallKey, list[_Waiter]]], *, load: bool
    ) -> list[Any]:
        """One pipeline of script calls, one per call key, each for as many units as it has
        callers still waiting; per-call errors come back as exception values."""
        pipe = self._client.pipeline(transaction=False)
        command, script = ("EVAL", _LUA_BYTES) if load else ("EVALSHA", _SHA_BYTES)
        for (key, interval, capacity, cost), waiters in calls:
            count = sum(waiter.units for waiter in waiters if not waiter.future.done())
            # execute_command, not evalsha(): a Cluster pipeline refuses evalsha() but routes
            # EVAL/EVALSHA by their key like any keyed command. Arguments go as bytes, which
            # redis-py packs faster; the command name stays a str, which Cluster routing reads.
            pipe.execute_command(
                command,
                script,
                b"1",
                key.encode(),
                b"%d" % interval,
                b"%d" % capacity,
                b"%d" % cost,
                b"%d" % count,
            )
        started = time.perf_counter()
        replies = await _counted(pipe, calls)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        kind = None  # an unknown script is handled, not a failure
        if failed is not None and not isinstance(failed, redis.exceptions.NoScriptError):
            kind = _kind_of(failed)
        self._report(started, kind)
        return replies

    # --- settling ---------------------------------------------------------------------------
    def _settle(self, waiters: list[_Waiter], reply: Any) -> None:
        if isinstance(reply, Exception):
            kind = _kind_of(reply)
            self._fail(waiters, self._error_message(reply, kind), kind)
            return
        try:
            granted, wait = int(reply[0]), int(reply[1])
        except (TypeError, ValueError, IndexError, KeyError):
            self._fail(
                waiters,
                f"rate-limit buckets: Redis {self.where} sent an unexpected reply to the GCRA "
                f"script: {reply!r:.100}",
                "error",
            )
            return
        wait_s = float("inf") if wait < 0 else wait / MICROSECONDS
        left = granted
        for waiter in waiters:
            if waiter.future.done():  # a caller cancelled meanwhile
                continue
            got = min(waiter.units, left)
            left -= got
            waiter.future.set_result((got, 0.0 if got == waiter.units else wait_s))

    def _fail(self, waiters: Sequence[_Waiter], message: str, kind: str) -> None:
        """Fail ``waiters`` with one incident number: one failure for the breaker."""
        incident = next(_INCIDENTS)
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(
                    LimiterUnavailable(message, kind=kind, incident=incident)
                )

    def _report(self, started: float, kind: str | None) -> None:
        if self._observe is not None:
            self._observe(time.perf_counter() - started, kind)

    # --- messages ---------------------------------------------------------------------------
    def _deadline_ms(self) -> str:
        return f"{self.timeout * 1000:g} ms"

    def _closing_message(self) -> str:
        return f"rate-limit buckets on Redis {self.where} are closing"

    def _error_message(self, error: BaseException, kind: str) -> str:
        text = str(error).rstrip(".")[:_ERROR_TEXT_MAX] or type(error).__name__
        if isinstance(error, RuntimeError):  # uvloop's words for it name a transport object
            text = "the connection was reset by Redis"
        if kind == "connection":
            return (
                f"rate-limit buckets: cannot reach Redis {self.where}: {text}; is it running and "
                f"reachable from this host? (deadline {self._deadline_ms()})"
            )
        if kind == "timeout":
            return f"rate-limit buckets: Redis {self.where} timed out: {text}"
        if kind == "script":
            return f"rate-limit buckets: the GCRA script failed on Redis {self.where}: {text}"
        return f"rate-limit buckets: Redis {self.where} refused the check: {text}"


async def _counted(pipe: Any, calls: Sequence[object]) -> list[Any]:
    """Run ``pipe`` and check it answered once per call (a short reply list would
    misattribute answers)."""
    replies: list[Any] = list(await pipe.execute(raise_on_error=False))
    if len(replies) != len(calls):
        raise redis.exceptions.ResponseError(
            f"a pipeline of {len(calls)} script calls got {len(replies)} replies"
        )
    return replies


def _waiters(calls: Sequence[tuple[_CallKey, list[_Waiter]]]) -> list[_Waiter]:
    return [waiter for _, waiters in calls for waiter in waiters]


@contextlib.asynccontextmanager
async def one_call(what: str, timeout: float, observe: Observe | None) -> AsyncIterator[None]:
    """One Redis call outside the batches (a PING, a tunnel count): bounded by ``timeout``,
    reported to ``observe``, and every failure a :class:`LimiterUnavailable` that says
    ``what`` failed (e.g. "tunnel counts: Redis 10.0.0.5:6379") and how."""
    started = time.perf_counter()
    kind: str | None = None
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        kind = "timeout"
        raise LimiterUnavailable(
            f"{what} did not answer within {timeout * 1000:g} ms", kind=kind
        ) from None
    except _FAILURES as error:
        if isinstance(error, RuntimeError) and not closed_transport(error):
            raise  # a bug, not Redis
        kind = _kind_of(error)
        text = str(error).rstrip(".")[:_ERROR_TEXT_MAX] or type(error).__name__
        if isinstance(error, RuntimeError):
            text = "the connection was reset by Redis"
        raise LimiterUnavailable(f"{what}: {text}", kind=kind) from None
    finally:
        if observe is not None:
            observe(time.perf_counter() - started, kind)


def closed_transport(error: RuntimeError) -> bool:
    """uvloop's answer to a write on a connection the server has reset ("unable to perform
    operation on <TCPTransport closed=True ...>; the handler is closed"), which redis-py passes
    on as it is: a lost connection, not a bug."""
    text = str(error)
    return "closed=True" in text or "handler is closed" in text


def _kind_of(error: BaseException) -> str:
    """The bounded label of a failure: timeout, connection, script or error."""
    if isinstance(error, TimeoutError | redis.exceptions.TimeoutError):
        return "timeout"
    if isinstance(error, RuntimeError):  # a closed transport (see closed_transport)
        return "connection"
    if isinstance(error, redis.exceptions.ConnectionError | OSError):
        return "connection"
    if isinstance(error, redis.exceptions.RedisClusterException):  # not a RedisError
        return "connection" if "connect" in str(error).lower() else "error"
    if isinstance(error, redis.exceptions.NoScriptError) or (
        isinstance(error, redis.exceptions.ResponseError) and "script" in str(error).lower()
    ):
        return "script"
    return "error"
