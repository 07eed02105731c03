"""Compile reuse: a new rule set keeps the compiled rules of the apps it did not change, decides
exactly as a fresh compile would (remembered literal verdicts included), and lets the old
snapshot go."""

from __future__ import annotations

import asyncio
import gc
import weakref
from ipaddress import ip_address
from typing import Any

from egress.metrics import ProxyMetrics
from egress.outcomes import Outcome
from egress.policy import Verdict, first_step
from egress.rulesource import SnapshotHolder
from rules.apps import Mode, RuleSet
from rules.edits import AddRules, RemoveRules, UpdateApp, apply_edit
from rules.parse import parse_rule
from rules.snapshot import RULES_PER_APP, PolicySnapshot, SnapshotBuilder
from rules.special import SpecialExceptions

NONE = SpecialExceptions()
OPENED = SpecialExceptions.parse(["10.8.0.0/16"])


def app_data(i: int, *extra: str) -> dict[str, Any]:
    return {
        "name": f"app{i}",
        "uids": [str(10000 + i)],
        "allow": [f"api{i}.example.com:443", f"198.51.{i}.0/24:8000-8100", "10.8.0.5:5432", *extra],
    }


def rule_set(apps: list[dict[str, Any]], version: int = 1) -> RuleSet:
    return RuleSet.from_data({"app": apps}, version=version, source="test")


FIRST = rule_set([app_data(i) for i in range(3)])


def literal(snapshot: PolicySnapshot, app: str, address: str, port: int) -> Outcome:
    verdict = first_step(snapshot.apps[app], ip_address(address), port)
    assert isinstance(verdict, Verdict)
    return verdict.outcome


def edited(rules: RuleSet, edit: Any) -> RuleSet:
    return apply_edit(rules, edit, source="test").rule_set.with_version(rules.version + 1)


def test_unchanged_apps_keep_their_compiled_rules() -> None:
    old = PolicySnapshot.build(FIRST, NONE)
    new_rules = edited(FIRST, AddRules("app1", (parse_rule("www.example.net:443"),)))
    assert new_rules.apps[0] is FIRST.apps[0]  # an edit keeps the other apps' objects
    builder = SnapshotBuilder(new_rules, NONE, previous=old)
    builder.compile_all()
    new = builder.result()
    assert builder.reused == 2
    for name in ("app0", "app2"):
        assert new.apps[name].rules is old.apps[name].rules
        assert new.apps[name].opened is old.apps[name].opened
    assert new.apps["app1"].rules is not old.apps["app1"].rules
    assert new.apps["app1"].rules.match_name("www.example.net", 443) is not None
    assert old.apps["app1"].rules.match_name("www.example.net", 443) is None


def test_equal_apps_read_again_are_reused_too() -> None:
    """A store's full read or a config reload gives new App objects with the same rules."""
    old = PolicySnapshot.build(FIRST, NONE)
    again = rule_set([app_data(0), app_data(1, "www.example.net:443"), app_data(2)], version=2)
    assert again.apps[0] is not FIRST.apps[0] and again.apps[0] == FIRST.apps[0]
    new = PolicySnapshot.build(again, NONE, previous=old)
    assert new.apps["app0"].rules is old.apps["app0"].rules
    assert new.apps["app2"].rules is old.apps["app2"].rules
    assert new.apps["app1"].rules is not old.apps["app1"].rules


def test_a_reused_app_belongs_to_the_new_snapshot() -> None:
    """Its App (mode, limits) is the new set's, and so are its exceptions and its memo."""
    old = PolicySnapshot.build(FIRST, OPENED)
    equal_exceptions = SpecialExceptions.parse(["10.8.0.0/16"])
    reported = edited(FIRST, UpdateApp("app0", mode=Mode.REPORT))
    new = PolicySnapshot.build(reported, equal_exceptions, previous=old)
    reused = new.apps["app0"]
    assert reused.rules is old.apps["app0"].rules  # the rules did not change, only the mode
    assert reused.app is reported.apps[0] and reused.mode is Mode.REPORT
    assert reused.exceptions is equal_exceptions
    assert all(policy.memo is reused.memo for policy in new.apps.values())
    assert reused.memo is not old.apps["app0"].memo
    # report mode lets through what enforce mode denied, under the reused rules
    assert literal(old, "app0", "8.8.8.8", 443) is Outcome.NOT_ALLOWED
    verdict = first_step(reused, ip_address("8.8.8.8"), 443)
    assert isinstance(verdict, Verdict) and verdict.allowed and verdict.reported


def test_changed_exceptions_recompile_every_app() -> None:
    old = PolicySnapshot.build(FIRST, NONE)
    new = PolicySnapshot.build(FIRST.with_version(2), OPENED, previous=old)
    for name in old.apps:
        assert new.apps[name].rules is not old.apps[name].rules
    # and the decisions are those of the new exceptions: 10.8.0.5 is opened now
    assert literal(old, "app0", "10.8.0.5", 5432) is Outcome.SPECIAL_ADDRESS
    assert literal(new, "app0", "10.8.0.5", 5432) is Outcome.ALLOWED
    back = PolicySnapshot.build(FIRST.with_version(3), NONE, previous=new)
    assert literal(back, "app0", "10.8.0.5", 5432) is Outcome.SPECIAL_ADDRESS


def test_remembered_literal_verdicts_follow_the_rules_of_the_new_snapshot() -> None:
    """egress.policy remembers literal verdicts in the snapshot's memo: an app whose rules
    changed, and an app reused while another changed, both answer as the new rules say."""
    old = PolicySnapshot.build(FIRST, NONE)
    # fill the old snapshot's memo for two apps
    assert literal(old, "app1", "198.51.1.9", 8080) is Outcome.ALLOWED
    assert literal(old, "app0", "198.51.0.9", 8080) is Outcome.ALLOWED
    assert literal(old, "app0", "203.0.113.9", 443) is Outcome.SPECIAL_ADDRESS
    narrower = edited(FIRST, RemoveRules("app1", (parse_rule("198.51.1.0/24:8000-8100"),)))
    new = PolicySnapshot.build(narrower, NONE, previous=old)
    assert new.apps["app0"].rules is old.apps["app0"].rules  # reused while app1 changed
    assert not new.apps["app0"].memo  # nothing remembered under the old snapshot comes along
    assert literal(new, "app1", "198.51.1.9", 8080) is Outcome.NOT_ALLOWED
    assert literal(new, "app0", "198.51.0.9", 8080) is Outcome.ALLOWED
    assert literal(new, "app0", "203.0.113.9", 443) is Outcome.SPECIAL_ADDRESS
    # a connection still deciding under the old snapshot keeps the old answer
    assert literal(old, "app1", "198.51.1.9", 8080) is Outcome.ALLOWED
    # and an app taken back to what it was is compiled again, not given the old memo
    restored = PolicySnapshot.build(FIRST.with_version(5), NONE, previous=new)
    assert literal(restored, "app1", "198.51.1.9", 8080) is Outcome.ALLOWED
    assert restored.apps["app1"].memo is not old.apps["app1"].memo


class _WeakSnapshot(PolicySnapshot):
    __slots__ = ("__weakref__",)


class _Remembered:
    """A value put in a memo, so a test can see whether that memo is still alive."""


def test_the_previous_snapshot_and_its_memo_can_be_freed() -> None:
    built = PolicySnapshot.build(FIRST, NONE)
    old = _WeakSnapshot(built.ruleset, built.exceptions, built.apps)
    sentinel = _Remembered()
    old.apps["app0"].memo["sentinel"] = sentinel
    snapshot_ref, memo_ref = weakref.ref(old), weakref.ref(sentinel)
    del built, sentinel
    new = PolicySnapshot.build(FIRST.with_version(2), NONE, previous=old)
    del old
    gc.collect()
    assert snapshot_ref() is None, "the new snapshot keeps the previous one alive"
    assert memo_ref() is None, "the new snapshot keeps the previous memo alive"
    assert literal(new, "app2", "198.51.2.1", 8000) is Outcome.ALLOWED


def test_a_big_app_compiles_and_compares_in_bounded_steps() -> None:
    """compile_some(1) does about RULES_PER_APP rules: a 3,000-rule app takes many calls, both
    to compile and, when read again equal, to be compared; the results decide alike."""
    big = [f"h{n}.example.com:443" for n in range(1500)]
    big += [f"{100 + n % 50}.{n // 256}.{n % 256}.0/24:{1 + n % 999}" for n in range(1500)]
    first = rule_set([{"name": "big", "uids": ["10000"], "allow": big}, app_data(1)])
    builder = SnapshotBuilder(first, NONE)
    calls = 1
    while not builder.compile_some(1):
        calls += 1
    assert calls >= len(big) // RULES_PER_APP
    stepped = builder.result()
    whole = PolicySnapshot.build(first, NONE)
    for address, port in [("100.0.0.1", 1), ("149.5.219.7", 999), ("100.0.0.1", 2)]:
        assert literal(stepped, "big", address, port) is literal(whole, "big", address, port)
    assert stepped.apps["big"].rules.match_name("h1499.example.com", 443) is not None

    again = rule_set([{"name": "big", "uids": ["10000"], "allow": big}, app_data(1)], version=2)
    builder = SnapshotBuilder(again, NONE, previous=stepped)
    calls = 1
    while not builder.compile_some(1):
        calls += 1
    assert calls > 1 and builder.reused == 2
    assert builder.result().apps["big"].rules is stepped.apps["big"].rules

    changed_last = rule_set(
        [{"name": "big", "uids": ["10000"], "allow": [*big[:-1], "h.example.org:80"]}], version=3
    )
    recompiled = PolicySnapshot.build(changed_last, NONE, previous=stepped)
    assert recompiled.apps["big"].rules is not stepped.apps["big"].rules
    assert recompiled.apps["big"].rules.match_name("h.example.org", 80) is not None


def test_the_holder_reuses_the_snapshot_in_force() -> None:
    """The real wiring: SnapshotHolder compiles an offered set against its current snapshot."""
    holder = SnapshotHolder(PolicySnapshot.build(FIRST, NONE), ProxyMetrics())
    before = holder.current
    changed = edited(FIRST, AddRules("app2", (parse_rule("www.example.net:443"),)))

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(holder.run())
        try:
            holder.offer(changed)
            await holder.wait_idle()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert holder.current.version == 2
    assert holder.current.apps["app0"].rules is before.apps["app0"].rules
    assert holder.current.apps["app2"].rules is not before.apps["app2"].rules
    assert holder.current.apps["app2"].rules.match_name("www.example.net", 443) is not None
