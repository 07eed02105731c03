"""What ``egress check-config`` (and the proxy at start) warns about: a config that loads but
cannot do what it seems to say.

Every finding is a warning: the file is valid and the proxy runs (exit 0). Errors, which stop
the proxy (exit 2), are the reader's job (:mod:`egress.config.reader`).
"""

from __future__ import annotations

from typing import Final

from egress.config.model import (
    Config,
    FirewallMode,
    RatelimitBackend,
    RedisErrorPolicy,
    RuleStore,
)
from rules.apps import Limits
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
            found += _idle_limit_keys(f"{where}.limits", app.limits, config.ratelimit.defaults)
    if config.rules.store is RuleStore.REDIS and (
        config.rules.version or config.rules.revoke_version
    ):
        found.append(
            'rules.version: ignored with rules.store = "redis" (the store keeps its own'
            " version; see `egress rules list`)"
        )
    if config.proxy.dns_listen is not None and config.firewall.mode is not FirewallMode.TRANSPARENT:
        found.append(
            "proxy.dns_listen: the firewall redirects sandbox DNS to it only in transparent"
            ' mode (firewall.mode = "explicit" here); programs must be pointed at it by hand'
        )
    elif config.proxy.dns_listen is not None and config.proxy.dns_listen.port >= 1024:
        found.append(
            f"proxy.dns_listen: port {config.proxy.dns_listen.port} is one any user may bind:"
            " while the proxy is down, a sandbox app could bind it and read the DNS questions"
            " the firewall redirects there from other apps; use a port below 1024, e.g."
            ' "127.0.0.153:53" (the proxy then needs CAP_NET_BIND_SERVICE)'
        )
    elif config.firewall.mode is FirewallMode.TRANSPARENT and config.proxy.dns_listen is None:
        found.append(
            'firewall.mode: "transparent" without proxy.dns_listen: sandboxed programs cannot'
            " resolve names (their DNS is rejected), so hostname rules match only for Python"
            " apps using the shim; set proxy.dns_listen"
        )
    if config.admin.tokens and config.admin.listen is None:
        found.append(
            "admin.tokens: no admin.listen is set, so no API serves them (set admin.listen)"
        )
    ratelimit = config.ratelimit
    if ratelimit.defaults is not None:
        found += [
            text
            for text in _idle_limit_keys("ratelimit.defaults", ratelimit.defaults, None)
            if not _some_app_sets(config, text.rsplit(" ", 1)[1])
        ]
    fallback_set = ratelimit.on_redis_error is not RedisErrorPolicy.LOCAL or (
        ratelimit.local_share != 1
    )
    if ratelimit.backend is RatelimitBackend.MEMORY and fallback_set:
        found.append(
            "ratelimit.on_redis_error, ratelimit.local_share: no effect with backend ="
            ' "memory" (nothing is shared, nothing can fail)'
        )
    return found


# A burst without its rate limits nothing.
_BURST_OF: Final = {
    "burst": "connections_per_second",
    "destination_burst": "destination_connections_per_second",
    "bandwidth_burst_bytes": "bandwidth_bytes_per_second",
}


def _some_app_sets(config: Config, key: str) -> bool:
    return any(
        app.limits is not None and getattr(app.limits, key) is not None for app in config.apps
    )


def _idle_limit_keys(where: str, limits: Limits, defaults: Limits | None) -> list[str]:
    """Bursts with no rate, in the app's own limits or in ``[ratelimit.defaults]``."""

    def rate_of(key: str) -> object:
        own = getattr(limits, key)
        return own if own is not None or defaults is None else getattr(defaults, key)

    return [
        f"{where}.{burst}: has no effect without {rate}"
        for burst, rate in _BURST_OF.items()
        if getattr(limits, burst) is not None and rate_of(rate) is None
    ]
