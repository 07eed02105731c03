"""Network namespaces: a test's own network, so nothing it dials can leave the machine and
every firewall rule it causes is deleted with the namespace, never touching the host's.

One kind of namespace for the whole suite, used two ways: :func:`network_namespace` moves the
test's thread in for a block (the event loop, sockets, threads and children it starts there
live in it); :class:`NetworkNamespace` keeps one by name and starts children inside it
(``run``/``check``/``popen``) while the test itself stays outside. Creating one needs root and
the test's ``@pytest.mark.netns``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from tests.privilege import require

COMMAND_TIMEOUT_S = 30.0

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class NetworkNamespace:
    """A fresh named namespace whose only interface is loopback (up), carrying ``addresses``
    as well (e.g. "10.77.0.1/32", "fd77::1/128"): any address a test dials is local to it.

    ``setns`` moves only the calling thread, so :meth:`entered` (and ``run``/``popen``, which
    enter just for the fork; children inherit it) never leaves the test process inside.
    :meth:`close` (or leaving the ``with`` block) deletes it with every rule in it.
    """

    def __init__(self, *, addresses: Sequence[str] = ()) -> None:
        require("netns", "a network namespace")
        self.name = f"egress-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._fd: int | None = None
        self._deleted = False
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        try:
            self._fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            self.check(["ip", "link", "set", "lo", "up"])
            for address in addresses:
                command = ["ip", "addr", "add", address, "dev", "lo"]
                self.check([*command, "nodad"] if ":" in address else command)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetworkNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def entered(self) -> Iterator[NetworkNamespace]:
        """Move the calling thread into the namespace for the block, then back."""
        assert self._fd is not None, f"namespace {self.name} is closed"
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self._fd)
            try:
                yield self
            finally:
                _setns(original)
        finally:
            os.close(original)

    def run(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` inside the namespace; output captured as text, never checked."""
        kwargs.setdefault("timeout", COMMAND_TIMEOUT_S)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("check", False)
        with self.entered():
            return subprocess.run(command, **kwargs)

    def check(self, command: list[str], **kwargs: Any) -> str:
        """:meth:`run` that must exit 0; its stdout."""
        result = self.run(command, **kwargs)
        assert result.returncode == 0, (
            f"{command} exited {result.returncode}: {result.stderr}{result.stdout}"
        )
        return result.stdout

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside the namespace (stop it with ``processes.stop_process``)."""
        with self.entered():
            return subprocess.Popen(command, **kwargs)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._deleted:
            self._deleted = True
            subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=10)


@contextlib.contextmanager
def network_namespace(*, addresses: Sequence[str] = ()) -> Iterator[NetworkNamespace]:
    """A fresh :class:`NetworkNamespace` this thread runs in for the block, deleted after.

    Enter it before starting the event loop, so the loop's sockets and threads live in it.
    """
    with NetworkNamespace(addresses=addresses) as namespace, namespace.entered():
        yield namespace
