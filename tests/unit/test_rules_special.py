"""Special-purpose ranges: the SSRF deny table, normalisation and operator exceptions."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from rules.special import SpecialExceptions, effective_address, special_range

# (address, special range name or None, embedded range name or None)
SPECIAL_TABLE = [
    ("169.254.169.254", "link-local", None),
    ("10.1.2.3", "private-use", None),
    ("172.16.0.1", "private-use", None),
    ("172.31.255.255", "private-use", None),
    ("192.168.1.1", "private-use", None),
    ("100.64.0.1", "shared-address-space", None),
    ("127.0.0.1", "loopback", None),
    ("127.255.255.254", "loopback", None),
    ("0.0.0.0", "this-network", None),
    ("0.1.2.3", "this-network", None),
    ("255.255.255.255", "limited-broadcast", None),
    ("224.0.0.1", "multicast", None),
    ("239.255.255.250", "multicast", None),
    ("240.0.0.1", "reserved", None),
    ("192.0.0.170", "ietf-protocol-assignments", None),
    ("192.0.2.1", "documentation", None),
    ("198.51.100.7", "documentation", None),
    ("203.0.113.9", "documentation", None),
    ("192.88.99.1", "6to4-relay-anycast", None),
    ("198.18.0.1", "benchmarking", None),
    ("198.19.255.255", "benchmarking", None),
    ("8.8.8.8", None, None),
    ("172.32.0.1", None, None),
    ("100.128.0.1", None, None),
    ("::ffff:169.254.169.254", "link-local", None),
    ("::ffff:127.0.0.1", "loopback", None),
    ("::ffff:8.8.8.8", None, None),
    ("::10.0.0.1", "private-use", None),  # IPv4-compatible
    ("::8.8.8.8", None, None),
    ("::", "unspecified", None),
    ("::1", "loopback", None),
    ("fe80::1", "link-local", None),
    ("febf::1", "link-local", None),
    ("fec0::1", "site-local", None),
    ("fd00::1", "unique-local", None),
    ("fc00::1", "unique-local", None),
    ("ff02::1", "multicast", None),
    ("2001:db8::1", "documentation", None),
    ("3fff::1", "documentation", None),
    ("5f00::1", "srv6-sids", None),
    ("100::1", "discard-only", None),
    ("2001:2::1", "ietf-protocol-assignments", None),
    ("2001:1ff::1", "ietf-protocol-assignments", None),
    ("64:ff9b::a9fe:a9fe", "nat64", "link-local"),
    ("64:ff9b::10.0.0.1", "nat64", "private-use"),
    ("64:ff9b::808:808", None, None),
    # Local-use NAT64 (RFC 8215): the IPv4 address may sit at any RFC 6052 position, so the
    # range is special unless opened (then judged where the opening says: see below).
    ("64:ff9b:1::a00:1", "nat64-local-use", None),
    ("64:ff9b:1::808:808", "nat64-local-use", None),
    ("64:ff9b:1:a9fe:a9:fe00:5db8:d70e", "nat64-local-use", None),
    ("2002:a9fe:a9fe::", "6to4", "link-local"),
    ("2002:7f00:1::1", "6to4", "loopback"),
    ("2002:0808:0808::", None, None),
    ("2002:0808:0808:1::1", None, None),
    # Teredo: server 65.54.227.120 (public), client NOT(0xf5fffffe) = 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "teredo", "private-use"),
    # Teredo: the RFC 4380 example, client 192.0.2.45 (documentation)
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo", "documentation"),
    # Teredo: server 10.0.0.1, client NOT(0xf7f7f7f7) = 8.8.8.8
    ("2001:0:a00:1::f7f7:f7f7", "teredo", "private-use"),
    # Teredo: server 65.54.227.120, client 8.8.8.8: both public
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None, None),
    ("2606:4700:4700::1111", None, None),
    ("2a00:1450:4001::1", None, None),
    # Outside 2000::/3 and not named by the registry: unallocated, treated as reserved.
    ("4000::1", "reserved", None),
    ("e000::1", "reserved", None),
    ("1::1", "reserved", None),
]


@pytest.mark.parametrize(("text", "name", "embedded"), SPECIAL_TABLE, ids=lambda v: str(v))
def test_special_table(text: str, name: str | None, embedded: str | None) -> None:
    found = special_range(ip_address(text))
    if name is None:
        assert found is None
        return
    assert found is not None
    assert found.name == name
    assert (found.embedded.name if found.embedded else None) == embedded


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::ffff:8.8.8.8", IPv4Address("8.8.8.8")),
        ("::ffff:169.254.169.254", IPv4Address("169.254.169.254")),
        ("::8.8.8.8", IPv4Address("8.8.8.8")),
        ("::2", IPv4Address("0.0.0.2")),
        ("::", IPv6Address("::")),
        ("::1", IPv6Address("::1")),
        ("64:ff9b::808:808", IPv6Address("64:ff9b::808:808")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
        ("8.8.8.8", IPv4Address("8.8.8.8")),
    ],
    ids=repr,
)
def test_effective_address(text: str, expected: object) -> None:
    assert effective_address(ip_address(text)) == expected


def test_special_range_str_names_the_embedding() -> None:
    found = special_range(ip_address("2002:a9fe:a9fe::"))
    assert str(found) == "6to4 (2002::/16) embedding link-local (169.254.0.0/16)"


@pytest.mark.parametrize(
    ("address", "covered"),
    [
        ("10.8.1.1", True),
        ("::ffff:10.8.1.1", True),
        ("10.9.0.1", False),
        ("fd00::5", True),
        ("fc00::5", False),
        ("192.168.3.4", True),
        ("169.254.169.254", False),
    ],
    ids=repr,
)
def test_exceptions_cover(address: str, covered: bool) -> None:
    exceptions = SpecialExceptions.parse(["10.8.0.0/16", "fd00::/8", "::ffff:192.168.0.0/112"])
    assert exceptions.covers(ip_address(address)) is covered


# 64:ff9b:1:a9fe:a9:fe00:5db8:d70e holds 169.254.169.254 at the /48 position (bits 48-63 and
# 72-87) and the public 93.184.215.14 in the low 32 bits (the /96 position).
@pytest.mark.parametrize(
    ("opened", "address", "covered"),
    [
        # the /96 layout: only the low 32 bits count
        ("64:ff9b:1::/96", "64:ff9b:1::5db8:d70e", True),
        ("64:ff9b:1::/96", "64:ff9b:1::a9fe:a9fe", False),
        ("64:ff9b:1::/96", "64:ff9b:1:a9fe:a9:fe00:5db8:d70e", False),  # outside the /96
        # the /48 layout
        ("64:ff9b:1::/48", "64:ff9b:1:a9fe:a9:fe00:5db8:d70e", False),
        ("64:ff9b:1::/48", "64:ff9b:1:5db8:d7:e00::", True),
        # /56 and /64 layouts
        ("64:ff9b:1:100::/56", "64:ff9b:1:15d:b8:d70e::", True),
        ("64:ff9b:1:100::/56", "64:ff9b:1:1a9:fe:a9fe::", False),
        ("64:ff9b:1:2::/64", "64:ff9b:1:2:5d:b8d7:e00:0", True),
        ("64:ff9b:1:2::/64", "64:ff9b:1:2:a9:fea9:fe00:0", False),
        # a length that names no position: special if any position is
        ("64:ff9b:1::/80", "64:ff9b:1::5db8:d70e", False),
        # the well-known prefix is /96 only, and judged there whatever is opened
        ("10.0.0.0/8", "64:ff9b::5db8:d70e", False),
    ],
    ids=repr,
)
def test_opening_local_use_nat64_names_the_position(
    opened: str, address: str, covered: bool
) -> None:
    assert SpecialExceptions.parse([opened]).covers(ip_address(address)) is covered


@pytest.mark.parametrize(
    ("network", "inside"),
    [
        ("10.8.0.0/16", True),
        ("10.8.3.0/24", True),
        ("10.8.3.4/32", True),
        ("10.0.0.0/8", False),  # wider than the opening
        ("0.0.0.0/0", False),
        ("10.9.0.0/16", False),
        ("::ffff:10.8.0.0/112", True),
        ("fd00:8::/32", True),
        ("fd00::/8", False),
    ],
    ids=repr,
)
def test_exceptions_contain_network(network: str, inside: bool) -> None:
    exceptions = SpecialExceptions.parse(["10.8.0.0/16", "fd00:8::/32"])
    assert exceptions.contains_network(ip_network(network)) is inside


def test_exceptions_normalise_mapped_networks() -> None:
    exceptions = SpecialExceptions.parse(["::ffff:192.168.0.0/112", "[fd00::]/8"])
    assert exceptions.networks == (ip_network("192.168.0.0/16"), ip_network("fd00::/8"))


def test_empty_exceptions_cover_nothing() -> None:
    assert not SpecialExceptions().covers(ip_address("10.0.0.1"))
    assert not SpecialExceptions.parse([]).covers(ip_address("::1"))


def test_exceptions_list_every_bad_entry() -> None:
    with pytest.raises(ValueError, match="allow_special") as info:
        SpecialExceptions.parse(["10.0.0.1/8", "ok.example", "10.8.0.0/16", "127.1"])
    message = str(info.value)
    assert "did you mean '10.0.0.0/8'" in message
    assert "'ok.example' is not an IP network" in message
    assert "'127.1' is not an IP network" in message
    assert "10.8.0.0/16" not in message


@pytest.mark.parametrize(
    ("opened", "address", "covered"),
    [
        # Opening a translation prefix does not open the special IPv4 address it carries ...
        (["64:ff9b::/96"], "64:ff9b::a00:1", False),  # 10.0.0.1
        (["2002::/16"], "2002:a9fe:a9fe::1", False),  # 169.254.169.254
        (["2001::/32"], "2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo client 10.0.0.1
        # ... an IPv4 opening of that address does (the rules must still name it) ...
        (["64:ff9b::/96", "10.0.0.0/8"], "64:ff9b::a00:1", True),
        # ... and a public address behind the prefix needs no IPv4 opening.
        (["64:ff9b::/96"], "64:ff9b::5db8:d70e", True),
    ],
    ids=repr,
)
def test_opening_a_translation_prefix_keeps_what_it_embeds_closed(
    opened: list[str], address: str, covered: bool
) -> None:
    assert SpecialExceptions.parse(opened).covers(ip_address(address)) is covered
