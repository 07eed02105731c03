"""The pure policy decision: may this app reach this destination, and why (not)?

A name is judged twice: :func:`decide_name` before any DNS lookup (so a name that can never be
allowed is never resolved, and the proxy is no DNS exfiltration channel), and
:func:`decide_addresses` for the addresses the proxy would actually connect to (so DNS answers
pointing at special-purpose ranges, e.g. rebinding to 169.254.169.254, are caught).

Special-purpose addresses are denied for every app. An operator may open a range
(``[security].allow_special``), and then it is reachable only by an app whose own rules *name* the
address: an address rule lying inside the opened range that covers it, or an exact host rule. A
wildcard host rule never reaches a special address, a wide address rule (``0.0.0.0/0:8080``, about
the internet) does not either, and report mode never opens one.

Every address given to these functions is already canonical (:func:`rules.special.
effective_address`): the caller normalises each address once, where it enters the policy. A
denial is a normal return value.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from rules.apps import App, Mode
from rules.match import CompiledRules, RulesIndexBuilder
from rules.model import HostExact, Network, Rule
from rules.special import SpecialExceptions, canonical_special_range

__all__ = [
    "AddressDecision",
    "AppCompiler",
    "AppPolicy",
    "Decision",
    "NameAnswerPlan",
    "NamePlan",
    "Reason",
    "decide_address",
    "decide_addresses",
    "decide_answer",
    "decide_dns_name",
    "decide_name",
]

IPAddress = IPv4Address | IPv6Address


class Reason(StrEnum):
    """Why a decision came out as it did; also the metric and log label."""

    ALLOWED = "allowed"
    NOT_ALLOWED = "not_allowed"
    SPECIAL_ADDRESS = "special_address"


@dataclass(frozen=True, slots=True)
class AppPolicy:
    """One app compiled for deciding: its rules indexed, and the subset that may reach opened
    special-purpose ranges. Immutable; a connection keeps this (one app), never a whole
    snapshot."""

    app: App
    rules: CompiledRules
    opened: CompiledRules  # address rules lying inside an opened special-purpose range
    exceptions: SpecialExceptions
    # Shared by every app of one snapshot: callers may remember pure results in it (see
    # egress.policy), keyed by app name; it goes away with the snapshot.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def compile(
        cls, app: App, exceptions: SpecialExceptions, memo: dict[Any, Any] | None = None
    ) -> AppPolicy:
        """Compile ``app`` at once; :class:`AppCompiler` does it a slice of rules at a time."""
        opened = _opened(app.allow, exceptions)
        return cls(
            app,
            CompiledRules.compile(app.allow),
            CompiledRules.compile(opened) if opened else _NO_RULES,
            exceptions,
            memo if memo is not None else {},
        )

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def mode(self) -> Mode:
        return self.app.mode


_NO_RULES: Final = CompiledRules.compile(())


def _opened(rules: Sequence[Rule], exceptions: SpecialExceptions) -> list[Rule]:
    """The address rules lying inside an opened special-purpose range."""
    if not exceptions:
        return []
    contains = exceptions.contains_network
    return [
        rule for rule in rules if isinstance(rule.target, Network) and contains(rule.target.network)
    ]


class AppCompiler:
    """Compiles one app a slice of its rules at a time (:meth:`step`), so that a 100,000-rule
    app can be compiled between the event loop's turns; :meth:`result` once every rule is in.
    The result is what :meth:`AppPolicy.compile` gives."""

    __slots__ = ("_app", "_exceptions", "_memo", "_next", "_opened", "_opened_rules", "_rules")

    def __init__(
        self, app: App, exceptions: SpecialExceptions, memo: dict[Any, Any] | None = None
    ) -> None:
        self._app = app
        self._exceptions = exceptions
        self._memo = memo if memo is not None else {}
        self._rules = RulesIndexBuilder()
        self._opened = RulesIndexBuilder()
        self._opened_rules: list[Rule] = []
        self._next = 0

    @property
    def indexed(self) -> int:
        """How many of the app's rules are indexed so far."""
        return self._next

    @property
    def done(self) -> bool:
        return self._next >= len(self._app.allow)

    def step(self, count: int) -> bool:
        """Index up to ``count`` more rules; True when every rule is indexed."""
        chunk = self._app.allow[self._next : self._next + count]
        self._next += len(chunk)
        self._rules.add(chunk)
        opened = _opened(chunk, self._exceptions)
        if opened:
            self._opened.add(opened)
            self._opened_rules += opened
        return self.done

    def result(self) -> AppPolicy:
        if not self.done:
            raise RuntimeError(f"app {self._app.name!r} is not compiled yet")
        opened = self._opened.finish(tuple(self._opened_rules)) if self._opened_rules else _NO_RULES
        rules = self._rules.finish(self._app.allow)
        return AppPolicy(self._app, rules, opened, self._exceptions, self._memo)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome. ``rule`` is the canonical text of the rule that allowed, if one did.

    ``reported`` is true when report mode let through what enforce mode would deny; then
    ``allowed`` is true and ``reason`` is the reason enforce mode would have given. ``detail``
    says more about a special-purpose denial, for operators.
    """

    allowed: bool
    reason: Reason
    rule: str | None
    reported: bool = False
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class NamePlan:
    """What to do with a name before DNS.

    ``name_rule``: the rule that allows the name itself, if any (pass it on to
    :func:`decide_addresses`). ``must_resolve``: whether resolving can lead to an allowed
    connection; if false, answer ``decision_if_not`` and do not resolve.
    """

    name_rule: Rule | None
    must_resolve: bool
    decision_if_not: Decision


@dataclass(frozen=True, slots=True)
class AddressDecision:
    """The fold over every address of a destination: one decision, and the addresses that may
    be dialled (allowed ones, in the order given, each once)."""

    decision: Decision
    addresses: tuple[IPAddress, ...]


_DENY_NOT_ALLOWED = Decision(allowed=False, reason=Reason.NOT_ALLOWED, rule=None)
_REPORTED_NOT_ALLOWED = Decision(allowed=True, reason=Reason.NOT_ALLOWED, rule=None, reported=True)
_NAME_NOT_ALLOWED = NamePlan(name_rule=None, must_resolve=False, decision_if_not=_DENY_NOT_ALLOWED)
_RESOLVE_FOR_ADDRESSES = NamePlan(
    name_rule=None, must_resolve=True, decision_if_not=_DENY_NOT_ALLOWED
)


@functools.lru_cache(maxsize=4096)
def _allowed_by(rule_text: str) -> Decision:
    """The decision a rule allows with: an immutable value, the same for every connection
    that rule lets through, so made once rather than per connection."""
    return Decision(True, Reason.ALLOWED, rule_text)


@functools.lru_cache(maxsize=1024)
def _special_denial(ip: IPAddress) -> Decision:
    """The denial of a special-purpose address (formatting its range costs ~10 µs, and the same
    few, such as 169.254.169.254, come again and again)."""
    return Decision(
        False, Reason.SPECIAL_ADDRESS, None, detail=f"{ip} is {canonical_special_range(ip)}"
    )


def decide_name(app: AppPolicy, host: str, port: int) -> NamePlan:
    """Judge the canonical name ``host`` on ``port`` before any DNS lookup.

    A name is worth resolving when a name rule allows it, or when the app has address rules for
    the port (the answers might fall in them), or in report mode (the connection goes ahead
    anyway, and its addresses still face the special-purpose check).
    """
    rule = app.rules.match_name(host, port)
    if rule is not None:
        return NamePlan(name_rule=rule, must_resolve=True, decision_if_not=_DENY_NOT_ALLOWED)
    if app.rules.has_address_rules_for_port(port) or app.mode is Mode.REPORT:
        return _RESOLVE_FOR_ADDRESSES
    return _NAME_NOT_ALLOWED


def decide_address(
    app: AppPolicy, ip: IPAddress, port: int, *, name_rule: Rule | None = None
) -> Decision:
    """Judge one canonical address the proxy would connect to (a literal, or one answer).

    ``name_rule`` is the rule that allowed the name the address was resolved from, if any.
    """
    special = canonical_special_range(ip)
    if special is not None:
        if not app.exceptions.covers_canonical(ip):
            return _special_denial(ip)
        if name_rule is not None and isinstance(name_rule.target, HostExact):
            return _allowed_by(name_rule.text)
        rule = app.opened.match_address(ip, port)
        if rule is not None:
            return _allowed_by(rule.text)
        if name_rule is None and app.mode is Mode.ENFORCE and not app.rules.match_address(ip, port):
            return _DENY_NOT_ALLOWED  # opened, but nothing of this app's even covers it
        return Decision(
            False,
            Reason.SPECIAL_ADDRESS,
            None,
            detail=(
                f"{ip} is in an opened special-purpose range, which only a rule naming it"
                " reaches (an address rule inside the range, or an exact host rule); wildcard"
                " rules, wider address rules and report mode never do"
            ),
        )
    rule = name_rule if name_rule is not None else app.rules.match_address(ip, port)
    if rule is not None:
        return _allowed_by(rule.text)
    if app.mode is Mode.REPORT:
        return _REPORTED_NOT_ALLOWED
    return _DENY_NOT_ALLOWED


def _each_once(addresses: tuple[IPAddress, ...]) -> Iterable[IPAddress]:
    """The addresses in order, each once (a few answers: compared, cheaper than hashed)."""
    if len(addresses) > 8:
        return dict.fromkeys(addresses)
    once: list[IPAddress] = []
    for ip in addresses:
        if ip not in once:
            once.append(ip)
    return once


def decide_addresses(
    app: AppPolicy, addresses: Iterable[IPAddress], port: int, *, name_rule: Rule | None = None
) -> AddressDecision | None:
    """Fold :func:`decide_address` over every canonical address of one destination.

    The decision is the first one allowed by a rule, else the first reported one (report mode),
    else the first special-purpose denial (the most useful reason to show), else the first
    denial. ``None`` when there are no addresses at all.
    """
    addresses = tuple(addresses)
    if len(addresses) == 1:  # the usual answer: one address, one decision
        decision = decide_address(app, addresses[0], port, name_rule=name_rule)
        return AddressDecision(decision, addresses if decision.allowed else ())
    allowed: list[IPAddress] = []
    best_allowed: Decision | None = None
    denial: Decision | None = None
    for ip in _each_once(addresses):
        decision = decide_address(app, ip, port, name_rule=name_rule)
        if decision.allowed:
            allowed.append(ip)
            if best_allowed is None or (best_allowed.reported and not decision.reported):
                best_allowed = decision
        elif denial is None or (
            decision.reason is Reason.SPECIAL_ADDRESS
            and denial.reason is not Reason.SPECIAL_ADDRESS
        ):
            denial = decision
    if best_allowed is not None:
        return AddressDecision(best_allowed, tuple(allowed))
    if denial is not None:
        return AddressDecision(denial, ())
    return None


# --- the sandbox DNS listener ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NameAnswerPlan:
    """Whether the DNS listener may answer a name for an app, before any lookup.

    ``rules``: the app's rules naming it (any port). ``decision``: allowed (by the most
    specific of them), reported (report mode, no rule), or denied: then nothing is resolved, so
    a name no rule allows never leaves the node (the listener is no exfiltration channel).
    Address rules do not make names answerable: which name lands in them is unknown until it
    is resolved, and resolving any name on an app's say-so is exactly that channel.
    """

    rules: tuple[Rule, ...]
    decision: Decision

    @property
    def must_resolve(self) -> bool:
        return self.decision.allowed


def decide_dns_name(app: AppPolicy, host: str) -> NameAnswerPlan:
    """Judge the canonical name ``host`` for a DNS answer (A/AAAA) to ``app``."""
    rules = app.rules.name_rules(host)
    if rules:
        return NameAnswerPlan(rules, _allowed_by(rules[0].text))
    if app.mode is Mode.REPORT:
        return NameAnswerPlan((), _REPORTED_NOT_ALLOWED)
    return NameAnswerPlan((), _DENY_NOT_ALLOWED)


def decide_answer(app: AppPolicy, ip: IPAddress, plan: NameAnswerPlan) -> Decision:
    """Whether the canonical address ``ip``, resolved for a name ``plan`` allowed, may be
    handed to the app. A special-purpose address only when its range is opened and a rule
    names it: an exact host rule for the name, or an opened address rule covering it (on any
    port: the connection is judged again, port and all, when the app dials it)."""
    special = canonical_special_range(ip)
    if special is None:
        return plan.decision
    if not app.exceptions.covers_canonical(ip):
        return _special_denial(ip)
    for rule in plan.rules:
        if isinstance(rule.target, HostExact):
            return _allowed_by(rule.text)
    for rule in app.opened.rules:
        if isinstance(rule.target, Network) and ip in rule.target.network:
            return _allowed_by(rule.text)
    return Decision(
        False,
        Reason.SPECIAL_ADDRESS,
        None,
        detail=(
            f"{ip} is in an opened special-purpose range, which only a rule naming it reaches"
            " (an exact host rule, or an address rule inside the range)"
        ),
    )
