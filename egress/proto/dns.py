"""The sandbox DNS listener's wire format: a query in, an answer out. No I/O.

The listener answers only what a sandboxed program's stub resolver asks: one question, class IN,
opcode QUERY, A or AAAA (anything else about an allowed name gets an empty answer). Parsing and
building are dnspython's (``dns.message``): it is the well-kept implementation of RFC 1035 name
compression, EDNS (RFC 6891) and Extended DNS Errors (RFC 8914), and a hand-written codec for
untrusted bytes would be the riskier thing to own. What this module adds is the policy of *what*
may be said:

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
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

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
    (dnspython escapes odd bytes, so it is printable); the caller canonicalises it."""

    message: dns.message.Message
    name: str
    qtype: int

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
    return Query(message, name, int(question.rdtype))


def _reply(query: dns.message.Message, rcode: Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query, recursion_available=True, our_payload=MAX_UDP_PAYLOAD)
    reply.set_rcode(rcode)
    return reply


def answer(query: Query, addresses: Sequence[IPAddress], ttl: float, *, udp: bool) -> bytes:
    """NOERROR with ``addresses`` (those of the queried family; none = an empty answer)."""
    reply = _reply(query.message, Rcode.NOERROR)
    if addresses:
        seconds = min(_MAX_TTL, max(1, math.ceil(ttl)))
        ipv4 = query.qtype == dns.rdatatype.A
        rdtype = dns.rdatatype.A if ipv4 else dns.rdatatype.AAAA
        make = dns.rdtypes.IN.A.A if ipv4 else dns.rdtypes.IN.AAAA.AAAA
        rrset = dns.rrset.RRset(query.message.question[0].name, dns.rdataclass.IN, rdtype)
        for address in addresses:
            rdata = make(dns.rdataclass.IN, rdtype, str(address))
            rrset.add(rdata, seconds)
        reply.answer.append(rrset)
    return to_wire(reply, query.message, udp=udp)


def failure(
    query: Query,
    rcode: Rcode,
    *,
    udp: bool,
    ede: dns.edns.EDECode | None = None,
    text: str = "",
) -> bytes:
    """A response with ``rcode`` and no records; with ``ede``, an Extended DNS Error saying
    why (to an EDNS client only)."""
    reply = _reply(query.message, rcode)
    if ede is not None and query.message.edns >= 0:
        cut = text.encode("utf-8", "replace")[:_EDE_TEXT_BYTES].decode("utf-8", "ignore")
        reply.use_edns(0, payload=MAX_UDP_PAYLOAD, options=[dns.edns.EDEOption(ede, cut or None)])
    return to_wire(reply, query.message, udp=udp)


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
        return reply.to_wire(max_size=limit)
