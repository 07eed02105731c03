"""The shim in event loops: the handshake waits on the loop, never blocks it.

asyncio's selector loop and uvloop both connect through ``loop.sock_connect``; patched here, it
connects the socket to the proxy, sends the request and waits for the reply with the loop's own
``sock_sendall``/``sock_recv``, so other tasks run while the proxy dials a slow upstream, and a
refusal is raised from ``sock_connect`` (and so from ``create_connection`` and
``asyncio.open_connection``). ``getaddrinfo`` on a loop answers at once (the shim's names need
no thread). uvloop's ``create_connection`` dials in C without ``sock_connect``, so for uvloop
it is replaced by one that makes the socket here and hands it over with ``sock=``; uvloop is
patched when it is imported (this module never imports it).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.selector_events
import contextlib
import errno
import importlib.abc
import importlib.machinery
import socket
import sys
import types
from collections.abc import Sequence
from typing import Any

from . import patch
from .errors import proxy_garbled, proxy_unreachable
from .wire import HandshakeError, ReplyReader, connect_request

__all__ = ["install", "uninstall"]


async def handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, dest: patch.Destination
) -> None:
    settings = patch._settings()
    proxy = settings.proxy_for(sock.family)
    try:
        await _connect_raw(loop, sock, proxy)
    except OSError as exc:
        raise proxy_unreachable(settings.proxy_text, dest.text, exc) from None
    with contextlib.suppress(OSError):  # refused at accept: the refusal waits to be read
        await loop.sock_sendall(sock, connect_request(dest.host, dest.port))
    reader = ReplyReader()
    try:
        while reader.reply is None:
            try:
                data = await loop.sock_recv(sock, reader.want)
            except ConnectionResetError:
                data = b""
            reader.take(data)
    except HandshakeError as exc:
        raise proxy_garbled(settings.proxy_text, exc) from None
    patch.settle(sock, dest, reader.reply, settings)


async def _connect_raw(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Any) -> None:
    """A non-blocking connect to the proxy (loopback: done at once or within microseconds)."""
    try:
        patch.real_connect(sock, address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    fd = sock.fileno()
    done: asyncio.Future[None] = loop.create_future()

    def writable() -> None:
        if done.done():
            return
        err = patch.real_getsockopt(sock, socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            done.set_exception(OSError(err, errno.errorcode.get(err, str(err))))
        else:
            done.set_result(None)

    loop.add_writer(fd, writable)
    try:
        await done
    finally:
        loop.remove_writer(fd)


def _make_sock_connect(original: Any) -> Any:
    async def sock_connect(
        self: asyncio.AbstractEventLoop, sock: socket.socket, address: Any
    ) -> None:
        if not patch.proxied(sock):
            return await original(self, sock, address)  # type: ignore[no-any-return]
        await handshake(self, sock, patch.destination_of(sock, address))
        return None

    sock_connect._egress_shim = True  # type: ignore[attr-defined]
    return sock_connect


def _make_getaddrinfo() -> Any:
    async def getaddrinfo(
        self: asyncio.AbstractEventLoop,
        host: Any,
        port: Any,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, int, str, Any]]:
        return patch.getaddrinfo(host, port, family, type, proto, flags)

    return getaddrinfo


def _make_getnameinfo() -> Any:
    async def getnameinfo(self: asyncio.AbstractEventLoop, sockaddr: Any, flags: int = 0) -> Any:
        return patch.getnameinfo(sockaddr, flags)

    return getnameinfo


def _make_create_connection(original: Any) -> Any:
    """uvloop: resolve and connect here, then give uvloop the connected socket."""

    async def create_connection(
        self: asyncio.AbstractEventLoop,
        protocol_factory: Any,
        host: Any = None,
        port: Any = None,
        *,
        ssl: Any = None,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        sock: socket.socket | None = None,
        local_addr: Any = None,
        server_hostname: str | None = None,
        **more: Any,
    ) -> Any:
        if sock is not None or host is None:
            return await original(
                self,
                protocol_factory,
                host,
                port,
                ssl=ssl,
                family=family,
                proto=proto,
                flags=flags,
                sock=sock,
                local_addr=local_addr,
                server_hostname=server_hostname,
                **more,
            )
        infos = patch.getaddrinfo(host, port, family, socket.SOCK_STREAM, proto, flags)
        sock = await _first_connected(self, infos, local_addr)
        if ssl and server_hostname is None:
            server_hostname = host
        return await original(
            self, protocol_factory, ssl=ssl, sock=sock, server_hostname=server_hostname, **more
        )

    return create_connection


async def _first_connected(
    loop: asyncio.AbstractEventLoop, infos: Sequence[tuple[Any, Any, int, str, Any]], local: Any
) -> socket.socket:
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if local is not None:
                sock.bind(local)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1 or (errors and all(str(e) == str(errors[0]) for e in errors)):
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


# --- install -----------------------------------------------------------------------------------
def _patch_uvloop(module: types.ModuleType) -> None:
    loop_class = getattr(module, "Loop", None)
    if loop_class is None or getattr(loop_class.sock_connect, "_egress_shim", False):
        return
    patch._patch(loop_class, "sock_connect", _make_sock_connect(loop_class.sock_connect))
    patch._patch(loop_class, "getaddrinfo", _make_getaddrinfo())
    patch._patch(loop_class, "getnameinfo", _make_getnameinfo())
    patch._patch(
        loop_class, "create_connection", _make_create_connection(loop_class.create_connection)
    )


class _UvloopFinder(importlib.abc.MetaPathFinder):
    """Patches uvloop right after it is imported, whoever imports it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "uvloop":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: types.ModuleType) -> None:
            exec_module(module)
            _patch_uvloop(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


_finder = _UvloopFinder()


def _make_set_running_loop(original: Any) -> Any:
    """Every loop is checked when it starts running: uvloop imported past the import hook (a
    hook ahead of ours) is patched then, and a loop that would connect around the shim (one
    that does not connect through a patched ``sock_connect``, such as ``uvloop.loop.Loop``
    itself) fails to start rather than run unconfined."""

    def _set_running_loop(loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is not None:
            check_loop(loop)
        original(loop)

    return _set_running_loop


def check_loop(loop: asyncio.AbstractEventLoop) -> None:
    uvloop = sys.modules.get("uvloop")
    if uvloop is not None:
        _patch_uvloop(uvloop)
    if not getattr(type(loop).sock_connect, "_egress_shim", False):
        name = f"{type(loop).__module__}.{type(loop).__qualname__}"
        raise RuntimeError(
            f"egress: the event loop {name} connects around the sandbox shim; use asyncio's"
            " own loops or uvloop.new_event_loop() / uvloop.run()"
        )


def install() -> None:
    selector_loop = asyncio.selector_events.BaseSelectorEventLoop
    patch._patch(selector_loop, "sock_connect", _make_sock_connect(selector_loop.sock_connect))
    base = asyncio.base_events.BaseEventLoop
    patch._patch(base, "getaddrinfo", _make_getaddrinfo())
    patch._patch(base, "getnameinfo", _make_getnameinfo())
    wrapped = _make_set_running_loop(asyncio.events._set_running_loop)
    patch._patch(asyncio.events, "_set_running_loop", wrapped)
    patch._patch(asyncio, "_set_running_loop", wrapped)  # what uvloop takes at its import
    if "uvloop" in sys.modules:
        _patch_uvloop(sys.modules["uvloop"])
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
