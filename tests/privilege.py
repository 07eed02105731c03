"""Root is declared, never assumed.

A test that needs root says so with ``@pytest.mark.root`` (``@pytest.mark.netns``, for a test
that creates a network namespace, implies it). CI runs the suite as root, so a marked test
fails, never skips, anywhere else (see ``tests/conftest.py``). And the helpers that need root
(switching uids, namespaces, children under other uids) call :func:`require`, which fails an
unmarked test at once: a test cannot need root without saying so and pass only on CI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

ROOT_MARKERS = ("root", "netns")  # netns implies root

_running: pytest.Item | None = None


@contextlib.contextmanager
def running(item: pytest.Item) -> Iterator[None]:
    """Make ``item`` the running test (setup, call and teardown) for :func:`require`."""
    global _running
    _running = item
    try:
        yield
    finally:
        _running = None


def needs_root(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) is not None for name in ROOT_MARKERS)


def fail_unless_root(item: pytest.Item) -> None:
    """A test marked as needing root fails loudly without it: CI runs as root and must run it."""
    if needs_root(item) and os.geteuid() != 0:
        pytest.fail(
            f"{item.nodeid} needs root (CI runs the suite as root); run it with sudo",
            pytrace=False,
        )


def require(marker: str, what: str) -> None:
    """Fail unless the running test carries ``@pytest.mark.<marker>`` and this is root.

    Outside a test (a child process importing test helpers) only the uid is checked.
    """
    item = _running
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(
            f"{item.nodeid} uses {what}, which needs root: mark the test @pytest.mark.{marker}",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root (CI runs the suite as root); run it with sudo")
