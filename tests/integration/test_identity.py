"""The kernel, not the client, says which uid owns the client end of a connection.

Real uids: each client is a child process running as ``CHILD_UID``, so these tests need root.
CI runs as root; anywhere else they fail (not skip) so a missing privilege is never mistaken
for a pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from egress.net.identity import (
    ProcNetTcpLookup,
    TcpOwnerLookup,
    make_tcp_owner_lookup,
    peer_uid_unix,
)
from tests.polling import wait_until
from tests.processes import python_for_uid, read_line, stop_process

pytestmark = pytest.mark.root

CHILD_UID = 12345
STEP_TIMEOUT_S = 5.0

# The client: connect, print its own address, then obey one-word commands on stdin until EOF.
CHILD_CODE = r"""
import socket, struct, sys
family, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_UNIX:
    s.connect("\0" + host)
    print("unix 0", flush=True)
else:
    s.connect((host, port))
    print(*s.getsockname()[:2], flush=True)
for line in sys.stdin:
    if line.strip() == "rst":  # close with RST: the socket is gone at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("closed", flush=True)
"""


@pytest.fixture(scope="module")
def child_python() -> str:
    """A Python interpreter that CHILD_UID may execute (the venv's may live under /root)."""
    return python_for_uid(CHILD_UID)


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    addr: tuple[str, int]  # the client socket's own address, as it reports it

    def command(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()
        assert read_line(self.proc, "client", timeout=STEP_TIMEOUT_S) == "closed"


@pytest.fixture
def spawn(child_python: str) -> Iterator[object]:
    """spawn(family, host, port) -> Child, connected; every child is killed by pid afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def _spawn(family: int, host: str, port: int) -> Child:
        proc = subprocess.Popen(
            [child_python, "-I", "-c", CHILD_CODE, str(int(family)), host, str(port)],
            user=CHILD_UID,
            group=CHILD_UID,
            extra_groups=[],
            cwd="/",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        procs.append(proc)
        host_s, port_s = read_line(proc, "client", timeout=STEP_TIMEOUT_S).split()
        return Child(proc, (host_s, int(port_s)))

    try:
        yield _spawn
    finally:
        for proc in procs:
            stop_process(proc)


@pytest.fixture
def netlink() -> Iterator[TcpOwnerLookup]:
    lookup = TcpOwnerLookup()
    try:
        yield lookup
    finally:
        lookup.close()


@pytest.fixture
def proc_net() -> ProcNetTcpLookup:
    return ProcNetTcpLookup()


def _listener(family: int, host: str, *, dualstack: bool = False) -> socket.socket:
    sock = socket.create_server(
        (host, 0), family=family, backlog=8, dualstack_ipv6=dualstack, reuse_port=False
    )
    sock.settimeout(STEP_TIMEOUT_S)
    return sock


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _has_ipv6_loopback() -> bool:
    ip = shutil.which("ip")
    if ip is None:
        return False
    out = subprocess.run(
        [ip, "-6", "addr", "show", "lo"], capture_output=True, text=True, check=False
    )
    return "inet6 ::1/128" in out.stdout


def _check_owner(
    netlink: TcpOwnerLookup, proc_net: ProcNetTcpLookup, child: Child, conn: socket.socket
) -> None:
    peer, local = conn.getpeername(), conn.getsockname()
    owner = netlink.lookup_owner(peer, local)
    assert owner is not None
    assert owner.uid == CHILD_UID
    assert owner.inode in _socket_inodes(child.proc.pid)  # really the child's own socket
    assert netlink.lookup(peer, local) == CHILD_UID
    assert proc_net.lookup(peer, local) == CHILD_UID
    assert proc_net.lookup_owner(peer, local) == owner


def test_ipv4_loopback(spawn, netlink, proc_net) -> None:
    with _listener(socket.AF_INET, "127.0.0.1") as lst:
        child = spawn(socket.AF_INET, "127.0.0.1", lst.getsockname()[1])
        conn, peer = lst.accept()
        with conn:
            assert peer == child.addr
            _check_owner(netlink, proc_net, child, conn)


def test_ipv6_loopback(spawn, netlink, proc_net) -> None:
    assert _has_ipv6_loopback(), "no ::1 on lo (`ip -6 addr show lo`): IPv6 must be tested"
    with _listener(socket.AF_INET6, "::1") as lst:
        child = spawn(socket.AF_INET6, "::1", lst.getsockname()[1])
        conn, peer = lst.accept()
        with conn:
            assert peer[:2] == child.addr
            _check_owner(netlink, proc_net, child, conn)


def test_dual_stack_listener_ipv4_client(spawn, netlink, proc_net) -> None:
    with _listener(socket.AF_INET6, "::", dualstack=True) as lst:
        child = spawn(socket.AF_INET, "127.0.0.1", lst.getsockname()[1])
        conn, peer = lst.accept()
        with conn:
            assert peer[0] == "::ffff:127.0.0.1"
            assert conn.getsockname()[0] == "::ffff:127.0.0.1"
            _check_owner(netlink, proc_net, child, conn)


def test_ipv6_client_socket_to_ipv4_listener(spawn, netlink, proc_net) -> None:
    """A v6 socket connected to ::ffff:127.0.0.1 is an IPv4 connection with a v6 client socket."""
    with _listener(socket.AF_INET, "127.0.0.1") as lst:
        child = spawn(socket.AF_INET6, "::ffff:127.0.0.1", lst.getsockname()[1])
        conn, _ = lst.accept()
        with conn:
            assert child.addr[0] == "::ffff:127.0.0.1"
            _check_owner(netlink, proc_net, child, conn)


def test_unix_socket_peercred(spawn) -> None:
    name = f"egress-test-identity-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind("\0" + name)  # abstract: no file permissions stand between child and us
        lst.listen(1)
        lst.settimeout(STEP_TIMEOUT_S)
        spawn(socket.AF_UNIX, name, 0)
        conn, _ = lst.accept()
        with conn:
            assert peer_uid_unix(conn) == CHILD_UID
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(ValueError):
        peer_uid_unix(tcp)


def test_vanished_socket_is_none(spawn, netlink, proc_net) -> None:
    with _listener(socket.AF_INET, "127.0.0.1") as lst:
        child = spawn(socket.AF_INET, "127.0.0.1", lst.getsockname()[1])
        conn, _ = lst.accept()
        with conn:
            peer, local = conn.getpeername(), conn.getsockname()
            assert netlink.lookup(peer, local) == CHILD_UID
            child.command("rst")  # RST: the client socket is destroyed, nothing lingers
            assert netlink.lookup(peer, local) is None
            assert proc_net.lookup(peer, local) is None


def _tcp_state(proc_net_file: str, addr: tuple[str, int]) -> int | None:
    """State of the /proc/net/tcp row whose local address is 127.0.0.1:addr[1]."""
    local = (
        b"0100007F:%04X " % addr[1] if sys.byteorder == "little" else b"7F000001:%04X " % addr[1]
    )
    with open(proc_net_file, "rb") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if fields[1] + b" " == local:
                return int(fields[3], 16)
    return None


def test_time_wait_is_none_not_root(spawn, netlink, proc_net) -> None:
    """The kernel reports TIME_WAIT sockets with uid 0; that must not read as root."""
    with _listener(socket.AF_INET, "127.0.0.1") as lst:
        child = spawn(socket.AF_INET, "127.0.0.1", lst.getsockname()[1])
        conn, _ = lst.accept()
        peer, local = conn.getpeername(), conn.getsockname()
        with conn:
            child.command("close")  # client closes first: it will end in TIME_WAIT
            assert conn.recv(1) == b""
            # Orphaned (no descriptor) but alive: the owner is still the creator.
            assert netlink.lookup(peer, local) in (CHILD_UID, None)
        wait_until(
            lambda: _tcp_state("/proc/net/tcp", child.addr) == 6,  # TCP_TIME_WAIT
            "the client socket reaches TIME_WAIT",
            timeout=STEP_TIMEOUT_S,
            every=0.001,
        )
        assert netlink.lookup(peer, local) is None
        assert proc_net.lookup(peer, local) is None


@pytest.mark.parametrize(
    "case",
    [
        ("192.0.2.7", "127.0.0.1", "0.0.0.0", socket.AF_INET),
        ("2001:db8::7", "::1", "::", socket.AF_INET6),
    ],
)
def test_remote_peer_is_none(netlink, proc_net, case) -> None:
    """No local socket is a remote peer's end. The kernel's lookup falls back to a listener on
    the peer's port (here one of root's, uid 0): that must not be taken for the client."""
    peer_host, local_host, listen_host, family = case
    if family == socket.AF_INET6:
        assert _has_ipv6_loopback(), "no ::1 on lo (`ip -6 addr show lo`): IPv6 must be tested"
    with _listener(family, listen_host) as lst:
        port = lst.getsockname()[1]
        for peer in [(peer_host, port), (peer_host, 40000)]:
            assert netlink.lookup(peer, (local_host, 1080)) is None
            assert proc_net.lookup(peer, (local_host, 1080)) is None


def test_bad_addresses_raise(netlink, proc_net) -> None:
    for lookup in (netlink, proc_net):
        for peer, local in [
            (("127.1", 1), ("127.0.0.1", 2)),
            (("localhost", 1), ("127.0.0.1", 2)),
            (("127.0.0.1", 0), ("127.0.0.1", 2)),
            (("::1", 1), ("127.0.0.1", 2)),
        ]:
            with pytest.raises(ValueError):
                lookup.lookup(peer, local)


def test_make_tcp_owner_lookup_prefers_netlink() -> None:
    lookup = make_tcp_owner_lookup()
    try:
        assert isinstance(lookup, TcpOwnerLookup)
    finally:
        lookup.close()


def test_closed_lookup_raises() -> None:
    lookup = TcpOwnerLookup()
    lookup.close()
    lookup.close()
    with pytest.raises(ValueError, match="closed"):
        lookup.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))


def test_stale_reply_is_discarded(netlink) -> None:
    """A reply to an earlier request (one that timed out) must not answer the current one."""
    from egress.net import identity

    with _listener(socket.AF_INET, "127.0.0.1") as lst:
        client = socket.create_connection(lst.getsockname(), timeout=STEP_TIMEOUT_S)
        conn, _ = lst.accept()
        with client, conn:
            # An unanswered request for a socket that does not exist: its ENOENT reply is queued.
            lo = b"\x7f\0\0\1" + bytes(12)
            stale = identity._REQUEST.pack(
                identity._REQUEST.size, 20, 1, 0xDEAD, 0,
                socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF,
                socket.htons(1), socket.htons(2), lo, lo,
                0, 0xFFFFFFFF, 0xFFFFFFFF,
            )  # fmt: skip
            assert netlink._sock is not None
            netlink._sock.sendto(stale, (0, 0))
            assert netlink.lookup(conn.getpeername(), conn.getsockname()) == os.geteuid()
