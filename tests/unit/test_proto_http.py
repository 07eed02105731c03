"""HTTP forward-proxy parsing and plain-HTTP exchange: fed whole, byte by byte, random splits."""

from __future__ import annotations

import base64
import random

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.outcomes import OUTCOMES, Outcome
from egress.proto.http_proxy import (
    NEED_DATA,
    ConnectRequest,
    ForwardRequest,
    HttpForwardExchange,
    HttpProxyError,
    HttpProxyParser,
    render_connect_ok,
    render_error,
)
from tests.unit.feeding import SPLITTERS, Splitter, random_splits


def parse(
    feeding: Splitter, data: bytes, *, max_header_bytes: int = 8192
) -> tuple[ConnectRequest | ForwardRequest, HttpProxyParser]:
    """Feed until the request appears; later chunks are still fed (pipelined bytes)."""
    parser = HttpProxyParser(max_header_bytes=max_header_bytes)
    result: ConnectRequest | ForwardRequest | None = None
    for chunk in feeding(data):
        parser.receive_data(chunk)
        if result is None:
            event = parser.next_event()
            if event is not NEED_DATA:
                result = event
    assert result is not None, "request never completed"
    return result, parser


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


# -- CONNECT -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        (b"203.0.113.5:443", "203.0.113.5", 443),
        (b"[::1]:443", "::1", 443),
        (b"[2001:db8::1]:8443", "2001:db8::1", 8443),
        (b"Api.Example.com:443", "Api.Example.com", 443),
    ],
)
def test_connect(feeding: Splitter, target: bytes, host: str, port: int) -> None:
    data = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
    event, parser = parse(feeding, data)
    assert event == ConnectRequest(host, port, None)
    assert parser.trailing_data() == b""


def test_connect_trailing_client_hello(feeding: Splitter) -> None:
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(40))
    data = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n" + hello
    event, parser = parse(feeding, data)
    assert isinstance(event, ConnectRequest)
    assert parser.trailing_data() == hello
    with pytest.raises(RuntimeError):
        parser.next_event()


def test_connect_with_credentials(feeding: Splitter) -> None:
    data = (
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n"
        b"Proxy-Authorization: " + basic("app", "pa:ss") + b"\r\n\r\n"
    )
    event, _ = parse(feeding, data)
    assert event == ConnectRequest("a.example", 443, ("app", "pa:ss"))
    assert "pa:ss" not in repr(event)


def test_connect_http10_without_host(feeding: Splitter) -> None:
    event, _ = parse(feeding, b"CONNECT a.example:443 HTTP/1.0\r\n\r\n")
    assert event == ConnectRequest("a.example", 443, None)


CONNECT_ERRORS = {
    "missing-port": b"CONNECT a.example HTTP/1.1\r\nHost: a.example\r\n\r\n",
    "empty-port": b"CONNECT a.example: HTTP/1.1\r\nHost: a.example\r\n\r\n",
    "port-zero": b"CONNECT a.example:0 HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-huge": b"CONNECT a.example:65536 HTTP/1.1\r\nHost: a\r\n\r\n",
    "port-alpha": b"CONNECT a.example:https HTTP/1.1\r\nHost: a\r\n\r\n",
    "v6-no-brackets": b"CONNECT ::1:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "v6-bad": b"CONNECT [zz::1]:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "v6-unterminated": b"CONNECT [::1:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "userinfo": b"CONNECT u@a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    "origin-form": b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute": b"CONNECT http://a.example:443/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "body": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    "no-host-header": b"CONNECT a.example:443 HTTP/1.1\r\n\r\n",
    "bad-auth-b64": b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic !!!\r\n\r\n",
    "auth-no-colon": b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic "
    + base64.b64encode(b"nocolon")
    + b"\r\n\r\n",
}


@pytest.mark.parametrize("data", CONNECT_ERRORS.values(), ids=list(CONNECT_ERRORS))
def test_connect_errors(feeding: Splitter, data: bytes) -> None:
    with pytest.raises(HttpProxyError) as info:
        parse(feeding, data)
    assert info.value.status == 400
    assert "\n" not in info.value.reason
    assert info.value.outcome == Outcome.BAD_REQUEST


def test_other_auth_scheme_is_absent(feeding: Splitter) -> None:
    data = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Bearer abc\r\n\r\n"
    event, _ = parse(feeding, data)
    assert event == ConnectRequest("a", 443, None)


# -- CONNECT fast path vs h11 ------------------------------------------------------------------
#
# A plain CONNECT head is parsed by a strict fast path; everything else goes to h11. The fast
# path must never change an answer: the reference below is the same parser with the fast path
# switched off before the first byte, so h11 sees everything.

Answer = tuple[object, ...]


def h11_only(max_header_bytes: int) -> HttpProxyParser:
    """The reference: the parser with its fast path off, so h11 parses every request."""
    parser = HttpProxyParser(max_header_bytes=max_header_bytes)
    parser._fall_back()
    return parser


def run(parser: HttpProxyParser, chunks: list[bytes], *, eof: bool = False) -> list[Answer]:
    """Feed chunk by chunk, calling next_event after each until it answers; the history of
    answers (NEED_DATA, the event's fields, or the error), then the trailing data."""
    history: list[Answer] = []
    done = False
    for chunk in [*chunks, b""] if eof else chunks:
        parser.receive_data(chunk)
        if done:
            continue
        try:
            event = parser.next_event()
        except HttpProxyError as exc:
            return [*history, ("error", exc.status, exc.reason, exc.outcome)]
        if event is NEED_DATA:
            history.append(("need",))
            continue
        done = True
        assert isinstance(event, ConnectRequest | ForwardRequest)
        history.append(("event", repr(event), event.proxy_authorization))
    if done:
        history.append(("trailing", parser.trailing_data()))
    return history


def assert_same_as_h11(
    chunks: list[bytes], *, max_header_bytes: int = 8192, eof: bool = False
) -> tuple[list[Answer], HttpProxyParser]:
    parser = HttpProxyParser(max_header_bytes=max_header_bytes)
    got = run(parser, chunks, eof=eof)
    assert got == run(h11_only(max_header_bytes), chunks, eof=eof)
    return got, parser


def took_fast_path(parser: HttpProxyParser) -> bool:
    return parser._conn is None


def test_plain_connect_takes_the_fast_path(feeding: Splitter) -> None:
    data = (
        b"CONNECT 127.0.0.1:40001 HTTP/1.1\r\nHost: 127.0.0.1:40001\r\n"
        b"User-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
    )
    got, parser = assert_same_as_h11(feeding(data))
    assert took_fast_path(parser)
    assert ("event", repr(ConnectRequest("127.0.0.1", 40001, None)), None) in got


_AUTH = basic("app", "pa:ss")

# (head, whether the fast path answers it itself). Each runs under every feeding and must match
# h11 exactly; the ones marked False are outside the fast path's subset and go to h11.
FAST_PATH_CASES = {
    # header folding (obs-fold): h11 joins the continuation line, or refuses it first thing
    "fold": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  more\r\n\r\n", False),
    "fold-tab": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tmore\r\n\r\n", False),
    "fold-first": (b"CONNECT a:443 HTTP/1.1\r\n Host: a\r\n\r\n", False),
    "fold-auth": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic\r\n "
        + _AUTH[6:]
        + b"\r\n\r\n",
        False,
    ),
    # bare LF and bare CR
    "bare-lf": (b"CONNECT a:443 HTTP/1.1\nHost: a\n\n", False),
    "bare-lf-end": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\n\r\n", False),
    "bare-lf-mid": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n", False),
    "bare-lf-blank-then-crlf": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\nX\r\n\r\n", False),
    "bare-cr": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\rb\r\n\r\n", False),
    "bare-cr-line": (b"CONNECT a:443 HTTP/1.1\r\n\r\r\n\r\n", False),
    "leading-crlf": (b"\r\nCONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", False),
    # obs-text and control bytes (h11 takes them in values, never in the target or names)
    "obs-text-value": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-A: caf\xe9\r\n\r\n", False),
    "obs-text-host-value": (b"CONNECT a:443 HTTP/1.1\r\nHost: \xff\r\n\r\n", False),
    "obs-text-target": (b"CONNECT caf\xe9:443 HTTP/1.1\r\nHost: a\r\n\r\n", False),
    "obs-text-name": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX\xe9: 1\r\n\r\n", False),
    "ctl-value": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n", False),
    "nul-value": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", False),
    "del-value": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-A: \x7f\r\n\r\n", False),
    "space-before-colon": (b"CONNECT a:443 HTTP/1.1\r\nHost : a\r\n\r\n", False),
    "empty-name": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", False),
    "no-colon": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nJunk\r\n\r\n", False),
    # duplicate and oddly-cased headers
    "host-odd-case": (b"CONNECT a:443 HTTP/1.1\r\nhOsT: a\r\n\r\n", True),
    "host-twice": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", False),
    "host-missing": (b"CONNECT a:443 HTTP/1.1\r\nX: 1\r\n\r\n", False),
    "host-empty": (b"CONNECT a:443 HTTP/1.1\r\nHost:\r\n\r\n", True),
    "http10-host-twice": (b"CONNECT a:443 HTTP/1.0\r\nHost: a\r\nHOST: b\r\n\r\n", False),
    "auth-odd-case": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nPROXY-authorization: " + _AUTH + b"\r\n\r\n",
        True,
    ),
    "auth-twice": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
        + _AUTH
        + b"\r\nproxy-authorization: "
        + _AUTH
        + b"\r\n\r\n",
        True,
    ),
    "auth-padded": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: \t" + _AUTH + b" \t\r\n\r\n",
        True,
    ),
    "auth-scheme-case": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: bAsIc "
        + _AUTH[6:]
        + b"\r\n\r\n",
        True,
    ),
    "auth-empty": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization:\r\n\r\n", True),
    "upgrade": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        True,
    ),
    # Content-Length / Transfer-Encoding on a CONNECT: h11 validates, we refuse
    "cl-zero": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", False),
    "cl-lower": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\nabc", False),
    "cl-bad": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", False),
    "cl-conflict": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        False,
    ),
    "te-chunked": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        False,
    ),
    "te-gzip": (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nTRANSFER-ENCODING: gzip\r\n\r\n", False),
    "cl-and-te": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        False,
    ),
    # request lines
    "http10": (b"CONNECT a:443 HTTP/1.0\r\n\r\n", True),
    "http20": (b"CONNECT a:443 HTTP/2.0\r\n\r\n", False),
    "http09": (b"CONNECT a:443 HTTP/0.9\r\nHost: a\r\n\r\n", False),
    "lower-method": (b"connect a:443 HTTP/1.1\r\nHost: a\r\n\r\n", False),
    "lower-version": (b"CONNECT a:443 http/1.1\r\nHost: a\r\n\r\n", False),
    "two-spaces": (b"CONNECT  a:443 HTTP/1.1\r\nHost: a\r\n\r\n", False),
    "trailing-space": (b"CONNECT a:443 HTTP/1.1 \r\nHost: a\r\n\r\n", False),
    "tab-separator": (b"CONNECT\ta:443 HTTP/1.1\r\nHost: a\r\n\r\n", False),
    "bad-port": (b"CONNECT a:99999 HTTP/1.1\r\nHost: a\r\n\r\n", True),
    "bad-v6": (b"CONNECT [zz::1]:443 HTTP/1.1\r\nHost: a\r\n\r\n", True),
    "userinfo": (b"CONNECT u:p@a:443 HTTP/1.1\r\nHost: a\r\n\r\n", True),
    "absolute-target": (b"CONNECT http://a:443/ HTTP/1.1\r\nHost: a\r\n\r\n", True),
    "get": (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", False),
    "tls-hello": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", False),
}


@pytest.mark.parametrize(("data", "fast"), FAST_PATH_CASES.values(), ids=list(FAST_PATH_CASES))
def test_fast_path_matches_h11(feeding: Splitter, data: bytes, fast: bool) -> None:
    _, parser = assert_same_as_h11(feeding(data))
    assert took_fast_path(parser) is fast


@pytest.mark.parametrize("size", [255, 256, 257])
def test_fast_path_head_limit_in_one_read(size: int) -> None:
    head = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-Pad: \r\n\r\n"
    data = head.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(head)))
    assert len(data) == size
    got, parser = assert_same_as_h11([data + b"tail"], max_header_bytes=256)
    assert took_fast_path(parser)
    if size > 256:
        assert got == [("error", 431, "request header fields too large", Outcome.BAD_REQUEST)]
    else:
        assert got[-1] == ("trailing", b"tail")


def test_fast_path_oversized_head_trickled(feeding: Splitter) -> None:
    data = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 600 + b"\r\n\r\n"
    got, _ = assert_same_as_h11(feeding(data), max_header_bytes=256)
    assert got[-1][:2] == ("error", 431)


def test_fast_path_oversized_and_malformed() -> None:
    """Two problems: which one is reported depends on how the bytes arrive, for h11 and the
    fast path alike (an incomplete head over the limit is 431 before it is parsed)."""
    data = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 300 + b"\r\nBad Line\r\n\r\n"
    whole, _ = assert_same_as_h11([data], max_header_bytes=256)
    trickled, _ = assert_same_as_h11([data[:300], data[300:]], max_header_bytes=256)
    assert whole[-1][:2] == ("error", 400)
    assert trickled[-1][:2] == ("error", 431)


@pytest.mark.parametrize(
    "tail",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00",
        b"CONNECT b:443 HTTP/1.1\r\nHost: b\r\n\r\n",
        b"\r\n\r\n",
        b"\n",
        b"GET / HTTP/1.1\r\n\r\n" * 3,
    ],
)
def test_fast_path_pipelined_bytes(feeding: Splitter, tail: bytes) -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"
    got, parser = assert_same_as_h11(feeding(head + tail))
    assert took_fast_path(parser)
    assert got[-1] == ("trailing", tail)
    parser.receive_data(b"later")
    assert parser.trailing_data() == tail + b"later"


def test_fast_path_eof() -> None:
    head = b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"
    # EOF with a complete head: still the request; EOF before it: an error, as with h11.
    got, _ = assert_same_as_h11([head], eof=True)
    assert got[0][0] == "event"
    for cut in (0, 1, 10, len(head) - 1):
        got, _ = assert_same_as_h11([head[:cut]] if cut else [], eof=True)
        assert got[-1][:2] == ("error", 400)
    parser = HttpProxyParser()
    parser.receive_data(head[:5])
    parser.receive_data(b"")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")


# Pieces of CONNECT heads, valid and not, to assemble and mutate. A generated head is usually
# whole and well-formed but for one detail: that is where the fast path must decide exactly as
# h11 does. The choices come from a seeded random.Random (Hypothesis' own choices would favour
# the rare entries of each list), with weights set so that about a third of the heads are
# answered by the fast path and the rest by h11.
_GOOD_TARGETS = [b"a.example:443", b"127.0.0.1:40001", b"[::1]:443", b"Api.Example.com:443"]
_BAD_TARGETS = [
    b"[2001:db8::1]:8443", b"a.example", b"a.example:", b"a:0", b"a:65536", b"a:https", b"::1:443",
    b"[zz::1]:443", b"[::1:443", b"u@a:443", b"/", b"http://a:443/", b"a_b.c:1", b"a%2e:1", b"*",
    b"a:00443", b"a:+443", b"a:\xd9\xa3", b"[::1]x", b"a:443\x7f", b"a b:1", b"",
]  # fmt: skip
_BAD_VERSIONS = [b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.10", b"HTTP/1", b"", b"HTTP/1.1 "]
_BAD_METHODS = [b"connect", b"GET", b"CONNEC", b"CONNECTX", b"CONNECT ", b"POST"]
_GOOD_NAMES = [
    b"Host", b"host", b"HOST", b"hOsT", b"Proxy-Authorization", b"proxy-authorization",
    b"PROXY-AUTHORIZATION", b"Content-Length", b"content-length", b"Transfer-Encoding",
    b"transfer-encoding", b"Upgrade", b"Connection", b"Expect", b"User-Agent", b"X-A", b"X_b",
    b"!#$%&'*+.^_`|~",
]  # fmt: skip
_BAD_NAMES = [b"Host ", b" Host", b"Ho st", b"", b"X\x80", b"X\x00", b"X:Y", b"X\t", b"(X)"]
_GOOD_VALUES = [
    b"a.example:443", b"a", b"", b"0", b"3", b"1, 1", b"chunked", b"gzip", b"Chunked", _AUTH,
    b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon"), b"Bearer x", b"Basic", b"basic  "
    + _AUTH[6:], b"a\tb", b" a \t", b"100-continue", b"close", b"h2c", b"a  b", b"01",
]  # fmt: skip
_BAD_VALUES = [
    b"a\x80b",
    b"a\x01b",
    b"a\x00b",
    b"a\rb",
    b"a\nb",
    b"\xff",
    b"\x7f",
    b"a\x0b",
    b"\x0c",
]
_BAD_SEPARATORS = [b":", b":\t", b" : ", b":  ", b"::", b"\t:"]
_BAD_LINE_ENDS = [b"\n", b"\r", b"\n\r", b"\r\r\n", b" \r\n"]
_FOLDS = [b" folded\r\n", b"\tfolded\r\n", b" \r\n", b"\t\r\n"]
_TAILS = [b"\x16\x03\x01\x00\xa5", b"GET / HTTP/1.1\r\n\r\n", b"\r\n", b"\n"]


def _pick(rng: random.Random, good: list[bytes], bad: list[bytes], p_good: float) -> bytes:
    if rng.random() < p_good:
        return rng.choice(good)
    if rng.random() < 0.8:
        return rng.choice(bad)
    return rng.randbytes(rng.randint(0, 8))


def connect_head(seed: int) -> bytes:
    rng = random.Random(seed)
    crlf = lambda: _pick(rng, [b"\r\n"], _BAD_LINE_ENDS, 0.97)  # noqa: E731
    target = _pick(rng, _GOOD_TARGETS, _BAD_TARGETS, 0.8)
    version = _pick(rng, [b"HTTP/1.1"] * 9 + [b"HTTP/1.0"], _BAD_VERSIONS, 0.92)
    head = _pick(rng, [b"CONNECT"], _BAD_METHODS, 0.9) + b" " + target + b" " + version + crlf()
    headers = [
        _pick(rng, _GOOD_NAMES, _BAD_NAMES, 0.93)
        + _pick(rng, [b": "], _BAD_SEPARATORS, 0.9)
        + _pick(rng, _GOOD_VALUES, _BAD_VALUES, 0.93)
        + crlf()
        + (rng.choice(_FOLDS) if rng.random() < 0.03 else b"")
        for _ in range(rng.randint(0, 3))
    ]
    if rng.random() < 0.85:  # usually a proper Host, somewhere
        headers.insert(rng.randint(0, len(headers)), b"Host: " + target + b"\r\n")
    head += b"".join(headers) + _pick(rng, [b"\r\n"], [b"", *_BAD_LINE_ENDS], 0.95)
    if rng.random() < 0.15:  # sometimes one byte-level mutation anywhere
        data = bytearray(head)
        i = rng.randint(0, len(data))
        byte = rng.choice(b"\x00\t\n\r :\x7f\x80\xffaA1[]@%" + bytes([rng.randint(0, 255)]))
        op = rng.choice("rid")
        if op == "i":
            data.insert(i, byte)
        elif i < len(data):
            if op == "r":
                data[i] = byte
            else:
                del data[i]
        head = bytes(data)
    return head + (rng.choice(_TAILS) if rng.random() < 0.4 else b"")


def _feedings(data: bytes, seed: int) -> list[list[bytes]]:
    """Whole, byte by byte, and cut at random places."""
    return [[data], [data[i : i + 1] for i in range(len(data))], random_splits(seed)(data)]


def _head_length(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else len(data)


@settings(max_examples=1500, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    how=st.sampled_from([0, 1, 2]),
    limit=st.sampled_from([None, None, None, -2, -1, 0, 1, 2]),
    eof=st.booleans(),
)
def test_fast_path_differential(seed: int, how: int, limit: int | None, eof: bool) -> None:
    """Random and mutated CONNECT heads, fed whole, byte by byte or in random pieces, with a
    head limit at, just under or just over the head's size: the same answers as pure h11, call
    by call (NEED_DATA, the event and its credentials, or the error and its reason), and the
    same trailing data."""
    data = connect_head(seed)
    max_header_bytes = 8192 if limit is None else max(1, _head_length(data) + limit)
    chunks = _feedings(data, seed)[how]
    assert_same_as_h11(chunks, max_header_bytes=max_header_bytes, eof=eof)


def test_fast_path_differential_sweep() -> None:
    """The same comparison over a fixed range of seeds, every feeding: reproducible, and not
    at the mercy of which examples Hypothesis happens to draw."""
    for seed in range(1500):
        data = connect_head(seed)
        for chunks in _feedings(data, seed):
            assert_same_as_h11(chunks, max_header_bytes=8192, eof=seed % 2 == 0)
            assert_same_as_h11(chunks, max_header_bytes=max(1, _head_length(data) - seed % 3))


# -- absolute-form requests --------------------------------------------------------------------


def test_absolute_get_with_query(feeding: Splitter) -> None:
    data = (
        b"GET http://Example.com:8080/a/b?x=1&y=%20 HTTP/1.1\r\n"
        b"Host: other.example\r\nAccept: */*\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    event, _ = parse(feeding, data)
    assert event == ForwardRequest(
        method="GET",
        scheme="http",
        host="Example.com",
        port=8080,
        target_path="/a/b?x=1&y=%20",
        headers=[(b"Host", b"Example.com:8080"), (b"Accept", b"*/*")],
        proxy_authorization=None,
    )


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        (b"http://a.example", "a.example", 80, "/"),
        (b"http://a.example?q", "a.example", 80, "/?q"),
        (b"HTTP://a.example:/x#frag", "a.example", 80, "/x"),
        (b"http://[2001:db8::5]:81/p", "2001:db8::5", 81, "/p"),
        (b"http://198.51.100.7/", "198.51.100.7", 80, "/"),
    ],
)
def test_absolute_targets(url: bytes, host: str, port: int, path: str) -> None:
    event, _ = parse(SPLITTERS["whole"], b"GET " + url + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, ForwardRequest)
    assert (event.host, event.port, event.target_path) == (host, port, path)


def test_hop_by_hop_stripped(feeding: Splitter) -> None:
    data = (
        b"POST http://a.example/submit HTTP/1.1\r\n"
        b"Host: a.example\r\n"
        b"Connection: X-Secret-Hop, keep-alive, Content-Length, Host\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"X-Secret-Hop: 1\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Upgrade: websocket\r\n"
        b"Proxy-Authorization: " + basic("app", "pw") + b"\r\n"
        b"Proxy-Authenticate: x\r\n"
        b"X-Keep: yes\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    )
    event, _ = parse(feeding, data)
    assert isinstance(event, ForwardRequest)
    assert event.headers == [
        (b"Host", b"a.example"),
        (b"X-Keep", b"yes"),
        (b"Content-Length", b"2"),
    ]
    assert event.proxy_authorization == ("app", "pw")


FORWARD_ERRORS = {
    "origin-form": (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "asterisk": (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "https-absolute": (b"GET https://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "ftp-absolute": (b"GET ftp://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "empty-host": (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "bad-host": (b'GET http://a"b/ HTTP/1.1\r\nHost: a\r\n\r\n', 400),
    "pct-host": (b"GET http://127.0.0.1%2500/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "gzip-te": (
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    "userinfo": (b"GET http://u:p@a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "cl-and-te": (
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "trace": (b"TRACE http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    "garbage": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "bare-lf-junk": (b"GET http://a/ HTTP/1.1\nHost: a\n\x00\n\n", 400),
}


@pytest.mark.parametrize(("data", "status"), FORWARD_ERRORS.values(), ids=list(FORWARD_ERRORS))
def test_forward_errors(feeding: Splitter, data: bytes, status: int) -> None:
    with pytest.raises(HttpProxyError) as info:
        parse(feeding, data)
    assert info.value.status == status
    expected = Outcome.UNSUPPORTED_COMMAND if status == 405 else Outcome.BAD_REQUEST
    assert info.value.outcome == expected


def test_exchange_needs_a_parsed_request() -> None:
    with pytest.raises(RuntimeError):
        HttpForwardExchange(
            ForwardRequest("GET", "http", "a", 80, "/", [], None), HttpProxyParser()
        )


def test_oversized_head_trickled(feeding: Splitter) -> None:
    data = b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 600 + b"\r\n\r\n"
    with pytest.raises(HttpProxyError) as info:
        parse(feeding, data, max_header_bytes=256)
    assert info.value.status == 431


def test_oversized_head_in_one_read() -> None:
    data = b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 300 + b"\r\n\r\n"
    with pytest.raises(HttpProxyError) as info:
        parse(SPLITTERS["whole"], data, max_header_bytes=256)
    assert info.value.status == 431


def test_body_does_not_count_against_head_limit() -> None:
    head = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n"
    event, _ = parse(SPLITTERS["whole"], head + b"b" * 1000, max_header_bytes=256)
    assert isinstance(event, ForwardRequest)


def test_client_eof_before_request() -> None:
    parser = HttpProxyParser()
    parser.receive_data(b"GET http://a/ HT")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"")
    with pytest.raises(HttpProxyError):
        parser.next_event()


# -- plain-HTTP exchange -----------------------------------------------------------------------


class Origin:
    """A real h11 server standing in for the upstream."""

    def __init__(self) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.complete = False

    def feed(self, data: bytes) -> None:
        if not data:  # nothing to send this round (b"" would mean EOF to h11)
            return
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True


class Client:
    """A real h11 client standing in for the app, reading the proxied response."""

    def __init__(self, method: bytes = b"GET") -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
        self.conn.send(h11.EndOfMessage())
        self.response: h11.Response | None = None
        self.informational: list[int] = []
        self.body = bytearray()
        self.complete = False

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.InformationalResponse):
                self.informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                self.response = event
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True


CHUNKED_REQUEST = (
    b"POST http://up.example:8080/upload?id=7 HTTP/1.1\r\n"
    b"Host: up.example:8080\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Connection: keep-alive, X-Hop\r\n"
    b"X-Hop: drop\r\n"
    b"X-End: keep\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


def start_exchange(
    feeding: Splitter, data: bytes
) -> tuple[HttpForwardExchange, Origin, list[bytes]]:
    """Parse the head from the first chunks, then pass the rest through client_data()."""
    chunks = feeding(data)
    parser = HttpProxyParser()
    request = None
    i = 0
    while request is None:
        parser.receive_data(chunks[i])
        i += 1
        event = parser.next_event()
        if event is not NEED_DATA:
            request = event
    assert isinstance(request, ForwardRequest)
    exchange = HttpForwardExchange(request, parser)
    origin = Origin()
    origin.feed(exchange.start())
    for chunk in chunks[i:]:
        origin.feed(exchange.client_data(chunk))
    return exchange, origin, chunks


def relay_response(feeding: Splitter, exchange: HttpForwardExchange, raw: bytes) -> bytes:
    out = bytearray()
    for chunk in feeding(raw):
        out += exchange.upstream_data(chunk)
    return bytes(out)


def test_exchange_chunked_request_content_length_response(feeding: Splitter) -> None:
    exchange, origin, _ = start_exchange(feeding, CHUNKED_REQUEST)
    assert origin.complete
    assert origin.request is not None
    assert origin.request.target == b"/upload?id=7"
    headers = dict(origin.request.headers)
    assert headers[b"host"] == b"up.example:8080"
    assert headers[b"connection"] == b"close"
    assert headers[b"transfer-encoding"] == b"chunked"
    assert headers[b"x-end"] == b"keep"
    assert b"x-hop" not in headers
    assert bytes(origin.body) == b"hello world"
    started_before_response = exchange.response_started
    assert not started_before_response

    raw = (
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: keep-alive, X-Up-Hop\r\nX-Up-Hop: 1\r\nX-Up: 2\r\n\r\ndone"
    )
    out = relay_response(feeding, exchange, raw)
    assert exchange.done and exchange.response_started
    client = Client(b"POST")
    client.feed(out)
    assert client.response is not None and client.response.status_code == 201
    response_headers = dict(client.response.headers)
    assert response_headers[b"connection"] == b"close"
    assert response_headers[b"content-length"] == b"4"
    assert b"keep-alive" not in response_headers and b"x-up-hop" not in response_headers
    assert response_headers[b"x-up"] == b"2"
    assert client.complete and bytes(client.body) == b"done"
    assert exchange.upstream_data(b"junk") == b""
    assert exchange.client_data(b"more") == b""


def test_exchange_chunked_response(feeding: Splitter) -> None:
    exchange, _, _ = start_exchange(feeding, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    out = relay_response(feeding, exchange, raw)
    assert exchange.done
    client = Client()
    client.feed(out)
    assert client.response is not None
    headers = dict(client.response.headers)
    assert headers[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in headers
    assert client.complete and bytes(client.body) == b"abcdefg"


def test_exchange_close_delimited_response(feeding: Splitter) -> None:
    exchange, _, _ = start_exchange(feeding, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
    out = relay_response(feeding, exchange, b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nuntil the end")
    done_before_eof = exchange.done
    assert not done_before_eof
    out += exchange.upstream_eof()
    assert exchange.done
    client = Client()
    client.feed(out)
    client.feed(b"")
    assert client.complete and bytes(client.body) == b"until the end"


def test_exchange_http10_client_gets_close_delimited() -> None:
    exchange, _, _ = start_exchange(SPLITTERS["whole"], b"GET http://a/ HTTP/1.0\r\n\r\n")
    out = exchange.upstream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    out += exchange.upstream_data(b"2\r\nok\r\n0\r\n\r\n")
    assert exchange.done
    assert b"transfer-encoding" not in out.lower()
    assert out.endswith(b"\r\n\r\nok")


def test_exchange_head_response() -> None:
    exchange, origin, _ = start_exchange(
        SPLITTERS["whole"], b"HEAD http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert origin.request is not None and origin.request.method == b"HEAD"
    out = exchange.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert exchange.done
    client = Client(b"HEAD")
    client.feed(out)
    assert client.complete and client.body == b""


def test_exchange_100_continue() -> None:
    data = (
        b"PUT http://a/f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    )
    exchange, origin, _ = start_exchange(SPLITTERS["whole"], data)
    out = exchange.upstream_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 100 ")
    origin.feed(exchange.client_data(b"abc"))
    assert origin.complete and origin.body == b"abc"
    out += exchange.upstream_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert exchange.done
    client = Client(b"PUT")
    client.feed(out)
    assert client.informational == [100]
    assert client.response is not None and client.response.status_code == 204


def test_exchange_early_response_before_body_done() -> None:
    data = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc"
    exchange, _, _ = start_exchange(SPLITTERS["whole"], data)
    out = exchange.upstream_data(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert exchange.done and b" 413 " in out
    assert exchange.client_data(b"x" * 10) == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    ],
)
def test_exchange_bad_upstream_response(raw: bytes) -> None:
    exchange, _, _ = start_exchange(
        SPLITTERS["whole"], b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    with pytest.raises(HttpProxyError) as info:
        exchange.upstream_data(raw)
    assert info.value.status == 502
    assert info.value.outcome == Outcome.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize(
    "raw", [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]
)
def test_exchange_upstream_eof_early(raw: bytes) -> None:
    exchange, _, _ = start_exchange(
        SPLITTERS["whole"], b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    if raw:
        exchange.upstream_data(raw)
    with pytest.raises(HttpProxyError) as info:
        exchange.upstream_eof()
    assert info.value.status == 502


def test_exchange_client_eof_mid_body() -> None:
    data = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
    exchange, _, _ = start_exchange(SPLITTERS["whole"], data)
    with pytest.raises(HttpProxyError) as info:
        exchange.client_data(b"")
    assert info.value.status == 400


# -- rendering ---------------------------------------------------------------------------------


def test_render_error_with_proxy_status() -> None:
    out = render_error(
        403,
        'blog may not reach "evil\\host":443',
        proxy_status="destination_ip_prohibited",
    )
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 403 Forbidden"
    assert b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert (
        b'Proxy-Status: egress; error=destination_ip_prohibited; details="blog may not reach '
        b'\\"evil\\\\host\\":443"'
    ) in lines
    assert body == b'blog may not reach "evil\\host":443\n'


def test_render_error_sanitises_and_carries_the_tables_headers() -> None:
    row = OUTCOMES[Outcome.AUTH_REQUIRED]
    assert row.http == 407
    out = render_error(
        407,
        "auth\r\nInjected: yes é",
        proxy_status=row.proxy_status,
        extra_headers=row.http_headers(),
    )
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"\r\nInjected" not in head
    assert b'Proxy-Authenticate: Basic realm="egress"' in head
    assert body.count(b"\n") == 1
    assert b'details="auth  Injected: yes ?"' in head


def test_render_error_extra_headers() -> None:
    out = render_error(429, "slow down", proxy_status=None, extra_headers=[("Retry-After", "3")])
    assert b"Retry-After: 3\r\n" in out
    assert b"Proxy-Status" not in out
    with pytest.raises(ValueError):
        render_error(400, "x", proxy_status=None, extra_headers=[("X", "a\r\nB: c")])
    h11_client = Client()
    h11_client.feed(out)
    assert h11_client.response is not None and h11_client.response.status_code == 429
    assert h11_client.complete and bytes(h11_client.body) == b"slow down\n"


def test_render_connect_ok() -> None:
    assert render_connect_ok() == b"HTTP/1.1 200 Connection established\r\n\r\n"


# -- fuzz --------------------------------------------------------------------------------------

_prefixes = st.sampled_from(
    [b"", b"CONNECT ", b"GET http://", b"POST http://a/ HTTP/1.1\r\nHost: a\r\n", b"GET "]
)


@settings(max_examples=400, deadline=None)
@given(prefix=_prefixes, tail=st.binary(max_size=400), seed=st.integers(0, 2**32 - 1))
def test_fuzz_parser(prefix: bytes, tail: bytes, seed: int) -> None:
    parser = HttpProxyParser(max_header_bytes=256)
    try:
        for chunk in [*random_splits(seed)(prefix + tail), b""]:
            parser.receive_data(chunk)
            event = parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, ConnectRequest | ForwardRequest)
                return
    except HttpProxyError as exc:
        assert exc.status in (400, 405, 431, 501, 505)
        assert "\n" not in exc.reason


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=400), seed=st.integers(0, 2**32 - 1))
def test_fuzz_upstream_response(tail: bytes, seed: int) -> None:
    exchange, _, _ = start_exchange(
        SPLITTERS["whole"], b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    try:
        for chunk in random_splits(seed)(b"HTTP/1.1 200 OK\r\n" + tail):
            exchange.upstream_data(chunk)
        exchange.upstream_eof()
    except HttpProxyError as exc:
        assert exc.status == 502
