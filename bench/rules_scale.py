#!/usr/bin/env python3
"""Scale targets of the rule store, measured: big apps, many apps, one-app edits.

Run from the repository root (no root needed, no network; about a minute on 2 cores):

    .venv/bin/python bench/rules_scale.py [--rules 100000] [--apps 10000] [--runs 3]

Targets (from the rule-store issue), each printed next to its measurement:

* an app with 100,000 rules (IPv4 and IPv6 CIDRs, single addresses, exact hosts, wildcards,
  port lists and ranges, one host with a rule per port) compiles in <= 1 s;
* a decision for it takes <= 10 µs;
* 10,000 apps (3 to 5 rules each, as ``rules_compile_lag.py`` writes them) are read and
  compiled at proxy start in <= 3 s;
* a change to one app does not recompile the others.

Sections, each with its same-run baseline where one makes sense:

``(a) one app, --rules rules``
    ``RuleSet.from_data`` (the reader the config file and the stores use; parse caches
    emptied first, as in a fresh process) once, then ``PolicySnapshot.build`` median of
    ``--runs``; then the same app read again (equal rules, new objects) and built with
    ``previous=`` (what a reload of an unchanged app costs: the rules are compared).
``(b) decisions``
    µs per call (best of 3 rounds), for a 10-rule app (the baseline: same rule kinds) and the
    big app, through ``rules.decide`` and through ``egress.policy.first_step`` (+
    ``after_lookup`` for names, one answer) as the proxy calls them. Literals are measured
    both the first time (the snapshot's memo emptied before each pass over 512 distinct
    addresses) and repeated (the memo answers).
``(c) --apps apps``
    read (``RuleSet.from_data``, caches emptied) + compile (``PolicySnapshot.build``), median
    of ``--runs``, as it is done at start (with the collector as it is), and again with full
    collections deferred (``egress.gcpolicy``, what the holder does for a reload); then one
    app edited (``rules.edits.AddRules``, as a store commits it):
    built with ``previous=`` (reuse) against a full recompile (the baseline), and the whole set
    read again from data (equal apps, new objects) built with ``previous=``.
``(d) loop lag``
    the event loop's lag (a task sleeping 1 ms in a loop; see ``rules_compile_lag.py``, whose
    heartbeat, phase and report code this uses) while a running ``SnapshotHolder`` installs
    what is offered: ``b`` is the baseline, the big app compiled on the loop at once.

Every loop is bounded (the heartbeat by count and time, each phase by a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from rules_compile_lag import (  # noqa: E402
    GcRecorder,
    PhaseResult,
    app_rules,
    fmt,
    loop_factories,
    measure,
    ms_since,
    report,
    running,
    table,
)

from egress.gcpolicy import full_collections_deferred  # noqa: E402
from egress.metrics import ProxyMetrics  # noqa: E402
from egress.policy import Lookup, first_step  # noqa: E402
from egress.policy import after_lookup as policy_after_lookup  # noqa: E402
from egress.rulesource import SnapshotHolder  # noqa: E402
from rules import apps as rule_apps  # noqa: E402
from rules import parse as rule_parse  # noqa: E402
from rules.apps import RuleSet  # noqa: E402
from rules.decide import AppPolicy, decide_address, decide_addresses, decide_name  # noqa: E402
from rules.edits import AddRules, apply_edit  # noqa: E402
from rules.parse import parse_rule  # noqa: E402
from rules.snapshot import PolicySnapshot, SnapshotBuilder  # noqa: E402
from rules.special import SpecialExceptions  # noqa: E402

EXCEPTIONS = SpecialExceptions.parse(["10.0.0.0/8"])
CALLS = 20_000  # per round of a decision case
IPAddress = IPv4Address | IPv6Address
T = TypeVar("T")


# --------------------------------------------------------------------------- rule sets


def mixed_rules(count: int) -> list[str]:
    """``count`` rules of every kind, the first few the targets of the decision probes."""
    rules = []
    for i in range(count):
        a, b = (i >> 8) & 255, i & 255
        kind = 6 if i % 100 == 99 else i % 6
        if kind == 0:
            rules.append(f"api{i}.svc{i % 97}.example.com:443")  # exact host
        elif kind == 1:
            rules.append(f"*.t{i}.example.net:80,443")  # wildcard, port list
        elif kind == 2:
            rules.append(f"{11 + i % 80}.{a}.{b}.0/24:8000-8100,9443")  # IPv4 CIDR, range
        elif kind == 3:
            rules.append(f"[2a00:{i >> 16:x}:{i & 0xFFFF:x}::]/48:443")  # IPv6 CIDR
        elif kind == 4:
            rules.append(f"{101 + i % 20}.{a}.{b}.{1 + i % 250}:{1024 + i % 50000}")  # address
        elif kind == 5:
            rules.append(f"10.{a}.{b}.0/24:5432")  # inside the opened special range
        else:
            rules.append(f"db.shared.example.com:{20000 + i // 100}")  # one host, many ports
    return rules


def one_app(rules: list[str], *, version: int = 1) -> RuleSet:
    """An app named ``big`` (whatever its size) holding ``rules``."""
    data = {"app": [{"name": "big", "uids": ["20000"], "allow": rules}]}
    return RuleSet.from_data(data, version=version, source="bench")


def many_apps_data(apps: int) -> dict[str, Any]:
    return {
        "app": [
            {"name": f"app-{i:05d}", "uids": [100_000 + i], "allow": app_rules(i)}
            for i in range(apps)
        ]
    }


def cold_caches() -> None:
    """What a fresh process has: no rule or port text parsed yet."""
    rule_apps._parse_rule.cache_clear()
    rule_parse._ports.cache_clear()


def timed(fn: Callable[[], T], runs: int) -> tuple[float, float, T]:
    """Median and min ms of ``runs`` calls, and the last result. Before each call the previous
    result is dropped and a full collection runs: each call starts from the same heap."""
    times = []
    kept: list[T] = []
    for _ in range(runs):
        kept.clear()
        gc.collect()
        t0 = time.perf_counter()
        kept.append(fn())
        times.append(ms_since(t0))
    return statistics.median(times), min(times), kept[0]


def edited(rule_set: RuleSet, name: str, rule: str) -> RuleSet:
    """The set after one rule is added to app ``name``, as a store commits it."""
    change = apply_edit(rule_set, AddRules(name, (parse_rule(rule),)), source="bench")
    return change.rule_set.with_version(rule_set.version + 1)


def reuse_build(rule_set: RuleSet, previous: PolicySnapshot) -> tuple[PolicySnapshot, int]:
    builder = SnapshotBuilder(rule_set, EXCEPTIONS, previous=previous)
    builder.compile_all()
    return builder.result(), builder.reused


# --------------------------------------------------------------------------- (a) one big app


def section_big_app(count: int, runs: int) -> tuple[list[str], PolicySnapshot]:
    rules = mixed_rules(count)
    cold_caches()
    t0 = time.perf_counter()
    big = one_app(rules)
    read_ms = ms_since(t0)
    med, low, snapshot = timed(lambda: PolicySnapshot.build(big, EXCEPTIONS), runs)
    again = one_app(rules, version=2)
    reuse_med, reuse_low, (_, reused) = timed(lambda: reuse_build(again, snapshot), runs)
    rows = [
        ["read (RuleSet.from_data, caches empty)", fmt(read_ms), fmt(read_ms), "-", "-"],
        ["compile (PolicySnapshot.build)", fmt(med), fmt(low), "<= 1000", ok(med <= 1000)],
        [f"read again, build with previous (reused {reused})", fmt(reuse_med), fmt(reuse_low),
         "-", "-"],
    ]  # fmt: skip
    out = [
        f"(a) one app, {count:,} rules (median / min of {runs})",
        table(["step", "median ms", "min ms", "target ms", "ok"], rows),
    ]
    return out, snapshot


def ok(met: bool) -> str:
    return "yes" if met else "NO"


# --------------------------------------------------------------------------- (b) decisions


def us_per_call(fn: Callable[[], object], calls: int = CALLS) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def first_time_literals(app: AppPolicy, addresses: Sequence[IPAddress], port: int) -> float:
    """µs per literal decided through first_step with nothing remembered yet."""
    best = float("inf")
    for _ in range(3):
        total = 0.0
        for _ in range(max(1, CALLS // len(addresses))):
            app.memo.clear()
            t0 = time.perf_counter()
            for address in addresses:
                first_step(app, address, port)
            total += time.perf_counter() - t0
        best = min(best, total / (max(1, CALLS // len(addresses)) * len(addresses)) * 1e6)
    return best


def name_through_policy(
    app: AppPolicy, host: str, port: int, answers: tuple[IPAddress, ...]
) -> object:
    step = first_step(app, host, port)
    if isinstance(step, Lookup):
        return policy_after_lookup(app, step, answers)
    return step


TWO_ANSWERS = "decide_addresses v4 + v6 answers, miss (2 decisions)"


def decision_cases(app: AppPolicy) -> dict[str, dict[str, Callable[[], object]]]:
    """The cases of each layer: the pure decision, and the policy steps as the proxy calls
    them (which also build its Verdict)."""
    exact_rule = app.rules.match_name("api0.svc0.example.com", 443)
    v4, v4_miss, v6 = ip_address("13.0.2.9"), ip_address("8.8.8.8"), ip_address("2a00:0:3::1")
    v6_miss, opened = ip_address("2606:4700::1"), ip_address("10.0.5.7")
    metadata = ip_address("169.254.169.254")
    pure: dict[str, Callable[[], object]] = {
        "decide_name exact hit": lambda: decide_name(app, "api0.svc0.example.com", 443),
        "decide_name wildcard hit (4 labels)": lambda: decide_name(app, "a.b.t1.example.net", 443),
        "decide_name one host, many ports (hit)": lambda: decide_name(
            app, "db.shared.example.com", 20500
        ),
        "decide_name miss, nothing to resolve for": lambda: decide_name(
            app, "nowhere.example.org", 22
        ),
        "decide_addresses answer of a name rule": lambda: decide_addresses(
            app, (v4,), 443, name_rule=exact_rule
        ),
        "decide_addresses v4 answer hit": lambda: decide_addresses(app, (v4,), 8050),
        TWO_ANSWERS: lambda: decide_addresses(app, (v4_miss, v6_miss), 443),
        "decide_address v4 hit": lambda: decide_address(app, v4, 8050),
        "decide_address v6 hit": lambda: decide_address(app, v6, 443),
        "decide_address v4 miss": lambda: decide_address(app, v4_miss, 443),
        "decide_address v6 miss": lambda: decide_address(app, v6_miss, 443),
        "decide_address opened special hit": lambda: decide_address(app, opened, 5432),
        "decide_address special (metadata)": lambda: decide_address(app, metadata, 80),
    }
    policy: dict[str, Callable[[], object]] = {
        "name hit, 1 answer": lambda: name_through_policy(app, "api0.svc0.example.com", 443, (v4,)),
        "name, answer in an address rule": lambda: name_through_policy(
            app, "nowhere.example.org", 8050, (v4,)
        ),
        "name, answer denied": lambda: name_through_policy(
            app, "nowhere.example.org", 443, (v4_miss,)
        ),
        "name miss, no lookup": lambda: name_through_policy(app, "nowhere.example.org", 22, ()),
        "literal, remembered": lambda: first_step(app, v4, 8050),
    }
    return {"rules.decide": pure, "egress.policy first_step (+ after_lookup)": policy}


def section_decisions(big: PolicySnapshot) -> list[str]:
    small = PolicySnapshot.build(one_app(mixed_rules(10)), EXCEPTIONS)
    apps = [small.apps["big"], big.apps["big"]]
    rules = len(big.apps["big"].rules)
    literals = [ip_address(f"13.0.2.{n}") for n in range(256)]
    literals += [ip_address(f"19.0.8.{n}") for n in range(256)]
    out = [f"(b) decisions, µs per call (best of 3 rounds of {CALLS:,}); target <= 10 µs"]
    layers = [decision_cases(app) for app in apps]
    for layer in layers[0]:
        results = [{k: us_per_call(f) for k, f in cases[layer].items()} for cases in layers]
        if layer.startswith("egress"):
            for app, found in zip(apps, results, strict=True):
                found["literal, first time (512 distinct)"] = first_time_literals(
                    app, literals, 8050
                )
        rows = [[k, fmt(results[0][k], 2), fmt(results[1][k], 2)] for k in results[0]]
        worst = max(us / (2 if k == TWO_ANSWERS else 1) for k, us in results[1].items())
        out += [
            f"{layer}: worst {worst:.2f} µs per decision at {rules:,} rules, {ok(worst <= 10)}",
            table(["decision", "10 rules", f"{rules:,} rules"], rows),
        ]
    return out


# --------------------------------------------------------------------------- (c) many apps


def section_many_apps(count: int, runs: int) -> tuple[list[str], RuleSet, RuleSet]:
    """The table, the set as read and the set with one app edited (for the lag phases)."""
    data = many_apps_data(count)

    def read() -> RuleSet:
        cold_caches()
        return RuleSet.from_data(data, version=1, source="bench")

    def start() -> PolicySnapshot:
        return PolicySnapshot.build(read(), EXCEPTIONS)

    def start_deferred() -> PolicySnapshot:
        with full_collections_deferred():
            return start()

    # First, so that the set read last (as a reload finds it) is the one compiled below.
    start_med, start_low, _ = timed(start, runs)
    deferred_med, deferred_low, _ = timed(start_deferred, runs)
    read_med, read_low, read_set = timed(read, runs)
    compile_med, compile_low, snapshot = timed(
        lambda: PolicySnapshot.build(read_set, EXCEPTIONS), runs
    )

    last = read_set.apps[-1].name
    changed = edited(read_set, last, "api-new.example.com:443")
    reuse_med, reuse_low, (_, reused) = timed(lambda: reuse_build(changed, snapshot), runs)
    full_med, full_low, _ = timed(lambda: PolicySnapshot.build(changed, EXCEPTIONS), runs)
    again = RuleSet.from_data(data, version=2, source="bench")
    again_med, again_low, (_, again_reused) = timed(lambda: reuse_build(again, snapshot), runs)
    rules = sum(len(app.allow) for app in read_set.apps)
    rows = [
        ["read (RuleSet.from_data, caches empty)", fmt(read_med), fmt(read_low), "", ""],
        ["compile (PolicySnapshot.build)", fmt(compile_med), fmt(compile_low), "", ""],
        ["start: read + compile", fmt(start_med), fmt(start_low), "<= 3000",
         ok(start_med <= 3000)],
        ["same, full collections deferred (gcpolicy)", fmt(deferred_med), fmt(deferred_low),
         "<= 3000", ok(deferred_med <= 3000)],
        [f"one app edited, previous= (reused {reused:,})", fmt(reuse_med), fmt(reuse_low),
         "others not compiled", ok(reused == count - 1)],
        ["one app edited, full recompile (baseline)", fmt(full_med), fmt(full_low), "", ""],
        [f"all read again, previous= (reused {again_reused:,})", fmt(again_med),
         fmt(again_low), "", ""],
    ]  # fmt: skip
    out = [
        f"(c) {count:,} apps, {rules:,} rules (median / min of {runs})",
        table(["step", "median ms", "min ms", "target", "ok"], rows),
    ]
    return out, read_set, changed


# --------------------------------------------------------------------------- (d) loop lag


async def install(holder: SnapshotHolder, rule_set: RuleSet) -> dict[str, float]:
    t0 = time.perf_counter()
    holder.offer(rule_set)
    await holder.wait_idle()
    if holder.current.version != rule_set.version:
        raise RuntimeError(f"version {rule_set.version} was not installed")
    return {"compile_ms": ms_since(t0)}


async def holder_phase(
    name: str, first: Callable[[], PolicySnapshot], offered: RuleSet, gcrec: GcRecorder
) -> PhaseResult:
    """``offered`` installed by a running holder whose current snapshot is ``first()``,
    referenced by nothing else (so the swap frees it, as in the proxy)."""
    holder = SnapshotHolder(first(), ProxyMetrics())
    async with running(holder.run()):
        return await measure(name, lambda: install(holder, offered), gcrec)


async def lag_phases(big_rules: list[str], many: RuleSet, many_first: RuleSet) -> list[PhaseResult]:
    gcrec = GcRecorder()
    big = one_app(big_rules, version=2)

    async def naive() -> dict[str, float]:
        t0 = time.perf_counter()
        PolicySnapshot.build(big, EXCEPTIONS)
        return {"compile_ms": ms_since(t0)}

    def empty() -> PolicySnapshot:
        return PolicySnapshot.build(RuleSet(), EXCEPTIONS)

    def big_first() -> PolicySnapshot:
        return PolicySnapshot.build(big, EXCEPTIONS)

    def many_snapshot() -> PolicySnapshot:
        return PolicySnapshot.build(many_first, EXCEPTIONS)

    phases = [
        ("c holder: big app, new", empty, big),
        ("c holder: big app, one rule added", big_first, edited(big, "big", "new.example.com:443")),
        ("c holder: big app, read again (equal)", big_first, one_app(big_rules, version=3)),
        ("c holder: all apps, new", empty, many),
        ("c holder: all apps, one app edited", many_snapshot, many),
    ]
    with gcrec.installed():
        results = [await measure("b naive: big app built on the loop", naive, gcrec)]
        for name, first, offered in phases:
            results.append(await holder_phase(name, first, offered, gcrec))
    return results


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rules", type=int, default=100_000, help="rules of the big app")
    p.add_argument("--apps", type=int, default=10_000, help="apps of the many-app set")
    p.add_argument("--runs", type=int, default=3, help="runs per timed step (median)")
    p.add_argument("--loop", default="uvloop", help="event loop for (d): uvloop or asyncio")
    a = p.parse_args(argv)
    if a.rules < 10 or a.apps < 2 or not 1 <= a.runs <= 20:
        p.error("--rules >= 10, --apps >= 2, --runs 1 to 20")
    [(loop_name, factory)] = loop_factories([a.loop])
    print(f"python {sys.version.split()[0]}, gc thresholds {gc.get_threshold()}\n")
    lines, big_snapshot = section_big_app(a.rules, a.runs)
    print("\n".join(lines), end="\n\n")
    print("\n".join(section_decisions(big_snapshot)), end="\n\n")
    del big_snapshot
    lines, many_first, many_edited = section_many_apps(a.apps, a.runs)
    print("\n".join(lines), end="\n\n")
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(lag_phases(mixed_rules(a.rules), many_edited, many_first))
    print("(d) " + report(loop_name, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
