"""Test helpers: an in-process proxy, real sockets under real uids, protocol clients, upstreams.

Network namespaces are in ``tests.netns``, real ``egress`` processes in ``tests.processes``,
config files in ``tests.configs`` and waiting for a condition in ``tests.polling``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

from egress.net.connection import ClientConnection, ListenerKind
from egress.runtime import ProxyRuntime
from tests.configs import make_config
from tests.polling import eventually
from tests.privilege import require

# Test uids (CI runs as root; these need no /etc/passwd entry).
APP_UID = 10001
OTHER_APP_UID = 10002
STRANGER_UID = 10999  # belongs to no app

LOOP_KINDS = ("asyncio", "uvloop")


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


class LoopErrors:
    """Collects what the loop's exception handler saw; a test fails if anything lands here."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)


def run(kind: str, coro: Coroutine[Any, Any, Any], *, timeout: float = 30.0) -> Any:
    errors = LoopErrors()

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(errors.handler)
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        result = runner.run(main())
    assert not errors.errors, f"event loop reported unhandled errors: {errors.errors}"
    return result


class ProxyHandle:
    """An in-process proxy on the test's loop; ``log`` collects the connection log lines."""

    def __init__(self, runtime: ProxyRuntime, log_path: Path) -> None:
        self.runtime = runtime
        self.log_path = log_path

    def address(self, kind: ListenerKind) -> tuple[str, int]:
        text = self.runtime.listeners.address_of(kind)
        if kind is ListenerKind.SOCKS5_UNIX:
            return (text, 0)
        host, _, port = text.rpartition(":")
        return host.strip("[]"), int(port)

    def connections(self) -> list[ClientConnection]:
        """The proxy's open client connections."""
        return [cast(ClientConnection, c) for c in self.runtime.registry.live()]

    def records(self) -> list[dict[str, Any]]:
        self.runtime.connlog.flush()
        return read_connection_log(self.log_path)

    async def wait_records(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The connection log once it holds at least ``count`` records (``count`` >= 1)."""

        def enough() -> list[dict[str, Any]] | None:
            records = self.records()
            return records if len(records) >= count else None

        return await eventually(
            enough, f"{count} connection log records", timeout=timeout, detail=self.records
        )


def read_connection_log(path: Path) -> list[dict[str, Any]]:
    """The records in a connection log file so far: complete lines only (the log's writer
    thread may be mid-batch)."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line]


@contextlib.asynccontextmanager
async def running_proxy(data: dict[str, Any], tmp_path: Path) -> AsyncIterator[ProxyHandle]:
    log_path = tmp_path / f"conn-{uuid.uuid4().hex[:8]}.log"
    data = {**data, "log": {**data.get("log", {}), "connection_log": str(log_path)}}
    runtime = ProxyRuntime(make_config(data, tmp_path))
    await runtime.start()
    try:
        yield ProxyHandle(runtime, log_path)
    finally:
        await runtime.aclose()


@contextlib.contextmanager
def acting_as(uid: int) -> Iterator[None]:
    """Run a few syscalls with effective uid/gid ``uid`` (root only), then switch back."""
    require("root", f"acting as uid {uid}")
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def run_as_uid(
    uid: int, argv: list[str], *, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """A real program (``dig``, ``curl``) as ``uid`` with no supplementary groups and a bare
    PATH, output captured, exit not checked. Blocking: from a test's event loop, call it through
    ``asyncio.to_thread`` so an in-process proxy keeps serving."""
    require("root", f"running a program as uid {uid}")
    return subprocess.run(
        argv,
        user=uid,
        group=uid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )


def socket_as_uid(
    uid: int, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A non-blocking socket the kernel records as owned by ``uid``.

    The kernel stamps a socket with the creating thread's fsuid, so switching the effective uid
    around ``socket()`` gives a socket whose owner is ``uid`` as sock_diag and iptables' owner
    match see it, without a child process. Needs root.
    """
    with acting_as(uid):
        sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


async def open_as_uid(
    uid: int, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_as_uid(uid, family)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def open_unix_as_uid(
    uid: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket_as_uid(uid, socket.AF_UNIX)
    # SO_PEERCRED records the credentials at connect() time, so connect under the uid too.
    sock.setblocking(True)
    with acting_as(uid):
        sock.connect(path)
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock)


async def refused_at_accept(reader: asyncio.StreamReader) -> bool:
    """Whether the proxy dropped the connection at accept, having sent at most its one fixed
    refusal: nothing (HTTP), or on SOCKS5 "no acceptable method" and a reason record (two
    bytes of length, then JSON)."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return True
    if data[:2] != b"\x05\xff" or len(data) < 4:
        return False
    length = int.from_bytes(data[2:4], "big")
    return len(data) == 4 + length and isinstance(json.loads(data[4:]), dict)


# --- SOCKS5 / HTTP client helpers (written from the RFCs, independent of egress.proto) -------
async def socks5_connect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str | bytes,
    port: int,
    *,
    atyp: int | None = None,
    credentials: tuple[bytes, bytes] | None = None,
) -> int:
    """Run a SOCKS5 CONNECT; return the reply code (0 = success)."""
    methods = b"\x00\x02" if credentials else b"\x00"
    writer.write(b"\x05" + bytes([len(methods)]) + methods)
    version, method = await reader.readexactly(2)
    assert version == 5
    if method == 0xFF:
        return -1
    if method == 0x02:
        assert credentials is not None
        user, password = credentials
        writer.write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        _, status = await reader.readexactly(2)
        if status != 0:
            return -2
    if isinstance(host, bytes):
        address = b"\x03" + bytes([len(host)]) + host
    elif atyp == 1 or (atyp is None and _is_v4(host)):
        address = b"\x01" + socket.inet_pton(socket.AF_INET, host)
    elif atyp == 4 or (atyp is None and ":" in host):
        address = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    else:
        encoded = host.encode()
        address = b"\x03" + bytes([len(encoded)]) + encoded
    writer.write(b"\x05\x01\x00" + address + struct.pack("!H", port))
    head = await reader.readexactly(4)
    assert head[0] == 5, head
    bind_len = {1: 4, 4: 16}.get(head[3])
    if bind_len is None:
        bind_len = (await reader.readexactly(1))[0]
    await reader.readexactly(bind_len + 2)
    return head[1]


def _is_v4(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return False
    return True


async def http_connect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    authority: str,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send CONNECT; return status, headers (lower-case names) and the body of an error reply."""
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    parsed = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            parsed[name.strip().lower()] = value.strip()
    body = b""
    if status != 200 and "content-length" in parsed:
        body = await reader.readexactly(int(parsed["content-length"]))
    return status, parsed, body


# --- upstreams ------------------------------------------------------------------------------
class EchoUpstream:
    """A real TCP server that echoes, prefixed by a greeting naming itself."""

    def __init__(self, host: str = "127.0.0.1", *, greeting: bytes = b"") -> None:
        self.host = host
        self.greeting = greeting
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.greeting:
                writer.write(self.greeting)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> EchoUpstream:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
