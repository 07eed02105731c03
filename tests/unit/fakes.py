"""Fake asyncio transports and fake context parts for unit tests of the connection drivers and
the relay.

Why fakes and not sockets: these tests drive exact interleavings of protocol callbacks that real
sockets cannot produce on demand: upstream bytes (or an EOF, or a reset) that arrive after the
connect but before the tunnel exists, a client EOF delivered while reading is paused (uvloop
does that), a write buffer that crosses its high-water mark at one chosen write and drains at
another, a dial that completes exactly when the test says so or never. Everything that is cheap
to use for real is real: :class:`ProxyMetrics` (read back with ``get_sample_value``), the
:class:`ConnectionRegistry`, a :class:`PolicySnapshot` compiled from a :class:`RuleSet`, the
sans-I/O parsers and, where a test says so, the real :class:`ConnectionLog`.

:class:`FakeTransport` follows asyncio's selector transport where the drivers can tell the
difference: ``connection_lost`` is called once, later, through ``loop.call_soon``; ``close()``
waits for the write buffer to drain and ``abort()`` does not; ``write()`` after ``write_eof()``
raises; ``pause_writing``/``resume_writing`` fire when the buffer passes the high-water mark and
falls back to the low-water mark; bytes and EOF fed while reading is paused wait until reading
resumes, unless the test says the loop ignored the pause.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import socket
import struct
from collections.abc import Callable, Coroutine, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, TypeVar

from egress.connlog import ConnectionLog
from egress.context import ConnectionContext, ProxySettings
from egress.limits import ConnectionLimits
from egress.metrics import ProxyMetrics
from egress.net.connection import ClientConnection
from egress.net.dialer import DialError, Dialled
from egress.net.registry import ConnectionRegistry, Tracked
from egress.net.relay import UpstreamSide
from egress.net.transparent import IP6T_SO_ORIGINAL_DST, SO_ORIGINAL_DST
from egress.outcomes import Outcome
from egress.resolver import Resolution, ResolveError, ResolveFailure
from egress.shaping import BandwidthShaper
from ratelimit.failover import Limiter
from ratelimit.memory import MemoryBuckets
from rules.apps import RuleSet
from rules.snapshot import PolicySnapshot
from rules.special import SpecialExceptions

__all__ = [
    "APP_UID",
    "NAMES",
    "OTHER_APP_UID",
    "RULES",
    "STRANGER_UID",
    "DialAttempt",
    "FakeDialer",
    "FakeIdentify",
    "FakeResolver",
    "FakeRules",
    "FakeSocket",
    "FakeTransport",
    "Harness",
    "RecordingLog",
    "SpyRegistry",
    "connected_upstream",
    "make_snapshot",
    "run",
    "until",
]

T = TypeVar("T")
IPAddress = IPv4Address | IPv6Address

APP_UID = 10001
OTHER_APP_UID = 10002
STRANGER_UID = 10999  # belongs to no app

RULES: dict[str, Any] = {
    "app": [
        {"name": "blog", "uids": [APP_UID], "allow": ["api.example.com:443", "www.example.com:80"]},
        {"name": "worker", "uids": [OTHER_APP_UID], "allow": ["*.example.org:443"]},
    ]
}
NAMES: dict[str, tuple[IPAddress, ...]] = {
    "api.example.com": (IPv4Address("93.184.216.34"),),
    "www.example.com": (IPv4Address("93.184.216.35"),),
    "static.example.org": (IPv4Address("151.101.1.10"),),
}


def run(coro: Coroutine[Any, Any, T], *, timeout: float = 10.0) -> T:
    """Run ``coro`` on a fresh asyncio loop; fail if the loop saw an unhandled exception
    (a protocol callback that raised, a task exception nobody retrieved)."""
    errors: list[dict[str, Any]] = []

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner() as runner:
        result = runner.run(main())
    assert not errors, f"the event loop reported unhandled errors: {errors}"
    return result


async def until(condition: Callable[[], object], what: str, *, turns: int = 200) -> None:
    """Let the loop run until ``condition()`` holds, for at most ``turns`` iterations."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    if not condition():
        raise AssertionError(f"not within {turns} loop turns: {what}")


def make_snapshot(
    version: int = 3,
    data: Mapping[str, Any] = RULES,
    *,
    special: Sequence[str] = (),
) -> PolicySnapshot:
    ruleset = RuleSet.from_data(data, version=version, source="test")
    return PolicySnapshot.build(ruleset, SpecialExceptions.parse(list(special)))


# --- transports ------------------------------------------------------------------------------


class FakeSocket:
    """What ``transport.get_extra_info("socket")`` gives a transparent connection: a peer name
    and ``SO_ORIGINAL_DST`` as conntrack would answer it (``OSError`` if not redirected)."""

    def __init__(
        self,
        *,
        original: tuple[IPAddress, int] | None,
        peer: tuple[str, int] = ("10.0.0.2", 50000),
        family: int = socket.AF_INET,
    ) -> None:
        self.original = original
        self.peer = peer
        self.family = family
        self.options: dict[tuple[int, int], bytes | int] = {}  # what setsockopt set

    def getpeername(self) -> tuple[str, int]:
        return self.peer

    def setsockopt(self, level: int, option: int, value: bytes | int) -> None:
        self.options[level, option] = value

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> bytes:
        if self.original is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        address, port = self.original
        if address.version == 4:
            assert (level, option) == (socket.SOL_IP, SO_ORIGINAL_DST)
            head = struct.pack("=H", socket.AF_INET)  # sa_family is in host byte order
            return head + struct.pack("!H4s8x", port, address.packed)
        assert (level, option) == (socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST)
        head = struct.pack("=H", socket.AF_INET6)
        return head + struct.pack("!HI16sI", port, 0, address.packed, 0)


_EOF = None  # marks an EOF in a transport's inbound queue


class FakeTransport(asyncio.Transport):
    """An in-memory stream transport; the test plays the peer.

    ``written`` is every byte the protocol wrote, in order (what the peer will see). With
    ``auto_drain`` the peer takes bytes as soon as they are written; without it they sit in the
    write buffer until :meth:`drain`, which is how a slow reader is played.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        auto_drain: bool = True,
        can_write_eof: bool = True,
    ) -> None:
        super().__init__(dict(extra or {}))
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._protocol: asyncio.BaseProtocol | None = None
        self.auto_drain = auto_drain
        self._can_write_eof = can_write_eof
        self.written = bytearray()
        self.buffered = 0  # bytes written that the peer has not taken yet
        self.discarded = 0  # buffered bytes thrown away by abort() or a reset
        self.writes_after_close = bytearray()
        self._high_water = 64 * 1024
        self._low_water = 16 * 1024
        self._protocol_paused = False  # pause_writing() was called, resume_writing() not yet
        self._paused = False  # reading
        self._closing = False
        self._lost_scheduled = False
        self.lost = False  # connection_lost() has been delivered
        self.lost_exc: BaseException | None = None
        self.aborted = False
        self.closed_by_protocol = False  # close() was called
        self.eof_written = False
        self.peer_eof = False  # the peer's EOF was delivered to the protocol
        self._inbound: collections.deque[bytes | None] = collections.deque()
        self.pause_reading_calls = 0
        self.resume_reading_calls = 0

    # --- test side (the peer) ---------------------------------------------------------------
    def connect(self, protocol: asyncio.BaseProtocol) -> None:
        """The loop accepted/connected this transport for ``protocol``."""
        self._protocol = protocol
        protocol.connection_made(self)

    def feed(self, data: bytes, *, ignore_pause: bool = False) -> bool:
        """The peer sent ``data``. While reading is paused the bytes wait for resume_reading(),
        unless ``ignore_pause`` (uvloop may deliver one more read after a pause). Returns
        whether the protocol got them now."""
        if self._closing:
            return False
        if not ignore_pause and (self._paused or self._inbound):
            self._inbound.append(data)
            return False
        self._deliver(data)
        return True

    def feed_eof(self, *, ignore_pause: bool = False) -> bool:
        """The peer half-closed (FIN); same pause rules as :meth:`feed`."""
        if self._closing:
            return False
        if not ignore_pause and (self._paused or self._inbound):
            self._inbound.append(_EOF)
            return False
        self._deliver(_EOF)
        return True

    def peer_reset(self, exc: BaseException | None = None) -> None:
        """The connection broke (RST): buffered bytes are lost, connection_lost(exc) follows."""
        self._force_close(exc if exc is not None else ConnectionResetError(errno.ECONNRESET, ""))

    def drain(self, nbytes: int | None = None) -> None:
        """The peer read ``nbytes`` (default: everything) out of the write buffer."""
        taken = self.buffered if nbytes is None else min(nbytes, self.buffered)
        self.buffered -= taken
        self._maybe_resume_protocol()
        if self._closing and not self.buffered and not self._lost_scheduled:
            self._schedule_lost(None)

    @property
    def pending_inbound(self) -> int:
        return len(self._inbound)

    @property
    def protocol_paused(self) -> bool:
        return self._protocol_paused

    # --- asyncio.Transport ------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._lost_scheduled:
            self.writes_after_close += data  # asyncio drops these (and warns after a few)
            return
        self.written += data
        if not self.auto_drain:
            self.buffered += len(data)
            self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if self._closing or self.eof_written:
            return
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.closed_by_protocol = True
        self._inbound.clear()
        if not self.buffered:
            self._schedule_lost(None)

    def abort(self) -> None:
        self.aborted = True
        self._force_close(None)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._paused = True
        self.pause_reading_calls += 1

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self.resume_reading_calls += 1
        if self._inbound:
            self._loop.call_soon(self._deliver_inbound)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def get_write_buffer_size(self) -> int:
        return self.buffered

    # --- internals --------------------------------------------------------------------------
    def _deliver(self, item: bytes | None) -> None:
        protocol = self._protocol
        assert isinstance(protocol, asyncio.Protocol)
        if item is _EOF:
            self.peer_eof = True
            if not protocol.eof_received():
                self.close()
        else:
            protocol.data_received(item)

    def _deliver_inbound(self) -> None:
        while self._inbound and not self._paused and not self._closing:
            self._deliver(self._inbound.popleft())

    def _maybe_pause_protocol(self) -> None:
        if self.buffered > self._high_water and not self._protocol_paused:
            self._protocol_paused = True
            assert self._protocol is not None
            self._protocol.pause_writing()

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.buffered <= self._low_water:
            self._protocol_paused = False
            assert self._protocol is not None
            self._protocol.resume_writing()

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost_scheduled:
            return
        self.discarded += self.buffered
        self.buffered = 0
        self._closing = True
        self._inbound.clear()
        self._schedule_lost(exc)

    def _schedule_lost(self, exc: BaseException | None) -> None:
        self._lost_scheduled = True
        self._loop.call_soon(self._call_lost, exc)

    def _call_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.lost_exc = exc
        assert self._protocol is not None
        self._protocol.connection_lost(exc)  # type: ignore[arg-type]


def connected_upstream(
    *, sockname: tuple[str, int] = ("10.9.8.7", 40000), auto_drain: bool = True
) -> tuple[UpstreamSide, FakeTransport]:
    """An UpstreamSide whose (fake) connect just succeeded: reading paused, no tunnel yet."""
    side = UpstreamSide()
    transport = FakeTransport(extra={"sockname": sockname}, auto_drain=auto_drain)
    transport.connect(side)
    return side, transport


# --- context parts ---------------------------------------------------------------------------


class FakeIdentify:
    """The kernel's answer for every accepted client: ``answer`` is a uid, ``None`` (no local
    owner) or an exception to raise."""

    def __init__(self, answer: int | BaseException | None = APP_UID) -> None:
        self.answer = answer
        self.remotes: list[tuple[str, int] | None] = []

    def __call__(self, transport: Any, *, remote: tuple[str, int] | None = None) -> int | None:
        self.remotes.append(remote)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class DialAttempt:
    """One call of the fake dialer; the test decides when (and whether) it connects."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        addresses: tuple[IPAddress, ...],
        port: int,
        deadline: float,
    ) -> None:
        self.addresses = addresses
        self.port = port
        self.deadline = deadline
        self.called_at = loop.time()
        self.future: asyncio.Future[Dialled] = loop.create_future()
        self.side: UpstreamSide | None = None
        self.transport: FakeTransport | None = None

    def connect(
        self, *, sockname: tuple[str, int] = ("10.9.8.7", 40000), auto_drain: bool = True
    ) -> FakeTransport:
        """The TCP connect succeeded (connection_made ran) but dial() has not returned yet."""
        self.side, self.transport = connected_upstream(sockname=sockname, auto_drain=auto_drain)
        return self.transport

    def finish(self) -> None:
        """dial() returns the connected upstream."""
        assert self.side is not None, "connect() first"
        self.future.set_result(Dialled(self.side, self.addresses[0], self.port))

    def complete(self, **kwargs: Any) -> FakeTransport:
        transport = self.connect(**kwargs)
        self.finish()
        return transport

    def fail(self, outcome: Outcome, detail: str) -> None:
        self.future.set_exception(DialError(outcome, detail))

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


class FakeDialer:
    """``ctx.dial``: records each call as a :class:`DialAttempt` and waits for the test; like
    the real dialer, it gives up at the deadline (``connect_timeout``)."""

    def __init__(self) -> None:
        self.attempts: list[DialAttempt] = []
        self._called = asyncio.Event()

    async def __call__(
        self, addresses: Sequence[IPAddress], port: int, *, deadline: float
    ) -> Dialled:
        attempt = DialAttempt(asyncio.get_running_loop(), tuple(addresses), port, deadline)
        self.attempts.append(attempt)
        self._called.set()
        try:
            async with asyncio.timeout_at(deadline):
                return await attempt.future
        except TimeoutError:
            raise DialError(Outcome.CONNECT_TIMEOUT, "timed out") from None

    async def next_attempt(self, index: int = 0, *, timeout: float = 2.0) -> DialAttempt:
        """Attempt number ``index`` (from 0), once the driver has made it."""
        async with asyncio.timeout(timeout):
            while len(self.attempts) <= index:
                self._called.clear()
                await self._called.wait()
        return self.attempts[index]


class FakeResolver:
    """``ctx.resolver``: answers from ``names``; an unknown name is NXDOMAIN. ``delay`` (loop
    seconds) plays a slow DNS server, ``hang`` one that never answers."""

    def __init__(
        self,
        names: Mapping[str, tuple[IPAddress, ...]] = NAMES,
        cached: Mapping[IPAddress, tuple[str, ...]] | None = None,
    ) -> None:
        self.names = dict(names)
        self.cached = dict(cached or {})
        self.delay = 0.0
        self.hang = False
        self.lookups: list[str] = []

    async def resolve(self, name: str) -> Resolution:
        self.lookups.append(name)
        if self.hang:
            await asyncio.get_running_loop().create_future()
        if self.delay:
            await asyncio.sleep(self.delay)
        addresses = self.names.get(name)
        if addresses is None:
            raise ResolveError(name, ResolveFailure.NXDOMAIN, "no such name")
        return Resolution(name, addresses, 60.0, False)

    def cached_names_for(self, address: IPAddress) -> tuple[str, ...]:
        return self.cached.get(address, ())


class FakeRules:
    """``ctx.rules``: holds the current snapshot, replaced by assignment (a reload)."""

    def __init__(self, current: PolicySnapshot) -> None:
        self.current = current


class RecordingLog:
    """``ctx.connlog`` with the same ``emit`` / ``emit_line`` as :class:`ConnectionLog`, kept
    in memory; every line must be one valid JSON object."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))
        self._changed.set()

    def emit_line(self, line: str) -> None:
        assert line.isascii() and "\n" not in line, line
        record = json.loads(line)
        assert isinstance(record, dict), line
        self.emit(record)

    async def wait_for(self, count: int = 1, *, timeout: float = 2.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.records


class SpyRegistry(ConnectionRegistry):
    """The real registry, also counting releases per connection and the open-connections gauge
    after each one (it must never go negative)."""

    def __init__(self, metrics: ProxyMetrics, **limits: int) -> None:
        super().__init__(metrics, **limits)
        self.releases: collections.Counter[int] = collections.Counter()
        self.gauge_after_release: list[float] = []
        self._gauge = lambda: metrics.registry.get_sample_value("egress_open_connections")

    def release(self, connection: Tracked) -> None:
        super().release(connection)
        self.releases[id(connection)] += 1
        self.gauge_after_release.append(self._gauge() or 0.0)


class Harness:
    """A :class:`ConnectionContext` of real metrics/registry/snapshot and fake I/O parts."""

    def __init__(
        self,
        *,
        settings: ProxySettings | None = None,
        snapshot: PolicySnapshot | None = None,
        connlog_path: Path | None = None,
        max_connections: int = 10000,
        max_handshakes_per_app: int = 64,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.settings = settings or ProxySettings()
        self.metrics = ProxyMetrics()
        self.registry = SpyRegistry(
            self.metrics,
            max_connections=max_connections,
            max_handshakes_per_app=max_handshakes_per_app,
        )
        self.connlog_path = connlog_path
        self.file_log = ConnectionLog(str(connlog_path)) if connlog_path is not None else None
        self.log = RecordingLog()
        self.identify = FakeIdentify()
        self.dialer = FakeDialer()
        self.resolver = FakeResolver()
        self.rules = FakeRules(snapshot if snapshot is not None else make_snapshot())
        self.own_listeners: set[tuple[IPAddress, int]] = set()
        # The real limits on memory buckets, on a clock the test moves (microseconds).
        self.now_us = 0
        self.limits = ConnectionLimits(
            Limiter(None, MemoryBuckets(lambda: self.now_us)),
            self.metrics,
            shaper=BandwidthShaper(lambda: self.now_us * 1000),
        )
        self.context = ConnectionContext(
            settings=self.settings,
            resolver=self.resolver,
            metrics=self.metrics,
            connlog=self.file_log if self.file_log is not None else self.log,  # type: ignore[arg-type]
            identify=self.identify,
            dial=self.dialer,
            rules=self.rules,
            registry=self.registry,
            is_own_listener=lambda address, port: (address, port) in self.own_listeners,
            limits=self.limits,
            loop=self.loop,
        )

    def accept(
        self,
        factory: Callable[[ConnectionContext], ClientConnection],
        *,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[ClientConnection, FakeTransport]:
        """A client connected to a listener whose protocol factory is ``factory``."""
        info = {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 1080)}
        info.update(extra or {})
        transport = FakeTransport(self.loop, extra=info)
        connection = factory(self.context)
        transport.connect(connection)
        return connection, transport

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @property
    def open_connections(self) -> float:
        return self.sample("egress_open_connections")

    async def records(self, count: int = 1, *, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The connection log lines, once ``count`` have been written."""
        if self.file_log is None:
            return await self.log.wait_for(count, timeout=timeout)
        import json

        assert self.connlog_path is not None
        path = self.connlog_path
        async with asyncio.timeout(timeout):
            while True:
                self.file_log.flush()
                text = path.read_text() if path.exists() else ""
                complete = text[: text.rfind("\n") + 1]  # the writer thread may be mid-line
                lines = [json.loads(line) for line in complete.splitlines() if line]
                if len(lines) >= count:
                    return lines
                await asyncio.sleep(0.002)  # the line is written by the log's thread

    def close(self) -> None:
        if self.file_log is not None:
            self.file_log.close()
