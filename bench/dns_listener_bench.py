#!/usr/bin/env python3
"""What a sandbox DNS query costs through egress's DNS listener, side by side with a peer.

Run as root from the repository root (see bench/README.md, "Sandbox DNS listener"):

    sudo .venv/bin/python bench/dns_listener_bench.py [--count N] [--rounds R]

One real ``egress proxy`` process (uvloop) with ``proxy.dns_listen``, whose resolver asks a DNS
stub (tests/dnsstub.py); and, as the peer baseline, dnsmasq (Debian's ``dnsmasq-base``, a C
forwarding cache) in front of the same stub. The client is the system's ``python3`` as a test
uid (the app's uid in egress's config: root is never an app), driven over stdin; it sends
queries one at a time over UDP and times each from send to reply. Variants, alternated round by
round in a rotated order so drift hits all alike:

- ``egress allowed``: a name the app's rules name, answered from the proxy's cache (identity
  lookup, policy, answer) — the common case once a name is warm;
- ``egress denied``: a name no rule names (NXDOMAIN with an Extended DNS Error, no lookup);
- ``dnsmasq cached``: the same allowed name from dnsmasq's cache (no identity, no policy);
- ``stub direct``: the upstream stub itself (a Python server, like egress).

Every process started here is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.dnsstub import DnsStub  # noqa: E402

APP_UID = 10501
NAME = "api.dns-bench.test"
DENIED = "other.dns-bench.test"

CLIENT = r"""
import os, socket, struct, sys, time
def query(name, qid):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return header + labels + b"\x00" + struct.pack("!HH", 1, 1)
for line in sys.stdin:
    host, port, name, count = line.split()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect((host, int(port)))
    times, lost, rcodes = [], 0, set()
    for i in range(int(count)):
        qid = (os.getpid() + i) & 0xFFFF
        started = time.perf_counter()
        sock.send(query(name, qid))
        try:
            while True:
                reply = sock.recv(2048)
                if reply[:2] == struct.pack("!H", qid):
                    break
        except socket.timeout:
            lost += 1
            continue
        times.append((time.perf_counter() - started) * 1e6)
        rcodes.add(reply[3] & 0x0F)
    sock.close()
    print(repr((times, lost, sorted(rcodes))), flush=True)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = int(udp.getsockname()[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", port))
    return port


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_answering(port: int, timeout: float = 15.0) -> None:
    """Until something answers a DNS query on 127.0.0.1:port (any rcode)."""
    deadline = time.monotonic() + timeout
    probe = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x01\x00\x01"
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendto(probe, ("127.0.0.1", port))
                sock.recv(512)
                return
            except OSError:
                time.sleep(0.1)
    raise RuntimeError(f"nothing answers DNS on 127.0.0.1:{port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="queries per batch")
    parser.add_argument("--rounds", type=int, default=10, help="batches per variant")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the client runs as a test uid)", file=sys.stderr)
        return 1
    dnsmasq = shutil.which("dnsmasq")
    work = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    os.chmod(work, 0o755)
    proxy = peer = client = None
    with DnsStub({NAME: ["93.184.215.14"], DENIED: ["93.184.215.15"]}, ttl=3600) as stub:
        try:
            dns_port = free_port()
            config = work / "egress.toml"
            config.write_text(
                "[proxy]\n"
                f'socks5_listen = ["127.0.0.1:{free_port()}"]\n'
                f'dns_listen = "127.0.0.1:{dns_port}"\n'
                # The app's DNS rate limit would refuse most of a benchmark's queries.
                "dns_queries_per_second = 1000000.0\ndns_burst = 1000000\n"
                f'[resolver]\nnameservers = ["{stub.address}"]\nmin_ttl = 3600.0\n'
                "max_ttl = 3600.0\n"
                '[log]\nconnection_log = "/dev/null"\nlevel = "warning"\n'
                f'[[app]]\nname = "bench"\nuids = ["{APP_UID}"]\nallow = ["{NAME}:443"]\n'
            )
            proxy = subprocess.Popen(
                [sys.executable, "-m", "egress.cli", "proxy", "--config", str(config)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_answering(dns_port)
            variants = {"egress allowed": (dns_port, NAME), "egress denied": (dns_port, DENIED)}
            if dnsmasq is not None:
                peer_port = free_port()
                peer = subprocess.Popen(
                    [dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                     f"--server=127.0.0.1#{stub.port}", f"--port={peer_port}",
                     "--listen-address=127.0.0.1", "--bind-interfaces", "--cache-size=1000",
                     "--user=nobody", "--pid-file="],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                wait_answering(peer_port)
                variants["dnsmasq cached"] = (peer_port, NAME)
            else:
                print("dnsmasq not found (apt-get install dnsmasq-base): no peer baseline")
            variants["stub direct"] = (stub.port, NAME)
            client = subprocess.Popen(
                ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
                 "/usr/bin/python3", "-c", CLIENT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert client.stdin is not None and client.stdout is not None

            def batch(port: int, name: str, count: int) -> tuple[list[float], int, list[int]]:
                assert client is not None and client.stdin and client.stdout
                client.stdin.write(f"127.0.0.1 {port} {name} {count}\n")
                client.stdin.flush()
                result: tuple[list[float], int, list[int]] = eval(
                    client.stdout.readline()
                )  # our own child's repr
                return result

            for port, name in variants.values():  # warm caches and code paths
                batch(port, name, 50)
            results: dict[str, list[float]] = {v: [] for v in variants}
            lost: dict[str, int] = dict.fromkeys(variants, 0)
            rcodes: dict[str, set[int]] = {v: set() for v in variants}
            names = list(variants)
            started = time.monotonic()
            for round_ in range(opts.rounds):
                for variant in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    times, missing, codes = batch(*variants[variant], opts.count)
                    results[variant] += times
                    lost[variant] += missing
                    rcodes[variant] |= set(codes)
            elapsed = time.monotonic() - started
        finally:
            for proc in (client, peer, proxy):
                stop(proc)
            shutil.rmtree(work, ignore_errors=True)

    print(f"sandbox DNS, UDP, one query at a time, {opts.rounds} x {opts.count} per variant"
          f" ({elapsed:.1f} s), client uid {APP_UID}")  # fmt: skip
    print(f"{'variant':<16} {'median µs':>10} {'p90 µs':>8} {'p99 µs':>8} {'q/s':>8} {'lost':>5}"
          " rcodes")  # fmt: skip
    summary = {}
    for variant, times in results.items():
        ordered = sorted(times)
        median = statistics.median(ordered)
        p90 = ordered[int(len(ordered) * 0.9)]
        p99 = ordered[int(len(ordered) * 0.99)]
        rate = 1e6 / statistics.mean(ordered)
        print(f"{variant:<16} {median:>10.1f} {p90:>8.1f} {p99:>8.1f} {rate:>8.0f}"
              f" {lost[variant]:>5} {sorted(rcodes[variant])}")  # fmt: skip
        summary[variant] = {
            "median_us": median,
            "p90_us": p90,
            "p99_us": p99,
            "lost": lost[variant],
        }
    print(json.dumps(summary))
    expected = {"egress allowed": [0], "egress denied": [3], "dnsmasq cached": [0]}
    wrong = {v: sorted(c) for v, c in rcodes.items() if v in expected and sorted(c) != expected[v]}
    if wrong:  # e.g. REFUSED (5): the numbers would be of something else
        print(f"unexpected rcodes: {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
