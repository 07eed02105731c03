"""The rule source and the snapshot holder: versions, atomic swaps, the last good snapshot kept,
and a big compile that leaves the event loop free."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from egress.metrics import ProxyMetrics
from egress.rulesource import FileRuleSource, SnapshotHolder
from rules.apps import RuleSet
from rules.snapshot import PolicySnapshot
from rules.special import SpecialExceptions

T = TypeVar("T")
NONE = SpecialExceptions()


def ruleset(apps: int, *, version: int = 1, port: int = 443) -> RuleSet:
    return RuleSet.from_data(
        {
            "app": [
                {
                    "name": f"app{i}",
                    "uids": [str(10000 + i)],
                    "allow": [f"api{i}.example.com:{port}", f"*.svc{i}.example.net:80,443"],
                }
                for i in range(apps)
            ]
        },
        version=version,
        source="test",
    )


def holder_for(first: RuleSet) -> tuple[SnapshotHolder, ProxyMetrics]:
    metrics = ProxyMetrics()
    return SnapshotHolder(PolicySnapshot.build(first, NONE), metrics), metrics


def running(holder: SnapshotHolder, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        task = asyncio.get_running_loop().create_task(holder.run())
        try:
            return await body()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def test_file_source_versions_only_real_changes() -> None:
    source = FileRuleSource(ruleset(2, version=0))
    assert source.latest.version == 0  # the file's [rules].version
    assert source.prepare(ruleset(2, version=0)) is None  # the same apps
    changed = source.prepare(ruleset(2, port=8443, version=0))  # a hand edit
    assert changed is not None and changed.version == 1
    assert source.prepare(ruleset(2, port=8080, version=5)).version == 5  # a store commit
    # Commits that cancel out (create, then delete) still move the version to the file's.
    assert source.prepare(ruleset(2, port=8443, version=9)).version == 9
    source.publish(changed)
    assert source.latest is changed
    with pytest.raises(ValueError, match="not newer"):
        source.publish(changed)


def test_full_collections_are_deferred_while_rules_load() -> None:
    import gc

    from egress.gcpolicy import full_collections_deferred

    before = gc.get_threshold()
    with full_collections_deferred():
        with full_collections_deferred():
            assert gc.get_threshold()[2] > 10**9
        assert gc.get_threshold()[2] > 10**9
    assert gc.get_threshold() == before


def test_an_offered_set_is_compiled_and_swapped_in() -> None:
    holder, metrics = holder_for(ruleset(1))
    first = holder.current

    async def body() -> None:
        holder.offer(ruleset(3, version=2))
        await holder.wait_idle()

    running(holder, body)
    assert holder.current is not first
    assert holder.current.version == 2
    assert holder.current.app_for_uid(10002) is holder.current.apps["app2"]
    assert metrics.registry.get_sample_value("egress_rules_version") == 2.0
    assert metrics.registry.get_sample_value("egress_rules_updates_total", {"result": "ok"}) == 1


def test_only_the_newest_offer_is_compiled() -> None:
    holder, metrics = holder_for(ruleset(1))

    async def body() -> None:
        for version in (2, 3, 4):
            holder.offer(ruleset(2, version=version))
        await holder.wait_idle()

    running(holder, body)
    assert holder.current.version == 4
    assert metrics.registry.get_sample_value("egress_rules_updates_total", {"result": "ok"}) == 1


def test_an_older_version_is_ignored_and_counted() -> None:
    holder, metrics = holder_for(ruleset(1, version=5))

    async def body() -> None:
        holder.offer(ruleset(2, version=4))
        await holder.wait_idle()

    running(holder, body)
    assert holder.current.version == 5
    assert len(holder.current.apps) == 1
    errors = metrics.registry.get_sample_value("egress_rules_updates_total", {"result": "error"})
    assert errors == 1


def test_a_compile_that_fails_keeps_the_last_good_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a real rule set cannot fail to compile, so compiling one app is made
    to raise, as a bug or memory exhaustion would."""
    holder, metrics = holder_for(ruleset(1))
    good = holder.current
    from rules import snapshot

    original = snapshot.AppPolicy.compile

    def failing(app: Any, exceptions: SpecialExceptions) -> Any:
        if app.name == "app2":
            raise RuntimeError("compile exploded")
        return original(app, exceptions)

    monkeypatch.setattr(snapshot.AppPolicy, "compile", staticmethod(failing))

    async def body() -> None:
        holder.offer(ruleset(3, version=2))
        await holder.wait_idle()

    running(holder, body)
    assert holder.current is good
    errors = metrics.registry.get_sample_value("egress_rules_updates_total", {"result": "error"})
    assert errors == 1


def test_new_exceptions_recompile_the_current_rules() -> None:
    holder, _ = holder_for(ruleset(2))
    opened = SpecialExceptions.parse(["10.8.0.0/16"])

    async def body() -> None:
        holder.set_exceptions(opened)
        await holder.wait_idle()

    running(holder, body)
    assert holder.current.exceptions is opened
    assert holder.current.apps["app1"].exceptions is opened
    assert holder.current.version == 1


def test_a_big_compile_yields_to_the_event_loop() -> None:
    """Connections keep being served while 5,000 apps compile: other tasks run in between."""
    holder, _ = holder_for(ruleset(1))
    big = ruleset(5000, version=2)
    ticks_during: list[int] = []

    async def body() -> None:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        beat = asyncio.get_running_loop().create_task(heartbeat())
        await asyncio.sleep(0)
        before = ticks
        holder.offer(big)
        await holder.wait_idle()
        ticks_during.append(ticks - before)
        stop.set()
        await beat

    running(holder, body)
    assert holder.current.version == 2
    # The compile took many slices; the heartbeat ran between them.
    assert ticks_during[0] >= 5, ticks_during


def test_a_published_version_can_be_awaited_through_follow() -> None:
    first = ruleset(1)
    source = FileRuleSource(first)
    metrics = ProxyMetrics()
    holder = SnapshotHolder(PolicySnapshot.build(source.latest, NONE), metrics)

    async def body() -> int:
        follow = asyncio.get_running_loop().create_task(holder.follow(source))
        try:
            prepared = source.prepare(ruleset(4))
            assert prepared is not None
            source.publish(prepared)
            await holder.wait_for_version(prepared.version)
            return holder.current.version
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)

    assert running(holder, body) == 2
    assert len(holder.current.apps) == 4
