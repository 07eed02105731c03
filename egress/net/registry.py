"""Every live client connection: admitted at accept and again once its app is known, released
exactly once, and drained on shutdown.

Two admission points, because two different things are limited:

* at accept, before anything is known about the client, ``proxy.max_connections`` caps what the
  whole process holds (and a draining proxy refuses everything);
* after the kernel has said which app is calling, ``proxy.max_handshakes_per_app`` caps how many
  of one app's connections may sit in their handshake, so one tenant holding connections open
  until ``handshake_timeout`` cannot use up everyone's ``max_connections``.

And once the rules allow a request, :meth:`ConnectionRegistry.take_tunnel_slot` holds one of the
app's ``max_concurrent`` tunnel slots on this node from then (dialing included) until the
connection is released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from egress.metrics import ProxyMetrics
from egress.outcomes import Outcome

__all__ = ["ConnectionRegistry", "Tracked"]


class Tracked(Protocol):
    """What the registry needs of a connection to drain it."""

    def shut_down(self) -> None:
        """Stop a connection that is not relaying yet (reply ``shutting_down`` and close)."""

    def cut(self, reason: str) -> None:
        """Abort the connection now, whatever its phase."""


class ConnectionRegistry:
    """Admission, release and drain for every client connection of one proxy."""

    __slots__ = (
        "_all_released",
        "_connections",
        "_handshaking",
        "_metrics",
        "_slot_holders",
        "_slots",
        "draining",
        "max_connections",
        "max_handshakes_per_app",
        "on_slot_released",
    )

    def __init__(
        self, metrics: ProxyMetrics, *, max_connections: int, max_handshakes_per_app: int
    ) -> None:
        self._metrics = metrics
        self.max_connections = max_connections
        self.max_handshakes_per_app = max_handshakes_per_app
        self.draining = False
        # connection -> the app whose handshake slot it holds ("" once it holds none)
        self._connections: dict[Tracked, str] = {}
        self._handshaking: dict[str, int] = {}
        self._slot_holders: dict[Tracked, str] = {}  # connection -> app whose tunnel slot it holds
        self._slots: dict[str, int] = {}
        # told the app whose tunnel slot was given back (tunnels counted across nodes)
        self.on_slot_released: Callable[[str], None] | None = None
        self._all_released = asyncio.Event()
        self._all_released.set()

    def __len__(self) -> int:
        return len(self._connections)

    def live(self) -> list[Tracked]:
        """The connections open now (for drain, and for tests and debugging)."""
        return list(self._connections)

    def handshakes(self, app: str) -> int:
        """How many of ``app``'s connections are in their handshake now."""
        return self._handshaking.get(app, 0)

    def tunnel_slots(self, app: str) -> int:
        """How many of ``app``'s tunnel slots are held now."""
        return self._slots.get(app, 0)

    def take_tunnel_slot(self, connection: Tracked, app: str, cap: int) -> int | None:
        """Hold one of ``app``'s ``cap`` tunnel slots until ``connection`` is released.
        ``None`` when it got one; otherwise how many are held (the caller refuses)."""
        if connection in self._slot_holders:
            return None
        held = self._slots.get(app, 0)
        if held >= cap:
            return held
        self._slots[app] = held + 1
        self._slot_holders[connection] = app
        return None

    def give_back_tunnel_slot(self, connection: Tracked) -> None:
        """The connection's tunnel slot, if it holds one, is free again."""
        app = self._slot_holders.pop(connection, None)
        if app is None:
            return
        held = self._slots[app] - 1
        if held:
            self._slots[app] = held
        else:
            del self._slots[app]
        if self.on_slot_released is not None:
            self.on_slot_released(app)

    def slots_held(self) -> dict[str, int]:
        """Tunnel slots held now, by app (a copy)."""
        return dict(self._slots)

    def accept(self, connection: Tracked) -> Outcome | None:
        """Track a connection the kernel just handed us; the outcome to refuse it with, if any."""
        if self.draining:
            return Outcome.SHUTTING_DOWN
        if len(self._connections) >= self.max_connections:
            self._metrics.connections_refused_over_limit.inc()
            return Outcome.CONNECTION_LIMIT
        self._connections[connection] = ""
        self._metrics.open_connections.inc()
        self._all_released.clear()
        return None

    def admit(self, connection: Tracked, app: str) -> Outcome | None:
        """The connection is ``app``'s: take one of the app's handshake slots, if one is free."""
        held = self._handshaking.get(app, 0)
        if held >= self.max_handshakes_per_app:
            return Outcome.HANDSHAKE_LIMIT
        self._handshaking[app] = held + 1
        self._connections[connection] = app
        return None

    def handshake_done(self, connection: Tracked) -> None:
        """The request is complete: give the handshake slot back."""
        app = self._connections.get(connection)
        if app:
            self._give_back(app)
            self._connections[connection] = ""

    def release(self, connection: Tracked) -> None:
        """The connection is gone. Safe to call for a connection that was never accepted, and
        only the first call for an accepted one counts."""
        app = self._connections.pop(connection, None)
        if app is None:
            return
        if app:
            self._give_back(app)
        self.give_back_tunnel_slot(connection)
        self._metrics.open_connections.dec()
        if not self._connections:
            self._all_released.set()

    def _give_back(self, app: str) -> None:
        held = self._handshaking[app] - 1
        if held:
            self._handshaking[app] = held
        else:
            del self._handshaking[app]

    async def drain(self, timeout: float) -> None:
        """Refuse new connections, stop those not relaying yet, let tunnels finish for up to
        ``timeout`` seconds, then cut what is left."""
        self.draining = True
        for connection in list(self._connections):
            connection.shut_down()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._all_released.wait()
        for connection in list(self._connections):
            connection.cut("drain_timeout")
        # Give the transports one turn of the loop to report connection_lost.
        await asyncio.sleep(0)
