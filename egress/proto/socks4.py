"""SOCKS4 and SOCKS4a server handshake (CONNECT only), sans-I/O.

The protocol (NEC's "SOCKS: A protocol for TCP proxy across firewalls" and Ying-Da Lee's
"SOCKS 4A") has one request and one reply, no negotiation::

    request: VN=4  CD=1  DSTPORT(2)  DSTIP(4)  USERID...  NUL  [HOSTNAME...  NUL]
    reply:   VN=0  CD    DSTPORT(2)  DSTIP(4)

A DSTIP of ``0.0.0.x`` with ``x != 0`` is SOCKS4a: the host name follows the user id's NUL.
The user id is parsed (it has to be skipped) but means nothing here: identity is the kernel's
uid, and the id is kept out of ``repr`` and every error text so it never reaches a log.

Bytes go in with ``receive_data``; the one event comes out of ``next_event``; the reply comes
back as bytes from ``reply``. A typical driver::

    server = Socks4Server()
    while (event := server.next_event()) is NEED_DATA:
        server.receive_data(await read())          # b"" means EOF
    # decide, connect, then write(server.reply(reply_code(outcome)))

Reply codes come from the one outcome table: an outcome that gets a SOCKS5 reply gets a SOCKS4
one, ``0x5A`` for ``allowed`` and ``0x5B`` for everything else (SOCKS4 has no finer code; the
identd codes ``0x5C``/``0x5D`` are never sent). An outcome closed without a SOCKS5 reply is
closed without a SOCKS4 one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final, NoReturn

from egress.outcomes import OUTCOMES, Outcome
from egress.proto.socks5 import DOMAIN_BYTES, NEED_DATA, NeedData  # the same name rules

__all__ = [
    "CMD_BIND",
    "CMD_CONNECT",
    "MAX_HOST_NAME",
    "MAX_USER_ID",
    "NEED_DATA",
    "SOCKS4_GRANTED",
    "SOCKS4_REJECTED",
    "SOCKS_VERSION",
    "ConnectRequest",
    "NeedData",
    "Socks4ProtocolError",
    "Socks4Server",
    "reply_code",
]

SOCKS_VERSION: Final = 0x04
REPLY_VERSION: Final = 0x00

CMD_CONNECT: Final = 0x01
CMD_BIND: Final = 0x02

SOCKS4_GRANTED: Final = 0x5A
SOCKS4_REJECTED: Final = 0x5B  # "rejected or failed"
SOCKS4_NO_IDENTD: Final = 0x5C  # never sent: identity is the kernel's uid, not identd
SOCKS4_IDENTD_MISMATCH: Final = 0x5D  # never sent, likewise

# The protocol bounds neither field; these are the bounds of SOCKS5's (one length byte each),
# so a SOCKS4a name is never longer than a name a SOCKS5 client could ask for.
MAX_USER_ID: Final = 255
MAX_HOST_NAME: Final = 255
_HEADER: Final = 8  # VN CD DSTPORT DSTIP
# The smallest buffer that holds a plain SOCKS4 request with the longest user id.
MIN_BUFFER: Final = _HEADER + MAX_USER_ID + 1


class Socks4ProtocolError(ValueError):
    """The client broke the protocol.

    ``outcome`` is the row of the outcome table the driver counts and logs; ``reply_code`` is
    the reply to send before closing (always :data:`SOCKS4_REJECTED`), or ``None`` when the
    client is not speaking SOCKS4 at all or has gone: then the driver just closes. The message
    never contains the user id or the bytes of a bad name.
    """

    def __init__(self, message: str, *, outcome: Outcome, reply: bool) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.reply_code = reply_code(outcome) if reply else None


def reply_code(outcome: Outcome) -> int | None:
    """The SOCKS4 reply for ``outcome``, from the outcome table; ``None``: close, no reply."""
    if OUTCOMES[outcome].socks5 is None:
        return None
    return SOCKS4_GRANTED if outcome is Outcome.ALLOWED else SOCKS4_REJECTED


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT request.

    ``host`` is an address for SOCKS4 and, for SOCKS4a, the raw name as ASCII text, case
    preserved (canonicalisation and strict IP-literal parsing are the proxy's job, as for
    SOCKS5). ``user_id`` is whatever the client sent; it is not identity and stays out of
    ``repr``.
    """

    host: str | IPv4Address
    port: int
    user_id: bytes = field(repr=False)

    @property
    def socks4a(self) -> bool:
        return isinstance(self.host, str)


class _State(enum.Enum):
    REQUEST = enum.auto()  # reading the request
    REPLY = enum.auto()  # request parsed, waiting for the driver's reply()
    DONE = enum.auto()  # success reply sent; the connection is now a byte stream
    CLOSED = enum.auto()  # a refusal was sent or a protocol error raised; only close remains


class Socks4Server:
    """One client connection's SOCKS4/4a handshake, server side.

    Unparsed bytes never exceed ``max_buffer`` (the driver passes proxy.max_handshake_bytes);
    a request whose user id or name is longer than its bound is refused as soon as the bound
    is crossed, without waiting for a NUL. Protocol errors raise :class:`Socks4ProtocolError`
    and are final.
    """

    __slots__ = ("_buffer", "_eof", "_max_buffer", "_replied", "_silent", "_state")

    def __init__(self, *, max_buffer: int = 8192) -> None:
        if max_buffer < MIN_BUFFER:
            raise ValueError(f"max_buffer must hold a SOCKS4 request ({MIN_BUFFER} bytes)")
        self._buffer = bytearray()
        self._eof = False
        self._max_buffer = max_buffer
        self._state = _State.REQUEST
        self._replied = False
        # True after an error that gets no reply (not SOCKS4, or the client left).
        self._silent = False

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side.

        Raises :class:`Socks4ProtocolError` as soon as the unparsed bytes would exceed
        ``max_buffer``. A SOCKS4 client sends its whole request at once and then waits, so it
        is owed a reply (``0x5B``) whenever its first byte said SOCKS4.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() called after EOF")
        if len(self._buffer) + len(data) > self._max_buffer:
            first = self._buffer[0] if self._buffer else data[0]
            self._fail(
                "handshake exceeds buffer limit",
                reply=first == SOCKS_VERSION and self.may_reply,
            )
        self._buffer += data

    def next_event(self) -> ConnectRequest | NeedData:
        """Parse the request, or return :data:`NEED_DATA`.

        Raises :class:`RuntimeError` once the request is in: the driver must reply.
        """
        if self._state is not _State.REQUEST:
            raise RuntimeError(f"next_event() called in state {self._state.name}")
        event = self._parse_request()
        if event is NEED_DATA and self._eof:
            self._fail(
                "client closed the connection mid-handshake",
                reply=False,
                outcome=Outcome.CLIENT_CLOSED,
            )
        return event

    def trailing_data(self) -> bytes:
        """Take the bytes the client sent after its request (payload it pipelined early)."""
        if self._state not in (_State.REPLY, _State.DONE):
            raise RuntimeError("trailing_data() is only meaningful after the ConnectRequest")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # -- output --------------------------------------------------------------------------------

    @property
    def may_reply(self) -> bool:
        """Whether a reply may still be sent (none yet, and the client is owed one)."""
        return not self._replied and not self._silent and self._state is not _State.DONE

    def reply(self, code: int, bind: tuple[IPv4Address | IPv6Address, int] | None = None) -> bytes:
        """The one reply; returns the bytes to send.

        Any code but :data:`SOCKS4_GRANTED` ends the connection; a grant is only valid after a
        :class:`ConnectRequest` and turns the connection into a stream. ``bind`` is where the
        proxy connected from; clients ignore it for CONNECT, and an IPv6 one (which SOCKS4
        cannot carry) is sent as 0.0.0.0:0.
        """
        if not self.may_reply:
            raise RuntimeError("reply() is not valid in this state")
        if not 0 <= code <= 0xFF:
            raise ValueError(f"reply code out of range: {code}")
        if code == SOCKS4_GRANTED and self._state is not _State.REPLY:
            raise RuntimeError("a grant needs a ConnectRequest")
        address, port = bind if bind is not None else (IPv4Address(0), 0)
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"bind port out of range: {port}")
        if not isinstance(address, IPv4Address):
            address, port = IPv4Address(0), 0
        self._replied = True
        self._state = _State.DONE if code == SOCKS4_GRANTED else _State.CLOSED
        return bytes((REPLY_VERSION, code)) + port.to_bytes(2, "big") + address.packed

    # -- parsing -------------------------------------------------------------------------------

    def _parse_request(self) -> ConnectRequest | NeedData:
        buf = self._buffer
        n = len(buf)
        if not n:
            return NEED_DATA
        if buf[0] != SOCKS_VERSION:
            self._fail(f"not SOCKS4 (version byte 0x{buf[0]:02x})", reply=False)
        if n < 2:
            return NEED_DATA
        if buf[1] != CMD_CONNECT:
            self._fail(
                f"command 0x{buf[1]:02x} not supported",
                reply=True,
                outcome=Outcome.UNSUPPORTED_COMMAND,
            )
        if n < _HEADER:
            return NEED_DATA
        port = (buf[2] << 8) | buf[3]
        if port == 0:
            self._fail("destination port 0", reply=True)
        ip = bytes(buf[4:8])
        if ip == b"\x00\x00\x00\x00":
            self._fail("destination address 0.0.0.0", reply=True, outcome=Outcome.BAD_ADDRESS)
        user_end = buf.find(0, _HEADER, _HEADER + MAX_USER_ID + 1)
        if user_end < 0:
            if n > _HEADER + MAX_USER_ID:
                self._fail(f"user id longer than {MAX_USER_ID} bytes", reply=True)
            return NEED_DATA
        user_id = bytes(buf[_HEADER:user_end])
        host: str | IPv4Address
        if ip[:3] == b"\x00\x00\x00":  # SOCKS4a: 0.0.0.x, x != 0: a name follows
            start = user_end + 1
            name_end = buf.find(0, start, start + MAX_HOST_NAME + 1)
            if name_end < 0:
                if n > start + MAX_HOST_NAME:
                    self._fail(
                        f"host name longer than {MAX_HOST_NAME} bytes",
                        reply=True,
                        outcome=Outcome.BAD_ADDRESS,
                    )
                return NEED_DATA
            name = bytes(buf[start:name_end])
            if not name:
                self._fail("empty host name", reply=True, outcome=Outcome.BAD_ADDRESS)
            if name.translate(None, DOMAIN_BYTES):
                self._fail("host name has invalid bytes", reply=True, outcome=Outcome.BAD_ADDRESS)
            host = name.decode("ascii")
            end = name_end + 1
        else:
            host = IPv4Address(ip)
            end = user_end + 1
        del buf[:end]
        self._state = _State.REPLY
        return ConnectRequest(host, port, user_id)

    def _fail(
        self, message: str, *, reply: bool, outcome: Outcome = Outcome.BAD_REQUEST
    ) -> NoReturn:
        error = Socks4ProtocolError(message, outcome=outcome, reply=reply)
        self._silent = error.reply_code is None
        self._state = _State.CLOSED
        raise error
