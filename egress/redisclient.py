"""One redis-py asyncio client for any ``[redis].url`` (:mod:`egress.redisurl` has the forms).

Every client gets the same treatment whatever the deployment: replies as bytes, ``timeout``
seconds for a reply, ``connect_timeout`` for a connection, and one quick retry of a command
whose connection failed (the dropped connection is replaced, which is what moves a client to a
new master). What follows a failover:

* Sentinel: the client asks the sentinels where the master is (``SENTINEL
  GET-MASTER-ADDR-BY-NAME``) for every new connection, and at most twice a second while it is
  used (every :data:`MASTER_CHECK_INTERVAL_S`). redis-py alone would not look again while its
  connections live: after a forced ``SENTINEL FAILOVER`` the old master keeps accepting writes
  until the sentinel demotes it (about 8 s later), and every write to it in between is lost.
  When the address changes, every connection to the old master is dropped, and the retry of
  the command that was using one reconnects to the new master. While no sentinel names a
  master, calls fail (``ConnectionError``), which callers treat as Redis trouble.
* Cluster: ``MOVED``/``ASK`` redirections and a lost node make redis-py reload the slot map from
  the nodes it knows (the startup nodes first) and retry.

Nothing here connects: the first command does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, ClusterPubSub, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

from egress.redisurl import RedisKind, RedisTarget, parse_redis_url

__all__ = [
    "ClusterClient",
    "ClusterUnavailableError",
    "RedisClient",
    "SentinelMasterClient",
    "make_client",
]

RedisClient = redis.asyncio.Redis | RedisCluster
"""What :func:`make_client` returns; both have the same command methods."""

_BACKOFF_BASE_S: Final = 0.02
_BACKOFF_CAP_S: Final = 0.2
MASTER_CHECK_INTERVAL_S: Final = 0.5
"""How often a Sentinel client in use asks the sentinels whether the master moved."""


class _WatchfulSentinelPool(SentinelConnectionPool):
    """A Sentinel pool that asks where the master is, at most twice a second, while it is used.

    The question runs in a task the pool owns (one at a time, cancelled by :meth:`aclose`);
    the command that started it waits for the answer for up to a quarter of its deadline
    (a sentinel on the LAN answers well within it), so a slow sentinel costs that command a
    little time, never its deadline. An unreachable sentinel keeps the master the pool knows."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        timeout = self.connection_kwargs.get("socket_timeout") or 1.0
        self._check_wait = float(timeout) / 4
        self._next_check = 0.0
        self._check: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        now = time.monotonic()
        if self.master_address is not None and now >= self._next_check and self._check is None:
            self._next_check = now + MASTER_CHECK_INTERVAL_S
            self._check = asyncio.create_task(self._check_master(), name="sentinel-check")
            # Bounded, and a cancelled caller leaves the check running (wait() cancels nothing).
            await asyncio.wait([self._check], timeout=self._check_wait)
        return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]

    async def get_master_address(self) -> tuple[str, int]:
        """Where the sentinels say the master is; on a change, idle connections are dropped
        (as redis-py does). Asks ``SENTINEL GET-MASTER-ADDR-BY-NAME`` (what the Sentinel client
        guidelines prescribe), not redis-py's ``SENTINEL MASTERS``, which names the old master
        until a failover has finished reconfiguring replicas, after clients could move."""
        address = await self._ask_sentinels()
        if address != self.master_address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)
        return address

    async def _ask_sentinels(self) -> tuple[str, int]:
        sentinels = self.sentinel_manager.sentinels
        errors: list[str] = []
        for index, sentinel in enumerate(sentinels):
            try:
                reply = await sentinel.sentinel_get_master_addr_by_name(self.service_name)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                errors.append(f"{_address_of(sentinel)}: {error}")
                continue
            if reply:
                sentinels[0], sentinels[index] = sentinel, sentinels[0]  # ask this one first
                host, port = reply
                return (host.decode() if isinstance(host, bytes) else str(host), int(port))
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise MasterNotFoundError(f"no sentinel names a master for {self.service_name!r}{detail}")

    async def _check_master(self) -> None:
        try:
            known = self.master_address
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                current = await self._ask_sentinels()
                if known is not None and current != known and self.master_address == known:
                    self.master_address = current
                    # In use too: a command on one fails over to its retry, on the new master.
                    await self.disconnect(inuse_connections=True)
        finally:
            self._check = None

    async def aclose(self) -> None:
        check, self._check = self._check, None
        if check is not None:
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        await super().aclose()


class SentinelMasterClient(redis.asyncio.Redis):
    """A client of the master that sentinels name. Closing it also closes the connections to
    the sentinels (redis-py leaves those to the ``Sentinel`` object, which nothing else owns)."""

    sentinels: Sentinel | None = None  # not `sentinel`: that is the SENTINEL command

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            sentinels, self.sentinels = self.sentinels, None
            if sentinels is not None:
                await sentinels.aclose()


class ClusterUnavailableError(redis.exceptions.ConnectionError):
    """No node the client knows could give it the cluster's slot map, or a key's slot has no
    node. redis-py raises ``RedisClusterException`` for these, which is not a ``RedisError``:
    this one is a ``ConnectionError``, so callers treat it as the outage it is."""


class ClusterClient(RedisCluster):
    """A ``RedisCluster`` whose outages are ``ConnectionError`` s (see
    :class:`ClusterUnavailableError`) and whose pub/sub works before any other command ran
    (redis-py's picks the channel's node from a slot map it has not loaded yet: ``KeyError``)."""

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        try:
            await super().initialize(*args, **kwargs)
        except redis.exceptions.RedisClusterException as error:
            raise ClusterUnavailableError(f"Redis Cluster unavailable: {error}") from error
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except redis.exceptions.SlotNotCoveredError as error:
            raise ClusterUnavailableError(f"Redis Cluster unavailable: {error}") from error

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises: not in a cluster
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]

    def pubsub(
        self,
        node: ClusterNode | None = None,
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> ClusterPubSub:
        return _ClusterPubSub(self, node=node, host=host, port=port, **kwargs)


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except redis.exceptions.SlotNotCoveredError as error:
            raise ClusterUnavailableError(f"Redis Cluster unavailable: {error}") from error


class _ClusterPubSub(ClusterPubSub):
    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster.initialize()  # the slot map, to find the channel's node (or a no-op)
        return await super().execute_command(*args, **kwargs)


def make_client(
    url: str | RedisTarget,
    *,
    timeout: float,
    connect_timeout: float | None = None,
    retries: int = 1,
) -> RedisClient:
    """A client for ``url``: ``timeout`` seconds for a reply, ``connect_timeout`` (default:
    ``timeout``) for a connection, ``retries`` retries of a command whose connection failed.
    Raises :class:`egress.redisurl.RedisUrlError` for a URL that is not one of the forms.

    On a Cluster, redis-py retries a failed *pipeline* by closing every connection and
    sleeping 250 ms first: a caller with a deadline of tens of milliseconds (the rate limiter)
    should pass ``retries=0`` there and count on its own next call instead."""
    if not timeout > 0 or (connect_timeout is not None and not connect_timeout > 0):
        raise ValueError(f"Redis timeouts must be > 0 seconds, not {timeout!r}/{connect_timeout!r}")
    target = parse_redis_url(url) if isinstance(url, str) else url
    connect = timeout if connect_timeout is None else connect_timeout
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect,
        "decode_responses": False,
        "username": target.username,
        "password": target.password,
    }
    if target.kind is RedisKind.CLUSTER:
        return ClusterClient(
            startup_nodes=[ClusterNode(node.host, node.port) for node in target.nodes],
            retry=_retry(retries, timeout),
            ssl=target.tls,
            **common,
        )
    common["retry"] = _retry(retries, timeout)
    common["db"] = target.db
    if target.kind is RedisKind.SENTINEL:
        return _sentinel_master(target, common, timeout=timeout, connect_timeout=connect)
    if target.kind is RedisKind.UNIX:
        return redis.asyncio.Redis(unix_socket_path=target.path, **common)
    node = target.nodes[0]
    return redis.asyncio.Redis(host=node.host, port=node.port, ssl=target.tls, **common)


def _address_of(client: redis.asyncio.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _retry(retries: int, timeout: float) -> Retry:
    """Retry a dropped connection (not a timeout: a slow Redis would only be asked twice),
    after a pause that is a small part of the deadline (20 ms for a 2 s one, 5 ms for 50 ms)."""
    return Retry(
        ExponentialBackoff(
            cap=min(_BACKOFF_CAP_S, timeout / 4), base=min(_BACKOFF_BASE_S, timeout / 10)
        ),
        retries=retries,
        supported_errors=(redis.exceptions.ConnectionError,),
    )


def _sentinel_master(
    target: RedisTarget, common: dict[str, Any], *, timeout: float, connect_timeout: float
) -> SentinelMasterClient:
    assert target.service is not None  # RedisTarget checks it for a Sentinel URL
    # The sentinels: no credentials (those are the master's), no retry (each is tried in turn
    # when the master is looked up), the same deadlines.
    sentinel_options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if target.tls:
        sentinel_options["ssl"] = True
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        [(node.host, node.port) for node in target.nodes], sentinel_kwargs=sentinel_options
    )
    options = dict(common)
    if target.tls:
        options["ssl"] = True
    client = sentinels.master_for(
        target.service,
        redis_class=SentinelMasterClient,
        connection_pool_class=_WatchfulSentinelPool,
        **options,
    )
    assert isinstance(client, SentinelMasterClient)
    client.sentinels = sentinels
    return client
