"""The shipped logrotate snippet (``deploy/logrotate/egress``), run by the real ``logrotate``
against a live ``egress proxy`` process.

Each test runs a copy of the shipped file in which only the names that point at a node are
replaced: the log directory, the owner (``nobody``, which exists everywhere, stands in for the
``egress`` user), the systemd unit (a name no machine has, so the fallback runs and no real
proxy on a developer's box is ever signalled) and the pid file. Every other directive, and the
postrotate script itself, is what ships. Each connection the app's child makes sends a payload
of a size no other connection uses, so ``bytes_up`` names its one log line.
"""

from __future__ import annotations

import grp
import gzip
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.configs import write_config
from tests.integration.test_process import Echo, free_port, proxy_config
from tests.polling import wait_until
from tests.processes import (
    REPO,
    EgressProcess,
    python_for_uid,
    read_line,
    start_proxy,
    stop_process,
    wait_ready,
)
from tests.support import APP_UID, read_connection_log

pytestmark = pytest.mark.root

SNIPPET = REPO / "deploy" / "logrotate" / "egress"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
OWNER = "nobody"
GROUP = grp.getgrgid(pwd.getpwnam(OWNER).pw_gid).gr_name  # nogroup on Debian
LOG_NAME = "connections.log"
REOPENED = "connection log reopened"

# The app's client, run under the app's uid: one SOCKS5 CONNECT per payload size, from FIRST
# on, COUNT at most, each echoed back in full before the next; prints each size once done.
# With "until-stdin-closes" it also stops as soon as its stdin reaches EOF. Stdlib only.
LOAD_CLIENT = textwrap.dedent(
    """
    import select, socket, struct, sys
    proxy_port, echo_port, first, count = map(int, sys.argv[1:5])
    until_told = sys.argv[5] == "until-stdin-closes"
    for size in range(first, first + count):
        if until_told and select.select([sys.stdin], [], [], 0)[0]:
            break
        s = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
        s.sendall(b"\\x05\\x01\\x00")
        assert s.recv(2) == b"\\x05\\x00"
        s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton("127.0.0.1")
                  + struct.pack("!H", echo_port))
        reply = s.recv(10)
        assert reply[:2] == b"\\x05\\x00", reply
        payload = b"x" * size
        s.sendall(payload)
        echoed = b""
        while len(echoed) < size and (chunk := s.recv(65536)):
            echoed += chunk
        assert echoed == payload, (size, len(echoed))
        s.close()
        print(size, flush=True)
    print("done", flush=True)
    """
)

# A process that must never get a HUP: it blocks SIGHUP, so one sent stays pending (visible in
# /proc/PID/status) instead of killing it. Its arguments look like the firewall controller's.
HUP_WITNESS = textwrap.dedent(
    """
    import signal, sys
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def snippet_copy(logdir: Path, pidfile: Path, unit: str, *, only_ids: bool = False) -> str:
    """The shipped file with the node's names replaced (only the owner, with ``only_ids``)."""
    text = SNIPPET.read_text()
    substitutions = {
        "su egress egress": f"su {OWNER} {GROUP}",
        "create 0640 egress egress": f"create 0640 {OWNER} {GROUP}",
    }
    if not only_ids:
        substitutions |= {
            "/var/log/egress/*.log {": f"{logdir}/*.log {{",
            "unit=egress-proxy.service": f"unit={unit}",
            "pidfile=/run/egress/proxy.pid": f"pidfile={pidfile}",
        }
    for old, new in substitutions.items():
        assert text.count(old) == 1, f"{SNIPPET} has not exactly one {old!r}: update this test"
        text = text.replace(old, new)
    return text


def write_conf(path: Path, text: str) -> Path:
    """logrotate silently skips a config that group or others may write: 0644, whatever the
    umask of the checkout."""
    path.write_text(text)
    path.chmod(0o644)
    return path


def logrotate(*args: str) -> subprocess.CompletedProcess[str]:
    assert os.path.exists(LOGROTATE), f"{LOGROTATE} missing: scripts/test installs logrotate"
    return subprocess.run(
        [LOGROTATE, *args], capture_output=True, text=True, timeout=30, check=False
    )


@dataclass
class Node:
    """A log directory owned by a non-root user, and this test's copy of the snippet."""

    logdir: Path
    conf: Path
    state: Path
    pidfile: Path

    @property
    def log(self) -> Path:
        return self.logdir / LOG_NAME

    def generation(self, suffix: str) -> Path:
        return self.logdir / f"{LOG_NAME}{suffix}"

    def rotate(self) -> subprocess.CompletedProcess[str]:
        """What the daily timer runs, forced (``-f``), with this test's state file."""
        return logrotate("-f", "-s", str(self.state), str(self.conf))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    # logrotate works in the directory as its owner (``su``), who must be able to reach it:
    # not under pytest's root-only tmp_path, so a 0755 directory of its own in /tmp.
    top = Path(tempfile.mkdtemp(prefix="egress-logrotate-"))
    try:
        top.chmod(0o755)
        logdir = top / "egress"
        logdir.mkdir()
        logdir.chmod(0o755)
        shutil.chown(logdir, OWNER, GROUP)
        pidfile = tmp_path / "proxy.pid"
        unit = f"egress-test-{uuid.uuid4().hex[:8]}.service"
        conf = write_conf(tmp_path / "logrotate.conf", snippet_copy(logdir, pidfile, unit))
        yield Node(logdir, conf, tmp_path / "logrotate.state", pidfile)
    finally:
        shutil.rmtree(top)


@dataclass
class Live:
    proxy: EgressProcess
    echo: Echo
    socks: int


@pytest.fixture
def live(node: Node, tmp_path: Path) -> Iterator[Live]:
    """``egress proxy`` writing its connection log into the node's directory, its pid in the
    pid file. The file already exists, owned by the directory's owner, as the egress user's
    proxy leaves it (this proxy runs as root: the venv's Python is not every uid's)."""
    node.log.touch()
    node.log.chmod(0o640)
    shutil.chown(node.log, OWNER, GROUP)
    echo = Echo()
    try:
        socks = free_port()
        config = tmp_path / "egress.toml"
        write_config(config, proxy_config(socks, free_port(), [f"127.0.0.1:{echo.port}"], node.log))
        with start_proxy(config) as proxy:
            node.pidfile.write_text(f"{proxy.pid}\n")
            yield Live(proxy, echo, socks)
    finally:
        echo.stop()


def load_command(live: Live, first: int, count: int, mode: str = "fixed") -> list[str]:
    python = python_for_uid(APP_UID)
    args = [str(live.socks), str(live.echo.port), str(first), str(count), mode]
    return [python, "-I", "-c", LOAD_CLIENT, *args]


def connect(live: Live, first: int, count: int) -> list[int]:
    """``count`` connections from the app's uid, one after another; the sizes sent."""
    result = subprocess.run(
        load_command(live, first, count),
        user=APP_UID,
        group=APP_UID,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    *sizes, done = result.stdout.split()
    assert done == "done", result.stdout
    return [int(size) for size in sizes]


def sizes_in(path: Path) -> list[int]:
    """The ``bytes_up`` of each line, in file order; every line an allowed connection."""
    if path.suffix == ".gz":
        text = gzip.decompress(path.read_bytes()).decode()
        records = [json.loads(line) for line in text.splitlines()]
    else:
        records = read_connection_log(path)
    assert all(r["decision"] == "allowed" for r in records), records
    return [int(r["bytes_up"]) for r in records]


def wait_sizes(path: Path, count: int) -> list[int]:
    """The file's sizes once it holds ``count`` lines (the proxy flushes twice a second)."""

    def enough() -> list[int]:
        found = sizes_in(path)
        return found if len(found) >= count else []  # falsy: not yet

    return wait_until(enough, f"{count} lines in {path}", every=0.05, detail=lambda: sizes_in(path))


def reopens(proxy: EgressProcess) -> int:
    return sum(1 for entry in proxy.logs() if entry.get("msg") == REOPENED)


def rotate_live(node: Node, live: Live, expected_reopens: int) -> None:
    """One rotation, returned once the proxy reopened its log (the HUP handled)."""
    result = node.rotate()
    assert result.returncode == 0, result.stderr
    live.proxy.wait_for(lambda: reopens(live.proxy) >= expected_reopens, "the log reopened")
    assert reopens(live.proxy) == expected_reopens  # sharedscripts: one HUP per rotation


def test_rotation_moves_each_line_once_and_compresses_one_rotation_later(
    node: Node, live: Live
) -> None:
    pid = live.proxy.pid
    before = connect(live, 1, 5)
    assert sorted(wait_sizes(node.log, 5)) == before
    before_text = node.log.read_text()
    inode = node.log.stat().st_ino

    rotate_live(node, live, 1)
    rotated = node.generation(".1")
    assert rotated.read_text() == before_text
    # Renamed, not copied (no copytruncate): the proxy's own file, and a new one at the path.
    assert rotated.stat().st_ino == inode != node.log.stat().st_ino
    assert not list(node.logdir.glob("*.gz"))  # delaycompress: the renamed file stays as is
    created = node.log.stat()  # create 0640 egress egress
    assert (created.st_uid, created.st_gid) == (
        pwd.getpwnam(OWNER).pw_uid,
        grp.getgrnam(GROUP).gr_gid,
    )
    assert created.st_mode & 0o777 == 0o640

    after = connect(live, 6, 5)
    assert sorted(wait_sizes(node.log, 5)) == after
    assert rotated.read_text() == before_text  # nothing reached the old file after the HUP
    assert live.proxy.pid == pid and live.proxy.proc.poll() is None
    after_text = node.log.read_text()

    rotate_live(node, live, 2)
    assert gzip.decompress(node.generation(".2.gz").read_bytes()).decode() == before_text
    assert node.generation(".1").read_text() == after_text
    assert sorted(p.name for p in node.logdir.iterdir()) == [
        LOG_NAME,
        f"{LOG_NAME}.1",
        f"{LOG_NAME}.2.gz",
    ]
    last = connect(live, 11, 3)
    assert sorted(wait_sizes(node.log, 3)) == last
    assert live.proxy.pid == pid and live.proxy.proc.poll() is None
    logged = [*sizes_in(node.generation(".2.gz")), *sizes_in(node.generation(".1"))]
    assert sorted(logged + sizes_in(node.log)) == list(range(1, 14))


def test_a_rotation_under_load_logs_every_connection_exactly_once(node: Node, live: Live) -> None:
    """The app's client connects back to back while logrotate runs: every connection
    succeeds and has exactly one line, in the rotated file or in the new one."""
    done: list[int] = []
    load = subprocess.Popen(
        load_command(live, 1, 20000, "until-stdin-closes"),
        user=APP_UID,
        group=APP_UID,
        extra_groups=[],
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def take(count: int) -> None:
        for _ in range(count):
            line = read_line(load, "the load client")
            assert line != "done", f"the load client stopped early, after {len(done)}"
            done.append(int(line))

    try:
        take(20)
        wait_sizes(node.log, 1)  # lines reached the file before the rename
        rotate_live(node, live, 1)
        rotated = node.generation(".1")
        frozen = rotated.read_bytes()
        wait_sizes(node.log, 20)  # served after the HUP was handled (stdout lags behind)
        assert load.stdin is not None
        load.stdin.close()
        while (line := read_line(load, "the load client")) != "done":
            done.append(int(line))
        assert load.wait(timeout=10) == 0
    finally:
        stop_process(load)

    def all_logged() -> list[list[int]]:
        old, new = sizes_in(rotated), sizes_in(node.log)
        return [old, new] if len(old) + len(new) >= len(done) else []  # falsy: not yet

    old, new = wait_until(all_logged, f"{len(done)} lines in both files", every=0.05)
    assert old and new
    assert sorted(old + new) == sorted(done) == list(range(1, len(done) + 1))
    assert rotated.read_bytes() == frozen  # nothing reached the old file after the HUP
    assert live.proxy.proc.poll() is None


@pytest.mark.parametrize("pidfile_names", ["another process", "nothing"])
def test_postrotate_signals_nothing_but_the_proxy(node: Node, pidfile_names: str) -> None:
    """A pid file naming something else (a stale one, a reused pid: here a process whose
    command line says ``egress firewall run``), or none at all: nothing is signalled and
    logrotate fails, saying why, since no proxy reopened its log."""
    node.log.write_text('{"line":1}\n')
    shutil.chown(node.log, OWNER, GROUP)
    witness = subprocess.Popen(
        [sys.executable, "-c", HUP_WITNESS, "egress", "firewall", "run"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(witness, "the HUP witness")
        if pidfile_names == "another process":
            node.pidfile.write_text(f"{witness.pid}\n")
            said = "names no running egress proxy"
        else:
            said = "no egress proxy was told to reopen its log"
        result = node.rotate()
        assert result.returncode != 0
        assert said in result.stderr, result.stderr
        assert not hup_pending(witness.pid)
        os.kill(witness.pid, signal.SIGHUP)  # the witness does see one
        assert hup_pending(witness.pid)
    finally:
        stop_process(witness)
    assert node.generation(".1").read_text() == '{"line":1}\n'  # rotated all the same


def hup_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    (pending,) = [line.split()[1] for line in status.splitlines() if line.startswith("ShdPnd:")]
    return bool(int(pending, 16) & (1 << (signal.SIGHUP - 1)))


def test_the_shipped_file_parses(tmp_path: Path) -> None:
    """``logrotate -d`` reads the file as shipped: no error, every directive understood.
    Where no ``egress`` user exists yet (a test machine), its only complaint is that user."""
    unused = tmp_path / "unused"
    ids_only = write_conf(tmp_path / "ids", snippet_copy(unused, unused, "", only_ids=True))
    result = logrotate("-d", "-s", str(tmp_path / "state"), str(ids_only))
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert "rotating pattern: /var/log/egress/*.log  after 1 days (14 rotations)" in result.stderr
    assert "log files >= 1073741824 are rotated earlier" in result.stderr

    shipped = write_conf(tmp_path / "egress", SNIPPET.read_text())
    result = logrotate("-d", "-s", str(tmp_path / "state"), str(shipped))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    try:
        pwd.getpwnam("egress")
    except KeyError:
        assert errors, result.stderr
        assert all("unknown user 'egress'" in e or "found error in" in e for e in errors), errors
    else:
        assert result.returncode == 0 and not errors, result.stderr
