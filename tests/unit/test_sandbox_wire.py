"""The shim's side of the handshake (egress/sandbox/wire.py and errors.py), without I/O.

The reader is driven the way the shim drives a socket: ``recv(reader.want)`` on a stream that
arrives in pieces (whole, byte by byte, random cuts), with the upstream's first bytes right
behind the proxy's answer. Whatever the cuts, those bytes must still be unread when the answer
is complete, or the app would lose the start of its conversation.

The contract tests build the proxy's answers with the proxy's own code (the SOCKS5 machine,
``refusal_record`` and the connection's ``reason_fields``), so the two sides cannot drift apart
without a test failing.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
from types import SimpleNamespace
from typing import Any, cast

import pytest

from egress.net.connection import ClientConnection
from egress.outcomes import OUTCOMES, SOCKS5_SUCCEEDED, Outcome
from egress.proto import socks5
from egress.sandbox import errors, wire
from egress.sandbox.errors import EgressDenied, EgressRateLimited, error_for
from egress.sandbox.wire import HandshakeError, Reply, ReplyReader, connect_request
from tests.unit.feeding import Splitter

UPSTREAM_FIRST_BYTES = b"220 upstream says hello first\r\n"
PROXY = "127.0.0.1:1080"


def drive(stream: bytes, feeding: Splitter) -> tuple[Reply, bytes]:
    """Read ``stream`` as the shim does, in ``feeding``'s pieces: never more than ``want`` at a
    time, ``eof()`` when the stream ends. Returns the reply and the bytes left unread."""
    reader = ReplyReader()
    pending = feeding(stream)
    held = b""
    while reader.reply is None:
        if not held:
            if not pending:
                return reader.eof(), b""
            held = pending.pop(0)
        assert reader.want > 0
        piece, held = held[: reader.want], held[reader.want :]
        reader.feed(piece)
    return reader.reply, held + b"".join(pending)


def success(bind: bytes = b"\x01" + bytes(4) + b"\x00\x00", method: int = 0xE5) -> bytes:
    return bytes((5, method)) + bytes((5, 0, 0)) + bind


def failure(code: int, record: bytes = b"", method: int = 0xE5) -> bytes:
    return bytes((5, method, 5, code, 0, 1)) + bytes(6) + record


def record_bytes(fields: dict[str, Any]) -> bytes:
    body = json.dumps(fields).encode("ascii")
    return len(body).to_bytes(2, "big") + body


# --- connect_request ------------------------------------------------------------------------
GREETING = b"\x05\x02\xe5\x00"  # egress's private method first, then no-auth for a plain proxy


def test_request_for_an_ipv4_address() -> None:
    request = connect_request(ipaddress.IPv4Address("203.0.113.7"), 443)
    assert request == GREETING + b"\x05\x01\x00\x01" + bytes([203, 0, 113, 7]) + b"\x01\xbb"


def test_request_for_an_ipv6_address() -> None:
    address = ipaddress.IPv6Address("2001:db8::7")
    request = connect_request(address, 8080)
    assert request == GREETING + b"\x05\x01\x00\x04" + address.packed + b"\x1f\x90"


def test_request_for_a_name_is_sent_as_a_name() -> None:
    request = connect_request("api.example.com", 80)
    assert request == GREETING + b"\x05\x01\x00\x03\x0fapi.example.com\x00\x50"


def test_a_non_ascii_name_goes_as_its_idna_form() -> None:
    request = connect_request("bücher.example", 443)
    name = b"xn--bcher-kva.example"
    assert request == GREETING + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb"


def test_names_of_1_to_255_bytes_fit_and_nothing_else_does() -> None:
    longest = ".".join(["a" * 63] * 3 + ["b" * 63])  # 255 bytes
    assert len(longest) == 255
    assert connect_request(longest, 443)[7:9] == b"\x03\xff"
    assert connect_request("a", 443)[7:10] == b"\x03\x01a"
    with pytest.raises(ValueError, match="256 bytes"):
        connect_request(longest + "c", 443)
    with pytest.raises(ValueError, match="0 bytes"):
        connect_request("", 443)
    with pytest.raises(ValueError):  # UnicodeError: an IDNA label over 63 characters
        connect_request("ü" * 64 + ".example", 443)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_ports_outside_1_to_65535_are_refused(port: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        connect_request("api.example.com", port)


# --- ReplyReader: successes -----------------------------------------------------------------
BINDS = [
    pytest.param(b"\x01" + bytes([10, 0, 0, 1]) + b"\x9c\x40", id="ipv4-bind"),
    pytest.param(b"\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\x9c\x40", id="v6"),
    pytest.param(b"\x03\x0bproxy.local\x9c\x40", id="domain-bind"),
]


@pytest.mark.parametrize("bind", BINDS)
@pytest.mark.parametrize("method", [0xE5, 0x00], ids=["egress-method", "no-auth-method"])
def test_success_leaves_the_upstreams_first_bytes_unread(
    bind: bytes, method: int, feeding: Splitter
) -> None:
    reply, unread = drive(success(bind, method) + UPSTREAM_FIRST_BYTES, feeding)
    assert reply == Reply(method, 0, None) and reply.ok
    assert unread == UPSTREAM_FIRST_BYTES


def test_the_reader_never_takes_more_than_it_asked_for() -> None:
    reader = ReplyReader()
    assert reader.want == 2
    with pytest.raises(RuntimeError, match="more than was wanted"):
        reader.feed(b"\x05\xe5\x05")
    reader.feed(b"\x05\xe5")
    assert reader.want == 4  # the head of the reply: version, code, reserved, address type
    reader.feed(b"\x05\x00\x00\x01")
    assert reader.want == 6
    reader.feed(bytes(6))
    assert reader.reply is not None and reader.want == 0
    with pytest.raises(RuntimeError):
        reader.feed(b"")


# --- ReplyReader: refusals ------------------------------------------------------------------
def test_a_refusal_carries_its_record(feeding: Splitter) -> None:
    fields = {"reason": "not_allowed", "app": "blog", "destination": "x.example:443"}
    reply, unread = drive(failure(0x02, record_bytes(fields)) + b"junk", feeding)
    assert reply == Reply(0xE5, 0x02, fields) and not reply.ok
    assert unread == b"junk"  # the record's length says where it ends


def test_without_egress_method_a_refusal_has_no_record(feeding: Splitter) -> None:
    """A plain SOCKS5 proxy (it chose no-auth) sends no record: the reader stops at the bind."""
    reply, unread = drive(failure(0x05, method=0x00) + b"\x00\x10", feeding)
    assert reply == Reply(0x00, 0x05, None)
    assert unread == b"\x00\x10"


def kept(fields: dict[str, Any]) -> dict[str, Any]:
    """A record as the shim keeps it: known fields with values of the expected shapes."""
    return {k: v for k, v in fields.items() if v is not None}


def test_refused_at_accept_is_05_ff_and_a_record(feeding: Splitter) -> None:
    fields = {"reason": "unknown_client", "uid": 10999, "app": None}
    reply, unread = drive(b"\x05\xff" + record_bytes(fields), feeding)
    assert reply == Reply(0xFF, None, kept(fields))
    assert unread == b""


def test_05_ff_then_eof_from_a_plain_server(feeding: Splitter) -> None:
    reply, _ = drive(b"\x05\xff", feeding)
    assert reply == Reply(0xFF, None, None)
    reply, _ = drive(b"\x05\xff\x00", feeding)  # cut inside the record's length
    assert reply == Reply(0xFF, None, None)


def test_a_record_cut_short_keeps_the_code(feeding: Splitter) -> None:
    cut = record_bytes({"reason": "not_allowed", "detail": "x" * 50})[:20]
    reply, _ = drive(failure(0x02, cut), feeding)
    assert reply == Reply(0xE5, 0x02, None)


@pytest.mark.parametrize(
    "stream",
    [b"", b"\x05", b"\x05\xe5", b"\x05\xe5\x05\x02\x00", b"\x05\xe5\x05\x00\x00\x01\x00"],
    ids=["nothing", "half-a-method", "method-only", "half-a-head", "half-a-bind"],
)
def test_closed_before_an_answer_is_a_handshake_error(stream: bytes, feeding: Splitter) -> None:
    with pytest.raises(HandshakeError, match="without answering"):
        drive(stream, feeding)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "version byte 0x48"),
        (b"\x04\x5a", "version byte 0x04"),  # a SOCKS4 server
        (b"\x05\x02", "method 0x02, not offered"),
        (b"\x05\xe5\x04\x00\x00\x01", "bad reply version 0x04"),
        (b"\x05\xe5\x05\x00\x00\x07", "address type 0x07"),
        (failure(0x02, b"\x20\x01"), "8193 bytes"),
        (failure(0x02, b"\xff\xff"), "65535 bytes"),
        (failure(0x02, b"\x00\x00"), "0 bytes"),
        (failure(0x02, b"\x00\x03{x}"), "unreadable reason record"),
        (failure(0x02, b"\x00\x02\xc3\xa9"), "unreadable reason record"),
    ],
    ids=[
        "http",
        "socks4",
        "method-not-offered",
        "reply-version",
        "address-type",
        "record-8193",
        "record-65535",
        "record-0",
        "record-not-json",
        "record-not-ascii",
    ],
)
def test_garbage_is_a_handshake_error(stream: bytes, message: str, feeding: Splitter) -> None:
    with pytest.raises(HandshakeError, match=message):
        drive(stream + UPSTREAM_FIRST_BYTES, feeding)


def test_a_record_of_exactly_max_record_bytes_is_read() -> None:
    body = b'{"detail":"' + b"x" * (wire.MAX_RECORD_BYTES - 13) + b'"}'
    assert len(body) == wire.MAX_RECORD_BYTES
    reply, unread = drive(failure(0x02, len(body).to_bytes(2, "big") + body), lambda d: [d])
    assert reply.record == {"detail": "x" * 200}  # kept, and cut to what a message shows
    assert unread == b""


@pytest.mark.parametrize(
    ("record", "kept_fields"),
    [
        (b"[" * 5000, None),  # nesting deep enough to exhaust the parser's recursion
        (
            b'{"app": "a\\u001b[2J\\u202eb\\nc", "reason": "not_allowed"}',
            {"app": "a?[2J?b?c", "reason": "not_allowed"},
        ),
        (b'{"retry_after": 1e999, "uid": true}', {}),
        (b'{"retry_after": -1, "uid": -5}', {}),
        (b'{"retry_after": 7200}', {}),
        (b'{"retry_after": 1.5, "uid": 10001, "other": "x"}', {"retry_after": 1.5, "uid": 10001}),
    ],
    ids=["deep", "control-characters", "infinite", "negative", "too-long-a-wait", "extra-keys"],
)
def test_a_hostile_record_cannot_reach_the_app_as_it_is(
    record: bytes, kept_fields: dict[str, Any] | None
) -> None:
    """Whatever answers on the proxy's port: no control sequences in an exception, no infinite
    or negative wait for a retry loop, no crash of the parser."""
    stream = failure(0x02, len(record).to_bytes(2, "big") + record)
    if kept_fields is None:
        with pytest.raises(HandshakeError, match="unreadable reason record"):
            drive(stream, lambda d: [d])
        return
    reply, _ = drive(stream, lambda d: [d])
    assert reply.record == kept_fields


def test_a_record_that_is_not_an_object_is_ignored() -> None:
    reply, _ = drive(failure(0x02, b"\x00\x02[]"), lambda d: [d])
    assert reply == Reply(0xE5, 0x02, None)


# --- the contract with the proxy ------------------------------------------------------------
def test_constants_agree_with_the_proxy() -> None:
    assert wire.METHOD_EGRESS == socks5.METHOD_EGRESS
    assert wire.MAX_RECORD_BYTES == socks5.MAX_RECORD_BYTES
    assert wire.METHOD_NO_ACCEPTABLE == socks5.METHOD_NO_ACCEPTABLE
    assert (wire.ATYP_IPV4, wire.ATYP_DOMAIN, wire.ATYP_IPV6) == (
        socks5.ATYP_IPV4,
        socks5.ATYP_DOMAIN,
        socks5.ATYP_IPV6,
    )


def reason_fields(outcome: Outcome, detail: str, retry_after: float | None) -> dict[str, Any]:
    """The record fields exactly as the proxy's connection builds them (its own method, on a
    stand-in for the connection's identity: app "blog", uid 10001)."""
    who = SimpleNamespace(app_name="blog", uid=10001, destination="api.example.com:443")
    return ClientConnection.reason_fields(cast(Any, who), outcome, detail, retry_after)


def proxy_answer(outcome: Outcome, retry_after: float | None = None) -> bytes:
    """What the proxy writes for ``outcome`` after reading the shim's own request."""
    server = socks5.Socks5Server()
    server.receive_data(connect_request("api.example.com", 443))
    greeting = server.next_event()
    assert isinstance(greeting, socks5.Greeting)
    assert greeting.methods == {socks5.METHOD_EGRESS, socks5.METHOD_NO_AUTH}
    answer = server.choose_method(socks5.METHOD_EGRESS)
    request = server.next_event()
    assert isinstance(request, socks5.ConnectRequest)
    assert (request.host, request.port) == ("api.example.com", 443)
    code = OUTCOMES[outcome].socks5
    assert code is not None
    detail = OUTCOMES[outcome].detail
    fields = reason_fields(outcome, detail, retry_after)
    return answer + server.reply(code) + socks5.refusal_record(fields)


# What an app sees for each outcome the proxy answers with a SOCKS5 code: the class, and a
# piece of the message. Every such outcome must be listed (see the test below).
EXPECTED: dict[Outcome, tuple[type[OSError], str]] = {
    Outcome.NOT_ALLOWED: (EgressDenied, '"blog" may not connect to api.example.com:443 (no rule'),
    Outcome.SPECIAL_ADDRESS: (EgressDenied, "(special-purpose address: destination is a"),
    Outcome.AUTH_REQUIRED: (EgressDenied, "which the sandbox shim does not send"),
    Outcome.AUTH_FAILED: (EgressDenied, "(proxy credentials rejected)"),
    Outcome.RATE_LIMITED: (EgressRateLimited, "faster than its limit); retry in 0.25 s"),
    Outcome.TOO_MANY_CONNECTIONS: (EgressRateLimited, "max_concurrent limit allows)"),
    Outcome.LIMITER_UNAVAILABLE: (ConnectionAbortedError, "(limiter_unavailable: "),
    Outcome.BAD_REQUEST: (ConnectionAbortedError, "(bad_request: malformed"),
    Outcome.BAD_ADDRESS: (ConnectionAbortedError, "(bad_address: invalid destination"),
    Outcome.UNSUPPORTED_COMMAND: (ConnectionAbortedError, "(unsupported_command: "),
    Outcome.DNS_FAILURE: (socket.gaierror, "(dns_failure: the name did not resolve)"),
    Outcome.DNS_TIMEOUT: (socket.gaierror, "(dns_timeout: no DNS answer in time)"),
    Outcome.CONNECT_REFUSED: (ConnectionRefusedError, "(connect_refused: the upstream refused)"),
    Outcome.CONNECT_TIMEOUT: (TimeoutError, "(connect_timeout: no connection within"),
    Outcome.UNREACHABLE: (OSError, "(unreachable: no route to the upstream)"),
    Outcome.UPSTREAM_ERROR: (ConnectionAbortedError, "(upstream_error: "),
    Outcome.UPSTREAM_PROTOCOL_ERROR: (ConnectionAbortedError, "(upstream_protocol_error: "),
    Outcome.SHUTTING_DOWN: (ConnectionAbortedError, "(shutting_down: the proxy is shutting"),
}
ERRNO = {
    EgressDenied: errno.EACCES,
    EgressRateLimited: errno.EACCES,
    ConnectionRefusedError: errno.ECONNREFUSED,
    TimeoutError: errno.ETIMEDOUT,
    ConnectionAbortedError: errno.ECONNABORTED,
    OSError: errno.EHOSTUNREACH,
}


def test_every_outcome_with_a_socks5_code_has_an_expected_error() -> None:
    coded = {o for o, row in OUTCOMES.items() if row.socks5 not in (None, SOCKS5_SUCCEEDED)}
    assert coded == set(EXPECTED)


@pytest.mark.parametrize("outcome", list(EXPECTED), ids=str)
def test_the_shim_decodes_every_refusal_of_the_proxy(outcome: Outcome, feeding: Splitter) -> None:
    retry = 0.25 if OUTCOMES[outcome].retry_after else None
    reply, unread = drive(proxy_answer(outcome, retry) + UPSTREAM_FIRST_BYTES, feeding)
    assert reply.method == socks5.METHOD_EGRESS and reply.code == OUTCOMES[outcome].socks5
    assert reply.record is not None
    assert reply.record["reason"] == outcome.value
    assert reply.record["app"] == "blog" and reply.record["uid"] == 10001
    assert unread == UPSTREAM_FIRST_BYTES
    kind, text = EXPECTED[outcome]
    error = error_for(reply, "api.example.com:443", PROXY)
    assert type(error) is kind, (outcome, error)
    assert text in str(error), str(error)
    assert "api.example.com:443" in str(error)
    if kind is socket.gaierror:
        eai = socket.EAI_NONAME if outcome is Outcome.DNS_FAILURE else socket.EAI_AGAIN
        assert error.errno == eai
    else:
        assert error.errno == ERRNO[kind]
    if isinstance(error, EgressDenied | EgressRateLimited):
        assert error.reason == outcome.value
    if isinstance(error, EgressRateLimited):
        assert error.retry_after == (0.25 if outcome is Outcome.RATE_LIMITED else None)


AT_ACCEPT: dict[Outcome, tuple[type[OSError], str]] = {
    Outcome.UNKNOWN_CLIENT: (EgressDenied, "this process may not connect to "),
    Outcome.IDENTITY_ERROR: (ConnectionAbortedError, "(identity_error: the kernel could"),
    Outcome.CONNECTION_LIMIT: (EgressRateLimited, "(found the proxy at proxy.max_connections)"),
    Outcome.HANDSHAKE_LIMIT: (EgressRateLimited, "(has proxy.max_handshakes_per_app conn"),
}


@pytest.mark.parametrize("outcome", list(AT_ACCEPT), ids=str)
def test_the_shim_decodes_a_refusal_at_accept(outcome: Outcome, feeding: Splitter) -> None:
    """Refused before the proxy reads a byte: ``05 FF`` and a record, whatever was sent."""
    kind, text = AT_ACCEPT[outcome]
    fields = reason_fields(outcome, OUTCOMES[outcome].detail, None)
    fields |= {"app": None, "uid": 10999, "destination": None}
    answer = bytes((socks5.SOCKS_VERSION, socks5.METHOD_NO_ACCEPTABLE))
    reply, _ = drive(answer + socks5.refusal_record(fields), feeding)
    assert reply == Reply(0xFF, None, kept(fields))
    error = error_for(reply, "api.example.com:443", PROXY)
    assert type(error) is kind
    assert text in str(error), str(error)
    if outcome is Outcome.UNKNOWN_CLIENT:
        assert error.strerror == (
            "egress: this process may not connect to api.example.com:443"
            " (uid 10999 belongs to no app)"
        )


def test_the_largest_record_the_proxy_writes_fits_the_shims_limit() -> None:
    """Every text all escapes (six bytes each): still within what the shim reads."""
    nasty = "\x00" * 10_000
    fields = {k: nasty for k in ("reason", "decision", "app", "destination", "detail")}
    record = socks5.refusal_record({**fields, "uid": 2**32 - 1, "retry_after": 1e300})
    reply, _ = drive(failure(0x02, record), lambda d: [d])
    assert reply.record is not None and reply.record["uid"] == 2**32 - 1


# --- error_for without a record (a proxy that is not egress) --------------------------------
def test_plain_socks5_not_allowed_is_a_denial_without_a_reason() -> None:
    error = error_for(Reply(0x00, 0x02, None), "198.51.100.7:443", PROXY)
    assert type(error) is EgressDenied and error.errno == errno.EACCES
    assert error.strerror == (
        "egress: this process may not connect to 198.51.100.7:443 (not allowed by the ruleset)"
    )


def test_plain_socks5_refused_is_connection_refused_via_the_proxy() -> None:
    error = error_for(Reply(0x00, 0x05, None), "198.51.100.7:443", PROXY)
    assert type(error) is ConnectionRefusedError
    assert error.strerror == (
        "egress: connecting to 198.51.100.7:443 failed via 127.0.0.1:1080: connection refused"
    )


def test_no_acceptable_method_without_a_record_says_it_may_not_be_egress() -> None:
    error = error_for(Reply(0xFF, None, None), "198.51.100.7:443", PROXY)
    assert type(error) is EgressDenied
    assert "accepted no method of the shim's (is it egress?)" in str(error)


def test_proxy_unreachable_names_the_proxy() -> None:
    cause = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    error = errors.proxy_unreachable(PROXY, "api.example.com:443", cause)
    assert type(error) is ConnectionRefusedError and error.errno == errno.ECONNREFUSED
    assert error.strerror == (
        "egress: cannot reach the egress proxy at 127.0.0.1:1080 (Connection"
        " refused) to connect to api.example.com:443; is `egress proxy` running with that"
        " socks5_listen?"
    )
