"""Firewall sync timing: a 1,000-app config, full sync and no-change pass, per backend.

Runs as root in a network namespace it creates and deletes (never the host's firewall):

    sudo .venv/bin/python bench/firewall_sync.py [--apps 1000] [--repeat 3]

Baselines: ``iptables-legacy-restore --noflush`` of the same rules and ``iptables-legacy-save``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egress.config import parse_config
from egress.firewall.backend import Backend
from egress.firewall.backend_iptc import IptcBackend
from egress.firewall.backend_restore import RestoreBackend
from egress.firewall.plan import build_plan
from egress.firewall.sync import flush, sync_once
from tests.support import network_namespace


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data: dict[str, Any] = {
        "proxy": {"socks5_listen": ["127.0.0.1:1080"], "http_listen": ["127.0.0.1:3128"]},
        "firewall": {"sandbox_uids": ["10000-59999"]},
        "app": [{"name": f"app{i}", "uids": [str(10001 + i)]} for i in range(args.apps)],
    }
    plan = build_plan(parse_config(data, source="bench"))
    table = plan.table("ipv4", "filter")
    rules = [f":{name} - [0:0]" for name in table.chains]
    rules += [f"-A OUTPUT {table.jump}"]
    rules += [rule.line for chain in table.chains.values() for rule in chain]
    restore_text = "*filter\n" + "\n".join(rules) + "\nCOMMIT\n"
    print(f"{args.apps} apps, {table.rule_count} rules per family (filter); best of {args.repeat}")
    print(f"{'backend':28} {'full sync':>10} {'no change':>10} {'drift fix':>10}")
    backends: list[tuple[str, Callable[[], Backend]]] = [
        ("iptables-restore (legacy)", lambda: RestoreBackend("legacy")),
        ("iptables-restore (nft)", lambda: RestoreBackend("nft")),
        ("iptc", IptcBackend),
    ]
    with network_namespace():
        for name, make in backends:
            backend = make()
            full, idle, fix = [], [], []
            for _ in range(args.repeat):
                flush(backend)
                full.append(timed(lambda b=backend: sync_once(b, plan)))  # type: ignore[misc]
                idle.append(timed(lambda b=backend: sync_once(b, plan)))  # type: ignore[misc]
                tool = "iptables-nft" if name.endswith("(nft)") else "iptables-legacy"
                subprocess.run([tool, "-w", "-D", "EGRESS-SANDBOX", "500"], check=True)
                fix.append(timed(lambda b=backend: sync_once(b, plan)))  # type: ignore[misc]
            flush(backend)
            print(
                f"{name:28} {min(full) * 1000:8.0f}ms {min(idle) * 1000:8.1f}ms"
                f" {min(fix) * 1000:8.1f}ms"
            )
        base_restore, base_save = [], []
        for _ in range(args.repeat):
            flush(RestoreBackend("legacy"))
            base_restore.append(
                timed(
                    lambda: subprocess.run(
                        ["iptables-legacy-restore", "--noflush", "-w"],
                        input=restore_text,
                        text=True,
                        check=True,
                    )
                )
            )
            base_save.append(
                timed(
                    lambda: subprocess.run(
                        ["iptables-legacy-save", "-t", "filter"], capture_output=True, check=True
                    )
                )
            )
        flush(RestoreBackend("legacy"))
        print(
            f"{'baseline legacy-restore':28} {min(base_restore) * 1000:8.0f}ms (ipv4 filter only)"
        )
        print(f"{'baseline legacy-save':28} {min(base_save) * 1000:8.1f}ms (ipv4 filter only)")


if __name__ == "__main__":
    main()
