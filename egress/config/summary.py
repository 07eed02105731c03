"""The normalised, human summary that ``egress check-config`` prints."""

from __future__ import annotations

from collections.abc import Iterable

from egress.config.model import Config, RatelimitBackend, RuleStore
from rules.apps import Limits, UidRange

# --- the check-config summary ----------------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:g}s"


def _uid_list(uids: Iterable[UidRange]) -> str:
    return ", ".join(str(u) for u in uids) or "none"


def _owner(value: str | int | None) -> str:
    return "-" if value is None else str(value)


def summarize(config: Config) -> str:
    """The normalised, human-readable view ``egress check-config`` prints. No secrets."""
    p = config.proxy
    lines = [f"config: {config.source}", "listeners:"]
    lines += [f"  socks5       {a}" for a in p.socks5_listen]
    lines += [f"  http         {a}" for a in p.http_listen]
    if p.unix_socket is not None:
        lines.append(
            f"  unix socket  {p.unix_socket} (mode {p.unix_socket_mode:04o},"
            f" owner {_owner(p.unix_socket_owner)}, group {_owner(p.unix_socket_group)})"
        )
    if p.transparent_listen is not None:
        lines.append(f"  transparent  {p.transparent_listen}")
    if p.dns_listen is not None:
        lines.append(f"  dns          {p.dns_listen} (UDP and TCP; sandbox A/AAAA by policy)")
    lines.append(
        f"  timeouts: handshake {_s(p.handshake_timeout)}, connect {_s(p.connect_timeout)},"
        f" idle {_s(p.idle_timeout)}, drain {_s(p.drain_timeout)}"
    )
    lines.append(
        f"  max handshake {p.max_handshake_bytes} bytes, max connections {p.max_connections},"
        f" max handshakes per app {p.max_handshakes_per_app}"
    )
    r = config.resolver
    servers = ", ".join(str(ns) for ns in r.nameservers) or "system"
    lines.append(
        f"resolver: {servers}; timeout {_s(r.timeout)} x {r.attempts} attempts;"
        f" ttl {_s(r.min_ttl)}..{_s(r.max_ttl)}, negative {_s(r.negative_ttl)};"
        f" at most {r.max_addresses_per_family} addresses per family,"
        f" cache {r.max_cache_bytes} bytes"
    )
    opened = ", ".join(config.security.allow_special) or "none"
    lines.append(f"security: special-purpose ranges opened: {opened}")
    rules = config.rules
    if rules.store is RuleStore.REDIS:
        lines.append(
            f"rules: store redis at {config.redis.display_url},"
            f" keys {{{rules.redis_prefix}}}:rules:*;"
            f" version check every {rules.check_interval:g}s; audit keeps {rules.audit_max_records}"
        )
    else:
        lines.append(
            f"rules: store file (this file), version {rules.version};"
            f" audit keeps {rules.audit_max_records}"
        )
    rl = config.ratelimit
    if rl.backend is RatelimitBackend.REDIS:
        lines.append(
            f"ratelimit: redis, keys {{{rl.redis_prefix}:<app>}}:rl:*, deadline"
            f" {rl.redis_timeout * 1000:g} ms; on redis error: {rl.on_redis_error}"
            + (f" at {rl.local_share:g} of each rate" if rl.on_redis_error == "local" else "")
            + f"; max_concurrent per {'node' if rl.concurrency == 'node' else 'all nodes'}"
        )
    else:
        lines.append("ratelimit: memory (this node's own buckets)")
    if rl.defaults is not None:
        lines.append(f"ratelimit defaults: {_limits_text(rl.defaults)}")
    lines.append(f"redis: {config.redis.display_url}")
    admin = config.admin
    tokens = ", ".join(f"{t.name} ({t.role})" for t in admin.tokens) or "none"
    lines.append(f"admin: {admin.listen or 'off'}; tokens: {tokens}")
    fw = config.firewall
    lines.append(
        f"firewall: {fw.mode} mode, backend {fw.backend}, every {_s(fw.interval)};"
        f" sandbox uids {_uid_list(fw.sandbox_uids)}"
    )
    sandbox = config.sandbox
    shown_proxy = sandbox.proxy or "the first loopback socks5_listen"
    lines.append(f"sandbox: shim to {shown_proxy}; bind/listen {sandbox.listen}")
    target = "stderr" if config.log.connection_log == "-" else config.log.connection_log
    lines.append(f"log: level {config.log.level}, connections to {target}")
    lines.append(f"apps: {len(config.apps)}")
    for app in config.apps:
        lines.append(f"  {app.name}: uids {_uid_list(app.uids)}; mode {app.mode}")
        lines += [f"    allow {rule.text}" for rule in app.allow]
        if not app.allow:
            lines.append("    allow nothing")
        defaults = config.ratelimit.defaults
        if app.limits is not None or defaults is not None:
            effective = (app.limits or Limits()).over(defaults)
            shown = _limits_text(effective)
            if defaults is not None and effective != app.limits:
                shown += " (with [ratelimit.defaults])"
            lines.append(f"    limits: {shown}")
        if app.proxy_auth is not None:
            lines.append(f"    proxy auth: user {app.proxy_auth.username!r}")
    return "\n".join(lines)


def _limits_text(limits: Limits) -> str:
    parts = []
    if limits.connections_per_second is not None:
        parts.append(f"{limits.connections_per_second:g} connections/s")
    if limits.burst is not None:
        parts.append(f"burst {limits.burst}")
    if limits.max_concurrent is not None:
        parts.append(f"{limits.max_concurrent} concurrent")
    if limits.bandwidth_bytes_per_second is not None:
        parts.append(f"{limits.bandwidth_bytes_per_second} bytes/s")
    if limits.bandwidth_burst_bytes is not None:
        parts.append(f"bandwidth burst {limits.bandwidth_burst_bytes} bytes")
    if limits.destination_connections_per_second is not None:
        parts.append(f"{limits.destination_connections_per_second:g} connections/s per destination")
    if limits.destination_burst is not None:
        parts.append(f"destination burst {limits.destination_burst}")
    return ", ".join(parts) or "none"
