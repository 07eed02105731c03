"""Findings of a security review of the sandbox DNS listener, each as a test of the attack.

Every test here runs one attack for real: the in-process proxy with its DNS listener, the
firewall controller's own transparent-mode rules in a fresh network namespace, and the attacker
as a real child process under a sandbox uid (``dig`` for the victim). A finding still open is
marked ``xfail(strict=True, reason="FINDING: ...")``: when it is fixed the test passes, strict
xfail turns that into a failure, and the mark comes off. The others were findings on 4a5db01,
fixed since (their docstrings say what the attack did); they stay as regression tests.

The setup (namespace addresses, config, DNS stub, ``dig``) is the one of
``tests/integration/test_sandbox_dns.py``: blog (uid 10001) may reach ``web.example.test``, shop
(uid 10002) ``shop.example.test``; 10.77.0.53 is where the sandbox programs send DNS, and only the
firewall's REDIRECT of port 53 answers there.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.dnsstub import DnsStub
from tests.integration.test_sandbox_dns import (
    NAMESPACE_ADDRESSES,
    STRANGER_UID,
    dig,
    dns_config,
    dns_records,
    eventually_records,
    firewall_sync,
    records,
    status,
)
from tests.netns import network_namespace
from tests.processes import python_for_uid, read_line, stop_process
from tests.support import APP_UID, OTHER_APP_UID, run, running_proxy

pytestmark = pytest.mark.netns

# A stub resolver's query (id 1, RD) for a name, as the children send it.
QUERY_HEADER = "000101000001000000000000"


def query_hex(name: str) -> str:
    """A type-A query for ``name`` in wire form, hex (handed to a child on its command line)."""
    labels = b"".join(len(p).to_bytes(1, "big") + p.encode() for p in name.split("."))
    return QUERY_HEADER + (labels + b"\x00\x00\x01\x00\x01").hex()


def sandbox_child(uid: int, script: str, *args: str, nofile: int = 0) -> subprocess.Popen[str]:
    """``script`` run by a stdlib Python as ``uid`` (a sandboxed program); ``nofile`` raises
    its open-file limit first (as root, before the uid is dropped, so a low hard limit on the
    test machine does not weaken the attack)."""
    command = [python_for_uid(uid), "-I", "-c", script, *args]
    if nofile:
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        command = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *drop, *command]
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
        )
    return subprocess.Popen(
        command,
        user=uid,
        group=uid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )


async def child_line(proc: subprocess.Popen[str], what: str, timeout: float = 30.0) -> str:
    return await asyncio.to_thread(read_line, proc, what, timeout=timeout)


def outcome(result: subprocess.CompletedProcess[str]) -> str:
    """dig's status, or what went wrong when there was none."""
    return status(result.stdout) if "status:" in result.stdout else "no answer"


def blog_records(proxy: Any, name: str) -> list[dict[str, Any]]:
    return [r for r in dns_records(proxy) if r["app"] == "blog" and r["dest"] == name]


# --- identity -------------------------------------------------------------------------------

# Holds a UDP socket the way a metrics client does (connected, so bound to one address).
HOLD_CONNECTED_V4 = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", 9))
print(s.getsockname()[1], flush=True)
time.sleep(float(sys.argv[1]))
"""

# Binds the victim's port on another loopback address and sends with IP_PKTINFO naming the
# victim's address as the source: the kernel lets any process pick any local source address.
PKTINFO_SPOOFER = r"""
import socket, struct, sys, time
port, query, seconds = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.2", port))
source = [(socket.IPPROTO_IP, 8, struct.pack("i4s4s", 0, socket.inet_aton("127.0.0.1"), bytes(4)))]
print("ready", flush=True)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    s.sendmsg([query], source, 0, ("10.77.0.53", 53))
    sent += 1
    time.sleep(0.001)
print("sent", sent, flush=True)
"""


def test_a_chosen_source_address_does_not_make_a_query_another_apps(
    loop_kind: str, tmp_path: Path
) -> None:
    """Was a finding (fixed by 9cd3023): the lookup trusted the datagram's source address,
    which a sender picks among local addresses with IP_PKTINFO, so shop's queries counted as
    blog's (blog's rate budget spent, blog's log lines). Now blog's socket on the port makes
    the sender ambiguous: REFUSED."""

    async def main() -> None:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path) as proxy:
                firewall_sync(config, tmp_path)
                victim = sandbox_child(APP_UID, HOLD_CONNECTED_V4, "30")
                spoofer: subprocess.Popen[str] | None = None
                try:
                    port = await child_line(victim, "blog's UDP client")
                    spoofer = sandbox_child(
                        OTHER_APP_UID,
                        PKTINFO_SPOOFER,
                        port,
                        query_hex("evil.example.test"),
                        "4",
                    )
                    assert await child_line(spoofer, "spoofer") == "ready"
                    await asyncio.sleep(1.5)  # blog's burst is spent by now
                    during = await asyncio.to_thread(dig, APP_UID, "web.example.test", "A")
                    sent = await child_line(spoofer, "spoofer")
                finally:
                    stop_process(victim)
                    if spoofer is not None:
                        stop_process(spoofer)
                await eventually_records(proxy, 10)
                framed = blog_records(proxy, "evil.example.test")

        assert sent.startswith("sent ")
        # blog never asked for evil.example.test: shop did, from 127.0.0.2.
        assert framed == [], (
            f"{len(framed)} of shop's queries logged as blog's, e.g. {framed[0]};"
            f" blog's own dig meanwhile: {outcome(during)}"
        )
        assert outcome(during) == "NOERROR", during.stdout

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main(), timeout=60)


HOLD_V6ONLY = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::", 0))
print(s.getsockname()[1], flush=True)
time.sleep(float(sys.argv[1]))
"""

SEND_AND_CLOSE = r"""
import socket, sys
port, query, times = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
for _ in range(times):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))  # allowed: the other socket on this port is IPv6-only
    s.sendto(query, ("10.77.0.53", 53))
    s.close()
print("done", flush=True)
"""


def test_a_sender_that_closes_at_once_is_not_taken_for_a_v6only_socket(
    loop_kind: str, tmp_path: Path
) -> None:
    """Was a finding (fixed by 9cd3023): with no IPv4 socket left on the source port, an
    IPV6_V6ONLY socket there (which cannot send IPv4) was taken for the sender."""

    async def main() -> None:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path) as proxy:
                firewall_sync(config, tmp_path)
                victim = sandbox_child(APP_UID, HOLD_V6ONLY, "30")
                try:
                    port = await child_line(victim, "blog's IPv6-only socket")
                    sender = sandbox_child(
                        OTHER_APP_UID, SEND_AND_CLOSE, port, query_hex("evil.example.test"), "20"
                    )
                    try:
                        assert await child_line(sender, "shop's sender") == "done"
                    finally:
                        stop_process(sender)
                    found = await eventually_records(proxy, 20)
                finally:
                    stop_process(victim)
                framed = blog_records(proxy, "evil.example.test")

        assert len(found) == 20  # every query was answered for someone
        assert framed == [], f"{len(framed)} of 20 queries from shop logged as blog's"

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main(), timeout=60)


# Binds the victim's port on a second loopback address, sends (from there, or with IP_PKTINFO
# from the victim's own address) and closes at once, before the proxy looks the port up.
SEND_FROM_BESIDE_AND_CLOSE = r"""
import socket, struct, sys
port, query, times = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
pktinfo = struct.pack("i4s4s", 0, socket.inet_aton("127.0.0.1"), bytes(4))
as_victim = [(socket.IPPROTO_IP, 8, pktinfo)]
for n in range(times):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.2", port))
    s.sendmsg([query], as_victim if n % 2 else [], 0, ("10.77.0.53", 53))
    s.close()
print("done", flush=True)
"""


def test_a_sender_gone_before_the_lookup_is_not_taken_for_another_apps_socket(
    loop_kind: str, tmp_path: Path
) -> None:
    """Shop binds blog's port on 127.0.0.2, sends (half the time with IP_PKTINFO naming blog's
    address) and closes at once: only blog's socket is left on the port when the listener
    looks. Fixed by the firewall marking each app's queries with its first uid and the listener
    reading the mark (SO_RCVMARK): shop's queries are shop's, and with no socket of shop's left
    on the port, nobody is answered."""

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path) as proxy:
                firewall_sync(config, tmp_path)
                victim = sandbox_child(APP_UID, HOLD_CONNECTED_V4, "30")
                try:
                    port = await child_line(victim, "blog's UDP client")
                    sender = sandbox_child(
                        OTHER_APP_UID,
                        SEND_FROM_BESIDE_AND_CLOSE,
                        port,
                        query_hex("evil.example.test"),
                        "20",
                    )
                    try:
                        assert await child_line(sender, "shop's sender") == "done"
                    finally:
                        stop_process(sender)
                    found = await eventually_records(proxy, 20)
                finally:
                    stop_process(victim)
                return found, blog_records(proxy, "evil.example.test")

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        found, framed = run(loop_kind, main(), timeout=60)
    assert len(found) == 20  # every query was answered for someone
    assert framed == [], f"{len(framed)} of 20 queries from shop (uid 10002) logged as blog's"


# --- one app slowing another ----------------------------------------------------------------

SHARED_PORT_SOCKETS = 12000

# Many sockets of one uid on one port (SO_REUSEPORT, allowed within a uid), then queries from
# that port at the app's own permitted rate (proxy.dns_queries_per_second = 100).
REUSEPORT_FLOOD = r"""
import socket, sys, time
count, query = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
rate, seconds = float(sys.argv[3]), float(sys.argv[4])
def bound(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", port))
    return s
first = bound(0)
held = [bound(first.getsockname()[1]) for _ in range(count - 1)]
print("ready", flush=True)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    first.sendto(query, ("10.77.0.53", 53))
    sent += 1
    time.sleep(1 / rate)
print("sent", sent, flush=True)
"""


def test_an_app_sharing_one_port_among_many_sockets_does_not_stall_others(
    loop_kind: str, tmp_path: Path
) -> None:
    """Was a finding (fixed by 9cd3023): the lookup walked every socket on the source port, on the
    event loop, before any rate limit; 12,000 SO_REUSEPORT sockets and 100 queries a second
    (shop's own rate) left blog's DNS unanswered. Now more than 64 sockets end the walk."""

    async def main() -> None:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path):
                firewall_sync(config, tmp_path)
                before = await asyncio.to_thread(dig, APP_UID, "web.example.test", "A")
                flood = sandbox_child(
                    OTHER_APP_UID,
                    REUSEPORT_FLOOD,
                    str(SHARED_PORT_SOCKETS),
                    query_hex("shop.example.test"),
                    "100",
                    "30",
                    nofile=SHARED_PORT_SOCKETS + 100,
                )
                try:
                    assert await child_line(flood, "shop's flood") == "ready"
                    await asyncio.sleep(1.0)
                    during = []
                    for _ in range(3):
                        started = time.monotonic()
                        result = await asyncio.to_thread(dig, APP_UID, "web.example.test", "A")
                        during.append((outcome(result), round(time.monotonic() - started, 2)))
                finally:
                    stop_process(flood)

        assert outcome(before) == "NOERROR"
        # shop asked 100 times a second, which its own rate allows; blog must still be served.
        assert [answer for answer, _ in during] == ["NOERROR"] * 3, during

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main(), timeout=90)


HOLD_TCP = r"""
import socket, sys, time
count, seconds = int(sys.argv[1]), float(sys.argv[2])
held = [socket.create_connection(("10.77.0.53", 53)) for _ in range(count)]
print("ready", flush=True)
time.sleep(seconds)
"""


def test_one_uid_cannot_take_every_tcp_dns_connection(loop_kind: str, tmp_path: Path) -> None:
    """Was a finding (fixed by 6647642): MAX_TCP_CONNECTIONS was one pool for every uid, and a
    uid in no app could hold all 256 slots."""

    async def main() -> None:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path):
                firewall_sync(config, tmp_path)
                holder = sandbox_child(STRANGER_UID, HOLD_TCP, "256", "8")
                try:
                    assert await child_line(holder, "stranger's connections") == "ready"
                    await asyncio.sleep(0.3)
                    over_tcp = await asyncio.to_thread(dig, APP_UID, "+tcp", "web.example.test")
                finally:
                    stop_process(holder)

        assert outcome(over_tcp) == "NOERROR", over_tcp.stdout

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main(), timeout=60)


# Never completes a query: one byte of a length prefix, then one byte every 2 s.
TRICKLE = r"""
import socket, sys, time
seconds = float(sys.argv[1])
s = socket.create_connection(("10.77.0.53", 53))
s.sendall(b"\x00")
s.settimeout(2.0)
started = time.monotonic()
while time.monotonic() - started < seconds:
    try:
        if s.recv(1) == b"":
            break
    except socket.timeout:
        pass
    except OSError:
        break
    try:
        s.sendall(b"\x30" if time.monotonic() - started < 3 else b"\x00")
    except OSError:
        break
took = time.monotonic() - started
print("open" if took >= seconds else "closed", round(took, 1), flush=True)
"""


def test_a_tcp_connection_that_never_completes_a_query_is_closed(
    loop_kind: str, tmp_path: Path
) -> None:
    """Was a finding (fixed by 6647642): the idle timer restarted on every byte, so a connection
    trickling one byte every 2 s was never closed."""

    async def main() -> str:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path):
                firewall_sync(config, tmp_path)
                trickle = sandbox_child(OTHER_APP_UID, TRICKLE, "16")
                try:
                    return await child_line(trickle, "shop's trickle", timeout=40)
                finally:
                    stop_process(trickle)

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        said = run(loop_kind, main(), timeout=60)
    assert said.startswith("closed"), f"after 16 s of one byte per 2 s: {said}"


# --- the firewall while the proxy is down ------------------------------------------------------

CATCH_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except PermissionError:
    print("cannot bind", flush=True)
    raise SystemExit
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    data, peer = s.recvfrom(4096)
    print("caught", data[12:].split(b"\x00")[0], flush=True)
except socket.timeout:
    print("nothing", flush=True)
"""


def test_another_app_cannot_take_the_dns_port_while_the_proxy_is_down(tmp_path: Path) -> None:
    """Was a finding (answered by 7f835f8, README and ``check-config``): the firewall redirects
    every sandbox uid's DNS to proxy.dns_listen, so on a port any user may bind, another app
    took it while the proxy was down and read blog's questions. On the port the README gives
    (below 1024), no sandbox uid can bind it."""
    with network_namespace(addresses=NAMESPACE_ADDRESSES), DnsStub(records(), ttl=30) as stub:
        config = dns_config(stub, 8080, tmp_path)
        config["proxy"]["dns_listen"] = "127.0.0.153:53"
        firewall_sync(config, tmp_path)  # the rules stay in the kernel when the proxy is gone
        catcher = sandbox_child(OTHER_APP_UID, CATCH_UDP, "127.0.0.153", "53", "6")
        try:
            bound = read_line(catcher, "shop's socket on the DNS port")
            if bound == "ready":
                dig(APP_UID, "private-name-of-blog.example.test", "A")
                bound = read_line(catcher, "shop's socket on the DNS port")
        finally:
            stop_process(catcher)

    assert bound == "cannot bind", f"shop on the DNS port: {bound}"
