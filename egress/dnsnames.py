"""What the sandbox DNS listener told each app: address -> names, until the answer expires.

In transparent mode a connection carries only an address. A hostname rule can match it when the
proxy knows the address belongs to the name, and the resolver's cache says so (see
``first_step``'s ``names_for``). That cache is shared and bounded: one app resolving many names
could push out the entry another app's connection is about to rely on. So the listener also
remembers, *per app*, the names it answered with each address, for as long as the app may use the
answer (its TTL plus a grace for a program that connects a little after its cache expired). An
app can only ever evict its own entries, except when the whole table is full, and then the app
holding the most loses its oldest. Nothing here is a claim by the app: every entry is an answer
the proxy resolved and checked itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from rules.special import effective_address

__all__ = ["AnsweredNames"]

IPAddress = IPv4Address | IPv6Address

GRACE_SECONDS: Final = 5.0


class AnsweredNames:
    """Per app: an LRU of addresses, each with its names and when each stops counting.

    Bounds: ``per_app`` addresses for one app, ``total`` for all apps, ``names_per_address``
    names per address (the most recent), so the per-connection work of transparent mode
    (matching the names of one address) never grows with what a tenant resolves.
    """

    __slots__ = ("_apps", "_clock", "_grace", "_names_per_address", "_per_app", "_total", "count")

    def __init__(
        self,
        *,
        per_app: int = 4096,
        total: int = 65536,
        names_per_address: int = 16,
        grace: float = GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(per_app, total, names_per_address) < 1:
            raise ValueError("AnsweredNames bounds must be at least 1")
        self._apps: dict[str, OrderedDict[IPAddress, dict[str, float]]] = {}
        self._per_app = per_app
        self._total = total
        self._names_per_address = names_per_address
        self._grace = grace
        self._clock = clock
        self.count = 0  # addresses held, over every app

    def remember(self, app: str, name: str, addresses: Iterable[IPAddress], ttl: float) -> None:
        """``name`` was answered to ``app`` with ``addresses``, valid ``ttl`` seconds."""
        addresses = list(addresses)
        if not addresses:
            return
        now = self._clock()
        until = now + max(0.0, ttl) + self._grace
        table = self._apps.get(app)
        if table is None:
            table = self._apps[app] = OrderedDict()
        for raw in addresses:
            address = effective_address(raw)
            names = table.get(address)
            if names is None:
                self._make_room(app, table, now)
                names = table[address] = {}
                self.count += 1
            else:
                table.move_to_end(address)
            names.pop(name, None)
            names[name] = until  # newest last
            if len(names) > self._names_per_address:
                del names[next(iter(names))]

    def names_for(self, app: str, address: IPAddress) -> tuple[str, ...]:
        """The names ``app`` was given for ``address`` that still count."""
        table = self._apps.get(app)
        if table is None:
            return ()
        names = table.get(effective_address(address))
        if not names:
            return ()
        now = self._clock()
        return tuple(name for name, until in names.items() if until > now)

    def sweep(self) -> int:
        """Drop every address whose names all expired; how many went."""
        now = self._clock()
        dropped = 0
        for app, table in list(self._apps.items()):
            for address in [a for a, names in table.items() if max(names.values()) <= now]:
                del table[address]
                dropped += 1
            if not table:
                del self._apps[app]
        self.count -= dropped
        return dropped

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the apps not in ``keep`` (after a rules change removed them)."""
        kept = set(keep)
        for app in [a for a in self._apps if a not in kept]:
            self.count -= len(self._apps.pop(app))

    def _make_room(
        self, app: str, table: OrderedDict[IPAddress, dict[str, float]], now: float
    ) -> None:
        while table and max(next(iter(table.values())).values()) <= now:
            table.popitem(last=False)  # the least recently answered, already expired
            self.count -= 1
        if len(table) >= self._per_app:
            table.popitem(last=False)
            self.count -= 1
        if self.count >= self._total:
            largest = max(self._apps.values(), key=len)
            if largest:
                largest.popitem(last=False)
                self.count -= 1
