#!/usr/bin/env python3
"""How long a committed rules edit takes to be in force on every node.

Run from the repository root (needs ``redis-server``; loopback only; about 30 s):

    .venv/bin/python bench/rules_propagation.py [--proxies 3] [--edits 30] [--apps 1000]

One real ``redis-server`` on a free port holds ``--apps`` apps; ``--proxies`` real ``egress
proxy`` processes follow it (``[rules].check_interval`` 2 s: the change feed is what is
measured). Each of ``--edits`` commits (``AddRules`` to one app, as the CLI and the API commit)
is timed from the commit's return until every node's ``/metrics`` shows the new
``egress_rules_version`` (polled every 10 ms, so the figures include up to 10 ms of polling;
polling faster loads the nodes it measures). The same-run baseline is a proxy on the file
store, which notices its config file change by polling it twice a second. The nodes' own
``egress_rules_propagation_seconds`` histogram (store commit, by the store's clock, to the
snapshot in force) is printed too.

Every loop is bounded: ``--edits`` commits, each waited for at most 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egress.config import load_config
from egress.stores import open_store
from rules.apps import RuleSet
from rules.edits import AddRules, ReplaceAll
from rules.parse import parse_rule
from rules.stores.base import Actor, RuleStore
from tests.configs import base_config, write_config
from tests.processes import EgressProcess, start_proxy
from tests.redisserver import RedisServer

ACTOR = Actor("bench", "cli", "bench")
WAIT_S = 5.0
POLL_S = 0.01


def apps_data(count: int) -> list[dict[str, object]]:
    return [
        {
            "name": f"app{i}",
            "uids": [str(20000 + i)],
            "allow": [
                f"a{i}.example.com:443",
                f"*.s{i}.example.net:80,443",
                "192.0.2.0/24:8000-8100",
            ],
        }
        for i in range(count)
    ]


def proxy_config(directory: Path, name: str, **sections: object) -> Path:
    data = base_config(admin={"listen": "127.0.0.1:0"}, **sections)
    data["log"] = {"connection_log": str(directory / f"{name}.log"), "level": "info"}
    return write_config(directory / f"{name}.toml", data)


def version_of(proxy: EgressProcess) -> int:
    assert proxy.started is not None
    url = f"http://{proxy.started['admin']}/metrics"
    with urllib.request.urlopen(url, timeout=2) as reply:
        text = reply.read().decode()
    found = re.search(r"^egress_rules_version ([0-9.e+]+)$", text, re.MULTILINE)
    return int(float(found[1])) if found else -1


def histogram(proxy: EgressProcess) -> tuple[float, float]:
    assert proxy.started is not None
    url = f"http://{proxy.started['admin']}/metrics"
    with urllib.request.urlopen(url, timeout=2) as reply:
        text = reply.read().decode()
    total = re.search(r"^egress_rules_propagation_seconds_sum ([0-9.e+-]+)$", text, re.M)
    count = re.search(r"^egress_rules_propagation_seconds_count ([0-9.e+-]+)$", text, re.M)
    return (float(total[1]) if total else 0.0), (float(count[1]) if count else 0.0)


async def measure(store: RuleStore, proxies: list[EgressProcess], edits: int) -> list[float]:
    """Seconds from each commit's return until every proxy runs its version."""
    lags = []
    for index in range(edits):
        rule = parse_rule(f"e{index}.example.org:443")
        # A file-store proxy's version may run ahead of the file's: wait for it to move.
        before = [version_of(proxy) for proxy in proxies]
        await store.commit(AddRules("app0", (rule,)), ACTOR)
        done = time.perf_counter()
        pending = set(range(len(proxies)))
        deadline = done + WAIT_S
        while pending and time.perf_counter() < deadline:
            for node in list(pending):
                if version_of(proxies[node]) > before[node]:
                    pending.discard(node)
            if pending:
                await asyncio.sleep(POLL_S)
        if pending:
            raise SystemExit(f"edit {index}: nodes {sorted(pending)} not there after {WAIT_S} s")
        lags.append(time.perf_counter() - done)
        await asyncio.sleep(0.05)  # let the nodes settle between edits
    return lags


def row(name: str, lags: list[float], proxies: list[EgressProcess]) -> str:
    lags_ms = sorted(lag * 1000 for lag in lags)
    p95 = lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.95))]
    sums = [histogram(proxy) for proxy in proxies]
    server = sum(s for s, _ in sums) / max(1.0, sum(c for _, c in sums)) * 1000
    return (
        f"{name:<34} {statistics.median(lags_ms):>8.1f} {p95:>8.1f} {lags_ms[-1]:>8.1f}"
        f" {server:>14.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxies", type=int, default=3)
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--apps", type=int, default=1000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="egress-prop-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        server = stack.enter_context(RedisServer(directory / "redis"))
        seed = RuleSet.from_data({"app": apps_data(opts.apps)}, version=0, source="bench")
        redis_configs = [
            proxy_config(
                directory,
                f"redis-{i}",
                rules={"store": "redis", "check_interval": 2.0},
                redis={"url": server.url},
            )
            for i in range(opts.proxies)
        ]
        file_config = proxy_config(directory, "file")
        data = base_config(app=apps_data(opts.apps))
        data["proxy"] = {"socks5_listen": ["127.0.0.1:0"]}
        data["admin"] = {"listen": "127.0.0.1:0"}
        data["log"] = {"connection_log": str(directory / "file.log"), "level": "info"}
        write_config(file_config, data)

        async def seed_store() -> None:
            store = open_store(load_config(redis_configs[0]))
            await store.commit(ReplaceAll(seed), ACTOR)
            await store.aclose()

        asyncio.run(seed_store())
        redis_proxies = [stack.enter_context(start_proxy(c, timeout=30)) for c in redis_configs]
        file_proxy = stack.enter_context(start_proxy(file_config, timeout=30))

        async def run() -> tuple[list[float], list[float]]:
            redis_store = open_store(load_config(redis_configs[0]))
            file_store = open_store(load_config(file_config))
            try:
                over_redis = await measure(redis_store, redis_proxies, opts.edits)
                over_file = await measure(file_store, [file_proxy], opts.edits)
            finally:
                await redis_store.aclose()
                await file_store.aclose()
            return over_redis, over_file

        over_redis, over_file = asyncio.run(run())
        print(f"{opts.edits} edits of one app among {opts.apps}; commit to in force, ms")
        print(f"{'':<34} {'p50':>8} {'p95':>8} {'max':>8} {'node-side mean':>14}")
        print(row(f"redis feed, all {opts.proxies} nodes", over_redis, redis_proxies))
        print(row("file store, 1 node (baseline)", over_file, [file_proxy]))


if __name__ == "__main__":
    main()
