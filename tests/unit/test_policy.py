"""The policy's pure steps around the one await: where addresses are normalised, how a
resolution folds, how a rate-limit answer combines."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

import pytest

from egress.outcomes import DecisionLabel, Outcome
from egress.policy import (
    Lookup,
    Refusal,
    Verdict,
    after_lookup,
    after_lookup_failure,
    combine,
    evaluate,
    first_step,
)
from egress.resolver import Resolution, ResolveError, ResolveFailure
from rules.apps import App, Mode, UidRange
from rules.decide import AppPolicy
from rules.parse import parse_rule
from rules.special import SpecialExceptions


def policy(
    allow: list[str], mode: Mode = Mode.ENFORCE, opened: list[str] | None = None
) -> AppPolicy:
    app = App("blog", (UidRange(10001, 10001),), tuple(parse_rule(r) for r in allow), mode)
    return AppPolicy.compile(app, SpecialExceptions.parse(opened or []))


BLOG = policy(["api.example.com:443", "8.8.8.0/24:53"])


@pytest.mark.parametrize(
    ("literal", "outcome", "dialled"),
    [
        ("8.8.8.8", Outcome.ALLOWED, "8.8.8.8"),
        ("::ffff:8.8.8.8", Outcome.ALLOWED, "8.8.8.8"),  # normalised once, here
        ("::ffff:169.254.169.254", Outcome.SPECIAL_ADDRESS, None),
        ("8.8.4.4", Outcome.NOT_ALLOWED, None),
    ],
)
def test_a_literal_is_decided_at_once_in_its_canonical_form(
    literal: str, outcome: Outcome, dialled: str | None
) -> None:
    verdict = first_step(BLOG, ip_address(literal), 53)
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is outcome
    assert [str(a) for a in verdict.addresses] == ([dialled] if dialled else [])


def test_a_hopeless_name_is_denied_without_a_lookup() -> None:
    verdict = first_step(BLOG, "exfil.attacker.example", 22)
    assert isinstance(verdict, Verdict) and verdict.outcome is Outcome.NOT_ALLOWED


def test_a_name_with_a_rule_needs_a_lookup_then_folds_every_answer() -> None:
    step = first_step(BLOG, "api.example.com", 443)
    assert isinstance(step, Lookup) and step.name_rule is not None
    answers = [ip_address(a) for a in ("10.0.0.1", "::ffff:93.184.216.34", "93.184.216.34")]
    verdict = after_lookup(BLOG, step, answers)
    assert verdict.outcome is Outcome.ALLOWED
    assert verdict.rule == "api.example.com:443"
    assert [str(a) for a in verdict.addresses] == ["93.184.216.34"]
    assert after_lookup(BLOG, step, []).outcome is Outcome.DNS_FAILURE


def test_transparent_names_come_only_from_the_proxys_own_cache() -> None:
    address = ip_address("93.184.216.34")
    assert first_step(BLOG, address, 443).outcome is Outcome.NOT_ALLOWED  # type: ignore[union-attr]
    verdict = first_step(BLOG, address, 443, names_for=lambda _: ["api.example.com"])
    assert isinstance(verdict, Verdict) and verdict.rule == "api.example.com:443"


def test_lookup_failures() -> None:
    timeout = ResolveError("a.example", ResolveFailure.TIMEOUT, "no answer")
    nxdomain = ResolveError("a.example", ResolveFailure.NXDOMAIN, "no such name")
    assert after_lookup_failure(timeout).outcome is Outcome.DNS_TIMEOUT
    assert after_lookup_failure(nxdomain).outcome is Outcome.DNS_FAILURE


@pytest.mark.parametrize(
    ("verdict", "refusal", "outcome", "retry_after"),
    [
        (Verdict(Outcome.ALLOWED, "r"), None, Outcome.ALLOWED, None),
        (
            Verdict(Outcome.ALLOWED, "r"),
            Refusal(Outcome.RATE_LIMITED, "over", 1.5),
            Outcome.RATE_LIMITED,
            1.5,
        ),
        (
            Verdict(Outcome.ALLOWED, "r"),
            Refusal(Outcome.TOO_MANY_CONNECTIONS, "full"),
            Outcome.TOO_MANY_CONNECTIONS,
            None,
        ),
        # report mode is about rules: it is still limited
        (
            Verdict(Outcome.ALLOWED, reported=True, would_deny=Outcome.NOT_ALLOWED),
            Refusal(Outcome.RATE_LIMITED, "over", 2.0),
            Outcome.RATE_LIMITED,
            2.0,
        ),
        # a denial stays the denial, whatever the limits say
        (
            Verdict(Outcome.NOT_ALLOWED),
            Refusal(Outcome.RATE_LIMITED, "over", 9.0),
            Outcome.NOT_ALLOWED,
            None,
        ),
    ],
)
def test_combine_with_a_limit(
    verdict: Verdict, refusal: Refusal | None, outcome: Outcome, retry_after: float | None
) -> None:
    combined = combine(verdict, refusal)
    assert combined.outcome is outcome
    assert combined.retry_after == retry_after
    if refusal is not None and verdict.allowed:
        assert combined.rule == verdict.rule and combined.detail == refusal.detail


def test_decision_and_reason_labels() -> None:
    reported = Verdict(Outcome.ALLOWED, reported=True, would_deny=Outcome.NOT_ALLOWED)
    assert (reported.decision, reported.reason) == (DecisionLabel.REPORTED, Outcome.NOT_ALLOWED)
    assert Verdict(Outcome.SPECIAL_ADDRESS).decision is DecisionLabel.DENIED
    assert Verdict(Outcome.DNS_FAILURE).decision is DecisionLabel.ERROR


def test_evaluate_awaits_only_to_resolve() -> None:
    asked: list[str] = []

    async def resolve(name: str) -> Resolution:
        asked.append(name)
        return Resolution(name, (ip_address("93.184.216.34"),), 30.0, from_cache=False)

    async def main() -> tuple[Verdict, Verdict]:
        named = await evaluate(BLOG, "api.example.com", 443, resolve=resolve)
        hopeless = await evaluate(BLOG, "other.example", 443, resolve=resolve)
        return named, hopeless

    named, hopeless = asyncio.run(main())
    assert asked == ["api.example.com"]
    assert named.outcome is Outcome.ALLOWED
    assert hopeless.outcome is Outcome.NOT_ALLOWED


def test_transparent_names_prefer_an_exact_rule_over_a_wildcard() -> None:
    """Every cached name of an address is looked at: an exact host rule (which may reach an
    opened special range) decides over a wildcard rule that matched another name first."""
    app = policy(["*.cdn.example:443", "db.example.com:443"], opened=["10.8.0.0/16"])
    address = ip_address("10.8.0.9")
    names = ["a.cdn.example", "db.example.com"]  # sorted: the wildcard's name comes first
    verdict = first_step(app, address, 443, names_for=lambda _: names)
    assert isinstance(verdict, Verdict)
    assert (verdict.outcome, verdict.rule) == (Outcome.ALLOWED, "db.example.com:443")
    only_wildcard = first_step(app, address, 443, names_for=lambda _: names[:1])
    assert only_wildcard.outcome is Outcome.SPECIAL_ADDRESS  # type: ignore[union-attr]
