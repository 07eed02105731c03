"""The admin HTTP listener: ``/metrics`` for Prometheus, ``/healthz``, ``/readyz`` and, over a
rule store, the ``/v1`` API (:mod:`egress.admin.api`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from egress.admin.api import AdminApi, Checker
from egress.admin.errors import error_middleware
from egress.admin.metrics import AdminMetrics
from egress.config.model import AdminToken
from egress.metrics import ProxyMetrics
from rules.stores.base import RuleStore

__all__ = ["build_admin_app"]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def build_admin_app(
    metrics: ProxyMetrics,
    *,
    ready: Callable[[], bool],
    store: RuleStore | None = None,
    tokens: Sequence[AdminToken] = (),
    checker: Checker | None = None,
    store_ready: Callable[[], Awaitable[bool]] | None = None,
    limiter_mode: Callable[[], str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> web.Application:
    """The admin app (build it once per ``metrics``: it registers its own series there).

    ``ready``: the proxy is accepting (false while starting or draining).
    ``store``: the rule store the ``/v1`` API reads and edits; ``None`` serves no ``/v1``
    routes (404). ``tokens``: ``[admin].tokens``; with none, ``/v1`` answers 403 (only the
    OpenAPI document is public). ``checker(app, host, port)``: the verdict of the rules in force
    for ``/v1/apps/{name}/check`` (raises ``UnknownAppError`` for an app they lack); ``None``:
    that route answers 503. ``store_ready()``: whether the store answers; with a store,
    ``/readyz`` is 200 only when ``ready()`` and ``await store_ready()`` are both true.
    ``limiter_mode()``: the rate limiter's mode in force (``redis``, or its fallback while Redis
    is away), shown on a second line of ``/readyz``: a fallback is degraded, not unready.
    ``max_body_bytes``: the largest request body read (413 past it).
    """

    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if not ready():
            return web.Response(status=503, text="not ready\n")
        if store is not None and store_ready is not None and not await _answers(store_ready):
            return web.Response(
                status=503, text="not ready: the rule store does not answer or holds no rules\n"
            )
        if limiter_mode is None:
            return web.Response(text="ready\n")
        return web.Response(text=f"ready\nratelimit: {limiter_mode()}\n")

    counted = AdminMetrics(metrics.registry)
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[counted.middleware, error_middleware]
    )
    app.router.add_get("/metrics", metrics_handler, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    if store is not None:
        AdminApi(store, tokens=tokens, checker=checker, max_body_bytes=max_body_bytes).add_to(app)
    return app


async def _answers(store_ready: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await store_ready()
    except Exception:  # a probe that fails is a store that does not answer
        return False
