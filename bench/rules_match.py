"""Matcher cost for 10 vs 10,000 rules: ns per lookup should barely move with rule count.

Run from the repo root: PYTHONPATH=. .venv/bin/python bench/rules_match.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from rules.decide import AppPolicy, Mode, decide_address, decide_name
from rules.match import CompiledRules
from rules.parse import parse_rule
from rules.special import SpecialExceptions, special_range

LOOPS = 200_000


def make_rules(count: int) -> CompiledRules:
    texts = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            texts.append(f"api{i}.example{i % 97}.com:443")
        elif kind == 1:
            texts.append(f"*.svc{i}.example.org:80,443")
        elif kind == 2:
            texts.append(f"{(i >> 8) & 255}.{i & 255}.{i % 7}.0/24:8000-8100")
        else:
            texts.append(f"[2001:db8:{i:x}::]/48:443")
    texts.append("93.184.216.0/24:443")
    texts.append("*.example.net:443")
    return CompiledRules.compile(parse_rule(t) for t in texts)


def ns_per_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    for _ in range(LOOPS):
        fn()
    return (time.perf_counter_ns() - start) / LOOPS


V4_HIT: IPv4Address | IPv6Address = ip_address("93.184.216.34")
V4_MISS: IPv4Address | IPv6Address = ip_address("8.8.8.8")
V6_MISS: IPv4Address | IPv6Address = ip_address("2606:4700::1111")
MAPPED: IPv4Address | IPv6Address = ip_address("::ffff:93.184.216.34")
EXCEPTIONS = SpecialExceptions()


def make_cases(rules: CompiledRules, app: AppPolicy) -> dict[str, Callable[[], object]]:
    def both() -> object:
        plan = decide_name(app, "x.example.net", 443)
        return decide_address(app, V4_HIT, 443, name_rule=plan.name_rule, exceptions=EXCEPTIONS)

    return {
        "match_name exact hit": lambda: rules.match_name("api0.example0.com", 443),
        "match_name wildcard hit (5 labels)": lambda: rules.match_name("a.b.c.d.example.net", 443),
        "match_name miss (5 labels)": lambda: rules.match_name("a.b.c.d.nowhere", 443),
        "match_address v4 hit": lambda: rules.match_address(V4_HIT, 443),
        "match_address v4 miss": lambda: rules.match_address(V4_MISS, 443),
        "match_address v6 miss": lambda: rules.match_address(V6_MISS, 443),
        "match_address mapped hit": lambda: rules.match_address(MAPPED, 443),
        "special_range public v4": lambda: special_range(V4_MISS),
        "decide_name + decide_address": both,
    }


def main() -> None:
    print(f"{'lookup':<40}{'10 rules':>12}{'10000 rules':>14}  (ns per lookup)")
    results: dict[str, list[float]] = {}
    for count in (10, 10_000):
        rules = make_rules(count)
        cases = make_cases(rules, AppPolicy(name="bench", mode=Mode.ENFORCE, rules=rules))
        for label, fn in cases.items():
            results.setdefault(label, []).append(ns_per_call(fn))
    for label, (small, large) in results.items():
        print(f"{label:<40}{small:>12.0f}{large:>14.0f}")


if __name__ == "__main__":
    main()
