"""The systemd units in deploy/systemd/, and the daemons' side of them (sd_notify readiness).

systemd is not PID 1 where the suite runs (a container), so no unit is started by systemd here
and ``systemd-run`` cannot be used. What is checked instead, for real:

- ``systemd-analyze verify`` on the shipped files, byte for byte, in a temporary root laid out
  as the README installs (``/opt/egress/bin/egress`` is a copy of this venv's console script,
  the system units are the host's), so the check that every ExecStart= binary exists is made
  honestly; any line it prints fails the test. ``systemd-analyze security --offline`` keeps
  the exposure score from creeping up.
- The hardening keys, parsed from the files: dropping one fails a test that says why it is
  there.
- The daemons under the units' own sandbox, rebuilt from the unit files by a small launcher:
  no_new_privs, the CapabilityBoundingSet=, and a seccomp filter made of the
  SystemCallFilter= set as ``systemd-analyze syscall-filter`` expands it, the
  RestrictAddressFamilies= list and MemoryDenyWriteExecute= (as systemd builds them, errors
  as SystemCallErrorNumber=). Not rebuilt: the mount namespace (ProtectSystem=, PrivateTmp=,
  ...) and the other Protect*= settings.
- Readiness against a real ``$NOTIFY_SOCKET`` each test binds (a path or an abstract name).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress.config import DEFAULT_CONFIG_PATH, parse_config
from tests.configs import base_config, write_config
from tests.dnsstub import DnsStub
from tests.netns import network_namespace
from tests.processes import REPO, EgressProcess, python_for_uid, stop_process
from tests.support import APP_UID, OTHER_APP_UID, socket_as_uid

UNITS = REPO / "deploy" / "systemd"
UNIT_FILES = (
    "egress-proxy.service",
    "egress-firewall.service",
    "egress-firewall-sync.service",
    "egress-apps.target",
)
INSTALLED_EGRESS = "/opt/egress/bin/egress"  # the README's venv
NOTIFY_TIMEOUT_S = 15.0

# --- the unit files, as systemd reads them ------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]  # section -> key -> every assignment, in order


@functools.cache
def unit(name: str) -> Unit:
    """The unit's assignments (comments dropped, continuation lines joined)."""
    text = (UNITS / name).read_text().replace("\\\n", " ")
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def setting(name: str, section: str, key: str) -> str | None:
    """The value in force (the last assignment), None when not set."""
    values = unit(name).get(section, {}).get(key)
    return None if values is None else values[-1]


def words(name: str, section: str, key: str) -> list[str]:
    """A list setting: the words of every assignment, an empty one resetting the list."""
    result: list[str] = []
    for value in unit(name).get(section, {}).get(key, []):
        result = [*result, *value.split()] if value else []
    return result


# --- the units' sandbox, rebuilt for a child ------------------------------------------------------

# Run by the test's interpreter as root; argv[1] is the JSON spec, argv[2:] the command it execs.
# Mirrors what systemd does between fork and exec: bounding set, uid, no_new_privs, seccomp.
LAUNCHER = textwrap.dedent(
    """
    import ctypes, json, os, sys
    spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    def check(result, what):
        if result != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in spec["caps"]:
            check(libc.prctl(24, cap, 0, 0, 0), f"PR_CAPBSET_DROP {cap}")  # CapabilityBoundingSet=
    check(libc.prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    if spec["uid"] is not None:  # User=
        os.setgroups([]); os.setgid(spec["uid"]); os.setuid(spec["uid"])
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # NoNewPrivileges=
    if spec["syscalls"] is not None:
        seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        class Cmp(ctypes.Structure):
            _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                        ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
        EQ, MASKED_EQ, ALLOW = 4, 7, 0x7FFF0000
        seccomp.seccomp_init.restype = ctypes.c_void_p
        seccomp.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
        seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
        ctx = seccomp.seccomp_init(0x00050000 | spec["errno"])  # SystemCallErrorNumber=
        def allow(nr, *cmps):
            array = (Cmp * len(cmps))(*cmps) if cmps else None
            result = seccomp.seccomp_rule_add_array(ctx, ALLOW, nr, len(cmps), array)
            assert result in (0, -17), (nr, cmps, result)  # -EEXIST: a name listed twice
        W, X, SHM_EXEC = 2, 4, 0o100000
        for name in spec["syscalls"]:
            nr = seccomp.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall of this architecture
            if name == "socket" and spec["families"] is not None:  # RestrictAddressFamilies=
                for family in spec["families"]:
                    allow(nr, Cmp(0, EQ, family, 0))
            elif spec["mdwe"] and name in ("mmap", "mmap2"):  # MemoryDenyWriteExecute=
                for prot in (0, W, X):
                    allow(nr, Cmp(2, MASKED_EQ, W | X, prot))
            elif spec["mdwe"] and name in ("mprotect", "pkey_mprotect"):
                allow(nr, Cmp(2, MASKED_EQ, X, 0))
            elif spec["mdwe"] and name == "shmat":
                allow(nr, Cmp(2, MASKED_EQ, SHM_EXEC, 0))
            else:
                allow(nr)
        check(seccomp.seccomp_load(ctx), "seccomp_load")
    os.execv(argv[0], argv)
    """
)

CAPABILITIES = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


@functools.cache
def syscall_groups() -> dict[str, list[str]]:
    """Every ``@group`` systemd knows, with its members (names and nested groups)."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            members.append(line.strip())
    return groups


def expand(names: list[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= expand(syscall_groups()[name]) if name.startswith("@") else {name}
    return found


def sandbox(name: str, *, uid: int | None = None, caps: list[str] | None = None) -> list[str]:
    """A command prefix that runs what follows under unit ``name``'s [Service] sandbox (as
    ``uid``, default: root; ``caps`` overrides the bounding set)."""
    key = "Service"
    assert setting(name, key, "NoNewPrivileges") == "yes"
    bounding = words(name, key, "CapabilityBoundingSet") if caps is None else caps
    allowed = words(name, key, "SystemCallFilter")
    assert not any(word.startswith("~") for word in allowed), "only an allow list is rebuilt"
    families = words(name, key, "RestrictAddressFamilies")
    spec = {
        "caps": [CAPABILITIES[cap] for cap in bounding],
        "uid": uid,
        "syscalls": sorted(expand(allowed)) if allowed else None,
        "families": [int(getattr(socket, f)) for f in families] if families else None,
        "mdwe": setting(name, key, "MemoryDenyWriteExecute") == "yes",
        "errno": getattr(errno, setting(name, key, "SystemCallErrorNumber") or "EPERM"),
    }
    return [sys.executable, "-c", LAUNCHER, json.dumps(spec)]


def capabilities_of(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}


# Each attempt would succeed for an unprivileged process without the filter, so an EPERM is the
# filter's doing, not a missing capability.
PROBE = textwrap.dedent(
    """
    import ctypes, mmap, os, socket
    libc = ctypes.CDLL(None, use_errno=True)
    def attempt(what):
        try:
            what()
        except OSError as error:
            return error.errno
        return 0
    def traceme():  # ptrace is not in @system-service
        if libc.ptrace(0, 0, None, None) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
    print(attempt(traceme),
          attempt(lambda: socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET).close()),
          attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC).close()),
          attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4).close()))
    """
)


@pytest.mark.root
def test_the_rebuilt_sandbox_enforces_what_the_unit_says() -> None:
    """The tests below run the daemons under :func:`sandbox`: it must really refuse what the
    units refuse, or their passing would prove nothing."""
    errors = [
        int(code)
        for code in subprocess.run(
            [*sandbox("egress-proxy.service"), sys.executable, "-I", "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    ]
    # ptrace, an AF_ALG socket, W+X memory: refused with SystemCallErrorNumber=EPERM (and all
    # three are allowed without the filter); a sock_diag socket is allowed.
    assert errors == [errno.EPERM, errno.EPERM, errno.EPERM, 0]
    unfiltered = subprocess.run(
        [sys.executable, "-I", "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    ptrace, alg, memory, _ = (int(code) for code in unfiltered)
    assert (ptrace, memory) == (0, 0) and alg != errno.EPERM, unfiltered  # 0 or EAFNOSUPPORT


# --- the service manager's end of $NOTIFY_SOCKET -------------------------------------------------


class NotifySocket:
    """What systemd listens on: a datagram socket at a path or an abstract ``@name``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def env(self) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": self.address}

    def receive(self, timeout: float = NOTIFY_TIMEOUT_S) -> dict[str, str]:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no notification on {self.address} within {timeout} s") from None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def expect(self, key: str, timeout: float = NOTIFY_TIMEOUT_S) -> dict[str, str]:
        message = self.receive(timeout)
        assert message.get(key) == "1", f"expected {key}=1, got {message}"
        return message

    def assert_quiet(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        with pytest.raises(TimeoutError):
            extra = self.sock.recv(4096)
            raise AssertionError(f"unexpected notification: {extra!r}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="egress-sd-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    with NotifySocket(str(short_dir / "notify")) as listener:
        yield listener


# --- static checks --------------------------------------------------------------------------------


def installed_root(root: Path) -> Path:
    """A file system root laid out as the README installs: the host's system units, kill and
    touch, this checkout's console script at /opt/egress/bin/egress, our units in /etc."""
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr" / "bin").mkdir()
    for tool in ("kill", "touch"):
        shutil.copy2(f"/usr/bin/{tool}", root / "usr" / "bin" / tool)
    (root / "bin").symlink_to("usr/bin")  # merged /usr, as on Debian 12
    (root / "lib").symlink_to("usr/lib")
    egress = root / INSTALLED_EGRESS.lstrip("/")
    egress.parent.mkdir(parents=True)
    shutil.copy2(Path(sys.executable).parent / "egress", egress)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy2(UNITS / name, root / "etc" / "systemd" / "system" / name)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    root = installed_root(tmp_path / "root")
    result = analyze("verify", f"--root={root}", *UNIT_FILES)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The check is not vacuous: a wrong value is printed (and exit 0 would not catch it).
    broken = root / "etc/systemd/system/egress-proxy.service"
    broken.write_text(broken.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt"))
    result = analyze("verify", f"--root={root}", "egress-proxy.service")
    assert "strickt" in result.stdout + result.stderr
    (root / INSTALLED_EGRESS.lstrip("/")).unlink()
    result = analyze("verify", f"--root={root}", "egress-firewall.service")
    assert result.returncode != 0 and INSTALLED_EGRESS in result.stderr


@pytest.mark.parametrize("name", [n for n in UNIT_FILES if n.endswith(".service")])
def test_units_exposure_stays_low(tmp_path: Path, name: str) -> None:
    """`systemd-analyze security` scores what the sandbox leaves open (0 best, 10 worst); today
    1.5 for the proxy, 2.1-2.2 for the firewall units (root, networking privileges)."""
    root = installed_root(tmp_path / "root")
    result = analyze("security", "--offline=yes", f"--root={root}", "--threshold=25", name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_proxy_unit_runs_unprivileged_and_hardened() -> None:
    name, service = "egress-proxy.service", "Service"
    exec_start = f"{INSTALLED_EGRESS} proxy --config {DEFAULT_CONFIG_PATH}"
    expected = {
        "Type": "notify",  # the app runtime is ordered after READY=1
        "ExecStart": exec_start,
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "User": "egress",
        "Group": "egress",
        # Only to bind proxy.dns_listen below 1024; identity needs none (tested below for real).
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": f"-{Path(DEFAULT_CONFIG_PATH).parent}",  # the file store renames there
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RuntimeDirectory": "egress",  # /run/egress/socks.sock
        "RuntimeDirectoryMode": "0755",  # the sandboxes must reach the Unix socket
        "LogsDirectory": "egress",  # /var/log/egress, where deploy/logrotate rotates
        "StateDirectory": "egress",
        "SystemCallFilter": "@system-service",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {key: setting(name, service, key) for key in expected} == expected
    assert set(words(name, service, "RestrictAddressFamilies")) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",  # sock_diag: who owns a client socket
    }
    # Under a user namespace every app's uid would read as "nobody": no identity at all.
    assert setting(name, service, "PrivateUsers") in (None, "no")
    assert setting(name, service, "PrivateNetwork") in (None, "no")
    # Each relayed connection holds two descriptors; cover the default limit with room.
    defaults = parse_config({"proxy": {"socks5_listen": ["127.0.0.1:1080"]}}, source="-").proxy
    assert int(setting(name, service, "LimitNOFILE") or 0) >= 2 * defaults.max_connections + 1024
    # The drain must end before systemd's SIGKILL does.
    stop_timeout = float((setting(name, service, "TimeoutStopSec") or "90").rstrip("s"))
    assert stop_timeout > defaults.drain_timeout + 10
    assert "egress-apps.target" in words(name, "Unit", "Before")


@pytest.mark.parametrize("name", ["egress-firewall.service", "egress-firewall-sync.service"])
def test_firewall_units_hold_only_what_iptables_needs_and_never_flush(name: str) -> None:
    service = "Service"
    assert setting(name, service, "User") in (None, "root")
    assert set(words(name, service, "CapabilityBoundingSet")) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert setting(name, service, "AmbientCapabilities") in (None, "")
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelModules": "yes",
        "SystemCallFilter": "@system-service",
        "MemoryDenyWriteExecute": "yes",
        # The legacy tools' lock, shared with the host; "-": a fresh nf_tables boot has no such
        # file, and a missing ReadWritePaths= entry without it fails the unit (226/NAMESPACE).
        "ReadWritePaths": "-/run/xtables.lock",
    }.items():
        assert setting(name, service, key) == value, key
    assert set(words(name, service, "RestrictAddressFamilies")) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    # Fail closed: nothing in the unit takes the rules out of the kernel.
    assert not any("flush" in v for k, vs in unit(name)[service].items() for v in vs), name
    assert "ExecStop" not in unit(name)[service]
    assert "egress-apps.target" in words(name, "Unit", "Before")
    command = "run" if name == "egress-firewall.service" else "sync"
    assert setting(name, service, "ExecStart") == (
        f"{INSTALLED_EGRESS} firewall {command} --config {DEFAULT_CONFIG_PATH}"
    )


def test_the_apps_wait_for_the_gate_which_fails_closed_and_never_bounces_them() -> None:
    target, gate = "egress-apps.target", "egress-firewall-sync.service"
    # Requires= + After=: a failed boot sync keeps whatever requires the target from starting.
    assert words(target, "Unit", "Requires") == [gate]
    # The controller and the proxy are only wanted: restarting either (an upgrade) must not
    # propagate a restart to the app runtime, as Requires= would.
    assert set(words(target, "Unit", "Wants")) == {
        "egress-firewall.service",
        "egress-proxy.service",
    }
    assert set(words(target, "Unit", "After")) == {
        gate,
        "egress-firewall.service",
        "egress-proxy.service",
    }
    assert setting(gate, "Unit", "RefuseManualStop") == "yes"  # nor may the gate be restarted
    assert setting(gate, "Service", "Type") == "oneshot"
    assert setting(gate, "Service", "RemainAfterExit") == "yes"
    assert {"network-pre.target", target} <= set(words(gate, "Unit", "Before"))
    assert words(gate, "Unit", "Wants") == ["network-pre.target"]
    assert setting(gate, "Unit", "DefaultDependencies") == "no"  # early, like a host firewall
    controller = "egress-firewall.service"
    assert setting(controller, "Service", "Type") == "notify"
    assert gate in words(controller, "Unit", "After")  # never two writers at once


def test_logrotate_signals_the_unit_this_directory_ships() -> None:
    rotate = (REPO / "deploy" / "logrotate" / "egress").read_text()
    assert "unit=egress-proxy.service" in rotate
    logs_directory = setting("egress-proxy.service", "Service", "LogsDirectory")
    assert f"/var/log/{logs_directory}/*.log" in rotate


# --- the proxy under its unit ---------------------------------------------------------------------


UPSTREAM_NAME = "upstream.egress-test.example"


def proxy_config(directory: Path, *, nameserver: str = "", upstream_port: int = 0) -> Path:
    """Every kind of listener on an ephemeral port, and the admin endpoint; app "blog" may
    reach ``UPSTREAM_NAME:upstream_port`` (a name the test's DNS stub points at loopback)."""
    data = base_config(
        proxy={
            "unix_socket": str(directory / "socks.sock"),
            "transparent_listen": "127.0.0.1:0",
            "dns_listen": "127.0.0.153:53",  # below 1024: the unit's one capability
            "drain_timeout": 1.0,
        },
        admin={"listen": "127.0.0.1:0"},
        resolver={"nameservers": [nameserver] if nameserver else []},
        security={"allow_special": ["127.0.0.0/8"]},
    )
    if upstream_port:
        rule = f"{UPSTREAM_NAME}:{upstream_port}"
        data["app"] = [{"name": "blog", "uids": [str(APP_UID)], "allow": [rule]}]
    return write_config(directory / "egress.toml", data)


def relay_once(http_proxy: str, upstream: socket.socket) -> None:
    """One CONNECT tunnel as the app, by name: the resolver, the dial and the relay run
    under the sandbox too."""
    port = upstream.getsockname()[1]
    with socket_as_uid(APP_UID) as client:
        client.setblocking(True)
        client.settimeout(10)
        client.connect(host_port(http_proxy))
        client.sendall(f"CONNECT {UPSTREAM_NAME}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        upstream.settimeout(10)
        dialed, _ = upstream.accept()
        with dialed:
            head = client.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head
            client.sendall(b"ping")
            assert dialed.recv(4) == b"ping"
            dialed.sendall(b"pong")
            assert client.recv(4) == b"pong"


def start(
    *args: str, config: Path, env: dict[str, str], wrapper: list[str] | None = None
) -> EgressProcess:
    return EgressProcess(*args, config=config, env=env, wrapper=wrapper or ())


def listening(process: EgressProcess) -> dict[str, str]:
    """listener kind -> address, from its "listening" log lines (written before READY=1)."""
    found = {e["listener"]: e["address"] for e in process.logs() if e.get("msg") == "listening"}
    started = next(e for e in process.logs() if e.get("msg") == "proxy started")
    found["admin"] = started["admin"]
    return found


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def assert_everything_accepts(listeners: dict[str, str]) -> None:
    """One try each, no retry: by READY=1 every listener must already accept."""
    assert set(listeners) == {
        "socks5",
        "http",
        "socks5_unix",
        "transparent",
        "dns",
        "admin",
    }, listeners
    for kind, address in listeners.items():
        if kind == "socks5_unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
                unix.connect(address)
        elif kind == "admin":
            url = f"http://{address}/readyz"
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200
        else:  # TCP (the DNS listener answers on TCP too)
            socket.create_connection(host_port(address), timeout=5).close()


def reload_cycle(process: EgressProcess, notify: NotifySocket) -> dict[str, str]:
    """SIGHUP: RELOADING=1 with the monotonic clock of now, then the READY=1 it returns."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    process.send_signal(signal.SIGHUP)
    reloading = notify.expect("RELOADING")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    return notify.expect("READY")


@pytest.mark.root
def test_proxy_is_ready_only_once_every_listener_accepts_under_its_unit_sandbox(
    short_dir: Path, notify_socket: NotifySocket
) -> None:
    with (
        DnsStub({UPSTREAM_NAME: ["127.0.0.1"]}) as dns,
        socket.create_server(("127.0.0.1", 0)) as upstream,
    ):
        config = proxy_config(
            short_dir, nameserver=dns.address, upstream_port=upstream.getsockname()[1]
        )
        wrapper = sandbox("egress-proxy.service")
        with start("proxy", config=config, env=notify_socket.env(), wrapper=wrapper) as process:
            ready = notify_socket.expect("READY")
            assert_everything_accepts(listening(process))
            assert ready["STATUS"].startswith("serving socks5=127.0.0.1:"), ready
            caps = capabilities_of(process.pid)
            bind_service = 1 << CAPABILITIES["CAP_NET_BIND_SERVICE"]  # nothing else
            assert (caps["CapEff"], caps["CapPrm"], caps["CapBnd"]) == (bind_service,) * 3, caps
            relay_once(listening(process)["http"], upstream)
            reload_and_stop(process, config, notify_socket)


def reload_and_stop(process: EgressProcess, config: Path, notify_socket: NotifySocket) -> None:

    ready = reload_cycle(process, notify_socket)
    assert ready["STATUS"].startswith("config reloaded"), ready
    config.write_text("[proxy]\nbogus = 1\n")  # an edit reloads without a SIGHUP
    notify_socket.expect("RELOADING")
    ready = notify_socket.expect("READY")
    assert "reload failed" in ready["STATUS"], ready
    ready = reload_cycle(process, notify_socket)
    assert "reload failed" in ready["STATUS"], ready

    process.send_signal(signal.SIGTERM)
    stopping = notify_socket.expect("STOPPING")
    assert stopping["STATUS"].startswith("draining"), stopping
    assert process.wait(timeout=15) == 0


@pytest.mark.root
def test_proxy_notifies_an_abstract_socket(short_dir: Path) -> None:
    with NotifySocket(f"@egress-test-{uuid.uuid4().hex}") as notify:
        config = proxy_config(short_dir)
        with start("proxy", config=config, env=notify.env()) as process:
            notify.expect("READY")
            process.send_signal(signal.SIGTERM)
            notify.expect("STOPPING")
            assert process.wait(timeout=15) == 0


def reloaded(process: EgressProcess, times: int) -> bool:
    done = [entry for entry in process.logs() if entry.get("msg") == "config reloaded"]
    return len(done) >= times


@pytest.mark.root
def test_a_notify_socket_nobody_listens_on_does_not_stop_the_proxy(short_dir: Path) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": str(short_dir / "nobody-here")}
    with start("proxy", config=proxy_config(short_dir), env=env) as process:
        process.wait_log(lambda e: e.get("msg") == "proxy started", "proxy started")
        admin = listening(process)["admin"]
        for done in (1, 2):  # reloads notify too; each fails, the proxy carries on
            process.send_signal(signal.SIGHUP)
            process.wait_for(functools.partial(reloaded, process, done), f"reload {done}")
        with urllib.request.urlopen(f"http://{admin}/readyz", timeout=5) as reply:
            assert reply.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        warnings = [e for e in process.logs() if "cannot notify" in e.get("msg", "")]
        assert len(warnings) == 1, warnings  # logged once, not per notification
        assert warnings[0]["notify_socket"] == env["NOTIFY_SOCKET"]


# --- identity as the egress user, with no capability --------------------------------------------

IDENTITY_CHILD = textwrap.dedent(
    """
    import socket, sys
    sys.path.insert(0, sys.argv[1])
    from egress.net.identity import TcpOwnerLookup  # stdlib only
    caps = [l for l in open("/proc/self/status") if l.startswith(("CapEff", "CapPrm"))]
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
    print(server.getsockname()[1], *[l.split()[1] for l in caps], flush=True)
    conn, peer = server.accept()
    lookup = TcpOwnerLookup()  # sock_diag over netlink; no /proc fallback here
    print(lookup.lookup(peer, conn.getsockname()), flush=True)
    """
)


@pytest.mark.root
def test_identity_lookup_works_as_a_non_root_user_without_any_capability() -> None:
    """The proxy needs no capability to identify: the kernel must still say who owns a
    client socket to a plain user, under the unit's syscall and address-family filter."""
    uid = OTHER_APP_UID  # any uid but root (and not the client's)
    command = [
        *sandbox("egress-proxy.service", uid=uid),
        python_for_uid(uid),
        "-I",
        "-c",
        IDENTITY_CHILD,
        str(REPO),
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port, effective, permitted = child.stdout.readline().split()
        assert (int(effective, 16), int(permitted, 16)) == (0, 0)
        client = socket_as_uid(APP_UID)
        client.setblocking(True)
        client.connect(("127.0.0.1", int(port)))
        owner = child.stdout.readline().strip()
        client.close()
        assert owner == str(APP_UID), child.stderr.read() if child.stderr else owner
    finally:
        stop_process(child)


# --- the firewall controller under its unit -------------------------------------------------------


def firewall_config(directory: Path) -> Path:
    data = {
        "proxy": {"socks5_listen": ["127.0.0.1:1080"]},
        "firewall": {"sandbox_uids": ["10000-10999"], "interval": 30.0},
        "app": [{"name": "blog", "uids": [str(APP_UID)], "allow": ["10.77.0.1:80"]}],
    }
    return write_config(directory / "firewall.toml", data)


def egress_rules() -> list[str]:
    saved = subprocess.run(
        ["iptables-save", "-t", "filter"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in saved.splitlines() if "egress" in line and line.startswith("-A")]


@pytest.mark.netns
def test_firewall_run_is_ready_after_its_first_sync_under_its_unit_sandbox(
    short_dir: Path, notify_socket: NotifySocket
) -> None:
    config = firewall_config(short_dir)
    wrapper = sandbox("egress-firewall.service")
    with (
        network_namespace(addresses=("10.77.0.1/32",)),
        start("firewall", "run", config=config, env=notify_socket.env(), wrapper=wrapper) as run,
    ):
        ready = notify_socket.expect("READY")
        installed = egress_rules()  # at READY=1, the rules are already in the kernel
        assert any("app=blog" in line for line in installed), installed
        assert "1 apps" in ready["STATUS"], ready
        caps = capabilities_of(run.pid)
        assert caps["CapBnd"] == caps["CapEff"] == (1 << 12) | (1 << 13), caps

        ready = reload_cycle(run, notify_socket)
        assert ready["STATUS"].startswith("firewall synced after reload"), ready

        run.send_signal(signal.SIGTERM)
        notify_socket.expect("STOPPING")
        assert run.wait(timeout=15) == 0
        assert egress_rules() == installed  # fail closed: the rules stay


@pytest.mark.netns
def test_firewall_run_that_cannot_sync_exits_without_ready(
    short_dir: Path, notify_socket: NotifySocket
) -> None:
    """Without CAP_NET_ADMIN the first sync fails: exit 1, no READY=1, so systemd fails the
    unit and nothing ordered after it (the apps) is started as if the firewall were up."""
    wrapper = sandbox("egress-firewall.service", caps=[])
    config = firewall_config(short_dir)
    with (
        network_namespace(),
        start("firewall", "run", config=config, env=notify_socket.env(), wrapper=wrapper) as run,
    ):
        assert run.wait(timeout=30) == 1, run.logs()
        notify_socket.assert_quiet(0.2)
        assert egress_rules() == []


@pytest.mark.netns
def test_boot_sync_installs_the_rules_under_its_unit_sandbox(short_dir: Path) -> None:
    command = [
        *sandbox("egress-firewall-sync.service"),
        sys.executable,
        "-m",
        "egress.cli",
        "firewall",
        "sync",
        "--config",
        str(firewall_config(short_dir)),
    ]
    with network_namespace():
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert any("app=blog" in line for line in egress_rules())


@pytest.mark.netns
def test_legacy_iptables_needs_cap_net_raw_which_the_units_keep() -> None:
    """Why CapabilityBoundingSet= has CAP_NET_RAW: iptables-legacy (and python-iptables, the
    "auto" backend on legacy hosts) opens a raw socket; the nf_tables tools need only
    CAP_NET_ADMIN."""
    table = "*filter\n:EGRESS-CAPS-TEST - [0:0]\nCOMMIT\n"
    with network_namespace():
        for tool, caps, ok in [
            ("iptables-legacy-restore", ["CAP_NET_ADMIN"], False),
            ("iptables-legacy-restore", ["CAP_NET_ADMIN", "CAP_NET_RAW"], True),
            ("iptables-nft-restore", ["CAP_NET_ADMIN"], True),
        ]:
            command = [*sandbox("egress-firewall.service", caps=caps), "/usr/sbin/" + tool]
            result = subprocess.run(
                [*command, "-w", "--noflush"],
                input=table,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert (result.returncode == 0) == ok, (tool, caps, result.stderr)
