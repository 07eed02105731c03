"""The real ``egress proxy`` process: real child uids, SIGHUP reloads, SIGTERM drains, metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configs import write_config
from tests.processes import (
    EgressProcess,
    python_for_uid,
    run_egress,
    start_proxy,
    stop_process,
    wait_ready,
)
from tests.support import APP_UID, STRANGER_UID, socket_as_uid

pytestmark = pytest.mark.root

# A SOCKS5 client that a child process runs under a dropped uid; prints the reply code and what
# the upstream echoed. Stdlib only, written from RFC 1928.
CHILD_CLIENT = textwrap.dedent(
    """
    import socket, struct, sys
    proxy_port, port, payload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    try:
        s.sendall(b"\\x05\\x01\\x00"); method = s.recv(2)
    except ConnectionResetError:
        method = b""
    if method in (b"", b"\\x05\\xff"):  # refused at accept (05 FF and a reason record)
        print(-1, "", flush=True); sys.exit()
    assert method == b"\\x05\\x00"
    s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    reply = s.recv(10)
    echoed = b""
    if reply[1] == 0:
        s.sendall(payload); echoed = s.recv(100)
    print(reply[1], echoed.decode(), flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Echo:
    """A blocking echo server in a child process (so the test thread stays free)."""

    def __init__(self) -> None:
        self.port = free_port()
        code = (
            "import socket,sys\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('127.0.0.1',{self.port})); s.listen(64); print('ready', flush=True)\n"
            "while True:\n"
            "    c,_=s.accept()\n"
            "    d=c.recv(65536)\n"
            "    c.sendall(d); c.close()\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        try:
            wait_ready(self.proc, "echo server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)


def proxy_config(socks_port: int, admin_port: int, allow: list[str], log: Path) -> dict[str, Any]:
    return {
        "proxy": {"socks5_listen": [f"127.0.0.1:{socks_port}"], "drain_timeout": 1.0},
        "security": {"allow_special": ["127.0.0.0/8"]},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"connection_log": str(log)},
        "app": [{"name": "blog", "uids": [str(APP_UID)], "allow": allow}],
    }


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    echo = Echo()
    ports = {"socks": free_port(), "admin": free_port()}
    config = tmp_path / "egress.toml"
    log = tmp_path / "conn.log"
    allow = [f"127.0.0.1:{echo.port}"]
    try:
        write_config(config, proxy_config(ports["socks"], ports["admin"], allow, log))
        with start_proxy(config) as proxy:
            yield {"echo": echo, "proxy": proxy, "config": config, "log": log, **ports}
    finally:
        echo.stop()


def child_connect(uid: int, proxy_port: int, port: int, payload: str = "hi") -> tuple[int, str]:
    result = subprocess.run(
        [python_for_uid(uid), "-I", "-c", CHILD_CLIENT, str(proxy_port), str(port), payload],
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    )
    code, _, echoed = result.stdout.strip().partition(" ")
    return int(code), echoed


def scrape(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_real_uid_child_processes_are_identified_by_the_kernel(setup: dict[str, Any]) -> None:
    assert child_connect(APP_UID, setup["socks"], setup["echo"].port) == (0, "hi")
    assert child_connect(STRANGER_UID, setup["socks"], setup["echo"].port) == (-1, "")
    metrics = scrape(setup["admin"])
    allowed = 'app="blog",decision="allowed",listener="socks5",reason="allowed"'
    unknown = 'app="_unknown",decision="denied",listener="socks5",reason="unknown_client"'
    assert f"egress_connections_total{{{allowed}}} 1.0" in metrics
    assert f"egress_connections_total{{{unknown}}} 1.0" in metrics
    assert 'egress_bytes_total{app="blog",direction="up"} 2.0' in metrics
    assert "egress_handshake_seconds_bucket" in metrics


def test_sighup_reloads_rules_and_keeps_them_on_a_bad_file(setup: dict[str, Any]) -> None:
    proxy: EgressProcess = setup["proxy"]
    echo: Echo = setup["echo"]
    ports = setup["socks"], setup["admin"]
    # Reload to rules that no longer allow the echo port.
    write_config(setup["config"], proxy_config(*ports, ["127.0.0.1:1"], setup["log"]))
    proxy.send_signal(signal.SIGHUP)
    proxy.wait_log(
        lambda e: e.get("msg") == "rules installed" and e.get("version") == 1, "rules version 1"
    )
    assert child_connect(APP_UID, setup["socks"], echo.port)[0] == 2
    # A broken file keeps the last good rules and says why.
    broken = proxy_config(*ports, [f"127.0.0.1:{echo.port}"], setup["log"])
    broken["app"][0]["bogus_key"] = 1
    write_config(setup["config"], broken)
    proxy.send_signal(signal.SIGHUP)
    rejected = proxy.wait_log(
        lambda e: e.get("msg", "").startswith("reload rejected"), "reload rejected"
    )
    assert any("bogus_key" in problem for problem in rejected["problems"])
    assert child_connect(APP_UID, setup["socks"], echo.port)[0] == 2
    metrics = scrape(setup["admin"])
    assert 'egress_config_reloads_total{result="ok"} 1.0' in metrics
    assert 'egress_config_reloads_total{result="error"} 1.0' in metrics


def open_tunnel(socks_port: int, dest_port: int) -> socket.socket:
    """A blocking SOCKS5 tunnel from a socket owned by the app's uid, handshake done."""
    tunnel = socket_as_uid(APP_UID)
    tunnel.setblocking(True)
    tunnel.settimeout(5)
    tunnel.connect(("127.0.0.1", socks_port))
    tunnel.sendall(b"\x05\x01\x00")
    assert tunnel.recv(2) == b"\x05\x00"
    tunnel.sendall(
        b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dest_port.to_bytes(2, "big")
    )
    assert tunnel.recv(10)[1] == 0
    return tunnel


def test_sigterm_stops_accepting_and_drains_open_tunnels(setup: dict[str, Any]) -> None:
    proxy: EgressProcess = setup["proxy"]
    tunnel = open_tunnel(setup["socks"], setup["echo"].port)
    proxy.send_signal(signal.SIGTERM)
    proxy.wait_log(lambda e: e.get("msg") == "draining", "draining")
    # New connections are refused while the open tunnel still relays.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", setup["socks"]), timeout=2).close()
    tunnel.sendall(b"still here")
    assert tunnel.recv(100) == b"still here"
    tunnel.close()
    assert proxy.wait(timeout=5) == 0
    assert any(e.get("msg") == "proxy stopped" for e in proxy.logs())


def test_sigterm_cuts_tunnels_after_the_drain_timeout(setup: dict[str, Any]) -> None:
    proxy: EgressProcess = setup["proxy"]
    # The echo server answers one read and then closes; sending nothing keeps this tunnel open.
    tunnel = open_tunnel(setup["socks"], setup["echo"].port)
    started = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0
    elapsed = time.monotonic() - started
    assert 0.8 < elapsed < 5, elapsed  # drain_timeout = 1.0
    assert tunnel.recv(100) == b""
    tunnel.close()
    records = proxy.connection_records()
    assert records[-1]["error"] == "drain_timeout"


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[proxy]\nsocks_listen = ["127.0.0.1:1080"]\n'
        '[[app]]\nname = "x"\nuids = ["0"]\nallow = ["127.1:80"]\n'
    )
    result = run_egress("check-config", str(bad))
    assert result.returncode == 2
    assert "socks5_listen" in result.stderr
    assert "app[0].allow[0]" in result.stderr
    assert str(bad) in result.stderr
    good = run_egress("check-config", "config.example.toml")
    assert good.returncode == 0, good.stderr
    assert "api.example.com:443" in good.stdout


def test_a_failed_start_is_one_json_error_line_and_exit_2(tmp_path: Path) -> None:
    """A port in use: nothing is served, nothing pretends to drain, one line says why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "egress.toml"
        write_config(
            config, proxy_config(port, free_port(), ["127.0.0.1:1"], tmp_path / "conn.log")
        )
        result = run_egress("proxy", "--config", str(config))
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # all JSON
    (error,) = [e for e in lines if e["level"] == "error"]
    assert error["msg"] == "cannot start"
    assert f"proxy.socks5_listen: cannot listen on 127.0.0.1:{port}" in error["error"]
    assert not [e for e in lines if e["msg"] in ("listening", "draining", "proxy stopped")]


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("connection_log", "/nonexistent-dir/conn.log", "log.connection_log: cannot open"),
        ("unix_socket", "/proc/egress-test/socks.sock", "proxy.unix_socket: cannot listen"),
    ],
)
def test_a_path_that_cannot_be_used_fails_the_start_in_one_line(
    tmp_path: Path, key: str, value: str, said: str
) -> None:
    config = tmp_path / "egress.toml"
    data = proxy_config(free_port(), free_port(), ["127.0.0.1:1"], tmp_path / "conn.log")
    section = "log" if key == "connection_log" else "proxy"
    data[section][key] = value
    write_config(config, data)
    result = run_egress("proxy", "--config", str(config))
    assert result.returncode == 2, result.stderr
    (error,) = [json.loads(line) for line in result.stderr.splitlines()]  # one JSON line
    assert error["msg"] == "cannot start"
    assert said in error["error"] and value in error["error"]


def test_a_bad_config_at_start_is_one_json_error_line_with_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "egress.toml"
    config.write_text('[proxy]\nsocks_listen = ["127.0.0.1:1080"]\n[log]\nlevel = "loud"\n')
    result = run_egress("proxy", "--config", str(config))
    assert result.returncode == 2
    (error,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert error["msg"] == "cannot start: bad config"
    problems = " ".join(error["problems"])
    assert "proxy.socks_listen" in problems and "log.level" in problems


def test_metrics_have_no_created_series_and_carry_process_and_build_info(
    setup: dict[str, Any],
) -> None:
    from egress import __version__

    metrics = scrape(setup["admin"])
    assert "_created" not in metrics
    assert "process_resident_memory_bytes" in metrics
    assert "process_open_fds" in metrics
    assert f'version="{__version__}"' in metrics
    assert "egress_build_info{" in metrics
    assert "egress_rules_version 0.0" in metrics  # the file's [rules].version


def test_check_config_takes_config_and_warns_about_what_cannot_work(tmp_path: Path) -> None:
    config = tmp_path / "egress.toml"
    config.write_text(
        '[proxy]\nsocks5_listen = ["127.0.0.1:1080"]\n'
        '[firewall]\nsandbox_uids = ["10000-19999"]\n'
        '[[app]]\nname = "blog"\nuids = ["10001", "20001"]\n'
        'allow = ["203.0.113.0/24:443", "api.example.com:443"]\n'
        "limits = { burst = 5 }\n"
    )
    result = run_egress("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, result.stderr
    assert "'203.0.113.0/24:443' can only match special-purpose addresses" in warnings[0]
    assert "20001 is not (all) inside firewall.sandbox_uids" in warnings[1]
    assert "('blog').limits.burst: has no effect without connections_per_second" in warnings[2]
    assert "the config is valid (exit 0)" in result.stderr
    clean = run_egress("check-config", "--config", "config.example.toml")
    assert clean.returncode == 0
    assert "warning" not in clean.stderr
