"""Wait for a condition instead of sleeping: poll it until it holds or a deadline passes, then
fail saying what did not happen (and, given ``detail``, what was seen instead).

One poll with two doors: :func:`wait_until` blocks (sync tests waiting on a child process, a
kernel table or another thread); :func:`eventually` awaits, so the event loop keeps running
while it waits. Both return the condition's first truthy value, so a condition can hand back
what it found (a log line, the records).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
DEFAULT_EVERY = 0.01


class _Poll(Generic[T]):
    def __init__(
        self,
        condition: Callable[[], T],
        what: str,
        timeout: float,
        ignoring: tuple[type[BaseException], ...],
        detail: Callable[[], object] | None,
    ) -> None:
        self.condition = condition
        self.what = what
        self.timeout = timeout
        self.ignoring = ignoring
        self.detail = detail
        self.deadline = time.monotonic() + timeout
        self.last_error: BaseException | None = None

    def attempt(self) -> T | None:
        try:
            value = self.condition()
        except self.ignoring as error:  # e.g. an endpoint that is not up yet
            self.last_error = error
            return None
        return value if value else None

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def failure(self) -> AssertionError:
        message = f"not within {self.timeout:g} s: {self.what}"
        if self.detail is not None:
            message += f"\nlast seen: {self.detail()}"
        if self.last_error is not None:
            message += f"\nlast error: {self.last_error!r}"
        return AssertionError(message)


def wait_until(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    every: float = DEFAULT_EVERY,
    ignoring: tuple[type[BaseException], ...] = (),
    detail: Callable[[], object] | None = None,
) -> T:
    """Block until ``condition()`` is truthy and return that value, or fail naming ``what``.

    Exceptions in ``ignoring`` count as "not yet"; any other one ends the wait at once (so a
    condition can fail fast, e.g. when the process it watches has exited).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise AssertionError(f"wait_until() would block the running event loop: {what}")
    poll = _Poll(condition, what, timeout, ignoring, detail)
    while True:
        value = poll.attempt()
        if value is not None:
            return value
        if poll.expired():
            raise poll.failure()
        time.sleep(every)


async def eventually(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    every: float = DEFAULT_EVERY,
    ignoring: tuple[type[BaseException], ...] = (),
    detail: Callable[[], object] | None = None,
) -> T:
    """:func:`wait_until` for a coroutine: the loop runs on between polls."""
    poll = _Poll(condition, what, timeout, ignoring, detail)
    while True:
        value = poll.attempt()
        if value is not None:
            return value
        if poll.expired():
            raise poll.failure()
        await asyncio.sleep(every)
