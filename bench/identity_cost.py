"""Cost of one socket-owner lookup: sock_diag exact query vs. /proc/net/tcp scan.

Opens N loopback TCP connections (clients in a child process, accepted ends here), then times
``lookup(peer, local)`` for random connections with :class:`TcpOwnerLookup` and
:class:`ProcNetTcpLookup` on the same sockets, bounded by a lookup count and a time cap, and
prints a table. Each process needs N + 256 descriptors (soft RLIMIT_NOFILE is raised to that).

    sudo .venv/bin/python -m bench.identity_cost --sizes 100,2000,10000 --lookups 2000
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from egress.net.identity import ProcNetTcpLookup, SockAddr, TcpOwnerLookup

FD_SLACK = 256  # listener, lookups, pipes, stdio, the interpreter's own

# The clients live in a child process so that neither process needs 2 fds per connection (the
# hard RLIMIT_NOFILE here is 20,000 and raising it needs CAP_SYS_RESOURCE, which root may lack).
CLIENT_CODE = r"""
import resource, socket, struct, sys
host, port, n, slack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + slack:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + slack, hard))
rst = struct.pack("ii", 1, 0)  # close with RST: nothing lingers in TIME_WAIT
clients = []
for _ in range(n):
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
    c.connect((host, port))
    clients.append(c)
print("ready", flush=True)
sys.stdin.read()  # until the parent closes our stdin
for c in clients:
    c.close()
"""


@dataclass
class Timing:
    done: int
    wrong: int
    mean_us: float
    p50_us: float
    p99_us: float
    capped: bool


def raise_nofile(n: int) -> tuple[int, int]:
    """Room for ``n`` accepted sockets in this process; returns the old (soft, hard) limits."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + FD_SLACK
    soft, hard = old
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {need} needed for N={n}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return old


@dataclass
class Connections:
    listener: socket.socket
    client: subprocess.Popen[bytes]
    accepted: list[socket.socket]

    def close(self) -> None:
        """Clients first (RST, no TIME_WAIT), then our ends; the child is reaped by pid."""
        if self.client.stdin is not None:
            self.client.stdin.close()  # the child closes its sockets and exits
        try:
            self.client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.client.pid, signal.SIGKILL)
            self.client.wait()
        if self.client.stdout is not None:
            self.client.stdout.close()
        for s in self.accepted:
            s.close()
        self.listener.close()


def open_connections(n: int) -> Connections:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.settimeout(30.0)
    host, port = listener.getsockname()
    client = subprocess.Popen(
        [sys.executable, "-I", "-c", CLIENT_CODE, host, str(port), str(n), str(FD_SLACK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    conns = Connections(listener, client, [])
    try:
        while len(conns.accepted) < n:  # accept while the child connects: the queue stays short
            conns.accepted.append(listener.accept()[0])
        assert client.stdout is not None
        if client.stdout.readline() != b"ready\n":
            raise RuntimeError(f"client process failed (exit {client.wait()})")
    except BaseException:
        conns.close()
        raise
    return conns


def tcp_table_rows() -> int:
    rows = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, "rb") as f:
                rows += f.read().count(b"\n") - 1
        except FileNotFoundError:
            pass
    return rows


def measure(
    lookup: Callable[[SockAddr, SockAddr], int | None],
    targets: list[tuple[SockAddr, SockAddr]],
    *,
    want_uid: int,
    time_cap_s: float,
) -> Timing:
    for peer, local in targets[:20]:  # warm up
        lookup(peer, local)
    samples: list[int] = []
    wrong = 0
    clock = time.perf_counter_ns
    deadline = clock() + int(time_cap_s * 1e9)
    capped = False
    for peer, local in targets:
        t0 = clock()
        uid = lookup(peer, local)
        t1 = clock()
        samples.append(t1 - t0)
        wrong += uid != want_uid
        if t1 > deadline:
            capped = True
            break
    us = sorted(s / 1000 for s in samples)
    return Timing(
        done=len(us),
        wrong=wrong,
        mean_us=statistics.fmean(us),
        p50_us=us[len(us) // 2],
        p99_us=us[min(len(us) - 1, int(len(us) * 0.99))],
        capped=capped,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", default="100,2000,10000", help="connection counts N, comma-separated"
    )
    ap.add_argument("--lookups", type=int, default=2000, help="lookups per method and N")
    ap.add_argument("--time-cap", type=float, default=10.0, help="seconds per method and N")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    old_limits = raise_nofile(max(sizes))
    rng = random.Random(1)
    rows = []
    netlink = TcpOwnerLookup()
    proc_net = ProcNetTcpLookup()
    try:
        for n in sizes:
            t0 = time.perf_counter()
            conns = open_connections(n)
            setup_s = time.perf_counter() - t0
            try:
                pairs = [(s.getpeername(), s.getsockname()) for s in conns.accepted]
                targets = [rng.choice(pairs) for _ in range(args.lookups)]
                table = tcp_table_rows()
                uid, cap = os.geteuid(), args.time_cap
                nl = measure(netlink.lookup, targets, want_uid=uid, time_cap_s=cap)
                pn = measure(proc_net.lookup, targets, want_uid=uid, time_cap_s=cap)
            finally:
                conns.close()
            rows.append((n, table, setup_s, nl, pn))
    finally:
        netlink.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old_limits)

    print(f"µs per lookup (mean / p50 / p99); {args.lookups} random lookups per cell, "
          f"cap {args.time_cap:g} s; uid {os.geteuid()}")  # fmt: skip
    head = (
        f"{'N conns':>8} {'tcp rows':>9} | {'sock_diag mean/p50/p99':>24} {'n':>5} "
        f"| {'/proc/net/tcp mean/p50/p99':>28} {'n':>5} | {'ratio':>7}"
    )
    print(head)
    print("-" * len(head))
    for n, table, _setup_s, nl, pn in rows:
        print(
            f"{n:>8} {table:>9} | {nl.mean_us:>8.1f} {nl.p50_us:>7.1f} {nl.p99_us:>7.1f} "
            f"{nl.done:>5} | {pn.mean_us:>10.1f} {pn.p50_us:>8.1f} {pn.p99_us:>8.1f} "
            f"{pn.done:>5}{'*' if pn.capped else ' '}| {pn.mean_us / nl.mean_us:>6.0f}x"
        )
        if nl.wrong or pn.wrong:
            print(f"   !! wrong uid: sock_diag {nl.wrong}, /proc {pn.wrong}")
    if any(r[4].capped or r[3].capped for r in rows):
        print("* stopped at the time cap")


if __name__ == "__main__":
    main()
