"""Admin listener requests, counted by route template (never the raw path), method and status.

Registered on the proxy's registry (:attr:`egress.metrics.ProxyMetrics.registry`), so they are
scraped with everything else. Labels are bounded: the route is a template from the route table
(``/v1/apps/{name}``) or ``unmatched``, the method one of a fixed set or ``other``.
"""

from __future__ import annotations

import time
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from egress.admin.errors import Handler

__all__ = ["AdminMetrics"]

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AdminMetrics:
    """``egress_admin_requests_total{route,method,status}`` and
    ``egress_admin_request_seconds{route}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "egress_admin_requests",
            "Admin listener requests by route template, method and HTTP status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "egress_admin_request_seconds",
            "Time to answer an admin listener request, by route template.",
            ["route"],
            buckets=_BUCKETS,
            registry=registry,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: sees the status the error middleware settled on."""
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            route = await _route_of(request, status)
            method = request.method if request.method in _METHODS else "other"
            self.requests.labels(route, method, str(status)).inc()
            self.seconds.labels(route).observe(time.perf_counter() - started)


async def _route_of(request: web.Request, status: int) -> str:
    """The route template; for a 405 the route whose path matched (aiohttp gives no resource
    then), so a wrong method on ``/v1/apps`` is not counted as an unknown path."""
    resource = request.match_info.route.resource
    if resource is not None:
        return resource.canonical
    if status == 405:
        for candidate in request.app.router.resources():
            _, allowed = await candidate.resolve(request)
            if allowed:
                return candidate.canonical
    return "unmatched"
