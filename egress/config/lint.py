"""What ``egress check-config`` (and the proxy at start) warns about: a config that loads but
cannot do what it seems to say.

Every finding is a warning: the file is valid and the proxy runs (exit 0). Errors, which stop
the proxy (exit 2), are the reader's job (:mod:`egress.config.reader`).
"""

from __future__ import annotations

from egress.config.model import Config, RatelimitBackend, RedisErrorPolicy, RuleStore
from rules.lint import dead_address_rules

__all__ = ["warnings_for"]


def warnings_for(config: Config) -> list[str]:
    """One line per finding, naming the key and what to do."""
    found: list[str] = []
    exceptions = config.security.special_exceptions
    sandbox = config.firewall.sandbox_uids
    for index, app in enumerate(config.apps):
        where = f"app[{index}] ({app.name!r})"
        for dead in dead_address_rules(app, exceptions):
            text = (
                f"{where}.allow: rule {dead.rule.text!r} can only match special-purpose"
                f" addresses, {dead.special}, and no [security].allow_special range contains"
                " it, so it never allows a connection"
            )
            if dead.wider_than_opening:
                text += "; an opened range is reached only by rules lying inside it"
            found.append(text)
        for uids in app.uids:
            if not any(s.first <= uids.first and uids.last <= s.last for s in sandbox):
                found.append(
                    f"{where}.uids: {uids} is not (all) inside firewall.sandbox_uids, so the"
                    " firewall does not confine it: its traffic can bypass the proxy"
                )
        if app.limits is not None:
            found.append(
                f"{where}.limits: accepted but not enforced yet (rate limits come with the"
                " ratelimit backends)"
            )
    if config.rules.store is RuleStore.REDIS and (
        config.rules.version or config.rules.revoke_version
    ):
        found.append(
            'rules.version: ignored with rules.store = "redis" (the store keeps its own'
            " version; see `egress rules list`)"
        )
    if config.admin.tokens and config.admin.listen is None:
        found.append(
            "admin.tokens: no admin.listen is set, so no API serves them (set admin.listen)"
        )
    if config.ratelimit.backend is not RatelimitBackend.MEMORY:
        found.append(f"ratelimit.backend: {config.ratelimit.backend.value!r} has no effect yet")
    if config.ratelimit.on_redis_error is not RedisErrorPolicy.LOCAL:
        found.append("ratelimit.on_redis_error: has no effect yet (no Redis rate limiting)")
    return found
