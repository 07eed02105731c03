#!/usr/bin/env python3
"""How long ``egress proxy`` takes to start with 10,000 apps, from the file and from Redis.

Run from the repository root (needs ``redis-server``; loopback only; about 30 s):

    .venv/bin/python bench/rules_start.py [--apps 10000] [--runs 3]

Each start is timed from the process launch until its "proxy started" log line (listeners
open, rules compiled and in force), median of ``--runs``. The same-run baseline is a start
with no apps (interpreter, imports, listeners), so the difference is what loading the apps
costs: the TOML file read and checked, or the Redis store read (one script, then every app
parsed in a thread), then the snapshot compiled. Every start is bounded by a 60 s timeout
and the process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from rules_propagation import ACTOR, apps_data  # noqa: E402

from egress.config import load_config  # noqa: E402
from egress.stores import open_store  # noqa: E402
from rules.apps import RuleSet  # noqa: E402
from rules.edits import ReplaceAll  # noqa: E402
from tests.configs import base_config, write_config  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

TIMEOUT_S = 60.0


def start_seconds(config: Path) -> float:
    """Launch to "proxy started", in seconds; the proxy is stopped after."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "egress.cli", "proxy", "--config", str(config)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = started + TIMEOUT_S
        for line in proc.stderr:
            if '"proxy started"' in line:
                return time.perf_counter() - started
            if time.perf_counter() > deadline:
                break
        raise SystemExit(f"{config}: no 'proxy started' within {TIMEOUT_S} s")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def config_for(directory: Path, name: str, **sections: object) -> Path:
    data = base_config(**sections)
    data["log"] = {"connection_log": str(directory / f"{name}.log")}
    return write_config(directory / f"{name}.toml", data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--apps", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    apps = apps_data(opts.apps)
    with tempfile.TemporaryDirectory(prefix="egress-start-") as tmp:
        directory = Path(tmp)
        empty = config_for(directory, "empty")
        from_file = config_for(directory, "file", app=apps)
        with RedisServer(directory / "redis") as server:
            from_redis = config_for(
                directory, "redis", rules={"store": "redis"}, redis={"url": server.url}
            )

            async def seed() -> None:
                store = open_store(load_config(from_redis))
                rule_set = RuleSet.from_data({"app": apps}, version=0, source="bench")
                await store.commit(ReplaceAll(rule_set), ACTOR)
                await store.aclose()

            asyncio.run(seed())
            rows = []
            for name, config in (
                ("no apps (baseline)", empty),
                (f"{opts.apps} apps, file store", from_file),
                (f"{opts.apps} apps, Redis store", from_redis),
            ):
                rows.append(
                    (name, statistics.median(start_seconds(config) for _ in range(opts.runs)))
                )
    baseline = rows[0][1]
    print(f"egress proxy start, launch to 'proxy started' (median of {opts.runs})")
    print(f"{'':<28} {'start s':>8} {'apps cost s':>12}")
    for name, seconds in rows:
        print(f"{name:<28} {seconds:>8.2f} {seconds - baseline:>12.2f}")


if __name__ == "__main__":
    main()
