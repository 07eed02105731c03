"""Many nodes, one Redis: three ``egress proxy`` processes follow an edit made through the
admin API of one of them within a second, keep their rules while Redis is down, and catch up
when it is back; a firewall controller in a network namespace follows the same store.

Real processes, a real ``redis-server`` on a free port, real SOCKS5 clients under the app's uid.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.configs import base_config, write_config
from tests.netns import network_namespace
from tests.polling import wait_until
from tests.processes import EgressProcess, run_egress, start_firewall_controller, start_proxy
from tests.redisserver import RedisServer
from tests.support import APP_UID, OTHER_APP_UID, socket_as_uid

pytestmark = pytest.mark.root

TOKEN = "propagation-test-token"


def proxy_config(redis_url: str, tmp_path: Path, index: int, **rules: Any) -> Path:
    data = base_config(
        rules={"store": "redis", "check_interval": 0.5, **rules},
        redis={"url": redis_url},
        security={"allow_special": ["127.0.0.0/8"]},
        admin={
            "listen": "127.0.0.1:0",
            "tokens": [
                {
                    "name": "ops",
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                    "role": "write",
                }
            ],
        },
        app=[],
    )
    data["log"]["connection_log"] = str(tmp_path / f"conn-{index}.log")
    return write_config(tmp_path / f"proxy-{index}.toml", data)


def seed_file(tmp_path: Path, allow: list[str]) -> Path:
    data = {"app": [{"name": "blog", "uids": [str(APP_UID)], "allow": allow}]}
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(data))
    return path


def socks5_code(proxy: EgressProcess, port: int) -> int:
    """A SOCKS5 CONNECT to 127.0.0.1:port as the app's uid; the reply code."""
    host, socks_port = listener(proxy, "socks5")
    sock = socket_as_uid(APP_UID)
    sock.setblocking(True)
    sock.settimeout(3)
    try:
        sock.connect((host, socks_port))
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        reply = sock.recv(10)
        return reply[1]
    finally:
        sock.close()


def listener(proxy: EgressProcess, kind: str) -> tuple[str, int]:
    assert proxy.started is not None
    found = re.search(rf"{kind}=([0-9.]+):([0-9]+)", proxy.started["listeners"])
    assert found, proxy.started
    return found[1], int(found[2])


def admin_url(proxy: EgressProcess) -> str:
    assert proxy.started is not None
    return f"http://{proxy.started['admin']}"


def api(proxy: EgressProcess, method: str, path: str, body: object | None = None) -> Any:
    request = urllib.request.Request(
        admin_url(proxy) + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read() or b"null")


def metric(proxy: EgressProcess, name: str) -> float:
    with urllib.request.urlopen(admin_url(proxy) + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found[1]) if found else float("nan")


def ready(proxy: EgressProcess) -> bool:
    try:
        with urllib.request.urlopen(admin_url(proxy) + "/readyz", timeout=5) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return False


@pytest.fixture
def upstreams() -> Iterator[tuple[int, int]]:
    """Two plain listeners on loopback (accepting is all a CONNECT needs); their ports."""
    servers = [socket.create_server(("127.0.0.1", 0), backlog=256) for _ in range(2)]
    try:
        yield servers[0].getsockname()[1], servers[1].getsockname()[1]
    finally:
        for server in servers:
            server.close()


def test_three_proxies_apply_an_api_edit_within_a_second_and_survive_a_redis_restart(
    tmp_path: Path, upstreams: tuple[int, int]
) -> None:
    first, second = upstreams
    with RedisServer(tmp_path / "redis", persistent=True) as server, ExitStack() as stack:
        configs = [proxy_config(server.url, tmp_path, i) for i in range(3)]
        seeded = run_egress(
            "rules",
            "import",
            str(seed_file(tmp_path, [f"127.0.0.1:{first}"])),
            "--config",
            str(configs[0]),
        )
        assert seeded.returncode == 0, seeded.stderr
        proxies = [stack.enter_context(start_proxy(config)) for config in configs]
        for proxy in proxies:
            proxy.wait_for(lambda p=proxy: ready(p), "ready", ignoring=(OSError,))
            assert socks5_code(proxy, first) == 0
            assert socks5_code(proxy, second) == 0x02

        # One edit through the API of the first node reaches all three within a second.
        answer = api(proxies[0], "PATCH", "/v1/apps/blog", {"add_rules": [f"127.0.0.1:{second}"]})
        committed = time.monotonic()
        version = answer["version"]
        pending = set(range(3))
        while pending and time.monotonic() - committed < 3.0:
            for index in list(pending):
                if socks5_code(proxies[index], second) == 0:
                    pending.discard(index)
        elapsed = time.monotonic() - committed
        assert not pending, f"nodes {sorted(pending)} still deny after {elapsed:.2f} s"
        assert elapsed < 1.0, f"all three allowed only after {elapsed:.2f} s"
        for proxy in proxies:
            assert metric(proxy, "egress_rules_version") == version
            assert metric(proxy, "egress_rules_propagation_seconds_count") >= 1

        # Redis goes away: the rules in force stay, readiness and the gauge say so.
        server.stop()
        for proxy in proxies:
            proxy.wait_for(lambda p=proxy: not ready(p), "not ready while Redis is down")
            assert metric(proxy, "egress_rule_store_up") == 0
            assert socks5_code(proxy, second) == 0
        # Back (its data kept); an edit made now reaches every node by the feed or backstop.
        server.start()
        with server.client() as client:  # the store answers again: edit it through the CLI
            client.ping()
        removed = run_egress(
            "rules", "remove", "blog", f"127.0.0.1:{first}", "--config", str(configs[1])
        )
        assert removed.returncode == 0, removed.stderr
        for proxy in proxies:
            proxy.wait_for(
                lambda p=proxy: socks5_code(p, first) == 0x02, "the edit after the restart"
            )
            proxy.wait_for(lambda p=proxy: ready(p), "ready again")
            assert metric(proxy, "egress_rule_store_up") == 1


@pytest.mark.netns
def test_the_firewall_controller_follows_the_store(tmp_path: Path) -> None:
    """An app added to the store gets its kernel rules at once (change feed); deleted, it
    loses them. Redis runs inside the namespace, as a node's local replica would."""

    def egress_lines() -> list[str]:
        saved = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True)
        return [line for line in saved.stdout.splitlines() if "egress" in line]

    with network_namespace(addresses=("10.77.0.1/32",)), RedisServer(tmp_path / "redis") as server:
        data = base_config(
            rules={"store": "redis", "check_interval": 30.0},
            redis={"url": server.url},
            firewall={"sandbox_uids": ["10000-10999"], "interval": 30.0},
            app=[],
        )
        config = write_config(tmp_path / "egress.toml", data)
        seed = seed_file(tmp_path, ["10.77.0.1:80"])
        assert run_egress("rules", "import", str(seed), "--config", str(config)).returncode == 0
        with start_firewall_controller(config) as controller:
            controller.wait_for(
                lambda: any("app=blog" in line for line in egress_lines()), "blog's rules"
            )
            added = run_egress(
                "rules",
                "set",
                "shop",
                "--create",
                "--uids",
                str(OTHER_APP_UID),
                "--config",
                str(config),
            )
            assert added.returncode == 0, added.stderr
            started = time.monotonic()
            controller.wait_for(
                lambda: any("app=shop" in line for line in egress_lines()), "shop's rules"
            )
            assert time.monotonic() - started < 5.0  # the feed, not the 30 s interval
            deleted = run_egress("rules", "delete", "shop", "--config", str(config))
            assert deleted.returncode == 0, deleted.stderr
            controller.wait_for(
                lambda: not any("app=shop" in line for line in egress_lines()),
                "shop's rules removed",
            )
            wait_until(lambda: any("app=blog" in line for line in egress_lines()), "blog kept")
