"""The sandbox DNS listener: answers a sandboxed program's A/AAAA questions, by policy.

In transparent mode the firewall redirects a sandbox uid's port-53 traffic (UDP and TCP) here
(``proxy.dns_listen``), so ``curl``, ``git`` or a Go binary can resolve names though nothing
else leaves the sandbox. Each query is answered for the app that sent it, as the kernel says
(the uid owning the sending socket, :class:`egress.net.identity.UdpOwnerLookup` / the TCP
owner lookup), never as the query says:

- a name the app has a rule for (any port) is resolved by the proxy's own resolver and cache,
  and only the addresses the app may be given are answered (the special-purpose floor applies:
  a name resolving to 169.254.169.254 gets no address); each answer is remembered for that app
  (:class:`egress.dnsnames.AnsweredNames`) so its transparent connection to the address is
  matched against the name's rule;
- any other name gets NXDOMAIN without a lookup (so DNS is no way out for data either), with an
  Extended DNS Error saying why to clients that speak EDNS; other types about an allowed name
  get an empty answer (only A and AAAA are ever looked up);
- a query from a uid in no app, one whose sender cannot be told, or one over the app's share of
  lookups in flight gets REFUSED; a malformed one FORMERR (or nothing, if even its header is
  unreadable); past :data:`MAX_IN_FLIGHT` at once, UDP queries are dropped unread
  (``dropped``). Every query is counted (``egress_dns_listener_queries_total{app,answer}``)
  and logged in the connection log with ``"listener":"dns"``.

Bounds: each app may ask ``proxy.dns_queries_per_second`` (burst ``proxy.dns_burst``) on this
node, over which it gets REFUSED; a query is at most :data:`egress.proto.dns.MAX_QUERY_BYTES`;
at most :data:`MAX_IN_FLIGHT` queries are being answered at once and
:data:`MAX_IN_FLIGHT_PER_APP` per app (a flood of one app's slow lookups cannot hold the others'
up); TCP connections are capped
(:data:`MAX_TCP_CONNECTIONS`, :data:`MAX_TCP_CONNECTIONS_PER_APP`; a uid in no app is closed
at accept) and closed after :data:`TCP_IDLE_SECONDS` without a complete query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, cast

import dns.edns

from egress.config import ListenAddress
from egress.connlog import ConnectionLog, untrusted
from egress.context import Identify, SnapshotSource
from egress.dnsnames import AnsweredNames
from egress.limits import KeyedRate
from egress.metrics import UNKNOWN_APP, ProxyMetrics
from egress.net.identity import UdpOwnerLookup
from egress.net.transparent import OriginalDestinationError, original_destination
from egress.outcomes import Outcome
from egress.proto import dns as wire
from egress.resolver import Resolution, ResolveError, ResolveFailure
from egress.server import ListenerError
from rules.addresses import HostSyntaxError, canonical_host
from rules.decide import AppPolicy, decide_answer, decide_dns_name
from rules.special import effective_address

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_PER_APP",
    "MAX_TCP_CONNECTIONS",
    "MAX_TCP_CONNECTIONS_PER_APP",
    "TCP_IDLE_SECONDS",
    "Answer",
    "SandboxDns",
    "open_dns_listener",
]

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address

MAX_IN_FLIGHT: Final = 1024
MAX_IN_FLIGHT_PER_APP: Final = 64
MAX_TCP_CONNECTIONS: Final = 256
MAX_TCP_CONNECTIONS_PER_APP: Final = 16
TCP_IDLE_SECONDS: Final = 10.0
LISTENER: Final = "dns"


class Answer(StrEnum):
    """The ``answer`` label: what the program was told."""

    ANSWERED = "answered"  # NOERROR with addresses
    NODATA = "nodata"  # NOERROR, no addresses (other types, a family the name lacks)
    DENIED = "denied"  # NXDOMAIN: the app may not reach the name (or any address it has)
    REFUSED = "refused"  # REFUSED/FORMERR/NOTIMP: not a query we answer for this sender
    ERROR = "error"  # SERVFAIL (or NXDOMAIN from upstream): the lookup failed
    DROPPED = "dropped"  # not answered at all: MAX_IN_FLIGHT queries were being answered


_FAILURES: Final = {
    Answer.REFUSED: (wire.Rcode.REFUSED, dns.edns.EDECode.PROHIBITED),
    Answer.DENIED: (wire.Rcode.NXDOMAIN, dns.edns.EDECode.BLOCKED),
}


@dataclass(slots=True)
class _Result:
    reply: bytes | None
    answer: Answer
    outcome: Outcome
    app: str | None = None
    uid: int | None = None
    name: str | None = None
    qtype: str | None = None
    rule: str | None = None
    reported: bool = False
    addresses: int = 0
    detail: str | None = None


class SandboxDns:
    """The query handler, transport-free: bytes and a way to ask who sent them, in; bytes out.

    ``resolve`` is the proxy's (cache and metrics included); ``rules`` the live snapshot.
    """

    def __init__(
        self,
        *,
        rules: SnapshotSource,
        resolve: Callable[[str], Awaitable[Resolution]],
        metrics: ProxyMetrics,
        connlog: ConnectionLog,
        answered: AnsweredNames,
        rate: KeyedRate | None = None,
    ) -> None:
        self._rules = rules
        self._resolve = resolve
        self._metrics = metrics
        self._connlog = connlog
        self.answered = answered
        self.in_flight = 0
        self._per_app: dict[str, int] = {}
        self._rate = rate if rate is not None else KeyedRate(100.0, 200)

    def busy(self) -> bool:
        return self.in_flight >= MAX_IN_FLIGHT

    def app_of(self, uid: int | None) -> str | None:
        """The app of ``uid`` under the rules in force, if any."""
        app = self._rules.current.app_for_uid(uid) if uid is not None else None
        return None if app is None else app.name

    def refused_connection(self, app: str | None) -> None:
        """A DNS-over-TCP connection closed at accept (no app, or over a cap)."""
        self._metrics.dns_listener_query(app or UNKNOWN_APP, Answer.REFUSED.value, 0.0)

    def dropped(self) -> None:
        """A query not even read: the listener already answers MAX_IN_FLIGHT."""
        self._metrics.dns_listener_query(UNKNOWN_APP, Answer.DROPPED.value, 0.0)

    async def handle(
        self, data: bytes, sender: Callable[[], int | None], *, udp: bool
    ) -> bytes | None:
        """The reply to one query (``None``: send nothing). ``sender`` names the uid that sent
        it (raises ``OSError``/``ValueError`` when the kernel cannot say)."""
        started_wall, started = time.time(), time.perf_counter()
        self.in_flight += 1
        try:
            result = await self._answer(data, sender, udp)
        finally:
            self.in_flight -= 1
        self._account(result, started_wall, started)
        return result.reply

    async def _answer(self, data: bytes, sender: Callable[[], int | None], udp: bool) -> _Result:
        try:
            query = wire.parse_query(data)
        except wire.QueryError as exc:
            reply = None if exc.reply is None else wire.to_wire(exc.reply, None, udp=udp)
            return _Result(reply, Answer.REFUSED, Outcome.BAD_REQUEST, detail=str(exc))
        result = _Result(None, Answer.REFUSED, Outcome.BAD_REQUEST, qtype=query.qtype_text)
        result.name = query.name
        try:
            result.uid = sender()
        except (OSError, ValueError) as exc:
            return self._refuse(query, result, udp, Outcome.IDENTITY_ERROR, str(exc))
        snapshot = self._rules.current
        app = snapshot.app_for_uid(result.uid) if result.uid is not None else None
        if app is None:
            who = "no local socket" if result.uid is None else f"uid {result.uid} belongs to no app"
            return self._refuse(query, result, udp, Outcome.UNKNOWN_CLIENT, who)
        result.app = app.name
        if not self._rate.take(app.name):
            return self._refuse(
                query,
                result,
                udp,
                Outcome.RATE_LIMITED,
                f'app "{app.name}" is over its DNS query rate (proxy.dns_queries_per_second)',
            )
        count = self._per_app.get(app.name, 0)
        if count >= MAX_IN_FLIGHT_PER_APP:
            return self._refuse(
                query,
                result,
                udp,
                Outcome.TOO_MANY_CONNECTIONS,
                f'app "{app.name}" has {count} DNS queries in flight',
            )
        self._per_app[app.name] = count + 1
        try:
            return await self._decide(app, query, result, udp)
        finally:
            left = self._per_app[app.name] - 1
            if left:
                self._per_app[app.name] = left
            else:
                del self._per_app[app.name]

    async def _decide(
        self, app: AppPolicy, query: wire.Query, result: _Result, udp: bool
    ) -> _Result:
        try:
            host = canonical_host(query.name)
        except HostSyntaxError as exc:
            return self._deny(query, result, udp, Outcome.BAD_ADDRESS, str(exc))
        if not isinstance(host, str):  # "1.2.3.4." asked as a name: nothing to resolve
            return self._deny(query, result, udp, Outcome.BAD_ADDRESS, "an address, not a name")
        result.name = host
        plan = decide_dns_name(app, host)
        if not plan.must_resolve:
            return self._deny(
                query,
                result,
                udp,
                Outcome.NOT_ALLOWED,
                f'egress: app "{app.name}" may not connect to {host} (no rule names it)',
            )
        result.rule = plan.decision.rule
        result.reported = plan.decision.reported
        if not query.wants_address:
            return self._nodata(query, result, udp)
        try:
            resolution = await self._resolve(host)
        except ResolveError as exc:
            return self._lookup_failed(query, result, udp, exc)
        family = query.family()
        offered = [a for a in resolution.addresses if a.version == family]
        given: list[IPAddress] = []
        refused: str | None = None
        for address in offered:
            decision = decide_answer(app, effective_address(address), plan)
            if decision.allowed:
                given.append(address)
            elif refused is None:
                refused = decision.detail or "not allowed"
        if offered and not given:
            # The log keeps the address; the app is not told where an internal name points.
            told = (
                f'egress: app "{app.name}" may not be given the addresses of {host}'
                " (special-purpose ranges)"
            )
            return self._deny(query, result, udp, Outcome.SPECIAL_ADDRESS, refused or "", told=told)
        if not given:
            return self._nodata(query, result, udp)
        self.answered.remember(app.name, host, given, resolution.ttl)
        result.reply = wire.answer(query, given, resolution.ttl, udp=udp)
        result.answer, result.outcome, result.addresses = (
            Answer.ANSWERED,
            Outcome.ALLOWED,
            len(given),
        )
        return result

    # -- endings -------------------------------------------------------------------------------

    def _refuse(
        self, query: wire.Query, result: _Result, udp: bool, outcome: Outcome, detail: str
    ) -> _Result:
        """REFUSED: not a query answered for this sender (EDE Prohibited says why)."""
        return self._fail(query, result, udp, Answer.REFUSED, outcome=outcome, detail=detail)

    def _deny(
        self,
        query: wire.Query,
        result: _Result,
        udp: bool,
        outcome: Outcome,
        detail: str,
        *,
        told: str | None = None,
    ) -> _Result:
        """NXDOMAIN by policy (EDE Blocked says why: ``told``, else the logged ``detail``)."""
        return self._fail(
            query, result, udp, Answer.DENIED, outcome=outcome, detail=detail, told=told
        )

    def _fail(
        self,
        query: wire.Query,
        result: _Result,
        udp: bool,
        answer: Answer,
        *,
        outcome: Outcome,
        detail: str,
        told: str | None = None,
    ) -> _Result:
        rcode, ede = _FAILURES[answer]
        text = detail if told is None else told
        result.reply = wire.failure(query, rcode, udp=udp, ede=ede, text=text)
        result.answer, result.outcome, result.detail = answer, outcome, detail
        return result

    def _nodata(self, query: wire.Query, result: _Result, udp: bool) -> _Result:
        result.reply = wire.answer(query, (), 0, udp=udp)
        result.answer, result.outcome = Answer.NODATA, Outcome.ALLOWED
        return result

    def _lookup_failed(
        self, query: wire.Query, result: _Result, udp: bool, exc: ResolveError
    ) -> _Result:
        result.detail = str(exc)
        if exc.kind is ResolveFailure.NO_ADDRESS:
            return self._nodata(query, result, udp)
        nxdomain = exc.kind is ResolveFailure.NXDOMAIN
        rcode = wire.Rcode.NXDOMAIN if nxdomain else wire.Rcode.SERVFAIL
        result.reply = wire.failure(query, rcode, udp=udp)
        timeout = exc.kind is ResolveFailure.TIMEOUT
        result.answer = Answer.ERROR
        result.outcome = Outcome.DNS_TIMEOUT if timeout else Outcome.DNS_FAILURE
        return result

    def _account(self, result: _Result, started_wall: float, started: float) -> None:
        seconds = time.perf_counter() - started
        self._metrics.dns_listener_query(result.app or UNKNOWN_APP, result.answer.value, seconds)
        if result.answer is Answer.ANSWERED or result.answer is Answer.NODATA:
            decision = "reported" if result.reported else "allowed"
        elif result.answer is Answer.ERROR or result.outcome is Outcome.BAD_REQUEST:
            decision = "error"
        else:
            decision = "denied"
        self._connlog.emit(
            {
                "ts": round(started_wall, 3),
                "listener": LISTENER,
                "uid": result.uid,
                "app": result.app,
                "rules_version": self._rules.current.version,
                "dest": untrusted(result.name),
                "qtype": result.qtype,
                "decision": decision,
                "reason": ("not_allowed" if result.reported else result.outcome.value),
                "rule": result.rule,
                "answer": result.answer.value,
                "addresses": result.addresses,
                "duration_ms": round(seconds * 1000, 3),
                "error": untrusted(result.detail),
            }
        )


# --- transports ---------------------------------------------------------------------------------


SO_RCVMARK: Final = 75  # asm-generic/socket.h (Linux 5.19): the packet mark as ancillary data
_SO_MARK: Final = 36
_MARK: Final = struct.Struct("=I")
_READS_PER_WAKEUP: Final = 64  # then the loop's other work gets its turn


class _UdpEndpoint:
    """The UDP side: datagrams read with ``recvmsg`` (a transport gives no ancillary data), so
    the packet mark the firewall set (the sending app's first uid) arrives with each query."""

    def __init__(self, sock: socket.socket, handler: SandboxDns, owners: UdpOwnerLookup) -> None:
        self.sock = sock
        self._handler = handler
        self._owners = owners
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
            self.marks = True
        except OSError as exc:  # a kernel before 5.19: the sock_diag lookup alone
            log.warning("dns listener: no SO_RCVMARK (%s); senders found by sock_diag only", exc)
            self.marks = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            try:
                data, ancillary, _flags, addr = self.sock.recvmsg(
                    wire.MAX_QUERY_BYTES + 1, socket.CMSG_SPACE(_MARK.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error of an earlier send
                log.debug("dns listener: %s", exc)
                return
            mark = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_MARK and len(payload) >= _MARK.size:
                    (mark,) = _MARK.unpack_from(payload)
            # Counted before any task runs: a burst read in one turn cannot get past the cap.
            if len(self._tasks) >= MAX_IN_FLIGHT:
                self._handler.dropped()  # no answer: the client's own retry comes later
                continue
            task = self._loop.create_task(self._serve(data, addr, mark))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _sender(self, host: str, port: int, mark: int) -> int | None:
        """The sending uid. A mark names the sending app (the kernel's owner match, set by the
        firewall); the sender is then that app's socket on the port, and no other app's, however
        many share it. Without one, the sock_diag lookup alone decides."""
        if not mark:
            return self._owners.lookup(host, port)
        app = self._handler.app_of(mark)
        if app is None:
            return None
        return self._owners.lookup(host, port, claimed=lambda uid: self._handler.app_of(uid) == app)

    async def _serve(self, data: bytes, addr: Any, mark: int) -> None:
        host, port = addr[0], addr[1]
        reply = await self._handler.handle(data, lambda: self._sender(host, port, mark), udp=True)
        if reply is not None and self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):  # a full buffer drops it, as the network would
                self.sock.sendto(reply, addr)

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close()


class _TcpProtocol(asyncio.Protocol):
    """RFC 7766 DNS over TCP: two-byte lengths, queries answered in order, idle close."""

    def __init__(self, server: DnsListener) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._uid: int | None = None
        self._app: str | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        self._worker: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admitted only for a uid of an app, within the app's share of connections and the
        listener's: a connection is held by its app, so no uid can take them all."""
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        server = self._server
        try:
            self._uid = self._identify(transport)
        except (OSError, ValueError):
            self._uid = None
        app = server.handler.app_of(self._uid)
        held = server.tcp_per_app.get(app, 0) if app is not None else 0
        if (
            app is None
            or held >= MAX_TCP_CONNECTIONS_PER_APP
            or len(server.tcp_connections) >= MAX_TCP_CONNECTIONS
        ):
            server.handler.refused_connection(app)
            transport.abort()
            self._transport = None
            return
        self._app = app
        server.tcp_per_app[app] = held + 1
        server.tcp_connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._work())
        self._touch()

    def _identify(self, transport: asyncio.Transport) -> int | None:
        sock = transport.get_extra_info("socket")
        remote = None
        with contextlib.suppress(OriginalDestinationError):
            address, port = original_destination(sock)
            if (address, port) != self._server.address_tuple:
                peer = transport.get_extra_info("peername")
                mapped = address.version == 4 and peer and peer[0].startswith("::ffff:")
                remote = (f"::ffff:{address}" if mapped else str(address), port)
        return self._server.tcp_owners(transport, remote=remote)

    def _sender(self) -> int | None:
        return self._uid  # identified once, at accept

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(TCP_IDLE_SECONDS, self._close)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        """Queries out of the byte stream. Only a complete query restarts the idle timer: a
        client trickling bytes that never make one is closed like an idle one."""
        self._buffer += data
        while len(self._buffer) >= 2:
            length = int.from_bytes(self._buffer[:2], "big")
            if length > wire.MAX_QUERY_BYTES or length == 0:
                self._close()
                return
            if len(self._buffer) < 2 + length:
                break
            query = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            self._touch()
            try:
                self._queue.put_nowait(query)
            except asyncio.QueueFull:  # pipelining past what we answer at once
                assert self._transport is not None
                self._transport.pause_reading()
                self._queue_later(query)
                return
        if len(self._buffer) > 2 + wire.MAX_QUERY_BYTES:
            self._close()

    def _queue_later(self, query: bytes) -> None:
        async def put() -> None:
            await self._queue.put(query)
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
                if self._buffer:
                    self.data_received(b"")

        asyncio.get_running_loop().create_task(put())

    async def _work(self) -> None:
        handler = self._server.handler
        while True:
            query = await self._queue.get()
            if handler.busy():
                self._close()
                return
            reply = await handler.handle(query, self._sender, udp=False)
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            if reply is None:
                self._close()
                return
            transport.write(len(reply).to_bytes(2, "big") + reply)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        if self in server.tcp_connections:
            server.tcp_connections.discard(self)
            assert self._app is not None
            left = server.tcp_per_app[self._app] - 1
            if left:
                server.tcp_per_app[self._app] = left
            else:
                del server.tcp_per_app[self._app]
        if self._idle is not None:
            self._idle.cancel()
        if self._worker is not None:
            self._worker.cancel()
        self._transport = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class DnsListener:
    """The UDP endpoint and the TCP server of one ``proxy.dns_listen`` address."""

    def __init__(self, handler: SandboxDns, tcp_owners: Identify) -> None:
        self.handler = handler
        self.tcp_owners = tcp_owners
        self.tcp_connections: set[_TcpProtocol] = set()
        self.tcp_per_app: dict[str, int] = {}
        self.address = ""
        self.address_tuple: tuple[IPAddress, int] | None = None
        self._udp: _UdpEndpoint | None = None
        self._udp_owners: UdpOwnerLookup | None = None
        self._tcp: asyncio.Server | None = None

    async def open(self, listen: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self._udp_owners = UdpOwnerLookup()
        last: OSError | None = None
        for _attempt in range(5 if listen.port == 0 else 1):  # port 0: UDP picks, TCP follows
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((listen.host, listen.port))
            except OSError as exc:
                sock.close()
                raise ListenerError(
                    f"proxy.dns_listen: cannot listen on {listen} (UDP): {exc.strerror}"
                ) from exc
            protocol = _UdpEndpoint(sock, self.handler, self._owners())
            port = sock.getsockname()[1]
            try:
                self._tcp = await loop.create_server(
                    lambda: _TcpProtocol(self), listen.host, port, family=family,
                    reuse_address=True,
                )  # fmt: skip
            except OSError as exc:
                last = exc
                await protocol.aclose()
                continue
            self._udp = protocol
            host = listen.host
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.address_tuple = (effective_address(ip_address(host)), port)
            return
        assert last is not None
        raise ListenerError(f"proxy.dns_listen: cannot listen on {listen} (TCP): {last.strerror}")

    def _owners(self) -> UdpOwnerLookup:
        assert self._udp_owners is not None
        return self._udp_owners

    async def aclose(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self.tcp_connections):
                connection.abort()
        if self._udp is not None:
            await self._udp.aclose()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        if self._udp_owners is not None:
            self._udp_owners.close()


async def open_dns_listener(
    listen: ListenAddress, handler: SandboxDns, tcp_owners: Identify
) -> DnsListener:
    """Listen on ``listen`` (UDP and TCP); raises :class:`ListenerError`."""
    listener = DnsListener(handler, tcp_owners)
    await listener.open(listen)
    return listener
