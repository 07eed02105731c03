"""The limiter interface the proxy calls before it dials.

Only the interface lives here for now. A limiter that always says yes would look like limiting
in a dashboard while doing none, so the proxy does not call one until a real backend exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Whether one unit of work may go ahead now, and if not, how long until it could."""

    allowed: bool
    retry_after_seconds: float = 0.0


class Limiter(Protocol):
    """Takes tokens from an app's bucket. Implementations must never raise on backend failure;
    they apply their configured failure policy and report it in metrics instead."""

    async def acquire_connection(self, app: str) -> LimitResult: ...

    async def aclose(self) -> None: ...
