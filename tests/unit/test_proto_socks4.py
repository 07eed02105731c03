"""SOCKS4/4a request parser: every case fed whole, byte by byte and in random splits."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.outcomes import OUTCOMES, Outcome
from egress.proto.socks4 import (
    MAX_HOST_NAME,
    MAX_USER_ID,
    NEED_DATA,
    SOCKS4_GRANTED,
    SOCKS4_REJECTED,
    ConnectRequest,
    Socks4ProtocolError,
    Socks4Server,
    reply_code,
)
from tests.unit.feeding import SPLITTERS, Splitter, random_splits


@dataclass
class Run:
    server: Socks4Server
    event: ConnectRequest | None = None


def handshake(feeding: Splitter, data: bytes, *, max_buffer: int = 8192) -> Run:
    """Drive the parser like the proxy does; bytes after the request are only buffered."""
    run = Run(Socks4Server(max_buffer=max_buffer))
    for chunk in feeding(data):
        run.server.receive_data(chunk)
        if run.event is None:
            event = run.server.next_event()
            if event is not NEED_DATA:
                run.event = event
    return run


# Written from the protocol documents, independent of the parser.
def request(ip: str, port: int, user: bytes = b"", *, cmd: int = 1) -> bytes:
    return bytes((4, cmd)) + struct.pack("!H", port) + IPv4Address(ip).packed + user + b"\0"


def request_4a(name: bytes, port: int, user: bytes = b"", *, x: int = 1, cmd: int = 1) -> bytes:
    return request(f"0.0.0.{x}", port, user, cmd=cmd) + name + b"\0"


# -- happy paths -------------------------------------------------------------------------------


def test_socks4_ip_request(feeding: Splitter) -> None:
    run = handshake(feeding, request("93.184.216.34", 443, b"alice"))
    assert run.event == ConnectRequest(IPv4Address("93.184.216.34"), 443, b"alice")
    assert run.event is not None and not run.event.socks4a
    assert run.server.trailing_data() == b""
    granted = run.server.reply(SOCKS4_GRANTED, (IPv4Address("10.9.8.7"), 40000))
    assert granted == b"\x00\x5a\x9c\x40\x0a\x09\x08\x07"


def test_empty_user_id(feeding: Splitter) -> None:
    run = handshake(feeding, request("1.2.3.4", 80))
    assert run.event == ConnectRequest(IPv4Address("1.2.3.4"), 80, b"")


def test_socks4a_name_case_preserved(feeding: Splitter) -> None:
    run = handshake(feeding, request_4a(b"Api.Example.COM", 8443, b"bob", x=255))
    assert run.event == ConnectRequest("Api.Example.COM", 8443, b"bob")
    assert run.event is not None and run.event.socks4a


def test_user_id_stays_out_of_repr() -> None:
    shown = repr(ConnectRequest("a.test", 80, b"hunter2-user"))
    assert "hunter2" not in shown and "a.test" in shown


def test_user_id_with_any_bytes_is_skipped(feeding: Splitter) -> None:
    """The user id is not identity: whatever its bytes (but NUL), the request goes through."""
    user = bytes(range(1, 256))
    run = handshake(feeding, request_4a(b"x.test", 80, user))
    assert run.event == ConnectRequest("x.test", 80, user)


def test_trailing_data_kept(feeding: Splitter) -> None:
    payload = b"GET / HTTP/1.1\r\n\r\n\x00after-nul"
    run = handshake(feeding, request_4a(b"x.io", 80, b"u") + payload)
    assert run.event == ConnectRequest("x.io", 80, b"u")
    assert run.server.trailing_data() == payload
    run.server.receive_data(b"more")
    assert run.server.trailing_data() == b"more"


def test_a_name_after_a_plain_socks4_request_is_payload(feeding: Splitter) -> None:
    """Only 0.0.0.x announces a name; after a real address, what follows the NUL is data."""
    run = handshake(feeding, request("1.2.3.4", 80) + b"evil.test\0")
    assert run.event == ConnectRequest(IPv4Address("1.2.3.4"), 80, b"")
    assert run.server.trailing_data() == b"evil.test\0"


def test_rejection_reply_and_its_end() -> None:
    run = handshake(SPLITTERS["whole"], request("1.1.1.1", 53))
    assert run.server.reply(SOCKS4_REJECTED) == b"\x00\x5b\x00\x00\x00\x00\x00\x00"
    with pytest.raises(RuntimeError):
        run.server.reply(SOCKS4_REJECTED)
    with pytest.raises(RuntimeError):
        run.server.trailing_data()


def test_ipv6_bind_is_sent_as_zeros() -> None:
    run = handshake(SPLITTERS["whole"], request_4a(b"v6.test", 80))
    out = run.server.reply(SOCKS4_GRANTED, (IPv6Address("2001:db8::2"), 40000))
    assert out == b"\x00\x5a" + bytes(6)
    assert not run.server.may_reply


def test_grant_needs_a_request_and_a_rejection_does_not() -> None:
    server = Socks4Server()
    server.receive_data(b"\x04\x01\x00")
    assert server.next_event() is NEED_DATA
    with pytest.raises(RuntimeError):
        server.reply(SOCKS4_GRANTED)
    # e.g. the proxy shuts down while the client is still sending its request
    assert server.reply(SOCKS4_REJECTED)[:2] == b"\x00\x5b"


def test_next_event_after_the_request_is_a_driver_bug() -> None:
    run = handshake(SPLITTERS["whole"], request("1.2.3.4", 80))
    with pytest.raises(RuntimeError):
        run.server.next_event()


# -- the outcome table -------------------------------------------------------------------------


def test_reply_codes_follow_the_outcome_table() -> None:
    """Granted for allowed; rejected for every outcome SOCKS5 replies to; none otherwise."""
    assert reply_code(Outcome.ALLOWED) == SOCKS4_GRANTED
    for outcome, row in OUTCOMES.items():
        if outcome is Outcome.ALLOWED:
            continue
        expected = None if row.socks5 is None else SOCKS4_REJECTED
        assert reply_code(outcome) == expected, outcome
    assert reply_code(Outcome.AUTH_REQUIRED) == SOCKS4_REJECTED
    assert reply_code(Outcome.UNKNOWN_CLIENT) is None


# -- protocol errors ---------------------------------------------------------------------------

LONG_USER = b"u" * (MAX_USER_ID + 1)
LONG_NAME = b"n" * (MAX_HOST_NAME + 1)

ERROR_CASES: dict[str, tuple[bytes, Outcome, int | None]] = {
    "socks5-greeting": (b"\x05\x01\x00", Outcome.BAD_REQUEST, None),
    "http": (b"CONNECT a:1 HTTP/1.1\r\n\r\n", Outcome.BAD_REQUEST, None),
    "bind": (request("1.2.3.4", 80, cmd=2), Outcome.UNSUPPORTED_COMMAND, SOCKS4_REJECTED),
    "bind-4a": (request_4a(b"a.b", 80, cmd=2), Outcome.UNSUPPORTED_COMMAND, SOCKS4_REJECTED),
    "unknown-cmd": (request("1.2.3.4", 80, cmd=9), Outcome.UNSUPPORTED_COMMAND, SOCKS4_REJECTED),
    "port-zero": (request("1.2.3.4", 0), Outcome.BAD_REQUEST, SOCKS4_REJECTED),
    "port-zero-4a": (request_4a(b"a.b", 0), Outcome.BAD_REQUEST, SOCKS4_REJECTED),
    "ip-zero": (request("0.0.0.0", 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
    "user-id-too-long": (request("1.2.3.4", 80, LONG_USER), Outcome.BAD_REQUEST, SOCKS4_REJECTED),
    "name-too-long": (request_4a(LONG_NAME, 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
    "empty-name": (request_4a(b"", 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
    "space-name": (request_4a(b"a b", 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
    "control-name": (request_4a(b"a\x01b", 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
    "del-name": (request_4a(b"a\x7fb", 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
    "utf8-name": (request_4a("é.fr".encode(), 80), Outcome.BAD_ADDRESS, SOCKS4_REJECTED),
}


@pytest.mark.parametrize(("data", "outcome", "code"), ERROR_CASES.values(), ids=list(ERROR_CASES))
def test_protocol_errors(
    feeding: Splitter, data: bytes, outcome: Outcome, code: int | None
) -> None:
    with pytest.raises(Socks4ProtocolError) as info:
        handshake(feeding, data)
    assert info.value.outcome is outcome
    assert info.value.reply_code == code


def test_error_texts_never_carry_the_user_id_or_the_name() -> None:
    with pytest.raises(Socks4ProtocolError) as info:
        handshake(SPLITTERS["whole"], request_4a(b"secret\x01name", 80, b"secret-user", cmd=1))
    assert "secret" not in str(info.value)
    with pytest.raises(Socks4ProtocolError) as info:
        handshake(SPLITTERS["whole"], b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"secret" * 50)
    assert "secret" not in str(info.value)


def test_a_long_user_id_is_refused_without_waiting_for_its_nul() -> None:
    """The bound is crossed: refused at once, not held until the buffer or the timeout."""
    server = Socks4Server()
    server.receive_data(request("1.2.3.4", 80)[:-1] + b"u" * MAX_USER_ID)
    assert server.next_event() is NEED_DATA  # 255 bytes: still a legal user id
    server.receive_data(b"u")
    with pytest.raises(Socks4ProtocolError) as info:
        server.next_event()
    assert info.value.reply_code == SOCKS4_REJECTED


def test_longest_legal_fields_pass(feeding: Splitter) -> None:
    user, name = b"u" * MAX_USER_ID, b"n" * MAX_HOST_NAME
    run = handshake(feeding, request_4a(name, 80, user))
    assert run.event == ConnectRequest(name.decode(), 80, user)


def test_error_reply_after_protocol_error() -> None:
    server = Socks4Server()
    server.receive_data(request("1.2.3.4", 80, cmd=2))
    with pytest.raises(Socks4ProtocolError) as info:
        server.next_event()
    assert info.value.reply_code is not None
    assert server.reply(info.value.reply_code) == b"\x00\x5b" + bytes(6)
    with pytest.raises(RuntimeError):
        server.next_event()


def test_not_socks4_gets_no_reply() -> None:
    server = Socks4Server()
    server.receive_data(b"\x05")
    with pytest.raises(Socks4ProtocolError) as info:
        server.next_event()
    assert info.value.reply_code is None
    with pytest.raises(RuntimeError):
        server.reply(SOCKS4_REJECTED)


def test_oversized_handshake_is_rejected_with_a_reply(feeding: Splitter) -> None:
    """A whole request over proxy.max_handshake_bytes: the client is owed its 0x5B."""
    with pytest.raises(Socks4ProtocolError) as info:
        handshake(feeding, request_4a(b"n" * 250, 80, b"u" * 250), max_buffer=300)
    assert info.value.outcome is Outcome.BAD_REQUEST
    assert info.value.reply_code == SOCKS4_REJECTED


def test_oversized_garbage_gets_no_reply() -> None:
    server = Socks4Server(max_buffer=300)
    with pytest.raises(Socks4ProtocolError) as info:
        server.receive_data(b"\x05" * 301)
    assert info.value.reply_code is None


def test_eof_mid_request() -> None:
    server = Socks4Server()
    server.receive_data(b"\x04\x01\x00\x50\x01\x02")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(Socks4ProtocolError) as info:
        server.next_event()
    assert info.value.outcome is Outcome.CLIENT_CLOSED
    assert info.value.reply_code is None


def test_max_buffer_floor() -> None:
    with pytest.raises(ValueError):
        Socks4Server(max_buffer=100)
    Socks4Server(max_buffer=512)  # the smallest proxy.max_handshake_bytes the config allows


# -- fuzz --------------------------------------------------------------------------------------

_prefixes = st.sampled_from(
    [
        b"",
        b"\x04",
        b"\x04\x01",
        b"\x04\x01\x00\x50\x01\x02\x03\x04",
        b"\x04\x01\x00\x50\x00\x00\x00\x01",
        b"\x04\x01\x00\x50\x00\x00\x00\x01user\x00",
        b"\x04\x01\x00\x50\x00\x00\x00\x07\x00",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    prefix=_prefixes,
    tail=st.binary(max_size=700),
    seed=st.integers(0, 2**32 - 1),
    max_buffer=st.sampled_from([512, 1024]),
)
def test_fuzz_only_a_request_or_protocol_error(
    prefix: bytes, tail: bytes, seed: int, max_buffer: int
) -> None:
    server = Socks4Server(max_buffer=max_buffer)
    parsing = True
    try:
        for chunk in random_splits(seed)(prefix + tail):
            server.receive_data(chunk)
            if parsing:
                event = server.next_event()
                if event is not NEED_DATA:
                    assert isinstance(event, ConnectRequest)
                    assert 1 <= event.port <= 65535
                    assert len(event.user_id) <= MAX_USER_ID and 0 not in event.user_id
                    if isinstance(event.host, str):
                        assert 0 < len(event.host) <= MAX_HOST_NAME
                        assert event.host.isascii() and event.host.isprintable()
                        assert " " not in event.host
                    else:
                        assert event.host != IPv4Address(0)
                    parsing = False
        server.receive_data(b"")
        if parsing:
            server.next_event()
            raise AssertionError("EOF mid-request must raise")
    except Socks4ProtocolError as exc:
        assert exc.reply_code in (None, SOCKS4_REJECTED)
        if exc.reply_code is not None:
            assert server.reply(exc.reply_code)[:2] == b"\x00\x5b"
