"""SOCKS5 handshake state machine: every case fed whole, byte by byte and in random splits."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.outcomes import (
    SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS5_COMMAND_NOT_SUPPORTED,
    SOCKS5_CONNECTION_REFUSED,
    SOCKS5_GENERAL_FAILURE,
    SOCKS5_NOT_ALLOWED,
    SOCKS5_SUCCEEDED,
    Outcome,
)
from egress.proto.socks5 import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    MAX_RECORD_BYTES,
    METHOD_EGRESS,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD,
    NEED_DATA,
    ConnectRequest,
    Credentials,
    Event,
    Greeting,
    Socks5ProtocolError,
    Socks5Server,
    refusal_record,
)
from tests.unit.feeding import SPLITTERS, Splitter, random_splits


@dataclass
class Run:
    server: Socks5Server
    events: list[Event] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)


def handshake(
    feeding: Splitter,
    data: bytes,
    *,
    method: int = METHOD_NO_AUTH,
    auth_ok: bool = True,
    max_buffer: int = 8192,
) -> Run:
    """Drive the machine like the proxy does; bytes after the request are only buffered."""
    run = Run(Socks5Server(max_buffer=max_buffer))
    parsing = True
    for chunk in feeding(data):
        run.server.receive_data(chunk)
        while parsing:
            event = run.server.next_event()
            if event is NEED_DATA:
                break
            run.events.append(event)
            if isinstance(event, Greeting):
                run.sent += run.server.choose_method(method)
                parsing = method != METHOD_NO_ACCEPTABLE
            elif isinstance(event, Credentials):
                run.sent += run.server.auth_reply(ok=auth_ok)
                parsing = auth_ok
            else:
                parsing = False
    return run


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def auth(user: bytes, password: bytes) -> bytes:
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


def request(atyp: int, addr: bytes, port: int, cmd: int = 1, rsv: int = 0) -> bytes:
    return bytes((5, cmd, rsv, atyp)) + addr + struct.pack("!H", port)


def domain(name: bytes) -> bytes:
    return bytes((len(name),)) + name


# -- happy paths -------------------------------------------------------------------------------


def test_ipv4_no_auth(feeding: Splitter) -> None:
    run = handshake(feeding, greeting(0) + request(ATYP_IPV4, bytes([93, 184, 216, 34]), 443))
    assert run.events == [
        Greeting(frozenset({0})),
        ConnectRequest(IPv4Address("93.184.216.34"), 443, ATYP_IPV4),
    ]
    assert run.sent == b"\x05\x00"
    assert run.server.reply(SOCKS5_SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert run.server.trailing_data() == b""


def test_ipv6(feeding: Splitter) -> None:
    addr = IPv6Address("2001:db8::1")
    run = handshake(feeding, greeting(0) + request(ATYP_IPV6, addr.packed, 8080))
    assert run.events[-1] == ConnectRequest(addr, 8080, ATYP_IPV6)


def test_domain_case_preserved(feeding: Splitter) -> None:
    run = handshake(feeding, greeting(0, 2) + request(ATYP_DOMAIN, domain(b"Api.Example.COM"), 80))
    assert run.events[-1] == ConnectRequest("Api.Example.COM", 80, ATYP_DOMAIN)
    assert run.events[0] == Greeting(frozenset({0, 2}))


def test_auth_ok(feeding: Splitter) -> None:
    data = greeting(0, 2) + auth(b"app", b"s3cret") + request(ATYP_DOMAIN, domain(b"a.b"), 443)
    run = handshake(feeding, data, method=METHOD_USERNAME_PASSWORD)
    assert run.events[1] == Credentials(b"app", b"s3cret")
    assert run.sent == b"\x05\x02\x01\x00"
    assert run.events[2] == ConnectRequest("a.b", 443, ATYP_DOMAIN)


def test_auth_empty_password_is_passed_on(feeding: Splitter) -> None:
    run = handshake(feeding, greeting(2) + auth(b"u", b""), method=METHOD_USERNAME_PASSWORD)
    assert run.events[-1] == Credentials(b"u", b"")


def test_auth_fail(feeding: Splitter) -> None:
    data = greeting(2) + auth(b"app", b"wrong") + request(ATYP_IPV4, b"\x01\x02\x03\x04", 1)
    run = handshake(feeding, data, method=METHOD_USERNAME_PASSWORD, auth_ok=False)
    assert run.sent == b"\x05\x02\x01\x01"
    assert len(run.events) == 2
    with pytest.raises(RuntimeError):
        run.server.next_event()
    with pytest.raises(RuntimeError):
        run.server.reply(SOCKS5_GENERAL_FAILURE)


def test_no_acceptable_method(feeding: Splitter) -> None:
    run = handshake(feeding, greeting(2), method=METHOD_NO_ACCEPTABLE)
    assert run.sent == b"\x05\xff"
    with pytest.raises(RuntimeError):
        run.server.next_event()


def test_password_not_in_repr() -> None:
    creds = Credentials(b"app", b"hunter2")
    assert "hunter2" not in repr(creds)
    assert "app" in repr(creds)


def test_trailing_data_kept(feeding: Splitter) -> None:
    payload = b"\x16\x03\x01\x02\x00hello-early-payload"
    run = handshake(feeding, greeting(0) + request(ATYP_DOMAIN, domain(b"x.io"), 443) + payload)
    assert run.events[-1] == ConnectRequest("x.io", 443, ATYP_DOMAIN)
    assert run.server.reply(SOCKS5_SUCCEEDED) is not None
    assert run.server.trailing_data() == payload
    run.server.receive_data(b"more")
    assert run.server.trailing_data() == b"more"


def test_reply_with_ipv6_bind() -> None:
    run = handshake(SPLITTERS["whole"], greeting(0) + request(ATYP_IPV4, b"\x01\x01\x01\x01", 53))
    out = run.server.reply(SOCKS5_SUCCEEDED, (IPv6Address("2001:db8::2"), 40000))
    assert out == b"\x05\x00\x00\x04" + IPv6Address("2001:db8::2").packed + b"\x9c\x40"
    with pytest.raises(RuntimeError):
        run.server.reply(SOCKS5_SUCCEEDED)


def test_refusal_reply() -> None:
    run = handshake(SPLITTERS["whole"], greeting(0) + request(ATYP_IPV4, b"\x01\x01\x01\x01", 53))
    assert run.server.reply(SOCKS5_NOT_ALLOWED)[:2] == b"\x05\x02"
    with pytest.raises(RuntimeError):
        run.server.trailing_data()


def test_reply_while_waiting_for_request() -> None:
    # e.g. the handshake timed out after authentication
    run = handshake(SPLITTERS["whole"], greeting(0))
    assert run.server.reply(SOCKS5_CONNECTION_REFUSED)[:2] == b"\x05\x05"
    with pytest.raises(RuntimeError):
        handshake(SPLITTERS["whole"], greeting(0)).server.reply(SOCKS5_SUCCEEDED)


# -- egress's private method (0xE5) ------------------------------------------------------------


def test_private_method_needs_no_sub_negotiation(feeding: Splitter) -> None:
    """The shim pipelines its request behind a greeting offering 0xE5 and no-auth."""
    data = greeting(METHOD_EGRESS, METHOD_NO_AUTH) + request(ATYP_DOMAIN, domain(b"a.test"), 443)
    run = handshake(feeding, data, method=METHOD_EGRESS)
    assert run.sent == b"\x05\xe5"
    assert run.events == [
        Greeting(frozenset({METHOD_EGRESS, METHOD_NO_AUTH})),
        ConnectRequest("a.test", 443, ATYP_DOMAIN),
    ]


def test_refusal_record_is_length_then_ascii_json() -> None:
    record = refusal_record({"reason": "not_allowed", "app": "blog", "detail": "caf\u00e9 \u2603"})
    length = int.from_bytes(record[:2], "big")
    assert length == len(record) - 2
    body = record[2:]
    assert body.isascii()
    assert json.loads(body) == {
        "reason": "not_allowed",
        "app": "blog",
        "detail": "caf\u00e9 \u2603",
    }


def test_refusal_record_stays_bounded_whatever_the_texts() -> None:
    """Six bytes a character once escaped, in every field: still under the bound, and the
    reason itself is never cut."""
    worst = "\u2603" * 10_000
    fields = {"reason": "not_allowed", **{k: worst for k in ("app", "destination", "detail")}}
    fields |= {"decision": worst, "uid": 10042, "retry_after": 1.5}
    record = refusal_record(fields)
    assert len(record) - 2 <= MAX_RECORD_BYTES
    decoded = json.loads(record[2:])
    assert decoded["reason"] == "not_allowed" and decoded["uid"] == 10042
    assert decoded["detail"] == "\u2603" * 197 + "..."  # cut, and says so


# -- driver mistakes ---------------------------------------------------------------------------


def test_choose_method_not_offered() -> None:
    server = Socks5Server()
    server.receive_data(greeting(2))
    assert server.next_event() == Greeting(frozenset({2}))
    with pytest.raises(ValueError, match="not offered"):
        server.choose_method(METHOD_NO_AUTH)
    with pytest.raises(ValueError, match="not implemented"):
        server.choose_method(0x01)
    assert server.choose_method(METHOD_USERNAME_PASSWORD) == b"\x05\x02"


def test_out_of_order_calls() -> None:
    server = Socks5Server()
    with pytest.raises(RuntimeError):
        server.choose_method(METHOD_NO_AUTH)
    with pytest.raises(RuntimeError):
        server.auth_reply(ok=True)
    with pytest.raises(RuntimeError):
        server.reply(SOCKS5_GENERAL_FAILURE)
    server.receive_data(greeting(0))
    server.next_event()
    with pytest.raises(RuntimeError):
        server.next_event()


# -- protocol errors ---------------------------------------------------------------------------

ERROR_CASES = {
    "socks4-greeting": (b"\x04\x01\x00\x50\x01\x02\x03\x04\x00", None),
    "http-greeting": (b"GET / HTTP/1.1\r\n", None),
    "nmethods-zero": (b"\x05\x00", None),
    "bind": (greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 80, cmd=2), 0x07),
    "udp-associate": (greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 80, cmd=3), 0x07),
    "unknown-cmd": (greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 80, cmd=9), 0x07),
    "bad-atyp": (greeting(0) + request(0x02, b"\x01\x02\x03\x04", 80), 0x08),
    "bad-rsv": (greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 80, rsv=1), 0x01),
    "port-zero": (greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 0), 0x01),
    "request-version": (greeting(0) + b"\x04\x01\x00\x01\x01\x02\x03\x04\x00\x50", None),
    "empty-domain": (greeting(0) + request(ATYP_DOMAIN, b"\x00", 80), 0x08),
    "nul-domain": (greeting(0) + request(ATYP_DOMAIN, domain(b"a\x00b"), 80), 0x08),
    "space-domain": (greeting(0) + request(ATYP_DOMAIN, domain(b"a b"), 80), 0x08),
    "utf8-domain": (greeting(0) + request(ATYP_DOMAIN, domain("é.fr".encode()), 80), 0x08),
}


@pytest.mark.parametrize(("data", "reply_code"), ERROR_CASES.values(), ids=list(ERROR_CASES))
def test_protocol_errors(feeding: Splitter, data: bytes, reply_code: int | None) -> None:
    with pytest.raises(Socks5ProtocolError) as info:
        handshake(feeding, data)
    assert info.value.reply_code == reply_code


def test_error_reply_codes_come_from_the_outcome_table() -> None:
    unsupported = Socks5ProtocolError("x", outcome=Outcome.UNSUPPORTED_COMMAND, reply=True)
    assert unsupported.reply_code == SOCKS5_COMMAND_NOT_SUPPORTED
    bad_address = Socks5ProtocolError("x", outcome=Outcome.BAD_ADDRESS, reply=True)
    assert bad_address.reply_code == SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED
    assert Socks5ProtocolError("x", outcome=Outcome.BAD_REQUEST, reply=False).reply_code is None


def test_bad_auth_version(feeding: Splitter) -> None:
    with pytest.raises(Socks5ProtocolError) as info:
        handshake(feeding, greeting(2) + b"\x05\x01a\x01b", method=METHOD_USERNAME_PASSWORD)
    assert info.value.reply_code is None


def test_error_reply_after_protocol_error() -> None:
    server = Socks5Server()
    server.receive_data(greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 80, cmd=2))
    server.next_event()
    server.choose_method(METHOD_NO_AUTH)
    with pytest.raises(Socks5ProtocolError) as info:
        server.next_event()
    assert info.value.reply_code is not None
    assert server.reply(info.value.reply_code)[:2] == b"\x05\x07"
    with pytest.raises(RuntimeError):
        server.next_event()


def test_oversized_before_any_message_no_reply() -> None:
    server = Socks5Server()
    with pytest.raises(Socks5ProtocolError) as info:
        server.receive_data(greeting(0) + b"x" * 9000)
    assert info.value.reply_code is None


def test_oversized_after_request_phase(feeding: Splitter) -> None:
    # Payload pipelined after the request, beyond the buffer: the client is owed a reply.
    data = greeting(0) + request(ATYP_IPV4, b"\x01\x02\x03\x04", 80)
    run = handshake(feeding, data, max_buffer=600)
    run.server.receive_data(b"x" * 600)
    with pytest.raises(Socks5ProtocolError) as info:
        run.server.receive_data(b"y")
    assert info.value.reply_code == SOCKS5_GENERAL_FAILURE
    assert run.server.reply(SOCKS5_GENERAL_FAILURE)[:2] == b"\x05\x01"


def test_eof_mid_handshake() -> None:
    server = Socks5Server()
    server.receive_data(b"\x05\x02")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(Socks5ProtocolError):
        server.next_event()


def test_max_buffer_floor() -> None:
    with pytest.raises(ValueError):
        Socks5Server(max_buffer=100)


# -- fuzz --------------------------------------------------------------------------------------

_prefixes = st.sampled_from(
    [
        b"",
        greeting(0),
        greeting(2),
        greeting(0, 2),
        greeting(2) + auth(b"u", b"p"),
        greeting(0) + b"\x05\x01\x00",
    ]
)


@settings(max_examples=400, deadline=None)
@given(prefix=_prefixes, tail=st.binary(max_size=600), seed=st.integers(0, 2**32 - 1))
def test_fuzz_only_events_or_protocol_error(prefix: bytes, tail: bytes, seed: int) -> None:
    data = prefix + tail
    server = Socks5Server(max_buffer=1024)
    parsing = True
    try:
        for chunk in random_splits(seed)(data):
            server.receive_data(chunk)
            while parsing:
                event = server.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Greeting):
                    method = next((m for m in (2, 0) if m in event.methods), METHOD_NO_ACCEPTABLE)
                    server.choose_method(method)
                    parsing = method != METHOD_NO_ACCEPTABLE
                elif isinstance(event, Credentials):
                    server.auth_reply(ok=True)
                else:
                    assert isinstance(event, ConnectRequest)
                    assert 1 <= event.port <= 65535
                    parsing = False
        server.receive_data(b"")
        if parsing:
            assert server.next_event() is NEED_DATA  # unreachable: EOF mid-handshake raises
    except Socks5ProtocolError as exc:
        assert exc.reply_code in (None, 0x01, 0x07, 0x08)


def test_the_smallest_buffer_the_config_allows_still_parses_requests() -> None:
    """proxy.max_handshake_bytes may be 512: a request fits, a full 513-byte username/password
    message is refused as oversized (it once made every connection fail instead)."""
    run = handshake(
        SPLITTERS["whole"],
        greeting(0) + request(ATYP_DOMAIN, domain(b"a.test"), 443),
        max_buffer=512,
    )
    assert run.events[-1] == ConnectRequest("a.test", 443, ATYP_DOMAIN)
    server = Socks5Server(max_buffer=512)
    server.receive_data(greeting(2))
    server.next_event()
    server.choose_method(METHOD_USERNAME_PASSWORD)
    with pytest.raises(Socks5ProtocolError, match="exceeds buffer limit"):
        server.receive_data(auth(b"u" * 255, b"p" * 255))
