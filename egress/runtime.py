"""Wiring: build the proxy from a config, run it, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from aiohttp import web

from egress.admin.app import build_admin_app
from egress.config import Config, load_config
from egress.connlog import ConnectionLog
from egress.errors import ConfigError, EgressError
from egress.metrics import ProxyMetrics
from egress.policy import PolicySnapshot
from egress.resolver import Resolver
from egress.server import ListenerError, ProxyServer

log = logging.getLogger("egress.runtime")


def check_proxy_uid(config: Config, uid: int) -> None:
    """The firewall confines ``[firewall].sandbox_uids``; a proxy running as one of them would
    have its own upstream connections rejected, so refuse to start rather than fail each one."""
    for uids in config.firewall.sandbox_uids:
        if uids.contains(uid):
            raise EgressError(
                f"{config.source}: firewall.sandbox_uids: the proxy runs as uid {uid}, which is"
                f" inside {uids}; the firewall would reject the proxy's own connections. Run the"
                " proxy as a uid outside the sandbox ranges (or root)."
            )


class ProxyRuntime:
    """Everything one proxy process runs: listeners, resolver, admin endpoint."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        self.server: ProxyServer | None = None
        self.resolver: Resolver | None = None
        self.connlog: ConnectionLog | None = None
        self.admin_address: str | None = None
        self._admin_runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        check_proxy_uid(config, os.geteuid())
        resolver_config = config.resolver
        self.resolver = Resolver(
            nameservers=[str(server) for server in resolver_config.nameservers],
            timeout=resolver_config.timeout,
            attempts=resolver_config.attempts,
            min_ttl=resolver_config.min_ttl,
            max_ttl=resolver_config.max_ttl,
            negative_ttl=resolver_config.negative_ttl,
        )
        self.connlog = ConnectionLog(config.log.connection_log)
        self.server = ProxyServer(
            config, resolver=self.resolver, metrics=self.metrics, connlog=self.connlog
        )
        await self.server.start()
        if config.admin.listen is not None:
            await self._start_admin()
        self.metrics.last_reload_success.set(time.time())
        log.info(
            "proxy started",
            extra={
                "listeners": ", ".join(f"{b.kind}={b.address}" for b in self.server.listeners),
                "apps": len(config.apps),
                "admin": self.admin_address,
            },
        )

    async def _start_admin(self) -> None:
        assert self.config.admin.listen is not None
        listen = self.config.admin.listen
        app = build_admin_app(self.metrics, ready=self.ready)
        self._admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, listen.host, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ListenerError(f"admin.listen: cannot listen on {listen}: {exc.strerror}") from exc
        host, port = self._admin_runner.addresses[0][:2]
        self.admin_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def ready(self) -> bool:
        return self.server is not None and not self.server.draining

    def reload(self) -> bool:
        """Re-read the config file and swap the rules; a bad file keeps the old rules."""
        assert self.server is not None
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            self.metrics.reload(ok=False)
            log.error("reload rejected, keeping the previous rules", extra={"problems": str(exc)})
            return False
        if new.proxy != self.config.proxy or new.admin != self.config.admin:
            log.warning("listener or admin settings changed; they take effect after a restart")
        self.server.replace_snapshot(PolicySnapshot(new))
        self.config = new
        self.metrics.reload(ok=True)
        self.metrics.last_reload_success.set(time.time())
        log.info("rules reloaded", extra={"apps": len(new.apps)})
        return True

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stop_requested(self) -> None:
        await self._stopping.wait()

    async def aclose(self) -> None:
        """Drain tunnels, then close the admin listener, the resolver and the log."""
        if self.server is not None:
            log.info("draining", extra={"open": len(self.server.connections)})
            await self.server.drain()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.resolver is not None:
            await self.resolver.aclose()
        if self.connlog is not None:
            self.connlog.close()
        log.info("proxy stopped")


async def serve(config_path: Path) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the rules."""
    config = load_config(config_path)
    runtime = ProxyRuntime(config)
    loop = asyncio.get_running_loop()
    try:
        await runtime.start()
        loop.add_signal_handler(signal.SIGHUP, runtime.reload)
        loop.add_signal_handler(signal.SIGTERM, runtime.request_stop)
        loop.add_signal_handler(signal.SIGINT, runtime.request_stop)
        await runtime.wait_stop_requested()
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await runtime.aclose()
