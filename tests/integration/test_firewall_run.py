"""`egress firewall run`: the reconcile loop repairs drift, follows config changes, keeps the
last good plan on a bad config, exports metrics, and leaves the rules in place on SIGTERM.

Runs as root inside a network namespace the test creates (nft variant, the host default).
"""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configs import write_config
from tests.netns import network_namespace
from tests.processes import EgressProcess, start_firewall_controller
from tests.support import APP_UID, OTHER_APP_UID, socket_as_uid

pytestmark = pytest.mark.netns

METRICS_PORT = 19091
SCRAPE_ERRORS = (OSError,)  # the metrics endpoint is not up yet


def controller_config(apps: dict[str, int], **last_app_extra: Any) -> dict[str, Any]:
    """The controller's config: one app per ``apps`` entry (name: uid), each allowed
    10.77.0.1:80; ``last_app_extra`` lands in the last app's table (e.g. a bogus key)."""
    tables = [
        {"name": name, "uids": [str(uid)], "allow": ["10.77.0.1:80"]} for name, uid in apps.items()
    ]
    tables[-1].update(last_app_extra)
    return {
        "proxy": {"socks5_listen": ["127.0.0.1:1080"]},
        "firewall": {
            "sandbox_uids": ["10000-10999"],
            "interval": 0.3,
            "metrics_listen": f"127.0.0.1:{METRICS_PORT}",
        },
        "app": tables,
    }


def metrics() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=2) as reply:
        return reply.read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+]+)"
    match = re.search(pattern, text)
    return float(match[1]) if match else 0.0


def egress_lines() -> list[str]:
    saved = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True)
    return [line for line in saved.stdout.splitlines() if "egress" in line]


def assert_app_is_blocked() -> None:
    """A direct connection from the app's uid is reset by the firewall at once."""
    sock = socket_as_uid(APP_UID)
    sock.setblocking(True)
    sock.settimeout(2)
    try:
        with pytest.raises(ConnectionRefusedError):
            sock.connect(("10.77.0.1", 80))
    finally:
        sock.close()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[EgressProcess, Path]]:
    config = write_config(tmp_path / "egress.toml", controller_config({"blog": APP_UID}))
    with (
        network_namespace(addresses=("10.77.0.1/32",)),
        start_firewall_controller(config) as process,
    ):
        process.wait_for(
            lambda: metric(metrics(), "egress_firewall_sync_total", 'result="ok"') >= 1,
            "first sync",
            ignoring=SCRAPE_ERRORS,
        )
        yield process, config


def test_run_repairs_drift_and_counts_it(
    controller: tuple[EgressProcess, Path],
) -> None:
    process, _ = controller
    installed = egress_lines()
    sandbox = [line for line in installed if line.startswith("-A EGRESS-SANDBOX ")]
    position, victim = next((n, line) for n, line in enumerate(sandbox, 1) if "app=blog" in line)
    subprocess.run(["iptables", "-D", "EGRESS-SANDBOX", str(position)], check=True)
    assert victim not in egress_lines()
    process.wait_for(lambda: victim in egress_lines(), "the deleted rule is put back")
    # The pass records its metrics just after its commit lands: wait for them too.
    drift = 'family="ipv4",table="filter"'
    process.wait_for(
        lambda: metric(metrics(), "egress_firewall_drift_repairs_total", drift) >= 1,
        "the repair is counted as drift",
        ignoring=SCRAPE_ERRORS,
    )
    text = metrics()
    assert metric(text, "egress_firewall_rules", 'family="ipv4",table="filter"') == len(installed)
    assert metric(text, "egress_firewall_backend_info", 'backend="iptables-restore (nft)"') == 1
    assert metric(text, "egress_firewall_last_sync_success_timestamp_seconds") > 0


def test_run_follows_config_changes_and_keeps_the_last_good_plan(
    controller: tuple[EgressProcess, Path],
) -> None:
    process, config = controller
    write_config(config, controller_config({"blog": APP_UID, "shop": OTHER_APP_UID}))
    process.wait_for(
        lambda: any("app=shop" in line for line in egress_lines()), "new app installed"
    )
    before = metrics()
    assert (
        metric(before, "egress_firewall_drift_repairs_total", 'family="ipv4",table="filter"') == 0
    )
    write_config(config, controller_config({"blog": APP_UID}, bogus=1))
    process.wait_for(
        lambda: metric(metrics(), "egress_firewall_sync_total", 'result="config_error"') >= 1,
        "the bad config is counted",
        ignoring=SCRAPE_ERRORS,
    )
    assert any("app=shop" in line for line in egress_lines()), "last good plan kept"


def test_run_exports_blocked_packets_per_app(
    controller: tuple[EgressProcess, Path],
) -> None:
    process, _ = controller
    for _ in range(3):
        assert_app_is_blocked()
    process.wait_for(
        lambda: metric(metrics(), "egress_firewall_blocked_packets", 'app="blog"') >= 3,
        "blocked packets counted for blog",
        ignoring=SCRAPE_ERRORS,
    )


def test_sigterm_leaves_the_rules_in_place(controller: tuple[EgressProcess, Path]) -> None:
    process, _ = controller
    installed = egress_lines()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert egress_lines() == installed  # fail closed: a stopped controller opens nothing
    assert_app_is_blocked()
