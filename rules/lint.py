"""Rules that can never allow anything: pure checks an operator wants before the 3 a.m. page.

An address rule whose whole network is special-purpose (a documentation range, loopback,
private space, ...) can allow a connection only when ``[security].allow_special`` opens a range
containing the rule: an opened range is reached only by rules lying inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rules.apps import App
from rules.model import Network, Rule
from rules.special import SpecialExceptions, SpecialRange, canonical_special_range

__all__ = ["DeadRule", "dead_address_rules"]


@dataclass(frozen=True, slots=True)
class DeadRule:
    """``rule`` covers only the special-purpose ``special`` range, which nothing opens for it."""

    rule: Rule
    special: SpecialRange
    wider_than_opening: bool  # an opened range overlaps the rule, but the rule is wider


def dead_address_rules(app: App, exceptions: SpecialExceptions) -> list[DeadRule]:
    """The address rules of ``app`` that can never match an address that may be dialled."""
    dead = []
    for rule in app.allow:
        target = rule.target
        if not isinstance(target, Network):
            continue
        network = target.network
        special = canonical_special_range(network.network_address)
        if special is None or special.embedded is not None:
            continue  # public, or judged by an embedded IPv4 address that may be public
        if special.network.version != network.version or not network.subnet_of(
            special.network  # type: ignore[arg-type]
        ):
            continue  # only partly special
        if exceptions.contains_network(network):
            continue
        wider = any(
            opened.version == network.version and opened.subnet_of(network)  # type: ignore[arg-type]
            for opened in exceptions.networks
        )
        dead.append(DeadRule(rule, special, wider))
    return dead
