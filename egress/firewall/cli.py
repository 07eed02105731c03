"""``egress firewall sync|status|flush|run``: the controller's command line.

Exit codes: 0 success / in sync; 1 drifted (status) or a pass that failed; 2 a config or
backend error (from the top-level ``egress`` handler).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from egress import oplog, sdnotify
from egress.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    FirewallBackend,
    RuleStore,
    load_config,
)
from egress.errors import EgressError
from egress.firewall.backend import Backend
from egress.firewall.detect import choose_backend
from egress.firewall.metrics import FirewallMetrics
from egress.firewall.plan import FirewallPlan, build_plan
from egress.firewall.sync import SyncResult, flush, status, sync_once
from egress.stores import open_store
from rules.problems import InvalidRuleSetError
from rules.stores.base import RuleStore as Store
from rules.stores.errors import StoreError

__all__ = ["add_firewall_commands"]

_log = logging.getLogger("egress.firewall")


def add_firewall_commands(subparsers: Any) -> None:
    """Add ``firewall`` with its subcommands to the ``egress`` parser's subparsers."""
    firewall = subparsers.add_parser("firewall", help="keep the sandbox firewall in the kernel")
    sub = firewall.add_subparsers(dest="firewall_command", required=True)
    commands = {
        "sync": (_cmd_sync, "one reconcile pass; exit 0 when the kernel matches the plan"),
        "status": (_cmd_status, "desired vs actual and blocked packets per app; exit 1 if drifted"),
        "flush": (_cmd_flush, "remove every rule and chain egress owns (nothing else)"),
        "run": (_cmd_run, "reconcile loop: on config change, SIGHUP and every interval"),
    }
    for name, (handler, text) in commands.items():
        command = sub.add_parser(name, help=text)
        command.add_argument(
            "--config",
            default=DEFAULT_CONFIG_PATH,
            help=f"TOML config file (default: {DEFAULT_CONFIG_PATH})",
        )
        command.add_argument(
            "--backend",
            choices=[b.value for b in FirewallBackend],
            help="override [firewall].backend",
        )
        command.set_defaults(handler=handler)


def _setup(args: argparse.Namespace) -> tuple[Config, FirewallPlan, Backend]:
    config = load_config(args.config)
    if config.rules.store is RuleStore.REDIS:  # the apps (and their uids) live in the store
        config = asyncio.run(_with_store_apps(config))
    plan = build_plan(config)
    backend = choose_backend(args.backend or config.firewall.backend)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config, plan, backend


async def _with_store_apps(config: Config) -> Config:
    store = open_store(config)
    try:
        return await _read_apps(config, store)
    finally:
        await store.aclose()


async def _read_apps(config: Config, store: Store) -> Config:
    """``config`` with the apps the shared store holds now (raises ``EgressError``)."""
    try:
        state = await store.read()
    except (StoreError, InvalidRuleSetError) as error:
        raise EgressError(
            f"cannot read the apps from the rule store {store.name}: {error}"
        ) from error
    return dataclasses.replace(config, ruleset=state.rule_set)


def _describe(result: SyncResult) -> list[str]:
    lines = []
    for table in result.tables:
        if not table.changed:
            continue
        counts: dict[str, int] = {}
        for op in table.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        text = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        drift = f" ({table.drift_repairs} drift repairs)" if table.drift_repairs else ""
        lines.append(f"{table.family} {table.table}: {text}{drift}; {table.rules} rules now")
    return lines


def _cmd_sync(args: argparse.Namespace) -> int:
    _, plan, backend = _setup(args)
    result = sync_once(backend, plan)
    for line in _describe(result) or ["no change: the kernel already matches the plan"]:
        print(line)
    print(f"backend {backend.name}; {result.seconds * 1000:.0f} ms")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    _, plan, backend = _setup(args)
    reports, counters = status(backend, plan)
    print(f"backend {backend.name}")
    for report in reports:
        state = "in sync" if report.in_sync else ("DRIFTED" if report.drift else "DIFFERS")
        print(f"{report.family} {report.table}: {state}, {report.rules} rules")
        if not report.jump_ok:
            print("  OUTPUT jump missing, duplicated or not first")
        for line in report.missing:
            print(f"  missing:    {line}")
        for line, ours in report.unexpected:
            print(f"  unexpected: {line}{'' if ours else '   (not made by egress)'}")
    print("blocked packets per app:")
    for app, packets in sorted(counters.items()):
        print(f"  {app}: {packets}")
    return 0 if all(report.in_sync for report in reports) else 1


def _cmd_flush(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    backend = choose_backend(args.backend or config.firewall.backend)
    results = flush(backend)
    removed = sum(len(r.ops) for r in results)
    print(f"flushed: {removed} changes" if removed else "nothing of ours was installed")
    return 0


# --- run ---------------------------------------------------------------------------------------


def _fingerprint(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    backend = choose_backend(args.backend or config.firewall.backend)
    oplog.configure(config.log.level)
    return asyncio.run(_run(Path(args.config), config, backend))


async def _run(path: Path, config: Config, backend: Backend) -> int:
    """Fail closed: the first pass must succeed before anything else, and SIGTERM leaves the
    rules in place (a stopped controller must not open the sandbox).

    With a shared rule store the apps come from it: the change feed wakes a pass at once, the
    interval is the backstop, and a store that cannot be read keeps the last plan (at start:
    every sandbox uid confined, no app known, until the store answers).

    Under systemd (``Type=notify``) READY=1 follows the first successful pass, so the app
    runtime ordered after the unit starts only with the rules in the kernel; a failed first
    pass exits 1 without it and the unit fails (closed)."""
    store = open_store(config) if config.rules.store is RuleStore.REDIS else None
    try:
        return await _run_with(path, config, backend, store)
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                await store.aclose()


async def _store_plan(
    config: Config, store: Store, metrics: FirewallMetrics
) -> tuple[Config, FirewallPlan] | None:
    try:
        config = await _read_apps(config, store)
    except EgressError as error:
        metrics.record_error("store_error")
        _log.error("rule store unreadable; keeping the last plan", extra={"error": str(error)})
        return None
    return config, build_plan(config)


async def _run_with(path: Path, config: Config, backend: Backend, store: Store | None) -> int:
    notify = sdnotify.notifier()
    metrics = FirewallMetrics()
    plan = build_plan(config)
    store_version = -1
    if store is not None:
        planned = await _store_plan(config, store, metrics)
        if planned is not None:
            config, plan = planned
            store_version = config.ruleset.version
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    metrics.set_backend(backend.name)
    started = time.monotonic()
    try:
        result = await asyncio.to_thread(sync_once, backend, plan)
    except EgressError as error:
        metrics.record_error("error", time.monotonic() - started)
        print(f"egress: first firewall sync failed: {error}", file=sys.stderr)
        return 1
    metrics.record_success(result, time.time())
    _log.info("firewall synced", extra={"changes": "; ".join(_describe(result)) or "none"})

    server: Any = None
    if config.firewall.metrics_listen is not None:
        from prometheus_client import start_http_server  # noqa: PLC0415

        listen = config.firewall.metrics_listen
        server = start_http_server(listen.port, listen.host, registry=metrics.registry)

    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    stop = asyncio.Event()
    feed_hint = asyncio.Event()
    feed = None if store is None else loop.create_task(store.hint_changes(feed_hint))
    loop.add_signal_handler(signal.SIGHUP, wake.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    fingerprint = _fingerprint(path)
    next_pass = time.monotonic() + config.firewall.interval
    # After the signal handlers: a reload the manager sends once we are ready must not kill us.
    notify.ready(f"firewall synced ({backend.name}); {_plan_status(config)}")
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, max(0.0, next_pass - time.monotonic()))):
                    await _first(wake, stop, feed_hint)
            if stop.is_set():
                break
            current = _fingerprint(path)
            hinted = feed_hint.is_set()
            feed_hint.clear()
            interval_due = time.monotonic() >= next_pass
            due = wake.is_set() or current != fingerprint or interval_due or hinted
            if not due:
                continue
            reloading = wake.is_set() or current != fingerprint
            rejected = False
            if reloading:
                notify.reloading("re-reading the config")
                wake.clear()
                fingerprint = current
                try:
                    config = load_config(path)
                    plan = build_plan(config)
                    store_version = -1  # apps from the store again, on the new settings
                except EgressError as error:  # keep the last good plan
                    rejected = True
                    metrics.record_error("config_error")
                    _log.error("firewall config rejected", extra={"error": str(error)})
            if store is not None and (store_version < 0 or hinted or interval_due):
                planned = await _store_plan(config, store, metrics)
                # By content, not version: a store that went back (failover, restore) may
                # hold other apps under a version seen before.
                if planned is not None and (
                    store_version < 0 or planned[0].ruleset.apps != config.ruleset.apps
                ):
                    config, plan = planned
                    store_version = config.ruleset.version
            next_pass = time.monotonic() + config.firewall.interval
            started = time.monotonic()
            try:
                result = await asyncio.to_thread(sync_once, backend, plan)
            except EgressError as error:
                metrics.record_error("error", time.monotonic() - started)
                _log.error("firewall sync failed", extra={"error": str(error)})
                if reloading:
                    notify.ready(
                        "reload: the sync failed; the rules in the kernel stay (see the log)"
                    )
                continue
            metrics.record_success(result, time.time())
            if result.drift_repairs:
                _log.warning("firewall repaired", extra={"changes": "; ".join(_describe(result))})
            elif result.changed:  # a config change applied: not drift
                _log.info("firewall synced", extra={"changes": "; ".join(_describe(result))})
            if reloading:
                notify.ready(
                    "reload: config rejected, the last good plan is in force (see the log)"
                    if rejected
                    else f"firewall synced after reload; {_plan_status(config)}"
                )
        notify.stopping("stopping; the rules stay in the kernel")
    finally:
        if feed is not None:
            feed.cancel()
            with contextlib.suppress(BaseException):
                await feed
        if server is not None:
            with contextlib.suppress(Exception):
                server[0].shutdown()
    return 0  # rules stay installed on purpose


def _plan_status(config: Config) -> str:
    """What the plan confines, for the STATUS= line `systemctl status` shows."""
    uids = ", ".join(str(uids) for uids in config.firewall.sandbox_uids)
    return f"{len(config.ruleset.apps)} apps; sandbox uids {uids}"


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
