"""A real DNS server on loopback for tests.

``DnsStub`` answers A, AAAA and CNAME questions over UDP and TCP from a table the test controls,
on a free port of ``127.0.0.1`` (or ``::1``), from its own thread, so it works under any event loop
(plain asyncio, uvloop) and with any client (c-ares, ``dig``, the system resolver pointed at it).

    with DnsStub({"api.example.com": ["203.0.113.7", "2001:db8::7"]}) as dns:
        resolver = Resolver(nameservers=[dns.address])
        ...
        assert dns.queries == [("api.example.com", "A"), ("api.example.com", "AAAA")]

Behaviour:

- names match case-insensitively, with or without the trailing dot;
- a name with addresses of the other family only gets NOERROR with an empty answer (NODATA);
- unknown names get NXDOMAIN;
- no SOA is sent with negative answers, so resolvers that follow RFC 2308 do not cache them;
- c-ares (under aiodns) keeps its own cache of answers for their TTL and does not cache TTL 0:
  a test that needs a resolver to *ask again* (expiry, rebinding) should serve TTL 0, which is
  the default for ``set_sequence``. c-ares 1.34 also caches a NOERROR answer without records
  (NODATA) for an hour, whatever its SOA says; so every NODATA reply from the stub carries an
  A record with TTL 0 for ``ns.dnsstub.invalid`` in the additional section, which keeps it out of
  that cache;
- every question is logged in ``queries`` as ``(name, qtype)`` (lower-case name, no trailing dot)
  before the answer is chosen, including questions that get a failure or no answer at all;
  ``query_count(..., transport="tcp")`` tells questions that came over TCP from UDP ones;
- UDP replies are sent whole, whatever their size, unless the stub is made with
  ``truncate_udp=True``: then, like a real server, a UDP reply larger than the client's
  advertised payload size (its EDNS0 OPT record, or 512 bytes without one) is replaced by an
  empty one with the TC bit set, and the client has to ask again over TCP. Needed to serve
  answers with thousands of records the way the Internet does.

Only ``dnslib`` is used, for the wire format; the server loop is a small ``selectors`` loop so
``stop()`` is prompt and nothing is printed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import ipaddress
import itertools
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from dnslib import AAAA, CNAME, QTYPE, RCODE, RD, RR, A, DNSRecord

__all__ = ["DnsStub"]

_RCODE_FAILURES = frozenset({"SERVFAIL", "NXDOMAIN", "REFUSED", "FORMERR", "NOTIMP"})
_FAILURES = _RCODE_FAILURES | {"TIMEOUT", "MALFORMED"}
_MAX_TCP_BUFFER = 65535 + 2
_CLASSIC_UDP_PAYLOAD = 512  # RFC 1035: the UDP size every client takes without EDNS0


def _key(name: str) -> str:
    return name.rstrip(".").lower()


def _udp_payload(request: DNSRecord) -> int:
    """The largest UDP reply ``request``'s sender takes: its EDNS0 size, at least 512."""
    for record in request.ar:
        if record.rtype == QTYPE.OPT:
            return max(_CLASSIC_UDP_PAYLOAD, int(record.rclass))
    return _CLASSIC_UDP_PAYLOAD


@dataclass
class _Entry:
    answers: list[list[str]]  # one element for set(); several for set_sequence()
    ttl: int | None = None
    cname: str | None = None
    failure: str | None = None
    delay: float = 0.0
    served: dict[str, int] = field(default_factory=dict)  # qtype -> questions answered so far


@dataclass
class _TcpConn:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)


class DnsStub:
    """A DNS server on loopback whose answers the test sets; see the module docstring."""

    def __init__(
        self,
        records: Mapping[str, list[str]] | None = None,
        *,
        ttl: int = 60,
        host: str = "127.0.0.1",
        truncate_udp: bool = False,
    ) -> None:
        self.ttl = ttl
        self._host = host
        self._truncate_udp = truncate_udp
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._queries: list[tuple[str, str]] = []
        self._transports: list[str] = []  # "udp" or "tcp", one per element of _queries
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._pending: list[tuple[float, int, Callable[[], None]]] = []  # server thread only
        self._pending_seq = itertools.count()
        self.port = 0
        for name, addresses in (records or {}).items():
            self.set(name, addresses)

    # -- the table ------------------------------------------------------------------------------

    def set(
        self, name: str, addresses: list[str], *, ttl: int | None = None, delay: float = 0.0
    ) -> None:
        """Answer A questions with the IPv4 and AAAA questions with the IPv6 ``addresses``
        (an empty list gives NODATA for both); ``ttl`` defaults to the stub's. ``delay`` holds
        each answer back that many seconds (other questions are answered meanwhile)."""
        self._validate(addresses)
        with self._lock:
            self._entries[_key(name)] = _Entry(answers=[list(addresses)], ttl=ttl, delay=delay)

    def set_sequence(
        self, name: str, answers: list[list[str]], *, ttl: int | None = None, delay: float = 0.0
    ) -> None:
        """Answer the n-th A question with the IPv4 part of ``answers[n]``, the n-th AAAA question
        with the IPv6 part, and repeat the last element once they run out.

        A and AAAA are counted separately, so one A+AAAA lookup consumes one step. Made for
        DNS-rebinding tests: ``set_sequence("x.test", [["203.0.113.9"], ["127.0.0.1"]])``.
        ``ttl`` defaults to 0 so that no cache in the client keeps the first answer.
        """
        if not answers:
            raise ValueError("set_sequence needs at least one answer")
        for step in answers:
            self._validate(step)
        with self._lock:
            self._entries[_key(name)] = _Entry(
                answers=[list(a) for a in answers], ttl=0 if ttl is None else ttl, delay=delay
            )

    def set_cname(self, name: str, target: str, *, ttl: int | None = None) -> None:
        """Answer questions for ``name`` with a CNAME to ``target`` plus ``target``'s records."""
        with self._lock:
            self._entries[_key(name)] = _Entry(answers=[[]], ttl=ttl, cname=_key(target))

    def set_failure(self, name: str, rcode: str) -> None:
        """Fail questions for ``name``: ``"SERVFAIL"``, ``"NXDOMAIN"``, ``"REFUSED"``,
        ``"FORMERR"``, ``"NOTIMP"`` as that response code, ``"TIMEOUT"`` as no answer at all,
        ``"MALFORMED"`` as NOERROR with an A/AAAA record whose data is 3 bytes long."""
        rcode = rcode.upper()
        if rcode not in _FAILURES:
            raise ValueError(f"unknown failure {rcode!r}; expected one of {sorted(_FAILURES)}")
        with self._lock:
            self._entries[_key(name)] = _Entry(answers=[[]], failure=rcode)

    def remove(self, name: str) -> None:
        """Forget ``name`` (it gets NXDOMAIN from now on)."""
        with self._lock:
            self._entries.pop(_key(name), None)

    @staticmethod
    def _validate(addresses: list[str]) -> None:
        for address in addresses:
            ipaddress.ip_address(address)  # raises ValueError: catch typos in tests early

    # -- the query log --------------------------------------------------------------------------

    @property
    def queries(self) -> list[tuple[str, str]]:
        """A snapshot of every question received so far, as ``(name, qtype)``."""
        with self._lock:
            return list(self._queries)

    def query_count(
        self,
        name: str | None = None,
        qtype: str | None = None,
        *,
        transport: Literal["udp", "tcp"] | None = None,
    ) -> int:
        """How many questions matched ``name``, ``qtype`` and ``transport`` (``None`` matches
        any)."""
        key = None if name is None else _key(name)
        with self._lock:
            return sum(
                1
                for (n, t), via in zip(self._queries, self._transports, strict=True)
                if (key is None or n == key)
                and (qtype is None or t == qtype)
                and (transport is None or via == transport)
            )

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()
            self._transports.clear()

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"`` (or ``"[::1]:PORT"``), the form a ``[resolver].nameservers``
        entry takes."""
        if not self.port:
            raise RuntimeError("DnsStub is not started")
        if ":" in self._host:
            return f"[{self._host}]:{self.port}"
        return f"{self._host}:{self.port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("DnsStub already started")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        for _ in range(20):  # UDP picks a free port; retry if that number is taken for TCP
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self._host, 0))
                port = udp.getsockname()[1]
                tcp.bind((self._host, port))
                tcp.listen(16)
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            except BaseException:
                udp.close()
                tcp.close()
                raise
            break
        else:
            raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")
        self.port = port
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp = udp, tcp
        self._thread = threading.Thread(
            target=self._serve, name=f"dnsstub:{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, join the thread and close every socket. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._wake_w.send(b"x")
            thread.join(timeout=5)
            if thread.is_alive():  # pragma: no cover - would be a bug in _serve
                raise RuntimeError("DnsStub thread did not stop")
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsStub:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the server thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        conns: dict[int, _TcpConn] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "listen")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            try:
                while not self._stopping.is_set():
                    wait = None
                    if self._pending:
                        wait = max(0.0, self._pending[0][0] - time.monotonic())
                    for key, _ in sel.select(wait):
                        if key.data == "udp":
                            self._on_udp()
                        elif key.data == "listen":
                            self._on_accept(sel, conns)
                        elif key.data == "tcp":
                            self._on_tcp(sel, conns, conns[key.fd])
                    while self._pending and self._pending[0][0] <= time.monotonic():
                        heapq.heappop(self._pending)[2]()
            finally:
                for conn in conns.values():
                    conn.sock.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except (BlockingIOError, InterruptedError, ConnectionError):
            return
        reply, delay = self._answer(data, transport="udp")
        if reply is not None:
            self._send_later(delay, functools.partial(self._send_udp, reply, peer))

    def _send_udp(self, reply: bytes, peer: Any) -> None:
        if self._udp is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _send_later(self, delay: float, send: Callable[[], None]) -> None:
        if delay <= 0:
            send()
        else:
            heapq.heappush(self._pending, (time.monotonic() + delay, next(self._pending_seq), send))

    def _on_accept(self, sel: selectors.BaseSelector, conns: dict[int, _TcpConn]) -> None:
        assert self._tcp is not None
        try:
            sock, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return
        sock.setblocking(False)
        conns[sock.fileno()] = _TcpConn(sock)
        sel.register(sock, selectors.EVENT_READ, "tcp")

    def _on_tcp(
        self, sel: selectors.BaseSelector, conns: dict[int, _TcpConn], conn: _TcpConn
    ) -> None:
        try:
            chunk = conn.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        conn.buffer += chunk
        if not chunk or len(conn.buffer) > _MAX_TCP_BUFFER:
            sel.unregister(conn.sock)
            del conns[conn.sock.fileno()]
            conn.sock.close()
            return
        while len(conn.buffer) >= 2:
            size = int.from_bytes(conn.buffer[:2], "big")
            if len(conn.buffer) < 2 + size:
                break
            message = bytes(conn.buffer[2 : 2 + size])
            del conn.buffer[: 2 + size]
            reply, delay = self._answer(message, transport="tcp")
            if reply is not None:
                framed = len(reply).to_bytes(2, "big") + reply
                self._send_later(delay, functools.partial(self._send_tcp, conn.sock, framed))

    @staticmethod
    def _send_tcp(sock: socket.socket, framed: bytes) -> None:
        with contextlib.suppress(OSError):  # the client may have gone; the socket may be closed
            sock.setblocking(True)  # replies are <= 64 KiB; loopback never blocks long
            sock.sendall(framed)
            sock.setblocking(False)

    def _answer(self, data: bytes, *, transport: str) -> tuple[bytes | None, float]:
        """The reply to one message (None: stay silent) and how long to hold it back."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # garbage in: no answer, like a real server would
            return None, 0.0
        reply = request.reply()
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return bytes(reply.pack()), 0.0
        question = request.questions[0]
        name = _key(str(question.qname))
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        with self._lock:
            self._queries.append((name, qtype))
            self._transports.append(transport)
            failure = self._fill(reply, name, qtype, depth=0)
            entry = self._entries.get(name)
            delay = entry.delay if entry is not None else 0.0
        if failure == "TIMEOUT":
            return None, 0.0
        if failure == "MALFORMED":
            rtype = QTYPE.AAAA if qtype == "AAAA" else QTYPE.A
            reply.add_answer(RR(name, rtype, rdata=RD(b"\x7f\x00\x00"), ttl=self.ttl))
        elif failure is not None:
            reply.header.rcode = getattr(RCODE, failure)
        elif not reply.rr:
            reply.add_ar(RR("ns.dnsstub.invalid", QTYPE.A, rdata=A("127.0.0.1"), ttl=0))
        packed = bytes(reply.pack())
        if transport == "udp" and self._truncate_udp and len(packed) > _udp_payload(request):
            truncated = request.reply()
            truncated.header.tc = 1
            packed = bytes(truncated.pack())
        return packed, delay

    def _fill(self, reply: DNSRecord, name: str, qtype: str, *, depth: int) -> str | None:
        """Add the answer records for ``name`` to ``reply``; return a failure name or None.
        Called with the lock held."""
        entry = self._entries.get(name)
        if entry is None or depth > 8:
            return "NXDOMAIN"
        if entry.failure is not None:
            return entry.failure
        ttl = self.ttl if entry.ttl is None else entry.ttl
        if entry.cname is not None:
            reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(entry.cname), ttl=ttl))
            if qtype == "CNAME":
                return None
            return self._fill(reply, entry.cname, qtype, depth=depth + 1)
        step = entry.served.get(qtype, 0)
        entry.served[qtype] = step + 1
        addresses = entry.answers[min(step, len(entry.answers) - 1)]
        for text in addresses:
            address = ipaddress.ip_address(text)
            if qtype == "A" and address.version == 4:
                reply.add_answer(RR(name, QTYPE.A, rdata=A(text), ttl=ttl))
            elif qtype == "AAAA" and address.version == 6:
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(text), ttl=ttl))
        return None
