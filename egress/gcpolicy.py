"""Keep CPython's full garbage collections off the event loop's back while rules load.

A rule set of 10,000 apps is about 400,000 objects tracked by the cycle collector (a loaded
config and its compiled snapshot, about 20 each per app). A full collection scans all of them
and holds the GIL throughout: 0.5 to 0.9 s with the loop frozen, whether it runs in the thread
that parses the file or on the loop that compiles. Loading a new set allocates enough to
trigger several. So:

* while a rule set loads and compiles, full (generation 2) collections are deferred (young
  generations still run, so connection garbage keeps being collected);
* once a snapshot is installed, the objects alive then are frozen (``gc.freeze``): later
  collections do not scan them again. Frozen objects are still freed by reference counting
  when the last reference goes (an old snapshot, a closed connection); only reference cycles
  among them would outlive their use, and the rules objects form none.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Final

__all__ = ["freeze_long_lived", "full_collections_deferred"]

_NEVER: Final = 2**31 - 1


class _Deferral:
    """How many blocks defer full collections now, and the thresholds to restore after."""

    depth = 0
    saved: tuple[int, int, int] = (700, 10, 10)


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
    """No generation-2 collection starts inside the block (re-entrant, process-wide)."""
    if _Deferral.depth == 0:
        _Deferral.saved = gc.get_threshold()
        gc.set_threshold(_Deferral.saved[0], _Deferral.saved[1], _NEVER)
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if _Deferral.depth == 0:
            gc.set_threshold(*_Deferral.saved)


def freeze_long_lived() -> None:
    """Move every object alive now out of the collector's way (see the module docstring)."""
    gc.freeze()
