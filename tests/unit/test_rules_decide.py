"""The pure decision: default deny, no DNS for hopeless names, special ranges, report mode."""

from __future__ import annotations

from ipaddress import ip_address
from typing import NamedTuple

import pytest

from rules.decide import (
    AppPolicy,
    Decision,
    Mode,
    Reason,
    decide_address,
    decide_name,
)
from rules.match import CompiledRules
from rules.parse import parse_rule
from rules.special import SpecialExceptions

ALLOW = [
    "api.example.com:443",
    "*.example.org:80,443",
    "8.8.8.0/24:53",
    "[2606:4700::]/32:443",
    "10.8.0.0/16:5432",
    "internal.example.com:443",
    "metadata.example.com:80",
]
RULES = CompiledRules.compile(parse_rule(r) for r in ALLOW)
ENFORCE = AppPolicy(name="blog", mode=Mode.ENFORCE, rules=RULES)
REPORT = AppPolicy(name="blog", mode=Mode.REPORT, rules=RULES)
NO_EXCEPTIONS = SpecialExceptions()
EXCEPTIONS = SpecialExceptions.parse(["10.8.0.0/16"])

# (mode, host, port, must_resolve, name_rule)
NAME_CASES = [
    (Mode.ENFORCE, "api.example.com", 443, True, "api.example.com:443"),
    (Mode.ENFORCE, "www.example.org", 80, True, "*.example.org:80,443"),
    # no name rule, but address rules exist for 53 / 5432: the answers may match them
    (Mode.ENFORCE, "dns.example.net", 53, True, None),
    (Mode.ENFORCE, "db.example.net", 5432, True, None),
    # no name rule and no address rule for the port: never resolved
    (Mode.ENFORCE, "api.example.com", 80, False, None),
    (Mode.ENFORCE, "exfil-data-here.attacker.example", 443, True, None),  # 443 has [2606:4700::]/32
    (Mode.ENFORCE, "exfil-data-here.attacker.example", 22, False, None),
    (Mode.ENFORCE, "example.org", 80, False, None),
    # report mode resolves (the connection goes ahead) but still faces the special check
    (Mode.REPORT, "exfil.attacker.example", 22, True, None),
    (Mode.REPORT, "api.example.com", 443, True, "api.example.com:443"),
]


@pytest.mark.parametrize(("mode", "host", "port", "must_resolve", "rule"), NAME_CASES, ids=str)
def test_decide_name(
    mode: Mode, host: str, port: int, must_resolve: bool, rule: str | None
) -> None:
    app = AppPolicy(name="blog", mode=mode, rules=RULES)
    plan = decide_name(app, host, port)
    assert plan.must_resolve is must_resolve
    assert (plan.name_rule.text if plan.name_rule else None) == rule
    assert plan.decision_if_not == Decision(allowed=False, reason=Reason.NOT_ALLOWED, rule=None)


def test_name_with_no_possible_rule_is_denied_without_resolving() -> None:
    app = AppPolicy(name="a", mode=Mode.ENFORCE, rules=CompiledRules.compile([]))
    plan = decide_name(app, "anything.example", 443)
    assert not plan.must_resolve
    assert not plan.decision_if_not.allowed
    assert plan.decision_if_not.reason is Reason.NOT_ALLOWED


class Case(NamedTuple):
    mode: Mode
    address: str
    port: int
    name_rule: str | None
    exceptions: SpecialExceptions
    allowed: bool
    reason: Reason
    reported: bool = False


E, R = Mode.ENFORCE, Mode.REPORT
NONE, OPEN = NO_EXCEPTIONS, EXCEPTIONS
ALLOWED, NOT_ALLOWED, SPECIAL = Reason.ALLOWED, Reason.NOT_ALLOWED, Reason.SPECIAL_ADDRESS
API, META, INTERNAL = "api.example.com:443", "metadata.example.com:80", "internal.example.com:443"
ADDRESS_CASES = [
    # name rule + public address
    Case(E, "93.184.216.34", 443, API, NONE, True, ALLOWED),
    # a name rule never reaches a special address (DNS rebinding to metadata), in any spelling
    Case(E, "169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(E, "::ffff:169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(E, "::169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(E, "64:ff9b::a9fe:a9fe", 80, META, NONE, False, SPECIAL),
    Case(E, "2002:a9fe:a9fe::1", 80, META, NONE, False, SPECIAL),
    Case(E, "127.0.0.1", 443, API, NONE, False, SPECIAL),
    Case(E, "::1", 443, API, NONE, False, SPECIAL),
    Case(E, "0.0.0.0", 443, API, NONE, False, SPECIAL),
    Case(E, "10.8.1.1", 443, INTERNAL, NONE, False, SPECIAL),
    # ... unless the operator opened that range
    Case(E, "10.8.1.1", 443, INTERNAL, OPEN, True, ALLOWED),
    Case(E, "::ffff:10.8.1.1", 443, INTERNAL, OPEN, True, ALLOWED),
    Case(E, "10.9.1.1", 443, INTERNAL, OPEN, False, SPECIAL),
    # address rules
    Case(E, "8.8.8.8", 53, None, NONE, True, ALLOWED),
    Case(E, "::ffff:8.8.8.8", 53, None, NONE, True, ALLOWED),
    Case(E, "8.8.8.8", 443, None, NONE, False, NOT_ALLOWED),
    Case(E, "8.8.4.4", 53, None, NONE, False, NOT_ALLOWED),
    Case(E, "2606:4700::1111", 443, None, NONE, True, ALLOWED),
    # an exception alone does not allow: an app rule must also cover the address
    Case(E, "10.8.1.1", 5432, None, OPEN, True, ALLOWED),
    Case(E, "10.8.1.1", 5432, None, NONE, False, SPECIAL),
    Case(E, "10.8.1.1", 22, None, OPEN, False, NOT_ALLOWED),
    # report mode lifts app rules only, and flags it
    Case(R, "8.8.4.4", 53, None, NONE, True, NOT_ALLOWED, reported=True),
    Case(R, "8.8.8.8", 53, None, NONE, True, ALLOWED),
    Case(R, "10.8.1.1", 22, None, OPEN, True, NOT_ALLOWED, reported=True),
    # ... never the special-address deny
    Case(R, "169.254.169.254", 80, None, NONE, False, SPECIAL),
    Case(R, "169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(R, "fd00::1", 443, None, NONE, False, SPECIAL),
]


@pytest.mark.parametrize("case", ADDRESS_CASES, ids=lambda c: f"{c.mode}-{c.address}-{c.port}")
def test_decide_address(case: Case) -> None:
    app = AppPolicy(name="blog", mode=case.mode, rules=RULES)
    name_rule = parse_rule(case.name_rule) if case.name_rule else None
    address = ip_address(case.address)
    decision = decide_address(
        app, address, case.port, name_rule=name_rule, exceptions=case.exceptions
    )
    assert decision.allowed is case.allowed
    assert decision.reason is case.reason
    assert decision.reported is case.reported
    if case.reason is ALLOWED:
        by_address = RULES.match_address(address, case.port)
        expected = case.name_rule or (by_address.text if by_address else None)
        assert decision.rule == expected
    else:
        assert decision.rule is None


def test_name_then_address_flow() -> None:
    """The proxy's sequence for a name: plan, resolve, judge each answer."""
    plan = decide_name(ENFORCE, "api.example.com", 443)
    assert plan.must_resolve
    answers = [ip_address("93.184.216.34"), ip_address("10.0.0.5")]
    decisions = [
        decide_address(ENFORCE, a, 443, name_rule=plan.name_rule, exceptions=NO_EXCEPTIONS)
        for a in answers
    ]
    assert decisions == [
        Decision(allowed=True, reason=Reason.ALLOWED, rule="api.example.com:443"),
        Decision(allowed=False, reason=Reason.SPECIAL_ADDRESS, rule=None),
    ]


def test_enums_are_their_wire_strings() -> None:
    assert str(Reason.SPECIAL_ADDRESS) == "special_address"
    assert Mode("report") is Mode.REPORT
