"""The client side of the shim's handshake with the proxy, without I/O.

The shim offers egress's private SOCKS5 method (``0xE5``, from the range RFC 1928 keeps for
private methods) and pipelines its CONNECT request behind the greeting, so a connection costs
one round trip. Under that method the proxy follows every refusal with a *reason record*: two
bytes of length, then a JSON object (``reason``, ``decision``, ``app``, ``uid``,
``destination``, ``detail``, ``retry_after``). A refusal at accept (the uid belongs to no app,
say) is written before the proxy reads anything: ``05 FF`` and a record.

:class:`ReplyReader` says how many bytes it needs next (``want``) and never asks for more than
the handshake holds, so reading exactly that many never swallows the upstream's first bytes.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["METHOD_EGRESS", "HandshakeError", "Reply", "ReplyReader", "connect_request"]

SOCKS_VERSION: Final = 0x05
METHOD_NO_AUTH: Final = 0x00
METHOD_EGRESS: Final = 0xE5
METHOD_NO_ACCEPTABLE: Final = 0xFF
CMD_CONNECT: Final = 0x01
ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04
MAX_RECORD_BYTES: Final = 8192

# SOCKS5 reply codes (RFC 1928 section 6) and what they mean when no record says more.
REPLY_TEXT: Final = {
    0x01: "general failure",
    0x02: "not allowed by the ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


class HandshakeError(ValueError):
    """The proxy's answer is not a SOCKS5 reply this shim understands."""


def connect_request(host: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    """Greeting (egress's method, then no-auth for an older proxy) and the CONNECT request."""
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    if isinstance(host, ipaddress.IPv4Address):
        address = bytes((ATYP_IPV4,)) + host.packed
    elif isinstance(host, ipaddress.IPv6Address):
        address = bytes((ATYP_IPV6,)) + host.packed
    else:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 0 < len(name) <= 255:
            raise ValueError(f"host name of {len(name)} bytes: SOCKS5 carries 1 to 255")
        address = bytes((ATYP_DOMAIN, len(name))) + name
    greeting = bytes((SOCKS_VERSION, 2, METHOD_EGRESS, METHOD_NO_AUTH))
    head = bytes((SOCKS_VERSION, CMD_CONNECT, 0x00))
    return greeting + head + address + port.to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class Reply:
    """The proxy's answer: ``code`` 0 is success; ``record`` is the reason record, if any."""

    method: int
    code: int | None  # None: refused before a request was read (method 0xFF)
    record: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.code == 0


class ReplyReader:
    """Feed it exactly :attr:`want` bytes at a time until :attr:`reply` is set."""

    __slots__ = ("_buffer", "_code", "_method", "_step", "reply", "want")

    def __init__(self) -> None:
        self._buffer = b""
        self._method = -1
        self._code: int | None = None
        self._step = "method"
        self.want = 2
        self.reply: Reply | None = None

    def feed(self, data: bytes) -> None:
        if self.reply is not None or len(data) > self.want:
            raise RuntimeError("fed more than was wanted")
        self._buffer += data
        self.want -= len(data)
        if self.want == 0:
            self._advance()

    def take(self, data: bytes) -> None:
        """What one read returned: bytes to feed, or ``b""`` for the proxy's close."""
        if data:
            self.feed(data)
        else:
            self.eof()

    def eof(self) -> Reply:
        """The proxy closed: the answer so far, or :class:`HandshakeError` if there is none."""
        if self.reply is not None:
            return self.reply
        if self._step == "record":  # a refusal whose record was cut short: the code still holds
            return self._finish(None)
        if self._step == "record-length":
            # a plain server's "no acceptable method", or a refusal whose record never came:
            # what is known (the method, the code) still says what happened
            return self._finish(None)
        raise HandshakeError(
            "the proxy closed the connection without answering (it does that when it is at"
            " proxy.max_connections or this app's max_handshakes_per_app: try again; its"
            " connection log says which)"
        )

    def _advance(self) -> None:
        buffer, step = self._buffer, self._step
        if step == "method":
            if buffer[0] != SOCKS_VERSION:
                raise HandshakeError(f"not a SOCKS5 answer (version byte 0x{buffer[0]:02x})")
            self._method = buffer[1]
            if self._method == METHOD_NO_ACCEPTABLE:
                self._next("record-length", 2)
            elif self._method in (METHOD_EGRESS, METHOD_NO_AUTH):
                self._next("head", 4)
            else:
                raise HandshakeError(f"the proxy chose method 0x{self._method:02x}, not offered")
        elif step == "head":
            if buffer[0] != SOCKS_VERSION:
                raise HandshakeError(f"bad reply version 0x{buffer[0]:02x}")
            self._code = buffer[1]
            atyp = buffer[3]
            if atyp == ATYP_IPV4:
                self._next("bind", 4 + 2)
            elif atyp == ATYP_IPV6:
                self._next("bind", 16 + 2)
            elif atyp == ATYP_DOMAIN:
                self._next("bind-length", 1)
            else:
                raise HandshakeError(f"reply address type 0x{atyp:02x} unknown")
        elif step == "bind-length":
            self._next("bind", buffer[0] + 2)
        elif step == "bind":
            if self._code == 0 or self._method != METHOD_EGRESS:
                self._finish(None)
            else:
                self._next("record-length", 2)
        elif step == "record-length":
            length = int.from_bytes(buffer, "big")
            if not 0 < length <= MAX_RECORD_BYTES:
                raise HandshakeError(f"reason record of {length} bytes")
            self._next("record", length)
        elif step == "record":
            try:
                record = json.loads(buffer.decode("ascii"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise HandshakeError(f"unreadable reason record: {type(exc).__name__}") from None
            self._finish(_checked(record) if isinstance(record, dict) else None)

    def _next(self, step: str, want: int) -> None:
        self._step, self._buffer, self.want = step, b"", want

    def _finish(self, record: dict[str, Any] | None) -> Reply:
        self.want = 0
        self.reply = Reply(self._method, self._code, record)
        return self.reply


_TEXT_FIELDS: Final = ("reason", "decision", "app", "destination", "detail")
_SHOWN: Final = frozenset(range(0x20, 0x7F))


def _checked(record: dict[str, Any]) -> dict[str, Any]:
    """Only the fields the shim knows, in the shapes it expects: printable ASCII texts of at
    most 200 characters, a uid, a finite wait of at most an hour. Whatever answers on the
    proxy's port cannot put control sequences in an app's exception or an infinite sleep in
    its retry loop."""
    checked: dict[str, Any] = {}
    for key in _TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            checked[key] = "".join(c if ord(c) in _SHOWN else "?" for c in value[:200])
    uid = record.get("uid")
    if isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid < 2**32:
        checked["uid"] = uid
    wait = record.get("retry_after")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 3600:
        checked["retry_after"] = float(wait)
    return checked
