"""The proxy's listening sockets: SOCKS5 and HTTP on TCP, SOCKS5 on a Unix socket, transparent."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from egress.config import ListenAddress, ProxyConfig
from egress.errors import EgressError
from egress.net.connection import ListenerKind

log = logging.getLogger("egress.server")


class ListenerError(EgressError):
    """A listener could not be opened; the message names the config key and the address."""


@dataclass(frozen=True, slots=True)
class BoundListener:
    kind: ListenerKind
    address: str  # "127.0.0.1:1080", "[::1]:1080" or a socket path
    server: asyncio.Server
    ip: IPv4Address | IPv6Address | None = None  # None for the Unix socket
    port: int = 0


class Listeners:
    """The proxy's listening sockets. Opens all of them or none (a failed start leaves nothing
    bound), and answers whether an address is one of them (a transparent redirect loop)."""

    def __init__(self) -> None:
        self.bound: list[BoundListener] = []

    async def open(
        self, proxy: ProxyConfig, factory: Callable[[ListenerKind], asyncio.Protocol]
    ) -> None:
        """Bind every listener of ``proxy``; on any failure close those already bound and raise
        :class:`ListenerError`. ``factory(kind)`` builds the protocol of one connection."""
        wanted: list[tuple[ListenerKind, ListenAddress, str]] = [
            *((ListenerKind.SOCKS5, a, "proxy.socks5_listen") for a in proxy.socks5_listen),
            *((ListenerKind.HTTP, a, "proxy.http_listen") for a in proxy.http_listen),
        ]
        if proxy.transparent_listen is not None:
            wanted.append(
                (ListenerKind.TRANSPARENT, proxy.transparent_listen, "proxy.transparent_listen")
            )
        try:
            for kind, address, key in wanted:
                await self._listen_tcp(kind, address, key, factory)
            if proxy.unix_socket is not None:
                await self._listen_unix(proxy, factory)
        except BaseException:
            await self.close()
            raise

    async def _listen_tcp(
        self,
        kind: ListenerKind,
        address: ListenAddress,
        key: str,
        factory: Callable[[ListenerKind], asyncio.Protocol],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            if address.host == "::":
                server = await loop.create_server(
                    lambda: factory(kind), sock=_dual_stack_socket(address.port), backlog=4096
                )
            else:
                server = await loop.create_server(
                    lambda: factory(kind),
                    host=address.host,
                    port=address.port,
                    reuse_address=True,
                    backlog=4096,
                )
        except OSError as exc:
            raise ListenerError(f"{key}: cannot listen on {address}: {exc.strerror}") from exc
        host, port = server.sockets[0].getsockname()[:2]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.bound.append(BoundListener(kind, shown, server, ip_address(host), int(port)))

    async def _listen_unix(
        self, proxy: ProxyConfig, factory: Callable[[ListenerKind], asyncio.Protocol]
    ) -> None:
        assert proxy.unix_socket is not None
        path = proxy.unix_socket
        loop = asyncio.get_running_loop()
        try:
            _prepare_socket_path(path)
            server = await loop.create_unix_server(
                lambda: factory(ListenerKind.SOCKS5_UNIX), path=str(path), backlog=4096
            )
        except OSError as exc:
            raise ListenerError(f"proxy.unix_socket: cannot listen on {path}: {exc}") from exc
        self.bound.append(BoundListener(ListenerKind.SOCKS5_UNIX, str(path), server))
        try:
            os.chmod(path, proxy.unix_socket_mode)
            if proxy.unix_socket_owner is not None or proxy.unix_socket_group is not None:
                os.chown(
                    path,
                    _uid(proxy.unix_socket_owner) if proxy.unix_socket_owner is not None else -1,
                    _gid(proxy.unix_socket_group) if proxy.unix_socket_group is not None else -1,
                )
        except (OSError, KeyError) as exc:
            raise ListenerError(f"proxy.unix_socket: cannot set up {path}: {exc}") from exc

    def is_own_listener(self, address: IPv4Address | IPv6Address, port: int) -> bool:
        """Whether ``address:port`` is one of our TCP listeners (a redirect loop).

        A listener on ``0.0.0.0`` or ``[::]`` is every local address, so an address counts only
        if this host has it; the same port on another host is someone else's service.
        """
        for listener in self.bound:
            if listener.ip is None or listener.port != port:
                continue
            if listener.ip == address:
                return True
            if listener.ip.is_unspecified and _is_local_address(address):
                return True
        return False

    def address_of(self, kind: ListenerKind) -> str:
        """The first bound address of a listener kind (tests and benchmarks use port 0)."""
        for listener in self.bound:
            if listener.kind is kind:
                return listener.address
        raise LookupError(kind)

    def stop_accepting(self) -> None:
        for listener in self.bound:
            listener.server.close()
            if listener.kind is ListenerKind.SOCKS5_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(listener.address)

    async def close(self) -> None:
        self.stop_accepting()
        for listener in self.bound:
            await listener.server.wait_closed()
        self.bound.clear()


def _is_local_address(address: IPv4Address | IPv6Address) -> bool:
    """Whether this host (this network namespace) has ``address``.

    Asked of the routing table: a datagram socket "connected" to a local address takes that
    address as its own source (nothing is sent). Binding would not do: with
    ``net.ipv4.ip_nonlocal_bind`` every address binds.
    """
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(address), 9))
        except OSError:
            return False
        return ip_address(probe.getsockname()[0]) == address


def _dual_stack_socket(port: int) -> socket.socket:
    """``[::]:PORT`` means IPv6 and IPv4 (as on Linux by default); asyncio would set V6ONLY."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock


def _prepare_socket_path(path: Path) -> None:
    """Remove a stale socket left by a previous run (never any other kind of file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)


def _uid(owner: str | int) -> int:
    if isinstance(owner, int) or owner.isdigit():
        return int(owner)
    return pwd.getpwnam(owner).pw_uid


def _gid(group: str | int) -> int:
    if isinstance(group, int) or group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid
