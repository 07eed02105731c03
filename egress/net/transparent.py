"""Transparent mode: connections redirected to us by iptables ``REDIRECT``.

The client believes it connected straight to its destination; the kernel tells us where it
meant to go (``SO_ORIGINAL_DST``) and who it is (the uid owning its socket). There is no
handshake: the original destination is the request. Hostname rules can match only through
names the proxy itself resolved to that address (its DNS cache), never through a name the
client claims, so SNI and Host headers are not consulted at all.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from egress.context import ConnectionContext
from egress.net.connection import ClientConnection, ListenerKind
from egress.net.dialer import Dialled, hostport
from egress.outcomes import Outcome

_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}

# linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h
# IP6T_SO_ORIGINAL_DST: both 80, at SOL_IP and SOL_IPV6 (= IPPROTO_IPV6).
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr, zero
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, addr, scope id


class OriginalDestinationError(OSError):
    """The connection was not redirected (someone dialled the transparent port directly)."""


def original_destination(sock: Any) -> tuple[IPv4Address | IPv6Address, int]:
    """Where the redirected client meant to connect, from conntrack.

    ``sock`` is the accepted socket (or an asyncio/uvloop transport socket wrapper). IPv4
    clients, including v4-mapped ones on a dual-stack listener, are asked at SOL_IP. Raises
    :class:`OriginalDestinationError` for a connection that was not redirected, ``OSError``
    for one already gone (reset before we got to it).
    """
    peer = sock.getpeername()
    mapped = sock.family == socket.AF_INET6 and peer[0].startswith("::ffff:")
    try:
        if sock.family == socket.AF_INET or mapped:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
            port, packed = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
            return IPv4Address(packed), port
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        port, _, packed, _ = _SOCKADDR_IN6.unpack(raw[: _SOCKADDR_IN6.size])
        return IPv6Address(packed), port
    except OSError as exc:
        raise OriginalDestinationError(
            exc.errno, "no original destination (connection was not redirected)"
        ) from exc


class TransparentConnection(ClientConnection):
    """A redirected client: identity and destination from the kernel, then the common path."""

    __slots__ = ("_gone", "_original")

    def __init__(self, context: ConnectionContext) -> None:
        super().__init__(context, ListenerKind.TRANSPARENT)
        self._original: tuple[IPv4Address | IPv6Address, int] | None = None
        self._gone = False

    def connection_made(self, transport: Any) -> None:
        try:
            self._original = original_destination(transport.get_extra_info("socket"))
        except OriginalDestinationError:
            self._original = None
        except (OSError, AttributeError):  # reset before we got to it (or no socket left)
            self._gone = True
        else:
            self.destination = hostport(*self._original)
        super().connection_made(transport)

    def precheck(self) -> tuple[Outcome, str] | None:
        if self._gone:
            return Outcome.CLIENT_CLOSED, "the client was gone before it could be looked at"
        if self._original is None:
            return Outcome.BAD_REQUEST, "not a redirected connection"
        if self.ctx.is_own_listener(*self._original):
            return Outcome.BAD_REQUEST, "redirect loop: destination is the proxy itself"
        return None

    def identify(self) -> int | None:
        # After REDIRECT the client's socket is still keyed by its original destination, so
        # that (not our listener address) is the remote end to look up.
        assert self.transport is not None and self._original is not None
        address, port = self._original
        peer = self.transport.get_extra_info("peername")
        remote = (str(address), port)
        if address.version == 4 and peer and peer[0].startswith("::ffff:"):
            remote = (f"::ffff:{address}", port)  # the client is v4 on a dual-stack listener
        return self.ctx.identify(self.transport, remote=remote)

    def admitted(self) -> None:
        assert self._original is not None
        self.request_complete(*self._original, b"")

    def data_received(self, data: bytes) -> None:
        """Bytes the client sent before the tunnel exists (it believes it is connected)."""
        self.hold_early(data)

    def send_success(self, dialled: Dialled) -> None:
        """The client already thinks it is connected: nothing to say."""

    def send_failure(self, outcome: Outcome, text: str, retry_after: float | None) -> None:
        """No protocol to carry a reason: a reset is the answer. A plain close would send FIN,
        which a client that already believes it is connected reads as an empty reply;
        SO_LINGER with a zero timeout makes the close a RST (connection reset by peer)."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
