"""Properties over random input: canonical_host either answers or says HostSyntaxError."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address

from hypothesis import example, given
from hypothesis import strategies as st

from rules.addresses import HostSyntaxError, canonical_host
from rules.parse import RuleSyntaxError, parse_rule
from rules.special import special_range

_HOSTISH = st.text(alphabet="0123456789abcdefxX.:[]%-_* ", max_size=40)


@given(st.one_of(st.text(max_size=300), _HOSTISH))
@example("\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11")
@example("0x7f.1")
@example("[::ffff:127.0.0.1]")
@example("0X-")
def test_canonical_host_returns_a_value_or_host_syntax_error(text: str) -> None:
    try:
        value = canonical_host(text)
    except HostSyntaxError:
        return
    if isinstance(value, str):
        labels = value.split(".")
        # never a number in disguise
        assert not re.fullmatch(r"[0-9]+|0x[0-9a-f]*", labels[-1])
        assert value == value.lower() and value.isascii()
        assert canonical_host(value) == value  # idempotent
    else:
        assert isinstance(value, IPv4Address | IPv6Address)


@given(st.one_of(st.text(max_size=100), _HOSTISH.map(lambda h: h + ":443")))
def test_parse_rule_returns_a_rule_or_rule_syntax_error(text: str) -> None:
    try:
        rule = parse_rule(text)
    except RuleSyntaxError:
        return
    assert parse_rule(rule.text) == rule


@given(st.ip_addresses())
def test_special_range_is_total(address: IPv4Address | IPv6Address) -> None:
    found = special_range(address)
    assert found is None or found.name
