"""Keep CPython's full garbage collections off the event loop's back while rules load.

A rule set of 10,000 apps is a few hundred thousand objects tracked by the cycle collector (a
loaded config and its compiled snapshot). A full collection scans all of them and holds the GIL
throughout: 0.3 to 0.9 s with the loop frozen, whether it runs in the thread that parses the
file or on the loop that compiles. Loading a new set allocates enough to trigger several. So:

* while a rule set loads and compiles, full (generation 2) collections are deferred (young
  generations still run, so connection garbage keeps being collected);
* the objects alive once the proxy has started, and once a snapshot is installed, are frozen
  (``gc.freeze``): later collections do not scan them again. Frozen objects are still freed by
  reference counting when their last reference goes (an old snapshot, a closed connection).

What a freeze must not catch is a reference cycle that becomes garbage later: the collector
never looks at it again. The rules objects form none, and the config reader breaks its own
(``rules.reading``). Client transports of plain asyncio do form one (a transport refers to
itself through a bound method), so on plain asyncio only the start-up freeze happens (no
client is connected yet); uvloop's transports form none, and there every install freezes.
"""

from __future__ import annotations

import asyncio
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


def freeze_long_lived(*, clients_connected: bool) -> None:
    """Move every object alive now out of the collector's way (see the module docstring).

    With ``clients_connected``, only where the event loop's transports form no reference
    cycles (uvloop): a frozen asyncio transport would never be collected once closed.
    """
    if clients_connected and _loop_transports_form_cycles():
        return
    gc.freeze()


def _loop_transports_form_cycles() -> bool:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return True
    return not type(loop).__module__.startswith("uvloop")
