"""A real ``redis-server`` for tests: on a free loopback port, in its own directory.

    with RedisServer(tmp_path) as server:        # started, answers PING
        server.url                               # "redis://127.0.0.1:<port>/0"
        server.client().set("k", "v")            # a sync redis.Redis (bytes replies)
        server.restart()                         # same port; data kept if persistent=True
        server.stop(); server.start()            # down for a while, then back

``persistent=True`` turns on the append-only file (fsync on every write), so data survives
:meth:`RedisServer.restart`; otherwise nothing is ever written to disk. The process is stopped
by its pid (SIGTERM, then SIGKILL) whatever the test did. The methods block (waiting for PING
or an exit): from a coroutine, call them through ``asyncio.to_thread``.

The ``redis_server`` fixture is one non-persistent server per test. ``from tests.redisserver
import redis_server_fixture`` in a test module (or a conftest) makes it available; the import's
name differs from the fixture's, so a test's ``redis_server`` argument shadows nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.polling import wait_until

__all__ = ["RedisServer", "redis_server_fixture"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a server that is stopped and
    started again on its port must not find it taken meanwhile as some client socket's local
    port (a port from bind(0) is an ephemeral one, and this machine's tests open thousands)."""
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(20000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port between 20000 and {low}")


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return max(20001, int(text.split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


class RedisServer:
    """One ``redis-server`` child bound to 127.0.0.1; a context manager (start ... stop)."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = 0  # chosen at the first start, kept across restarts
        self.proc: subprocess.Popen[bytes] | None = None
        self._port_trying = 0
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def client(self) -> redis.Redis:
        """A new synchronous client (replies as bytes); close it when done."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5.0, retry=Retry(NoBackoff(), 1)
        )

    def start(self) -> RedisServer:
        """Start the server (on the port it had, if it ran before) and wait for PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        for attempt in range(3):  # a free port may be taken before redis binds it
            port = self.port or _free_port()
            self._spawn(port)
            try:
                wait_until(
                    self._answers,
                    f"redis-server on port {port} answers PING",
                    timeout=START_TIMEOUT_S,
                    ignoring=(redis.exceptions.ConnectionError,),
                    detail=self._log_tail,
                )
            except AssertionError:
                self.stop()
                if self.port or attempt == 2:
                    raise
                continue
            self.port = port
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop it by pid: SIGTERM (an append-only file is flushed), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a test may have frozen it
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop and start again on the same port (what clients see as "Redis restarted")."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "redis-server is not running"
        return self.proc.pid

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, port: int) -> None:
        executable = shutil.which("redis-server")
        assert executable is not None, "redis-server is not installed (apt-get install redis)"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self._port_trying = port
        self.proc = subprocess.Popen(
            [
                executable,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(self.directory),
                "--save",
                "",
                *persistence,
                "--daemonize",
                "no",
                "--logfile",
                str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited {self.proc.returncode}: {self._log_tail()}")
        with redis.Redis(
            host="127.0.0.1",
            port=self._port_trying,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        ) as probe:
            return bool(probe.ping())

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty, non-persistent redis-server for one test."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
