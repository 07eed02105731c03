"""The pure policy decision: may this app reach this destination, and why (not)?

Two steps, because a name is judged twice: :func:`decide_name` before any DNS lookup (so a name
that can never be allowed is never resolved, and the proxy is no DNS exfiltration channel), and
:func:`decide_address` for every address the proxy would actually connect to (so DNS answers
pointing at special-purpose ranges, e.g. rebinding to 169.254.169.254, are caught).

A denial is a normal return value. Report mode relaxes only the app's rules; the special-purpose
deny holds in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address

from rules.match import CompiledRules
from rules.model import Rule
from rules.special import SpecialExceptions, effective_address, special_range

__all__ = [
    "AppPolicy",
    "Decision",
    "Mode",
    "NamePlan",
    "Reason",
    "decide_address",
    "decide_name",
]


class Reason(StrEnum):
    """Why a decision came out as it did; also the metric and log label."""

    ALLOWED = "allowed"
    NOT_ALLOWED = "not_allowed"
    SPECIAL_ADDRESS = "special_address"


class Mode(StrEnum):
    """``enforce`` denies what the rules do not allow; ``report`` lets it through, flagged."""

    ENFORCE = "enforce"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class AppPolicy:
    """One app's compiled rules and mode: an immutable snapshot a connection decides against."""

    name: str
    mode: Mode
    rules: CompiledRules


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome. ``rule`` is the canonical text of the rule that allowed, if one did.

    ``reported`` is true when report mode let through what enforce mode would deny; then
    ``allowed`` is true and ``reason`` is the reason enforce mode would have given.
    """

    allowed: bool
    reason: Reason
    rule: str | None
    reported: bool = False


@dataclass(frozen=True, slots=True)
class NamePlan:
    """What to do with a name before DNS.

    ``name_rule``: the rule that allows the name itself, if any (pass it to
    :func:`decide_address`). ``must_resolve``: whether resolving can lead to an allowed
    connection; if false, answer ``decision_if_not`` and do not resolve. When ``must_resolve``
    is true, ``decision_if_not`` is the answer should no address be left to check.
    """

    name_rule: Rule | None
    must_resolve: bool
    decision_if_not: Decision


_DENY_NOT_ALLOWED = Decision(allowed=False, reason=Reason.NOT_ALLOWED, rule=None)
_DENY_SPECIAL = Decision(allowed=False, reason=Reason.SPECIAL_ADDRESS, rule=None)
_REPORTED_NOT_ALLOWED = Decision(allowed=True, reason=Reason.NOT_ALLOWED, rule=None, reported=True)


def decide_name(app: AppPolicy, host: str, port: int) -> NamePlan:
    """Judge the canonical name ``host`` on ``port`` before any DNS lookup.

    A name is worth resolving when a name rule allows it, or when the app has address rules for
    the port (the answers might fall in them), or in report mode (the connection goes ahead
    anyway, and its addresses still face the special-purpose check).
    """
    rule = app.rules.match_name(host, port)
    if rule is not None:
        return NamePlan(name_rule=rule, must_resolve=True, decision_if_not=_DENY_NOT_ALLOWED)
    could_match = app.rules.has_address_rules_for_port(port) or app.mode is Mode.REPORT
    return NamePlan(name_rule=None, must_resolve=could_match, decision_if_not=_DENY_NOT_ALLOWED)


def decide_address(
    app: AppPolicy,
    ip: IPv4Address | IPv6Address,
    port: int,
    *,
    name_rule: Rule | None,
    exceptions: SpecialExceptions,
) -> Decision:
    """Judge one address the proxy would connect to (a literal, or one answer for a name).

    Allowed when a rule covers it (``name_rule`` from :func:`decide_name`, or an address rule
    for ``ip:port``) and it is not special-purpose, unless ``exceptions`` opens its range.
    """
    ip = effective_address(ip)
    if special_range(ip) is not None and not exceptions.covers(ip):
        return _DENY_SPECIAL
    rule = name_rule if name_rule is not None else app.rules.match_address(ip, port)
    if rule is not None:
        return Decision(allowed=True, reason=Reason.ALLOWED, rule=rule.text)
    if app.mode is Mode.REPORT:
        return _REPORTED_NOT_ALLOWED
    return _DENY_NOT_ALLOWED
