"""Policy wiring: the one place that combines rules, the resolver and (later) rate limits.

``rules.decide`` stays pure; this module adds the only asynchronous step, name resolution, and
turns everything into a :class:`Verdict` whose ``addresses`` are the only ones the dialer may use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from egress.config import AppConfig, Config
from egress.metrics import ProxyMetrics
from egress.outcomes import Outcome
from egress.resolver import ResolveError, ResolveFailure, Resolver
from rules.decide import AppPolicy, Decision, Reason, decide_address, decide_name
from rules.match import CompiledRules
from rules.special import SpecialExceptions, effective_address

IPAddress = IPv4Address | IPv6Address

_REASON_TO_OUTCOME = {
    Reason.ALLOWED: Outcome.ALLOWED,
    Reason.NOT_ALLOWED: Outcome.NOT_ALLOWED,
    Reason.SPECIAL_ADDRESS: Outcome.SPECIAL_ADDRESS,
}
_RESOLVE_TO_OUTCOME = {
    ResolveFailure.TIMEOUT: Outcome.DNS_TIMEOUT,
}


@dataclass(frozen=True, slots=True)
class AppRuntime:
    """An app as the proxy uses it: its config and its compiled policy."""

    config: AppConfig
    policy: AppPolicy

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's answer for one request. ``addresses`` are checked and the only ones to dial."""

    allowed: bool
    outcome: Outcome
    rule: str | None
    reported: bool = False
    addresses: tuple[IPAddress, ...] = ()
    detail: str | None = None
    would_deny: Outcome | None = None  # report mode: why enforce mode would have denied it

    @property
    def decision(self) -> str:
        """The metric/log ``decision`` label: allowed, denied or reported."""
        if not self.allowed:
            return "denied"
        return "reported" if self.reported else "allowed"


class PolicySnapshot:
    """An immutable view of the apps and exceptions; replaced whole on reload."""

    __slots__ = ("apps", "config", "exceptions")

    def __init__(self, config: Config) -> None:
        self.config = config
        self.exceptions: SpecialExceptions = config.security.special_exceptions
        self.apps: Mapping[str, AppRuntime] = {
            app.name: AppRuntime(
                app, AppPolicy(name=app.name, mode=app.mode, rules=CompiledRules.compile(app.allow))
            )
            for app in config.apps
        }

    def app_for_uid(self, uid: int) -> AppRuntime | None:
        app = self.config.app_for_uid(uid)
        return None if app is None else self.apps[app.name]


def _from_decision(decision: Decision, addresses: tuple[IPAddress, ...] = ()) -> Verdict:
    return Verdict(
        allowed=decision.allowed,
        outcome=_REASON_TO_OUTCOME[decision.reason] if not decision.allowed else Outcome.ALLOWED,
        rule=decision.rule,
        reported=decision.reported,
        addresses=addresses if decision.allowed else (),
        would_deny=_REASON_TO_OUTCOME[decision.reason] if decision.reported else None,
    )


async def evaluate(
    snapshot: PolicySnapshot,
    app: AppRuntime,
    host: str | IPAddress,
    port: int,
    *,
    resolver: Resolver,
    metrics: ProxyMetrics,
    names_from_cache: bool = False,
) -> Verdict:
    """Decide one request; ``host`` already went through ``rules.addresses.canonical_host``.

    ``names_from_cache`` (transparent mode, where the client only gives an address) lets a
    name rule match an address that the proxy itself resolved for that name and still has in
    its cache; what the client claims about names is never used.
    """
    if not isinstance(host, str):
        address = effective_address(host)
        name_rule = None
        if names_from_cache:
            for name in resolver.cached_names_for(address):
                name_rule = app.policy.rules.match_name(name, port)
                if name_rule is not None:
                    break
        decision = decide_address(
            app.policy, address, port, name_rule=name_rule, exceptions=snapshot.exceptions
        )
        return _from_decision(decision, (address,))

    plan = decide_name(app.policy, host, port)
    if not plan.must_resolve:
        return _from_decision(plan.decision_if_not)

    started = time.perf_counter()
    try:
        resolution = await resolver.resolve(host)
    except ResolveError as exc:
        metrics.dns_seconds.observe(time.perf_counter() - started)
        metrics.dns_lookup(str(exc.kind))
        return Verdict(
            allowed=False,
            outcome=_RESOLVE_TO_OUTCOME.get(exc.kind, Outcome.DNS_FAILURE),
            rule=None,
            detail=str(exc),
        )
    metrics.dns_seconds.observe(time.perf_counter() - started)
    metrics.dns_lookup("cached" if resolution.from_cache else "ok")

    allowed: list[IPAddress] = []
    first_allowed: Decision | None = None
    first_denied: Decision | None = None
    for raw in resolution.addresses:
        address = effective_address(raw)
        decision = decide_address(
            app.policy, address, port, name_rule=plan.name_rule, exceptions=snapshot.exceptions
        )
        if decision.allowed:
            if address not in allowed:
                allowed.append(address)
            if first_allowed is None:
                first_allowed = decision
        elif first_denied is None or decision.reason is Reason.SPECIAL_ADDRESS:
            first_denied = decision
    if first_allowed is not None:
        return _from_decision(first_allowed, tuple(allowed))
    if first_denied is not None:
        return _from_decision(first_denied)
    return Verdict(allowed=False, outcome=Outcome.DNS_FAILURE, rule=None, detail="no addresses")
