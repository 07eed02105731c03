"""The compiled matcher: an immutable index over one app's rules.

Lookup cost depends on the destination, not on how many rules an app has: a name costs one dict
probe per label, an address one dict probe per distinct prefix length in the rules.

Which rule is reported when several match: the most specific target wins (an exact name over
wildcards, a deeper wildcard over a shallower one, a longer prefix over a shorter one); among
rules with the same target, the first in config order whose ports include the port. All rules
allow, so the choice never changes *whether* a connection is allowed, only which rule an
operator is shown, and the most specific one is the best explanation.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from rules.addresses import PrefixMap
from rules.model import HostExact, HostWildcard, Network, PortSet, Rule

__all__ = ["CompiledRules"]


def _first_for_port(rules: tuple[Rule, ...], port: int) -> Rule | None:
    for rule in rules:
        if rule.ports.contains(port):
            return rule
    return None


class CompiledRules:
    """One app's rules, indexed for lookup; build with :meth:`compile`, never mutated."""

    __slots__ = ("_address_ports", "_exact", "_rules", "_v4", "_v6", "_wildcard")

    _rules: tuple[Rule, ...]
    _exact: dict[str, tuple[Rule, ...]]
    _wildcard: dict[str, tuple[Rule, ...]]
    _v4: PrefixMap[tuple[Rule, ...]]
    _v6: PrefixMap[tuple[Rule, ...]]
    _address_ports: PortSet

    @classmethod
    def compile(cls, rules: Iterable[Rule]) -> CompiledRules:
        """Index ``rules``, keeping their order within each target for tie-breaking."""
        ordered = tuple(rules)
        exact: dict[str, list[Rule]] = {}
        wildcard: dict[str, list[Rule]] = {}
        networks: dict[tuple[int, int, int], list[Rule]] = {}
        for rule in ordered:
            target = rule.target
            if isinstance(target, HostExact):
                exact.setdefault(target.name, []).append(rule)
            elif isinstance(target, HostWildcard):
                wildcard.setdefault(target.suffix, []).append(rule)
            else:
                net = target.network
                key = (net.version, int(net.network_address), net.prefixlen)
                networks.setdefault(key, []).append(rule)
        self = cls.__new__(cls)
        self._rules = ordered
        self._exact = {name: tuple(found) for name, found in exact.items()}
        self._wildcard = {suffix: tuple(found) for suffix, found in wildcard.items()}
        self._v4 = PrefixMap(
            32, ((n, p, tuple(found)) for (v, n, p), found in networks.items() if v == 4)
        )
        self._v6 = PrefixMap(
            128, ((n, p, tuple(found)) for (v, n, p), found in networks.items() if v == 6)
        )
        self._address_ports = PortSet.union(
            r.ports for r in ordered if isinstance(r.target, Network)
        )
        return self

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in config order."""
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def match_name(self, host: str, port: int) -> Rule | None:
        """The rule allowing the canonical name ``host`` on ``port``, if any.

        ``host`` must come from :func:`rules.addresses.canonical_host`; a name in any other
        spelling simply does not match (fails closed).
        """
        found = self._exact.get(host)
        if found is not None:
            rule = _first_for_port(found, port)
            if rule is not None:
                return rule
        if not self._wildcard:
            return None
        # Parent suffixes, deepest first: a.b.example.com -> b.example.com, example.com, com.
        dot = host.find(".")
        while dot >= 0:
            found = self._wildcard.get(host[dot + 1 :])
            if found is not None:
                rule = _first_for_port(found, port)
                if rule is not None:
                    return rule
            dot = host.find(".", dot + 1)
        return None

    def match_address(self, ip: IPv4Address | IPv6Address, port: int) -> Rule | None:
        """The rule whose network holds ``ip`` and whose ports include ``port``.

        ``ip`` must already be normalised by :func:`rules.special.effective_address` (the policy
        does it once per address, at its boundary); a mapped form simply does not match IPv4
        rules (fails closed).
        """
        table = self._v4 if ip.version == 4 else self._v6
        for found in table.candidates(int(ip)):
            rule = _first_for_port(found, port)
            if rule is not None:
                return rule
        return None

    def has_address_rules_for_port(self, port: int) -> bool:
        """Whether any address rule allows ``port``: whether resolving a name could help."""
        return self._address_ports.contains(port)

    def __repr__(self) -> str:
        return f"CompiledRules({len(self._rules)} rules)"
