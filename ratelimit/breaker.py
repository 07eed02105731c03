"""A circuit breaker: stop waiting on a backend that keeps failing, and probe it now and then.

Pure state and an injected clock. ``failures_to_open`` failures in a row open the circuit; while
open, :meth:`allow` says no at once (the caller applies its fallback without waiting on a
deadline). After ``open_for`` seconds one probe is let through (half-open): success closes the
circuit, failure opens it again for twice as long, up to ``max_open_for``. A probe that ends
without an answer (:meth:`abandoned`, or no word for ``probe_timeout``) lets another one go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_failures",
        "_open_for",
        "_probe_started",
        "_reopen_at",
        "failures_to_open",
        "max_open_for",
        "min_open_for",
        "probe_timeout",
        "state",
    )

    def __init__(
        self,
        *,
        failures_to_open: int = 3,
        open_for: float = 0.5,
        max_open_for: float = 8.0,
        probe_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.min_open_for = open_for
        self.max_open_for = max_open_for
        self._clock = clock
        self._failures = 0
        self._open_for = open_for
        self._reopen_at = 0.0
        self._probe_started = 0.0
        # A probe that never reported back (a bug, or a caller cancelled in a way nobody saw)
        # must not hold the circuit half-open for ever: after this long another may go.
        self.probe_timeout = probe_timeout
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """May a call go to the backend now? While half-open only the one probe may."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if state is BreakerState.OPEN and now >= self._reopen_at:
            self.state = BreakerState.HALF_OPEN
            self._probe_started = now
            return True
        if state is BreakerState.HALF_OPEN and now - self._probe_started >= self.probe_timeout:
            self._probe_started = now  # the last probe was lost: another one
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until the backend will next be tried (0 when it is tried now)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self._reopen_at - self._clock())

    def succeeded(self) -> None:
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._open_for = self.min_open_for

    def abandoned(self) -> None:
        """A call that :meth:`allow` let through ended without an answer either way (it was
        cancelled): if it was the probe, the circuit is open again and soon tried anew."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN
            self._reopen_at = self._clock() + self.min_open_for

    def failed(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._open_for = min(self._open_for * 2, self.max_open_for)
            self._open()
            return
        if self.state is BreakerState.OPEN:
            return  # a call that started before the circuit opened
        self._failures += 1
        if self._failures >= self.failures_to_open:
            self._open()

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self._reopen_at = self._clock() + self._open_for
