"""The rule model: immutable values that the parser builds and the matcher compiles.

Values are validated on construction, so a ``Rule`` that exists is a rule that can be matched;
the text syntax lives in :mod:`rules.parse`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Final

__all__ = [
    "MAX_PORT",
    "MIN_PORT",
    "HostExact",
    "HostWildcard",
    "Network",
    "PortSet",
    "Rule",
    "Target",
]

MIN_PORT: Final = 1
MAX_PORT: Final = 65535


@dataclass(frozen=True, slots=True)
class PortSet:
    """A set of TCP ports as sorted, non-overlapping, non-adjacent inclusive ranges.

    One canonical form per set, so two rules allowing the same ports compare and print equal.
    Build with :meth:`from_ranges`, which sorts and merges; the constructor only checks.
    """

    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        previous_hi = MIN_PORT - 2
        for lo, hi in self.ranges:
            if not MIN_PORT <= lo <= hi <= MAX_PORT:
                raise ValueError(f"port range {lo}-{hi} is outside {MIN_PORT}-{MAX_PORT}")
            if lo <= previous_hi + 1:
                raise ValueError("port ranges must be sorted, non-overlapping and merged")
            previous_hi = hi

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> PortSet:
        """Sort and merge overlapping or adjacent ranges (``80,81`` becomes ``80-81``)."""
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return cls(tuple(merged))

    @classmethod
    def all(cls) -> PortSet:
        """Every port, ``*``."""
        return cls(((MIN_PORT, MAX_PORT),))

    @classmethod
    def union(cls, sets: Iterable[PortSet]) -> PortSet:
        """The ports in any of ``sets``."""
        return cls.from_ranges(r for s in sets for r in s.ranges)

    def contains(self, port: int) -> bool:
        """Whether ``port`` is in the set: a binary search, O(log ranges)."""
        index = bisect_right(self.ranges, (port, MAX_PORT + 1)) - 1
        return index >= 0 and self.ranges[index][1] >= port

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.contains(port)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        if self.ranges == ((MIN_PORT, MAX_PORT),):
            return "*"
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


@dataclass(frozen=True, slots=True)
class HostExact:
    """Exactly one canonical host name (lowercase A-labels, no trailing dot)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class HostWildcard:
    """Every name strictly below ``suffix``, at any depth; not ``suffix`` itself."""

    suffix: str

    def __str__(self) -> str:
        return f"*.{self.suffix}"


@dataclass(frozen=True, slots=True)
class Network:
    """An IP network; IPv4-mapped IPv6 networks are stored as IPv4 (see ``normalise_network``)."""

    network: IPv4Network | IPv6Network

    def __str__(self) -> str:
        net = self.network
        single = net.prefixlen == net.max_prefixlen
        if net.version == 4:
            return str(net.network_address) if single else str(net)
        base = f"[{net.network_address}]"
        return base if single else f"{base}/{net.prefixlen}"


Target = HostExact | HostWildcard | Network


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow rule: ``target`` on ``ports``. ``text`` is the canonical spelling for display."""

    text: str
    target: Target
    ports: PortSet

    @classmethod
    def of(cls, target: Target, ports: PortSet) -> Rule:
        """Build a rule whose ``text`` is derived from its parts (what the parser does)."""
        return cls(f"{target}:{ports}", target, ports)

    def __str__(self) -> str:
        return self.text
