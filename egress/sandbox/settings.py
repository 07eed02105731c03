"""The shim's settings, from the environment of the app's interpreter.

``EGRESS_SANDBOX_PROXY``
    The proxy's SOCKS5 listener, a loopback ``HOST:PORT`` (``127.0.0.1:1080``,
    ``[::1]:1080``). Required: without it every connection is refused (fail closed). It must
    be TCP: the app's socket stays a real TCP socket connected to it, and the proxy learns the
    app's uid from the kernel's table of loopback TCP sockets.
``EGRESS_SANDBOX_LISTEN``
    What ``bind()``/``listen()`` may do on TCP sockets: ``any`` (the default: a hosted web app
    serves on its port), ``loopback`` (listen on loopback addresses only) or ``none`` (an
    outbound-only app: no ``listen()``, and ``bind()`` only to port 0, to pick a source address).
``EGRESS_SANDBOX_TIMEOUT``
    The longest a connect on a socket without its own timeout waits for the proxy's answer, in
    seconds (default 60; the proxy answers within its ``connect_timeout``).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["LISTEN_POLICIES", "SandboxConfigError", "Settings"]

LISTEN_POLICIES: Final = ("any", "loopback", "none")
ENV_PROXY: Final = "EGRESS_SANDBOX_PROXY"
ENV_LISTEN: Final = "EGRESS_SANDBOX_LISTEN"
ENV_TIMEOUT: Final = "EGRESS_SANDBOX_TIMEOUT"


class SandboxConfigError(ValueError):
    """A setting of the shim is wrong; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    proxy: tuple[str, int]
    listen: str = "any"
    connect_timeout: float = 60.0

    def proxy_for(self, family: int) -> tuple[str, int] | tuple[str, int, int, int]:
        """The proxy's address as a socket of ``family`` connects to it: an IPv6 socket reaches
        an IPv4 proxy at its IPv4-mapped address (the kernel gives the proxy the same uid)."""
        host, port = self.proxy
        if family == socket.AF_INET6:
            return (host if ":" in host else f"::ffff:{host}", port, 0, 0)
        if ":" in host:
            raise PermissionError(
                errno.EACCES,
                f"egress: {ENV_PROXY}={self.proxy_text} is IPv6; IPv4 sockets need the proxy's"
                " 127.0.0.1 listener",
            )
        return self.proxy

    @property
    def proxy_text(self) -> str:
        host, port = self.proxy
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        proxy_text = environ.get(ENV_PROXY, "").strip()
        if not proxy_text:
            raise SandboxConfigError(f"{ENV_PROXY} is not set (the proxy's SOCKS5 HOST:PORT)")
        listen = environ.get(ENV_LISTEN, "any").strip() or "any"
        if listen not in LISTEN_POLICIES:
            raise SandboxConfigError(
                f"{ENV_LISTEN}={listen!r}: expected one of {', '.join(LISTEN_POLICIES)}"
            )
        timeout_text = environ.get(ENV_TIMEOUT, "60").strip() or "60"
        try:
            timeout = float(timeout_text)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 3600:
            raise SandboxConfigError(f"{ENV_TIMEOUT}={timeout_text!r}: seconds, 0 < t <= 3600")
        return cls(parse_proxy(proxy_text, ENV_PROXY), listen, timeout)


def parse_proxy(text: str, where: str) -> tuple[str, int]:
    """A loopback ``HOST:PORT``; anything else is a :class:`SandboxConfigError` naming ``where``."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise SandboxConfigError(
            f"{where}={text!r}: expected a loopback IP HOST:PORT such as 127.0.0.1:1080"
        ) from None
    if not sep or not 0 < port <= 0xFFFF:
        raise SandboxConfigError(f"{where}={text!r}: port must be 1..65535")
    if not address.is_loopback:
        raise SandboxConfigError(
            f"{where}={text!r}: the proxy must be on loopback (it identifies apps by the uid"
            " that owns the local socket)"
        )
    return str(address), port
