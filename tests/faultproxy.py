"""A fault-injecting TCP relay on loopback, to put between a client and a server (Redis) and
make the network between them misbehave on demand:

    with FaultProxy(("127.0.0.1", redis_port)) as relay:   # pass-through at first
        url = relay.redis_url                              # point the client here
        relay.delay(200)       # every byte, both ways, arrives 200 ms late (order kept)
        relay.blackhole()      # connections are accepted and read, nothing is forwarded
        relay.cut()            # every connection reset, new ones refused (port closed)
        relay.pass_through()   # healthy again (on the same port)

It runs its own event loop in a thread, so a test that blocks (polling a child process) does
not stall it, and a mode switch is in force when the call returns. Data a blackhole swallowed
leaves that connection's byte stream corrupt, so leaving the blackhole resets those connections
(what a client would eventually see from TCP anyway); a delay only holds bytes back, so
connections live through it. ``stop()`` (or leaving the ``with`` block) resets every connection,
closes the port and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

__all__ = ["Fault", "FaultProxy"]

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0
_CHUNK = 65536
_EOF = b""


class Fault(StrEnum):
    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    CUT = "cut"


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the target."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    swallowed: bool = False  # a blackhole dropped bytes of it: its stream is corrupt

    def reset(self) -> None:
        for writer in (self.client, self.target):
            _reset(writer)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a middlebox that drops state would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A relay from ``127.0.0.1:<port>`` to ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0  # chosen at start, kept across cuts
        self.fault = Fault.PASS
        self.delay_s = 0.0
        self.accepted = 0  # connections accepted so far
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # --- control (from the test's thread) ---------------------------------------------------
    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reset every connection, close the port, stop the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(CALL_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CALL_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()

    def pass_through(self) -> None:
        self._call(self._switch(Fault.PASS))

    def delay(self, milliseconds: float) -> None:
        self._call(self._switch(Fault.DELAY, milliseconds / 1000))

    def blackhole(self) -> None:
        self._call(self._switch(Fault.BLACKHOLE))

    def cut(self) -> None:
        self._call(self._switch(Fault.CUT))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "the fault proxy is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    # --- on the relay's loop ----------------------------------------------------------------
    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_port(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections: a connect() is refused from now on

    async def _switch(self, fault: Fault, delay_s: float = 0.0) -> None:
        leaving_blackhole = self.fault is Fault.BLACKHOLE and fault is not Fault.BLACKHOLE
        self.fault, self.delay_s = fault, delay_s
        if fault is Fault.CUT:
            await self._close_port()
            for link in list(self._links):
                link.reset()
            return
        if leaving_blackhole:
            for link in [link for link in self._links if link.swallowed]:
                link.reset()
        if self._server is None:
            await self._listen()

    async def _shutdown(self) -> None:
        await self._close_port()
        for link in list(self._links):
            link.reset()
        tasks = [task for link in self._links for task in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.fault is Fault.CUT:  # accepted just before the port closed
            _reset(writer)
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)  # the target is down: the client sees what it would see there
            return
        link = _Link(writer, target_writer)
        self._links.add(link)
        up: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        down: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        link.tasks = {
            asyncio.create_task(self._read(reader, up, link)),
            asyncio.create_task(self._write(up, target_writer)),
            asyncio.create_task(self._read(target_reader, down, link)),
            asyncio.create_task(self._write(down, writer)),
        }
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for end in (writer, target_writer):
                end.close()

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]], link: _Link
    ) -> None:
        """Read one direction; queue each chunk with the time it is due (now, or later)."""
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(_CHUNK):
                if self.fault is Fault.BLACKHOLE:
                    link.swallowed = True
                    continue
                delay = self.delay_s if self.fault is Fault.DELAY else 0.0
                queue.put_nowait((loop.time() + delay, data))
        except OSError:
            link.reset()
        finally:
            queue.put_nowait((loop.time() + self.delay_s, _EOF))

    async def _write(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        """Write one direction's chunks in order, each no sooner than it is due."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            _reset(writer)
