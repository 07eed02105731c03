"""The proxy's listeners: all or nothing at start, and which addresses are 'ours'."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import pytest

from egress.config import ListenAddress, ProxyConfig
from egress.net.connection import ListenerKind
from egress.server import ListenerError, Listeners


class _Nothing(asyncio.Protocol):
    pass


def _factory(kind: ListenerKind) -> asyncio.Protocol:
    return _Nothing()


def test_an_unspecified_listener_is_ours_only_for_local_addresses() -> None:
    """A redirect to 93.184.216.34:PORT is someone else's service on the same port number,
    not a loop back to our [::]:PORT listener."""

    async def main() -> None:
        listeners = Listeners()
        await listeners.open(ProxyConfig(transparent_listen=ListenAddress("::", 0)), _factory)
        try:
            port = int(listeners.address_of(ListenerKind.TRANSPARENT).rpartition(":")[2])
            assert listeners.is_own_listener(ip_address("127.0.0.1"), port)
            assert listeners.is_own_listener(ip_address("::1"), port)
            assert not listeners.is_own_listener(ip_address("93.184.216.34"), port)
            assert not listeners.is_own_listener(ip_address("2606:4700::1111"), port)
            assert not listeners.is_own_listener(ip_address("127.0.0.1"), port + 1 or 1)
        finally:
            await listeners.close()

    asyncio.run(main())


def test_a_specific_listener_is_ours_for_its_address_only() -> None:
    async def main() -> None:
        listeners = Listeners()
        await listeners.open(ProxyConfig(socks5_listen=(ListenAddress("127.0.0.1", 0),)), _factory)
        try:
            port = int(listeners.address_of(ListenerKind.SOCKS5).rpartition(":")[2])
            assert listeners.is_own_listener(ip_address("127.0.0.1"), port)
            assert not listeners.is_own_listener(ip_address("127.0.0.2"), port)
        finally:
            await listeners.close()

    asyncio.run(main())


def test_a_listener_that_cannot_bind_closes_the_others() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            listeners = Listeners()
            config = ProxyConfig(
                socks5_listen=(ListenAddress("127.0.0.1", 0),),
                http_listen=(ListenAddress("127.0.0.1", port),),
            )
            with pytest.raises(ListenerError, match=rf"proxy.http_listen: .*127.0.0.1:{port}"):
                await listeners.open(config, _factory)
            assert listeners.bound == []

    asyncio.run(main())
