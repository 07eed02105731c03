"""The policy as pure steps around one asynchronous step, name resolution.

This is the one place that combines :mod:`rules` (what an app may reach) with :mod:`ratelimit`
(how often), and turns both into a :class:`Verdict` whose ``addresses`` are the only ones the
dialer may use::

    step = first_step(app, host, port)          # pure: a literal is decided here
    if isinstance(step, Lookup):
        resolution = await resolve(step.name)   # the only await
        verdict = after_lookup(app, step, resolution.addresses)   # pure fold
    refusal = await limits.admit(...)           # egress.limits: concurrency, then rates
    verdict = combine(verdict, refusal)         # pure: a limit's refusal, report mode

Addresses are normalised (:func:`rules.special.effective_address`) exactly once, here, where they
enter the policy; everything below works on the canonical form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Final, NamedTuple, cast

from egress.outcomes import OUTCOMES, DecisionLabel, Outcome
from egress.resolver import Resolution, ResolveError, ResolveFailure
from rules.decide import (
    AppPolicy,
    Decision,
    Reason,
    decide_address,
    decide_addresses,
    decide_name,
)
from rules.model import HostExact, Network, Rule
from rules.special import effective_address

__all__ = [
    "Lookup",
    "Refusal",
    "Verdict",
    "after_lookup",
    "after_lookup_failure",
    "combine",
    "decide_again",
    "evaluate",
    "first_step",
]

IPAddress = IPv4Address | IPv6Address
NamesFor = Callable[[IPAddress], Iterable[str]]


class Verdict(NamedTuple):
    """The policy's answer for one request. ``addresses`` are checked and the only ones to dial.

    ``would_deny`` (report mode) is why enforce mode would have denied what was let through;
    ``retry_after`` (seconds) comes with ``rate_limited``. A named tuple rather than a frozen
    dataclass: one is made per connection, and it is built in a third of the time.
    """

    outcome: Outcome
    rule: str | None = None
    addresses: tuple[IPAddress, ...] = ()
    reported: bool = False
    would_deny: Outcome | None = None
    detail: str | None = None
    retry_after: float | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOWED

    @property
    def decision(self) -> DecisionLabel:
        """The metric and log ``decision`` label."""
        if self.reported and self.allowed:
            return DecisionLabel.REPORTED
        return OUTCOMES[self.outcome].decision

    @property
    def reason(self) -> Outcome:
        """The metric and log ``reason``: in report mode, why enforce mode would have denied."""
        return self.would_deny if self.would_deny is not None else self.outcome


class Lookup(NamedTuple):
    """The name must be resolved before it can be decided (see :func:`after_lookup`)."""

    name: str
    port: int
    name_rule: Rule | None


# rules.decide.Reason values are Outcome values; a dict lookup, not Outcome(...), per decision.
_OUTCOME_OF: Final = {reason: Outcome(reason.value) for reason in Reason}


def _verdict(decision: Decision, addresses: tuple[IPAddress, ...] = ()) -> Verdict:
    reason = _OUTCOME_OF[decision.reason]
    if not decision.allowed:
        return Verdict(reason, detail=decision.detail)
    reported = decision.reported
    return Verdict(
        Outcome.ALLOWED, decision.rule, addresses, reported, reason if reported else None
    )


def first_step(
    app: AppPolicy, host: str | IPAddress, port: int, *, names_for: NamesFor | None = None
) -> Verdict | Lookup:
    """Decide what can be decided before DNS. ``host`` went through ``canonical_host``.

    An address is decided at once. ``names_for`` (transparent mode, where the client gives only
    an address) lets a name rule match an address that the proxy itself resolved for that name
    and still has cached; what a client claims about names is never used. A name that no rule
    could allow on ``port`` is denied without a lookup.
    """
    if not isinstance(host, str):
        if names_for is None:
            return _literal_verdict(app, host, port)
        address = effective_address(host)
        name_rule = None
        for name in names_for(address):  # a few names at most (the resolver bounds them)
            rule = app.rules.match_name(name, port)
            if rule is not None and (name_rule is None or isinstance(rule.target, HostExact)):
                name_rule = rule  # an exact host rule, if any, decides: it may reach more
                if isinstance(rule.target, HostExact):
                    break
        return _verdict(decide_address(app, address, port, name_rule=name_rule), (address,))
    plan = decide_name(app, host, port)
    if not plan.must_resolve:
        return _verdict(plan.decision_if_not)
    return Lookup(host, port, plan.name_rule)


def _literal_verdict(app: AppPolicy, host: IPAddress, port: int) -> Verdict:
    """The verdict for an address literal, remembered in the snapshot's memo: a pure function
    of the app's compiled rules, the address and the port, and the same few destinations come
    again and again. The memo lives and dies with the snapshot (a reload starts empty) and is
    bounded; a destination reached through a name is never memoised (DNS answers change)."""
    key = (app.name, host, port)
    memo = app.memo
    verdict = memo.get(key)
    if verdict is None:
        address = effective_address(host)
        verdict = _verdict(decide_address(app, address, port), (address,))
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[key] = verdict
    return cast(Verdict, verdict)


MEMO_ENTRIES = 16384
"""Verdicts for address literals remembered per snapshot, across all apps."""


def after_lookup(app: AppPolicy, lookup: Lookup, addresses: Sequence[IPAddress]) -> Verdict:
    """Fold the decision over every resolved address: dial only the allowed ones."""
    folded = decide_addresses(
        app, (effective_address(a) for a in addresses), lookup.port, name_rule=lookup.name_rule
    )
    if folded is None:
        return Verdict(Outcome.DNS_FAILURE, detail="the name has no addresses")
    return _verdict(folded.decision, folded.addresses)


def decide_again(
    app: AppPolicy,
    host: str | IPAddress,
    port: int,
    addresses: Sequence[IPAddress],
    *,
    allowed_by: str | None,
    names_for: NamesFor | None = None,
) -> Verdict:
    """An allowed connection decided again under new rules (a revoke): ``host`` as it was
    asked for, ``addresses`` the ones it is dialing or was dialed to.

    A name is decided for those addresses (no new lookup). An address asked for in transparent
    mode was allowed through a name rule that the DNS cache tied to it; the cache may have
    expired since, so the rule that allowed it (``allowed_by``) stands in for the cache while
    the app still has it.
    """
    if isinstance(host, str):
        step = first_step(app, host, port)
        if isinstance(step, Lookup):
            return after_lookup(app, step, addresses)
        return step
    if names_for is not None and allowed_by is not None:
        rule = _rules_by_text(app).get(allowed_by)
        if rule is not None and not isinstance(rule.target, Network):
            address = effective_address(host)
            return _verdict(decide_address(app, address, port, name_rule=rule), (address,))
    verdict = first_step(app, host, port, names_for=names_for)
    assert isinstance(verdict, Verdict)  # an address is decided without a lookup
    return verdict


def _rules_by_text(app: AppPolicy) -> dict[str, Rule]:
    """The app's rules by text, made once per snapshot (revokes look rules up by text)."""
    key = ("rules by text", app.app.name)
    found = app.memo.get(key)
    if found is None:
        found = app.memo[key] = {rule.text: rule for rule in app.app.allow}
    return cast(dict[str, Rule], found)


def after_lookup_failure(error: ResolveError) -> Verdict:
    timeout = error.kind is ResolveFailure.TIMEOUT
    return Verdict(Outcome.DNS_TIMEOUT if timeout else Outcome.DNS_FAILURE, detail=str(error))


class Refusal(NamedTuple):
    """Why a connection the rules allow may not go ahead now (a limit, :mod:`egress.limits`)."""

    outcome: Outcome
    detail: str
    retry_after: float | None = None


def combine(verdict: Verdict, refusal: Refusal | None) -> Verdict:
    """Apply a limit's refusal to an allowed verdict (a denial stays what it is). Report mode
    is about rules: an app trying its rules out is still held to its limits."""
    if refusal is None or not verdict.allowed:
        return verdict
    return Verdict(
        refusal.outcome, verdict.rule, detail=refusal.detail, retry_after=refusal.retry_after
    )


async def evaluate(
    app: AppPolicy,
    host: str | IPAddress,
    port: int,
    *,
    resolve: Callable[[str], Awaitable[Resolution]],
    names_for: NamesFor | None = None,
    deadline: float | None = None,
) -> Verdict:
    """The pure steps wired around the one await (``resolve``, which may raise
    :class:`ResolveError`), bounded by ``deadline`` (loop time) when one is given."""
    step = first_step(app, host, port, names_for=names_for)
    if isinstance(step, Lookup):
        try:
            if deadline is None:
                resolution = await resolve(step.name)
            else:
                async with asyncio.timeout_at(deadline):
                    resolution = await resolve(step.name)
        except ResolveError as error:
            return after_lookup_failure(error)
        except TimeoutError:
            return Verdict(Outcome.DNS_TIMEOUT, detail="no DNS answer within the connect deadline")
        step = after_lookup(app, step, resolution.addresses)
    return step
