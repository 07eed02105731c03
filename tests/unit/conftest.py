from __future__ import annotations

import pytest

from tests.unit.feeding import SPLITTERS, Splitter


@pytest.fixture(params=list(SPLITTERS))
def feeding(request: pytest.FixtureRequest) -> Splitter:
    return SPLITTERS[request.param]
