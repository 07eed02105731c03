"""The admin HTTP API, ``/v1/...``: read and edit the rule store, ask what the proxy decides.

Every edit goes through :meth:`rules.stores.base.RuleStore.commit`: validated by the one
validator, atomic, versioned, audited under the caller's token name. ``If-Match`` carries an
app's ETag (:func:`rules.document.app_etag`) or, for an import, the store version; without it a
write still loses nothing, since the store redoes an edit that lost a race on the fresh state.
Bodies are JSON (``application/json``, at most ``max_body_bytes``); errors are
:mod:`egress.admin.errors` bodies; routes and shapes are described by
:mod:`egress.admin.openapi` at ``GET /v1/openapi.json``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import web

from egress import __version__
from egress.admin.auth import Access, TokenCheck
from egress.admin.bodies import (
    SOURCE,
    check_query,
    decode_json,
    public_app,
    query_bool,
    query_limit,
    query_name,
    read_app_body,
    read_destination_body,
    read_import_body,
    read_patch,
)
from egress.admin.errors import ApiError, invalid, json_response
from egress.admin.openapi import openapi_document
from egress.checking import CheckResult, DestinationError, parse_destination
from egress.config.model import AdminToken
from rules.apps import App
from rules.document import app_etag, app_summary
from rules.edits import (
    CreateApp,
    DeleteApp,
    Edit,
    EditConflictError,
    PutApp,
    ReplaceAll,
    UnknownAppError,
    apply_edit,
)
from rules.problems import Problem, value_repr
from rules.stores.base import Actor, Committed, RuleStore, StoreState
from rules.stores.errors import StoreConflictError, StoreError

__all__ = ["AdminApi", "Checker", "Route"]

log = logging.getLogger("egress.admin")

Checker = Callable[[str, str, int], Awaitable[CheckResult]]
"""``checker(app, host, port)``: the verdict of the rules in force (raises
:class:`rules.edits.UnknownAppError` for an app they do not have)."""

T = TypeVar("T")
RouteHandler = Callable[[web.Request, AdminToken | None], Awaitable[web.StreamResponse]]

VERSION_HEADER: Final = "X-Egress-Version"
HISTORY_MOST: Final = 1000
_OFF_LOOP_BYTES: Final = 64 * 1024  # bodies larger than this are read in a thread
_OFF_LOOP_APPS: Final = 500  # rule sets larger than this are serialised in a thread


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: RouteHandler
    access: Access
    query: tuple[str, ...] = ()  # the query parameters it takes; any other is a 400


class AdminApi:
    """The ``/v1`` routes over one store; :meth:`add_to` puts them on an aiohttp app."""

    def __init__(
        self,
        store: RuleStore,
        *,
        tokens: Sequence[AdminToken] = (),
        checker: Checker | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._store = store
        self._tokens = TokenCheck(tokens)
        self._checker = checker
        self._max_body = max_body_bytes
        self._hostname = socket.gethostname()
        self._document = openapi_document(max_body_bytes=max_body_bytes)

    def routes(self) -> list[Route]:
        read, write = Access.READ, Access.WRITE
        return [
            Route("GET", "/v1/apps", self.list_apps, read),
            Route("GET", "/v1/apps/{name}", self.get_app, read),
            Route("PUT", "/v1/apps/{name}", self.put_app, write, ("revoke",)),
            Route("PATCH", "/v1/apps/{name}", self.patch_app, write),
            Route("DELETE", "/v1/apps/{name}", self.delete_app, write, ("revoke",)),
            Route("GET", "/v1/apps/{name}/check", self.check_query, read, ("destination",)),
            Route("POST", "/v1/apps/{name}/check", self.check_body, read),
            Route("GET", "/v1/history", self.history, read, ("app", "limit")),
            Route("GET", "/v1/export", self.export, read),
            Route("POST", "/v1/import", self.import_, write, ("dry_run", "revoke")),
            Route("GET", "/v1/version", self.version, read),
            Route("GET", "/v1/openapi.json", self.openapi, Access.PUBLIC),
        ]

    def add_to(self, app: web.Application) -> None:
        for route in self.routes():
            app.router.add_route(route.method, route.path, self._guarded(route))

    def _guarded(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            token = self._tokens.authorize(request.headers.get("Authorization"), route.access)
            check_query(request.query, route.query)
            return await route.handler(request, token)

        handle.__name__ = route.handler.__name__
        return handle

    # --- reads ------------------------------------------------------------------------------

    async def list_apps(self, request: web.Request, token: AdminToken | None) -> web.Response:
        state = await self._store.read()
        apps = await _maybe_off_loop(_summaries, state, big=len(state.rule_set) > _OFF_LOOP_APPS)
        return json_response(
            {"version": state.version, "apps": apps}, headers=_version_header(state.version)
        )

    async def get_app(self, request: web.Request, token: AdminToken | None) -> web.Response:
        name = request.match_info["name"]
        state = await self._store.read()
        app = state.app(name)
        if app is None:
            raise UnknownAppError(name)
        return _app_response(state, app)

    async def history(self, request: web.Request, token: AdminToken | None) -> web.Response:
        app = query_name(request.query, "app")
        limit = query_limit(request.query, "limit", default=50, most=HISTORY_MOST)
        records = await self._store.history(app, limit)
        return json_response({"records": [record.to_data() for record in records]})

    async def export(self, request: web.Request, token: AdminToken | None) -> web.Response:
        state = await self._store.read()
        apps = await _maybe_off_loop(_public_apps, state, big=len(state.rule_set) > _OFF_LOOP_APPS)
        headers = {**_version_header(state.version), "ETag": f'"{state.version}"'}
        return json_response({"version": state.version, "app": apps}, headers=headers)

    async def version(self, request: web.Request, token: AdminToken | None) -> web.Response:
        version = await self._store.version()
        return json_response(
            {"version": version, "egress": __version__, "store": self._store.name},
            headers=_version_header(version),
        )

    async def openapi(self, request: web.Request, token: AdminToken | None) -> web.Response:
        return json_response(self._document)

    # --- check ------------------------------------------------------------------------------

    async def check_query(self, request: web.Request, token: AdminToken | None) -> web.Response:
        destination = request.query.get("destination")
        if destination is None:
            raise invalid(
                [Problem(SOURCE, "destination", "nothing", "?destination=HOST:PORT")],
                "the query",
            )
        return await self._check(request.match_info["name"], destination)

    async def check_body(self, request: web.Request, token: AdminToken | None) -> web.Response:
        destination = await self._body(request, read_destination_body)
        return await self._check(request.match_info["name"], destination)

    async def _check(self, name: str, destination: str) -> web.Response:
        try:
            host, port = parse_destination(destination)
        except DestinationError as error:
            problem = Problem(SOURCE, "destination", value_repr(destination), str(error))
            raise invalid([problem], "the destination") from None
        if self._checker is None:
            raise ApiError(
                503, "check_unavailable", "this process has no rules in force to check against"
            )
        result = await self._checker(name, host, port)
        return json_response(result.to_data())

    # --- writes -----------------------------------------------------------------------------

    async def put_app(self, request: web.Request, token: AdminToken | None) -> web.Response:
        name = request.match_info["name"]
        create_only = _create_only(request)
        revoke = query_bool(request.query, "revoke")
        body = await self._body(request, lambda data: read_app_body(data, name))

        def edit(state: StoreState) -> Edit:
            app = body.resolved(state)
            return CreateApp(app) if create_only else PutApp(app)

        committed = await self._commit_app(request, token, name, edit, revoke=revoke)
        created = any(change.before is None for change in committed.change.apps)
        app = committed.state.app(name)
        assert app is not None
        return _app_response(committed.state, app, status=201 if created else 200)

    async def patch_app(self, request: web.Request, token: AdminToken | None) -> web.Response:
        name = request.match_info["name"]
        patch = await self._body(request, read_patch)

        def edit(state: StoreState) -> Edit:
            app = state.app(name)
            if app is None:
                raise UnknownAppError(name)
            rule_set = state.rule_set
            for each in patch.edits(app):
                rule_set = apply_edit(rule_set, each, source=SOURCE).rule_set
            return PutApp(next(a for a in rule_set.apps if a.name == name))

        committed = await self._commit_app(request, token, name, edit, revoke=patch.revoke)
        app = committed.state.app(name)
        assert app is not None
        return _app_response(committed.state, app)

    async def delete_app(self, request: web.Request, token: AdminToken | None) -> web.Response:
        name = request.match_info["name"]
        revoke = query_bool(request.query, "revoke")
        committed = await self._commit_app(request, token, name, DeleteApp(name), revoke=revoke)
        return web.Response(status=204, headers=_version_header(committed.state.version))

    async def import_(self, request: web.Request, token: AdminToken | None) -> web.Response:
        dry_run = query_bool(request.query, "dry_run")
        revoke = query_bool(request.query, "revoke")
        body = await self._body(request, read_import_body)
        actor = self._actor(request, token)
        try:
            committed = await self._store.commit(
                lambda state: ReplaceAll(body.resolved(state)),
                actor,
                if_match=request.headers.get("If-Match"),
                revoke=revoke,
                dry_run=dry_run,
            )
        except StoreConflictError as error:
            current = await self._current_version(error)
            raise ApiError(409, "conflict", str(error), extra={"version": current}) from None
        self._log_commit(committed, actor)
        version = committed.state.version
        return json_response(
            {
                "version": version,
                "dry_run": dry_run,
                "summary": committed.change.summary(),
                "changes": [change.describe() for change in committed.change.apps],
            },
            headers=_version_header(version),
        )

    # --- helpers ----------------------------------------------------------------------------

    async def _body(self, request: web.Request, parse: Callable[[Any], T]) -> T:
        """The request's JSON body, read by ``parse`` (off the event loop when it is big)."""
        if request.content_type != "application/json" or request.charset not in (None, "utf-8"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the body as JSON with 'Content-Type: application/json', not"
                f" {request.headers.get('Content-Type', 'no Content-Type')!r}",
            )
        length = request.content_length
        if length is not None and length > self._max_body:
            raise ApiError(
                413,
                "body_too_large",
                f"the request body is {length} bytes; the most this API reads is"
                f" {self._max_body} bytes",
            )
        raw = await request.read()

        def read() -> T:
            return parse(decode_json(raw))

        return await _maybe_off_loop(read, big=len(raw) > _OFF_LOOP_BYTES)

    def _actor(self, request: web.Request, token: AdminToken | None) -> Actor:
        name = token.name if token is not None else "?"
        return Actor(name, "api", f"{request.remote or '?'} via {self._hostname}")

    async def _commit_app(
        self,
        request: web.Request,
        token: AdminToken | None,
        name: str,
        edit: Edit | Callable[[StoreState], Edit],
        *,
        revoke: bool,
    ) -> Committed:
        actor = self._actor(request, token)
        try:
            committed = await self._store.commit(
                edit, actor, if_match=request.headers.get("If-Match"), revoke=revoke
            )
        except (EditConflictError, StoreConflictError) as error:
            raise await self._app_conflict(name, error) from None
        self._log_commit(committed, actor)
        return committed

    async def _app_conflict(self, name: str, error: Exception) -> ApiError:
        """409 carrying the app's current ETag (``null``: it does not exist)."""
        try:
            app = (await self._store.read()).app(name)
            tag = None if app is None else app_etag(app)
        except StoreError:
            tag = error.current if isinstance(error, StoreConflictError) else None
        headers = {} if tag is None else {"ETag": f'"{tag}"'}
        return ApiError(409, "conflict", str(error), headers=headers, extra={"etag": tag})

    async def _current_version(self, error: StoreConflictError) -> int | None:
        try:
            return await self._store.version()
        except StoreError:
            return int(error.current) if error.current and error.current.isdigit() else None

    def _log_commit(self, committed: Committed, actor: Actor) -> None:
        if committed.record is None:
            return
        log.info(
            "rules edited",
            extra={
                "actor": actor.name,
                "via": actor.via,
                "host": actor.host,
                "rules_version": committed.record.version,
                "summary": committed.record.summary,
                "revoke": committed.record.revoke,
            },
        )


def _create_only(request: web.Request) -> bool:
    value = request.headers.get("If-None-Match")
    if value is None:
        return False
    if value.strip() == "*":
        return True
    raise ApiError(
        400,
        "invalid",
        f"If-None-Match takes only '*' (create the app only if it does not exist), not {value!r}",
    )


def _version_header(version: int) -> dict[str, str]:
    return {VERSION_HEADER: str(version)}


def _app_response(state: StoreState, app: App, *, status: int = 200) -> web.Response:
    tag = app_etag(app)
    headers = {**_version_header(state.version), "ETag": f'"{tag}"'}
    body = {"app": public_app(app), "etag": tag, "version": state.version}
    return json_response(body, status=status, headers=headers)


def _summaries(state: StoreState) -> list[dict[str, Any]]:
    return [app_summary(app) for app in state.rule_set.apps]


def _public_apps(state: StoreState) -> list[dict[str, Any]]:
    return [public_app(app) for app in state.rule_set.apps]


async def _maybe_off_loop(function: Callable[..., T], *args: Any, big: bool) -> T:
    """``function(*args)``, in a thread when the work is big (the proxy shares this loop)."""
    if big:
        return await asyncio.to_thread(function, *args)
    return function(*args)
