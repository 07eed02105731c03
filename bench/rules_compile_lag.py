#!/usr/bin/env python3
"""Event-loop lag while egress reads and compiles a 10,000-app config.

Run from the repository root (no root needed, no network):

    .venv/bin/python bench/rules_compile_lag.py [--apps 10000] [--loops uvloop,asyncio]

It writes two TOML configs of ``--apps`` apps each (a distinct uid per app, 3 to 5 rules of
mixed kinds: exact host, wildcard, IPv4/IPv6 CIDR and single addresses, with port lists and
ranges; the second file differs from the first in its last app, as after a one-app edit) to a
temporary directory, then, for each event loop (uvloop and plain asyncio, in the same run),
measures phases while a heartbeat task runs ``await asyncio.sleep(0.001)`` in a loop and
records how late each wake-up is (the loop lag):

* ``a baseline``: the heartbeat alone for ``--baseline-seconds``;
* ``b naive``: ``load_config(path)`` and ``PolicySnapshot.build(...)`` called on the loop;
* ``c sighup``: what a SIGHUP does now: ``await asyncio.to_thread(load_config, path)``, then
  ``SnapshotHolder.offer(ruleset)`` and ``await holder.wait_idle()`` with the holder's ``run()``
  task running (the holder starts out holding the first file's compiled snapshot, and
  nothing else references it, so the swap frees it as in the proxy);

and, to find what causes the lag of ``c``, the same pieces one at a time:

* ``c1 thread parse``: only ``await asyncio.to_thread(load_config, path)``;
* ``c1b same, switch 1 ms``: ``c1`` with ``sys.setswitchinterval(0.001)`` instead of the default
  5 ms (an experiment: how much of the lag is the loop thread waiting for the GIL);
* ``c2 holder compile``: only ``offer`` + ``wait_idle`` (the config read beforehand);
* ``d runtime reload``: a started ``ProxyRuntime`` reloading its config file, exactly what a
  SIGHUP runs: the file read, checked and versioned in a thread (``FileRuleSource.prepare``),
  full collections deferred (``egress/gcpolicy.py``), the holder's slices, the swap, the old
  snapshot freed in steps and the survivors frozen. ``c`` and ``c2`` go through the holder
  directly and so share the swap and the deferral, not the thread-side versioning;
* ``e sighup, gc.freeze()``: ``c`` after ``gc.freeze()`` at set-up (an experiment: the running
  proxy's heap is no longer rescanned by full collections, the new config's objects still are);
* ``f sighup, gc off+freeze``: ``c`` with ``gc.freeze()`` at set-up, ``gc.disable()`` for the
  reload and ``gc.freeze(); gc.enable()`` once installed (an experiment: no collection at all
  while a reload runs; what is left is the GIL, the compile slices and the swap).

Every phase pads its work with 50 ms of heartbeat on either side; a phase's lags are the
heart beats whose sleep overlapped the work. Each phase starts after ``gc.collect()``, with
its own set-up outside the measurement.

Columns of the per-loop table:

``work ms``
    wall time of the phase's work (for ``a``, the heartbeat time);
``lag max / p99 / p50 ms``
    how late the heartbeat woke up past its 1 ms sleep (0.0 = on time; the loop's own timer
    granularity is about 1 ms, so read the baseline row first);
``beats``
    heart beats in the phase (a stalled loop gives fewer);
``parse ms`` / ``compile ms``
    the two halves of the work, where they are separate: parse = ``load_config`` (in the
    thread from ``c`` on), compile = ``PolicySnapshot.build`` (``b``) or offer -> holder idle
    (for ``d``: the whole reload);
``gc2 n / max ms``
    full (generation 2) collections during the work, and the longest, in any thread: a
    collection holds the GIL from start to end, so one in the parsing thread stalls the loop
    just as much as one on the loop.

Under the table, the three worst lags of every phase from ``c`` on are listed with what
overlapped them: collections (``gc2`` full ones, ``gc0``/``gc1`` those of 1 ms or more, and in
which thread) and ``swap`` (the holder swapped the new snapshot in, on the loop, just before
that moment).

The run ends with the pieces timed alone (median of 3, no heartbeat): TOML parse, config
checks, ``RuleSet`` constructor, app-tuple equality, compile, freeing a snapshot, one full
``gc.collect()`` with two configs live, and the objects the garbage collector tracks per app.

Bounds: heart beats per phase (``MAX_BEATS``), heartbeat time (``MAX_BEAT_SECONDS``), and
``PHASE_TIMEOUT`` for every awaited phase. Exit status 0 unless something failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from egress.config.reader import load_config, parse_config  # noqa: E402
from egress.metrics import ProxyMetrics  # noqa: E402
from egress.rulesource import SnapshotHolder  # noqa: E402
from egress.runtime import ProxyRuntime  # noqa: E402
from rules.apps import RuleSet  # noqa: E402
from rules.snapshot import PolicySnapshot  # noqa: E402

BEAT_SECONDS = 0.001
MAX_BEATS = 200_000
MAX_BEAT_SECONDS = 120.0
PHASE_TIMEOUT = 120.0
PAD_SECONDS = 0.05
BASE_UID = 100_000


# --------------------------------------------------------------------------- config


def app_rules(i: int) -> list[str]:
    """3 to 5 rules of mixed kinds for app ``i`` (all distinct across apps)."""
    a, b = (i >> 8) & 255, i & 255
    rules = [
        f"api.app{i}.example.com:443",  # exact host
        f"*.cdn{i}.example.net:80,443",  # wildcard, port list
        f"{11 + i % 80}.{a}.{b}.0/24:8000-8100,9443",  # IPv4 CIDR, range and port
    ]
    if i % 3 >= 1:
        rules.append(f"[2a00:{i:x}::]/32:443")  # IPv6 CIDR
    if i % 3 == 2:
        rules.append(f"10.{a}.{b}.7:5432")  # single address in an opened special range
    return rules


def config_text(apps: int, *, variant: int) -> str:
    lines = [
        "[proxy]",
        'http_listen = ["127.0.0.1:0"]',
        "",
        "[security]",
        'allow_special = ["10.0.0.0/8"]',
        "",
    ]
    for i in range(apps):
        rules = app_rules(i)
        if variant and i == apps - 1:
            rules[0] = f"api-v{variant}.app{i}.example.com:443"  # the one edited app
        lines += [
            "[[app]]",
            f'name = "app-{i:05d}"',
            f"uids = [{BASE_UID + i}]",
            "allow = [" + ", ".join(f'"{r}"' for r in rules) + "]",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- instruments


@dataclasses.dataclass(slots=True)
class Collection:
    start: float
    end: float
    generation: int
    on_loop_thread: bool

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


class GcRecorder:
    """Every garbage collection (any thread), via ``gc.callbacks``."""

    def __init__(self) -> None:
        self.events: list[Collection] = []
        self._started: dict[int, float] = {}
        self._loop_thread = threading.main_thread().ident

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        ident = threading.get_ident()
        if phase == "start":
            self._started[ident] = now
        elif ident in self._started and len(self.events) < 1_000_000:
            start = self._started.pop(ident)
            self.events.append(
                Collection(start, now, int(info["generation"]), ident == self._loop_thread)
            )

    def between(self, t0: float, t1: float, generation: int | None = None) -> list[Collection]:
        return [
            c
            for c in self.events
            if c.end >= t0 and c.start <= t1 and (generation is None or c.generation == generation)
        ]

    @contextlib.contextmanager
    def installed(self) -> Iterator[GcRecorder]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


@dataclasses.dataclass(slots=True)
class Beat:
    start: float
    woke: float

    @property
    def lag_ms(self) -> float:
        return max(0.0, (self.woke - self.start - BEAT_SECONDS) * 1000)


class Heartbeat:
    """``sleep(1 ms)`` in a loop, recording each wake-up; bounded in count and in time."""

    def __init__(self) -> None:
        self.beats: list[Beat] = []
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> None:
        deadline = time.perf_counter() + MAX_BEAT_SECONDS
        clock = time.perf_counter
        while not self._stop and len(self.beats) < MAX_BEATS:
            start = clock()
            if start >= deadline:
                break
            await asyncio.sleep(BEAT_SECONDS)
            self.beats.append(Beat(start, clock()))


# --------------------------------------------------------------------------- phases


@dataclasses.dataclass
class PhaseResult:
    name: str
    work_ms: float
    beats: list[Beat]
    collections: list[Collection]
    parse_ms: float | None = None
    compile_ms: float | None = None
    minor: list[Collection] = dataclasses.field(default_factory=list)  # gen 0/1, >= 1 ms

    def lags(self) -> list[float]:
        return sorted(b.lag_ms for b in self.beats)

    def percentile(self, q: float) -> float:
        lags = self.lags()
        if not lags:
            return float("nan")
        return lags[min(len(lags) - 1, round(q * (len(lags) - 1)))]


Work = Callable[[], Awaitable[dict[str, float]]]
Paths = tuple[Path, Path]


async def measure(name: str, work: Work, gcrec: GcRecorder, *, collect: bool = True) -> PhaseResult:
    """Run ``work`` with the heartbeat going; keep the beats that overlap the work."""
    if collect:
        gc.collect()
    heart = Heartbeat()
    task = asyncio.get_running_loop().create_task(heart.run(), name="heartbeat")
    try:
        await asyncio.sleep(PAD_SECONDS)
        t0 = time.perf_counter()
        async with asyncio.timeout(PHASE_TIMEOUT):
            parts = await work()
        t1 = time.perf_counter()
        await asyncio.sleep(PAD_SECONDS)
    finally:
        heart.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    beats = [b for b in heart.beats if b.woke >= t0 and b.start <= t1]
    return PhaseResult(
        name,
        (t1 - t0) * 1000,
        beats,
        gcrec.between(t0, t1, generation=2),
        parts.get("parse_ms"),
        parts.get("compile_ms"),
        [c for c in gcrec.between(t0, t1) if c.generation < 2 and c.ms >= 1.0],
    )


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


MARKS: list[tuple[str, float, float]] = []
"""Named moments or spans of the work (``swap``) to explain lags with."""


def mark(label: str, t0: float, t1: float | None = None) -> None:
    if len(MARKS) < 100_000:
        MARKS.append((label, t0, t0 if t1 is None else t1))


class SwapClock(ProxyMetrics):
    """ProxyMetrics (own registry) that notes when the holder has just swapped a snapshot in:
    ``SnapshotHolder._install`` calls ``rules_update(ok=True)`` right after ``self.current =``."""

    def rules_update(self, *, ok: bool) -> None:
        if ok:
            mark("swap", time.perf_counter())
        super().rules_update(ok=ok)


def fresh_holder(first_path: Path) -> SnapshotHolder:
    """A holder whose current snapshot (the first config) nothing else references."""
    config = load_config(first_path)
    snapshot = PolicySnapshot.build(config.ruleset, config.security.special_exceptions)
    del config
    return SnapshotHolder(snapshot, SwapClock())


@contextlib.asynccontextmanager
async def running(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run background coroutines (the holder's tasks) for the phase; cancel them after."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def phase_baseline(paths: Paths, gcrec: GcRecorder, seconds: float) -> PhaseResult:
    async def work() -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {}

    return await measure("a baseline", work, gcrec)


async def phase_naive(paths: Paths, gcrec: GcRecorder) -> PhaseResult:
    async def work() -> dict[str, float]:
        t0 = time.perf_counter()
        config = load_config(paths[1])
        parse_ms = ms_since(t0)
        t1 = time.perf_counter()
        PolicySnapshot.build(config.ruleset, config.security.special_exceptions)
        return {"parse_ms": parse_ms, "compile_ms": ms_since(t1)}

    return await measure("b naive (on the loop)", work, gcrec)


async def sighup(holder: SnapshotHolder, path: Path) -> dict[str, float]:
    """What egress does with a SIGHUP, as the brief of this benchmark puts it."""
    t0 = time.perf_counter()
    config = await asyncio.to_thread(load_config, path)
    parse_ms = ms_since(t0)
    t1 = time.perf_counter()
    holder.offer(config.ruleset)
    del config  # the holder is left holding the only reference, as in the proxy
    await holder.wait_idle()
    if holder.current.ruleset.source != str(path):
        raise RuntimeError("the holder did not install the new config")
    return {"parse_ms": parse_ms, "compile_ms": ms_since(t1)}


async def phase_sighup(paths: Paths, gcrec: GcRecorder, *, gc_mode: str = "") -> PhaseResult:
    """``c``; with gc_mode "freeze" ``e``, with "off" ``f``."""
    holder = fresh_holder(paths[0])
    gc.collect()
    if gc_mode:
        gc.freeze()

    async def work() -> dict[str, float]:
        if gc_mode != "off":
            return await sighup(holder, paths[1])
        gc.disable()
        try:
            return await sighup(holder, paths[1])
        finally:
            gc.freeze()
            gc.enable()

    name = {
        "": "c sighup (thread + holder)",
        "freeze": "e sighup, gc.freeze()",
        "off": "f sighup, gc off+freeze",
    }[gc_mode]
    try:
        async with running(holder.run()):
            return await measure(name, work, gcrec, collect=False)
    finally:
        gc.enable()
        gc.unfreeze()


async def phase_thread_parse(
    paths: Paths, gcrec: GcRecorder, *, switch_s: float | None = None
) -> PhaseResult:
    """``c1``; with ``switch_s``, under that ``sys.setswitchinterval`` (``c1b``)."""

    async def work() -> dict[str, float]:
        t0 = time.perf_counter()
        await asyncio.to_thread(load_config, paths[1])
        return {"parse_ms": ms_since(t0)}

    if switch_s is None:
        return await measure("c1 thread parse only", work, gcrec)
    default = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    try:
        return await measure(f"c1b same, switch {switch_s * 1000:g} ms", work, gcrec)
    finally:
        sys.setswitchinterval(default)


async def phase_holder_compile(paths: Paths, gcrec: GcRecorder) -> PhaseResult:
    holder = fresh_holder(paths[0])
    loaded = [load_config(paths[1]).ruleset]

    async def work() -> dict[str, float]:
        t1 = time.perf_counter()
        holder.offer(loaded.pop())  # the holder is left holding the only reference
        await holder.wait_idle()
        return {"compile_ms": ms_since(t1)}

    async with running(holder.run()):
        return await measure("c2 holder compile only", work, gcrec)


async def phase_runtime_reload(paths: Paths, gcrec: GcRecorder) -> PhaseResult:
    """``d``: the real thing: a started ``ProxyRuntime`` (a listener on 127.0.0.1:0) whose config
    file is replaced by the second config, then ``await runtime.reload()`` -- exactly what
    SIGHUP runs (read, check and version off the loop, full collections deferred, compile in
    slices, swap, old snapshot freed in steps, survivors frozen)."""
    work_dir = paths[0].parent / "runtime"
    work_dir.mkdir(exist_ok=True)
    config_path = work_dir / "egress.toml"
    shutil.copyfile(paths[0], config_path)
    runtime = ProxyRuntime(load_config(config_path))
    await runtime.start()

    async def work() -> dict[str, float]:
        shutil.copyfile(paths[1], config_path)
        t0 = time.perf_counter()
        if not await runtime.reload():
            raise RuntimeError("the reload was rejected")
        if runtime.holder.current.version != 2:
            raise RuntimeError("the second config was not installed")
        return {"compile_ms": ms_since(t0)}

    try:
        return await measure("d runtime reload (SIGHUP)", work, gcrec, collect=False)
    finally:
        await runtime.aclose()
        gc.unfreeze()


async def run_phases(paths: Paths, baseline_s: float) -> list[PhaseResult]:
    gcrec = GcRecorder()
    with gcrec.installed():
        return [
            await phase_baseline(paths, gcrec, baseline_s),
            await phase_naive(paths, gcrec),
            await phase_sighup(paths, gcrec),
            await phase_thread_parse(paths, gcrec),
            await phase_thread_parse(paths, gcrec, switch_s=0.001),
            await phase_holder_compile(paths, gcrec),
            await phase_runtime_reload(paths, gcrec),
            await phase_sighup(paths, gcrec, gc_mode="freeze"),
            await phase_sighup(paths, gcrec, gc_mode="off"),
        ]


# --------------------------------------------------------------------------- components


def median_ms(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(ms_since(t0))
    return statistics.median(times)


def free_snapshot_ms(path: Path) -> float:
    """Build a snapshot nothing else references, then time dropping it (what the swap frees)."""
    config = load_config(path)
    snap = [PolicySnapshot.build(config.ruleset, config.security.special_exceptions)]
    del config
    gc.collect()
    t0 = time.perf_counter()
    snap.clear()
    return ms_since(t0)


def tracked_per_app(path: Path) -> tuple[float, float]:
    """Objects the garbage collector tracks per app: in a loaded config, in its snapshot."""
    gc.collect()
    before = len(gc.get_objects())
    config = load_config(path)
    gc.collect()
    loaded = len(gc.get_objects())
    snap = PolicySnapshot.build(config.ruleset, config.security.special_exceptions)
    gc.collect()
    compiled = len(gc.get_objects())
    apps = len(snap.apps)
    return (loaded - before) / apps, (compiled - loaded) / apps


def timed_pieces(paths: Paths) -> list[tuple[str, float]]:
    import tomllib

    first, second = paths
    text = second.read_text()
    data = tomllib.loads(text)
    rs1, rs2 = load_config(first).ruleset, load_config(second).ruleset
    exceptions = load_config(second).security.special_exceptions
    out = [
        ("tomllib.loads (file read and decoded)", median_ms(lambda: tomllib.loads(text))),
        (
            "parse_config (checks, rules parsed, RuleSet)",
            median_ms(lambda: parse_config(data, source="x")),
        ),
        ("load_config (both of the above)", median_ms(lambda: load_config(second))),
        (
            "RuleSet(apps, version, source): re-validation",
            median_ms(lambda: RuleSet(rs2.apps, 2, rs2.source)),
        ),
        ("apps tuple == (all apps, last differs)", median_ms(lambda: rs1.apps == rs2.apps)),
        (
            "PolicySnapshot.build (compile all)",
            median_ms(lambda: PolicySnapshot.build(rs2, exceptions)),
        ),
        (
            "free a snapshot + its config's apps (the swap)",
            statistics.median(free_snapshot_ms(first) for _ in range(3)),
        ),
    ]
    snap = PolicySnapshot.build(rs2, exceptions)
    out.append(("gc.collect() with 2 configs + 1 snapshot live", median_ms(gc.collect)))
    out.append(("objects tracked by gc then", float(len(gc.get_objects()))))
    assert len(snap.apps) == len(rs2)
    return out


def components(paths: Paths) -> list[tuple[str, float]]:
    out = timed_pieces(paths)
    per_config, per_snapshot = tracked_per_app(paths[1])
    out.append(("objects tracked by gc per app: config", per_config))
    out.append(("objects tracked by gc per app: compiled snapshot", per_snapshot))
    return out


# --------------------------------------------------------------------------- report


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def report(loop_name: str, results: list[PhaseResult]) -> str:
    headers = [
        "phase", "work ms", "lag max", "lag p99", "lag p50", "beats",
        "parse ms", "compile ms", "gc2 n", "gc2 max ms",
    ]  # fmt: skip
    rows = []
    for r in results:
        rows.append(
            [
                r.name, fmt(r.work_ms), fmt(r.percentile(1.0), 2), fmt(r.percentile(0.99), 2),
                fmt(r.percentile(0.5), 2), str(len(r.beats)), fmt(r.parse_ms), fmt(r.compile_ms),
                str(len(r.collections)),
                fmt(max((c.ms for c in r.collections), default=None)),
            ]
        )  # fmt: skip
    out = [f"loop: {loop_name}   (lag = ms late past a 1 ms sleep)", table(headers, rows)]
    out.append(
        "worst lags, and what overlapped them: collections (gc2 full, gc0/gc1 >= 1 ms; "
        "in which thread), the holder's swap"
    )
    for r in results:
        if r.name.startswith(("a", "b")):
            continue
        worst = sorted(r.beats, key=lambda b: b.lag_ms, reverse=True)[:3]
        parts = []
        for b in worst:
            hits = [c for c in r.collections + r.minor if c.end >= b.start and c.start <= b.woke]
            causes = [
                f"gc{c.generation} {c.ms:.1f} ms ({'loop' if c.on_loop_thread else 'worker'})"
                for c in hits
            ]
            causes += [
                label if t0 == t1 else f"{label} {(t1 - t0) * 1000:.1f} ms"
                for label, t0, t1 in MARKS
                if t1 >= b.start and t0 <= b.woke
            ]
            why = " + ".join(causes) or "none of these"
            parts.append(f"{b.lag_ms:.1f} ms [{why}]")
        out.append(f"  {r.name:<28} " + "; ".join(parts))
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def loop_factories(names: list[str]) -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]]:
    out: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = []
    for name in names:
        if name == "uvloop":
            import uvloop

            out.append((f"uvloop {uvloop.__version__}", uvloop.new_event_loop))
        elif name == "asyncio":
            out.append(("asyncio (default selector loop)", asyncio.new_event_loop))
        else:
            raise SystemExit(f"unknown loop {name!r} (uvloop, asyncio)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--apps", type=int, default=10_000, help="apps per config (default 10000)")
    p.add_argument("--loops", default="uvloop,asyncio", help="comma-separated: uvloop,asyncio")
    p.add_argument("--baseline-seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    loops = loop_factories([n.strip() for n in a.loops.split(",") if n.strip()])
    print(
        f"python {sys.version.split()[0]}, gc thresholds {gc.get_threshold()}, "
        f"switch interval {sys.getswitchinterval() * 1000:g} ms, {a.apps:,} apps"
    )
    with tempfile.TemporaryDirectory(prefix="egress-lag-") as tmp:
        paths = (Path(tmp) / "v1.toml", Path(tmp) / "v2.toml")
        for variant, path in enumerate(paths):
            path.write_text(config_text(a.apps, variant=variant))
        rules = sum(len(app_rules(i)) for i in range(a.apps))
        print(
            f"config: {paths[1].stat().st_size / 1e6:.2f} MB, {a.apps:,} apps, {rules:,} rules; "
            "v2 differs from v1 in its last app\n"
        )
        for name, factory in loops:
            with asyncio.Runner(loop_factory=factory) as runner:
                results = runner.run(run_phases(paths, a.baseline_seconds))
            print(report(name, results))
            print()
        print("pieces timed alone (median of 3, no heartbeat, no event loop):")
        for label, value in components(paths):
            unit = "" if label.startswith("objects") else " ms"
            digits = 1 if unit or "per app" in label else 0
            print(f"  {label:<50} {fmt(value, digits):>10}{unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
