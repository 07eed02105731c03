"""Host canonicalisation and strict IP literals: the address edge-case table."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from rules.addresses import HostSyntaxError, canonical_host, parse_ip_literal, parse_network

# Every way a resolver or inet_aton could read a host as an IPv4 number that is not a strict
# dotted quad. None of these may come back as a name.
ODD_IPV4 = [
    "127.1",
    "127.0.1",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0X7F.0.0.1",
    "2130706433",
    "0x7f000001",
    "127.0.0.01",
    "1.2.3.4.5",
    "017700000001",
    " 127.0.0.1",
    "127.0.0.1 ",
    "127.0.0.1\n",
    "127.0.0.1\x00",
    "127.0.0.1.",
    "+127.0.0.1",
    "127.0.0.+1",
    "256.0.0.1",
    "1.2.3",
    "0",
    "0x",
    "example.0x1f",
    "example.123",
    # full-width digits and dots map to 127.0.0.1 under UTS 46
    "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11",
    "127。0。0。1",  # ideographic full stop is a label separator
    "١٢٧.0.0.1",  # Arabic-Indic digits
]


@pytest.mark.parametrize("text", ODD_IPV4, ids=repr)
def test_odd_ipv4_spellings_are_rejected(text: str) -> None:
    with pytest.raises(HostSyntaxError):
        canonical_host(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM.", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("1password.com", "1password.com"),
        ("localhost", "localhost"),
        ("example.0xg", "example.0xg"),
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "example.com"),  # full-width
        ("127.0.0.1", IPv4Address("127.0.0.1")),
        ("0.0.0.0", IPv4Address("0.0.0.0")),
        ("255.255.255.255", IPv4Address("255.255.255.255")),
        ("[2001:DB8::1]", IPv6Address("2001:db8::1")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
        ("::ffff:169.254.169.254", IPv6Address("::ffff:169.254.169.254")),
        ("[::1]", IPv6Address("::1")),
    ],
    ids=repr,
)
def test_canonical_forms(text: str, expected: object) -> None:
    assert canonical_host(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (".", "no name"),
        ("example..com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("user@example.com", "'@'"),
        ("example.com/path", "'/'"),
        ("example.com:443", "IPv6"),
        ("exa mple.com", "' '"),
        ("example.com\x00", "'\\x00'"),
        ("example\u0085.com", "'\\x85'"),  # C1 control
        ("example\u2028.com", "'\\u2028'"),  # line separator
        ("*.example.com", "label '*'"),
        ("a" * 64 + ".com", "longer than 63"),
        (".".join(["a" * 63] * 4), "longer than 253"),
        ("fe80::1%eth0", "zone"),
        ("[fe80::1%25eth0]", "zone"),
        ("[2001:db8::1", "closing"),
        ("[127.0.0.1]", "not a valid IPv6"),
        ("::ffff:01.2.3.4", "not a valid IPv6"),
        ("a\u202eb.com", "IDNA"),
        ("x" * 2000, "too long"),
    ],
    ids=repr,
)
def test_rejected_hosts_say_why(text: str, fragment: str) -> None:
    with pytest.raises(HostSyntaxError) as info:
        canonical_host(text)
    assert fragment in str(info.value)


def test_error_message_truncates_untrusted_text() -> None:
    with pytest.raises(HostSyntaxError) as info:
        canonical_host("\x00" + "a" * 500)
    assert len(str(info.value)) < 250
    assert "\x00" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", IPv4Address("192.0.2.1")),
        ("[2001:db8::1]", IPv6Address("2001:db8::1")),
        ("example.com", None),
        ("example.com.", None),
        ("localhost", None),
    ],
    ids=repr,
)
def test_parse_ip_literal(text: str, expected: object) -> None:
    assert parse_ip_literal(text) == expected


@pytest.mark.parametrize("text", ["127.1", "0x7f000001", "127.0.0.1.", "1.2.3.4.5", "::g"])
def test_parse_ip_literal_never_calls_a_number_a_name(text: str) -> None:
    with pytest.raises(HostSyntaxError):
        parse_ip_literal(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("10.0.0.1/8", "did you mean '10.0.0.0/8'"),
        ("[2001:db8::1]/32", "did you mean '[2001:db8::]/32'"),
        ("10.0.0.0/33", "0 to 32"),
        ("10.0.0.0/08", "0 to 32"),
        ("10.0.0.0/", "0 to 32"),
        ("127.1/8", "not an IP network"),
        ("example.com/8", "not an IP network"),
    ],
    ids=repr,
)
def test_parse_network_errors(text: str, fragment: str) -> None:
    with pytest.raises(HostSyntaxError) as info:
        parse_network(text)
    assert fragment in str(info.value)
