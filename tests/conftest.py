from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests import privilege
from tests.netns import NetworkNamespace, network_namespace
from tests.support import LOOP_KINDS


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """End-to-end tests run on both plain asyncio and uvloop."""
    return str(request.param)


@pytest.fixture
def netns() -> Iterator[NetworkNamespace]:
    """This test's thread runs in a fresh network namespace whose only interface is loopback."""
    with network_namespace() as namespace:
        yield namespace


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``netns`` implies ``root``: creating a namespace needs it, so ``-m root`` selects it."""
    for item in items:
        if item.get_closest_marker("netns") and not item.get_closest_marker("root"):
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture: a root test fails (never skips) when not run as root."""
    privilege.fail_unless_root(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Root-only helpers check the running test's markers (module fixtures included)."""
    with privilege.running(item):
        return (yield)
