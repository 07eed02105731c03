from __future__ import annotations

import os

import pytest

from tests.support import LOOP_KINDS


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """End-to-end tests run on both plain asyncio and uvloop."""
    return str(request.param)


@pytest.fixture
def root() -> None:
    """Tests that need root fail loudly without it: CI runs as root and must run them."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs the suite as root); run it with sudo")
