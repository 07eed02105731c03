"""Special-purpose (SSRF) address ranges, denied on top of every app's rules.

The tables follow the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and
successors) plus IPv4 multicast, IPv6 site-local and the IPv6 space IANA has not allocated for
unicast (everything outside 2000::/3 that no more specific entry names): a proxy on a hosting node
has no business reaching any of them unless an operator says so. IPv6 forms that carry an IPv4
address (mapped, compatible, NAT64, 6to4, Teredo) are judged by that IPv4 address, so that
``::ffff:169.254.169.254`` is as blocked as ``169.254.169.254`` while ``64:ff9b::8.8.8.8`` is not.

Lookups run once per connection: the ranges are precomputed into :class:`PrefixMap` tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from rules.addresses import PrefixMap, parse_network

__all__ = [
    "SpecialExceptions",
    "SpecialRange",
    "canonical_special_range",
    "effective_address",
    "normalise_network",
    "special_range",
]

_MAPPED_PREFIX: Final = 0xFFFF << 32  # ::ffff:0:0/96
_LOW32: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """Why an address is special: the registry range it falls in.

    For IPv6 forms that embed IPv4 (6to4, NAT64, Teredo), ``network`` is the IPv6 prefix and
    ``embedded`` the IPv4 range that made it special.
    """

    network: IPv4Network | IPv6Network
    name: str
    embedded: SpecialRange | None = None

    def __str__(self) -> str:
        if self.embedded is None:
            return f"{self.name} ({self.network})"
        return f"{self.name} ({self.network}) embedding {self.embedded}"


def effective_address(ip: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """The address rules and the special check see: IPv4-mapped and -compatible IPv6 as IPv4.

    ``::`` and ``::1`` stay IPv6 (unspecified and loopback, not compatible forms of 0.0.0.0 and
    0.0.0.1).
    """
    if ip.version == 4:
        return ip
    value = int(ip)
    high = value >> 32
    if high == 0xFFFF or (high == 0 and value > 1):
        return IPv4Address(value & _LOW32)
    return ip


def normalise_network(network: IPv4Network | IPv6Network) -> IPv4Network | IPv6Network:
    """Rewrite an IPv6 network inside the mapped or compatible /96 as the IPv4 network it holds.

    Keeps rules and exceptions in the same space as :func:`effective_address`. ``::/128`` and
    ``::1/128`` stay IPv6; a compatible-range network shorter than /128 that contains them is
    rewritten too, and so no longer covers them (they are special in any case).
    """
    if network.version == 4 or network.prefixlen < 96:
        return network
    value = int(network.network_address)
    high = value >> 32
    if high == 0xFFFF or (high == 0 and not (network.prefixlen == 128 and value <= 1)):
        return IPv4Network((value & _LOW32, network.prefixlen - 96))
    return network


class _Embed(Enum):
    """How to find the IPv4 address inside an IPv6 transition address."""

    NAT64 = "nat64"  # RFC 6052 /96 form: the low 32 bits
    NAT64_LOCAL = "nat64-local"  # special unless opened; then judged where the opening says
    SIX_TO_FOUR = "6to4"  # RFC 3056: bits 16..47
    TEREDO = "teredo"  # RFC 4380: server in bits 32..63, client = NOT of the low 32 bits


_V4_SPECIAL: Final = (
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private-use"),
    ("100.64.0.0/10", "shared-address-space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private-use"),
    ("192.0.0.0/24", "ietf-protocol-assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4-relay-anycast"),
    ("192.168.0.0/16", "private-use"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited-broadcast"),
)

_V6_SPECIAL: Final = (
    # Not unicast space IANA has allocated; the entries below carve the named parts out of it.
    ("::/3", "reserved"),
    ("4000::/2", "reserved"),
    ("8000::/1", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy-prefix"),
    ("2001::/23", "ietf-protocol-assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "srv6-sids"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

_V6_EMBEDDING: Final = (
    ("64:ff9b::/96", "nat64", _Embed.NAT64),
    # Local-use NAT64 (RFC 8215): an operator may put its NAT64 prefix anywhere inside the /48,
    # with a prefix length of 48, 56, 64 or 96, so the IPv4 address may sit at any of those
    # RFC 6052 positions, and which one is unknowable from the address. So the range is special
    # unless opened; an opening network of length 48, 56, 64 or 96 names the position, and the
    # IPv4 address there must itself be public (see SpecialExceptions.covers).
    ("64:ff9b:1::/48", "nat64-local-use", _Embed.NAT64_LOCAL),
    ("2001::/32", "teredo", _Embed.TEREDO),
    ("2002::/16", "6to4", _Embed.SIX_TO_FOUR),
)

_V6Entry = SpecialRange | tuple[IPv6Network, str, _Embed]


def _v4_table() -> PrefixMap[SpecialRange]:
    items = []
    for text, name in _V4_SPECIAL:
        net = IPv4Network(text)
        items.append((int(net.network_address), net.prefixlen, SpecialRange(net, name)))
    return PrefixMap(32, items)


def _v6_table() -> PrefixMap[_V6Entry]:
    items: list[tuple[int, int, _V6Entry]] = []
    for text, name in _V6_SPECIAL:
        net = IPv6Network(text)
        items.append((int(net.network_address), net.prefixlen, SpecialRange(net, name)))
    for text, name, how in _V6_EMBEDDING:
        net = IPv6Network(text)
        items.append((int(net.network_address), net.prefixlen, (net, name, how)))
    return PrefixMap(128, items)


_V4_TABLE: Final = _v4_table()
_V6_TABLE: Final = _v6_table()


_NAT64_LOCAL: Final = IPv6Network("64:ff9b:1::/48")
_RFC6052_LENGTHS: Final = (48, 56, 64, 96)


def _rfc6052_ipv4(value: int, prefixlen: int) -> int:
    """The IPv4 address an RFC 6052 (section 2.2) prefix of ``prefixlen`` bits embeds.

    Bits are numbered from the top (bit 0 is the most significant); bits 64..71 (the "u" octet)
    never carry address bits.
    """
    if prefixlen == 48:
        return ((value >> 64) & 0xFFFF) << 16 | ((value >> 40) & 0xFFFF)  # bits 48-63, 72-87
    if prefixlen == 56:
        return ((value >> 64) & 0xFF) << 24 | ((value >> 32) & 0xFFFFFF)  # bits 56-63, 72-95
    if prefixlen == 64:
        return (value >> 24) & _LOW32  # bits 72-103
    return value & _LOW32  # /96: bits 96-127


def _embedded(value: int, how: _Embed) -> tuple[int, ...]:
    if how is _Embed.NAT64:
        return (value & _LOW32,)
    if how is _Embed.SIX_TO_FOUR:
        return ((value >> 80) & _LOW32,)
    return ((value >> 64) & _LOW32, ~value & _LOW32)


def special_range(ip: IPv4Address | IPv6Address) -> SpecialRange | None:
    """The special-purpose range ``ip`` (normalised) falls in, or ``None`` for a public address."""
    return canonical_special_range(effective_address(ip))


def canonical_special_range(ip: IPv4Address | IPv6Address) -> SpecialRange | None:
    """Like :func:`special_range` for an address already normalised by
    :func:`effective_address` (the policy normalises each address once, at its boundary)."""
    if ip.version == 4:
        return _V4_TABLE.longest(int(ip))
    value = int(ip)
    entry = _V6_TABLE.longest(value)
    if entry is None or isinstance(entry, SpecialRange):
        return entry
    network, name, how = entry
    if how is _Embed.NAT64_LOCAL:
        return SpecialRange(network, name)  # whatever it embeds: see SpecialExceptions.covers
    for v4 in _embedded(value, how):
        inner = _V4_TABLE.longest(v4)
        if inner is not None:
            return SpecialRange(network, name, inner)
    return None


class SpecialExceptions:
    """Special-purpose networks an operator deliberately opened (``[security].allow_special``).

    Immutable once built. An exception lifts only the special-range deny; an app rule must still
    cover the address.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[IPv4Network | IPv6Network] = ()) -> None:
        nets = tuple(normalise_network(n) for n in networks)
        self._networks = nets
        self._v4: PrefixMap[IPv4Network | IPv6Network] = PrefixMap(
            32, ((int(n.network_address), n.prefixlen, n) for n in nets if n.version == 4)
        )
        self._v6: PrefixMap[IPv4Network | IPv6Network] = PrefixMap(
            128, ((int(n.network_address), n.prefixlen, n) for n in nets if n.version == 6)
        )

    @classmethod
    def parse(cls, texts: Iterable[str]) -> SpecialExceptions:
        """Build from config strings such as ``"10.8.0.0/16"`` or ``"fd00::/8"``.

        Raises ``ValueError`` naming every bad entry (host bits set, odd IPv4 spellings, not a
        network at all), so a bad config fails at start-up with the whole list.
        """
        networks: list[IPv4Network | IPv6Network] = []
        problems: list[str] = []
        for text in texts:
            try:
                networks.append(parse_network(text))
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("invalid [security].allow_special: " + "; ".join(problems))
        return cls(networks)

    @property
    def networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """The networks, normalised, in the order given."""
        return self._networks

    def covers(self, ip: IPv4Address | IPv6Address) -> bool:
        """Whether ``ip`` (normalised like every other check) lies in an opened network."""
        return self.covers_canonical(effective_address(ip))

    def covers_canonical(self, ip: IPv4Address | IPv6Address) -> bool:
        """Like :meth:`covers`, for an address already normalised by :func:`effective_address`.

        Opening an IPv6 range that embeds IPv4 (NAT64, 6to4, Teredo) opens the translation, not
        whatever the address embeds: each special-purpose IPv4 address it may carry must be
        opened too, as an IPv4 range. For the local-use NAT64 range (``64:ff9b:1::/48``) an
        opening network of length 48, 56, 64 or 96 says where the IPv4 address sits (RFC 6052);
        any other length leaves every position possible.
        """
        if ip.version == 4:
            return self._v4.longest(int(ip)) is not None
        value = int(ip)
        opened = self._v6.longest(value)
        if opened is None:
            return False
        entry = _V6_TABLE.longest(value)
        if entry is None or isinstance(entry, SpecialRange):
            return True
        _, _, how = entry
        if how is _Embed.NAT64_LOCAL:
            length = opened.prefixlen
            lengths = (length,) if length in _RFC6052_LENGTHS else _RFC6052_LENGTHS
            embedded: tuple[int, ...] = tuple(_rfc6052_ipv4(value, n) for n in lengths)
        else:
            embedded = _embedded(value, how)
        v4 = self._v4
        return all(
            _V4_TABLE.longest(inner) is None or v4.longest(inner) is not None for inner in embedded
        )

    def contains_network(self, network: IPv4Network | IPv6Network) -> bool:
        """Whether all of ``network`` (normalised) lies inside one opened network.

        An address rule opens a special-purpose address only when it lies inside an opened
        range: ``10.9.0.0/16`` does for ``allow_special = ["10.9.0.0/16"]``, ``0.0.0.0/0`` or
        ``10.0.0.0/8`` do not (they are about the internet, not about the platform's database).
        """
        network = normalise_network(network)
        table = self._v4 if network.version == 4 else self._v6
        opened = table.longest(int(network.network_address))
        return opened is not None and opened.prefixlen <= network.prefixlen

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __repr__(self) -> str:
        return f"SpecialExceptions([{', '.join(repr(str(n)) for n in self._networks)}])"
