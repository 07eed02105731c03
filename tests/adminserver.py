"""The admin listener on a real aiohttp runner and a real loopback port, in a thread of its own.

Its own thread and event loop, so synchronous clients (``requests``, schemathesis) and async
ones (an ``aiohttp.ClientSession`` under ``asyncio.run``) can both talk to it:

    with AdminServer(nameserver=dns.address) as server:
        requests.get(server.url + "/v1/apps", headers=server.auth(WRITE_TOKEN))
        server.call(server.store.read)          # a coroutine function, run on the server's loop

Also the pieces the admin API tests share: tokens, a seeded memory store, a checker that
decides with :func:`egress.checking.check` against the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from aiohttp import web

from egress.admin.app import build_admin_app
from egress.checking import CheckResult, check
from egress.config.model import AdminRole, AdminToken
from egress.metrics import ProxyMetrics
from egress.resolver import Resolver
from rules.document import apps_from_data
from rules.edits import UnknownAppError
from rules.stores.base import RuleStore
from rules.stores.memory import MemoryBackend

T = TypeVar("T")

WRITE_TOKEN = "write-token-for-tests-0123456789"
READ_TOKEN = "read-token-for-tests-0123456789"
TOKENS = (
    AdminToken("ops", hashlib.sha256(WRITE_TOKEN.encode()).hexdigest(), AdminRole.WRITE),
    AdminToken("viewer", hashlib.sha256(READ_TOKEN.encode()).hexdigest(), AdminRole.READ),
)

SEED_APPS = {
    "app": [
        {
            "name": "blog",
            "uids": ["10001"],
            "allow": ["api.example.com:443", "*.example.org:80,443"],
            "limits": {"connections_per_second": 20, "burst": 40},
        },
        {
            "name": "shop",
            "uids": ["10010-10019"],
            "allow": ["203.0.113.0/24:8000-8100"],
            "mode": "report",
            "proxy_auth": {"username": "shop", "password_sha256": "ab" * 32},
        },
    ]
}


def seeded_store() -> RuleStore:
    """A memory store holding :data:`SEED_APPS` (make it on the loop that will use it)."""
    return RuleStore(MemoryBackend(apps_from_data(SEED_APPS, version=0, source="seed")))


def store_checker(
    store: RuleStore, resolver: Resolver
) -> Callable[[str, str, int], Awaitable[CheckResult]]:
    """Decides against the store's current state (the proxy's checker uses its snapshot)."""

    async def checker(name: str, host: str, port: int) -> CheckResult:
        state = await store.read()
        app = state.app(name)
        if app is None:
            raise UnknownAppError(name)
        return await check(app, host, port, resolver=resolver, rules_version=state.version)

    return checker


class AdminServer:
    """The admin app over a fresh :func:`seeded_store` (``server.store``, made on the server's
    loop) with ``tokens``, served on ``127.0.0.1:<free port>``; a checker when ``nameserver``
    is given. Stopped, and its app cleaned up, on exit."""

    def __init__(
        self,
        *,
        nameserver: str | None = None,
        tokens: tuple[AdminToken, ...] = TOKENS,
        max_body_bytes: int = 64 * 1024,
        store_ready: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.nameserver = nameserver
        self.store_ready = store_ready
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.metrics = ProxyMetrics()
        self.store: RuleStore | None = None
        self.app: web.Application | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="admin-server", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def call(self, function: Callable[[], Awaitable[T]], *, timeout: float = 10.0) -> T:
        """Run ``function()`` on the server's loop and return its result."""
        assert self._loop is not None

        async def run() -> T:
            return await function()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout)

    def _app(self) -> web.Application:
        self.store = store = seeded_store()
        checker = None
        resolver: Resolver | None = None
        if self.nameserver is not None:
            resolver = Resolver(nameservers=[self.nameserver], timeout=1.0, attempts=1)
            checker = store_checker(store, resolver)
        app = build_admin_app(
            self.metrics,
            ready=lambda: True,
            store=store,
            tokens=self.tokens,
            checker=checker,
            store_ready=self.store_ready,
            max_body_bytes=self.max_body_bytes,
        )
        if resolver is not None:
            closing = resolver

            async def close(_: web.Application) -> None:
                await closing.aclose()

            app.on_cleanup.append(close)
        self.app = app
        return app

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # handed to the test thread
            self._error = error
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._started.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> AdminServer:
        self._thread.start()
        if not self._started.wait(10.0):
            raise AssertionError("the admin server did not start within 10 s")
        if self._error is not None:
            raise AssertionError(f"the admin server failed to start: {self._error!r}")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)
        if self._thread.is_alive():
            raise AssertionError("the admin server did not stop within 10 s")
        if self._error is not None and kind is None:
            raise AssertionError(f"the admin server failed: {self._error!r}")
