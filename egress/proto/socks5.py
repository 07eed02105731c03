"""SOCKS5 server handshake (RFC 1928, CONNECT only) with RFC 1929 username/password, sans-I/O.

Bytes go in with ``receive_data``; events come out of ``next_event``; replies come back as bytes
from ``choose_method``, ``auth_reply`` and ``reply``. No I/O happens here, so the
driver decides timeouts and the tests can trickle bytes one at a time or fuzz the parser.

A typical driver::

    server = Socks5Server()
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            server.receive_data(await read())      # b"" means EOF
        elif isinstance(event, Greeting):
            write(server.choose_method(METHOD_NO_AUTH))
        elif isinstance(event, Credentials):
            write(server.auth_reply(ok=check(event)))
        elif isinstance(event, ConnectRequest):
            break                                  # decide, connect, then server.reply(...)
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final, NoReturn

from egress.outcomes import OUTCOMES, SOCKS5_SUCCEEDED, Outcome

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "METHOD_EGRESS",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "METHOD_USERNAME_PASSWORD",
    "NEED_DATA",
    "ConnectRequest",
    "Credentials",
    "Event",
    "Greeting",
    "NeedData",
    "Socks5ProtocolError",
    "Socks5Server",
    "refusal_record",
]

SOCKS_VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH: Final = 0x00
METHOD_USERNAME_PASSWORD: Final = 0x02
METHOD_NO_ACCEPTABLE: Final = 0xFF
# egress's private method (RFC 1928 keeps X'80'..X'FE' for private methods): no authentication,
# and every refusal is followed by a reason record (see refusal_record). The sandbox shim offers
# it; plain SOCKS5 clients never do, and never see a record after a reply.
METHOD_EGRESS: Final = 0xE5
_SUPPORTED_METHODS: Final = frozenset({METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD, METHOD_EGRESS})
MAX_RECORD_BYTES: Final = 8192  # what a client need ever read after a refusal
MAX_RECORD_TEXT: Final = 200

CMD_CONNECT: Final = 0x01

ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

# Bytes allowed in a DOMAINNAME: visible ASCII only. Anything else (NUL, controls, space, DEL,
# 8-bit) has no business in a host name and would only reach logs or the resolver as a trick.
DOMAIN_BYTES: Final = bytes(range(0x21, 0x7F))


class NeedData(enum.Enum):
    """Sentinel type: the parser needs more bytes before it can produce the next event.

    An enum so that ``event is NEED_DATA`` narrows the type for mypy.
    """

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class Socks5ProtocolError(ValueError):
    """The client broke the protocol.

    ``outcome`` is the row of the outcome table the driver counts and logs. ``reply_code`` is the
    RFC 1928 reply (the outcome's, from the table) the driver should send with
    :meth:`Socks5Server.reply` before closing, or ``None`` when no reply fits (wrong version,
    garbage greeting, bad auth sub-negotiation, or a request not yet complete): then the driver
    just closes. The message never contains client secrets.
    """

    def __init__(self, message: str, *, outcome: Outcome, reply: bool) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.reply_code = OUTCOMES[outcome].socks5 if reply else None


@dataclass(frozen=True, slots=True)
class Greeting:
    """The client's method selection message: which authentication methods it offers."""

    methods: frozenset[int]


@dataclass(frozen=True, slots=True)
class Credentials:
    """RFC 1929 username/password. The password stays out of ``repr`` so it never reaches logs."""

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT request.

    ``host`` is an address object for IPv4/IPv6 requests and, for DOMAINNAME requests, the raw
    name as ASCII text, case preserved: canonicalisation (and strict IP-literal parsing of names
    such as ``"127.1"``) is the proxy's job, in one place, for every protocol.
    """

    host: str | IPv4Address | IPv6Address
    port: int
    address_type: int


Event = Greeting | Credentials | ConnectRequest


class _State(enum.Enum):
    GREETING = enum.auto()  # reading VER NMETHODS METHODS
    CHOOSE_METHOD = enum.auto()  # waiting for the driver's choose_method()
    AUTH = enum.auto()  # reading the RFC 1929 request
    AUTH_REPLY = enum.auto()  # waiting for the driver's auth_reply()
    REQUEST = enum.auto()  # reading VER CMD RSV ATYP DST.ADDR DST.PORT
    REPLY = enum.auto()  # waiting for the driver's reply()
    DONE = enum.auto()  # success reply sent; the connection is now a byte stream
    CLOSED = enum.auto()  # a refusal was sent or a protocol error raised; only close remains


class Socks5Server:
    """One client connection's SOCKS5 handshake, server side.

    Every input is bounded: unparsed bytes never exceed ``max_buffer`` (the longest legal
    handshake message is 513 bytes, a full username/password, which a buffer of 512 refuses as
    oversized; the rest of the room is for payload a client pipelines after its request).
    Protocol errors raise :class:`Socks5ProtocolError` and are final.
    """

    __slots__ = (
        "_buffer",
        "_eof",
        "_max_buffer",
        "_methods",
        "_replied_in_request_phase",
        "_request_phase",
        "_state",
    )

    def __init__(self, *, max_buffer: int = 8192) -> None:
        if max_buffer < 512:  # proxy.max_handshake_bytes' own minimum
            raise ValueError("max_buffer must be at least 512 bytes")
        self._buffer = bytearray()
        self._eof = False
        self._max_buffer = max_buffer
        self._methods: frozenset[int] = frozenset()
        self._state = _State.GREETING
        # True once the client may be sent a final reply (after authentication, if any).
        self._request_phase = False
        self._replied_in_request_phase = False

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side.

        Raises :class:`Socks5ProtocolError` as soon as the unparsed bytes would exceed
        ``max_buffer``, so a client can never make us hold more than that. Drivers should read
        at most ``max_buffer`` bytes at a time during the handshake and feed them before the
        next read, so a client that pipelines its payload is not refused for it.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() called after EOF")
        if len(self._buffer) + len(data) > self._max_buffer:
            self._fail("handshake exceeds buffer limit", reply=self._may_reply())
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        """Parse the next handshake message, or return :data:`NEED_DATA`.

        Raises :class:`RuntimeError` when the driver must act first (answer a :class:`Greeting`
        or :class:`Credentials`, or send the final reply): returning ``NEED_DATA`` there would
        make the driver wait for bytes that a well-behaved client will never send.
        """
        state = self._state
        if state is _State.GREETING:
            event: Event | NeedData = self._parse_greeting()
        elif state is _State.AUTH:
            event = self._parse_auth()
        elif state is _State.REQUEST:
            event = self._parse_request()
        else:
            raise RuntimeError(f"next_event() called in state {state.name}: the driver must act")
        if event is NEED_DATA and self._eof:
            self._fail(
                "client closed the connection mid-handshake",
                reply=False,
                outcome=Outcome.CLIENT_CLOSED,
            )
        return event

    def trailing_data(self) -> bytes:
        """Take the bytes the client sent after its request (payload it pipelined early).

        The driver forwards them upstream once connected. Calling it again returns only what
        arrived since the previous call.
        """
        if self._state not in (_State.REPLY, _State.DONE):
            raise RuntimeError("trailing_data() is only meaningful after the ConnectRequest")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # -- output --------------------------------------------------------------------------------

    def choose_method(self, method: int) -> bytes:
        """Answer the greeting; returns the bytes to send.

        ``METHOD_NO_ACCEPTABLE`` (0xFF) always works and ends the handshake: send the bytes,
        then close. Any other method must have been offered by the client and be one this
        machine can run (no-auth or username/password); otherwise it is a driver bug and
        :class:`ValueError` is raised.
        """
        self._expect(_State.CHOOSE_METHOD, "choose_method")
        if method == METHOD_NO_ACCEPTABLE:
            self._state = _State.CLOSED
        elif method not in _SUPPORTED_METHODS:
            raise ValueError(f"method 0x{method:02x} is not implemented")
        elif method not in self._methods:
            raise ValueError(f"method 0x{method:02x} was not offered by the client")
        elif method == METHOD_USERNAME_PASSWORD:
            self._state = _State.AUTH
        else:  # no authentication: METHOD_NO_AUTH or METHOD_EGRESS
            self._enter_request_phase()
        return bytes((SOCKS_VERSION, method))

    def auth_reply(self, *, ok: bool) -> bytes:
        """Answer the credentials; on failure send the bytes and close (RFC 1929)."""
        self._expect(_State.AUTH_REPLY, "auth_reply")
        if ok:
            self._enter_request_phase()
            return b"\x01\x00"
        self._state = _State.CLOSED
        return b"\x01\x01"

    def reply(
        self,
        code: int,
        bind: tuple[IPv4Address | IPv6Address, int] | None = None,
    ) -> bytes:
        """The final reply; returns the bytes to send.

        Allowed once the client is past authentication: after a :class:`ConnectRequest`, while
        still waiting for it (e.g. handshake timeout), or after a protocol error that carried a
        ``reply_code``. ``bind`` is the address the proxy connected from (0.0.0.0:0 when unset,
        which clients accept). Any code but ``SOCKS5_SUCCEEDED`` ends the connection; success
        is only valid after a :class:`ConnectRequest` and turns the connection into a stream.
        """
        if not self._request_phase or self._replied_in_request_phase:
            raise RuntimeError("reply() is not valid in this state")
        if not 0 <= code <= 0xFF:
            raise ValueError(f"reply code out of range: {code}")
        if code == SOCKS5_SUCCEEDED and self._state is not _State.REPLY:
            raise RuntimeError("a success reply needs a ConnectRequest")
        address, port = bind if bind is not None else (IPv4Address(0), 0)
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"bind port out of range: {port}")
        atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
        self._replied_in_request_phase = True
        self._state = _State.DONE if code == SOCKS5_SUCCEEDED else _State.CLOSED
        return bytes((SOCKS_VERSION, code, 0x00, atyp)) + address.packed + port.to_bytes(2, "big")

    # -- parsing -------------------------------------------------------------------------------

    def _parse_greeting(self) -> Greeting | NeedData:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] != SOCKS_VERSION:
            self._fail(f"not SOCKS5 (version byte 0x{buf[0]:02x})", reply=False)
        if len(buf) < 2:
            return NEED_DATA
        nmethods = buf[1]
        if nmethods == 0:
            self._fail("greeting offers no authentication method", reply=False)
        end = 2 + nmethods
        if len(buf) < end:
            return NEED_DATA
        methods = frozenset(buf[2:end])
        del buf[:end]
        self._methods = methods
        self._state = _State.CHOOSE_METHOD
        return Greeting(methods)

    def _parse_auth(self) -> Credentials | NeedData:
        # RFC 1929: VER ULEN UNAME PLEN PASSWD. Empty names/passwords are passed on (some
        # clients send an empty password); whether they are acceptable is the policy's call.
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] != AUTH_VERSION:
            self._fail(f"bad username/password version 0x{buf[0]:02x}", reply=False)
        if len(buf) < 2:
            return NEED_DATA
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return NEED_DATA
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return NEED_DATA
        event = Credentials(bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end]))
        del buf[:end]
        self._state = _State.AUTH_REPLY
        return event

    def _parse_request(self) -> ConnectRequest | NeedData:
        buf = self._buffer
        n = len(buf)
        if n < 4:
            # Check what has arrived so a bad version fails before the client trickles more.
            if n and buf[0] != SOCKS_VERSION:
                self._fail(f"bad request version 0x{buf[0]:02x}", reply=False)
            return NEED_DATA
        if buf[0] != SOCKS_VERSION:
            self._fail(f"bad request version 0x{buf[0]:02x}", reply=False)
        cmd, rsv, atyp = buf[1], buf[2], buf[3]
        if cmd != CMD_CONNECT:
            self._fail(
                f"command 0x{cmd:02x} not supported",
                reply=True,
                outcome=Outcome.UNSUPPORTED_COMMAND,
            )
        if rsv != 0x00:
            self._fail("reserved byte is not zero", reply=True)
        host: str | IPv4Address | IPv6Address
        if atyp == ATYP_IPV4:
            end = 10
            if n < end:
                return NEED_DATA
            host = IPv4Address(bytes(buf[4:8]))
        elif atyp == ATYP_IPV6:
            end = 22
            if n < end:
                return NEED_DATA
            host = IPv6Address(bytes(buf[4:20]))
        elif atyp == ATYP_DOMAIN:
            if n < 5:
                return NEED_DATA
            length = buf[4]
            if length == 0:
                self._fail("empty domain name", reply=True, outcome=Outcome.BAD_ADDRESS)
            end = 5 + length + 2
            if n < end:
                return NEED_DATA
            name = bytes(buf[5 : 5 + length])
            if name.translate(None, DOMAIN_BYTES):
                self._fail("domain name has invalid bytes", reply=True, outcome=Outcome.BAD_ADDRESS)
            host = name.decode("ascii")
        else:
            self._fail(
                f"address type 0x{atyp:02x} not supported", reply=True, outcome=Outcome.BAD_ADDRESS
            )
        port = (buf[end - 2] << 8) | buf[end - 1]
        if port == 0:
            self._fail("destination port 0", reply=True)
        del buf[:end]
        self._state = _State.REPLY
        return ConnectRequest(host, port, atyp)

    # -- helpers -------------------------------------------------------------------------------

    def _enter_request_phase(self) -> None:
        self._state = _State.REQUEST
        self._request_phase = True

    def _may_reply(self) -> bool:
        # A final reply only makes sense once the client is waiting for one.
        return self._request_phase and not self._replied_in_request_phase

    def _expect(self, state: _State, method: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"{method}() called in state {self._state.name}")

    def _fail(
        self, message: str, *, reply: bool, outcome: Outcome = Outcome.BAD_REQUEST
    ) -> NoReturn:
        self._state = _State.CLOSED
        raise Socks5ProtocolError(message, outcome=outcome, reply=reply)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_RECORD_TEXT else text[: MAX_RECORD_TEXT - 3] + "..."


def refusal_record(fields: Mapping[str, str | int | float | None]) -> bytes:
    """The reason record that follows a refusal under :data:`METHOD_EGRESS`.

    Two bytes of length (big-endian), then that many bytes of a JSON object, ASCII only.
    Every text is cut to :data:`MAX_RECORD_TEXT` characters first, so even a text that is all
    escapes (six bytes a character) keeps the record under :data:`MAX_RECORD_BYTES`.
    """
    shown = {k: _cut(v) if isinstance(v, str) else v for k, v in fields.items()}
    body = json.dumps(shown, separators=(",", ":")).encode("ascii")
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"reason record of {len(body)} bytes: too many fields")
    return len(body).to_bytes(2, "big") + body
