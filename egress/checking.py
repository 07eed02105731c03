"""``check APP HOST:PORT``: what the proxy would decide, and why, without connecting.

The CLI (against the store) and the admin API (against the snapshot in force) ask the same
question the proxy asks for every connection: the same compiled policy, the same resolver
limits, the same special-range floor. Nothing is dialed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from egress.outcomes import OUTCOMES, DecisionLabel
from egress.policy import Verdict, evaluate
from egress.resolver import Resolution, Resolver
from rules.addresses import HostSyntaxError, canonical_host
from rules.apps import App
from rules.decide import AppPolicy
from rules.special import SpecialExceptions

__all__ = ["CheckResult", "DestinationError", "check", "parse_destination"]


class DestinationError(ValueError):
    """``HOST:PORT`` that is not one (the message says what is wrong)."""


def parse_destination(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); the host is checked as the proxy checks
    a requested host (strict IP literals, valid names)."""
    if text.startswith("["):
        close = text.find("]")
        host, rest = (text[1:close], text[close + 1 :]) if close > 0 else ("", "")
        if not rest.startswith(":"):
            raise DestinationError(f"{text!r}: write an IPv6 destination as [ADDRESS]:PORT")
        port_text = rest[1:]
        try:
            IPv6Address(host)
        except ValueError:
            raise DestinationError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise DestinationError(f"{text!r}: write the destination as HOST:PORT")
        if ":" in host:
            raise DestinationError(f"{text!r}: put an IPv6 address in brackets: [ADDRESS]:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise DestinationError(f"{text!r}: the port must be a number from 1 to 65535")
    try:
        canonical_host(host)
    except HostSyntaxError as error:
        raise DestinationError(str(error)) from None
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict for one destination, with what explains it."""

    app: str
    host: str
    port: int
    verdict: Verdict
    rules_version: int

    @property
    def allowed(self) -> bool:
        """Whether a connection would go through (report mode lets denials through)."""
        return self.verdict.allowed

    def explain(self) -> str:
        """One line, as an operator reads it: ``denied (not_allowed): no rule matches``."""
        verdict = self.verdict
        if verdict.allowed and verdict.reported:
            text = f"allowed in report mode; enforce mode would deny it ({verdict.reason})"
        elif verdict.allowed:
            text = f"allowed by rule {verdict.rule!r}"
        else:
            # "denied" is the rules saying no; "failed" is no decision (DNS, timeouts).
            word = "denied" if verdict.decision is DecisionLabel.DENIED else "failed"
            text = (
                f"{word} ({verdict.reason}): {verdict.detail or OUTCOMES[verdict.outcome].detail}"
            )
        return text

    def to_data(self) -> dict[str, Any]:
        verdict = self.verdict
        return {
            "app": self.app,
            "destination": f"[{self.host}]:{self.port}"
            if ":" in self.host
            else f"{self.host}:{self.port}",
            "allowed": verdict.allowed,
            "decision": verdict.decision.value,
            "reason": verdict.reason.value,
            "rule": verdict.rule,
            "detail": verdict.detail,
            "addresses": [str(address) for address in verdict.addresses],
            "rules_version": self.rules_version,
            "explanation": self.explain(),
        }


async def check(
    app: App | AppPolicy,
    host: str,
    port: int,
    *,
    resolver: Resolver,
    exceptions: SpecialExceptions | None = None,
    rules_version: int = 0,
    timeout: float = 5.0,
) -> CheckResult:
    """Decide ``host:port`` for ``app`` as a connection would be decided (report mode
    included), resolving names with ``resolver``; bounded by ``timeout``."""
    if isinstance(app, AppPolicy):
        policy = app
    else:
        policy = AppPolicy.compile(app, exceptions or SpecialExceptions.parse([]), {})
    literal = canonical_host(host)
    target: str | IPv4Address | IPv6Address = literal

    async def resolve(name: str) -> Resolution:
        return await resolver.resolve(name)

    deadline = asyncio.get_running_loop().time() + timeout
    verdict = await evaluate(policy, target, port, resolve=resolve, deadline=deadline)
    return CheckResult(policy.app.name, host, port, verdict, rules_version)
