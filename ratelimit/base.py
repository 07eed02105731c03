"""What the rest of the proxy sees of a limiter: bucket keys, results, and the two interfaces.

A *bucket backend* (:class:`Buckets`) takes tokens from named buckets and may fail (Redis gone):
it raises :class:`LimiterUnavailable`. A *limiter* (:class:`ratelimit.failover.Limiter`) wraps
one and never raises: it applies the configured failure policy and says which mode it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ratelimit.gcra import Rate

__all__ = ["ALLOWED", "Buckets", "LimitResult", "LimiterUnavailable"]


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Whether one unit of work may go ahead now, and if not, how long until it could.
    ``retry_after_seconds`` is ``inf`` for a request that can never fit (a cost above the
    burst)."""

    allowed: bool
    retry_after_seconds: float = 0.0
    unavailable: bool = False  # denied because the shared backend is away (policy "deny")


ALLOWED = LimitResult(True)


class LimiterUnavailable(Exception):  # noqa: N818  (reads as what happened)
    """The bucket backend could not answer (in time); the message says why, for operators."""

    def __init__(self, message: str, *, kind: str = "error", incident: int = 0) -> None:
        super().__init__(message)
        self.kind = kind  # a bounded label: "timeout", "connection", "script", "error"
        self.incident = incident  # the failed round trip, shared by the checks it carried


class Buckets(Protocol):
    """Named token buckets. ``key`` is a bucket name chosen by the caller (the Redis backend
    adds its prefix); the same key with a changed ``rate`` keeps its state."""

    name: str

    async def take(self, key: str, rate: Rate, cost: int = 1) -> LimitResult:
        """Take ``cost`` tokens now, or none. Raises :class:`LimiterUnavailable`."""
        ...

    async def ping(self) -> None:
        """Raise :class:`LimiterUnavailable` if the backend cannot answer now."""
        ...

    async def aclose(self) -> None: ...
