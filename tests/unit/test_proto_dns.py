"""The sandbox DNS listener's wire format (egress.proto.dns): what is a query it answers, what
every other shape gets back, and what its answers look like to independent parsers (dnslib, as
the stub and ``dig`` see them; dnspython for EDNS details)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.update
import pytest
from dnslib import CLASS, EDNS0, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress.proto.dns import (
    MAX_QUERY_BYTES,
    MAX_UDP_PAYLOAD,
    Query,
    QueryError,
    Rcode,
    answer,
    failure,
    parse_query,
    to_wire,
)

NOTIFY, UPDATE = 4, 5


def dnslib_query(
    name: str = "www.example.com",
    qtype: str = "A",
    *,
    payload: int | None = None,
    qid: int = 0x1234,
) -> bytes:
    """A stub's query, built by dnslib (RD set; an OPT record when ``payload`` is given)."""
    record = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if payload is not None:
        record.add_ar(EDNS0(udp_len=payload))
    return bytes(record.pack())


def header(
    *, qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def encoded(name: str) -> bytes:
    """A name in wire form, written by hand (no checks: for malformed shapes)."""
    if not name:
        return b"\0"  # the root
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def question(name: str = "www.example.com", qtype: int = 1, qclass: int = 1) -> bytes:
    return encoded(name) + struct.pack("!HH", qtype, qclass)


def rejected(wire: bytes) -> QueryError:
    with pytest.raises(QueryError) as caught:
        parse_query(wire)
    return caught.value


def rcode_of(error: QueryError) -> Rcode | None:
    """The rcode of the reply the error carries, checked to serialise for UDP within 512 bytes
    and to be a response to the query's id."""
    if error.reply is None:
        return None
    wire = to_wire(error.reply, None, udp=True)
    assert len(wire) <= 512
    parsed = DNSRecord.parse(wire)
    assert parsed.header.qr == 1
    return Rcode(parsed.header.rcode)


# --- what is a query ------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["A", "AAAA", "MX", "TXT", "ANY"])
def test_dnslib_queries_parse(qtype: str) -> None:
    query = parse_query(dnslib_query("api.example.com", qtype))
    assert query.name == "api.example.com"
    assert query.qtype == getattr(QTYPE, qtype)
    assert query.qtype_text == qtype
    assert query.id == 0x1234
    assert query.echoed_flags == dns.flags.RD
    assert query.payload is None
    assert query.wants_address is (qtype in ("A", "AAAA"))


def test_dnspython_query_with_edns_and_cd() -> None:
    message = dns.message.make_query("api.example.com.", "AAAA", use_edns=0, payload=4096)
    message.flags |= dns.flags.CD
    query = parse_query(message.to_wire())
    assert (query.name, query.qtype_text, query.family()) == ("api.example.com", "AAAA", 6)
    assert query.payload == 4096
    assert query.echoed_flags == dns.flags.RD | dns.flags.CD
    assert query.id == message.id


def test_root_name_and_unknown_type() -> None:
    query = parse_query(header() + question("", qtype=65280))
    assert query.name == "."  # dnspython spells the root so even without its final dot
    assert query.qtype == 65280 and query.qtype_text == "TYPE65280"


LONG_NAME = ".".join(["a" * 63] * 5)  # 320 bytes: over the 255 a name may have


def _compression_loop() -> bytes:
    return header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1)  # the name points at itself


def _pointer_forward() -> bytes:
    return header() + b"\x01a\xc0\x20" + struct.pack("!HH", 1, 1) + b"\x00" * 20


def _ixfr_with_soa() -> bytes:
    return dns.message.make_query("example.com.", "IXFR").to_wire()


def _with_answer() -> bytes:
    record = DNSRecord(DNSHeader(id=0x1234, rd=1), q=DNSQuestion("www.example.com"))
    record.add_answer(RR("www.example.com", QTYPE.A, rdata=A("203.0.113.7")))
    return bytes(record.pack())


def _with_authority() -> bytes:
    record = DNSRecord(DNSHeader(id=0x1234, rd=1), q=DNSQuestion("www.example.com"))
    record.add_auth(RR("www.example.com", QTYPE.A, rdata=A("203.0.113.7")))
    return bytes(record.pack())


def _two_opts() -> bytes:
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return header(ar=2) + question() + opt + opt


def _update() -> bytes:
    message = dns.update.UpdateMessage("example.com.")
    message.add("www", 300, "A", "203.0.113.7")
    return message.to_wire()


def _notify() -> bytes:
    message = dns.message.make_query("example.com.", "SOA")
    message.set_opcode(NOTIFY)
    return message.to_wire()


MALFORMED = {
    # (wire, reply rcode or None = dropped unanswered)
    "empty": (b"", None),
    "short header": (b"\x12\x34\x01", None),
    "eleven bytes": (header()[:11], None),
    "QR set (a response)": (header(flags=0x8180) + question(), None),
    "QR set, too short to parse": (b"\x12\x34\x80", None),
    "oversize": (header() + question() + b"\0" * MAX_QUERY_BYTES, None),
    "qdcount 0": (header(qd=0), Rcode.FORMERR),
    "qdcount 2": (header(qd=2) + question() + question("b.example.com"), Rcode.FORMERR),
    "qdcount 1, no question": (header(), Rcode.FORMERR),
    "question cut short": (header() + question()[:-2], Rcode.FORMERR),
    "answer record in a query": (_with_answer(), Rcode.FORMERR),
    "authority record in a query": (_with_authority(), Rcode.FORMERR),
    "two OPT records": (_two_opts(), Rcode.FORMERR),
    "trailing junk": (dnslib_query() + b"junk", Rcode.FORMERR),
    "compression loop": (_compression_loop(), Rcode.FORMERR),
    "forward pointer": (_pointer_forward(), Rcode.FORMERR),
    "reserved label type": (header() + b"\x41a\x00" + struct.pack("!HH", 1, 1), Rcode.FORMERR),
    "name over 255 bytes": (header() + question(LONG_NAME), Rcode.FORMERR),
    "class CH": (header() + question("version.bind", qtype=16, qclass=CLASS.CH), Rcode.REFUSED),
    "class ANY": (header() + question(qclass=255), Rcode.REFUSED),
    "AXFR": (header() + question("example.com", qtype=QTYPE.AXFR), Rcode.REFUSED),
    "IXFR": (header() + question("example.com", qtype=QTYPE.IXFR), Rcode.REFUSED),
    "qtype OPT": (header() + question(qtype=41), Rcode.REFUSED),
    "qtype TSIG": (header() + question(qtype=250), Rcode.REFUSED),
    "opcode NOTIFY": (_notify(), Rcode.NOTIMP),
    "opcode UPDATE": (_update(), Rcode.NOTIMP),
    "opcode IQUERY": (header(flags=0x0800) + question(), Rcode.NOTIMP),
    "opcode STATUS": (header(flags=0x1000) + question(), Rcode.NOTIMP),
}


@pytest.mark.parametrize(("wire", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_shapes(wire: bytes, expected: Rcode | None) -> None:
    error = rejected(wire)
    assert str(error)  # says what was wrong, for the connection log
    assert rcode_of(error) == expected
    if error.reply is not None:
        assert error.reply.id == 0x1234 or expected is Rcode.NOTIMP  # NOTIFY/UPDATE: own ids


def test_real_ixfr_is_not_answered() -> None:
    """An IXFR as clients send it carries the client's SOA in the authority section: it is
    refused one way or the other (FORMERR for the record, REFUSED for the type)."""
    assert rcode_of(rejected(_ixfr_with_soa())) in (Rcode.FORMERR, Rcode.REFUSED)


def test_query_of_exactly_max_bytes_is_parsed_one_more_is_not() -> None:
    base = dnslib_query(payload=1232)
    padding = MAX_QUERY_BYTES - len(base) - 4  # one EDNS padding option (code 12) fills it
    message = dns.message.from_wire(base)
    message.use_edns(0, payload=1232, options=[dns.edns.GenericOption(12, b"\0" * padding)])
    wire = message.to_wire()
    assert len(wire) == MAX_QUERY_BYTES
    assert parse_query(wire).payload == 1232
    assert rcode_of(rejected(wire + b"\0")) is None


def test_formerr_reply_to_big_two_question_query_fits_udp() -> None:
    """Echoing both questions would not fit 512 bytes: the reply drops them (it was once a
    TooBig raised out of to_wire, and no reply at all)."""
    names = [".".join([c * 63] * 3 + [c * 61]) for c in "ab"]  # two 253-character names
    wire = header(qd=2) + question(names[0]) + question(names[1])
    assert len(wire) <= MAX_QUERY_BYTES
    assert rcode_of(rejected(wire)) == Rcode.FORMERR


# --- answers --------------------------------------------------------------------------------


def parsed(wire: bytes) -> DNSRecord:
    return DNSRecord.parse(wire)


def test_answer_round_trips_through_dnslib() -> None:
    query = parse_query(dnslib_query("api.example.com", "A", qid=0xBEEF))
    addresses = [IPv4Address("203.0.113.7"), IPv4Address("198.51.100.9")]
    reply = parsed(answer(query, addresses, 30.0, udp=True))
    assert reply.header.id == 0xBEEF
    assert (reply.header.qr, reply.header.aa, reply.header.tc) == (1, 0, 0)
    assert (reply.header.rd, reply.header.ra) == (1, 1)
    assert reply.header.rcode == dns.rcode.NOERROR
    assert str(reply.q.qname) == "api.example.com."
    assert reply.q.qtype == QTYPE.A
    assert [(str(r.rname), r.rtype, r.rclass, r.ttl, str(r.rdata)) for r in reply.rr] == [
        ("api.example.com.", QTYPE.A, CLASS.IN, 30, "203.0.113.7"),
        ("api.example.com.", QTYPE.A, CLASS.IN, 30, "198.51.100.9"),
    ]
    assert reply.ar == [] and reply.auth == []


def test_aaaa_answer_and_empty_answer() -> None:
    query = parse_query(dnslib_query("v6.example.com", "AAAA"))
    reply = parsed(answer(query, [IPv6Address("2001:db8::7")], 5, udp=False))
    assert [(r.rtype, ip_address(str(r.rdata))) for r in reply.rr] == [
        (QTYPE.AAAA, IPv6Address("2001:db8::7"))
    ]
    empty = parsed(answer(query, [], 5, udp=True))
    assert empty.header.rcode == dns.rcode.NOERROR and empty.rr == []
    assert str(empty.q.qname) == "v6.example.com."


def test_0x20_case_of_the_name_is_echoed() -> None:
    """A client using 0x20 randomisation checks the case of the question in the answer."""
    asked = "wWw.ExAmPlE.cOm"
    query = parse_query(dnslib_query(asked))
    assert query.name == asked  # the caller canonicalises
    wire = answer(query, [IPv4Address("203.0.113.7")], 30, udp=True)
    assert encoded(asked) in wire
    reply = dns.message.from_wire(wire)
    assert reply.question[0].name.to_text() == asked + "."
    assert reply.answer[0].name.to_text() == asked + "."
    refused = dns.message.from_wire(failure(query, Rcode.REFUSED, udp=True))
    assert refused.question[0].name.to_text() == asked + "."


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [(0.0, 1), (0.2, 1), (1.0, 1), (29.1, 30), (300.0, 300), (1e12, 2**31 - 1)],
)
def test_ttl_rounding(ttl: float, seconds: int) -> None:
    query = parse_query(dnslib_query())
    (record,) = parsed(answer(query, [IPv4Address("203.0.113.7")], ttl, udp=True)).rr
    assert record.ttl == seconds


def addresses(count: int) -> list[IPv4Address]:
    return [IPv4Address(0xCB007100 + i) for i in range(count)]  # 203.0.113.x


def test_no_edns_client_gets_512_bytes_with_tc_when_32_records_do_not_fit() -> None:
    query = parse_query(dnslib_query())
    wire = answer(query, addresses(32), 30, udp=True)
    assert len(wire) <= 512
    reply = parsed(wire)
    assert reply.header.tc == 1 and reply.rr == []
    assert str(reply.q.qname) == "www.example.com." and reply.header.id == 0x1234
    fits = parsed(answer(query, addresses(20), 30, udp=True))
    assert fits.header.tc == 0 and len(fits.rr) == 20
    over_tcp = answer(query, addresses(32), 30, udp=False)
    assert len(over_tcp) > 512
    assert parsed(over_tcp).header.tc == 0 and len(parsed(over_tcp).rr) == 32


def test_edns_offer_is_used_up_to_1232() -> None:
    query = parse_query(dnslib_query(payload=4096))
    big = answer(query, addresses(60), 30, udp=True)  # ~1000 bytes: fits 1232
    assert 512 < len(big) <= MAX_UDP_PAYLOAD
    reply = dns.message.from_wire(big)
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 60
    assert reply.edns == 0 and reply.payload == MAX_UDP_PAYLOAD  # our size, not the client's
    over = answer(query, addresses(100), 30, udp=True)  # 1600+ bytes: over 1232, under 4096
    assert len(over) <= MAX_UDP_PAYLOAD
    truncated = dns.message.from_wire(over)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    assert truncated.edns == 0  # the OPT stays
    small_offer = parse_query(dnslib_query(payload=600))
    assert parsed(answer(small_offer, addresses(60), 30, udp=True)).header.tc == 1
    tiny_offer = parse_query(dnslib_query(payload=100))  # below 512 counts as 512
    assert parsed(answer(tiny_offer, addresses(20), 30, udp=True)).header.tc == 0


def edns_errors(wire: bytes) -> list[tuple[int, str | None]]:
    reply = dns.message.from_wire(wire)
    return [(int(o.code), o.text) for o in reply.options if isinstance(o, dns.edns.EDEOption)]


def test_extended_dns_error_only_when_the_query_had_edns() -> None:
    with_edns = parse_query(dnslib_query(payload=1232))
    wire = failure(
        with_edns, Rcode.NXDOMAIN, udp=True, ede=dns.edns.EDECode.BLOCKED, text="no rule names it"
    )
    assert dns.message.from_wire(wire).rcode() == dns.rcode.NXDOMAIN
    assert edns_errors(wire) == [(int(dns.edns.EDECode.BLOCKED), "no rule names it")]
    without = parse_query(dnslib_query())
    plain = failure(without, Rcode.NXDOMAIN, udp=True, ede=dns.edns.EDECode.BLOCKED, text="x")
    message = dns.message.from_wire(plain)
    assert message.edns == -1 and message.rcode() == dns.rcode.NXDOMAIN
    assert parsed(plain).ar == []
    # EDNS but no reason: an OPT without options
    bare = dns.message.from_wire(failure(with_edns, Rcode.SERVFAIL, udp=True))
    assert bare.edns == 0 and bare.options == () and bare.rcode() == dns.rcode.SERVFAIL


def test_extended_error_text_is_cut_on_a_character_boundary() -> None:
    query = parse_query(dnslib_query(payload=1232))
    wire = failure(query, Rcode.REFUSED, udp=True, ede=dns.edns.EDECode.PROHIBITED, text="é" * 150)
    ((code, text),) = edns_errors(wire)
    assert code == int(dns.edns.EDECode.PROHIBITED)
    assert text == "é" * 100  # 200 bytes of UTF-8


def test_failure_over_tcp_and_rcode_field() -> None:
    query = parse_query(dnslib_query())
    for rcode in (Rcode.REFUSED, Rcode.SERVFAIL, Rcode.NXDOMAIN):
        reply = parsed(failure(query, rcode, udp=False))
        assert reply.header.rcode == rcode and reply.rr == [] and reply.header.id == 0x1234


def test_to_wire_fits_an_error_reply_to_the_client() -> None:
    """The error reply of a query dnspython could parse keeps the question and its EDNS."""
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    error = rejected(header(ar=1) + question("version.bind", 16, CLASS.CH) + opt)
    assert error.reply is not None
    message = dns.message.from_wire(to_wire(error.reply, None, udp=True))
    assert message.rcode() == dns.rcode.REFUSED
    assert message.flags & dns.flags.QR and message.flags & dns.flags.RD
    assert message.id == 0x1234 and message.edns == 0
    assert message.question[0].name.to_text() == "version.bind."


# --- fuzz -----------------------------------------------------------------------------------

VALID = [
    dnslib_query("www.example.com", "A"),
    dnslib_query("WwW.example.com", "AAAA", payload=4096),
    dns.message.make_query("a.b.example.org.", "MX", use_edns=0).to_wire(),
    dns.message.make_query("x.example.", "TXT").to_wire(),
]


def check_any(wire: bytes) -> None:
    """parse_query raises nothing but QueryError; whatever it gives back serialises."""
    try:
        query = parse_query(wire)
    except QueryError as error:
        if error.reply is not None:
            for udp in (True, False):
                reply = to_wire(error.reply, None, udp=udp)
                assert dns.message.from_wire(reply).flags & dns.flags.QR
        return
    assert isinstance(query, Query)
    for udp in (True, False):
        for built in (
            answer(query, [IPv4Address("203.0.113.7")] if query.family() == 4 else [], 1, udp=udp),
            failure(query, Rcode.REFUSED, udp=udp, ede=dns.edns.EDECode.PROHIBITED, text="z"),
        ):
            reply = dns.message.from_wire(built)
            assert reply.id == query.id and reply.flags & dns.flags.QR


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=MAX_QUERY_BYTES + 16))
def test_fuzz_random_bytes(wire: bytes) -> None:
    check_any(wire)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "cut", "append"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[at]
        elif kind == "cut":
            del data[at:]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_queries(wire: bytes) -> None:
    check_any(wire)
