"""Synthetic addresses: how a host name reaches the proxy without a DNS lookup in the sandbox.

``getaddrinfo("api.example.com", 443)`` answers with an address from a range no real
destination can have, remembered for that name; ``connect()`` to it sends the *name* to the
proxy, which resolves it, applies the app's hostname rules and dials. No DNS packet leaves the
app and the rules see the name the app used.

The ranges are ``240.0.0.0/4`` (IPv4 "reserved for future use", RFC 1112 section 4: never
assigned, never routed, not multicast, so programs treat it as an ordinary unicast address)
and ``100::/64`` (IPv6 discard-only, RFC 6666). Both are special-purpose to the proxy, so an
address that escapes this process (printed, or handed to a child that runs without the shim)
is refused there rather than reaching anyone. ``255.255.255.255`` is never handed out.

The table lives in this process (a forked child inherits it) and only grows: a name keeps its
address for the process's lifetime, so any cache an app keeps stays right. It holds at most
:data:`MAX_NAMES` names.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Final

__all__ = ["MAX_NAMES", "SYNTHETIC_V4", "SYNTHETIC_V6", "NameTable", "normalize"]

SYNTHETIC_V4: Final = ipaddress.IPv4Network("240.0.0.0/4")
SYNTHETIC_V6: Final = ipaddress.IPv6Network("100::/64")
MAX_NAMES: Final = 1 << 20
_V4_BASE: Final = int(SYNTHETIC_V4.network_address)
_V6_BASE: Final = int(SYNTHETIC_V6.network_address)


def normalize(name: str) -> str:
    """The form a name is remembered (and sent) in: lower case, no trailing dot."""
    return name.rstrip(".").lower()


class NameTable:
    """Name to synthetic address and back. Thread-safe; lookups of known names take no lock."""

    __slots__ = ("_index", "_lock", "_names", "by_text")

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        # synthetic address text -> name, for connect()'s fast path (no address parsing)
        self.by_text: dict[str, str] = {}
        self._names: list[str] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def number(self, name: str) -> int:
        """The name's index (1-based), allocating one. :class:`OverflowError` when full."""
        key = normalize(name)
        found = self._index.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._index.get(key)
            if found is None:
                if len(self._names) >= MAX_NAMES:
                    raise OverflowError(f"more than {MAX_NAMES} host names in one process")
                self._names.append(key)
                found = self._index[key] = len(self._names)
            return found

    def v4(self, name: str) -> str:
        number = self.number(name)
        text = str(ipaddress.IPv4Address(_V4_BASE + number))
        self.by_text[text] = self._names[number - 1]
        return text

    def v6(self, name: str) -> str:
        number = self.number(name)
        text = str(ipaddress.IPv6Address(_V6_BASE + number))
        self.by_text[text] = self._names[number - 1]
        return text

    def name_for(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The name a synthetic address stands for; None for any other address."""
        if address.version == 4:
            if address not in SYNTHETIC_V4:
                return None
            number = int(address) - _V4_BASE
        else:
            mapped = address.ipv4_mapped
            if mapped is not None:
                return self.name_for(mapped)
            if address not in SYNTHETIC_V6:
                return None
            number = int(address) - _V6_BASE
        if 0 < number <= len(self._names):
            return self._names[number - 1]
        return None
