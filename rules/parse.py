"""The rule text syntax, ``HOST:PORTS``.

HOST is ``203.0.113.7``, ``203.0.113.0/24``, ``[2001:db8::1]``, ``[2001:db8::]/32``,
``api.example.com`` or ``*.example.com``; PORTS is ``443``, ``80,443``, ``8000-8100``, a mix such
as ``80,8000-8100``, or ``*``. Hosts are canonicalised exactly like client-supplied hosts, so a
rule and a request spell a name the same way; errors name the problem and the expected form,
because operators read them at start-up and from ``egress rules add``.
"""

from __future__ import annotations

import functools
import re
from ipaddress import IPv4Network, IPv6Network
from typing import Final

from rules.addresses import HostSyntaxError, canonical_host, parse_network, show
from rules.model import MAX_PORT, MIN_PORT, HostExact, HostWildcard, Network, PortSet, Rule, Target
from rules.special import normalise_network

__all__ = ["RuleSyntaxError", "parse_ports", "parse_rule"]

#: Longest rule text accepted; a host is at most 253 octets, the ports list is the rest.
MAX_RULE_TEXT: Final = 4096

_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")
_EXAMPLES: Final = (
    "expected HOST:PORTS such as 'api.example.com:443', '*.example.com:80,443', "
    "'203.0.113.0/24:8000-8100' or '[2001:db8::]/32:443'"
)


class RuleSyntaxError(ValueError):
    """A rule string that does not parse; ``rule_text`` is the offending text as given."""

    def __init__(self, rule_text: str, message: str) -> None:
        super().__init__(message)
        self.rule_text = rule_text


def parse_rule(text: str) -> Rule:
    """Parse one rule string; raise :class:`RuleSyntaxError` saying what is wrong."""
    if len(text) > MAX_RULE_TEXT:
        raise RuleSyntaxError(text, f"rule {show(text)} is too long ({len(text)} chars)")
    stripped = text.strip()
    host_text, ports_text = _split(text, stripped)
    try:
        target = _parse_target(host_text)
        ports, ports_shown = _ports(ports_text)
    except ValueError as exc:
        raise RuleSyntaxError(text, f"rule {show(text)}: {exc}") from None
    return Rule(f"{target}:{ports_shown}", target, ports)  # what Rule.of builds


def _split(original: str, text: str) -> tuple[str, str]:
    """Split at the ':' that ends HOST: after the ']' of an IPv6 host, else the only ':'."""
    if not text:
        raise RuleSyntaxError(original, f"rule is empty; {_EXAMPLES}")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise RuleSyntaxError(original, f"rule {show(original)}: '[' without ']'; {_EXAMPLES}")
        colon = text.find(":", close)
    else:
        if text.count(":") > 1:
            raise RuleSyntaxError(
                original,
                f"rule {show(original)}: IPv6 addresses must be in brackets, "
                "such as '[2001:db8::1]:443' or '[2001:db8::]/32:443'",
            )
        colon = text.find(":")
    if colon < 0:
        raise RuleSyntaxError(
            original,
            f"{show(original)} has no port; expected HOST:PORTS such as '{text}:443'",
        )
    host, ports = text[:colon], text[colon + 1 :]
    if not host:
        raise RuleSyntaxError(original, f"rule {show(original)} has no host; {_EXAMPLES}")
    return host, ports


def _parse_target(host: str) -> Target:
    if host.startswith("["):
        close = host.find("]")
        if close >= 0 and "/" in host[:close]:
            raise HostSyntaxError(
                f"the prefix length goes after the brackets, such as '[2001:db8::]/32'"
                f" (got {show(host)})"
            )
        return Network(normalise_network(parse_network(host)))
    if "/" in host:
        return Network(normalise_network(parse_network(host)))
    if host.startswith("*"):
        if not host.startswith("*.") or len(host) == 2:
            raise HostSyntaxError(
                f"a wildcard must be a leading '*.' before a domain, such as '*.example.com'"
                f" (got {show(host)})"
            )
        suffix = canonical_host(host[2:])
        if not isinstance(suffix, str):
            raise HostSyntaxError(f"a wildcard needs a domain name, not an address ({show(host)})")
        return HostWildcard(suffix)
    if "*" in host:
        raise HostSyntaxError(
            f"'*' is allowed only as the whole leftmost label, such as '*.example.com'"
            f" (got {show(host)})"
        )
    value = canonical_host(host)
    if isinstance(value, str):
        return HostExact(value)
    if value.version == 4:
        return Network(normalise_network(IPv4Network(value)))
    return Network(normalise_network(IPv6Network(value)))


def parse_ports(text: str) -> PortSet:
    """Parse ``443``, ``80,443``, ``8000-8100``, mixes, or ``*``; raise ``ValueError``."""
    return _ports(text)[0]


@functools.lru_cache(maxsize=4096)
def _ports(text: str) -> tuple[PortSet, str]:
    """The ports and their canonical text: a few spellings (``443``, ``80,443``) recur in
    thousands of rules, and a port set is an immutable value."""
    ports = _parse_ports(text)
    return ports, str(ports)


def _parse_ports(text: str) -> PortSet:
    if not text.strip():
        raise ValueError("no ports after ':'; expected PORTS such as '443', '80,443' or '*'")
    items = [item.strip() for item in text.split(",")]
    if items == ["*"]:
        return PortSet.all()
    ranges: list[tuple[int, int]] = []
    for item in items:
        if item == "*":
            raise ValueError("'*' must be the only port item (it already means every port)")
        lo_text, dash, hi_text = item.partition("-")
        lo = _port(lo_text.strip(), text)
        hi = _port(hi_text.strip(), text) if dash else lo
        if lo > hi:
            raise ValueError(f"port range {show(item)} is reversed; did you mean '{hi}-{lo}'?")
        ranges.append((lo, hi))
    return PortSet.from_ranges(ranges)


def _port(text: str, whole: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > MAX_PORT:
        raise ValueError(
            f"ports {show(whole)}: {show(text)} is not a port number {MIN_PORT}-{MAX_PORT}; "
            "expected PORTS such as '443', '80,443', '8000-8100' or '*'"
        )
    return int(text)
