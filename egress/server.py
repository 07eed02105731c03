"""The proxy's shared state and its listeners: what every connection needs, in one place."""

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

from egress.config import Config, ListenAddress, ProxyConfig
from egress.connlog import ConnectionLog
from egress.errors import EgressError
from egress.metrics import ProxyMetrics
from egress.net.connection import (
    ClientConnection,
    HttpConnection,
    ListenerKind,
    Socks5Connection,
)
from egress.net.identity import make_tcp_owner_lookup
from egress.net.transparent import TransparentConnection
from egress.outcomes import Outcome
from egress.policy import PolicySnapshot
from egress.resolver import Resolver

log = logging.getLogger("egress.server")


class ListenerError(EgressError):
    """A listener could not be opened; the message names the config key and the address."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The per-connection knobs, copied out of the config once (hot path reads these)."""

    handshake_timeout: float
    connect_timeout: float
    idle_timeout: float
    drain_timeout: float
    max_handshake_bytes: int
    max_connections: int

    @classmethod
    def from_config(cls, proxy: ProxyConfig) -> ProxySettings:
        return cls(
            handshake_timeout=proxy.handshake_timeout,
            connect_timeout=proxy.connect_timeout,
            idle_timeout=proxy.idle_timeout,
            drain_timeout=proxy.drain_timeout,
            max_handshake_bytes=proxy.max_handshake_bytes,
            max_connections=proxy.max_connections,
        )


@dataclass(frozen=True, slots=True)
class BoundListener:
    kind: ListenerKind
    address: str  # "127.0.0.1:1080", "[::1]:1080" or a socket path
    server: asyncio.Server


class ProxyServer:
    """Owns the listeners and every live connection; connections read shared state from here."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver,
        metrics: ProxyMetrics,
        connlog: ConnectionLog,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.settings = ProxySettings.from_config(config.proxy)
        self.snapshot = PolicySnapshot(config)
        self.resolver = resolver
        self.metrics = metrics
        self.connlog = connlog
        # Netlink sockets belong to a network namespace: create the lookup where we listen.
        self.tcp_identity = make_tcp_owner_lookup()
        self.connections: set[ClientConnection] = set()
        self.listeners: list[BoundListener] = []
        self.draining = False
        self._config = config
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    # --- connections ------------------------------------------------------------------------
    def register(self, connection: ClientConnection) -> bool:
        """Track a new connection; False when it must be refused (draining or over the limit)."""
        if self.draining:
            return False
        if len(self.connections) >= self.settings.max_connections:
            self.metrics.connections_refused_over_limit.inc()
            return False
        self.connections.add(connection)
        self.metrics.open_connections.inc()
        self._all_closed.clear()
        return True

    def unregister(self, connection: ClientConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
            self.metrics.open_connections.dec()
            if not self.connections:
                self._all_closed.set()

    def replace_snapshot(self, snapshot: PolicySnapshot) -> None:
        """Swap the rules atomically: connections that already decided keep their decision."""
        self.snapshot = snapshot

    # --- listeners --------------------------------------------------------------------------
    async def start(self) -> None:
        proxy = self._config.proxy
        for address in proxy.socks5_listen:
            await self._listen_tcp(
                ListenerKind.SOCKS5, address, lambda: Socks5Connection(self), "proxy.socks5_listen"
            )
        for address in proxy.http_listen:
            await self._listen_tcp(
                ListenerKind.HTTP, address, lambda: HttpConnection(self), "proxy.http_listen"
            )
        if proxy.unix_socket is not None:
            await self._listen_unix(proxy)
        if proxy.transparent_listen is not None:
            await self._listen_tcp(
                ListenerKind.TRANSPARENT,
                proxy.transparent_listen,
                lambda: TransparentConnection(self),
                "proxy.transparent_listen",
            )

    async def _listen_tcp(
        self,
        kind: ListenerKind,
        address: ListenAddress,
        factory: Callable[[], ClientConnection],
        key: str,
    ) -> None:
        try:
            if address.host == "::":
                server = await self.loop.create_server(
                    factory, sock=_dual_stack_socket(address.port), backlog=4096
                )
            else:
                server = await self.loop.create_server(
                    factory, host=address.host, port=address.port, reuse_address=True, backlog=4096
                )
        except OSError as exc:
            raise ListenerError(f"{key}: cannot listen on {address}: {exc.strerror}") from exc
        bound = server.sockets[0].getsockname()
        shown = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        self.listeners.append(BoundListener(kind, shown, server))
        log.info("listening", extra={"listener": kind.value, "address": shown})

    async def _listen_unix(self, proxy: ProxyConfig) -> None:
        assert proxy.unix_socket is not None
        path = proxy.unix_socket
        _prepare_socket_path(path)
        try:
            server = await self.loop.create_unix_server(
                lambda: Socks5Connection(self, ListenerKind.SOCKS5_UNIX),
                path=str(path),
                backlog=4096,
            )
            os.chmod(path, proxy.unix_socket_mode)
            if proxy.unix_socket_owner is not None or proxy.unix_socket_group is not None:
                os.chown(
                    path,
                    _uid(proxy.unix_socket_owner) if proxy.unix_socket_owner is not None else -1,
                    _gid(proxy.unix_socket_group) if proxy.unix_socket_group is not None else -1,
                )
        except (OSError, KeyError) as exc:
            raise ListenerError(f"proxy.unix_socket: cannot listen on {path}: {exc}") from exc
        self.listeners.append(BoundListener(ListenerKind.SOCKS5_UNIX, str(path), server))

    def is_own_listener(self, address: IPv4Address | IPv6Address, port: int) -> bool:
        """Whether ``address:port`` is one of our TCP listeners (a redirect loop)."""
        for listener in self.listeners:
            if listener.kind is ListenerKind.SOCKS5_UNIX:
                continue
            host, _, bound_port = listener.address.rpartition(":")
            if int(bound_port) != port:
                continue
            bound = ip_address(host.strip("[]"))
            if bound == address or bound.is_unspecified:
                return True
        return False

    def address_of(self, kind: ListenerKind) -> str:
        """The first bound address of a listener kind (tests and benchmarks use port 0)."""
        for listener in self.listeners:
            if listener.kind is kind:
                return listener.address
        raise LookupError(kind)

    # --- shutdown ---------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop accepting, let open tunnels finish for up to ``drain_timeout``, then cut them."""
        self.draining = True
        for listener in self.listeners:
            listener.server.close()
            if listener.kind is ListenerKind.SOCKS5_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(listener.address)
        for connection in list(self.connections):
            if connection.tunnel is None and connection.transport is not None:
                connection.fail(Outcome.SHUTTING_DOWN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.drain_timeout):
                await self._all_closed.wait()
        for connection in list(self.connections):
            if connection.tunnel is not None:
                connection.tunnel.abort("drain_timeout")
            elif connection.transport is not None:
                connection.transport.abort()
        # Give the transports one turn of the loop to report connection_lost.
        await asyncio.sleep(0)
        for listener in self.listeners:
            await listener.server.wait_closed()
        self.tcp_identity.close()


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
