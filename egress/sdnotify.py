"""sd_notify(3) in the standard library: tell the service manager that a daemon is ready,
reloading or stopping.

systemd starts ``Type=notify`` units with ``$NOTIFY_SOCKET`` naming a datagram socket (a path,
or an abstract name spelled ``@name``) and considers the unit started when ``READY=1`` arrives
on it, so whatever is ordered after the unit (the app runtime) starts only once the listeners
accept or the firewall is in the kernel. The protocol is one ``AF_UNIX`` datagram of
``KEY=value`` lines; writing it here costs less than a C dependency (libsystemd).

Notifying is advisory for the daemon: without ``$NOTIFY_SOCKET`` (not under systemd) every
call is a no-op, and a notification that cannot be sent never raises into the proxy: the
first failure is logged (with the address, so the operator can see which) and later ones are
not (each is still tried: a socket that was briefly full must not silence ``STOPPING=1``), so
a broken socket cannot flood the log.

The address is read once per process and removed from the environment (sd_notify's
``unset_environment``): notifications are the main process's word, and no child (the firewall
controller runs ``iptables-restore``) should be able to speak for the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import MutableMapping
from typing import Final

__all__ = ["ENVIRONMENT_VARIABLE", "Notifier", "notifier"]

ENVIRONMENT_VARIABLE: Final = "NOTIFY_SOCKET"
_SEND_TIMEOUT_S: Final = 1.0  # a manager that stopped reading holds the event loop no longer
_MAX_STATUS: Final = 200  # STATUS= is one line of `systemctl status`

log = logging.getLogger("egress.sdnotify")


def _one_line(text: str) -> str:
    """STATUS= ends at a newline: what followed one would be read as another assignment."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_STATUS else flat[: _MAX_STATUS - 3] + "..."


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it (systemd compares it
    with its own clock to tell this reload from an earlier one)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to one address; ``address=None`` makes every call a no-op."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._target: str | bytes | None = None
        self._socket: socket.socket | None = None
        self._logged = False
        self._lock = threading.Lock()  # one notifier per process, whichever thread sends
        if address is None:
            return
        if address.startswith("@") and len(address) > 1:
            self._target = b"\0" + address[1:].encode()  # Linux abstract namespace
        elif address.startswith("/"):
            self._target = address
        else:  # e.g. "vsock:" (systemd 253+), which this implementation does not speak
            self._fail(
                f"unsupported address {address!r} (expected an absolute path or @abstract-name)"
            )

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` names (a no-op one if unset or empty); ``unset``
        removes the variable so children do not inherit it."""
        environ = os.environ if environ is None else environ
        address = (
            environ.pop(ENVIRONMENT_VARIABLE, None) if unset else environ.get(ENVIRONMENT_VARIABLE)
        )
        return cls(address or None)

    @property
    def enabled(self) -> bool:
        """An address to send to was given (sends may still fail)."""
        return self._target is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; True if sent."""
        if self._target is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                    self._socket.settimeout(_SEND_TIMEOUT_S)
                self._socket.sendto(message, self._target)
            except Exception as exc:  # never into the caller: readiness is advisory
                self._fail(f"cannot send {fields[0]!r}: {exc}")
                return False
        return True

    def ready(self, status: str) -> bool:
        """Started (or a reload finished, applied or not): the manager may start what is
        ordered after this unit."""
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self, status: str) -> bool:
        """A reload began; ``READY=1`` must follow once it finished."""
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", f"STATUS={_one_line(status)}"
        )

    def stopping(self, status: str) -> bool:
        """Shutting down (draining): the manager waits for the exit, not for a crash."""
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_one_line(status)}")

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _fail(self, why: str) -> None:
        """Log the first failure only (a lost READY=1 fails the unit by its start timeout,
        which this line explains)."""
        if not self._logged:
            self._logged = True
            log.warning(
                "cannot notify the service manager; readiness, reload and stop are not reported",
                extra={"notify_socket": self.address, "error": why[:300]},
            )


_process_lock = threading.Lock()
_process: dict[str, Notifier] = {}  # the one notifier of this process, once made


def notifier() -> Notifier:
    """This process's notifier, from ``$NOTIFY_SOCKET`` at the first call (which removes the
    variable from the environment). The service manager knows one main process: readiness is
    a property of the process, so the daemon's parts share one notifier."""
    with _process_lock:
        if "notifier" not in _process:
            _process["notifier"] = Notifier.from_environment()
        return _process["notifier"]
