#!/usr/bin/env python3
"""What the connection-rate limiter costs: egress unlimited, with the memory limiter, with the
Redis limiter, and with a Redis limit that refuses, in one run on the same load.

Run as root from the repository root (see bench/README.md, "Rate-limiter cost"):

    sudo .venv/bin/python bench/ratelimit_bench.py [--quick] [--rounds N] [--seconds S]

Every target is its own ``egress proxy`` process, all pinned to CPU 1 and started once; the C
load generator, the C upstream and the ``redis-server`` the bench starts (on a free loopback
port) are pinned to CPU 0, so CPU 1 carries the proxy alone and its CPU is the limiter's cost.
The targets are measured back to back in rounds, each round in a rotated order, and each
figure is the median over the rounds: this machine is shared and noisy. The Redis targets'
``/metrics`` are read before and after each case, for the Redis round trips per connection (the
batching at work) and to prove Redis answered every check (no errors, no fallback mode).
Every process started here is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_proxy_bench as pb  # bench/ is not a package: imported from its directory

UNLIMITED = "unlimited"
MEMORY = "memory"
REDIS = "redis"
REDIS_REFUSING = "redis-refusing"
TARGETS = (UNLIMITED, MEMORY, REDIS, REDIS_REFUSING)
NEVER_REFUSES = "{ connections_per_second = 1e6, burst = 1000000 }"
WITHIN = 0.15  # issue 8: the Redis limiter within 15 % of the memory limiter


@dataclasses.dataclass(frozen=True)
class Options:
    rounds: int
    seconds: float
    concurrencies: tuple[int, ...]
    protos: tuple[str, ...]
    targets: tuple[str, ...]
    refuse_rate: float
    refuse_burst: int
    quiet_wait_s: float
    retries: int
    max_count: int
    bench_uid: int
    cprofile: bool
    results_path: Path
    code_dir: Path = pb.REPO_DIR  # where `python -m egress.cli` imports egress from

    def loadgen_opts(self) -> pb.Options:
        """run_proxy_bench's options, for its helpers that run the load generator."""
        return dataclasses.replace(pb.parse_args([]), bench_uid=self.bench_uid)


@dataclasses.dataclass
class Egress:
    """One running egress target."""

    name: str
    proc: subprocess.Popen[bytes]
    http_port: int
    socks_port: int
    admin_port: int
    log_path: Path

    def port_for(self, proto: str) -> int:
        return self.socks_port if proto == "socks5" else self.http_port


@dataclasses.dataclass
class RedisProcess:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://{pb.HOST}:{self.port}/0"


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisProcess]:
    """A throwaway ``redis-server`` on a free loopback port, pinned to the load CPU."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise pb.BenchError("redis-server is not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = pb.free_port()
    cmd = [
        "taskset", "-c", pb.LOAD_CPU, exe, "--port", str(port), "--bind", pb.HOST,
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip
    pb.log(f"start redis: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pb.wait_listening(port, proc)
        yield RedisProcess(proc, port)
    finally:
        pb.stop(proc)


def egress_config(
    name: str, workdir: Path, ports: tuple[int, int, int], opts: Options, redis_url: str
) -> str:
    """The same config as run_proxy_bench's egress (log on), plus this target's limits."""
    http_port, socks_port, admin_port = ports
    limits, backend = "", "memory"
    if name in (MEMORY, REDIS):
        limits = f"limits = {NEVER_REFUSES}\n"
    if name == REDIS_REFUSING:
        limits = (
            f"limits = {{ connections_per_second = {opts.refuse_rate:g}, "
            f"burst = {opts.refuse_burst} }}\n"
        )
    if name in (REDIS, REDIS_REFUSING):
        backend = "redis"
    return f"""\
[proxy]
http_listen = ["{pb.HOST}:{http_port}"]
socks5_listen = ["{pb.HOST}:{socks_port}"]
handshake_timeout = 5.0
connect_timeout = 5.0
idle_timeout = 300.0
max_connections = 20000

[security]
allow_special = ["127.0.0.0/8"]

[log]
connection_log = "{workdir / "conn.log"}"

[ratelimit]
backend = "{backend}"
redis_prefix = "bench-{name}"

[redis]
url = "{redis_url}"

[admin]
listen = "{pb.HOST}:{admin_port}"

[[app]]
name = "bench"
uids = ["{opts.bench_uid}"]
allow = ["127.0.0.1:*"]
{limits}"""


# `egress` under cProfile with a CPU-time clock (python -m cProfile would time the idle waits
# too): argv[1] is where the stats go, the rest is egress's command line.
_PROFILED = """import cProfile, sys, time
from egress.cli import main
out, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    code = main(sys.argv[1:])
finally:
    profile.disable()
    profile.dump_stats(out)
sys.exit(code)
"""


@contextlib.contextmanager
def start_egress(name: str, opts: Options, workdir: Path, redis_url: str) -> Iterator[Egress]:
    """One egress target pinned to the proxy CPU (optionally under cProfile); stopped by pid."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = (pb.free_port(), pb.free_port(), pb.free_port())
    conf = workdir / "egress.toml"
    conf.write_text(egress_config(name, workdir, ports, opts, redis_url))
    run = ["-m", "egress.cli"]
    if opts.cprofile and name in (MEMORY, REDIS):
        run = ["-c", _PROFILED, str(pb.RESULTS_DIR / f"ratelimit-{name}.pstats")]
    cmd = [
        "taskset", "-c", pb.PROXY_CPU, str(pb.VENV_PYTHON), *run, "proxy",
        "--config", str(conf), "--loop", "uvloop",
    ]  # fmt: skip
    log_path = workdir / "egress.stderr"
    pb.log(f"start {name}: {' '.join(cmd)}")
    with log_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=opts.code_dir)
    try:
        try:
            for port in ports:
                pb.wait_listening(port, proc, timeout_s=30.0)
        except pb.BenchError as exc:
            raise pb.BenchError(f"{name} did not start: {exc}\n{pb.tail(log_path)}") from exc
        yield Egress(name, proc, *ports, log_path)
    finally:
        # SIGINT lets cProfile write its file; egress drains and exits on either signal.
        pb.stop(proc, sig=signal.SIGINT if opts.cprofile else signal.SIGTERM, grace_s=40.0)


# --------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(target: Egress) -> dict[str, float]:
    """The limiter's series of one target, summed over labels: checks of the app's bucket,
    Redis round trips and errors, whether Redis is the mode in force."""
    url = f"http://{pb.HOST}:{target.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out = {"checks": 0.0, "refused": 0.0, "round_trips": 0.0, "redis_errors": 0.0}
    out["mode_redis"] = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        metric, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if metric == "egress_ratelimit_decisions_total" and 'limit="connections"' in labels:
            out["checks"] += value
            if 'result="allowed"' not in labels:
                out["refused"] += value
        elif metric == "egress_ratelimit_redis_seconds_count":
            out["round_trips"] += value
        elif metric == "egress_ratelimit_redis_errors_total":
            out["redis_errors"] += value
        elif metric == "egress_ratelimit_mode" and 'mode="redis"' in labels:
            out["mode_redis"] = value
    return out


# --------------------------------------------------------------------------- load


def loadgen_args(
    target: Egress, proto: str, up: pb.Upstream, conc: int, opts: Options
) -> list[str]:
    return [
        "--mode", "rate", "--target", f"{pb.HOST}:{target.port_for(proto)}", "--proto", proto,
        "--dest", f"{pb.HOST}:{up.reqresp_port}",
        "--concurrency", str(conc), "--count", str(opts.max_count),
        "--seconds", str(opts.seconds), "--timeout", "10",
        "--req-size", str(pb.REQ_SIZE), "--resp-size", str(pb.RESP_SIZE),
    ]  # fmt: skip


def smoke_test(opts: Options, loadgen: Path, target: Egress, up: pb.Upstream) -> None:
    """20 connections per protocol must all pass (the refusing target's burst covers them);
    a Redis target must then be in mode "redis" with round trips counted."""
    for proto in opts.protos:
        args = loadgen_args(target, proto, up, 2, opts)
        args[args.index("--count") + 1] = "20"
        res = pb.run_loadgen(opts.loadgen_opts(), loadgen, args, timeout_s=30)
        if res["errors"] or res["connections"] != 20:
            raise pb.BenchError(
                f"{target.name}/{proto} smoke test failed: {res}\n{pb.tail(target.log_path)}"
            )
    seen = scrape(target)
    if target.name == UNLIMITED and seen["checks"]:
        raise pb.BenchError(f"{target.name}: the limiter was consulted: {seen}")
    if target.name != UNLIMITED and not seen["checks"]:
        raise pb.BenchError(f"{target.name}: no rate-limit decisions counted: {seen}")
    if target.name in (REDIS, REDIS_REFUSING) and not (seen["mode_redis"] and seen["round_trips"]):
        raise pb.BenchError(f"{target.name}: Redis is not the limiter in force: {seen}")


def disturbance(res: dict[str, Any]) -> str:
    """Why a case's number is not the proxy's own (empty when it is): something else used the
    proxy CPU, or under concurrency the proxy was not the bottleneck (its CPU had headroom,
    which on this machine means the load CPU was shared with someone else's work)."""
    cpu1 = res["cpu_busy"].get(f"cpu{pb.PROXY_CPU}", 0.0)
    if cpu1 - res["proxy_cpu_pct"] > 25.0:  # as run_proxy_bench's check
        return f"CPU {pb.PROXY_CPU} {cpu1:.0f}% busy, the proxy {res['proxy_cpu_pct']:.0f}%"
    if res["concurrency"] >= 8 and res["proxy_cpu_pct"] < 85.0:
        cpu0 = res["cpu_busy"].get(f"cpu{pb.LOAD_CPU}", 0.0)
        return f"proxy only {res['proxy_cpu_pct']:.0f}% busy (CPU {pb.LOAD_CPU} {cpu0:.0f}%)"
    return ""


def measure_once(
    opts: Options, loadgen: Path, target: Egress, up: pb.Upstream, *, proto: str, conc: int,
    redis_pid: int,
) -> dict[str, Any]:  # fmt: skip
    """One bounded load run against one target, with CPU and limiter accounting."""
    background = pb.wait_for_quiet(max_wait_s=opts.quiet_wait_s)
    load_avg = os.getloadavg()
    before = scrape(target)
    args = loadgen_args(target, proto, up, conc, opts)
    t0, ticks0 = time.monotonic(), pb.cpu_ticks()
    p0, r0 = pb.proc_cpu_s(target.proc.pid), pb.proc_cpu_s(redis_pid)
    res = pb.run_loadgen(opts.loadgen_opts(), loadgen, args, timeout_s=opts.seconds + 60)
    wall = max(1e-6, time.monotonic() - t0)
    proxy_cpu_s = pb.proc_cpu_s(target.proc.pid) - p0
    redis_cpu_s = pb.proc_cpu_s(redis_pid) - r0
    busy = pb.busy_percent(ticks0, pb.cpu_ticks())
    after = scrape(target)
    delta = {k: after[k] - before[k] for k in ("checks", "refused", "round_trips", "redis_errors")}
    attempts = int(res["connections"]) + int(res["errors"])
    res.update(
        target=target.name, proto=proto, concurrency=conc,
        attempts_per_s=round(attempts / float(res["elapsed_s"]), 1),
        proxy_cpu_pct=round(100.0 * proxy_cpu_s / wall, 1),
        proxy_cpu_us_per_attempt=round(1e6 * proxy_cpu_s / attempts, 1) if attempts else None,
        redis_cpu_pct=round(100.0 * redis_cpu_s / wall, 1),
        redis_cpu_us_per_attempt=round(1e6 * redis_cpu_s / attempts, 2) if attempts else None,
        cpu_busy=busy, background_busy_before=background,
        load_avg=[round(x, 2) for x in load_avg], limiter=delta,
        mode_redis_after=after["mode_redis"],
        round_trips_per_check=round(delta["round_trips"] / delta["checks"], 4)
        if delta["checks"] else None,
    )  # fmt: skip
    res["disturbed"] = disturbance(res)
    pb.log(
        f"{target.name}/{proto} c={conc}: {res['conn_per_s']:.0f} conn/s "
        f"({res['attempts_per_s']:.0f} attempts/s) p50={res['p50_us']}us p99={res['p99_us']}us "
        f"errors={res['errors']} proxy_cpu={res['proxy_cpu_pct']}% "
        f"({res['proxy_cpu_us_per_attempt']} us/attempt) redis_cpu={res['redis_cpu_pct']}% "
        f"checks={delta['checks']:.0f} round_trips={delta['round_trips']:.0f} "
        f"redis_errors={delta['redis_errors']:.0f} cpus={busy} load={res['load_avg']}"
        + (f" DISTURBED: {res['disturbed']}" if res["disturbed"] else "")
    )
    return res


def run_case(
    opts: Options, loadgen: Path, target: Egress, up: pb.Upstream, *, proto: str, conc: int,
    redis_pid: int, round_no: int,
) -> dict[str, Any]:  # fmt: skip
    """A case, run again (at most ``retries`` times) while the machine disturbed it; the
    discarded runs are kept in the result."""
    discarded: list[dict[str, Any]] = []
    while True:
        res = measure_once(opts, loadgen, target, up, proto=proto, conc=conc, redis_pid=redis_pid)
        if not res["disturbed"] or len(discarded) >= opts.retries:
            break
        discarded.append(res)
    res["round"] = round_no
    res["discarded"] = discarded
    return res


def run_rounds(
    opts: Options, loadgen: Path, targets: dict[str, Egress], up: pb.Upstream, redis_pid: int
) -> list[dict[str, Any]]:
    """Every (proto, concurrency) case against every target, ``rounds`` times; each round
    rotates the target order so drift of the machine's load does not favour one target."""
    out: list[dict[str, Any]] = []
    names = [n for n in TARGETS if n in targets]
    for round_no in range(opts.rounds):
        shift = round_no % len(names)
        order = names[shift:] + names[:shift]
        for proto in opts.protos:
            for conc in opts.concurrencies:
                for name in order:
                    target = targets[name]
                    if target.proc.poll() is not None:
                        raise pb.BenchError(
                            f"{name} exited with {target.proc.returncode}\n"
                            f"{pb.tail(target.log_path)}"
                        )
                    out.append(
                        run_case(
                            opts,
                            loadgen,
                            target,
                            up,
                            proto=proto,
                            conc=conc,
                            redis_pid=redis_pid,
                            round_no=round_no,
                        )
                    )
    return out


# --------------------------------------------------------------------------- report


def summarize(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the rounds for each (target, proto, concurrency)."""
    keys = sorted(
        {(c["target"], c["proto"], c["concurrency"]) for c in cases},
        key=lambda k: (k[1], k[2], TARGETS.index(k[0])),
    )
    rows: list[dict[str, Any]] = []
    for key in keys:
        runs = [c for c in cases if (c["target"], c["proto"], c["concurrency"]) == key]

        def med(field: str, runs: list[dict[str, Any]] = runs) -> float | None:
            values = [float(r[field]) for r in runs if r.get(field) is not None]
            return float(statistics.median(values)) if values else None

        checks = sum(r["limiter"]["checks"] for r in runs)
        trips = sum(r["limiter"]["round_trips"] for r in runs)
        rows.append(
            {
                "target": key[0], "proto": key[1], "concurrency": key[2], "rounds": len(runs),
                "conn_per_s": med("conn_per_s"),
                "attempts_per_s": med("attempts_per_s"),
                "per_round_conn_per_s": [r["conn_per_s"] for r in runs],
                "p50_us": med("p50_us"), "p99_us": med("p99_us"),
                "proxy_cpu_pct": med("proxy_cpu_pct"),
                "proxy_cpu_us_per_attempt": med("proxy_cpu_us_per_attempt"),
                "redis_cpu_pct": med("redis_cpu_pct"),
                "redis_cpu_us_per_attempt": med("redis_cpu_us_per_attempt"),
                "cpu0_busy_pct": float(
                    statistics.median(r["cpu_busy"].get(f"cpu{pb.LOAD_CPU}", 0.0) for r in runs)
                ),
                "errors": sum(int(r["errors"]) for r in runs),
                "refused": sum(r["limiter"]["refused"] for r in runs),
                "checks": checks, "round_trips": trips,
                "round_trips_per_check": trips / checks if checks else None,
                "redis_errors": sum(r["limiter"]["redis_errors"] for r in runs),
                "disturbed_kept": sum(1 for r in runs if r["disturbed"]),
                "discarded": sum(len(r["discarded"]) for r in runs),
                "load_avg_1m": [r["load_avg"][0] for r in runs],
            }
        )  # fmt: skip
    return rows


def ratio_text(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{100.0 * (value - base) / base:+.1f}%"


def _same_case(rows: Sequence[dict[str, Any]], row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        r["target"]: r
        for r in rows
        if (r["proto"], r["concurrency"]) == (row["proto"], row["concurrency"])
    }


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Redis vs memory for each (proto, concurrency): conn/s within 15 %, and Redis answered
    every check itself (no errors: a fallback to local buckets would flatter the Redis number).
    The proxy's CPU per connection is the same comparison seen from the cost side, which the
    machine's noise disturbs less; it is reported, the verdict is on conn/s."""
    out = []
    for row in rows:
        memory = _same_case(rows, row).get(MEMORY)
        if row["target"] != REDIS or memory is None or not memory["conn_per_s"]:
            continue
        ratio = row["conn_per_s"] / memory["conn_per_s"]
        cost = None
        if row["proxy_cpu_us_per_attempt"] and memory["proxy_cpu_us_per_attempt"]:
            cost = row["proxy_cpu_us_per_attempt"] / memory["proxy_cpu_us_per_attempt"]
        clean = row["redis_errors"] == 0 and row["errors"] == 0
        out.append(
            {
                "proto": row["proto"],
                "concurrency": row["concurrency"],
                "redis_vs_memory": round(ratio, 4),
                "redis_cpu_cost_vs_memory": round(cost, 4) if cost is not None else None,
                "redis_clean": clean,
                "pass": ratio >= 1.0 - WITHIN and clean,
            }
        )
    return out


def render(rows: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]], opts: Options) -> str:
    headers = [
        "target", "proto", "c", "conn/s", "attempts/s", "vs unlimited", "vs memory",
        "p50", "p99", "proxy cpu%", "proxy us/conn", "redis us/conn", "cpu0%", "redis rt/conn",
        "errors", "load 1m",
    ]  # fmt: skip
    body = []
    for row in rows:
        same = _same_case(rows, row)
        unlimited, memory = same.get(UNLIMITED), same.get(MEMORY)
        refusing, on_redis = (
            row["target"] == REDIS_REFUSING,
            row["target"] in (REDIS, REDIS_REFUSING),
        )
        rate = row["attempts_per_s"] if refusing else row["conn_per_s"]
        rt = row["round_trips_per_check"]
        loads = row["load_avg_1m"]
        errors = str(row["errors"]) + (f" ({row['refused']:.0f} refused)" if row["refused"] else "")
        if row["disturbed_kept"]:
            errors += f" [{row['disturbed_kept']} disturbed]"
        body.append(
            [
                row["target"], row["proto"], str(row["concurrency"]),
                pb.fmt_num(row["conn_per_s"]),
                pb.fmt_num(row["attempts_per_s"]) if refusing else "",
                ratio_text(rate, unlimited["attempts_per_s"] if unlimited else None)
                if row["target"] != UNLIMITED else "",
                ratio_text(row["conn_per_s"], memory["conn_per_s"] if memory else None)
                if row["target"] == REDIS else "",
                pb.fmt_us(int(row["p50_us"] or 0)), pb.fmt_us(int(row["p99_us"] or 0)),
                pb.fmt_num(row["proxy_cpu_pct"]),
                pb.fmt_num(row["proxy_cpu_us_per_attempt"]),
                pb.fmt_num(row["redis_cpu_us_per_attempt"], 1) if on_redis else "",
                pb.fmt_num(row["cpu0_busy_pct"]),
                f"{rt:.3f}" if rt is not None and on_redis else "",
                errors, f"{min(loads):.1f}-{max(loads):.1f}",
            ]
        )  # fmt: skip
    title = (
        f"connections/s through egress: handshake + {pb.REQ_SIZE} B request + {pb.RESP_SIZE} B "
        f"response + close; median of {opts.rounds} rounds of {opts.seconds:g} s; "
        "latency = connect start -> first response byte"
    )
    lines = [title, pb.table(headers, body), ""]
    if REDIS_REFUSING in {r["target"] for r in rows}:
        lines.append(
            f"{REDIS_REFUSING}: limit {opts.refuse_rate:g}/s burst {opts.refuse_burst}; conn/s = "
            "admitted, attempts/s = admitted + refused (429 / SOCKS5 0x02, which the load "
            "generator counts as errors); its 'vs unlimited' compares attempts/s"
        )
    lines += [
        "us/conn = CPU microseconds (user + system) per connection attempt, of the proxy and of "
        "redis-server",
        "redis rt/conn = Redis round trips / rate-limit checks (egress_ratelimit_redis_seconds_"
        "count over egress_ratelimit_decisions_total{limit=connections}); < 1 is batching",
    ]
    discarded = sum(r["discarded"] for r in rows)
    if discarded:
        lines.append(
            f"{discarded} disturbed runs were measured again (see 'discarded' in the JSON); "
            "[N disturbed] = runs still disturbed after the retries, kept"
        )
    for v in checks:
        verdict = "PASS" if v["pass"] else "FAIL"
        why = "" if v["redis_clean"] else " (Redis errors or failed connections: not clean)"
        cost = v["redis_cpu_cost_vs_memory"]
        cost_text = f"; proxy CPU per connection {cost:.1%} of memory's" if cost else ""
        lines.append(
            f"{verdict}: redis within {WITHIN:.0%} of memory, {v['proto']} c={v['concurrency']}: "
            f"{v['redis_vs_memory']:.1%} of memory's conn/s{cost_text}{why}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 rounds of 2 s, c=32 only")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per case (default 5)")
    p.add_argument("--concurrency", default=None, help="comma-separated (default 1,32; quick 32)")
    p.add_argument("--protos", default="connect,socks5", help="connect,socks5 or one of them")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    p.add_argument("--refuse-rate", type=float, default=500.0, help="redis-refusing's rate")
    p.add_argument("--refuse-burst", type=int, default=50, help="redis-refusing's burst")
    p.add_argument(
        "--quiet-wait", type=float, default=8.0,
        help="seconds to wait, at most, for both CPUs to be under 15%% busy before a case",
    )  # fmt: skip
    p.add_argument(
        "--retries", type=int, default=2,
        help="runs of a case again, at most, when the machine disturbed it (default 2)",
    )  # fmt: skip
    p.add_argument("--uid", type=int, default=20001, help="uid of the load generator")
    p.add_argument(
        "--cprofile", action="store_true",
        help="run the memory and redis targets under cProfile (perturbs them); writes "
        "bench/results/ratelimit-{memory,redis}.pstats",
    )  # fmt: skip
    p.add_argument(
        "--code-dir", type=Path, default=pb.REPO_DIR,
        help="run egress from this directory (a copy with an experimental change; its "
        "egress/, rules/ and ratelimit/ shadow the checkout's, as for run_proxy_bench's "
        "egress@REV worktrees)",
    )  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="JSON results file")
    a = p.parse_args(argv)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    for t in targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
    protos = tuple(x.strip() for x in a.protos.split(",") if x.strip())
    for proto in protos:
        if proto not in ("connect", "socks5"):
            p.error(f"unknown protocol {proto!r}")
    conc = a.concurrency or ("32" if a.quick else "1,32")
    rounds = a.rounds if a.rounds is not None else 3
    if rounds < 1:
        p.error("--rounds must be at least 1")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Options(
        rounds=rounds,
        seconds=a.seconds if a.seconds is not None else (2.0 if a.quick else 5.0),
        concurrencies=tuple(int(c) for c in conc.split(",")),
        protos=protos,
        targets=targets,
        refuse_rate=a.refuse_rate,
        refuse_burst=a.refuse_burst,
        quiet_wait_s=a.quiet_wait,
        retries=a.retries,
        max_count=2_000_000,
        bench_uid=a.uid if os.geteuid() == 0 else os.getuid(),
        cprofile=a.cprofile,
        results_path=a.output or pb.RESULTS_DIR / f"ratelimit-{stamp}.json",
        code_dir=a.code_dir.resolve(),
    )


def check_code_dir(code_dir: Path) -> dict[str, Any]:
    """Which egress a target started in ``code_dir`` imports; stop if any project module
    would come from the main checkout instead (run_proxy_bench's check for worktrees)."""
    res = subprocess.run(
        [str(pb.VENV_PYTHON), "-c", pb._CODE_CHECK, str(pb.REPO_DIR)],
        cwd=code_dir, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"importing egress in {code_dir} failed: {res.stderr.strip()[-800:]}")
    found: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    if found["stray"]:
        raise SystemExit(f"modules imported from outside {code_dir}: {found['stray']}")
    pb.log(f"egress from {code_dir}: egress.__file__ = {found['egress_file']}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        pb.log("not root: the load generator runs as the current uid")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(pb.LOAD_CPU)})  # the driver mostly sleeps
    nofile = pb.raise_nofile()
    loadgen, upstream_exe = pb.build_c_tools()
    pb.RESULTS_DIR.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(opts).items()
            },
            "rlimit_nofile": nofile,
            "versions": pb.versions(),
            "redis_server": subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "pinning": {"proxies": pb.PROXY_CPU, "loadgen_upstream_redis": pb.LOAD_CPU},
            "load_avg_start": os.getloadavg(),
            "command": " ".join([sys.executable, *sys.argv]),
        },
        "cases": [],
        "summary": [],
        "verdicts": [],
        "error": None,
    }
    if opts.code_dir != pb.REPO_DIR:
        results["meta"]["code_dir"] = check_code_dir(opts.code_dir)
    status = 0
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="egress-rl-bench-")))
        tmp.chmod(0o755)
        try:
            up = stack.enter_context(pb.upstream_server(upstream_exe))
            redis = stack.enter_context(redis_server(tmp / "redis"))
            targets = {
                name: stack.enter_context(start_egress(name, opts, tmp / name, redis.url))
                for name in opts.targets
            }
            for target in targets.values():
                smoke_test(opts, loadgen, target, up)
            results["cases"] = run_rounds(opts, loadgen, targets, up, redis.proc.pid)
        except pb.BenchError as exc:
            pb.log(str(exc))
            results["error"] = str(exc)
            status = 1
    results["meta"]["load_avg_end"] = os.getloadavg()
    results["summary"] = summarize(results["cases"])
    results["verdicts"] = verdicts(results["summary"])
    if results["summary"]:
        print(render(results["summary"], results["verdicts"], opts))
    opts.results_path.parent.mkdir(parents=True, exist_ok=True)
    opts.results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {opts.results_path}")
    if status == 0 and results["verdicts"] and not all(v["pass"] for v in results["verdicts"]):
        status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
