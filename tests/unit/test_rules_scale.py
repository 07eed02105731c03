"""What makes big rule sets cheap, checked against the plain definitions: the port index of a
target with many rules, the first-octet filter of prefix lookups, compiling in slices, and the
one-search check of ASCII host names."""

from __future__ import annotations

import unicodedata
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.addresses import HostSyntaxError, PrefixMap, canonical_host
from rules.apps import App, UidRange
from rules.decide import AppCompiler, AppPolicy, decide_address, decide_name
from rules.match import PORT_INDEX_FROM, CompiledRules
from rules.model import HostExact, Network, PortSet, Rule
from rules.parse import parse_rule
from rules.special import SpecialExceptions

_PORTS = st.lists(
    st.tuples(st.integers(1, 60), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])),
    min_size=1,
    max_size=3,
).map(PortSet.from_ranges)


def _first_in_config_order(rules: list[Rule], port: int) -> Rule | None:
    return next((rule for rule in rules if rule.ports.contains(port)), None)


@given(
    ports=st.lists(_PORTS, min_size=PORT_INDEX_FROM - 2, max_size=3 * PORT_INDEX_FROM),
    port=st.integers(1, 80),
)
def test_many_rules_for_one_target_answer_the_first_in_config_order(
    ports: list[PortSet], port: int
) -> None:
    name_rules = [Rule.of(HostExact("api.example.com"), p) for p in ports]
    address_rules = [Rule.of(Network(IPv4Network("198.51.100.0/24")), p) for p in ports]
    compiled = CompiledRules.compile([*name_rules, *address_rules])
    assert compiled.match_name("api.example.com", port) is _first_in_config_order(name_rules, port)
    found = compiled.match_address(IPv4Address("198.51.100.9"), port)
    assert found is _first_in_config_order(address_rules, port)


def test_a_target_with_a_rule_for_each_of_65535_ports_answers_each() -> None:
    target = Network(IPv4Network("203.0.113.7/32"))
    rules = [
        Rule(f"203.0.113.7:{port}", target, PortSet(((port, port),))) for port in range(1, 65536)
    ]
    compiled = CompiledRules.compile(rules)
    for port in (1, 443, 65535):
        assert compiled.match_address(IPv4Address("203.0.113.7"), port) is rules[port - 1]
    assert compiled.match_address(IPv4Address("203.0.113.8"), 443) is None


_SPREAD_PORTS = st.lists(
    st.tuples(st.integers(1, 65535), st.integers(0, 40)).map(
        lambda t: (t[0], min(65535, t[0] + t[1]))
    ),
    min_size=1,
    max_size=2,
).map(PortSet.from_ranges)


_MANY_SINGLE_PORTS = [PortSet(((n, n),)) for n in range(30000, 33000, 2)]  # 1,500 sets


@pytest.mark.parametrize("many", [False, True], ids=["few port sets", "port flags"])
@given(ports=st.lists(_SPREAD_PORTS, max_size=40), probes=st.lists(st.integers(1, 65535)))
def test_ports_worth_resolving_for_are_those_of_some_address_rule(
    many: bool, ports: list[PortSet], probes: list[int]
) -> None:
    """Past a thousand distinct port sets the index keeps one flag per port instead."""
    sets = ports + _MANY_SINGLE_PORTS if many else ports
    rules = [Rule.of(Network(IPv4Network((0x0B000000 + n, 32))), p) for n, p in enumerate(sets)]
    compiled = CompiledRules.compile([parse_rule("api.example.com:*"), *rules])
    allowed = {port for p in sets for lo, hi in p.ranges for port in range(lo, hi + 1)}
    edges = {port for p in ports for lo, hi in p.ranges for port in (lo - 1, lo, hi, hi + 1)}
    for port in {*probes, *edges, 29999, 30000, 30001, 32998, 32999, 65535} - {0, 65536}:
        assert compiled.has_address_rules_for_port(port) == (port in allowed), port


# A few first octets, so that short and long networks share them (the filter is by octet).
_ADDRESS = st.tuples(st.sampled_from([0, 1, 10, 200, 255]), st.integers(0, 2**24 - 1)).map(
    lambda t: t[0] << 24 | t[1]
)
_PREFIX = st.tuples(_ADDRESS, st.integers(0, 32))


@given(items=st.lists(_PREFIX, max_size=40), probes=st.lists(_ADDRESS))
def test_prefix_map_longest_is_the_longest_containing_network(
    items: list[tuple[int, int]], probes: list[int]
) -> None:
    networks = [IPv4Network((address, length), strict=False) for address, length in items]
    table = PrefixMap(32, ((int(n.network_address), n.prefixlen, n) for n in networks))
    for network in networks:  # each network's own address and last address too
        probes += [int(network.network_address), int(network.broadcast_address)]
    for value in probes:
        containing = [n for n in networks if IPv4Address(value) in n]
        expected = max((n.prefixlen for n in containing), default=None)
        found = table.longest(value)
        assert (found.prefixlen if found else None) == expected
        assert [n.prefixlen for n in table.candidates(value)] == sorted(
            {n.prefixlen for n in containing}, reverse=True
        )


MIXED = [
    "api.example.com:443",
    "*.example.org:80,443",
    "*.deep.example.org:8443",
    "198.51.100.0/24:8000-8100",
    "198.51.100.7:*",
    "[2001:db8::]/32:443",
    "10.8.0.0/16:5432",
    "10.8.1.2:22",
    "0.0.0.0/0:8080",
]
PROBES = [
    ("api.example.com", 443),
    ("a.deep.example.org", 8443),
    ("x.example.org", 80),
    ("nowhere.example.net", 8080),
    ("198.51.100.7", 22),
    ("198.51.100.9", 8050),
    ("2001:db8::1", 443),
    ("10.8.1.2", 22),
    ("10.8.3.3", 5432),
    ("10.9.0.1", 8080),
    ("8.8.8.8", 8080),
]


@pytest.mark.parametrize("slice_size", [1, 2, 5, 100])
def test_an_app_compiled_in_slices_decides_as_one_compiled_at_once(slice_size: int) -> None:
    app = App("blog", (UidRange(10001, 10001),), tuple(parse_rule(r) for r in MIXED * 3))
    exceptions = SpecialExceptions.parse(["10.8.0.0/16"])
    whole = AppPolicy.compile(app, exceptions)
    compiler = AppCompiler(app, exceptions)
    steps = 1
    while not compiler.step(slice_size):
        steps += 1
    assert steps == -(-len(app.allow) // slice_size)
    stepped = compiler.result()
    assert stepped.rules.rules == whole.rules.rules and stepped.opened.rules == whole.opened.rules
    for host, port in PROBES:
        address = ip_address(host) if host[0].isdigit() else None
        if address is None:
            assert decide_name(stepped, host, port) == decide_name(whole, host, port)
        else:
            assert decide_address(stepped, address, port) == decide_address(whole, address, port)


def test_a_result_before_the_last_slice_is_refused() -> None:
    app = App("blog", (UidRange(10001, 10001),), tuple(parse_rule(r) for r in MIXED))
    compiler = AppCompiler(app, SpecialExceptions())
    compiler.step(2)
    with pytest.raises(RuntimeError, match="not compiled yet"):
        compiler.result()


def _is_rejected_character(char: str) -> bool:
    """The definition canonical_host applies to every character."""
    return char in "@/\\:?#[]%" or unicodedata.category(char) in {
        "Cc", "Cs", "Co", "Cn", "Zs", "Zl", "Zp",
    }  # fmt: skip


def test_each_ascii_character_is_judged_as_the_unicode_categories_say() -> None:
    for char in map(chr, range(128)):
        host = f"a{char}b.example.com"
        try:
            canonical_host(host)
        except HostSyntaxError as error:
            rejected, message = True, str(error)
        else:
            rejected, message = False, ""
        if char == ":":  # read as an attempt at IPv6 first
            assert rejected and "IPv6" in message
        elif _is_rejected_character(char):
            assert rejected and f"the character {char!r}" in message, char
        else:  # a letter, digit, '-' or '_' makes a name; anything else a bad label
            assert rejected == (not (char.isalnum() or char in "-_.")), char


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=30))
def test_ascii_names_are_accepted_exactly_when_every_label_is_valid(text: str) -> None:
    try:
        value = canonical_host(text)
    except HostSyntaxError:
        return
    if isinstance(value, IPv4Address | IPv6Address):
        return
    labels = value.split(".")
    assert all(
        1 <= len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label) for label in labels
    )
    assert not any(_is_rejected_character(c) for c in text)
