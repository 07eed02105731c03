"""Wiring: build the proxy from a config, run it, reload on SIGHUP, drain on SIGTERM.

Start-up opens everything or nothing: a listener that cannot bind closes the others and the
start fails with one error, without pretending to have served. While running, one task group
owns the background work: the rules holder (following the rule source, compiling snapshots) and
the reload loop. SIGHUP re-reads the config file off the event loop and applies what can be
applied live (rules, ``[security]``, ``[resolver]``, ``[log]``, the per-connection ``[proxy]``
knobs); keys that need a restart are named in the log, and the running config keeps describing
what is actually in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from egress import oplog, sdnotify
from egress.admin.app import build_admin_app
from egress.checking import CheckResult, check
from egress.config import Config, ListenAddress, load_config
from egress.config import RuleStore as StoreKind
from egress.connlog import ConnectionLog
from egress.context import ConnectionContext, ProxySettings
from egress.dnslistener import DnsListener, SandboxDns, open_dns_listener
from egress.dnsnames import AnsweredNames
from egress.errors import ConfigError, EgressError
from egress.gcpolicy import freeze_long_lived, full_collections_deferred
from egress.limits import KeyedRate, build_connection_limits
from egress.metrics import ProxyMetrics
from egress.net.connection import ClientConnection, HttpConnection, ListenerKind, Socks5Connection
from egress.net.dialer import dial
from egress.net.identity import ConnectionOwners, make_tcp_owner_lookup
from egress.net.registry import ConnectionRegistry
from egress.net.transparent import TransparentConnection
from egress.resolver import Resolver, make_resolver
from egress.rulesource import FileRuleSource, SnapshotHolder, StoreRuleSource
from egress.server import ListenerError, Listeners
from egress.stores import open_store
from rules.apps import RuleSet
from rules.edits import UnknownAppError
from rules.snapshot import PolicySnapshot
from rules.stores.base import RuleStore

__all__ = ["ProxyRuntime", "check_proxy_uid", "serve"]

log = logging.getLogger("egress.runtime")

_SWEEP_SECONDS: Final = 30.0
_CONFIG_POLL_SECONDS: Final = 0.5  # file store: how often to look for edits of the config
_FIRST_READ_SECONDS: Final = 5.0  # Redis store: how long start-up waits for the first read

# Keys a running proxy cannot change: they are bound sockets, or features chosen at start.
_RESTART_KEYS: Final = {
    "proxy": (
        "socks5_listen",
        "http_listen",
        "unix_socket",
        "unix_socket_mode",
        "unix_socket_owner",
        "unix_socket_group",
        "transparent_listen",
        "dns_listen",
        "dns_queries_per_second",
        "dns_burst",
    ),
    "admin": ("listen", "tokens"),
    "rules": ("store", "redis_prefix", "check_interval", "audit_log", "audit_max_records"),
    "ratelimit": (
        "backend",
        "redis_timeout",
        "redis_prefix",
        "breaker_failures",
        "breaker_open",
        "concurrency",
        "tunnel_ttl",
    ),
    "redis": ("url",),
}


def check_proxy_uid(config: Config, uid: int) -> None:
    """The firewall confines ``[firewall].sandbox_uids``; a proxy running as one of them would
    have its own upstream connections rejected, so refuse to start rather than fail each one."""
    for uids in config.firewall.sandbox_uids:
        if uids.contains(uid):
            raise EgressError(
                f"{config.source}: firewall.sandbox_uids: the proxy runs as uid {uid}, which is"
                f" inside {uids}; the firewall would reject the proxy's own connections. Run the"
                " proxy as a uid outside the sandbox ranges (or root)."
            )


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed keys that a running proxy cannot apply, as ``section.key``."""
    changed = []
    for section, keys in _RESTART_KEYS.items():
        before, after = getattr(old, section), getattr(new, section)
        changed += [f"{section}.{k}" for k in keys if getattr(before, k) != getattr(after, k)]
    return changed


def _in_force(old: Config, new: Config) -> Config:
    """``new``, with the restart-only keys of ``old``: the config the process now runs."""
    replaced: dict[str, Any] = {}
    for section, keys in _RESTART_KEYS.items():
        kept = {k: getattr(getattr(old, section), k) for k in keys}
        replaced[section] = dataclasses.replace(getattr(new, section), **kept)
    return dataclasses.replace(new, **replaced)


class ProxyRuntime:
    """Everything one proxy process runs: listeners, resolver, rules, admin endpoint."""

    def __init__(self, config: Config, *, loop_name: str = "") -> None:
        self.config = config
        self.metrics = ProxyMetrics(loop=loop_name)
        self.listeners = Listeners()
        self.resolver = make_resolver(config.resolver)
        try:
            self.connlog = ConnectionLog(
                config.log.connection_log, on_dropped=self.metrics.connection_log_dropped.inc
            )
        except OSError as exc:
            raise EgressError(
                f"{config.source}: log.connection_log: cannot open"
                f" {config.log.connection_log}: {exc.strerror or exc}"
            ) from exc
        self.source = FileRuleSource(config.ruleset)
        self._store: RuleStore | None = None
        self.store_source: StoreRuleSource | None = None
        if config.rules.store is StoreKind.REDIS:
            self.store_source = StoreRuleSource(
                self.store, self.metrics, check_interval=config.rules.check_interval
            )
        self.answered = AnsweredNames()  # what the DNS listener told each app
        with full_collections_deferred():  # start() collects once, then freezes
            self.holder = self._new_holder(self.source.latest)
        self.registry = ConnectionRegistry(
            self.metrics,
            max_connections=config.proxy.max_connections,
            max_handshakes_per_app=config.proxy.max_handshakes_per_app,
        )
        self.limits = build_connection_limits(
            config.ratelimit, config.redis.url, self.metrics, self.registry
        )
        self.admin_address: str | None = None
        self.dns_listener: DnsListener | None = None
        self._owners: ConnectionOwners | None = None
        self._context: ConnectionContext | None = None
        self._admin_runner: web.AppRunner | None = None
        self._background: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def store(self) -> RuleStore:
        """The store the admin API edits; with "redis" also where the rules come from."""
        if self._store is None:
            self._store = open_store(self.config)
        return self._store

    def _new_holder(self, rule_set: RuleSet) -> SnapshotHolder:
        holder = SnapshotHolder(
            PolicySnapshot.build(rule_set, self.config.security.special_exceptions),
            self.metrics,
        )
        holder.on_installed = self._rules_installed
        return holder

    def _rules_installed(self, snapshot: PolicySnapshot, revoke: bool) -> None:
        """After a swap: the DNS listener's answers of apps that are gone are let go; with
        ``revoke``, close what the new rules no longer allow."""
        self.answered.forget(app.name for app in snapshot.ruleset.apps)
        if not revoke:
            return
        closed = sum(
            1
            for connection in self.registry.live()
            if isinstance(connection, ClientConnection) and connection.recheck(snapshot)
        )
        log.warning(
            "rules revoked",
            extra={"rules_version": snapshot.version, "tunnels_closed": closed},
        )

    @property
    def context(self) -> ConnectionContext:
        if self._context is None:
            raise RuntimeError("the proxy is not started")
        return self._context

    # --- start and stop -------------------------------------------------------------------------
    async def start(self) -> None:
        """Open every listener and the admin endpoint, or none (raises ``EgressError``)."""
        config = self.config
        check_proxy_uid(config, os.geteuid())
        if self.store_source is not None:
            first = await self.store_source.first(_FIRST_READ_SECONDS)
            if first is not None:
                with full_collections_deferred():
                    self.holder = self._new_holder(first.rule_set)
        else:
            self.metrics.rule_store_up.set(1)
        # The config and the first snapshot stay for a long time; no client is connected yet.
        gc.collect()
        freeze_long_lived(clients_connected=False)
        # Netlink sockets belong to a network namespace: create the lookup where we listen.
        self._owners = ConnectionOwners(make_tcp_owner_lookup())
        self._context = ConnectionContext(
            settings=ProxySettings.from_config(config.proxy),
            resolver=self.resolver,
            metrics=self.metrics,
            connlog=self.connlog,
            identify=self._owners,
            dial=dial,
            rules=self.holder,
            registry=self.registry,
            is_own_listener=self.listeners.is_own_listener,
            limits=self.limits,
            answered=self.answered,
        )
        try:
            await self.listeners.open(config.proxy, self._protocol_for)
            if config.proxy.dns_listen is not None:
                await self._start_dns(config.proxy.dns_listen)
            if config.admin.listen is not None:
                await self._start_admin()
        except BaseException:
            await self._release_resources()
            raise
        self.metrics.last_reload_success.set(time.time())
        self._background = asyncio.get_running_loop().create_task(
            self._run_background(), name="egress background"
        )
        for bound in self.listeners.bound:
            log.info("listening", extra={"listener": bound.kind.value, "address": bound.address})
        if self.dns_listener is not None:
            log.info("listening", extra={"listener": "dns", "address": self.dns_listener.address})
        log.info(
            "proxy started",
            extra={
                "listeners": ", ".join(
                    [f"{b.kind}={b.address}" for b in self.listeners.bound]
                    + ([f"dns={self.dns_listener.address}"] if self.dns_listener else [])
                ),
                "apps": len(self.holder.current.ruleset),
                "rules_store": config.rules.store.value,
                "rules_version": self.holder.current.version,
                "ratelimit": config.ratelimit.backend.value,
                "admin": self.admin_address,
            },
        )

    async def _start_dns(self, listen: ListenAddress) -> None:
        assert self._owners is not None
        handler = SandboxDns(
            rules=self.holder,
            resolve=self.context.resolve,
            metrics=self.metrics,
            connlog=self.connlog,
            answered=self.answered,
            rate=KeyedRate(self.config.proxy.dns_queries_per_second, self.config.proxy.dns_burst),
        )
        self.dns_listener = await open_dns_listener(listen, handler, self._owners)

    def _protocol_for(self, kind: ListenerKind) -> asyncio.Protocol:
        context = self.context
        if kind is ListenerKind.HTTP:
            return HttpConnection(context)
        if kind is ListenerKind.TRANSPARENT:
            return TransparentConnection(context)
        return Socks5Connection(context, kind)

    async def _start_admin(self) -> None:
        assert self.config.admin.listen is not None
        listen = self.config.admin.listen
        app = build_admin_app(
            self.metrics,
            ready=self.ready,
            store=self.store,
            tokens=self.config.admin.tokens,
            checker=self._check,
            store_ready=self._store_answers,
            limiter_mode=self.limits.describe_mode,
        )
        self._admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, listen.host, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ListenerError(f"admin.listen: cannot listen on {listen}: {exc.strerror}") from exc
        host, port = self._admin_runner.addresses[0][:2]
        self.admin_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _run_background(self) -> None:
        """The task group that owns the rules holder and the reload loop."""
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.holder.run(), name="rules compile"),
                group.create_task(self._reload_loop(), name="config reload"),
                group.create_task(self._sweep_loop(), name="resolver sweep"),
                group.create_task(self.limits.watch(), name="rate limiter probe"),
            ]
            if self.store_source is not None:  # the shared store, through its change feed
                tasks.append(group.create_task(self.holder.follow(self.store_source), name="rules"))
            else:  # the config file: reloads publish into self.source
                tasks.append(group.create_task(self.holder.follow(self.source), name="rules"))
                tasks.append(group.create_task(self._watch_config(), name="config watch"))
            await self._closing.wait()
            for task in tasks:
                task.cancel()

    def ready(self) -> bool:
        """Accepting, with rules loaded (from a shared store: read at least once)."""
        loaded = self.store_source is None or self.store_source.loaded
        return self._context is not None and not self.registry.draining and loaded

    async def _store_answers(self) -> bool:
        """For /readyz: the shared store answered its last check and holds rules (the file
        store: always)."""
        source = self.store_source
        return source is None or (source.reachable and not source.empty)

    async def _check(self, app: str, host: str, port: int) -> CheckResult:
        """``/v1/apps/{name}/check``: the rules in force here, the proxy's resolver."""
        snapshot = self.holder.current
        policy = snapshot.apps.get(app)
        if policy is None:
            raise UnknownAppError(app)
        timeout = self.context.settings.connect_timeout
        return await check(
            policy,
            host,
            port,
            resolver=self.resolver,
            rules_version=snapshot.version,
            timeout=timeout,
        )

    async def _watch_config(self) -> None:
        """File store: an edit of the config file (by `egress rules`, the admin API or an
        editor) is reloaded like a SIGHUP, without one."""
        path = self.config.source
        seen = _file_identity(path)
        while True:
            await asyncio.sleep(_CONFIG_POLL_SECONDS)
            current = _file_identity(path)
            if current != seen:
                seen = current
                log.info("config file changed, reloading", extra={"path": str(path)})
                self.request_reload()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    async def wait(self) -> None:
        """Until a stop is requested; raises if the background work failed (a bug)."""
        assert self._background is not None
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({stop, self._background}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._background.done():
            self._background.result()  # raises what it failed with
            raise EgressError("the proxy's background tasks stopped")

    async def aclose(self) -> None:
        """Drain tunnels, then close the admin listener, the resolver and the log."""
        self._closing.set()
        if self._background is not None:
            with contextlib.suppress(Exception):
                await self._background
        log.info("draining", extra={"open": len(self.registry)})
        self.listeners.stop_accepting()
        await self.registry.drain(self.context.settings.drain_timeout)
        await self._release_resources()
        log.info("proxy stopped")

    async def _release_resources(self) -> None:
        self.holder.on_installed = None  # a cycle through the runtime, frozen at start
        await self.listeners.close()
        if self.dns_listener is not None:
            await self.dns_listener.aclose()
            self.dns_listener = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await self.resolver.aclose()
        with contextlib.suppress(Exception):
            await self.limits.aclose()
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.aclose()
        self.connlog.close()
        if self._owners is not None:
            self._owners.close()
            self._owners = None

    async def _sweep_loop(self) -> None:
        """Drop expired DNS answers while nobody resolves (resolving expires them too)."""
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            self.resolver.sweep()
            self.answered.sweep()

    # --- reload ---------------------------------------------------------------------------------
    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file (off the event loop) and apply it; a bad file changes
        nothing. Also reopens the connection log file (the logrotate convention). One at a
        time: a SIGHUP, the config watcher and a caller may ask at once, and two reads
        versioned against the same rules would both claim the next version."""
        async with self._reload_lock:
            # Under systemd the unit shows "reloading" until READY=1 says the reload finished
            # (applied or rejected), whoever asked for it: a SIGHUP or an edit of the file.
            notify = sdnotify.notifier()
            notify.reloading("reloading the config")
            applied = await self._reload()
            notify.ready(
                f"config reloaded; rules version {self.holder.current.version}"
                if applied
                else "reload failed; the previous config stays in force (see the log)"
            )
            return applied

    async def _reload(self) -> bool:
        self.connlog.reopen()
        with full_collections_deferred():
            try:
                new, rules = await asyncio.to_thread(self._read, self.config.source)
            except ConfigError as exc:
                self.metrics.reload(ok=False)
                log.error(
                    "reload rejected, keeping the previous config",
                    extra={"problems": [str(p) for p in exc.problems]},
                )
                return False
            except Exception as exc:  # a bug must not take the running proxy down
                self.metrics.reload(ok=False)
                log.exception(
                    "reload failed, keeping the previous config", extra={"error": repr(exc)[:300]}
                )
                return False
            revoke, committed_at = False, None
            if rules is not None:
                revoke, committed_at = await self._file_edits(self.config, new)
            try:
                self.apply(new, rules, revoke=revoke, committed_at=committed_at)
            except Exception as exc:
                self.metrics.reload(ok=False)
                log.exception("applying the reloaded config failed", extra={"error": repr(exc)})
                return False
            if rules is not None:
                await self.holder.wait_for_version(rules.version)
            await self.holder.wait_idle()
        return True

    async def _file_edits(self, old: Config, new: Config) -> tuple[bool, float | None]:
        """What the file store says of the edits between two reads of the file: whether one
        asked for revoke (``[rules].revoke_version``, written with the edit itself), and when
        the newest was committed (its audit trail; advisory)."""
        first, last = old.rules.version, new.rules.version
        if last <= first:
            return False, None  # a hand edit: no commit of the store
        revoke = new.rules.revoke_version > first
        try:
            records = await self.store.history(limit=1)
        except Exception as exc:  # the trail is advisory here; the rules still apply
            log.warning("cannot read the rules audit trail", extra={"error": str(exc)[:300]})
            return revoke, None
        newest = records[0] if records and first < records[0].version <= last else None
        return revoke, None if newest is None else newest.at

    def _read(self, path: Path) -> tuple[Config, RuleSet | None]:
        """Off the event loop: read and check the file, and version its rules if they changed
        (comparing 10,000 apps is work the loop should not do)."""
        new = load_config(path)
        if self.store_source is not None:
            return new, None  # the rules live in the shared store, not in this file
        security_changed = new.security.allow_special != self.config.security.allow_special
        return new, self.source.prepare(new.ruleset, always=security_changed)

    def apply(
        self,
        new: Config,
        rules: RuleSet | None = None,
        *,
        revoke: bool = False,
        committed_at: float | None = None,
    ) -> None:
        """Apply a checked config to the running proxy; ``rules`` is its rule set as
        :meth:`FileRuleSource.prepare` versioned it (``None``: unchanged); ``revoke``: close
        the tunnels it no longer allows."""
        old = self.config
        pending = restart_needed(old, new)
        if pending:
            log.warning(
                "some changed settings take effect only after a restart",
                extra={"keys": ", ".join(pending)},
            )
        context = self.context
        context.settings = ProxySettings.from_config(new.proxy)
        self.registry.max_connections = new.proxy.max_connections
        self.registry.max_handshakes_per_app = new.proxy.max_handshakes_per_app
        if new.resolver != old.resolver:
            self._replace_resolver(make_resolver(new.resolver), old.resolver.timeout)
        if new.log.level != old.log.level:
            oplog.set_level(new.log.level)
        if new.log.connection_log != old.log.connection_log:
            self.connlog.reopen(new.log.connection_log)
        self.holder.set_exceptions(new.security.special_exceptions)
        self.limits.reconfigure(new.ratelimit)
        if rules is not None:
            self.source.publish(rules, revoke=revoke, committed_at=committed_at)
        self.config = _in_force(old, new)
        self.metrics.reload(ok=True)
        log.info(
            "config reloaded",
            extra={"apps": len(new.apps), "restart_needed": ", ".join(pending) or None},
        )

    def _replace_resolver(self, resolver: Resolver, old_timeout: float) -> None:
        """New lookups use the new resolver; the old one finishes its lookups, then closes."""
        old = self.resolver
        self.resolver = resolver
        self.context.resolver = resolver

        async def retire() -> None:
            try:
                await asyncio.sleep(old_timeout + 1.0)
            finally:
                await old.aclose()

        task = asyncio.get_running_loop().create_task(retire(), name="retire resolver")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _serving_status(runtime: ProxyRuntime) -> str:
    """The STATUS= line of a ready proxy: what `systemctl status` shows."""
    listening = [f"{bound.kind.value}={bound.address}" for bound in runtime.listeners.bound]
    if runtime.dns_listener is not None:
        listening.append(f"dns={runtime.dns_listener.address}")
    if runtime.admin_address is not None:
        listening.append(f"admin={runtime.admin_address}")
    return (
        f"serving {' '.join(listening) or 'no listeners'};"
        f" rules version {runtime.holder.current.version}"
    )


async def serve(config: Config, *, loop_name: str = "") -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. The handlers are in place from before the
    start to after the drain, so a logrotate HUP in either never kills the process.

    Under systemd (``Type=notify``): READY=1 once every listener and the admin endpoint
    accept, so the app runtime ordered after the unit never finds them closed; STOPPING=1
    when the drain begins."""
    notify = sdnotify.notifier()  # first: takes NOTIFY_SOCKET out of the environment
    runtime = ProxyRuntime(config, loop_name=loop_name)
    loop = asyncio.get_running_loop()
    handlers = (
        (signal.SIGHUP, runtime.request_reload),
        (signal.SIGTERM, runtime.request_stop),
        (signal.SIGINT, runtime.request_stop),
    )
    for sig, handler in handlers:
        loop.add_signal_handler(sig, handler)
    try:
        await runtime.start()
        notify.ready(_serving_status(runtime))
        try:
            await runtime.wait()
        finally:
            notify.stopping(f"draining {len(runtime.registry)} connections")
            await runtime.aclose()
    finally:
        for sig, _ in handlers:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
