"""Firewall backends against real iptables, as root, each test in a network namespace it creates.

The same suite runs for iptables-restore (legacy and nft variants) and python-iptables.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from egress.config import Config, FirewallBackend
from egress.firewall.backend import Backend
from egress.firewall.backend_restore import RestoreBackend, tool_name
from egress.firewall.detect import BackendRefusedError, choose_backend, host_iptables_mode
from egress.firewall.plan import FirewallPlan, build_plan
from egress.firewall.sync import flush, status, sync_once
from tests.configs import config_from
from tests.netns import NetworkNamespace
from tests.support import APP_UID, socket_as_uid

pytestmark = pytest.mark.netns

BACKENDS = ["legacy", "nft", "iptc"]


def make_backend(name: str) -> Backend:
    if name == "iptc":
        from egress.firewall.backend_iptc import IptcBackend

        return IptcBackend()
    return RestoreBackend(name)  # type: ignore[arg-type]


def variant(name: str) -> str:
    return "nft" if name == "nft" else "legacy"


def config(apps: int = 3, **firewall: Any) -> Config:
    data: dict[str, Any] = {
        "proxy": {
            "socks5_listen": ["127.0.0.1:1080", "[::1]:1080"],
            "http_listen": ["127.0.0.1:3128"],
            "transparent_listen": "127.0.0.1:15001",
        },
        "firewall": {"sandbox_uids": ["10000-59999"], **firewall},
        "app": [{"name": f"app{i}", "uids": [str(APP_UID + i)], "allow": []} for i in range(apps)],
    }
    return config_from(data)


def iptables(name: str, *args: str, family: str = "ipv4") -> str:
    base = "iptables" if family == "ipv4" else "ip6tables"
    result = subprocess.run(
        [f"{base}-{variant(name)}", "-w", *args], capture_output=True, text=True, check=True
    )
    return result.stdout


def saved(name: str, table: str = "filter", family: str = "ipv4") -> list[str]:
    tool = tool_name(family, variant(name), "save")  # type: ignore[arg-type]
    text = subprocess.run([tool, "-t", table], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines() if line.startswith("-A ")]


def planned(plan: FirewallPlan, family: str, table: str) -> list[str]:
    tp = plan.table(family, table)  # type: ignore[arg-type]
    return [rule.line for rules in tp.chains.values() for rule in rules]


def ours(lines: list[str]) -> list[str]:
    return [line for line in lines if line.split()[1].startswith("EGRESS-")]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("mode", ["explicit", "transparent"])
def test_first_sync_installs_exactly_the_plan_second_changes_nothing(
    netns: NetworkNamespace, name: str, mode: str
) -> None:
    backend = make_backend(name)
    plan = build_plan(config(mode=mode))
    first = sync_once(backend, plan)
    assert first.changed and first.drift_repairs == 0
    for family in ("ipv4", "ipv6"):
        for table in ("filter", "nat"):
            lines = saved(name, table, family)
            assert sorted(ours(lines)) == sorted(planned(plan, family, table))
            jump = plan.table(family, table).jump  # type: ignore[arg-type]
            jumps = [line for line in lines if line.startswith("-A OUTPUT")]
            assert jumps == ([f"-A OUTPUT {jump}"] if jump else [])
    started = time.monotonic()
    second = sync_once(backend, plan)
    assert not second.changed
    assert time.monotonic() - started < 0.5
    reports, _ = status(backend, plan)
    assert all(report.in_sync for report in reports)


@pytest.mark.parametrize("name", BACKENDS)
def test_hand_edits_are_repaired_and_counted_as_drift(netns: NetworkNamespace, name: str) -> None:
    backend = make_backend(name)
    plan = build_plan(config())
    sync_once(backend, plan)
    iptables(name, "-D", "EGRESS-SANDBOX", "3")  # a listener/app rule vanishes
    iptables(name, "-I", "EGRESS-SANDBOX", "1", "-j", "ACCEPT")  # an opening is added
    reports, _ = status(backend, plan)
    v4 = reports[0]
    assert v4.drift and not v4.in_sync
    assert v4.unexpected == [("-A EGRESS-SANDBOX -j ACCEPT", False)]
    assert len(v4.missing) == 1
    result = sync_once(backend, plan)
    assert result.tables[0].drift_repairs == 2  # one delete, one insert: minimal
    assert sorted(ours(saved(name))) == sorted(planned(plan, "ipv4", "filter"))
    # The jump removed by hand, and a duplicate one at the end: back to exactly one, first.
    jump = plan.table("ipv4", "filter").jump or ""
    iptables(name, "-D", "OUTPUT", "1")
    iptables(name, "-I", "OUTPUT", "1", "-j", "ACCEPT")
    iptables(name, "-A", "OUTPUT", "-j", "EGRESS-OUTPUT")
    result = sync_once(backend, plan)
    assert result.drift_repairs > 0
    assert [line for line in saved(name) if line.startswith("-A OUTPUT")] == [
        f"-A OUTPUT {jump}",
        "-A OUTPUT -j ACCEPT",
    ]


@pytest.mark.parametrize("name", BACKENDS)
def test_config_change_is_not_drift_and_foreign_rules_survive_sync_and_flush(
    netns: NetworkNamespace, name: str
) -> None:
    backend = make_backend(name)
    iptables(name, "-N", "FOREIGN")
    iptables(name, "-A", "FOREIGN", "-p", "udp", "-j", "ACCEPT")
    iptables(name, "-A", "OUTPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    iptables(name, "-A", "OUTPUT", "-j", "FOREIGN")
    foreign = [line for line in saved(name) if "EGRESS" not in line]
    sync_once(backend, build_plan(config(apps=3)))
    changed = sync_once(backend, build_plan(config(apps=5, mode="transparent")))
    assert changed.changed and changed.drift_repairs == 0
    back = sync_once(backend, build_plan(config(apps=2)))  # nat chains removed again
    assert back.changed and not ours(saved(name, "nat"))
    assert [line for line in saved(name) if "EGRESS" not in line] == foreign
    flush(backend)
    for family in ("ipv4", "ipv6"):
        for table in ("filter", "nat"):
            assert not [line for line in saved(name, table, family) if "EGRESS" in line]
    assert saved(name) == foreign
    chains = subprocess.run(
        [tool_name("ipv4", variant(name), "save"), "-t", "filter"],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ":FOREIGN" in chains and ":EGRESS" not in chains


@pytest.mark.parametrize("name", BACKENDS)
def test_counters_per_app(netns: NetworkNamespace, name: str) -> None:
    backend = make_backend(name)
    plan = build_plan(config())
    sync_once(backend, plan)
    for _ in range(3):  # three TCP connects from app0's uid: each rejected (RST) and counted
        sock = socket_as_uid(APP_UID)
        sock.setblocking(True)
        with pytest.raises(OSError):
            sock.connect(("127.0.0.1", 9))
        sock.close()
    sock = socket_as_uid(APP_UID + 500)  # a sandbox uid in no app
    sock.setblocking(True)
    with pytest.raises(OSError):
        sock.connect(("127.0.0.1", 9))
    sock.close()
    result = sync_once(backend, plan)
    assert result.counters["app0"] == 3
    assert result.counters["app1"] == 0
    assert result.counters["_unassigned"] == 1


@pytest.mark.parametrize("name", BACKENDS)
def test_two_racing_instances_leave_exactly_the_plan(netns: NetworkNamespace, name: str) -> None:
    script = (
        "import sys\n"
        "from tests.integration.test_firewall_backends import config, make_backend\n"
        "from egress.firewall.plan import build_plan\n"
        "from egress.firewall.sync import sync_once\n"
        "for _ in range(3):\n"
        "    sync_once(make_backend(sys.argv[1]), build_plan(config(apps=200)))\n"
    )
    root = Path(__file__).resolve().parents[2]
    children = [
        subprocess.Popen([sys.executable, "-c", script, name], cwd=root, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    plan = build_plan(config(apps=200))
    assert sorted(ours(saved(name))) == sorted(planned(plan, "ipv4", "filter"))
    assert len([line for line in saved(name) if line.startswith("-A OUTPUT")]) == 1


def test_iptc_on_an_nft_host_is_refused() -> None:
    with pytest.raises(BackendRefusedError, match="iptables-restore"):
        choose_backend(FirewallBackend.IPTC, "nft")
    assert isinstance(choose_backend(FirewallBackend.AUTO, "nft"), RestoreBackend)
    assert choose_backend(FirewallBackend.AUTO, "legacy").name == "iptc"
    restore = choose_backend(FirewallBackend.IPTABLES_RESTORE, "legacy")
    assert isinstance(restore, RestoreBackend) and restore.variant == "legacy"


def test_host_mode_detection_reads_iptables_version(tmp_path: Path) -> None:
    fake = tmp_path / "iptables"
    for text, mode in (("(nf_tables)", "nft"), ("(legacy)", "legacy")):
        fake.write_text(f"#!/bin/sh\necho 'iptables v1.8.9 {text}'\n")
        fake.chmod(0o755)
        assert host_iptables_mode(str(fake)) == mode
