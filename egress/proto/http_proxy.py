"""HTTP/1.1 forward-proxy requests (CONNECT and absolute-form plain HTTP), sans-I/O, over h11.

h11 owns all HTTP syntax and body framing, on both sides of a plain-HTTP exchange: this module
only decides what a proxy request means (target, credentials, which headers are hop-by-hop) and
re-frames messages through h11 connections, so no byte of framing is ever copied by hand. That is
what keeps request smuggling out: a body is always decoded by one h11 connection and re-encoded
by another.

One client connection carries one request: the response always says ``Connection: close``.
"""

from __future__ import annotations

import binascii
import enum
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
    """

    __slots__ = ("_chunked", "_conn", "_max_header_bytes", "_phase", "_received")

    def __init__(self, *, max_header_bytes: int = 8192) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._max_header_bytes = max_header_bytes
        self._received = 0
        self._phase = _Phase.HEAD
        self._chunked = False

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        self._received += len(data)
        self._conn.receive_data(data)

    def next_event(self) -> ConnectRequest | ForwardRequest | NeedData:
        """Return the request once its head is complete, else :data:`NEED_DATA`."""
        if self._phase is not _Phase.HEAD:
            raise RuntimeError("the request was already parsed (or failed)")
        try:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.ConnectionClosed):
                self._fail(400, "client closed the connection before sending a request")
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees this
                self._fail(400, "unexpected message")
            # Bytes of the head = all received minus what h11 still buffers (body, pipelining).
            head_size = self._received - len(self._conn.trailing_data[0])
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
        """Bytes after a CONNECT request head (e.g. an early TLS ClientHello) to send upstream."""
        data, _closed = self._conn.trailing_data
        return data

    def _connect(self, request: h11.Request) -> ConnectRequest:
        headers = request.headers
        if _has_header(headers, b"content-length") or _has_header(headers, b"transfer-encoding"):
            # A CONNECT body has no meaning; h11 would eat tunnel bytes as one.
            self._fail(400, "CONNECT request with a body")
        host, port = _split_authority(request.target.decode("ascii"), default_port=None)
        auth = _proxy_authorization(headers)
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
    return HttpProxyError(502, reason, outcome=Outcome.UPSTREAM_ERROR)


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
    values = [v for n, v in headers if n == b"proxy-authorization"]
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
