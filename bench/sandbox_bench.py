#!/usr/bin/env python3
"""What the sandbox socket shim adds to a connection: connect() + first byte through the shim
versus a plain SOCKS5 client to the same proxy, in one run.

Run as root from the repository root (see bench/README.md, "Sandbox shim overhead"):

    sudo .venv/bin/python bench/sandbox_bench.py [--quick] [--count N] [--rounds R]

One real ``egress proxy`` process (uvloop, pinned to CPU 1) and one loopback upstream that
speaks first (it sends one byte on accept and closes, so "first byte" is well defined), pinned
to CPU 0 with the clients. Every client is its own interpreter (the system's ``python3``, which
a test uid can run) under the same test uid, the app's uid in the proxy's config, started once
and driven over stdin: it warms up, then runs batches of sequential connections when told, and
times each one itself, from before ``create_connection``/``open_connection`` to the first byte
received, so process start and the driver's pipes are never in a figure. The shim's clients
get the environment ``egress sandbox`` gives (``PYTHONPATH`` = a world-readable copy of
``egress/sandbox/boot``, ``EGRESS_SANDBOX_PROXY``), the others none of it. Batches of every
variant alternate round by round, each round in a rotated order, so the machine's drift hits
every variant alike. A DNS stub (tests/dnsstub.py) answers the proxy for the name variants.
Every process started here is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_proxy_bench as pb  # bench/ is not a package: imported from its directory

from tests.dnsstub import DnsStub

TARGET_US = 100.0  # the issue: <= 100 us added per connection on loopback
UPSTREAM_NAME = "upstream.sandbox-bench.test"
FIRST_BYTE = "!"
CHILD_PYTHON = "/usr/bin/python3"  # stdlib only; /root's interpreters are closed to test uids
SHIM_SOURCE = pb.REPO_DIR / "egress" / "sandbox"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    shim: bool  # runs with the shim installed
    proxied: bool  # its connections go through the proxy (one connection log record each)
    what: str


VARIANTS = (
    Variant("direct", False, False, "create_connection + recv(1), no proxy (context)"),
    Variant("socks5-stepwise", False, True, "plain SOCKS5: greeting, reply, request, reply"),
    Variant("socks5-pipelined", False, True, "plain SOCKS5: greeting + request in one send"),
    Variant("socks5-pipelined-name", False, True, "the same, the name in the request"),
    Variant("shim", True, True, "shim: create_connection(IP literal) + recv(1)"),
    Variant("shim-name", True, True, "shim: create_connection(name) (synthetic address)"),
    Variant("aio-direct", False, False, "asyncio open_connection + read(1), no proxy"),
    Variant("aio-socks5-pipelined", False, True, "asyncio plain SOCKS5, pipelined"),
    Variant("aio-shim", True, True, "shim: asyncio open_connection(IP literal) + read(1)"),
)
BY_NAME = {v.name: v for v in VARIANTS}

# (shim variant, like-for-like plain client, whether it decides the verdict). The pipelined
# client makes the shim's one round trip; the stepwise one (the common client) makes two, so
# against it the shim saves a round trip and the figure says less about the shim's own code.
COMPARISONS = (
    ("shim", "socks5-pipelined", True),
    ("shim", "socks5-stepwise", False),
    ("shim-name", "socks5-pipelined-name", True),
    ("aio-shim", "aio-socks5-pipelined", True),
)

# The upstream: accept, send one byte, close (it closes first, so TIME_WAIT stays on the
# listening side and never holds the clients' ephemeral ports). Bounded by the driver: it is
# stopped by pid.
UPSTREAM_CODE = r"""
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(4096)
byte = sys.argv[3].encode("latin-1")
while True:
    conn, _ = srv.accept()
    try:
        conn.send(byte)
    except OSError:
        pass
    conn.close()
"""

# One client interpreter per variant. Commands on stdin ("run K", "quit"); one JSON line per
# batch on stdout. Sockets are blocking without a timeout, as an ordinary app's are (a timeout
# changes CPython's I/O path); the driver bounds every batch and kills a child that hangs.
CHILD_CODE = r"""
import asyncio, gc, json, os, socket, sys, time

cfg = json.loads(sys.argv[1])
variant = cfg["variant"]
PROXY = (cfg["proxy_host"], cfg["proxy_port"])
UP = (cfg["up_ip"], cfg["up_port"])
UP_NAME = (cfg["up_name"], cfg["up_port"])
EXPECTED = cfg["byte"].encode("latin-1")
GREETING = b"\x05\x01\x00"
if variant.endswith("-name"):
    raw = cfg["up_name"].encode("ascii")
    REQUEST = b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + UP[1].to_bytes(2, "big")
else:
    REQUEST = b"\x05\x01\x00\x01" + socket.inet_aton(UP[0]) + UP[1].to_bytes(2, "big")


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"proxy closed the handshake after {data!r}")
        data += chunk
    return data


def bind_length(head, more):
    # Read as the shim reads: the method reply, the reply's head, then its bound address.
    if head[0] != 5 or head[1] != 0:
        raise ConnectionError(f"SOCKS5 reply {head!r}")
    if head[3] == 1:
        return 6
    if head[3] == 4:
        return 18
    return more()[0] + 2


def socks5_reply(sock):
    if recv_exact(sock, 2) != b"\x05\x00":
        raise ConnectionError("the proxy did not choose no-auth")
    head = recv_exact(sock, 4)
    recv_exact(sock, bind_length(head, lambda: recv_exact(sock, 1)))


def direct():  # also the shim's variant: the same code, with the shim installed
    sock = socket.create_connection(UP)
    return sock, sock.recv(1)


def shim_name():
    sock = socket.create_connection(UP_NAME)
    return sock, sock.recv(1)


def socks5_stepwise():
    sock = socket.create_connection(PROXY)
    sock.sendall(GREETING)
    if recv_exact(sock, 2) != b"\x05\x00":
        raise ConnectionError("the proxy did not choose no-auth")
    sock.sendall(REQUEST)
    head = recv_exact(sock, 4)
    recv_exact(sock, bind_length(head, lambda: recv_exact(sock, 1)))
    return sock, sock.recv(1)


def socks5_pipelined():
    sock = socket.create_connection(PROXY)
    sock.sendall(GREETING + REQUEST)
    socks5_reply(sock)
    return sock, sock.recv(1)


async def aio_direct():  # also aio-shim's
    reader, writer = await asyncio.open_connection(*UP)
    return writer, await reader.read(1)


async def aio_socks5_pipelined():
    reader, writer = await asyncio.open_connection(*PROXY)
    writer.write(GREETING + REQUEST)
    if await reader.readexactly(2) != b"\x05\x00":
        raise ConnectionError("the proxy did not choose no-auth")
    head = await reader.readexactly(4)
    if head[1] != 0:
        raise ConnectionError(f"SOCKS5 reply {head!r}")
    await reader.readexactly(6 if head[3] == 1 else 18)
    return writer, await reader.read(1)


BLOCKING = {
    "direct": direct, "shim": direct, "shim-name": shim_name,
    "socks5-stepwise": socks5_stepwise, "socks5-pipelined": socks5_pipelined,
    "socks5-pipelined-name": socks5_pipelined,
}
ASYNC = {
    "aio-direct": aio_direct, "aio-shim": aio_direct,
    "aio-socks5-pipelined": aio_socks5_pipelined,
}
MAX_ERRORS = 10  # per batch: a broken set-up stops quickly


def note(result, exc):
    result["errors"] += 1
    result["first_error"] = result["first_error"] or f"{type(exc).__name__}: {exc}"


def run_blocking(fn, k):
    result = {"ns": [], "errors": 0, "first_error": None}
    gc.collect()
    cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
    for _ in range(k):
        t0 = time.perf_counter_ns()
        try:
            sock, got = fn()
        except OSError as exc:
            note(result, exc)
            if result["errors"] >= MAX_ERRORS:
                break
            continue
        t1 = time.perf_counter_ns()
        sock.close()
        if got != EXPECTED:
            note(result, ValueError(f"first byte {got!r}, expected {EXPECTED!r}"))
            continue
        result["ns"].append(t1 - t0)
    result["wall_ns"] = time.perf_counter_ns() - wall0
    result["cpu_ns"] = time.process_time_ns() - cpu0
    return result


async def run_async(fn, k):
    result = {"ns": [], "errors": 0, "first_error": None}
    gc.collect()
    cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
    for _ in range(k):
        t0 = time.perf_counter_ns()
        try:
            writer, got = await fn()
        except (OSError, asyncio.IncompleteReadError) as exc:
            note(result, exc)
            if result["errors"] >= MAX_ERRORS:
                break
            continue
        t1 = time.perf_counter_ns()
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        if got != EXPECTED:
            note(result, ValueError(f"first byte {got!r}, expected {EXPECTED!r}"))
            continue
        result["ns"].append(t1 - t0)
    result["wall_ns"] = time.perf_counter_ns() - wall0
    result["cpu_ns"] = time.process_time_ns() - cpu0
    return result


loop = None
if variant in ASYNC:
    loop = asyncio.new_event_loop()  # the default loop: asyncio's own, never uvloop
    asyncio.set_event_loop(loop)
shim = sys.modules.get("egress_sandbox")
print(json.dumps({
    "ready": True, "pid": os.getpid(), "uid": os.getuid(),
    "python": sys.version.split()[0],
    "shim_installed": bool(shim is not None and shim.installed()),
    "loop": type(loop).__name__ if loop is not None else None,
}), flush=True)
for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "quit":
        break
    k = int(words[1])
    if loop is not None:
        out = loop.run_until_complete(run_async(ASYNC[variant], k))
    else:
        out = run_blocking(BLOCKING[variant], k)
    print(json.dumps(out), flush=True)
"""


@dataclasses.dataclass(frozen=True)
class Options:
    count: int  # measured connections per variant
    rounds: int
    warmup: int  # connections per variant before the first round, not counted
    variants: tuple[str, ...]
    bench_uid: int
    python: str
    quiet_wait_s: float
    batch_timeout_s: float
    results_path: Path


@dataclasses.dataclass
class Child:
    variant: Variant
    proc: subprocess.Popen[bytes]
    hello: dict[str, Any]


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def upstream(workdir: Path, python: str) -> Iterator[int]:
    """The server-speaks-first upstream on a free loopback port, pinned to the load CPU."""
    port = pb.free_port()
    script = workdir / "upstream.py"
    script.write_text(UPSTREAM_CODE)
    cmd = ["taskset", "-c", pb.LOAD_CPU, python, str(script), pb.HOST, str(port), FIRST_BYTE]
    pb.log(f"start upstream: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pb.wait_listening(port, proc)
        yield port
    finally:
        pb.stop(proc)


def egress_config(workdir: Path, socks_port: int, dns: DnsStub, up_port: int, uid: int) -> str:
    """SOCKS5 only, the per-connection log on (as run_proxy_bench), the upstream's address and
    its name allowed; the name's answer is cached for the whole run (min_ttl = max_ttl)."""
    return f"""\
[proxy]
socks5_listen = ["{pb.HOST}:{socks_port}"]
handshake_timeout = 5.0
connect_timeout = 5.0
idle_timeout = 300.0
max_connections = 20000

[resolver]
nameservers = ["{dns.address}"]
min_ttl = 3600.0
max_ttl = 3600.0

[security]
allow_special = ["127.0.0.0/8"]

[log]
connection_log = "{workdir / "conn.log"}"

[[app]]
name = "bench"
uids = ["{uid}"]
allow = ["{pb.HOST}:{up_port}", "{UPSTREAM_NAME}:{up_port}"]
"""


@contextlib.contextmanager
def start_egress(workdir: Path, config: str, socks_port: int) -> Iterator[subprocess.Popen[bytes]]:
    conf = workdir / "egress.toml"
    conf.write_text(config)
    cmd = [
        "taskset", "-c", pb.PROXY_CPU, str(pb.VENV_PYTHON), "-m", "egress.cli", "proxy",
        "--config", str(conf), "--loop", "uvloop",
    ]  # fmt: skip
    log_path = workdir / "egress.stderr"
    pb.log(f"start egress: {' '.join(cmd)}")
    with log_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=pb.REPO_DIR)
    try:
        try:
            pb.wait_listening(socks_port, proc, timeout_s=30.0)
        except pb.BenchError as exc:
            raise pb.BenchError(f"egress did not start: {exc}\n{pb.tail(log_path)}") from exc
        yield proc
    finally:
        pb.stop(proc, grace_s=40.0)


def world_readable_shim(workdir: Path) -> Path:
    """A copy of egress/sandbox the test uid can read (as tests/sandboxing.shim_dir makes)."""
    target = workdir / "sandbox"
    shutil.copytree(SHIM_SOURCE, target, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(workdir)], check=True)
    return target


def child_env(shim: Path | None, socks_port: int) -> dict[str, str]:
    """What ``egress sandbox --proxy`` gives a program (tests/sandboxing.shim_environment), or,
    for the plain clients, the same minus the shim."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
    if shim is not None:
        env["PYTHONPATH"] = str(shim / "boot")
        env["EGRESS_SANDBOX_PROXY"] = f"{pb.HOST}:{socks_port}"
    return env


def read_json_line(proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> dict[str, Any]:
    """One JSON line from a child's stdout, within ``timeout_s``."""
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout_s
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise pb.BenchError(f"{what}: no answer within {timeout_s:g} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise pb.BenchError(f"{what}: the child exited ({proc.wait(5)})")
            buf += chunk
    value: dict[str, Any] = json.loads(buf)
    return value


@contextlib.contextmanager
def start_child(
    variant: Variant, opts: Options, workdir: Path, shim: Path, cfg: dict[str, Any]
) -> Iterator[Child]:
    """One client interpreter as the bench uid on the load CPU; stopped by pid."""
    script = workdir / "client.py"
    if not script.exists():
        script.write_text(CHILD_CODE)
        script.chmod(0o644)
    args = json.dumps({**cfg, "variant": variant.name})
    cmd = ["taskset", "-c", pb.LOAD_CPU, opts.python, str(script), args]
    err_path = workdir / f"client-{variant.name}.stderr"
    options: dict[str, Any] = {
        "stdin": subprocess.PIPE,
        "stdout": subprocess.PIPE,
        "cwd": str(workdir),
        "env": child_env(shim if variant.shim else None, cfg["proxy_port"]),
    }
    if os.geteuid() == 0:
        options.update(user=opts.bench_uid, group=opts.bench_uid, extra_groups=[])
    with err_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stderr=err, **options)
    try:
        try:
            hello = read_json_line(proc, 30.0, f"{variant.name} start")
        except pb.BenchError as exc:
            raise pb.BenchError(f"{exc}\n{pb.tail(err_path)}") from exc
        if hello.get("shim_installed") != variant.shim:
            raise pb.BenchError(
                f"{variant.name}: shim installed = {hello}, expected {variant.shim}"
            )
        if hello.get("uid") != opts.bench_uid:
            raise pb.BenchError(f"{variant.name} runs as uid {hello.get('uid')}")
        yield Child(variant, proc, hello)
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        pb.stop(proc, grace_s=2.0)
        if proc.stdout is not None:
            proc.stdout.close()


def run_batch(child: Child, k: int, opts: Options) -> dict[str, Any]:
    assert child.proc.stdin is not None
    child.proc.stdin.write(f"run {k}\n".encode())
    child.proc.stdin.flush()
    return read_json_line(child.proc, opts.batch_timeout_s, f"{child.variant.name} batch of {k}")


# --------------------------------------------------------------------------- measuring


def batch_sizes(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


def measure(
    opts: Options, children: dict[str, Child], proxy_pid: int
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Warm every child up, then ``rounds`` rounds of one batch per variant, each round in a
    rotated order; per variant: every timing, wall, client CPU and proxy CPU, per round."""
    names = list(children)
    for name in names:
        res = run_batch(children[name], opts.warmup, opts)
        if res["errors"]:
            raise pb.BenchError(
                f"{name} warm-up failed: {res['errors']} errors: {res['first_error']}"
            )
        pb.log(f"warm-up {name}: {opts.warmup} connections")
    data: dict[str, dict[str, Any]] = {
        n: {"ns": [], "round_medians_ns": [], "wall_ns": 0, "cpu_ns": 0, "proxy_cpu_s": 0.0,
            "errors": 0, "first_error": None}
        for n in names
    }  # fmt: skip
    rounds: list[dict[str, Any]] = []
    for round_no, k in enumerate(batch_sizes(opts.count, opts.rounds)):
        busy = pb.wait_for_quiet(max_wait_s=opts.quiet_wait_s)
        shift = round_no % len(names)
        order = names[shift:] + names[:shift]
        rounds.append({"round": round_no, "order": order, "busy_before": busy,
                       "load_avg": [round(x, 2) for x in os.getloadavg()]})  # fmt: skip
        ticks0 = pb.cpu_ticks()
        for name in order:
            p0 = pb.proc_cpu_s(proxy_pid)
            res = run_batch(children[name], k, opts)
            entry = data[name]
            entry["proxy_cpu_s"] += pb.proc_cpu_s(proxy_pid) - p0
            entry["ns"] += res["ns"]
            if res["ns"]:
                entry["round_medians_ns"].append(statistics.median(res["ns"]))
            entry["wall_ns"] += res["wall_ns"]
            entry["cpu_ns"] += res["cpu_ns"]
            entry["errors"] += res["errors"]
            entry["first_error"] = entry["first_error"] or res["first_error"]
        rounds[-1]["cpu_busy"] = pb.busy_percent(ticks0, pb.cpu_ticks())
        pb.log(
            f"round {round_no + 1}/{opts.rounds}: {k} per variant, busy before {busy}, "
            f"during {rounds[-1]['cpu_busy']}, load {rounds[-1]['load_avg']}"
        )
    return data, rounds


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def summarize(data: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, d in data.items():
        ns = sorted(d["ns"])
        n = len(ns)
        rows.append({
            "variant": name,
            "what": BY_NAME[name].what,
            "connections": n,
            "errors": d["errors"],
            "first_error": d["first_error"],
            "median_us": statistics.median(ns) / 1000 if ns else None,
            "p99_us": percentile(ns, 99) / 1000 if ns else None,
            "mean_us": statistics.fmean(ns) / 1000 if ns else None,
            "min_us": ns[0] / 1000 if ns else None,
            "conn_per_s": n / (d["wall_ns"] / 1e9) if d["wall_ns"] else None,
            "client_cpu_us_per_conn": d["cpu_ns"] / 1000 / n if n else None,
            "proxy_cpu_us_per_conn": 1e6 * d["proxy_cpu_s"] / n
            if n and BY_NAME[name].proxied else None,
            "round_medians_us": [round(m / 1000, 1) for m in d["round_medians_ns"]],
        })  # fmt: skip
    return rows


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shim minus its like-for-like plain client: the difference of the medians (the verdict),
    and the per-round differences of the medians, each from two batches run back to back, so
    the machine's drift cancels: their median, and their mean with twice its standard error
    (how far the figure is to be trusted on this machine)."""
    by = {r["variant"]: r for r in rows}
    out = []
    for shim, plain, decides in COMPARISONS:
        a, b = by.get(shim), by.get(plain)
        if not a or not b or a["median_us"] is None or b["median_us"] is None:
            continue
        per_round = [
            x - y for x, y in zip(a["round_medians_us"], b["round_medians_us"], strict=False)
        ]
        added = a["median_us"] - b["median_us"]
        two_se = (
            2 * statistics.stdev(per_round) / len(per_round) ** 0.5 if len(per_round) > 1 else None
        )
        out.append({
            "shim": shim, "plain": plain, "decides": decides,
            "added_median_us": round(added, 1),
            "added_p99_us": round(a["p99_us"] - b["p99_us"], 1),
            "added_client_cpu_us": round(
                a["client_cpu_us_per_conn"] - b["client_cpu_us_per_conn"], 1),
            "per_round_us": [round(x, 1) for x in per_round],
            "per_round_median_us": round(statistics.median(per_round), 1) if per_round else None,
            "per_round_mean_us": round(statistics.fmean(per_round), 1) if per_round else None,
            "per_round_mean_2se_us": round(two_se, 1) if two_se is not None else None,
            "pass": added <= TARGET_US if decides else None,
        })  # fmt: skip
    return out


def fmt(v: float | None, digits: int = 0) -> str:
    return pb.fmt_num(v, digits)


def render(rows: Sequence[dict[str, Any]], comps: Sequence[dict[str, Any]], opts: Options) -> str:
    headers = ["variant", "median us", "p99 us", "mean us", "conn/s", "app cpu us",
               "proxy cpu us", "errors"]  # fmt: skip
    body = [
        [r["variant"], fmt(r["median_us"], 1), fmt(r["p99_us"], 1), fmt(r["mean_us"], 1),
         fmt(r["conn_per_s"]), fmt(r["client_cpu_us_per_conn"], 1),
         fmt(r["proxy_cpu_us_per_conn"], 1), str(r["errors"])]
        for r in rows
    ]  # fmt: skip
    width = max((len(r["variant"]) for r in rows), default=0)
    legend = [f"  {r['variant'].ljust(width)}  {r['what']}" for r in rows]
    lines = [
        f"connect() + first byte, one egress proxy (uvloop, CPU {pb.PROXY_CPU}), clients and "
        f"upstream on CPU {pb.LOAD_CPU}, uid {opts.bench_uid}; {opts.count}"
        f" sequential connections per variant in {opts.rounds} interleaved rounds, "
        f"{opts.warmup} warm-up excluded",
        pb.table(headers, body),
        "",
        *legend,
        "conn/s = connections / the loop's wall time (close included); app cpu = the client "
        "interpreter's CPU per connection; proxy cpu = egress's",
        "",
    ]
    for c in comps:
        paired = ""
        if c["per_round_mean_2se_us"] is not None:
            paired = (
                f"; per round: median {c['per_round_median_us']:+.1f}, mean "
                f"{c['per_round_mean_us']:+.1f} +- {c['per_round_mean_2se_us']:.1f} (2 SE)"
            )
        lines.append(
            f"{c['shim']} vs {c['plain']}: {c['added_median_us']:+.1f} us median, "
            f"{c['added_p99_us']:+.1f} us p99, {c['added_client_cpu_us']:+.1f} us app CPU{paired}"
        )
    main = next((c for c in comps if c["shim"] == "shim" and c["decides"]), None)
    if main is not None:
        lines.append(
            f"shim added: {main['added_median_us']:.1f} µs median vs plain SOCKS5 (target <= "
            f"{TARGET_US:.0f})"
        )
    for c in comps:
        if c["decides"]:
            verdict = "PASS" if c["pass"] else "FAIL"
            lines.append(
                f"{verdict}: {c['shim']} adds {c['added_median_us']:.1f} us over {c['plain']}"
                f" (target <= {TARGET_US:.0f} us)"
            )
    return "\n".join(lines)


def logged_connections(path: Path, timeout_s: float = 5.0) -> dict[str, int]:
    """App "bench"'s records in the connection log, by destination and decision, once the log
    stops growing (it is flushed twice a second): proof that each proxied variant's
    connections went through the proxy, and the name variants' by name."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, int] | None = None
    while True:
        counts: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("app") == "bench":
                        dest, decision = record.get("dest"), record.get("decision")
                        key = f"{dest} {decision} {record.get('bytes_down')}"
                        counts[key] = counts.get(key, 0) + 1
        if counts == last or time.monotonic() >= deadline:
            return counts
        last = counts
        time.sleep(0.6)


def expected_log(opts: Options, up_port: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in opts.variants:
        if BY_NAME[name].proxied:
            host = UPSTREAM_NAME if name.endswith("-name") else pb.HOST
            key = f"{host}:{up_port} allowed 1"
            out[key] = out.get(key, 0) + opts.warmup + opts.count
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="300 connections per variant, 10 rounds")
    p.add_argument("--count", type=int, default=None, help="connections per variant (2000)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (40; quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up per variant (200; quick 50)")
    p.add_argument(
        "--variants", default=",".join(v.name for v in VARIANTS),
        help="comma-separated subset of the variants",
    )  # fmt: skip
    p.add_argument("--uid", type=int, default=10501, help="uid every client runs as (10501)")
    p.add_argument("--python", default=CHILD_PYTHON, help="the clients' interpreter")
    p.add_argument(
        "--quiet-wait", type=float, default=5.0,
        help="seconds to wait, at most, for both CPUs to be under 15%% busy before a round",
    )  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="JSON results file")
    a = p.parse_args(argv)
    variants = tuple(v.strip() for v in a.variants.split(",") if v.strip())
    for v in variants:
        if v not in BY_NAME:
            p.error(f"unknown variant {v!r}; known: {', '.join(BY_NAME)}")
    count = a.count if a.count is not None else (300 if a.quick else 2000)
    rounds = a.rounds if a.rounds is not None else (10 if a.quick else 40)
    if count < 1 or not 1 <= rounds <= count:
        p.error("need --count >= 1 and 1 <= --rounds <= --count")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    uid = a.uid if os.geteuid() == 0 else os.getuid()
    if uid == 0:
        p.error("the clients must not run as root: root is never an app")
    return Options(
        count=count,
        rounds=rounds,
        warmup=a.warmup if a.warmup is not None else (50 if a.quick else 200),
        variants=variants,
        bench_uid=uid,
        python=a.python,
        quiet_wait_s=a.quiet_wait,
        batch_timeout_s=60.0 + count / rounds * 0.05,  # 50 ms a connection is far off
        results_path=a.output or pb.RESULTS_DIR / f"sandbox-{stamp}.json",
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        pb.log(f"not root: the clients run as the current uid {opts.bench_uid}")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(pb.LOAD_CPU)})  # the driver mostly waits on its children
    pb.RESULTS_DIR.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "options": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(opts).items()
            },
            "versions": pb.versions(),
            "pinning": {"proxy": pb.PROXY_CPU, "clients_upstream": pb.LOAD_CPU},
            "load_avg_start": os.getloadavg(),
            "command": " ".join([sys.executable, *sys.argv]),
        },
        "rounds": [],
        "summary": [],
        "comparisons": [],
        "error": None,
    }
    status = 0
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="egress-shim-bench-")))
        tmp.chmod(0o755)
        try:
            dns = stack.enter_context(DnsStub({UPSTREAM_NAME: [pb.HOST]}, ttl=3600))
            up_port = stack.enter_context(upstream(tmp, opts.python))
            socks_port = pb.free_port()
            config = egress_config(tmp, socks_port, dns, up_port, opts.bench_uid)
            proxy = stack.enter_context(start_egress(tmp, config, socks_port))
            shim = world_readable_shim(tmp)
            cfg = {
                "proxy_host": pb.HOST, "proxy_port": socks_port, "up_ip": pb.HOST,
                "up_port": up_port, "up_name": UPSTREAM_NAME, "byte": FIRST_BYTE,
            }  # fmt: skip
            children = {
                name: stack.enter_context(start_child(BY_NAME[name], opts, tmp, shim, cfg))
                for name in opts.variants
            }
            results["meta"]["children"] = {n: c.hello for n, c in children.items()}
            data, results["rounds"] = measure(opts, children, proxy.pid)
            results["summary"] = summarize(data)
            results["comparisons"] = comparisons(results["summary"])
            # every proxied connection, warm-up included, is one record: allowed, 1 byte down
            logged = logged_connections(tmp / "conn.log")
            expected = expected_log(opts, up_port)
            results["meta"]["connection_log"] = {"logged": logged, "expected": expected}
            if logged != expected:
                raise pb.BenchError(
                    f"the proxy's connection log (dest decision bytes_down: count) {logged}, "
                    f"expected {expected}"
                )
            results["meta"]["dns_queries"] = len(dns.queries)
        except pb.BenchError as exc:
            pb.log(str(exc))
            results["error"] = str(exc)
            status = 1
    results["meta"]["load_avg_end"] = os.getloadavg()
    if results["summary"]:
        print(render(results["summary"], results["comparisons"], opts))
    if any(r["errors"] for r in results["summary"]):
        status = status or 1
    opts.results_path.parent.mkdir(parents=True, exist_ok=True)
    opts.results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {opts.results_path}")
    if status == 0 and any(c["pass"] is False for c in results["comparisons"]):
        status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
