"""The compiled matcher: an immutable index over one app's rules.

Lookup cost depends on the destination, not on how many rules an app has: a name costs one dict
probe per label, an address one dict probe per distinct prefix length in the rules, and the
ports of one target a scan of its few rules (a binary search once a target has many).

Which rule is reported when several match: the most specific target wins (an exact name over
wildcards, a deeper wildcard over a shallower one, a longer prefix over a shorter one); among
rules with the same target, the first in config order whose ports include the port. All rules
allow, so the choice never changes *whether* a connection is allowed, only which rule an
operator is shown, and the most specific one is the best explanation.

A big app is indexed in slices (:class:`RulesIndexBuilder`), so that compiling 100,000 rules
never holds the event loop for long (see :mod:`rules.snapshot`). The index tables map names and
networks to *positions* in the app's rules, plain ints: a dict holding only strings and ints is
not tracked by the garbage collector, so the tables of 100,000 rules cost no collection any
time (a young collection traversing them would stall the loop for tens of ms).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from rules.model import MAX_PORT, HostExact, HostWildcard, PortSet, Rule

__all__ = ["PORT_INDEX_FROM", "CompiledRules", "RulesIndexBuilder"]

PORT_INDEX_FROM: Final = 16
"""Rules sharing one target from which their ports are binary-searched instead of scanned."""


class _PortIndex:
    """The rules of one target, as disjoint port intervals each mapped to the first rule (in
    config order) whose ports cover it: a lookup is one binary search, however many rules."""

    __slots__ = ("_ends", "_rules", "_starts", "ordered")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.ordered = tuple(rules)  # every rule of the target, in config order
        # Sweep the range boundaries; between two boundaries the first active rule decides.
        edges: dict[int, list[tuple[int, int]]] = {}  # start -> (rule order, end) opening there
        for order, rule in enumerate(rules):
            for lo, hi in rule.ports.ranges:
                edges.setdefault(lo, []).append((order, hi))
        points = sorted({p for lo in edges for p in (lo, *(hi + 1 for _, hi in edges[lo]))})
        active: list[tuple[int, int]] = []  # heap of (order, end)
        starts: list[int] = []
        ends: list[int] = []
        chosen: list[Rule] = []
        for index, point in enumerate(points[:-1]):
            for entry in edges.get(point, ()):
                heapq.heappush(active, entry)
            while active and active[0][1] < point:
                heapq.heappop(active)
            if not active:
                continue
            rule = rules[active[0][0]]
            end = points[index + 1] - 1
            if chosen and chosen[-1] is rule and ends[-1] == point - 1:
                ends[-1] = end  # the same rule goes on: one interval
            else:
                starts.append(point)
                ends.append(end)
                chosen.append(rule)
        self._starts = starts
        self._ends = ends
        self._rules = chosen

    def first_for_port(self, port: int) -> Rule | None:
        index = bisect_right(self._starts, port) - 1
        if index >= 0 and port <= self._ends[index]:
            return self._rules[index]
        return None


# What a table holds for a target: ``n >= 0``, the one rule at position n of the rules; ``n < 0``
# (``~g``), the target's rules are group g: their positions in config order, or, from
# PORT_INDEX_FROM rules on, their port index.
_Group = list[int] | _PortIndex

# Longest prefix first: (how far to shift an address right, network >> shift -> position).
_Prefixes = tuple[tuple[int, dict[int, int]], ...]


class RulesIndexBuilder:
    """Indexes rules a slice at a time (:meth:`add`), then :meth:`finish` gives the
    :class:`CompiledRules`; each call costs in proportion to the rules it is given (finishing,
    to the targets that have many rules), so a big app can be indexed between event-loop turns.
    """

    __slots__ = (
        "_count",
        "_exact",
        "_groups",
        "_long",
        "_port_bits",
        "_port_sets",
        "_spent",
        "_v4",
        "_v6",
        "_wildcard",
    )

    def __init__(self) -> None:
        self._count = 0
        self._exact: dict[str, int] = {}
        self._wildcard: dict[str, int] = {}
        self._v4: dict[int, dict[int, int]] = {}  # prefix length -> network >> shift -> position
        self._v6: dict[int, dict[int, int]] = {}
        self._groups: list[list[int]] = []  # targets with several rules
        self._long: list[int] = []  # the groups that have become long enough for a port index
        # The ports of the address rules: their distinct port sets, by their ranges, folded
        # into one flag per port once there are many (so finishing never sorts thousands, and
        # the index keeps 64 KiB of flags rather than thousands of ranges).
        self._port_sets: dict[tuple[tuple[int, int], ...], PortSet] = {}
        self._port_bits: bytearray | None = None
        self._spent = False

    def add(self, rules: Sequence[Rule]) -> None:
        """Index ``rules``, after those already added (config order breaks ties)."""
        if self._spent:
            raise RuntimeError("this builder has finished: its tables belong to the index")
        exact: dict[Any, int] = self._exact  # (str keys; network keys are ints)
        wildcard: dict[Any, int] = self._wildcard
        v4, v6 = self._v4, self._v6
        groups, long, port_sets = self._groups, self._long, self._port_sets
        position = self._count
        self._count += len(rules)
        key: Any
        for rule in rules:
            target = rule.target
            if isinstance(target, HostExact):
                table, key = exact, target.name
            elif isinstance(target, HostWildcard):
                table, key = wildcard, target.suffix
            else:
                net = target.network
                length = net.prefixlen
                if net.version == 4:
                    by_length, bits = v4, 32
                else:
                    by_length, bits = v6, 128
                by_network: dict[Any, int] | None = by_length.get(length)
                if by_network is None:
                    by_network = by_length[length] = {}
                table, key = by_network, int(net.network_address) >> (bits - length)
                ports = rule.ports
                port_sets.setdefault(ports.ranges, ports)
            found = table.get(key)
            if found is None:
                table[key] = position
            elif found >= 0:
                table[key] = ~len(groups)
                groups.append([found, position])
            else:
                group = groups[~found]
                group.append(position)
                if len(group) == PORT_INDEX_FROM:
                    long.append(~found)
            position += 1
        if len(port_sets) > _PORT_SETS_KEPT:
            self._fold_ports()

    def _fold_ports(self) -> None:
        bits = self._port_bits
        if bits is None:
            bits = self._port_bits = bytearray(MAX_PORT + 1)  # index = port
        for ranges in self._port_sets:
            for lo, hi in ranges:
                bits[lo : hi + 1] = _ONES[: hi + 1 - lo]
        self._port_sets.clear()

    def _address_ports(self) -> PortSet | bytes:
        if self._port_bits is None:
            port_sets = self._port_sets
            if len(port_sets) > 1:
                return PortSet.from_ranges(r for rs in port_sets for r in rs)
            return next(iter(port_sets.values()), _NO_PORTS)  # the one set all of them allow
        self._fold_ports()
        return bytes(self._port_bits)

    def finish(self, ordered: tuple[Rule, ...]) -> CompiledRules:
        """The index of every rule added; ``ordered`` is those rules, in the order added (the
        caller has them: the app's tuple). The builder is spent (its tables are the index's)."""
        if len(ordered) != self._count:
            raise ValueError(f"{len(ordered)} rules given, {self._count} indexed")
        self._spent = True
        groups: list[_Group] = list(self._groups)
        for g in self._long:
            groups[g] = _PortIndex([ordered[i] for i in self._groups[g]])
        compiled = CompiledRules.__new__(CompiledRules)
        compiled._rules = ordered
        compiled._groups = tuple(groups)
        compiled._exact = self._exact
        compiled._wildcard = self._wildcard
        compiled._v4 = _prefixes(32, self._v4)
        compiled._v6 = _prefixes(128, self._v6)
        compiled._address_ports = self._address_ports()
        return compiled


_PORT_SETS_KEPT: Final = 1024
_ONES: Final = memoryview(b"\x01" * (MAX_PORT + 1))
_NO_PORTS: Final = PortSet(())


def _prefixes(bits: int, by_length: dict[int, dict[int, int]]) -> _Prefixes:
    """Longest prefix first."""
    return tuple([(bits - n, by_length[n]) for n in sorted(by_length, reverse=True)])


class CompiledRules:
    """One app's rules, indexed for lookup; build with :meth:`compile` (or, a slice at a time,
    :class:`RulesIndexBuilder`), never mutated."""

    __slots__ = ("_address_ports", "_exact", "_groups", "_rules", "_v4", "_v6", "_wildcard")

    _rules: tuple[Rule, ...]
    _groups: tuple[_Group, ...]
    _exact: dict[str, int]
    _wildcard: dict[str, int]
    _v4: _Prefixes
    _v6: _Prefixes
    _address_ports: PortSet | bytes  # the ports, or a flag per port when they are many

    @classmethod
    def compile(cls, rules: Iterable[Rule]) -> CompiledRules:
        """Index ``rules``, keeping their order within each target for tie-breaking."""
        ordered = tuple(rules)
        builder = RulesIndexBuilder()
        builder.add(ordered)
        return builder.finish(ordered)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in config order."""
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def _first_for_port(self, found: int, port: int) -> Rule | None:
        """Of the rules a table gave for one target, the first in config order whose ports
        include ``port``."""
        if found >= 0:
            rule = self._rules[found]
            return rule if rule.ports.contains(port) else None
        group = self._groups[~found]
        if isinstance(group, _PortIndex):
            return group.first_for_port(port)
        rules = self._rules
        for position in group:
            rule = rules[position]
            if rule.ports.contains(port):
                return rule
        return None

    def match_name(self, host: str, port: int) -> Rule | None:
        """The rule allowing the canonical name ``host`` on ``port``, if any.

        ``host`` must come from :func:`rules.addresses.canonical_host`; a name in any other
        spelling simply does not match (fails closed).
        """
        found = self._exact.get(host)
        if found is not None:
            rule = self._first_for_port(found, port)
            if rule is not None:
                return rule
        wildcard = self._wildcard
        if not wildcard:
            return None
        # Parent suffixes, deepest first: a.b.example.com -> b.example.com, example.com, com.
        dot = host.find(".")
        while dot >= 0:
            found = wildcard.get(host[dot + 1 :])
            if found is not None:
                rule = self._first_for_port(found, port)
                if rule is not None:
                    return rule
            dot = host.find(".", dot + 1)
        return None

    def name_rules(self, host: str) -> tuple[Rule, ...]:
        """Every rule whose target matches the canonical name ``host``, whatever its ports: the
        exact name's first, then the wildcards', deepest first (the DNS listener asks this: a
        name is answered when the app may reach it on some port)."""
        found: list[Rule] = []
        exact = self._exact.get(host)
        if exact is not None:
            found += self._target_rules(exact)
        if self._wildcard:
            dot = host.find(".")
            while dot >= 0:
                position = self._wildcard.get(host[dot + 1 :])
                if position is not None:
                    found += self._target_rules(position)
                dot = host.find(".", dot + 1)
        return tuple(dict.fromkeys(found))

    def _target_rules(self, found: int) -> list[Rule]:
        """The rules a table gave for one target, in config order."""
        if found >= 0:
            return [self._rules[found]]
        group = self._groups[~found]
        if isinstance(group, _PortIndex):
            return list(group.ordered)
        return [self._rules[position] for position in group]

    def match_address(self, ip: IPv4Address | IPv6Address, port: int) -> Rule | None:
        """The rule whose network holds ``ip`` and whose ports include ``port``.

        ``ip`` must already be normalised by :func:`rules.special.effective_address` (the policy
        does it once per address, at its boundary); a mapped form simply does not match IPv4
        rules (fails closed).
        """
        value = int(ip)
        for shift, table in self._v4 if ip.version == 4 else self._v6:
            found = table.get(value >> shift)
            if found is not None:
                rule = self._first_for_port(found, port)
                if rule is not None:
                    return rule
        return None

    def has_address_rules_for_port(self, port: int) -> bool:
        """Whether any address rule allows ``port``: whether resolving a name could help."""
        ports = self._address_ports
        if isinstance(ports, PortSet):
            return ports.contains(port)
        return 0 < port < len(ports) and ports[port] == 1

    def __repr__(self) -> str:
        return f"CompiledRules({len(self._rules)} rules)"
