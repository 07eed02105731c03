"""Test helpers: real sockets, real uids, an in-process proxy, network namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import tomlkit

from egress.config import Config, parse_config
from egress.net.connection import ClientConnection, ListenerKind
from egress.runtime import ProxyRuntime

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


def base_config(**sections: Any) -> dict[str, Any]:
    """A minimal config dict with ephemeral listeners; tests add apps and settings."""
    config: dict[str, Any] = {
        "proxy": {
            "socks5_listen": ["127.0.0.1:0"],
            "http_listen": ["127.0.0.1:0"],
            "handshake_timeout": 2.0,
            "connect_timeout": 2.0,
            "idle_timeout": 30.0,
            "drain_timeout": 2.0,
        },
        "log": {"connection_log": "-"},
        "app": [],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (the shape :func:`base_config` returns) as a TOML config file."""
    path.write_text(tomlkit.dumps(data), encoding="utf-8")
    return path


def make_config(data: dict[str, Any], tmp_path: Path) -> Config:
    """The config ``data`` describes, also written to ``tmp_path/test.toml`` (its source), so
    a reload reads the same settings until a test writes new ones there."""
    path = write_config(tmp_path / "test.toml", data)
    return parse_config(data, source=str(path))


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
        import json

        self.runtime.connlog.flush()
        if not self.log_path.exists():
            return []
        # The log's writer thread may be mid-batch: only complete lines count.
        text = self.log_path.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line]

    async def wait_records(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                records = self.records()
                if len(records) >= count:
                    return records
                await asyncio.sleep(0.01)


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
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


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


async def eventually(
    condition: Callable[[], bool], what: str, *, timeout: float = 5.0, every: float = 0.01
) -> None:
    """Wait until ``condition()`` holds (polled), or fail saying ``what`` did not happen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(every)


async def refused_at_accept(reader: asyncio.StreamReader) -> bool:
    """Whether the proxy dropped the connection without sending a byte (refused at accept)."""
    try:
        data = await reader.read(1)
    except ConnectionResetError:
        return True
    return data == b""


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


# --- network namespaces ---------------------------------------------------------------------
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def network_namespace(*, extra_addresses: tuple[str, ...] = ()) -> Iterator[str]:
    """Move this thread into a fresh network namespace whose only interface is loopback, with
    ``extra_addresses`` (e.g. "169.254.169.254/32") added to it, so any address a test dials
    is local to the namespace and nothing can leave the machine.

    ``setns`` moves the calling thread only; sockets, threads and child processes created by
    this thread inside the block live in the namespace. Enter it before starting the loop.
    """
    name = f"egress-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            for address in extra_addresses:
                command = ["ip", "addr", "add", address, "dev", "lo"]
                subprocess.run([*command, "nodad"] if ":" in address else command, check=True)
            yield name
        finally:
            _setns(original)
    finally:
        os.close(original)
        subprocess.run(["ip", "netns", "del", name], check=False)


def python_for_uid(uid: int) -> str:
    """A Python interpreter ``uid`` may execute: the venv's may live under a private /root
    (pyenv), in which case the system's python3 runs the stdlib-only child scripts."""
    import shutil
    import sys

    candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3")]
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(
                [exe, "-I", "-c", "pass"],
                user=uid,
                group=uid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                timeout=10,
                check=False,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return exe
    raise AssertionError(f"no Python interpreter in {candidates} is executable by uid {uid}")
