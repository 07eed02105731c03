"""Tunnels open per app across nodes, in Redis, for ``max_concurrent`` with ``concurrency =
"global"``: crash-safe, and correct again by itself after any lost update.

Each node writes only its own *absolute* count for an app, never an increment: one field of the
app's hash ``{<prefix>:<app>}:rl:tunnels``, ``node id -> "<count>:<expiry µs>"``. So:

* a node that dies leaks nothing for long: its field expires ``ttl`` after its last write (the
  server's clock), and the next check drops it;
* a write lost to a Redis outage or a timeout is repaired by the next one, and every node
  rewrites its counts every ``ttl / 3`` (:meth:`RedisTunnelCounts.refresh`);
* one script call admits a tunnel: it sums the other nodes' live counts and, if this node's count
  with the new tunnel still fits under the cap, writes it.

The caller (``egress.limits``) serialises the writes of one app on one node, so a later count is
never overtaken by an earlier one. Writes are one round trip each with the same deadline as the
buckets; failures are :class:`ratelimit.base.LimiterUnavailable`, for the same failure policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeAlias

import redis.asyncio
import redis.exceptions

from ratelimit.redis import describe_client, one_call, redis_key

__all__ = ["ADMIT_LUA", "SET_LUA", "RedisTunnelCounts"]

_PRUNE: Final = """\
local now_clock = redis.call('TIME')
local now = tonumber(now_clock[1]) * 1000000 + tonumber(now_clock[2])
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local node, value = fields[i], fields[i + 1]
  local sep = string.find(value, ':', 1, true)
  local expiry = sep and tonumber(string.sub(value, sep + 1)) or 0
  if expiry < now then
    redis.call('HDEL', KEYS[1], node)
  elseif node ~= ARGV[1] then
    others = others + (tonumber(string.sub(value, 1, sep - 1)) or 0)
  end
end
local ttl = tonumber(ARGV[3])
"""

ADMIT_LUA: Final = (
    "-- KEYS[1]: the app's hash; ARGV: node, this node's count with the new tunnel, ttl us, cap.\n"
    "-- Returns {1, total} when admitted (the count written), {0, total without it} when not.\n"
    + _PRUNE
    + """\
local mine = tonumber(ARGV[2])
if others + mine > tonumber(ARGV[4]) then return {0, others + mine - 1} end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', mine, now + ttl))
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 2)
return {1, others + mine}
"""
)

SET_LUA: Final = (
    "-- KEYS[1]: the app's hash; ARGV: node, this node's count, ttl us. Returns the total.\n"
    + _PRUNE
    + """\
local mine = tonumber(ARGV[2])
if mine > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', mine, now + ttl))
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 2)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return others + mine
"""
)

Client: TypeAlias = "redis.asyncio.Redis | redis.asyncio.RedisCluster"
Observe: TypeAlias = Callable[[float, str | None], None]


class RedisTunnelCounts:
    """This node's tunnel counts per app in Redis, and the admission check against a cap."""

    def __init__(
        self,
        client: Client,
        *,
        node: str,
        prefix: str = "egress",
        timeout: float = 0.05,
        ttl: float = 15.0,
        observe: Observe | None = None,
    ) -> None:
        self._client = client
        self.node = node
        self._prefix = prefix
        self.timeout = timeout
        self.ttl = ttl
        self._observe = observe
        self.where = describe_client(client)
        self._admit = client.register_script(ADMIT_LUA)
        self._set = client.register_script(SET_LUA)

    def key(self, app: str) -> str:
        return redis_key(self._prefix, f"{app}/tunnels")

    async def admit(self, app: str, mine: int, cap: int) -> tuple[bool, int]:
        """May this node hold ``mine`` tunnels of ``app`` (the new one included) under ``cap``
        across all nodes? Returns (admitted, tunnels open everywhere). Written if admitted."""
        reply = await self._call(self._admit, app, mine, cap)
        return bool(int(reply[0])), int(reply[1])

    async def set(self, app: str, mine: int) -> int:
        """Write this node's count for ``app`` (0 removes it); the total across nodes."""
        return int(await self._call(self._set, app, mine))

    async def _call(self, script: Any, app: str, mine: int, cap: int | None = None) -> Any:
        args = [self.node, mine, round(self.ttl * 1_000_000)]
        if cap is not None:
            args.append(cap)
        async with one_call(f"tunnel counts: Redis {self.where}", self.timeout, self._observe):
            reply = await script(keys=[self.key(app)], args=args)
        return reply

    async def aclose(self) -> None:
        return None  # the client belongs to the buckets, which close it
