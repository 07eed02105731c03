"""Strict IP literals and host canonicalisation.

Every host a client or an operator supplies goes through :func:`canonical_host`, so that the
name a rule is matched against is exactly the name that is later resolved, and so that nothing a
resolver or ``inet_aton`` would read as a number (``127.1``, ``0x7f.1``, ``2130706433``) ever
reaches one disguised as a name.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final, Generic, TypeVar

import idna

__all__ = [
    "HostSyntaxError",
    "IPAddress",
    "PrefixMap",
    "canonical_host",
    "parse_ip_literal",
    "parse_network",
    "show",
]

IPAddress = IPv4Address | IPv6Address

#: Longest text we look at before rejecting; far above any valid host (253 octets), but bounds
#: the work IDNA mapping does on hostile input.
MAX_HOST_INPUT: Final = 1024

_SHOW_LIMIT: Final = 80

# [0-9] rather than \d: \d matches every Unicode digit, and int() would happily read them.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_STRICT_V4: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_V6_CHARS: Final = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_LABEL: Final = re.compile(r"[a-z0-9_-]{1,63}")
_HEX_NUMBER: Final = re.compile(r"0x[0-9a-f]*")
_DIGITS: Final = re.compile(r"[0-9]+")
_PREFIXLEN: Final = re.compile(r"0|[1-9][0-9]{0,2}")
# Unicode categories never allowed anywhere in a host: controls, surrogates, private use,
# unassigned, and every kind of space or line/paragraph separator.
_BAD_CATEGORIES: Final = frozenset({"Cc", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_BAD_ASCII: Final = frozenset("@/\\:?#[]%")
# The same for ASCII text, in one search: controls (Cc), space (Zs) and _BAD_ASCII.
_BAD_ASCII_CHAR: Final = re.compile(r"[\x00-\x20\x7f@/\\:?#\[\]%]")
_VALID_NAME: Final = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")  # every label valid


class HostSyntaxError(ValueError):
    """A host that is not a strict IP literal nor a valid DNS name; the message is for operators."""


def show(text: str) -> str:
    """``repr()`` of untrusted text, truncated, so it is safe and short in messages and logs."""
    if len(text) <= _SHOW_LIMIT:
        return repr(text)
    return f"{text[:_SHOW_LIMIT]!r}... ({len(text)} chars)"


def _ends_in_number(labels: list[str]) -> bool:
    """WHATWG URL's "ends in a number" test: would a URL parser or inet_aton see an IPv4 here?"""
    if len(labels) > 1 and not labels[-1]:
        labels = labels[:-1]
    last = labels[-1]
    return bool(_DIGITS.fullmatch(last) or _HEX_NUMBER.fullmatch(last.lower()))


def _parse_v6(inner: str, original: str) -> IPv6Address:
    if "%" in inner:
        raise HostSyntaxError(f"host {show(original)}: IPv6 zone ids ('%...') are not accepted")
    if not _V6_CHARS.fullmatch(inner):
        raise HostSyntaxError(f"host {show(original)} is not a valid IPv6 address")
    try:
        return IPv6Address(inner)
    except ValueError:
        raise HostSyntaxError(f"host {show(original)} is not a valid IPv6 address") from None


def parse_ip_literal(text: str) -> IPv4Address | IPv6Address | None:
    """Return the address if ``text`` is a strict IP literal, ``None`` if it is a name.

    Strict means a dotted quad of four decimal octets without leading zeros, or a standard IPv6
    text (optionally in brackets, without a zone id). Text that is neither a strict literal nor
    possibly a name -- anything numeric-looking such as ``127.1`` or ``0x7f000001``, anything
    with ``:`` or brackets that is not valid IPv6 -- raises :class:`HostSyntaxError`, so that
    ``None`` always means "not an IP address in any ASCII spelling". The name itself is not
    validated here: :func:`canonical_host` does that, and also catches numbers that appear only
    after Unicode mapping (full-width digits and dots).
    """
    if _STRICT_V4.fullmatch(text):
        a, b, c, d = text.split(".")  # four decimal octets, 0-255: the pattern says so
        return IPv4Address(int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d))
    if text.startswith("["):
        if not text.endswith("]"):
            raise HostSyntaxError(f"host {show(text)}: '[' without a closing ']'")
        return _parse_v6(text[1:-1], text)
    if ":" in text:
        return _parse_v6(text, text)
    if text and _ends_in_number(text.split(".")):
        raise HostSyntaxError(_numeric_message(text))
    return None


def _numeric_message(text: str) -> str:
    return (
        f"host {show(text)} reads as a number (an IPv4 address in a non-standard form); "
        "write IPv4 addresses as a dotted quad such as '192.0.2.10'"
    )


def canonical_host(text: str) -> str | IPv4Address | IPv6Address:
    """Return the canonical form of a host: an address object, or a lowercase A-label name.

    One trailing dot is removed, brackets are removed from IPv6, names are IDNA-encoded (UTS 46
    mapping, so case and width variants meet) and validated (labels of 1..63 letters, digits,
    '-' or '_', at most 253 octets). Any numeric host that is not a strict literal is rejected,
    also when the number only appears after UTS 46 mapping (full-width digits and dots).
    """
    if len(text) > MAX_HOST_INPUT:
        raise HostSyntaxError(f"host {show(text)} is too long ({len(text)} chars)")
    address = parse_ip_literal(text)
    if address is not None:
        return address
    if not text:
        raise HostSyntaxError("host is empty")
    if text.isascii():
        bad = _BAD_ASCII_CHAR.search(text)
        if bad is not None:
            raise _bad_character(text, bad.group())
    else:
        for char in text:
            if char in _BAD_ASCII or unicodedata.category(char) in _BAD_CATEGORIES:
                raise _bad_character(text, char)
    name = text[:-1] if text.endswith(".") else text
    name = name.lower() if name.isascii() else _idna_encode(name, text)
    if not name:
        raise HostSyntaxError(f"host {show(text)} has no name")
    labels = name.split(".")
    for label in () if _VALID_NAME.fullmatch(name) else labels:  # the loop says what is wrong
        if not label:
            raise HostSyntaxError(f"host {show(text)} has an empty label ('..' or leading '.')")
        if not _LABEL.fullmatch(label):
            if len(label) > 63:
                raise HostSyntaxError(f"host {show(text)} has a label longer than 63 octets")
            raise HostSyntaxError(
                f"host {show(text)}: label {show(label)} may hold only letters, digits, '-' and '_'"
            )
    if len(name) > 253:
        raise HostSyntaxError(f"host {show(text)} is longer than 253 octets")
    if _ends_in_number(labels):
        raise HostSyntaxError(_numeric_message(text))
    return name


def _bad_character(text: str, char: str) -> HostSyntaxError:
    return HostSyntaxError(
        f"host {show(text)} contains the character {char!r}, which is not allowed in a host name"
    )


def _idna_encode(name: str, original: str) -> str:
    """UTS 46 map the whole name, then A-label each non-ASCII label.

    ASCII labels are kept as mapped (lowercase) rather than run through IDNA 2008 validation,
    which would reject the '_' that real service names (``_dmarc``, ``my_host``) carry.
    """
    try:
        mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)
        labels = [
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        ]
    except idna.IDNAError as exc:
        raise HostSyntaxError(f"host {show(original)} is not a valid IDNA name: {exc}") from None
    return ".".join(labels)


def parse_network(text: str) -> IPv4Network | IPv6Network:
    """A strict network: ``192.0.2.0/24``, ``2001:db8::/32`` or ``[2001:db8::]/32``.

    The address must be a strict literal (see :func:`parse_ip_literal`); without ``/N`` it is a
    single-address network. Host bits set is an error that names the network meant, because
    silently widening or narrowing an operator's range is worse than refusing it.
    """
    address_text, slash, length_text = text.partition("/")
    try:
        address = parse_ip_literal(address_text)
    except HostSyntaxError:
        address = None
    if address is None:
        raise HostSyntaxError(
            f"{show(text)} is not an IP network such as '192.0.2.0/24' or '[2001:db8::]/32'"
        )
    bits = address.max_prefixlen
    if slash:
        if not _PREFIXLEN.fullmatch(length_text) or int(length_text) > bits:
            raise HostSyntaxError(f"{show(text)}: prefix length must be a number from 0 to {bits}")
        prefixlen = int(length_text)
    else:
        prefixlen = bits
    network: IPv4Network | IPv6Network
    if address.version == 4:
        network = IPv4Network((int(address), prefixlen), strict=False)
    else:
        network = IPv6Network((int(address), prefixlen), strict=False)
    if network.network_address != address:
        base = str(network.network_address)
        if address.version == 6 and address_text.startswith("["):
            base = f"[{base}]"
        raise HostSyntaxError(f"{show(text)} has host bits set; did you mean '{base}/{prefixlen}'?")
    return network


V = TypeVar("V")


class PrefixMap(Generic[V]):
    """Longest-prefix lookup over one address family, one dict per prefix length present.

    A lookup costs one shift and one dict probe per *distinct* prefix length (at most 33 or
    129) that has a network in the address's first octet, independent of how many networks are
    stored: a public address usually skips every table of the special-purpose ranges.
    """

    __slots__ = ("_bits", "_by_octet", "_lengths", "_shorter")

    def __init__(self, bits: int, items: Iterable[tuple[int, int, V]]) -> None:
        """``items``: ``(network as int, prefix length, value)``; later duplicates are dropped."""
        tables: dict[int, dict[int, V]] = {}
        for network, prefixlen, value in items:
            tables.setdefault(prefixlen, {}).setdefault(network >> (bits - prefixlen), value)
        self._bits = bits
        self._lengths = tuple(sorted(tables, reverse=True))
        # (shift, table) to probe, longest prefix first: those under 8 bits for any address,
        # the longer ones only for an address in a first octet they have a network in.
        probes = [(bits - n, tables[n]) for n in self._lengths]
        self._shorter = tuple(p for n, p in zip(self._lengths, probes, strict=True) if n < 8)
        octets: dict[int, set[int]] = {}
        for n in self._lengths:
            if n >= 8:
                for key in tables[n]:
                    octets.setdefault(key >> (n - 8), set()).add(n)
        self._by_octet = {
            octet: tuple(
                p for n, p in zip(self._lengths, probes, strict=True) if n in found or n < 8
            )
            for octet, found in octets.items()
        }

    def _probes(self, address: int) -> tuple[tuple[int, dict[int, V]], ...]:
        return self._by_octet.get(address >> (self._bits - 8), self._shorter)

    def candidates(self, address: int) -> Iterator[V]:
        """Values of every stored network containing ``address``, longest prefix first."""
        for shift, table in self._probes(address):
            value = table.get(address >> shift)
            if value is not None:
                yield value

    def longest(self, address: int) -> V | None:
        """The value of the longest stored prefix containing ``address``, if any."""
        for shift, table in self._by_octet.get(address >> (self._bits - 8), self._shorter):
            value = table.get(address >> shift)
            if value is not None:
                return value
        return None

    def __bool__(self) -> bool:
        return bool(self._lengths)
