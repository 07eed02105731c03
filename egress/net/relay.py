"""Relay bytes between a client and an upstream transport, without a task per tunnel.

A :class:`Tunnel` owns both transports from the moment the upstream connect succeeds until both
are closed. Two small protocol objects forward callbacks to it. Design points:

* Backpressure: when one side's write buffer passes its high-water mark, the other side stops
  reading until it drains, so memory per tunnel stays bounded whatever the peers do.
* Half-close: EOF from one side becomes ``write_eof()`` on the other; the tunnel closes when both
  directions are finished or either side is lost.
* Bandwidth shaping (optional): each read is relayed and charged to the app's byte bucket;
  when the bucket is in debt, that side stops reading for a while (one timer, no task).
  Reading resumes only when neither backpressure nor shaping holds it. Data is never dropped.
* Idle timeout: one timer per tunnel, re-armed lazily from the last activity time; a side held
  by shaping is not idle.
* Every transport is referenced until ``connection_lost``; uvloop can crash if a paused
  transport is collected while libuv still holds its handle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class StreamFilter(Protocol):
    """Transforms the bytes of a tunnel (plain HTTP forwarding rewrites headers).

    The transforming methods raise ``ValueError`` on a protocol violation by either peer;
    ``failure_reply`` then says what, if anything, the client should still be sent.
    """

    def client_data(self, data: bytes) -> bytes: ...

    def upstream_data(self, data: bytes) -> bytes: ...

    def upstream_eof(self) -> bytes: ...

    @property
    def done(self) -> bool: ...

    def failure_reply(self, error: ValueError) -> bytes: ...


class TunnelShaper(Protocol):
    """Charges the bytes a tunnel just read to its app's bandwidth; each method returns the
    seconds that side should stop reading (0 to go on). See :mod:`egress.shaping`."""

    def up(self, nbytes: int) -> float: ...

    def down(self, nbytes: int) -> float: ...


class UpstreamSide(asyncio.Protocol):
    """The upstream leg. Created before the connect so a server that talks first is not lost:
    reading is paused until the tunnel starts, and anything that arrives anyway (uvloop does
    not always honour a pause made in ``connection_made``) is kept and delivered first."""

    __slots__ = ("_early", "_lost_exc", "_pending_eof", "_pending_lost", "_tunnel", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._tunnel: Tunnel | None = None
        self._pending_eof = False
        self._pending_lost = False
        self._lost_exc: Exception | None = None
        self._early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.on_upstream_data(data)
            return
        self._early += data
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self._tunnel is None:
            self._pending_eof = True
            return True
        return self._tunnel.on_upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tunnel is None:
            self._pending_lost = True
            self._lost_exc = exc
            return
        self._tunnel.on_upstream_lost(exc)

    def pause_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.pause_client_reading()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.resume_client_reading()


class ClientSide(asyncio.Protocol):
    """The client leg, installed with ``transport.set_protocol`` once the handshake is done."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self._tunnel.on_client_data(data)

    def eof_received(self) -> bool:
        return self._tunnel.on_client_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel.on_client_lost(exc)

    def pause_writing(self) -> None:
        self._tunnel.pause_upstream_reading()

    def resume_writing(self) -> None:
        self._tunnel.resume_upstream_reading()


class Tunnel:
    """One established tunnel: counts the bytes written to each side (``bytes_up`` to the
    upstream, ``bytes_down`` to the client) and reports once when it ends."""

    __slots__ = (
        "_client",
        "_client_eof",
        "_client_held",
        "_client_lost",
        "_client_paused",
        "_filter",
        "_idle_timeout",
        "_idle_timer",
        "_loop",
        "_on_closed",
        "_shaper",
        "_upstream",
        "_upstream_early",
        "_upstream_eof",
        "_upstream_held",
        "_upstream_lost",
        "_upstream_paused",
        "bytes_down",
        "bytes_up",
        "end_reason",
        "failure",
        "last_activity",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        upstream_side: UpstreamSide,
        *,
        idle_timeout: float,
        on_closed: Callable[[Tunnel], None],
        stream_filter: StreamFilter | None = None,
        shaper: TunnelShaper | None = None,
    ) -> None:
        if upstream_side.transport is None:
            raise RuntimeError("Tunnel needs a connected upstream")
        self._loop = asyncio.get_running_loop()
        self._client = client
        self._upstream = upstream_side.transport
        self._filter = stream_filter
        self._idle_timeout = idle_timeout
        self._on_closed: Callable[[Tunnel], None] | None = on_closed
        self._client_eof = False
        self._upstream_eof = False
        self._client_lost = False
        self._upstream_lost = False
        # reading paused because the other side's write buffer is full (backpressure)
        self._client_paused = False
        self._upstream_paused = False
        # reading held by bandwidth shaping until the timer fires
        self._shaper = shaper
        self._client_held: asyncio.TimerHandle | None = None
        self._upstream_held: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.end_reason: str | None = None
        self.failure: ValueError | None = None  # the stream filter's protocol error, if any
        self.last_activity = self._loop.time()
        upstream_side._tunnel = self
        client.set_protocol(ClientSide(self))
        client.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._upstream.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._upstream_early = bytes(upstream_side._early)
        upstream_side._early.clear()
        if upstream_side._pending_lost:
            self._upstream_lost = True
            if upstream_side._lost_exc is not None:
                self.end_reason = f"upstream: {_describe(upstream_side._lost_exc)}"
        elif upstream_side._pending_eof:
            self._upstream_eof = True

    def start(
        self, client_bytes: bytes = b"", *, upstream_bytes: bytes = b"", client_eof: bool = False
    ) -> None:
        """Begin relaying.

        ``upstream_bytes`` are ready to send as they are (a rewritten request head);
        ``client_bytes`` came from the client before the tunnel existed and go through the
        stream filter like any later bytes; ``client_eof`` says the client already half-closed.
        """
        if upstream_bytes:
            self._write_up(upstream_bytes)
        if client_bytes:
            self.on_client_data(client_bytes)
        if self._upstream_early:
            early, self._upstream_early = self._upstream_early, b""
            self.on_upstream_data(early)
        if self._upstream_lost:
            self.on_upstream_lost(None)
            return
        if self._upstream_eof:
            self._upstream_eof = False
            self.on_upstream_eof()
        if client_eof and not self._client_eof:
            self.on_client_eof()
        if (
            not self._upstream.is_closing()
            and not self._upstream_paused
            and self._upstream_held is None
        ):
            self._upstream.resume_reading()
        if not self._client.is_closing() and not self._client_paused and self._client_held is None:
            self._client.resume_reading()
        self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)

    # client -> upstream; bytes are counted as written to the other side
    def on_client_data(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        shaper = self._shaper
        if shaper is not None and (delay := shaper.up(len(data))) > 0:
            self._hold_client(delay)
        if self._filter is not None:
            try:
                data = self._filter.client_data(data)
            except ValueError as exc:
                self._filter_failed(exc)
                return
        if data:
            self._write_up(data)

    def _write_up(self, data: bytes) -> None:
        if not self._upstream_lost:
            self.bytes_up += len(data)
            self._upstream.write(data)

    def _write_down(self, data: bytes) -> None:
        if not self._client_lost:
            self.bytes_down += len(data)
            self._client.write(data)

    def on_client_eof(self) -> bool:
        self._client_eof = True
        if self._upstream_eof or self._upstream_lost:
            self._finish("closed")
            return False
        if self._upstream.can_write_eof() and not self._upstream.is_closing():
            self._upstream.write_eof()
        return True

    def on_client_lost(self, exc: Exception | None) -> None:
        self._client_lost = True
        self._cancel_holds()
        if exc is not None and self.end_reason is None:
            self.end_reason = f"client: {_describe(exc)}"
        if not self._upstream_lost:
            self._upstream.close()
        self._maybe_closed()

    # upstream -> client
    def on_upstream_data(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        shaper = self._shaper
        if shaper is not None and (delay := shaper.down(len(data))) > 0:
            self._hold_upstream(delay)
        if self._filter is not None:
            try:
                data = self._filter.upstream_data(data)
            except ValueError as exc:
                self._filter_failed(exc)
                return
        if data:
            self._write_down(data)
        if self._filter is not None and self._filter.done:
            self._finish("closed")

    def on_upstream_eof(self) -> bool:
        self._upstream_eof = True
        if self._filter is not None:
            try:
                tail = self._filter.upstream_eof()
            except ValueError as exc:
                self._filter_failed(exc)
                return False
            if tail:
                self._write_down(tail)
            self._finish("closed")
            return False
        if self._client_eof or self._client_lost:
            self._finish("closed")
            return False
        if self._client.can_write_eof() and not self._client.is_closing():
            self._client.write_eof()
        return True

    def on_upstream_lost(self, exc: Exception | None) -> None:
        self._upstream_lost = True
        self._cancel_holds()
        if exc is not None and self.end_reason is None:
            self.end_reason = f"upstream: {_describe(exc)}"
        if not self._client_lost:
            self._client.close()
        self._maybe_closed()

    # backpressure
    def pause_client_reading(self) -> None:
        self._client_paused = True
        if not self._client.is_closing():
            self._client.pause_reading()

    def resume_client_reading(self) -> None:
        self._client_paused = False
        if self._client_held is None and not self._client.is_closing():
            self._client.resume_reading()

    def pause_upstream_reading(self) -> None:
        self._upstream_paused = True
        if not self._upstream.is_closing():
            self._upstream.pause_reading()

    def resume_upstream_reading(self) -> None:
        self._upstream_paused = False
        if self._upstream_held is None and not self._upstream.is_closing():
            self._upstream.resume_reading()

    # bandwidth shaping: the read was over the app's rate, so that side waits
    def _hold_client(self, delay: float) -> None:
        if self._client_held is not None:  # a read delivered despite the hold extends it
            self._client_held.cancel()
        self._client_held = self._loop.call_later(delay, self._release_client)
        if not self._client.is_closing():
            self._client.pause_reading()

    def _release_client(self) -> None:
        self._client_held = None
        self.last_activity = self._loop.time()  # the peer could not send while held
        if not self._client_paused and not self._client.is_closing():
            self._client.resume_reading()

    def _hold_upstream(self, delay: float) -> None:
        if self._upstream_held is not None:
            self._upstream_held.cancel()
        self._upstream_held = self._loop.call_later(delay, self._release_upstream)
        if not self._upstream.is_closing():
            self._upstream.pause_reading()

    def _release_upstream(self) -> None:
        self._upstream_held = None
        self.last_activity = self._loop.time()
        if not self._upstream_paused and not self._upstream.is_closing():
            self._upstream.resume_reading()

    def _cancel_holds(self) -> None:
        """Once either side is gone nothing more is read: drop the timers (and with them the
        loop's references to this tunnel)."""
        if self._client_held is not None:
            self._client_held.cancel()
            self._client_held = None
        if self._upstream_held is not None:
            self._upstream_held.cancel()
            self._upstream_held = None

    def abort(self, reason: str) -> None:
        """Tear the tunnel down now (drain deadline, idle timeout)."""
        if self.end_reason is None:
            self.end_reason = reason
        if not self._client_lost:
            self._client.abort()
        if not self._upstream_lost:
            self._upstream.abort()

    def _filter_failed(self, error: ValueError) -> None:
        assert self._filter is not None
        self.failure = error
        reply = self._filter.failure_reply(error)
        if reply:
            self._write_down(reply)
        self._finish(f"protocol error: {error}"[:120])

    def _finish(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if not self._client_lost:
            self._client.close()
        if not self._upstream_lost:
            self._upstream.close()

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._client_lost and self._upstream_lost:
            return
        idle_for = self._loop.time() - self.last_activity
        if self._client_held is not None or self._upstream_held is not None:
            idle_for = 0.0  # held by shaping: moving data at the app's rate, not idle
        if idle_for >= self._idle_timeout:
            self.abort("idle_timeout")
        else:
            self._idle_timer = self._loop.call_later(
                self._idle_timeout - idle_for, self._check_idle
            )

    def _maybe_closed(self) -> None:
        if not (self._client_lost and self._upstream_lost):
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed(self)


def _describe(exc: BaseException) -> str:
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"[:120]
