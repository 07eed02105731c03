"""The pure decision: default deny, no DNS for hopeless names, special ranges, report mode, and
the fold over every address of a destination."""

from __future__ import annotations

from ipaddress import ip_address
from typing import NamedTuple

import pytest

from rules.apps import App, Mode, UidRange
from rules.decide import (
    AppPolicy,
    Decision,
    Reason,
    decide_address,
    decide_addresses,
    decide_name,
)
from rules.parse import parse_rule
from rules.special import SpecialExceptions, effective_address

ALLOW = [
    "api.example.com:443",
    "*.example.org:80,443",
    "8.8.8.0/24:53",
    "[2606:4700::]/32:443",
    "10.8.0.0/16:5432",
    "internal.example.com:443",
    "metadata.example.com:80",
    "0.0.0.0/0:8080",
    "10.0.0.0/8:6379",
]
NO_EXCEPTIONS = SpecialExceptions()
EXCEPTIONS = SpecialExceptions.parse(["10.8.0.0/16"])


def policy(
    mode: Mode = Mode.ENFORCE,
    exceptions: SpecialExceptions = NO_EXCEPTIONS,
    allow: list[str] = ALLOW,
) -> AppPolicy:
    app = App("blog", (UidRange(10001, 10001),), tuple(parse_rule(r) for r in allow), mode)
    return AppPolicy.compile(app, exceptions)


ENFORCE = policy()

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
    plan = decide_name(policy(mode), host, port)
    assert plan.must_resolve is must_resolve
    assert (plan.name_rule.text if plan.name_rule else None) == rule
    assert plan.decision_if_not == Decision(allowed=False, reason=Reason.NOT_ALLOWED, rule=None)


def test_name_with_no_possible_rule_is_denied_without_resolving() -> None:
    plan = decide_name(policy(allow=[]), "anything.example", 443)
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
    rule: str | None = None  # the rule that allowed
    reported: bool = False


E, R = Mode.ENFORCE, Mode.REPORT
NONE, OPEN = NO_EXCEPTIONS, EXCEPTIONS
ALLOWED, NOT_ALLOWED, SPECIAL = Reason.ALLOWED, Reason.NOT_ALLOWED, Reason.SPECIAL_ADDRESS
API, META, INTERNAL = "api.example.com:443", "metadata.example.com:80", "internal.example.com:443"
WILD = "*.example.org:80,443"
ADDRESS_CASES = [
    # name rule + public address
    Case(E, "93.184.216.34", 443, API, NONE, True, ALLOWED, API),
    # a name rule never reaches a special address (DNS rebinding to metadata), in any spelling
    Case(E, "169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(E, "::ffff:169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(E, "::169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(E, "64:ff9b::a9fe:a9fe", 80, META, NONE, False, SPECIAL),
    Case(E, "64:ff9b:1:a9fe:a9:fe00:5db8:d70e", 80, META, NONE, False, SPECIAL),
    Case(E, "2002:a9fe:a9fe::1", 80, META, NONE, False, SPECIAL),
    Case(E, "127.0.0.1", 443, API, NONE, False, SPECIAL),
    Case(E, "::1", 443, API, NONE, False, SPECIAL),
    Case(E, "0.0.0.0", 443, API, NONE, False, SPECIAL),
    Case(E, "10.8.1.1", 443, INTERNAL, NONE, False, SPECIAL),
    # ... unless the operator opened that range: then an exact host rule names it
    Case(E, "10.8.1.1", 443, INTERNAL, OPEN, True, ALLOWED, INTERNAL),
    Case(E, "::ffff:10.8.1.1", 443, INTERNAL, OPEN, True, ALLOWED, INTERNAL),
    Case(E, "10.9.1.1", 443, INTERNAL, OPEN, False, SPECIAL),
    # ... but a wildcard host rule never reaches a special address, opened or not
    Case(E, "10.8.1.1", 443, WILD, OPEN, False, SPECIAL),
    Case(E, "10.8.1.1", 80, WILD, OPEN, False, SPECIAL),
    # address rules
    Case(E, "8.8.8.8", 53, None, NONE, True, ALLOWED, "8.8.8.0/24:53"),
    Case(E, "::ffff:8.8.8.8", 53, None, NONE, True, ALLOWED, "8.8.8.0/24:53"),
    Case(E, "8.8.8.8", 443, None, NONE, False, NOT_ALLOWED),
    Case(E, "8.8.4.4", 53, None, NONE, False, NOT_ALLOWED),
    Case(E, "2606:4700::1111", 443, None, NONE, True, ALLOWED, "[2606:4700::]/32:443"),
    Case(E, "93.184.216.34", 8080, None, NONE, True, ALLOWED, "0.0.0.0/0:8080"),
    # an exception alone does not allow: an app rule inside the opened range must cover it
    Case(E, "10.8.1.1", 5432, None, OPEN, True, ALLOWED, "10.8.0.0/16:5432"),
    Case(E, "10.8.1.1", 5432, None, NONE, False, SPECIAL),
    Case(E, "10.8.1.1", 22, None, OPEN, False, NOT_ALLOWED),  # opened, but nothing covers it
    # a wide address rule is about the internet, not about the platform's database
    Case(E, "10.8.1.1", 8080, None, OPEN, False, SPECIAL),
    Case(E, "10.8.1.1", 6379, None, OPEN, False, SPECIAL),
    # report mode lifts app rules only, and flags it
    Case(R, "8.8.4.4", 53, None, NONE, True, NOT_ALLOWED, reported=True),
    Case(R, "8.8.8.8", 53, None, NONE, True, ALLOWED, "8.8.8.0/24:53"),
    # ... never the special-address deny, and never opens an opened range on its own
    Case(R, "10.8.1.1", 22, None, OPEN, False, SPECIAL),
    Case(R, "169.254.169.254", 80, None, NONE, False, SPECIAL),
    Case(R, "169.254.169.254", 80, META, NONE, False, SPECIAL),
    Case(R, "fd00::1", 443, None, NONE, False, SPECIAL),
    Case(R, "10.8.1.1", 5432, None, OPEN, True, ALLOWED, "10.8.0.0/16:5432"),
]


@pytest.mark.parametrize("case", ADDRESS_CASES, ids=lambda c: f"{c.mode}-{c.address}-{c.port}")
def test_decide_address(case: Case) -> None:
    app = policy(case.mode, case.exceptions)
    name_rule = parse_rule(case.name_rule) if case.name_rule else None
    address = effective_address(ip_address(case.address))  # the caller normalises once
    decision = decide_address(app, address, case.port, name_rule=name_rule)
    assert decision.allowed is case.allowed
    assert decision.reason is case.reason
    assert decision.reported is case.reported
    assert decision.rule == case.rule
    if case.reason is SPECIAL:
        assert decision.detail is not None and str(address) in decision.detail


def test_another_apps_opened_range_rule_does_not_open_it_for_this_app() -> None:
    """allow_special is global; reaching an opened range is per app, by its own rules."""
    owner = policy(exceptions=OPEN, allow=["10.8.0.0/16:5432"])
    other = policy(exceptions=OPEN, allow=["*.attacker.example:5432", "db.example.com:443"])
    address = ip_address("10.8.0.1")
    assert decide_address(owner, address, 5432).allowed
    wildcard = parse_rule("*.attacker.example:5432")
    assert decide_address(other, address, 5432, name_rule=wildcard).reason is SPECIAL
    assert decide_address(other, address, 5432).reason is NOT_ALLOWED
    reporting = policy(Mode.REPORT, OPEN, allow=[])
    assert decide_address(reporting, address, 5432).reason is SPECIAL


class Fold(NamedTuple):
    """One destination's answers through decide_addresses."""

    mode: Mode
    addresses: list[str]
    name_rule: str | None
    exceptions: SpecialExceptions
    reason: Reason | None  # None: no addresses at all
    dialled: list[str]
    rule: str | None = None
    reported: bool = False


FOLD_CASES = [
    # every address allowed: all dialled, in order
    Fold(
        E,
        ["93.184.216.34", "93.184.216.35"],
        API,
        NONE,
        ALLOWED,
        ["93.184.216.34", "93.184.216.35"],
        API,
    ),
    # one special answer among public ones: only the public ones are dialled
    Fold(E, ["10.0.0.5", "93.184.216.34"], API, NONE, ALLOWED, ["93.184.216.34"], API),
    Fold(E, ["93.184.216.34", "169.254.169.254"], API, NONE, ALLOWED, ["93.184.216.34"], API),
    # duplicates (and the mapped spelling of one address) are dialled once
    Fold(
        E,
        ["93.184.216.34", "::ffff:93.184.216.34", "93.184.216.34"],
        API,
        NONE,
        ALLOWED,
        ["93.184.216.34"],
        API,
    ),
    # nothing allowed: the special reason wins over not_allowed, whatever the order
    Fold(E, ["8.8.4.4", "10.0.0.5"], None, NONE, SPECIAL, []),
    Fold(E, ["10.0.0.5", "8.8.4.4"], None, NONE, SPECIAL, []),
    Fold(E, ["8.8.4.4", "8.8.4.5"], None, NONE, NOT_ALLOWED, []),
    # address rules pick the allowed answers of a name with no name rule
    Fold(E, ["8.8.4.4", "8.8.8.8"], None, NONE, ALLOWED, ["8.8.8.8"], "8.8.8.0/24:53"),
    # report mode: a rule-allowed answer is the decision; reported ones are dialled too
    Fold(R, ["8.8.4.4", "8.8.8.8"], None, NONE, ALLOWED, ["8.8.4.4", "8.8.8.8"], "8.8.8.0/24:53"),
    Fold(R, ["8.8.4.4", "10.0.0.5"], None, NONE, NOT_ALLOWED, ["8.8.4.4"], reported=True),
    Fold(R, ["10.0.0.5"], None, NONE, SPECIAL, []),
    # an opened range through an exact host rule, never through a wildcard
    Fold(E, ["10.8.0.9"], INTERNAL, OPEN, ALLOWED, ["10.8.0.9"], INTERNAL),
    Fold(E, ["10.8.0.9", "93.184.216.34"], WILD, OPEN, ALLOWED, ["93.184.216.34"], WILD),
    Fold(E, [], API, NONE, None, []),
]


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: f"{c.mode}-{'+'.join(c.addresses)}")
def test_decide_addresses_folds_every_answer(case: Fold) -> None:
    app = policy(case.mode, case.exceptions)
    name_rule = parse_rule(case.name_rule) if case.name_rule else None
    answers = [effective_address(ip_address(a)) for a in case.addresses]
    folded = decide_addresses(
        app, answers, 53 if case.name_rule is None else _port(case), name_rule=name_rule
    )
    if case.reason is None:
        assert folded is None
        return
    assert folded is not None
    assert folded.decision.reason is case.reason
    assert [str(a) for a in folded.addresses] == case.dialled
    assert folded.decision.allowed is bool(case.dialled)
    assert folded.decision.rule == case.rule
    assert folded.decision.reported is case.reported


def _port(case: Fold) -> int:
    assert case.name_rule is not None
    return parse_rule(case.name_rule).ports.ranges[0][0]


def test_enums_are_their_wire_strings() -> None:
    assert str(Reason.SPECIAL_ADDRESS) == "special_address"
    assert Mode("report") is Mode.REPORT
