"""The security proof for the firewall: a sandboxed uid can reach nothing but the proxy.

Each node under test is a fresh network namespace with only a loopback interface plus two
"internet" addresses on it (10.77.0.1 and fd77::1). Inside it run, as real processes: an
upstream (TCP echo/HTTP on both addresses, a DNS-like UDP responder on port 53 of both, and a
"local service" on 127.0.0.1 that is not the proxy), the real ``egress proxy``, and the real
``egress firewall sync``. Every rule the tests cause lives in that namespace, which is deleted
afterwards; the host's firewall is never touched.

Clients are child processes running under real uids (stdlib only), so what is checked is what a
sandboxed app would notice: does the connection work, how does it fail, how fast, did the
upstream see anything, and do the per-app bypass counters move. Every blocking probe is paired
with the same probe under a uid outside the sandbox range, which must succeed: that proves the
probe itself works and that it is the firewall, not a permission or a missing listener, that
stops the sandboxed one.

Both backends run: ``iptables-restore`` (the nf_tables variant on this host) and ``iptc``
(python-iptables, which drives the legacy variant).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.configs import write_config
from tests.netns import NetworkNamespace
from tests.processes import (
    EgressProcess,
    python_for_uid,
    run_egress,
    start_proxy,
    stop_process,
    wait_ready,
)

pytestmark = pytest.mark.netns

BACKENDS = ("iptables-restore", "iptc")

# Addresses and ports inside the namespace (it is fresh, so fixed ports are free).
UPSTREAM_V4 = "10.77.0.1"
UPSTREAM_V6 = "fd77::1"
ECHO_PORT = 7007  # allowed for app "blog" through the proxy
FOREIGN_PORT = 7008  # a foreign (non-egress) OUTPUT rule rejects TCP to it
LOCAL_PORT = 6379  # a local service on 127.0.0.1 that is not the proxy (think Redis)
DNS_PORT = 53
SOCKS_PORT = 1080
HTTP_PORT = 3128
TRANSPARENT_PORT = 15001

BLOG_UID = 10001  # app "blog"
REPORTS_UID = 10002  # app "reports": sandboxed, never used to attack; its counter stays 0
UNASSIGNED_UID = 10999  # inside the sandbox range (its upper end), in no app
SANDBOX_RANGE = (10000, 10999)
OUTSIDER_UIDS = (9999, 11000, 20001)  # just below, just above and far outside the range
OUTSIDER_UID = 20001

FOREIGN_COMMENT = "foreign rule: not egress"

PROBE_TIMEOUT_S = 2.0  # per network attempt; refusals take milliseconds
ANSWER_WAIT_S = 1.0  # UDP/ICMP: a blocked ICMPv6 echo is dropped silently, so this is waited
FAST_S = 1.0  # "fails fast": well under any timeout

# --- the upstream: stdlib, runs as root inside the namespace -----------------------------------
UPSTREAM_CODE = textwrap.dedent(
    """
    import socket, sys, threading
    log_path, v4, v6 = sys.argv[1], sys.argv[2], sys.argv[3]
    echo, foreign, local, dns = (int(a) for a in sys.argv[4:8])
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)
    HTTP = (b"HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 5\\r\\n"
            b"Connection: close\\r\\n\\r\\nhello")

    def note(*parts):
        with lock:
            log.write(" ".join(str(p) for p in parts) + "\\n")
            log.flush()

    def family(host):
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def serve(conn):
        with conn:
            conn.settimeout(5)
            try:
                data = conn.recv(65536)
                conn.sendall(HTTP if data.startswith(b"GET ") else data)
            except OSError:
                pass

    def tcp(host, port):
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        def loop():
            while True:
                conn, peer = s.accept()
                note("tcp", host, port, peer[0])
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        return loop

    def udp(host, port):
        s = socket.socket(family(host), socket.SOCK_DGRAM)
        s.bind((host, port))
        def loop():
            while True:
                data, peer = s.recvfrom(4096)
                note("udp", host, port, peer[0])
                if len(data) >= 12:  # a DNS-shaped reply: same id, QR set, rest echoed
                    s.sendto(data[:2] + b"\\x81\\x80" + data[4:], peer)
        return loop

    loops = [tcp(v4, echo), tcp(v6, echo), tcp(v4, foreign), tcp("127.0.0.1", local),
             udp(v4, dns), udp(v6, dns)]
    for loop in loops:
        threading.Thread(target=loop, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)

# --- the probes: stdlib only, run under the uid being tested -----------------------------------
# argv[1]: JSON list of {"kind": ..., "args": {...}}; prints a JSON list of results, one per
# probe: outcome ("ok", "refused", "eperm", "timeout", "oserror:ENAME", "error:Type", curl's
# "curl-exit-N"), the stage it ended in, elapsed seconds and a detail string.
PROBE_CODE = textwrap.dedent(
    """
    import ctypes, errno, json, os, socket, struct, subprocess, sys, time
    TIMEOUT = float(sys.argv[2])
    ANSWER_WAIT = float(sys.argv[3])  # UDP/ICMP: how long to wait for an answer
    stage = ["setup"]

    def at(name):
        stage[0] = name

    def fam(host):
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def recv_exactly(s, n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        return data

    def exchange(s):
        at("exchange")
        s.sendall(b"ping")
        data = recv_exactly(s, 4)
        if data != b"ping":
            raise RuntimeError(f"unexpected echo {data!r}")
        return "echoed"

    def tcp(host, port):
        at("socket")
        with socket.socket(fam(host), socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            at("connect")
            s.connect((host, port))
            return exchange(s)

    def raw_socket_module(host, port):
        import _socket
        at("socket")
        s = _socket.socket(_socket.AF_INET6 if ":" in host else _socket.AF_INET,
                           _socket.SOCK_STREAM)
        try:
            s.settimeout(TIMEOUT)
            at("connect")
            s.connect((host, port))
            at("exchange")
            s.send(b"ping")
            data = s.recv(4)
            if data != b"ping":
                raise RuntimeError(f"unexpected echo {data!r}")
            return "echoed"
        finally:
            s.close()

    def ctypes_tcp(host, port):
        # libc socket()/connect()/send()/recv() directly: what a C extension would do.
        libc = ctypes.CDLL(None, use_errno=True)
        def check(rc):
            if rc < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return rc
        at("socket")
        fd = check(libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0))
        try:
            tv = struct.pack("ll", int(TIMEOUT), 0)
            for opt in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):  # SNDTIMEO bounds connect()
                check(libc.setsockopt(fd, socket.SOL_SOCKET, opt, tv, len(tv)))
            addr = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
                    + socket.inet_aton(host) + bytes(8))
            at("connect")
            try:
                check(libc.connect(fd, addr, len(addr)))
            except BlockingIOError as exc:  # EINPROGRESS: SO_SNDTIMEO expired
                raise TimeoutError("connect timed out") from exc
            at("exchange")
            check(libc.send(fd, b"ping", 4, 0))
            buf = ctypes.create_string_buffer(16)
            n = check(libc.recv(fd, buf, 16, 0))
            if buf.raw[:n] != b"ping":
                raise RuntimeError(f"unexpected echo {buf.raw[:n]!r}")
            return "echoed"
        finally:
            libc.close(fd)

    def udp(host, port):
        at("socket")
        with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
            s.settimeout(ANSWER_WAIT)
            s.connect((host, port))
            query = (b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
                     b"\\x07example\\x04test\\x00\\x00\\x01\\x00\\x01")
            at("send")
            s.send(query)
            at("receive")
            reply = s.recv(4096)
            if reply[:2] != b"\\x12\\x34" or not reply[2] & 0x80:
                raise RuntimeError(f"not a reply: {reply!r}")
            return "answered"

    def icmp(host):
        # An unprivileged ICMP datagram ("ping") socket; the test opens ping_group_range in
        # the namespace so creating it is allowed and the echo request is really sent.
        v6 = ":" in host
        at("socket")
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        with socket.socket(fam(host), socket.SOCK_DGRAM, proto) as s:
            s.settimeout(ANSWER_WAIT)
            request = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + b"egress"
            at("send")
            s.sendto(request, (host, 0))
            at("receive")
            reply = s.recv(4096)
            if reply[0] != (129 if v6 else 0):
                raise RuntimeError(f"not an echo reply: {reply!r}")
            return "pong"

    def curl(url):
        at("curl")
        env = {"PATH": "/usr/bin:/bin", "HOME": "/"}  # no proxy variables
        r = subprocess.run(
            ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time",
             str(int(TIMEOUT) + 1), url],
            capture_output=True, env=env, timeout=TIMEOUT + 10)
        if r.returncode != 0:
            raise CurlFailed(r.returncode, r.stderr.decode(errors="replace").strip())
        if r.stdout != b"hello":
            raise RuntimeError(f"unexpected body {r.stdout!r}")
        return "hello"

    class CurlFailed(Exception):
        pass

    def socks5(proxy_port, host, port):
        at("connect")
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT) as s:
            at("handshake")
            s.sendall(b"\\x05\\x01\\x00")
            if recv_exactly(s, 2) != b"\\x05\\x00":
                raise RuntimeError("no SOCKS5 method accepted")
            atyp, packed = (b"\\x04", socket.inet_pton(socket.AF_INET6, host)) if ":" in host \\
                else (b"\\x01", socket.inet_aton(host))
            s.sendall(b"\\x05\\x01\\x00" + atyp + packed + struct.pack("!H", port))
            head = recv_exactly(s, 4)
            recv_exactly(s, {1: 4, 4: 16}[head[3]] + 2)
            if head[1] != 0:
                raise RuntimeError(f"SOCKS5 reply {head[1]}")
            return exchange(s)

    def http_connect(proxy_port, host, port):
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        at("connect")
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT) as s:
            at("handshake")
            s.sendall(f"CONNECT {authority} HTTP/1.1\\r\\nHost: {authority}\\r\\n\\r\\n".encode())
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                chunk = s.recv(1)
                if not chunk:
                    raise ConnectionError(f"closed after {head!r}")
                head += chunk
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()}")
            return exchange(s)

    PROBES = {"tcp": tcp, "raw_socket_module": raw_socket_module, "ctypes_tcp": ctypes_tcp,
              "udp": udp, "icmp": icmp, "curl": curl, "socks5": socks5,
              "http_connect": http_connect}

    def classify(exc):
        if isinstance(exc, CurlFailed):
            return f"curl-exit-{exc.args[0]}"
        if isinstance(exc, ConnectionRefusedError):
            return "refused"
        if isinstance(exc, PermissionError):
            return "eperm"
        if isinstance(exc, TimeoutError):
            return "timeout"
        if isinstance(exc, OSError) and exc.errno:
            return "oserror:" + errno.errorcode.get(exc.errno, str(exc.errno))
        return "error:" + type(exc).__name__

    results = []
    for probe in json.loads(sys.argv[1]):
        stage[0] = "setup"
        started = time.monotonic()
        try:
            detail, outcome = PROBES[probe["kind"]](**probe["args"]), "ok"
        except Exception as exc:
            detail, outcome = repr(exc), classify(exc)
        results.append({**probe, "outcome": outcome, "stage": stage[0],
                        "elapsed": round(time.monotonic() - started, 3),
                        "detail": str(detail)[:300]})
    print(json.dumps(results))
    """
)


def probe(kind: str, **args: Any) -> dict[str, Any]:
    return {"kind": kind, "args": args}


def tcp4(port: int = ECHO_PORT) -> dict[str, Any]:
    return probe("tcp", host=UPSTREAM_V4, port=port)


def tcp6(port: int = ECHO_PORT) -> dict[str, Any]:
    return probe("tcp", host=UPSTREAM_V6, port=port)


DIRECT_TCP = [tcp4(), tcp6(), probe("tcp", host="127.0.0.1", port=LOCAL_PORT)]
DIRECT_OTHER = [
    probe("udp", host=UPSTREAM_V4, port=DNS_PORT),
    probe("udp", host=UPSTREAM_V6, port=DNS_PORT),
    probe("icmp", host=UPSTREAM_V4),
    probe("icmp", host=UPSTREAM_V6),
]
LOW_LEVEL = [
    probe("ctypes_tcp", host=UPSTREAM_V4, port=ECHO_PORT),
    probe("raw_socket_module", host=UPSTREAM_V4, port=ECHO_PORT),
    probe("raw_socket_module", host=UPSTREAM_V6, port=ECHO_PORT),
    probe("curl", url=f"http://{UPSTREAM_V4}:{ECHO_PORT}/"),
    probe("curl", url=f"http://[{UPSTREAM_V6}]:{ECHO_PORT}/"),
]
VIA_PROXY = [
    probe("socks5", proxy_port=SOCKS_PORT, host=UPSTREAM_V4, port=ECHO_PORT),
    probe("socks5", proxy_port=SOCKS_PORT, host=UPSTREAM_V6, port=ECHO_PORT),
    probe("http_connect", proxy_port=HTTP_PORT, host=UPSTREAM_V4, port=ECHO_PORT),
    probe("http_connect", proxy_port=HTTP_PORT, host=UPSTREAM_V6, port=ECHO_PORT),
]


def describe(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {r['kind']} {r['args']}: {r['outcome']} at {r['stage']} after {r['elapsed']}s"
        f" ({r['detail']})"
        for r in results
    )


# --- the node under test ------------------------------------------------------------------------
@dataclass
class Node:
    ns: NetworkNamespace
    backend: str
    tmp: Path
    config: Path
    upstream_log: Path
    cli_env: dict[str, str] | None = None
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)  # stopped by pid
    proxy: EgressProcess | None = None

    # iptables variant matching the backend: iptc drives the legacy one; iptables-restore
    # (and auto) use the host default, nf_tables here.
    @property
    def tools(self) -> dict[str, str]:
        variant = "legacy" if self.backend == "iptc" else "nft"
        return {
            "iptables": f"iptables-{variant}",
            "ipv4-save": f"iptables-{variant}-save",
            "ipv6-save": f"ip6tables-{variant}-save",
        }

    def firewall(self, action: str, *extra: str) -> subprocess.CompletedProcess[str]:
        command = ("firewall", action, "--config", str(self.config), *extra)
        return run_egress(*command, netns=self.ns, env=self.cli_env)

    def sync(self) -> subprocess.CompletedProcess[str]:
        return self.firewall("sync", "--backend", self.backend)

    def probes(self, uid: int, probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``probes`` in one child process under ``uid`` (0: root) inside the namespace."""
        options: dict[str, Any] = {}
        if uid != 0:
            options = {"user": uid, "group": uid, "extra_groups": []}
        result = self.ns.run(
            [
                python_for_uid(uid) if uid else sys.executable,
                "-I",
                "-c",
                PROBE_CODE,
                json.dumps(probes),
                str(PROBE_TIMEOUT_S),
                str(ANSWER_WAIT_S),
            ],
            cwd="/",
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"},
            timeout=30,
            **options,
        )
        assert result.returncode == 0, f"probe child (uid {uid}) failed: {result.stderr}"
        results: list[dict[str, Any]] = json.loads(result.stdout)
        return results

    def save(self, family: str = "ipv4") -> str:
        return self.ns.check([self.tools[f"{family}-save"], "-c"])

    def app_counters(self) -> dict[str, int]:
        """Packets counted by each app's counting rule, IPv4 + IPv6, read from the kernel."""
        counts: dict[str, int] = {}
        for family in ("ipv4", "ipv6"):
            for line in self.save(family).splitlines():
                match = re.match(r"^\[(\d+):\d+\] -A .*--comment \"?egress app=([\w-]+)", line)
                if match:
                    counts[match[2]] = counts.get(match[2], 0) + int(match[1])
        return counts

    def upstream_hits(self) -> list[str]:
        return self.upstream_log.read_text().splitlines()

    def egress_rules(self) -> list[str]:
        """Every rule or chain line of ours, both families (what flush must remove)."""
        lines = []
        for family in ("ipv4", "ipv6"):
            for line in self.save(family).splitlines():
                if "EGRESS" in line or "egress " in line:
                    lines.append(f"{family}: {line}")
        return lines

    def kill_proxy(self) -> None:
        assert self.proxy is not None
        self.proxy.kill()


def node_config(backend: str, log: Path, mode: str = "explicit") -> dict[str, Any]:
    proxy: dict[str, Any] = {
        "socks5_listen": [f"127.0.0.1:{SOCKS_PORT}"],
        "http_listen": [f"127.0.0.1:{HTTP_PORT}"],
    }
    if mode == "transparent":
        proxy["transparent_listen"] = f"[::]:{TRANSPARENT_PORT}"
    proxy.update(handshake_timeout=2.0, connect_timeout=2.0, drain_timeout=1.0)
    return {
        "proxy": proxy,
        "security": {"allow_special": ["10.77.0.0/16", "fd77::/16"]},
        "firewall": {
            "sandbox_uids": [f"{SANDBOX_RANGE[0]}-{SANDBOX_RANGE[1]}"],
            "backend": backend,
            "mode": mode,
        },
        "log": {"connection_log": str(log)},
        "app": [
            {
                "name": "blog",
                "uids": [str(BLOG_UID)],
                "allow": [f"{UPSTREAM_V4}:{ECHO_PORT}", f"[{UPSTREAM_V6}]:{ECHO_PORT}"],
            },
            {
                "name": "reports",
                "uids": [str(REPORTS_UID)],
                "allow": [f"{UPSTREAM_V4}:{ECHO_PORT}"],
            },
        ],
    }


def iptables_variant_env(directory: Path, variant: str) -> dict[str, str]:
    """An environment whose ``iptables``, ``ip6tables`` and their -save/-restore are
    ``variant`` ("legacy" or "nft"): how a host of that kind looks to the controller."""
    directory.mkdir(parents=True, exist_ok=True)
    for base in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            link = directory / f"{base}{suffix}"
            link.unlink(missing_ok=True)
            link.symlink_to(f"/usr/sbin/{base}-{variant}{suffix}")
    return {**os.environ, "PATH": f"{directory}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"}


@contextlib.contextmanager
def firewalled_node(tmp: Path, backend: str, mode: str = "explicit") -> Iterator[Node]:
    """A namespace with upstream, proxy and a foreign OUTPUT rule, then ``firewall sync``;
    everything started is killed by pid and the namespace (with every rule in it) deleted."""
    tmp.mkdir(parents=True, exist_ok=True)
    ns = NetworkNamespace(addresses=(f"{UPSTREAM_V4}/32", f"{UPSTREAM_V6}/128"))
    node = Node(ns, backend, tmp, tmp / "egress.toml", tmp / "upstream.log")
    if backend == "iptc":
        # python-iptables writes the legacy tables, and the controller (rightly) refuses that on
        # an nf_tables host like this one (see test_iptc_is_refused_on_an_nf_tables_host). So the
        # iptc runs see a legacy host: the controller's `iptables` is the legacy variant.
        node.cli_env = iptables_variant_env(tmp / "bin", "legacy")
    try:
        # Let every group open ICMP datagram sockets, so a blocked ping is blocked by the
        # firewall and not by a permission check.
        ns.check(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])
        write_config(node.config, node_config(backend, tmp / "connections.log", mode))
        node.upstream_log.touch()
        upstream = ns.popen(
            [
                sys.executable,
                "-I",
                "-c",
                UPSTREAM_CODE,
                str(node.upstream_log),
                UPSTREAM_V4,
                UPSTREAM_V6,
                str(ECHO_PORT),
                str(FOREIGN_PORT),
                str(LOCAL_PORT),
                str(DNS_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        node.processes.append(upstream)
        wait_ready(upstream, "upstream")
        # Someone else's rule in OUTPUT, there before egress: sync and flush must keep it.
        ns.check(
            [
                node.tools["iptables"],
                "-A",
                "OUTPUT",
                "-d",
                f"{UPSTREAM_V4}/32",
                "-p",
                "tcp",
                "--dport",
                str(FOREIGN_PORT),
                "-m",
                "comment",
                "--comment",
                FOREIGN_COMMENT,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]
        )
        node.proxy = start_proxy(node.config, netns=ns)
        result = node.sync()
        assert result.returncode == 0, (
            f"`egress firewall sync --backend {backend}` exited {result.returncode}:\n"
            f"{result.stderr}{result.stdout}"
        )
        yield node
    finally:
        for proc in node.processes:
            stop_process(proc)
        if node.proxy is not None:
            node.proxy.stop()
        ns.close()


@pytest.fixture(scope="module", params=BACKENDS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """One firewalled node per backend, shared by the tests that only probe it."""
    tmp = tmp_path_factory.mktemp(f"fw-{request.param}")
    with firewalled_node(tmp, request.param) as made:
        yield made


@pytest.fixture(params=BACKENDS)
def fresh_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """A node of its own, for tests that kill the proxy or change the firewall."""
    with firewalled_node(tmp_path / "node", request.param) as made:
        yield made


# --- assertions -----------------------------------------------------------------------------------
def assert_all_ok(results: list[dict[str, Any]], who: str) -> None:
    failed = [r for r in results if r["outcome"] != "ok"]
    assert not failed, f"{who}: expected these to work:\n{describe(failed)}"


def assert_tcp_refused_fast(results: list[dict[str, Any]], who: str) -> None:
    """TCP is answered by a reset: connect() raises ConnectionRefusedError at once."""
    wrong = [
        r
        for r in results
        if not (r["outcome"] == "refused" and r["stage"] == "connect" and r["elapsed"] < FAST_S)
    ]
    assert not wrong, (
        f"{who}: expected an immediate ConnectionRefusedError from connect()"
        f" (a TCP reset, not a timeout or a silent drop):\n{describe(wrong)}"
    )


def assert_curl_refused_fast(results: list[dict[str, Any]], who: str) -> None:
    wrong = [r for r in results if not (r["outcome"] == "curl-exit-7" and r["elapsed"] < FAST_S)]
    assert not wrong, f"{who}: expected curl exit 7 (couldn't connect) at once:\n{describe(wrong)}"


def assert_blocked(results: list[dict[str, Any]], who: str) -> None:
    """UDP/ICMP: the socket was created (so no permission stopped it) and the exchange failed."""
    wrong = [r for r in results if r["outcome"] == "ok" or r["stage"] in ("setup", "socket")]
    assert not wrong, f"{who}: expected these to be blocked after the socket opened:\n" + describe(
        wrong
    )


# --- 1. the allowed path ----------------------------------------------------------------------
def test_sandboxed_app_reaches_its_upstream_through_the_proxy(node: Node) -> None:
    """With the firewall on, SOCKS5 and HTTP CONNECT to the proxy work for the app, v4 and v6."""
    assert_all_ok(node.probes(BLOG_UID, VIA_PROXY), f"uid {BLOG_UID} via the proxy")


# --- 2. direct traffic, every protocol --------------------------------------------------------
@pytest.mark.parametrize("uid", [BLOG_UID, SANDBOX_RANGE[0], UNASSIGNED_UID])
def test_direct_traffic_from_a_sandbox_uid_is_rejected(node: Node, uid: int) -> None:
    """TCP v4/v6 and to a loopback service: refused at once; UDP (DNS) and ICMP v4/v6: blocked
    with nothing reaching the upstream. Holds for an app's uid, for a sandbox uid in no app and
    at both ends of the sandbox range."""
    before = node.upstream_hits()
    tcp = node.probes(uid, DIRECT_TCP)
    other = node.probes(uid, DIRECT_OTHER)
    after = node.upstream_hits()
    assert_tcp_refused_fast(tcp, f"uid {uid} direct TCP")
    assert_blocked(other, f"uid {uid} direct UDP/ICMP")
    assert after == before, f"uid {uid}: the upstream saw traffic: {after[len(before) :]}"


def test_the_same_probes_work_outside_the_sandbox(node: Node) -> None:
    """The control for test 2 and 3: the very same probes succeed for a non-sandbox uid, so the
    failures above are the firewall's doing (and the upstream counts what reached it)."""
    before = len(node.upstream_hits())
    results = node.probes(OUTSIDER_UID, [*DIRECT_TCP, *DIRECT_OTHER, *LOW_LEVEL])
    assert_all_ok(results, f"uid {OUTSIDER_UID} (not sandboxed)")
    hits = node.upstream_hits()[before:]
    assert sum(h.startswith("udp ") for h in hits) == 2, hits  # both DNS queries arrived


# --- 3. bypasses that do not go through Python's socket module --------------------------------
def test_low_level_bypasses_are_rejected(node: Node) -> None:
    """libc connect() via ctypes, the raw _socket module and a curl subprocess all fail."""
    before = node.upstream_hits()
    results = node.probes(BLOG_UID, LOW_LEVEL)
    after = node.upstream_hits()
    assert_tcp_refused_fast([r for r in results if r["kind"] != "curl"], "low-level TCP")
    assert_curl_refused_fast([r for r in results if r["kind"] == "curl"], "curl")
    assert after == before, f"the upstream saw traffic: {after[len(before) :]}"


# --- 4. counting ------------------------------------------------------------------------------
def test_bypass_attempts_are_counted_for_the_app(node: Node) -> None:
    """Blocked packets show up in blog's counter (kernel and `egress firewall status`); the
    other app, which attempted nothing, stays at 0."""
    before = node.app_counters()
    assert "blog" in before and "reports" in before, (
        f"expected one counting rule per app (comment 'egress app=NAME'): {before}\n" + node.save()
    )
    attempts = [tcp4(), tcp6(), *DIRECT_OTHER]
    results = node.probes(BLOG_UID, attempts)
    assert all(r["outcome"] != "ok" for r in results), describe(results)
    after = node.app_counters()
    assert after["blog"] - before["blog"] >= len(attempts), (before, after)
    assert after["reports"] == 0, (before, after)

    status = node.firewall("status")
    assert status.returncode == 0, f"status exited {status.returncode}: {status.stderr}"
    counts = status_counters(status.stdout)
    assert counts.get("blog", 0) >= after["blog"], (
        f"`egress firewall status` should show blog's blocked packets ({after['blog']}):\n"
        f"{status.stdout}"
    )
    assert counts.get("reports") == 0, f"status should show reports at 0:\n{status.stdout}"


def status_counters(text: str) -> dict[str, int]:
    """Blocked-packet counts per app from `egress firewall status`: the ``APP: N`` lines under
    its "blocked packets per app" heading."""
    _, found, rest = text.partition("blocked packets per app")
    assert found, f"`egress firewall status` printed no blocked-packet counters:\n{text}"
    counts: dict[str, int] = {}
    for line in rest.splitlines()[1:]:
        match = re.fullmatch(r"\s*([\w-]+):\s*(\d+)\s*", line)
        if match is None:
            break
        counts[match[1]] = int(match[2])
    return counts


# --- 5. not caught ----------------------------------------------------------------------------
@pytest.mark.parametrize("uid", [0, *OUTSIDER_UIDS])
def test_root_and_non_sandbox_uids_are_not_caught(node: Node, uid: int) -> None:
    """Root and uids just below, just above and far outside the sandbox range get out directly
    (TCP, UDP, ICMP, v4 and v6): the firewall confines the sandbox range and nothing else."""
    results = node.probes(uid, [tcp4(), tcp6(), *DIRECT_OTHER])
    assert_all_ok(results, f"uid {uid} (outside the sandbox range)")


# --- 6. fails closed --------------------------------------------------------------------------
def test_a_dead_proxy_leaves_the_app_with_nothing(fresh_node: Node) -> None:
    """Fails closed: after SIGKILL of the proxy the app's only door is a closed port (refused),
    and every direct way out is still rejected."""
    node = fresh_node
    assert_all_ok(node.probes(BLOG_UID, VIA_PROXY[:1]), "before the kill")
    node.kill_proxy()
    via = node.probes(BLOG_UID, VIA_PROXY)
    direct = node.probes(BLOG_UID, [tcp4(), tcp6(), *LOW_LEVEL])
    assert_tcp_refused_fast(via, "proxy ports after SIGKILL")
    assert_tcp_refused_fast([r for r in direct if r["kind"] != "curl"], "direct after SIGKILL")
    assert_curl_refused_fast([r for r in direct if r["kind"] == "curl"], "curl after SIGKILL")
    assert_blocked(node.probes(BLOG_UID, DIRECT_OTHER), "UDP/ICMP after SIGKILL")


def test_a_sandbox_app_squatting_the_dead_proxys_port_relays_nothing(fresh_node: Node) -> None:
    """With the proxy dead, another sandboxed app binds the proxy's port to impersonate it: the
    blog app cannot even complete a handshake with it (the squatter's SYN-ACK is sandbox traffic
    too), so no tenant can stand in for the proxy or open a channel to another tenant."""
    node = fresh_node
    node.kill_proxy()
    squatter = node.ns.popen(
        [
            python_for_uid(REPORTS_UID),
            "-I",
            "-c",
            textwrap.dedent(
                f"""
                import socket
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", {SOCKS_PORT})); s.listen(8); print("ready", flush=True)
                while True:
                    c, _ = s.accept(); c.settimeout(3); print("accepted", flush=True)
                    try:
                        c.sendall(c.recv(100) or b"")
                    except OSError:
                        pass
                    c.close()
                """
            ),
        ],
        user=REPORTS_UID,
        group=REPORTS_UID,
        extra_groups=[],
        cwd="/",
        stdout=subprocess.PIPE,
        text=True,
    )
    node.processes.append(squatter)
    wait_ready(squatter, "squatter")
    results = node.probes(BLOG_UID, [probe("tcp", host="127.0.0.1", port=SOCKS_PORT)])
    squatter.kill()
    squatter.wait(timeout=10)
    assert squatter.stdout is not None
    accepted = squatter.stdout.read()
    # The squatter's SYN-ACK is sandbox traffic not addressed to a proxy port: rejected, so the
    # handshake never completes and not a byte changes hands.
    assert results[0]["outcome"] != "ok" and results[0]["stage"] == "connect", describe(results)
    assert "accepted" not in accepted, f"the squatter got a connection: {accepted!r}"


# --- 7. flush ---------------------------------------------------------------------------------
def test_flush_restores_direct_access_and_keeps_foreign_rules(fresh_node: Node) -> None:
    """`flush` opens the sandbox again (so it was the firewall that blocked it), removes every
    rule and chain of ours in both families, and leaves another program's OUTPUT rule working."""
    node = fresh_node
    assert_tcp_refused_fast(node.probes(BLOG_UID, [tcp4()]), "before flush")
    assert FOREIGN_COMMENT in node.save(), "sync removed a foreign OUTPUT rule:\n" + node.save()

    result = node.firewall("flush")
    assert result.returncode == 0, f"flush exited {result.returncode}: {result.stderr}"
    # Now the app gets out directly: it was the firewall that blocked it.
    assert_all_ok(node.probes(BLOG_UID, [tcp4(), tcp6(), *DIRECT_OTHER]), "after flush")
    assert not node.egress_rules(), "flush left rules behind:\n" + "\n".join(node.egress_rules())
    # The foreign rule is still there and still works.
    assert FOREIGN_COMMENT in node.save(), "flush removed a foreign OUTPUT rule:\n" + node.save()
    assert_tcp_refused_fast(
        node.probes(0, [tcp4(FOREIGN_PORT)]), "root to the foreign-rejected port"
    )


# --- the CLI exit codes the above relies on -----------------------------------------------------
def test_sync_and_status_exit_codes_follow_the_kernel(fresh_node: Node) -> None:
    """sync exits 0 and is idempotent; status exits 0 in sync and 1 when the kernel differs
    (a deleted OUTPUT jump that really lets the app out; nothing installed after flush); a
    second sync repairs the drift."""
    node = fresh_node
    status = node.firewall("status")
    assert status.returncode == 0, f"in sync after sync, yet status exited {status.returncode}"
    rules = node.egress_rules()
    again = node.sync()
    assert again.returncode == 0, f"second sync exited {again.returncode}: {again.stderr}"
    assert [_strip(r) for r in node.egress_rules()] == [_strip(r) for r in rules], (
        "a second sync changed the rules"
    )

    # Someone deletes the OUTPUT jump (position 1 by contract): the app gets out directly ...
    node.ns.check([node.tools["iptables"], "-D", "OUTPUT", "1"])
    assert_all_ok(node.probes(BLOG_UID, [tcp4()]), "with the OUTPUT jump deleted")
    # ... status notices, sync repairs it, and the app is blocked again.
    drifted = node.firewall("status")
    assert drifted.returncode == 1, (
        f"status should exit 1 on drift, got {drifted.returncode}:\n{drifted.stdout}"
    )
    repaired = node.sync()
    assert repaired.returncode == 0, f"repairing sync exited {repaired.returncode}"
    assert node.firewall("status").returncode == 0
    assert_tcp_refused_fast(node.probes(BLOG_UID, [tcp4()]), "after the repair")

    # After flush nothing of the plan is in the kernel: drifted again.
    assert node.firewall("flush").returncode == 0
    assert node.firewall("status").returncode == 1


def test_iptc_is_refused_on_an_nf_tables_host(tmp_path: Path) -> None:
    """On an nf_tables host, rules written to the legacy tables (all python-iptables can write)
    would filter while `iptables -L` hides them: sync must refuse, say what to use instead,
    and install nothing in either variant."""
    with NetworkNamespace() as ns:
        config = write_config(
            tmp_path / "egress.toml", node_config("iptc", tmp_path / "connections.log")
        )
        result = run_egress(
            *("firewall", "sync", "--config", str(config), "--backend", "iptc"),
            netns=ns,
            env=iptables_variant_env(tmp_path / "bin", "nft"),
        )
        assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
        assert "iptc" in result.stderr and "iptables-restore" in result.stderr, result.stderr
        saved = ns.check(["iptables-nft-save"]) + ns.check(["iptables-legacy-save"])
        saved += ns.check(["ip6tables-nft-save"]) + ns.check(["ip6tables-legacy-save"])
        assert "EGRESS" not in saved, saved


def test_sync_with_a_bad_config_fails_and_installs_nothing(tmp_path: Path) -> None:
    """A config error is exit 2 naming the bad key, before anything reaches the kernel."""
    with NetworkNamespace() as ns:
        bad = tmp_path / "bad.toml"
        bad.write_text('[firewall]\nsandbox_uids = ["10000-10999"]\nbackend = "bogus"\n')
        result = run_egress("firewall", "sync", "--config", str(bad), netns=ns)
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert "backend" in result.stderr
        saved = ns.check(["iptables-nft-save"]) + ns.check(["iptables-legacy-save"])
        assert "EGRESS" not in saved, saved


def _strip(line: str) -> str:
    return re.sub(r"^(\w+: )\[\d+:\d+\] ", r"\1", re.sub(r" \[\d+:\d+\]$", "", line))


# --- transparent mode ---------------------------------------------------------------------------
@pytest.fixture(params=BACKENDS)
def transparent_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """A node whose firewall runs in transparent mode ([::]:15001 serves both families)."""
    with firewalled_node(tmp_path / "node", request.param, mode="transparent") as made:
        yield made


def test_transparent_mode_unmodified_curl_goes_through_the_proxy(transparent_node: Node) -> None:
    """curl with no proxy settings, under the app's uid: the controller's nat rules hand its
    connections to the transparent listener, which allows the app's upstream over IPv4 and
    IPv6 and refuses a port the app may not use; the explicit SOCKS5 path still works."""
    ok4, ok6, denied, socks = transparent_node.probes(
        BLOG_UID,
        [
            probe("curl", url=f"http://{UPSTREAM_V4}:{ECHO_PORT}/"),
            probe("curl", url=f"http://[{UPSTREAM_V6}]:{ECHO_PORT}/"),
            probe("curl", url=f"http://{UPSTREAM_V4}:{FOREIGN_PORT}/"),
            probe("socks5", proxy_port=SOCKS_PORT, host=UPSTREAM_V4, port=ECHO_PORT),
        ],
    )
    assert (ok4["outcome"], ok6["outcome"]) == ("ok", "ok"), describe([ok4, ok6])
    assert denied["outcome"].startswith("curl-exit-"), describe([denied])
    assert socks["outcome"] == "ok", describe([socks])
    assert transparent_node.proxy is not None
    records = transparent_node.proxy.wait_connection_records(4)
    transparent = {r["dest"]: r for r in records if r["listener"] == "transparent"}
    assert set(transparent) == {
        f"{UPSTREAM_V4}:{ECHO_PORT}",
        f"[{UPSTREAM_V6}]:{ECHO_PORT}",
        f"{UPSTREAM_V4}:{FOREIGN_PORT}",
    }
    assert {r["uid"] for r in transparent.values()} == {BLOG_UID}
    assert transparent[f"{UPSTREAM_V4}:{FOREIGN_PORT}"]["reason"] == "not_allowed"
    assert transparent[f"{UPSTREAM_V4}:{ECHO_PORT}"]["reason"] == "allowed"
    # The upstream never saw the denied port: the proxy refused before dialling.
    assert not any(f" {FOREIGN_PORT} " in line for line in transparent_node.upstream_hits())
