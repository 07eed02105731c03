"""Real processes: ``egress proxy`` and ``egress firewall run`` started as an operator starts
them, one-shot ``egress`` commands, and the small stdlib children tests run beside them.

What is tested here is the program itself (its signals, exit codes and JSON log lines), so
each runs as a child; whatever starts is stopped by pid (SIGKILL if it still runs) when its
block ends, whether the test passed or not, so no child outlives its test.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.netns import NetworkNamespace
from tests.polling import wait_until
from tests.privilege import require
from tests.support import read_connection_log

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 30.0
START_TIMEOUT_S = 15.0


def egress_command(*args: str) -> list[str]:
    """The command line that runs ``egress ARGS...`` with this test run's interpreter."""
    return [sys.executable, "-m", "egress.cli", *args]


def run_egress(
    *args: str,
    netns: NetworkNamespace | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``egress ARGS...`` to completion from the repository (relative paths such as
    ``config.example.toml`` work), inside ``netns`` if given; output captured, exit not checked.
    """
    options: dict[str, Any] = {
        "cwd": REPO,
        "env": env,
        "capture_output": True,
        "text": True,
        "timeout": timeout,
        "check": False,
    }
    if netns is not None:
        return netns.run(egress_command(*args), **options)
    return subprocess.run(egress_command(*args), **options)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc`` by pid if it still runs, reap it and close its pipes (idempotent)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class EgressProcess:
    """A running ``egress ...`` child whose stderr (its JSON log) goes to a file next to the
    config; use it as a context manager so it is stopped by pid whatever happens.

    ``connection_log`` is read from the config's ``[log] connection_log``.
    """

    def __init__(
        self,
        *args: str,
        config: Path,
        netns: NetworkNamespace | None = None,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.started: dict[str, Any] | None = None  # the "proxy started" line, once seen
        log = tomllib.loads(config.read_text()).get("log", {}).get("connection_log", "-")
        self.connection_log = None if log == "-" else Path(log)
        self.stderr_path = config.parent / f"{config.stem}-{args[0]}-{uuid.uuid4().hex[:6]}.stderr"
        self._stderr: IO[str] = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        # ``wrapper``: a command that runs the rest (e.g. under a unit's sandbox, then execs it)
        command = [*wrapper, *egress_command(*args, "--config", str(config))]
        options: dict[str, Any] = {
            "cwd": REPO,
            "env": env,
            "stdout": subprocess.DEVNULL,
            "stderr": self._stderr,
        }
        try:
            self.proc = (
                netns.popen(command, **options) if netns else subprocess.Popen(command, **options)
            )
        except BaseException:
            self._stderr.close()
            raise

    def __enter__(self) -> EgressProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> list[dict[str, Any]]:
        """Its log lines so far, parsed (a line that is not JSON as ``{"raw": line}``)."""
        text = self.stderr_path.read_text()
        entries = []
        for line in text[: text.rfind("\n") + 1].splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                entries.append({"raw": line})
        return entries

    def wait_for(
        self,
        condition: Callable[[], T],
        what: str,
        *,
        timeout: float = 10.0,
        ignoring: tuple[type[BaseException], ...] = (),
    ) -> T:
        """:func:`tests.polling.wait_until`, failing at once (with its log) if it exits first.

        Exceptions in ``ignoring`` count as "not yet" (e.g. its metrics endpoint not up yet).
        """

        def check() -> T | None:
            exited = self.proc.poll() is not None  # before reading: its last words still count
            try:
                value = condition()
            except ignoring:
                value = None
            if not value and exited:
                raise AssertionError(
                    f"egress exited {self.proc.returncode} while waiting for {what}: {self.logs()}"
                )
            return value

        return wait_until(check, what, timeout=timeout, detail=self.logs)  # type: ignore[return-value]

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first log line ``predicate`` accepts, once it is written."""

        def found() -> dict[str, Any] | None:
            return next((entry for entry in self.logs() if predicate(entry)), None)

        return self.wait_for(found, f"a log line: {what}", timeout=timeout)

    def connection_records(self) -> list[dict[str, Any]]:
        """Its connection log so far (complete lines)."""
        assert self.connection_log is not None, f"{self.config} logs connections to stderr"
        return read_connection_log(self.connection_log)

    def wait_connection_records(self, count: int, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The connection log once it holds ``count`` records (it is flushed twice a second)."""

        def enough() -> list[dict[str, Any]] | None:
            records = self.connection_records()
            return records if len(records) >= count else None

        return wait_until(
            enough,
            f"{count} connection log records",
            timeout=timeout,
            every=0.05,
            detail=self.connection_records,
        )

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Its exit code, once it exits within ``timeout``."""
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL it by pid and reap it (for tests of what a dead process leaves behind)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)
        self._stderr.close()


def start_proxy(
    config: Path, *, netns: NetworkNamespace | None = None, timeout: float = START_TIMEOUT_S
) -> EgressProcess:
    """``egress proxy --config CONFIG``, returned once it logged "proxy started"."""
    proxy = EgressProcess("proxy", config=config, netns=netns)
    try:
        proxy.started = proxy.wait_log(
            lambda entry: entry.get("msg") == "proxy started", "proxy started", timeout=timeout
        )
    except BaseException:
        proxy.stop()
        raise
    return proxy


def start_firewall_controller(
    config: Path, *, netns: NetworkNamespace | None = None
) -> EgressProcess:
    """``egress firewall run --config CONFIG``; readiness (its first sync) is the caller's to
    await, e.g. on its metrics."""
    return EgressProcess("firewall", "run", config=config, netns=netns)


# --- small stdlib children ---------------------------------------------------------------------
def read_line(proc: subprocess.Popen[Any], what: str, *, timeout: float = 10.0) -> str:
    """The next line ``proc`` prints on its stdout pipe (stripped). Read byte by byte from the
    descriptor, so nothing after that line is consumed; fails if it says nothing in time or
    exits first."""
    assert proc.stdout is not None
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"{what} (pid {proc.pid}) said nothing within {timeout:g} s")
        chunk = os.read(fd, 1)
        if not chunk:
            stderr = proc.stderr.read() if proc.stderr else ""
            if isinstance(stderr, bytes):
                stderr = stderr.decode(errors="replace")
            raise AssertionError(f"{what} (pid {proc.pid}) exited ({proc.wait()}): {stderr}")
        data += chunk
    return data.decode().strip()


def wait_ready(proc: subprocess.Popen[Any], what: str, *, timeout: float = 10.0) -> None:
    """A child that prints "ready" once its sockets are bound (milliseconds), or dies."""
    line = read_line(proc, what, timeout=timeout)
    assert line == "ready", f"{what} did not start: {line!r}"


def python_for_uid(uid: int) -> str:
    """A Python interpreter ``uid`` may execute: the venv's may live under a private /root
    (pyenv), in which case the system's python3 runs the stdlib-only child scripts."""
    require("root", f"a child process under uid {uid}")
    return _python_for_uid(uid)


@functools.cache
def _python_for_uid(uid: int) -> str:
    candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3")]
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(
                [exe, "-I", "-c", "pass"],
                user=uid,
                group=uid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                timeout=10,
                check=False,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return exe
    raise AssertionError(f"no Python interpreter in {candidates} is executable by uid {uid}")
