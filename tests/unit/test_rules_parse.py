"""The rule text syntax: canonical forms and error messages operators will read."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from rules.model import HostExact, HostWildcard, Network, PortSet, Rule
from rules.parse import RuleSyntaxError, parse_ports, parse_rule
from tests.unit.test_rules_addresses import ODD_IPV4


@pytest.mark.parametrize(
    ("text", "canonical", "target"),
    [
        ("api.example.com:443", "api.example.com:443", HostExact("api.example.com")),
        ("API.Example.COM.:443", "api.example.com:443", HostExact("api.example.com")),
        (" api.example.com:443 ", "api.example.com:443", HostExact("api.example.com")),
        ("bücher.example:80", "xn--bcher-kva.example:80", HostExact("xn--bcher-kva.example")),
        ("*.example.com:80,443", "*.example.com:80,443", HostWildcard("example.com")),
        ("*.Example.COM.:443", "*.example.com:443", HostWildcard("example.com")),
        (
            "203.0.113.0/24:8000-8100",
            "203.0.113.0/24:8000-8100",
            Network(ip_network("203.0.113.0/24")),
        ),
        ("198.51.100.7:*", "198.51.100.7:*", Network(ip_network("198.51.100.7/32"))),
        ("198.51.100.7/32:1-65535", "198.51.100.7:*", Network(ip_network("198.51.100.7/32"))),
        ("[2001:db8::]/32:443", "[2001:db8::]/32:443", Network(ip_network("2001:db8::/32"))),
        ("[2001:DB8::1]:443", "[2001:db8::1]:443", Network(ip_network("2001:db8::1/128"))),
        ("[::ffff:10.0.0.0]/104:80", "10.0.0.0/8:80", Network(ip_network("10.0.0.0/8"))),
        ("[::ffff:a00:1]:80", "10.0.0.1:80", Network(ip_network("10.0.0.1/32"))),
        ("0.0.0.0/0:443", "0.0.0.0/0:443", Network(ip_network("0.0.0.0/0"))),
        ("1password.com:443", "1password.com:443", HostExact("1password.com")),
    ],
    ids=repr,
)
def test_parse_rule(text: str, canonical: str, target: object) -> None:
    rule = parse_rule(text)
    assert rule.text == canonical
    assert rule.target == target
    assert parse_rule(rule.text) == rule  # the canonical text round-trips


@pytest.mark.parametrize(
    ("text", "ranges", "canonical"),
    [
        ("443", ((443, 443),), "443"),
        ("80,443", ((80, 80), (443, 443)), "80,443"),
        ("443,80", ((80, 80), (443, 443)), "80,443"),
        ("8000-8100", ((8000, 8100),), "8000-8100"),
        ("80, 8000-8100", ((80, 80), (8000, 8100)), "80,8000-8100"),
        ("80,81,82", ((80, 82),), "80-82"),
        ("8000-8100,8050-8200", ((8000, 8200),), "8000-8200"),
        ("1-65535", ((1, 65535),), "*"),
        ("*", ((1, 65535),), "*"),
        ("65535", ((65535, 65535),), "65535"),
    ],
    ids=repr,
)
def test_parse_ports(text: str, ranges: tuple[tuple[int, int], ...], canonical: str) -> None:
    ports = parse_ports(text)
    assert ports == PortSet(ranges)
    assert str(ports) == canonical


@pytest.mark.parametrize(
    ("ports", "inside", "outside"),
    [
        ("443", [443], [442, 444, 0, 65535]),
        ("80,8000-8100", [80, 8000, 8050, 8100], [79, 81, 7999, 8101]),
        ("*", [1, 80, 65535], [0, 65536, -1]),
    ],
)
def test_portset_contains(ports: str, inside: list[int], outside: list[int]) -> None:
    parsed = parse_ports(ports)
    assert all(parsed.contains(p) for p in inside)
    assert not any(parsed.contains(p) for p in outside)


# Surrounding whitespace is stripped from a whole rule, so test only the forms without it.
@pytest.mark.parametrize("text", [t for t in ODD_IPV4 if t == t.strip()], ids=repr)
def test_odd_ipv4_spellings_rejected_in_rules(text: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_rule(f"{text}:443")
    with pytest.raises(RuleSyntaxError):
        parse_rule(f"{text}/32:443")


@pytest.mark.parametrize("text", ["127.0.0.1 :443", "127.0.0.1\n:443", "api.example.com :443"])
def test_whitespace_inside_a_rule_is_rejected(text: str) -> None:
    with pytest.raises(RuleSyntaxError):
        parse_rule(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "api.example.com",
            "'api.example.com' has no port; expected HOST:PORTS such as 'api.example.com:443'",
        ),
        ("", "rule is empty"),
        (":443", "has no host"),
        ("[2001:db8::1]", "has no port"),
        ("api.example.com:", "no ports after ':'"),
        ("api.example.com:0", "'0' is not a port number 1-65535"),
        ("api.example.com:65536", "'65536' is not a port number"),
        ("api.example.com:0443", "'0443' is not a port number"),
        ("api.example.com:+443", "'+443' is not a port number"),
        ("api.example.com:http", "'http' is not a port number"),
        ("api.example.com:80,,443", "'' is not a port number"),
        ("api.example.com:100-80", "reversed; did you mean '80-100'"),
        ("api.example.com:*,80", "'*' must be the only port item"),
        ("10.0.0.1/8:80", "host bits set; did you mean '10.0.0.0/8'"),
        ("[2001:db8::1]/32:443", "did you mean '[2001:db8::]/32'"),
        ("[2001:db8::/32]:443", "the prefix length goes after the brackets"),
        ("10.0.0.0/33:80", "prefix length must be a number from 0 to 32"),
        ("2001:db8::1:443", "IPv6 addresses must be in brackets"),
        ("[2001:db8::1:443", "'[' without ']'"),
        ("127.1:80", "reads as a number"),
        ("*:443", "a wildcard must be a leading '*.'"),
        ("*example.com:443", "a wildcard must be a leading '*.'"),
        ("*.:443", "a wildcard must be a leading '*.'"),
        ("api.*.com:443", "'*' is allowed only as the whole leftmost label"),
        ("*.10.0.0.1:443", "a wildcard needs a domain name"),
        ("user@example.com:443", "'@'"),
        ("x" * 5000 + ":443", "too long"),
    ],
    ids=repr,
)
def test_rule_errors_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    assert info.value.rule_text == text
    assert fragment in str(info.value)


def test_rule_of_derives_text() -> None:
    rule = Rule.of(HostWildcard("example.com"), parse_ports("443,80"))
    assert rule.text == "*.example.com:80,443"
    assert str(rule) == rule.text


@pytest.mark.parametrize(
    "ranges",
    [((0, 10),), ((10, 5),), ((1, 65536),), ((10, 20), (15, 30)), ((20, 30), (1, 5))],
)
def test_portset_constructor_rejects_non_canonical_ranges(
    ranges: tuple[tuple[int, int], ...],
) -> None:
    with pytest.raises(ValueError):
        PortSet(ranges)
