"""The sandbox DNS listener's wire format: a query in, an answer out. No I/O.

The listener answers only what a sandboxed program's stub resolver asks: one question, class IN,
opcode QUERY, A or AAAA (anything else about an allowed name gets an empty answer). Parsing is
dnspython's (``dns.message``): the untrusted side, where its well-kept handling of RFC 1035 name
compression and EDNS (RFC 6891) is worth more than a hand-written parser. Responses are built
here, by hand: they hold only what the listener decided, in a fixed layout (header, the question
as asked, records pointing back at its name, OPT with an Extended DNS Error, RFC 8914), and
building them through dnspython's message objects cost five times as much. What this module adds
is the policy of *what* may be said:

- a query is bounded before it is parsed (:data:`MAX_QUERY_BYTES`), and every way it can be
  malformed ends in :class:`QueryError` (answered FORMERR when its id could be read, else
  dropped), never in another exception;
- an answer is built only from addresses the caller has already checked, and always fits the
  transport: 512 bytes over UDP, or the client's EDNS payload size up to
  :data:`MAX_UDP_PAYLOAD`; what does not fit goes out truncated (TC set, no records), so the
  client retries over TCP, as RFC 1035 says;
- a refusal can carry a reason as an Extended DNS Error (shown by ``dig``), but only to a client
  that sent EDNS itself (a responder must not add OPT to an answer for a query without it).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

__all__ = [
    "MAX_QUERY_BYTES",
    "MAX_UDP_PAYLOAD",
    "Query",
    "QueryError",
    "Rcode",
    "answer",
    "failure",
    "parse_query",
]

IPAddress = IPv4Address | IPv6Address

MAX_QUERY_BYTES: Final = 1024
"""A stub's query is one name (at most 255 bytes) plus a header and an OPT record; anything
longer is not a query this listener serves, and is not parsed."""

MAX_UDP_PAYLOAD: Final = 1232
"""The most we send in one UDP answer, whatever EDNS size the client offers: the DNS Flag Day
2020 value, which avoids IP fragmentation on every common path."""

_CLASSIC_UDP: Final = 512  # RFC 1035 4.2.1, for a client without EDNS
_MAX_TTL: Final = 2**31 - 1
_EDE_TEXT_BYTES: Final = 200
_HEADER: Final = struct.Struct("!HHHHHH")  # id, flags, qd, an, ns, ar
_TYPE_CLASS: Final = struct.Struct("!HH")
_RECORD: Final = struct.Struct("!HHIH")  # type, class, ttl, rdlength (after the owner name)
_OPTION: Final = struct.Struct("!HH")  # EDNS option code, length
_NAME_AT_QUESTION: Final = b"\xc0\x0c"  # a compression pointer to the question's name
_QR: Final = 0x8000
_TC: Final = 0x0200
_RA: Final = 0x0080


Rcode = dns.rcode.Rcode
"""The response codes (NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED ...)."""


class QueryError(ValueError):
    """Not a query this listener answers. ``reply`` is the error response to send (FORMERR,
    NOTIMP or REFUSED), or ``None`` when not even a header could be read (drop it)."""

    def __init__(self, message: str, reply: dns.message.Message | None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Query:
    """One question, as asked. ``name`` is its presentation form without the final dot
    (dnspython escapes odd bytes, so it is printable); the caller canonicalises it.

    What a response needs is kept in wire form: the id, the RD and CD flags to echo, the
    question section (the name exactly as asked: a client checks its 0x20 case), and the
    client's EDNS payload size (``None`` without EDNS).
    """

    message: dns.message.Message
    name: str
    qtype: int
    id: int = 0
    echoed_flags: int = 0
    question: bytes = b""
    payload: int | None = None

    @property
    def wants_address(self) -> bool:
        return self.qtype in (dns.rdatatype.A, dns.rdatatype.AAAA)

    @property
    def qtype_text(self) -> str:
        """``A``, ``AAAA``, ``MX`` ... (a number for a type dnspython does not know)."""
        return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(self.qtype))

    def family(self) -> int:
        """4 for A, 6 for AAAA."""
        return 4 if self.qtype == dns.rdatatype.A else 6


def _header_reply(wire: bytes, rcode: Rcode) -> dns.message.Message | None:
    """An error response built from the raw header alone: the id, and RD echoed."""
    if len(wire) < 12:
        return None
    reply = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    reply.flags = dns.flags.QR | dns.flags.RA | (int.from_bytes(wire[2:4], "big") & dns.flags.RD)
    reply.set_rcode(rcode)
    return reply


def parse_query(wire: bytes) -> Query:
    """The query in ``wire``; raises :class:`QueryError` for anything else."""
    if len(wire) > MAX_QUERY_BYTES:
        raise QueryError(f"query of {len(wire)} bytes (most {MAX_QUERY_BYTES})", None)
    if len(wire) >= 3 and wire[2] & 0x80:  # QR set: a response, never answered (no loops)
        raise QueryError("a response, not a query", None)
    try:
        message = dns.message.from_wire(wire, ignore_trailing=False)
    except dns.exception.DNSException as exc:
        raise QueryError(
            f"malformed query: {exc.__class__.__name__}", _header_reply(wire, Rcode.FORMERR)
        ) from None
    except (ValueError, TypeError, IndexError, UnicodeError) as exc:  # belt and braces
        raise QueryError(
            f"malformed query: {exc.__class__.__name__}", _header_reply(wire, Rcode.FORMERR)
        ) from None
    if message.opcode() != dns.opcode.QUERY:
        raise QueryError("not a standard query (opcode)", _reply(message, Rcode.NOTIMP))
    if len(message.question) != 1 or message.answer or message.authority:
        raise QueryError("a query asks exactly one question", _reply(message, Rcode.FORMERR))
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN:
        raise QueryError("only class IN is served", _reply(message, Rcode.REFUSED))
    if dns.rdatatype.is_metatype(question.rdtype) and question.rdtype != dns.rdatatype.ANY:
        raise QueryError(
            "zone transfers and meta types are not served", _reply(message, Rcode.REFUSED)
        )
    name = question.name.to_text(omit_final_dot=True)
    qtype = int(question.rdtype)
    qname = question.name.to_wire()
    assert qname is not None  # (None only when writing into a file)
    return Query(
        message,
        name,
        qtype,
        id=message.id,
        echoed_flags=message.flags & (dns.flags.RD | dns.flags.CD),
        question=qname + _TYPE_CLASS.pack(qtype, dns.rdataclass.IN),
        payload=message.payload if message.edns >= 0 else None,
    )


def _reply(query: dns.message.Message, rcode: Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query, recursion_available=True, our_payload=MAX_UDP_PAYLOAD)
    reply.set_rcode(rcode)
    return reply


def answer(query: Query, addresses: Sequence[IPAddress], ttl: float, *, udp: bool) -> bytes:
    """NOERROR with ``addresses`` (those of the queried family; none = an empty answer).

    Built by hand rather than through dnspython's message objects (a fifth of the cost): a
    header, the question as asked, one record per address pointing back at the question's
    name (offset 12), and an OPT record when the client sent one.
    """
    records = []
    if addresses:
        seconds = min(_MAX_TTL, max(1, math.ceil(ttl))) if math.isfinite(ttl) else 1
        rdtype = dns.rdatatype.A if query.qtype == dns.rdatatype.A else dns.rdatatype.AAAA
        for address in addresses:
            packed = address.packed
            records.append(
                _NAME_AT_QUESTION
                + _RECORD.pack(rdtype, dns.rdataclass.IN, seconds, len(packed))
                + packed
            )
    return _response(query, Rcode.NOERROR, records, b"", udp=udp)


def failure(
    query: Query,
    rcode: Rcode,
    *,
    udp: bool,
    ede: dns.edns.EDECode | None = None,
    text: str = "",
) -> bytes:
    """A response with ``rcode`` and no records; with ``ede``, an Extended DNS Error saying
    why (to an EDNS client only: a responder must not add OPT to a query without it)."""
    option = b""
    if ede is not None and query.payload is not None:
        cut = text.encode("utf-8", "replace")[:_EDE_TEXT_BYTES].decode("utf-8", "ignore")
        body = int(ede).to_bytes(2, "big") + cut.encode("utf-8")
        option = _OPTION.pack(dns.edns.OptionType.EDE, len(body)) + body
    return _response(query, rcode, [], option, udp=udp)


def _response(
    query: Query, rcode: Rcode, records: list[bytes], options: bytes, *, udp: bool
) -> bytes:
    """Header + question + ``records`` (+ OPT), truncated (TC, no records) if it does not fit
    the transport: 512 bytes, or the client's EDNS size up to MAX_UDP_PAYLOAD."""
    edns = query.payload is not None
    opt = b"\x00" + _RECORD.pack(dns.rdatatype.OPT, MAX_UDP_PAYLOAD, 0, len(options)) + options
    flags = _QR | _RA | query.echoed_flags | (int(rcode) & 0xF)
    tail = opt if edns else b""
    size = 12 + len(query.question) + sum(map(len, records)) + len(tail)
    if udp:
        offered = query.payload if query.payload is not None else _CLASSIC_UDP
        if size > max(_CLASSIC_UDP, min(offered, MAX_UDP_PAYLOAD)):
            flags |= _TC
            records = []
    header = _HEADER.pack(query.id, flags, 1, len(records), 0, 1 if edns else 0)
    return b"".join((header, query.question, *records, tail))


def to_wire(reply: dns.message.Message, query: dns.message.Message | None, *, udp: bool) -> bytes:
    """``reply`` in wire form, fitted to the transport (truncated when it does not fit UDP)."""
    limit = 65535
    if udp:
        offered = query.payload if query is not None and query.edns >= 0 else _CLASSIC_UDP
        limit = max(_CLASSIC_UDP, min(offered, MAX_UDP_PAYLOAD))
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        reply.answer.clear()
        reply.flags |= dns.flags.TC
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:  # an error reply echoing questions that cannot all fit
        reply.question.clear()
        return reply.to_wire(max_size=limit)
