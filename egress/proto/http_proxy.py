"""HTTP/1.1 forward-proxy requests (CONNECT and absolute-form plain HTTP), sans-I/O, over h11.

h11 owns all HTTP syntax and body framing, on both sides of a plain-HTTP exchange: this module
only decides what a proxy request means (target, credentials, which headers are hop-by-hop) and
re-frames messages through h11 connections, so no byte of framing is ever copied by hand. That is
what keeps request smuggling out: a body is always decoded by one h11 connection and re-encoded
by another.

One client connection carries one request: the response always says ``Connection: close``.

The one exception to "h11 parses everything" is a fast path for the common CONNECT head
(``CONNECT host:port HTTP/1.1``, CRLF line ends, plain header lines, one Host): it accepts only a
strict subset of what h11 accepts and produces exactly what h11 would. Anything outside that
subset -- every other method, bare LF, obs-fold, obs-text or control bytes, Content-Length or
Transfer-Encoding, a missing or repeated Host, an incomplete head past the size limit, EOF -- is
handed to h11 with every byte received so far, so the answer (event or error) is h11's. h11 costs
some 160 Python calls per request; the fast path a few regex matches.
"""

from __future__ import annotations

import binascii
import enum
import re
import string
from base64 import b64decode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from ipaddress import IPv6Address
from typing import Final, NoReturn

import h11

from egress.outcomes import Outcome
from egress.proto.socks5 import NEED_DATA, NeedData

__all__ = [
    "NEED_DATA",
    "ConnectRequest",
    "ForwardRequest",
    "HttpForwardExchange",
    "HttpProxyError",
    "HttpProxyParser",
    "NeedData",
    "render_connect_ok",
    "render_error",
]

# Connection-specific headers (RFC 9110 section 7.6.1, plus the de-facto Proxy-Connection and
# the proxy credentials, which are for us and must never travel on). Transfer-Encoding is here
# because h11 decodes the body on one side and re-chooses the framing on the other.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A client (or upstream) naming these in Connection must not make us drop the framing or the
# authority: that would desynchronise the two sides.
_NEVER_NOMINATED: Final = frozenset({b"content-length", b"host"})

# TRACE echoes the request back, which lets scripts read headers they should not see (XST).
_REFUSED_METHODS: Final = frozenset({b"TRACE", b"TRACK"})

# Host names: letters, digits, '-', '.', '_'. RFC 3986 reg-name also allows pct-encoding and
# sub-delims, but no DNS name contains them and they only give tricks a way in. Once per request.
_REG_NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-._")
_SF_STRING_OK: Final = frozenset(chr(c) for c in range(0x20, 0x7F))

# The CONNECT fast path (see the module docstring). Each pattern matches a strict subset of its
# h11 counterpart (h11/_abnf.py): the request line with the method fixed to CONNECT and the
# version to 1.1 or 1.0; a header line with field values narrowed from h11's ``[^\x00\s]``
# (which lets obs-text and control bytes through) to visible ASCII. On any line they both match,
# the groups are the same, so the fast path sees the same target, names and values as h11.
_FAST_PREFIX: Final = b"CONNECT "
_FAST_REQUEST_LINE: Final = re.compile(rb"CONNECT ([\x21-\x7e]+) HTTP/1\.([01])")
_FAST_HEADER_LINE: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*"
)
# Headers h11 validates or frames by (errors 400/501 of its own): left to h11.
_FAST_FALLBACK_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})


class HttpProxyError(ValueError):
    """A request (or, for :class:`HttpForwardExchange`, an upstream response) we cannot serve.

    ``outcome`` is the row of the outcome table to count and log (``bad_request`` unless said
    otherwise). ``status`` is the HTTP status to answer with: the outcome's, made more precise
    where HTTP has a better word for it (431 for a head too large, h11's 501 for a transfer
    coding other than chunked and 505 for an HTTP version it does not speak). ``reason`` is a
    one-line text safe to show the client and to log (no credentials).
    """

    def __init__(self, status: int, reason: str, *, outcome: Outcome = Outcome.BAD_REQUEST) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """``CONNECT host:port``: ``host`` is raw text (case kept, IPv6 brackets stripped).

    Canonicalising the host and deciding whether it is an IP literal is the proxy's job, done
    once for every protocol.
    """

    host: str
    port: int
    proxy_authorization: tuple[str, str] | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """An absolute-form plain-HTTP request (``GET http://host/path HTTP/1.1``).

    ``target_path`` is the origin-form target to send upstream (path and query). ``headers``
    are the end-to-end headers to send upstream: hop-by-hop ones removed and ``Host`` rewritten
    to the URL's authority (the URL wins over a disagreeing Host, RFC 9112 section 3.2.2).
    """

    method: str
    scheme: str
    host: str
    port: int
    target_path: str
    headers: list[tuple[bytes, bytes]]
    proxy_authorization: tuple[str, str] | None = field(repr=False)


class _Phase(enum.Enum):
    HEAD = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


class HttpProxyParser:
    """Reads one proxy request from a client connection.

    ``max_header_bytes`` bounds the request head, whether it trickles in or arrives in one
    read (h11 alone only bounds the incomplete case). Protocol errors raise
    :class:`HttpProxyError`; the driver answers with :func:`render_error` and closes.

    A plain CONNECT head is parsed by a strict fast path; everything else by h11, which is
    then given every byte received so far (see the module docstring).
    """

    __slots__ = (
        "_buffer",
        "_chunked",
        "_closed",
        "_conn",
        "_max_header_bytes",
        "_phase",
        "_received",
        "_scanned",
    )

    def __init__(self, *, max_header_bytes: int = 8192) -> None:
        # The fast path's bytes; None once h11 owns the input (then _conn is set).
        self._buffer: bytearray | None = bytearray()
        self._scanned = 0  # how much of _buffer is known to hold no end of head
        self._closed = False
        self._conn: h11.Connection | None = None
        self._max_header_bytes = max_header_bytes
        self._received = 0
        self._phase = _Phase.HEAD
        self._chunked = False

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        self._received += len(data)
        buffer = self._buffer
        if buffer is None:
            assert self._conn is not None
            self._conn.receive_data(data)
        elif not data:
            self._closed = True
        elif self._closed:
            raise RuntimeError("received close, then received more data?")  # as h11 does
        else:
            buffer += data

    def next_event(self) -> ConnectRequest | ForwardRequest | NeedData:
        """Return the request once its head is complete, else :data:`NEED_DATA`."""
        if self._phase is not _Phase.HEAD:
            raise RuntimeError("the request was already parsed (or failed)")
        try:
            if self._buffer is not None:
                fast = self._fast_connect()
                if fast is not None:
                    if fast is not NEED_DATA:
                        self._phase = _Phase.DONE
                    return fast
            conn = self._conn
            assert conn is not None
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.ConnectionClosed):
                self._fail(400, "client closed the connection before sending a request")
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees this
                self._fail(400, "unexpected message")
            # Bytes of the head = all received minus what h11 still buffers (body, pipelining).
            head_size = self._received - len(conn.trailing_data[0])
            if head_size > self._max_header_bytes:
                self._fail(431, "request header fields too large")
            if event.method == b"CONNECT":
                result: ConnectRequest | ForwardRequest = self._connect(event)
            else:
                result = self._forward(event)
        except HttpProxyError:
            self._phase = _Phase.FAILED
            raise
        except h11.RemoteProtocolError as exc:
            self._phase = _Phase.FAILED
            status = exc.error_status_hint
            reason = "request header fields too large" if status == 431 else _one_line(str(exc))
            raise HttpProxyError(status, reason) from None
        self._phase = _Phase.DONE
        return result

    def trailing_data(self) -> bytes:
        """Bytes after a CONNECT request head (e.g. an early TLS ClientHello) to send upstream
        (all of them, as h11 reports them; a driver done with the parser drops it)."""
        if self._buffer is not None:
            return bytes(self._buffer)
        assert self._conn is not None
        data, _closed = self._conn.trailing_data
        return data

    def _fast_connect(self) -> ConnectRequest | NeedData | None:
        """The strict CONNECT fast path: the request, NEED_DATA, or None once h11 has taken over.

        Falls back whenever h11 might answer differently: it then sees exactly the bytes (and
        the EOF) it would have seen without the fast path, at the same ``next_event`` call.
        """
        buffer = self._buffer
        assert buffer is not None
        # Search only what arrived since the last call (and the 3 bytes before), so a head
        # trickled byte by byte costs O(n), not O(n^2).
        start = max(0, self._scanned - 3)
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if (
                not self._closed
                # h11 raises 431 for an incomplete head past the limit
                and len(buffer) <= self._max_header_bytes
                # h11 rejects early what cannot be a request line; not ours anyway
                and _FAST_PREFIX.startswith(buffer[:8])
                # h11 also ends a head at a bare-LF blank line
                and buffer.find(b"\n\n", start) < 0
                and buffer.find(b"\n\r\n", start) < 0
            ):
                self._scanned = len(buffer)
                return NEED_DATA
            self._fall_back()
            return None
        lines = buffer[:end].split(b"\r\n")
        # A bare CR or LF left inside a line fails these patterns (neither allows CR or LF), so
        # the head here ends where h11's does (its first b"\n\r?\n").
        request_line = _FAST_REQUEST_LINE.fullmatch(lines[0])
        if request_line is None:
            self._fall_back()
            return None
        hosts = 0
        credentials: list[bytes] = []
        for line in lines[1:]:
            header = _FAST_HEADER_LINE.fullmatch(line)
            if header is None:  # obs-fold, obs-text, controls, space before ':' ...
                self._fall_back()
                return None
            name = header[1].lower()
            if name == b"host":
                hosts += 1
            elif name == b"proxy-authorization":
                credentials.append(header[2])
            elif name in _FAST_FALLBACK_HEADERS:
                self._fall_back()
                return None
        # h11: HTTP/1.1 needs exactly one Host; no version may have two.
        if hosts != 1 and not (hosts == 0 and request_line[2] == b"0"):
            self._fall_back()
            return None
        # From here on the h11 path's checks, in its order; h11 would hold the rest as trailing.
        del buffer[: end + 4]
        if end + 4 > self._max_header_bytes:
            self._fail(431, "request header fields too large")
        host, port = _split_authority(request_line[1].decode("ascii"), default_port=None)
        return ConnectRequest(host, port, _basic_credentials(credentials))

    def _fall_back(self) -> None:
        """Hand the input to h11: every byte so far, then the EOF if there was one.

        (Tests call it on a fresh parser to get the pure-h11 reference.)"""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        buffer, self._buffer = self._buffer, None
        if buffer:
            conn.receive_data(bytes(buffer))
        if self._closed:
            conn.receive_data(b"")
        self._conn = conn

    def _connect(self, request: h11.Request) -> ConnectRequest:
        headers = request.headers
        if _has_header(headers, b"content-length") or _has_header(headers, b"transfer-encoding"):
            # A CONNECT body has no meaning; h11 would eat tunnel bytes as one.
            self._fail(400, "CONNECT request with a body")
        host, port = _split_authority(request.target.decode("ascii"), default_port=None)
        auth = _proxy_authorization(headers)
        assert self._conn is not None
        end = self._conn.next_event()  # Content-Length 0 framing: available at once
        if not isinstance(end, h11.EndOfMessage):  # pragma: no cover - h11 guarantees this
            self._fail(400, "unexpected CONNECT framing")
        return ConnectRequest(host, port, auth)

    def _forward(self, request: h11.Request) -> ForwardRequest:
        if request.method in _REFUSED_METHODS:
            self._phase = _Phase.FAILED
            raise HttpProxyError(
                405,
                f"method {request.method.decode('ascii')} not allowed",
                outcome=Outcome.UNSUPPORTED_COMMAND,
            )
        target = request.target.decode("ascii")
        scheme_end = target.find("://")
        if scheme_end < 0:
            self._fail(400, "not a proxy request (origin-form target)")
        scheme = target[:scheme_end].lower()
        if scheme == "https":
            self._fail(400, "https URLs need CONNECT")
        if scheme != "http":
            self._fail(400, "only http URLs can be forwarded")
        rest = target[scheme_end + 3 :]
        rest = rest.split("#", 1)[0]  # a fragment is never sent upstream
        cut = len(rest)
        for sep in "/?":
            pos = rest.find(sep)
            if 0 <= pos < cut:
                cut = pos
        authority, path = rest[:cut], rest[cut:]
        if not path.startswith("/"):
            path = "/" + path
        host, port = _split_authority(authority, default_port=80)

        headers = request.headers
        if _has_header(headers, b"content-length") and _has_header(headers, b"transfer-encoding"):
            self._fail(400, "both Content-Length and Transfer-Encoding")
        self._chunked = _has_header(headers, b"transfer-encoding")
        auth = _proxy_authorization(headers)
        end_to_end = _strip_hop_by_hop(headers.raw_items(), drop=(b"host",))
        end_to_end.insert(0, (b"Host", authority.encode("ascii")))
        return ForwardRequest(
            method=request.method.decode("ascii"),
            scheme=scheme,
            host=host,
            port=port,
            target_path=path,
            headers=end_to_end,
            proxy_authorization=auth,
        )

    def _fail(self, status: int, reason: str) -> NoReturn:
        self._phase = _Phase.FAILED
        raise HttpProxyError(status, reason)


class HttpForwardExchange:
    """Relays one plain-HTTP request/response pair between client and upstream, sans-I/O.

    Two h11 connections do all the framing: ``parser``'s server connection decodes the
    client's request body, an h11 client connection encodes it upstream and decodes the
    upstream response, and the server connection encodes that response for the client. The
    driver moves bytes::

        upstream.write(exchange.start())
        # then, as bytes arrive (b"" / upstream_eof() on EOF):
        upstream.write(exchange.client_data(data))
        client.write(exchange.upstream_data(data))
        # until exchange.done, then close both.

    On :class:`HttpProxyError` (status 502 for a bad upstream response) the driver sends
    :func:`render_error` if ``response_started`` is still false, and closes either way.
    """

    __slots__ = (
        "_client",
        "_done",
        "_parser",
        "_request",
        "_request_done",
        "_responded",
        "_started",
        "_up",
    )

    def __init__(self, request: ForwardRequest, parser: HttpProxyParser) -> None:
        if parser._phase is not _Phase.DONE:
            raise RuntimeError("the parser has not produced this request")
        self._request = request
        self._parser = parser
        assert parser._conn is not None  # a ForwardRequest always comes from h11
        self._client = parser._conn
        self._up = h11.Connection(h11.CLIENT)
        self._started = False
        self._request_done = False
        self._responded = False
        self._done = False

    @property
    def done(self) -> bool:
        """The whole response has been produced: write the last bytes, then close."""
        return self._done

    @property
    def response_started(self) -> bool:
        """Response bytes have been produced, so an error reply can no longer be sent."""
        return self._responded

    def start(self) -> bytes:
        """The request head for the upstream, plus any body bytes the client already sent."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        headers = list(self._request.headers)
        headers.append((b"Connection", b"close"))
        if self._parser._chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        out = self._send_up(
            h11.Request(
                method=self._request.method, target=self._request.target_path, headers=headers
            )
        )
        return out + self._pump_client()

    def client_data(self, data: bytes) -> bytes:
        """Feed client bytes (``b""`` = client EOF); returns bytes for the upstream."""
        if self._request_done or self._done:
            return b""  # one request per connection: anything after it is ignored
        self._client.receive_data(data)
        return self._pump_client()

    def upstream_data(self, data: bytes) -> bytes:
        """Feed upstream bytes; returns bytes for the client."""
        if self._done:
            return b""
        self._up.receive_data(data)
        return self._pump_upstream()

    def upstream_eof(self) -> bytes:
        """The upstream closed: completes a close-delimited body, or raises 502."""
        return self.upstream_data(b"") if not self._done else b""

    def _pump_client(self) -> bytes:
        out = bytearray()
        while not self._request_done:
            try:
                event = self._client.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpProxyError(400, _one_line(str(exc))) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Data):
                out += self._send_up(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                out += self._send_up(h11.EndOfMessage())
                self._request_done = True
            else:  # ConnectionClosed mid-body is a RemoteProtocolError in h11, so: unreachable
                raise HttpProxyError(400, "unexpected client event")
        return bytes(out)

    def _pump_upstream(self) -> bytes:
        out = bytearray()
        client = self._client
        while not self._done:
            try:
                event = self._up.next_event()
            except h11.RemoteProtocolError as exc:
                raise _upstream_error("bad upstream response: " + _one_line(str(exc))) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            self._responded = True
            try:
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        raise _upstream_error("upstream switched protocols")
                    headers = _strip_hop_by_hop(event.headers.raw_items())
                    out += client.send(
                        h11.InformationalResponse(
                            status_code=event.status_code, headers=headers, reason=event.reason
                        )
                    )
                elif isinstance(event, h11.Response):
                    headers = _strip_hop_by_hop(event.headers.raw_items())
                    if _has_header(event.headers, b"transfer-encoding"):
                        # The body length is the chunking's, not a stale Content-Length's.
                        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
                    headers.append((b"Connection", b"close"))
                    out += client.send(
                        h11.Response(
                            status_code=event.status_code, headers=headers, reason=event.reason
                        )
                    )
                elif isinstance(event, h11.Data):
                    out += client.send(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    out += client.send(h11.EndOfMessage())
                    self._done = True
                else:
                    raise _upstream_error("upstream closed without a complete response")
            except h11.LocalProtocolError as exc:
                raise _upstream_error("bad upstream response: " + _one_line(str(exc))) from None
        return bytes(out)

    def _send_up(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> bytes:
        try:
            data = self._up.send(event)
        except h11.LocalProtocolError as exc:
            raise HttpProxyError(400, _one_line(str(exc))) from None
        assert data is not None  # only ConnectionClosed yields None
        return data


def render_error(
    status: int,
    reason_text: str,
    *,
    proxy_status: str | None,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A complete ``Connection: close`` error response with a one-line text/plain body.

    ``proxy_status`` is the RFC 9209 error type (from the outcome table); when given, a
    ``Proxy-Status`` header carries it with the reason as ``details``. ``extra_headers`` come from
    the outcome table too (``Proxy-Authenticate``, ``Retry-After``).
    """
    text = _one_line(reason_text)
    body = (text + "\n").encode("utf-8")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    headers: list[tuple[str, str]] = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if proxy_status is not None:
        headers.append(
            ("Proxy-Status", f"egress; error={proxy_status}; details={_sf_string(text)}")
        )
    headers.extend(extra_headers)
    lines = [f"HTTP/1.1 {status} {phrase}"]
    for name, value in headers:
        if not name or any(c in name for c in ":\r\n\0 \t") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def render_connect_ok() -> bytes:
    """The reply that turns a CONNECT into a tunnel (sent only after the upstream connected)."""
    return b"HTTP/1.1 200 Connection established\r\n\r\n"


# -- helpers ---------------------------------------------------------------------------------


def _fail(status: int, reason: str) -> NoReturn:
    raise HttpProxyError(status, reason)


def _upstream_error(reason: str) -> HttpProxyError:
    return HttpProxyError(502, reason, outcome=Outcome.UPSTREAM_PROTOCOL_ERROR)


def _one_line(text: str, limit: int = 200) -> str:
    """Printable, single-line, bounded: reasons may echo client input."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned[:limit]


def _sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII only, with ``"`` and ``\\`` escaped."""
    chars = (c if c in _SF_STRING_OK else "?" for c in text)
    return '"' + "".join(chars).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _has_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(n == name for n, _ in headers)


def _split_authority(authority: str, *, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host without brackets, port). Raises 400."""
    if "@" in authority:
        _fail(400, "userinfo in the request target")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            _fail(400, "unterminated IPv6 literal")
        host, after = authority[1:close], authority[close + 1 :]
        try:
            IPv6Address(host)  # brackets promise an IPv6 literal; nothing else fits in them
        except ValueError:
            _fail(400, "invalid IPv6 literal")
        if after and not after.startswith(":"):
            _fail(400, "invalid authority")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text_raw = authority.partition(":")
        port_text = port_text_raw if colon else None
        if not host:
            _fail(400, "missing host")
        if not _REG_NAME_CHARS.issuperset(host):
            _fail(400, "invalid host")
    if not port_text:  # absent, or empty after ':' (RFC 3986: the scheme's default)
        if default_port is None:
            _fail(400, "missing port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        _fail(400, "invalid port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        _fail(400, "invalid port")
    return host, port


def _proxy_authorization(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    """Decode ``Proxy-Authorization: Basic``; ``None`` when absent or another scheme.

    Other schemes count as absent (the policy then answers 407 with a Basic challenge) rather
    than as an error, since a client may legitimately try its preferred scheme first.
    """
    return _basic_credentials([v for n, v in headers if n == b"proxy-authorization"])


def _basic_credentials(values: Sequence[bytes]) -> tuple[str, str] | None:
    """The Proxy-Authorization values of a request (h11-normalised) -> Basic credentials."""
    if not values:
        return None
    if len(values) > 1:
        _fail(400, "multiple Proxy-Authorization headers")
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        _fail(400, "malformed Proxy-Authorization")
    user, colon, password = decoded.partition(":")
    if not colon:
        _fail(400, "malformed Proxy-Authorization")
    return user, password


def _strip_hop_by_hop(
    raw: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()
) -> list[tuple[bytes, bytes]]:
    """Remove connection-specific headers, including any named in ``Connection``."""
    items = list(raw)
    nominated = set(drop)
    for name, value in items:
        if name.lower() == b"connection":
            for raw_token in value.split(b","):
                token = raw_token.strip().lower()
                if token and token not in _NEVER_NOMINATED:
                    nominated.add(token)
    return [
        (name, value)
        for name, value in items
        if (lowered := name.lower()) not in _HOP_BY_HOP and lowered not in nominated
    ]
