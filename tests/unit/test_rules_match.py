"""The compiled matcher: names, wildcards, networks, ports, tie-breaking, and a model check."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.match import CompiledRules
from rules.model import Network, PortSet, Rule
from rules.parse import parse_rule
from rules.special import effective_address, normalise_network

RULES = CompiledRules.compile(
    parse_rule(text)
    for text in [
        "api.example.com:443",
        "*.example.com:80,443",
        "*.deep.example.com:8443",
        "*.example.org:*",
        "exact.example.net:8000-8100",
        "198.51.100.0/24:443",
        "198.51.100.7:*",
        "[2001:db8::]/32:443",
        "[2001:db8:1::]/48:80,8080",
        "10.0.0.0/8:5432",
    ]
)


@pytest.mark.parametrize(
    ("host", "port", "rule"),
    [
        ("api.example.com", 443, "api.example.com:443"),
        ("api.example.com", 80, "*.example.com:80,443"),  # falls through to the wildcard
        ("api.example.com", 8080, None),
        ("www.example.com", 443, "*.example.com:80,443"),
        ("a.b.c.example.com", 80, "*.example.com:80,443"),  # any depth
        ("example.com", 443, None),  # not the apex
        ("notexample.com", 443, None),  # a suffix match is on label boundaries
        ("x.deep.example.com", 8443, "*.deep.example.com:8443"),  # deeper wildcard first
        ("x.deep.example.com", 443, "*.example.com:80,443"),
        ("deep.example.com", 8443, None),
        ("deep.example.com", 443, "*.example.com:80,443"),
        ("a.example.org", 1, "*.example.org:*"),
        ("a.example.org", 65535, "*.example.org:*"),
        ("example.org", 80, None),
        ("exact.example.net", 8000, "exact.example.net:8000-8100"),
        ("exact.example.net", 8101, None),
        ("sub.exact.example.net", 8000, None),
        ("API.EXAMPLE.COM", 443, None),  # callers pass canonical names only
        ("com", 443, None),
    ],
    ids=repr,
)
def test_match_name(host: str, port: int, rule: str | None) -> None:
    found = RULES.match_name(host, port)
    assert (found.text if found else None) == rule


@pytest.mark.parametrize(
    ("address", "port", "rule"),
    [
        ("198.51.100.1", 443, "198.51.100.0/24:443"),
        ("198.51.100.7", 443, "198.51.100.7:*"),  # longest prefix wins
        ("198.51.100.7", 22, "198.51.100.7:*"),
        ("198.51.100.8", 22, None),
        ("198.51.101.1", 443, None),
        ("::ffff:198.51.100.1", 443, "198.51.100.0/24:443"),  # mapped
        ("::198.51.100.1", 443, "198.51.100.0/24:443"),  # compatible
        ("2001:db8::1", 443, "[2001:db8::]/32:443"),
        ("2001:db8:1::1", 80, "[2001:db8:1::]/48:80,8080"),
        ("2001:db8:1::1", 443, "[2001:db8::]/32:443"),  # shorter prefix when ports differ
        ("2001:db9::1", 443, None),
        ("10.255.255.255", 5432, "10.0.0.0/8:5432"),
        ("11.0.0.0", 5432, None),
    ],
    ids=repr,
)
def test_match_address(address: str, port: int, rule: str | None) -> None:
    # The policy normalises each address once (mapped and compatible forms to IPv4) before it
    # reaches the matcher.
    found = RULES.match_address(effective_address(ip_address(address)), port)
    assert (found.text if found else None) == rule


@pytest.mark.parametrize(
    ("port", "expected"), [(443, True), (5432, True), (22, True), (1, True), (65535, True)]
)
def test_has_address_rules_for_port_with_star(port: int, expected: bool) -> None:
    assert RULES.has_address_rules_for_port(port) is expected


def test_has_address_rules_for_port() -> None:
    rules = CompiledRules.compile(
        [parse_rule("api.example.com:*"), parse_rule("203.0.113.0/24:443,8000-8100")]
    )
    assert rules.has_address_rules_for_port(443)
    assert rules.has_address_rules_for_port(8050)
    assert not rules.has_address_rules_for_port(80)
    assert not CompiledRules.compile([]).has_address_rules_for_port(443)


def test_first_rule_in_config_order_wins_among_equals() -> None:
    first, second = parse_rule("*.example.com:80-90"), parse_rule("*.example.com:85")
    rules = CompiledRules.compile([first, second])
    assert rules.match_name("a.example.com", 85) is first
    assert CompiledRules.compile([second, first]).match_name("a.example.com", 85) is second
    assert rules.rules == (first, second)
    assert len(rules) == 2


def test_mapped_forms_are_the_callers_to_normalise() -> None:
    """The matcher takes canonical addresses only: a mapped form fails closed."""
    assert RULES.match_address(ip_address("::ffff:198.51.100.1"), 443) is None


def test_empty_rules_match_nothing() -> None:
    rules = CompiledRules.compile([])
    assert rules.match_name("example.com", 443) is None
    assert rules.match_address(IPv4Address("8.8.8.8"), 443) is None
    assert rules.match_address(IPv6Address("2001:db8::1"), 443) is None


# --- model check: the compiled index agrees with a naive linear scan -------------------------


def _naive(rules: list[Rule], ip: IPv4Address | IPv6Address, port: int) -> set[str]:
    ip = effective_address(ip)
    return {
        r.text
        for r in rules
        if isinstance(r.target, Network)
        and r.target.network.version == ip.version
        and ip in r.target.network
        and r.ports.contains(port)
    }


# Small spaces so that random rules and addresses actually overlap.
_V4 = st.integers(0, 255).map(lambda x: IPv4Address(0x0A000000 | x << 4 | x % 7))
_V6 = st.integers(0, 255).map(lambda x: IPv6Address(0x20010DB8 << 96 | x << 8 | x % 5))
_MAPPED = _V4.map(lambda a: IPv6Address(0xFFFF << 32 | int(a)))
_ADDRESSES = st.one_of(_V4, _V6, _MAPPED)
_PORTS = st.lists(
    st.tuples(st.integers(1, 30), st.integers(0, 10)).map(lambda t: (t[0], t[0] + t[1])),
    min_size=1,
    max_size=3,
).map(PortSet.from_ranges)


@st.composite
def _network_rule(draw: st.DrawFn) -> Rule:
    address = draw(_ADDRESSES)
    network: IPv4Network | IPv6Network
    if address.version == 4:
        prefix = draw(st.integers(20, 32))
        network = IPv4Network((int(address), prefix), strict=False)
    else:
        prefix = draw(st.integers(100, 128))
        network = IPv6Network((int(address), prefix), strict=False)
    return Rule.of(Network(normalise_network(network)), draw(_PORTS))


@given(
    rules=st.lists(_network_rule(), max_size=30),
    address=_ADDRESSES,
    port=st.integers(1, 45),
)
def test_match_address_agrees_with_linear_scan(
    rules: list[Rule], address: IPv4Address | IPv6Address, port: int
) -> None:
    found = CompiledRules.compile(rules).match_address(effective_address(address), port)
    expected = _naive(rules, address, port)
    if not expected:
        assert found is None
    else:
        assert found is not None
        assert found.text in expected
        # and it is the most specific of the matches
        best = max(
            r.target.network.prefixlen  # type: ignore[union-attr]
            for r in rules
            if r.text in expected
        )
        assert found.target.network.prefixlen == best  # type: ignore[union-attr]
