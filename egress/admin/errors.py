"""Every admin API failure as one JSON shape, mapped from our exceptions at one boundary.

A client sees ``{"error": {"status", "code", "message", "problems"?, ...}}`` whatever went
wrong: a bad token, a bad rule, a conflict, a store that is down, or aiohttp's own 404, 405 and
413. Handlers raise; :func:`error_middleware` turns the exception into the response, so no
handler builds an error body by hand and none leaks a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from rules.edits import EditConflictError, UnknownAppError
from rules.problems import InvalidRuleSetError, Problem
from rules.stores.errors import StoreConflictError, StoreError, StoreUnavailableError

__all__ = ["ApiError", "error_middleware", "json_response", "problem_data"]

log = logging.getLogger("egress.admin")

_HTTP_CODES: Mapping[int, tuple[str, str]] = {
    400: ("bad_request", "the request is not valid"),
    404: ("not_found", "no such route; GET /v1/openapi.json lists them"),
    405: ("method_not_allowed", "this route does not take that method"),
    413: ("body_too_large", "the request body is too large"),
}
# aiohttp answers these itself; the client still gets our JSON, and these headers survive.
_KEPT_HEADERS = ("Allow",)


def json_response(
    data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


def problem_data(problem: Problem) -> dict[str, Any]:
    return {
        "key": problem.key,
        "value": problem.value,
        "expected": problem.expected,
        "hint": problem.hint,
    }


class ApiError(Exception):
    """An error response: HTTP status, a stable ``code`` for programs, a ``message`` for people;
    ``extra`` adds fields to the error object (the current ``etag`` of a conflict)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        problems: Iterable[Problem] = (),
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = tuple(problems)
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> web.Response:
        error: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.problems:
            error["problems"] = [problem_data(problem) for problem in self.problems]
        error.update(self.extra)
        return json_response({"error": error}, status=self.status, headers=self.headers)


def invalid(problems: Iterable[Problem], what: str = "the request") -> ApiError:
    """400 listing every problem."""
    found = tuple(problems)
    count = f"{len(found)} problem" + ("" if len(found) == 1 else "s")
    return ApiError(400, "invalid", f"{what} is not valid ({count}; see problems)", problems=found)


def api_error_for(error: Exception) -> ApiError | None:
    """The response for one of our exceptions, or ``None`` for one we do not expect."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidRuleSetError):
        return invalid(error.problems, "the edit")
    if isinstance(error, UnknownAppError):
        return ApiError(404, "unknown_app", f"{error}; GET /v1/apps lists the apps")
    if isinstance(error, EditConflictError | StoreConflictError):
        return ApiError(409, "conflict", str(error))
    if isinstance(error, StoreUnavailableError | StoreError):
        return ApiError(
            503,
            "store_unavailable",
            f"the rule store is unavailable, nothing was changed: {error}",
            headers={"Retry-After": "1"},
        )
    return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our exceptions and aiohttp's HTTP errors become JSON error bodies; anything else is a
    500 that says nothing about the internals (and is logged with its traceback)."""
    try:
        return await handler(request)
    except web.HTTPException as http:
        if http.status < 400:
            raise
        code, message = _HTTP_CODES.get(http.status, ("error", http.reason))
        if http.status == 405:
            allowed = http.headers.get("Allow", "nothing")
            message = f"{request.path} does not take {request.method}; it takes {allowed}"
        elif http.status == 404:
            message = f"no route {request.method} {request.path}; GET /v1/openapi.json lists them"
        elif http.status == 413:
            message = f"the request body is too large: {http.text}"
        headers = {name: http.headers[name] for name in _KEPT_HEADERS if name in http.headers}
        return ApiError(http.status, code, message, headers=headers).response()
    except Exception as error:
        mapped = api_error_for(error)
        if mapped is not None:
            return mapped.response()
        log.exception("admin API request failed", extra={"route": _route(request)})
        return ApiError(
            500, "internal_error", "the request failed inside egress; the proxy log has details"
        ).response()


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
