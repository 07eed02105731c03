"""The OpenAPI 3.1 description of the admin listener, served at ``GET /v1/openapi.json``.

Written out by hand, as data, and kept true by ``tests/integration/test_admin_api.py``, which
generates requests from it with schemathesis against a live listener and checks that every
answer is one this document promises (status, headers, body schema), and that every route of
the router is described here and nothing else is.
"""

from __future__ import annotations

from typing import Any, Final

from egress import __version__

__all__ = ["openapi_document"]

_APP_NAME: Final = "^[a-z0-9][a-z0-9_-]{0,62}$"
_UID_TEXT: Final = "^[0-9]{1,10}(-[0-9]{1,10})?$"
_MAX_UID: Final = 2**32 - 1


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(
    properties: dict[str, Any], *, required: tuple[str, ...] = (), description: str = ""
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


_LIMITS: Final = {
    "connections_per_second": {"type": "number", "minimum": 0.001, "maximum": 1_000_000},
    "burst": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "max_concurrent": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "bandwidth_bytes_per_second": {"type": "integer", "minimum": 1, "maximum": 10**12},
    "bandwidth_burst_bytes": {"type": "integer", "minimum": 1, "maximum": 10**12},
    "destination_connections_per_second": {
        "type": "number",
        "minimum": 0.001,
        "maximum": 1_000_000,
    },
    "destination_burst": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
}
_UIDS: Final = {
    "type": "array",
    "minItems": 1,
    "items": _ref("Uids"),
    "description": "Uids and uid ranges (never 0); no uid may belong to two apps.",
}
_RULES: Final = {"type": "array", "items": _ref("RuleText")}
_MODE: Final = {"type": "string", "enum": ["enforce", "report"]}


def _schemas() -> dict[str, Any]:
    app_input_properties = {
        "name": {"type": "string", "pattern": _APP_NAME},
        "uids": _UIDS,
        "allow": _RULES,
        "mode": _MODE,
        "limits": _ref("Limits"),
        "proxy_auth": _ref("ProxyAuthInput"),
    }
    return {
        "Problem": _object(
            {
                "key": {"type": "string", "description": "Where: a key path such as uids[0]."},
                "value": {"type": "string", "description": "What was found (shortened)."},
                "expected": {"type": "string"},
                "hint": {"type": ["string", "null"]},
            },
            required=("key", "value", "expected", "hint"),
        ),
        "Error": _object(
            {
                "error": _object(
                    {
                        "status": {"type": "integer"},
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "problems": {"type": "array", "items": _ref("Problem")},
                        "etag": {
                            "type": ["string", "null"],
                            "description": "On a conflict over an app: its ETag now (null: it"
                            " does not exist).",
                        },
                        "version": {
                            "type": ["integer", "null"],
                            "description": "On a conflict over an import: the store version.",
                        },
                    },
                    required=("status", "code", "message"),
                )
            },
            required=("error",),
        ),
        "Uids": {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": _MAX_UID},
                {"type": "string", "pattern": _UID_TEXT},
            ],
            "description": 'A uid, or a range "FIRST-LAST".',
        },
        "RuleText": {
            "type": "string",
            "minLength": 1,
            "maxLength": 4096,
            "description": "HOST:PORTS, e.g. api.example.com:443, *.example.com:80,443,"
            " 203.0.113.0/24:8000-8100, [2001:db8::]/32:443, 198.51.100.7:*",
        },
        "Limits": _object(_LIMITS),
        "LimitsPatch": _object({key: _nullable(value) for key, value in _LIMITS.items()}),
        "ProxyAuthInput": _object(
            {
                "username": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[^:\\x00-\\x1f\\x7f]+$",
                },
                "password_sha256": {
                    "type": "string",
                    "pattern": "^[0-9a-fA-F]{64}$",
                    "description": "Leave it out to keep the password the app has.",
                },
            },
            required=("username",),
        ),
        "AppInput": _object(
            app_input_properties,
            required=("uids",),
            description="A whole app; name, if given, must match the path.",
        ),
        "AppImport": _object(app_input_properties, required=("name", "uids")),
        "App": _object(
            {
                "name": {"type": "string"},
                "uids": {"type": "array", "items": {"type": "string"}},
                "allow": {"type": "array", "items": {"type": "string"}},
                "mode": _MODE,
                "limits": _ref("Limits"),
                "proxy_auth": _object(
                    {"username": {"type": "string"}},
                    required=("username",),
                    description="The password hash is never shown.",
                ),
            },
            required=("name", "uids", "allow", "mode"),
        ),
        "AppResponse": _object(
            {
                "app": _ref("App"),
                "etag": {"type": "string"},
                "version": {"type": "integer", "minimum": 0},
            },
            required=("app", "etag", "version"),
        ),
        "AppSummary": _object(
            {
                "name": {"type": "string"},
                "uids": {"type": "array", "items": {"type": "string"}},
                "mode": _MODE,
                "rules": {"type": "integer", "minimum": 0},
                "limits": _nullable(_ref("Limits")),
                "etag": {"type": "string"},
            },
            required=("name", "uids", "mode", "rules", "limits", "etag"),
        ),
        "AppList": _object(
            {
                "version": {"type": "integer", "minimum": 0},
                "apps": {"type": "array", "items": _ref("AppSummary")},
            },
            required=("version", "apps"),
        ),
        "AppPatch": _object(
            {
                "add_rules": _RULES,
                "remove_rules": _RULES,
                "uids": _UIDS,
                "mode": _MODE,
                "limits": {
                    **_nullable(_ref("LimitsPatch")),
                    "description": "Merged: keys given are set, keys given as null cleared, the"
                    " rest kept; null clears every limit.",
                },
                "revoke": {
                    "type": "boolean",
                    "description": "Also close open tunnels the new rules no longer allow.",
                },
            },
            description="Changes to one app, applied together or not at all.",
        ),
        "CheckRequest": _object(
            {"destination": {"type": "string", "description": "HOST:PORT or [IPV6]:PORT"}},
            required=("destination",),
        ),
        "CheckResult": _object(
            {
                "app": {"type": "string"},
                "destination": {"type": "string"},
                "allowed": {"type": "boolean"},
                "decision": {"type": "string"},
                "reason": {"type": "string"},
                "rule": {"type": ["string", "null"]},
                "detail": {"type": ["string", "null"]},
                "addresses": {"type": "array", "items": {"type": "string"}},
                "rules_version": {"type": "integer"},
                "explanation": {"type": "string"},
            },
            required=(
                "app",
                "destination",
                "allowed",
                "decision",
                "reason",
                "rule",
                "detail",
                "addresses",
                "rules_version",
                "explanation",
            ),
        ),
        "AuditRecord": _object(
            {
                "version": {"type": "integer"},
                "at": {"type": "number", "description": "Unix time (the store's clock)."},
                "actor": _object(
                    {
                        "name": {"type": "string", "description": "Token name or OS user."},
                        "via": {"type": "string", "enum": ["api", "cli"]},
                        "host": {"type": "string"},
                    },
                    required=("name", "via", "host"),
                ),
                "summary": {"type": "string"},
                "changes": {"type": "array", "items": {"type": "object"}},
                "revoke": {"type": "boolean"},
            },
            required=("version", "at", "actor", "summary", "changes", "revoke"),
        ),
        "History": _object(
            {"records": {"type": "array", "items": _ref("AuditRecord")}},
            required=("records",),
        ),
        "Export": _object(
            {
                "version": {"type": "integer", "minimum": 0},
                "app": {"type": "array", "items": _ref("App")},
            },
            required=("version", "app"),
        ),
        "ImportRequest": _object(
            {
                "app": {"type": "array", "items": _ref("AppImport")},
                "version": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Allowed so an export imports as is; not used (If-Match is).",
                },
            },
            required=("app",),
            description="Every app the store is to hold; an app left out is deleted.",
        ),
        "ImportResult": _object(
            {
                "version": {"type": "integer", "minimum": 0},
                "dry_run": {"type": "boolean"},
                "summary": {"type": "string"},
                "changes": {"type": "array", "items": {"type": "object"}},
            },
            required=("version", "dry_run", "summary", "changes"),
        ),
        "Version": _object(
            {
                "version": {"type": "integer", "minimum": 0},
                "egress": {"type": "string"},
                "store": {"type": "string"},
            },
            required=("version", "egress", "store"),
        ),
    }


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        response["headers"] = headers
    return response


def _responses(max_body_bytes: int) -> dict[str, Any]:
    header = {"schema": {"type": "string"}, "required": True}
    return {
        "BadRequest": _error("Bad JSON, bad parameters or an invalid edit (every problem)."),
        "Unauthorized": _error(
            "No token, or one that matches no configured token.", **{"WWW-Authenticate": header}
        ),
        "Forbidden": _error("A read token on a write, or no token configured at all."),
        "NotFound": _error("No such app."),
        "Conflict": _error(
            "If-Match does not match, the app exists (If-None-Match: *), a removed rule is not"
            " there, or writers kept colliding."
        ),
        "TooLarge": _error(f"The body is larger than {max_body_bytes} bytes."),
        "UnsupportedMediaType": _error("The body is not sent as application/json."),
        "Unavailable": _error("The rule store cannot be reached; nothing changed."),
    }


def _errors(*codes: int) -> dict[str, Any]:
    names = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        413: "TooLarge",
        415: "UnsupportedMediaType",
        503: "Unavailable",
    }
    return {str(code): {"$ref": f"#/components/responses/{names[code]}"} for code in codes}


_READ_ERRORS: Final = (401, 403, 503)
_BODY_ERRORS: Final = (400, 413, 415)
_VERSION_HEADER: Final = {
    "X-Egress-Version": {
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
        "required": True,
        "description": "The store version the answer reflects.",
    }
}
_ETAG_HEADER: Final = {
    "ETag": {"schema": {"type": "string"}, "required": True, "description": "The app's ETag."}
}


def _ok(description: str, schema: str, *, etag: bool = False, version: bool = True) -> Any:
    response: dict[str, Any] = {"description": description, "content": _json(_ref(schema))}
    headers = {**(_VERSION_HEADER if version else {}), **(_ETAG_HEADER if etag else {})}
    if headers:
        response["headers"] = headers
    return response


def _parameter(name: str, where: str, schema: dict[str, Any], description: str) -> Any:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


def _name(example: str) -> dict[str, Any]:
    return {
        **_parameter("name", "path", {"type": "string", "pattern": _APP_NAME}, "App name."),
        "example": example,
    }


_NAME: Final = _name("blog")
_IF_MATCH: Final = _parameter(
    "If-Match", "header", {"type": "string"}, "The app's ETag: change it only if it is still so."
)
_REVOKE: Final = _parameter(
    "revoke",
    "query",
    {"type": "boolean"},
    "Also close open tunnels the new rules no longer allow.",
)


def _body(schema: str, example: object) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": _ref(schema), "example": example}},
    }


_APP_EXAMPLE: Final = {
    "uids": ["10001"],
    "allow": ["api.example.com:443", "*.example.org:80,443"],
    "mode": "enforce",
    "limits": {"connections_per_second": 20, "burst": 40},
}


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _paths() -> dict[str, Any]:
    public: list[Any] = []
    return {
        "/v1/apps": {
            "get": {
                "operationId": "listApps",
                "summary": "Every app: name, uids, mode, rule count, limits, ETag.",
                "responses": {"200": _ok("The apps.", "AppList"), **_errors(*_READ_ERRORS)},
            }
        },
        "/v1/apps/{name}": {
            "parameters": [_NAME],
            "get": {
                "operationId": "getApp",
                "summary": "One app, whole (the password hash is never shown).",
                "responses": {
                    "200": _ok("The app.", "AppResponse", etag=True),
                    **_errors(*_READ_ERRORS, 404),
                },
            },
            "put": {
                "operationId": "putApp",
                "summary": "Create the app or replace it whole.",
                "parameters": [
                    _IF_MATCH,
                    _parameter(
                        "If-None-Match",
                        "header",
                        {"type": "string", "enum": ["*"]},
                        "'*': create only; 409 if the app exists.",
                    ),
                    _REVOKE,
                ],
                "requestBody": _body("AppInput", _APP_EXAMPLE),
                "responses": {
                    "200": _ok("Replaced (or unchanged).", "AppResponse", etag=True),
                    "201": _ok("Created.", "AppResponse", etag=True),
                    **_errors(*_BODY_ERRORS, *_READ_ERRORS, 409),
                },
            },
            "patch": {
                "operationId": "patchApp",
                "summary": "Add or remove rules, change uids, mode or limits, in one edit.",
                "parameters": [_IF_MATCH],
                "requestBody": _body(
                    "AppPatch", {"add_rules": ["cdn.example.net:443"], "limits": {"burst": 80}}
                ),
                "responses": {
                    "200": _ok("The app after the edit.", "AppResponse", etag=True),
                    **_errors(*_BODY_ERRORS, *_READ_ERRORS, 404, 409),
                },
            },
            "delete": {
                "operationId": "deleteApp",
                "summary": "Delete the app.",
                "parameters": [_name("shop"), _IF_MATCH, _REVOKE],
                "responses": {
                    "204": {"description": "Deleted.", "headers": _VERSION_HEADER},
                    **_errors(400, *_READ_ERRORS, 404, 409),
                },
            },
        },
        "/v1/apps/{name}/check": {
            "parameters": [_NAME],
            "get": {
                "operationId": "checkAppQuery",
                "summary": "What the rules in force decide for a destination (nothing dialed).",
                "parameters": [
                    {
                        **_parameter(
                            "destination", "query", {"type": "string"}, "HOST:PORT to check."
                        ),
                        "required": True,
                        "example": "api.example.com:443",
                    }
                ],
                "responses": {
                    "200": _ok("The verdict.", "CheckResult", version=False),
                    **_errors(400, *_READ_ERRORS, 404),
                },
            },
            "post": {
                "operationId": "checkAppBody",
                "summary": "The same check, the destination in a JSON body (a read: no change).",
                "requestBody": _body("CheckRequest", {"destination": "api.example.com:443"}),
                "responses": {
                    "200": _ok("The verdict.", "CheckResult", version=False),
                    **_errors(*_BODY_ERRORS, *_READ_ERRORS, 404),
                },
            },
        },
        "/v1/history": {
            "get": {
                "operationId": "history",
                "summary": "The audit trail, newest first: who changed what, when.",
                "parameters": [
                    _parameter(
                        "app",
                        "query",
                        {"type": "string", "pattern": _APP_NAME},
                        "Only records touching this app.",
                    ),
                    _parameter(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                        "At most this many records.",
                    ),
                ],
                "responses": {
                    "200": _ok("The records.", "History", version=False),
                    **_errors(400, *_READ_ERRORS),
                },
            }
        },
        "/v1/export": {
            "get": {
                "operationId": "export",
                "summary": "Every app, in the shape POST /v1/import takes.",
                "responses": {
                    "200": {
                        **_ok("The rule set (ETag: the store version).", "Export"),
                        "headers": {**_VERSION_HEADER, **_ETAG_HEADER},
                    },
                    **_errors(*_READ_ERRORS),
                },
            }
        },
        "/v1/import": {
            "post": {
                "operationId": "import",
                "summary": "Replace every app at once, all or nothing (dry_run: only the diff).",
                "parameters": [
                    _parameter(
                        "If-Match",
                        "header",
                        {"type": "string"},
                        "The store version the import was prepared against.",
                    ),
                    _parameter(
                        "dry_run",
                        "query",
                        {"type": "boolean"},
                        "Say what would change; change nothing.",
                    ),
                    _REVOKE,
                ],
                "requestBody": _body("ImportRequest", {"app": [{"name": "blog", **_APP_EXAMPLE}]}),
                "responses": {
                    "200": _ok("What changed (or would).", "ImportResult"),
                    **_errors(*_BODY_ERRORS, *_READ_ERRORS, 409),
                },
            }
        },
        "/v1/version": {
            "get": {
                "operationId": "version",
                "summary": "The store version and the egress release.",
                "responses": {"200": _ok("Versions.", "Version"), **_errors(*_READ_ERRORS)},
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": public,
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": _json({"type": "object"}),
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up.",
                "security": public,
                "responses": {"200": _text("Up.")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Accepting connections, and the rule store answers (when there is one).",
                "security": public,
                "responses": {"200": _text("Ready."), "503": _text("Not ready.")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "security": public,
                "responses": {"200": _text("Prometheus text format.")},
            }
        },
    }


def openapi_document(*, max_body_bytes: int) -> dict[str, Any]:
    """The whole document (parts of it are shared constants: serialise it, do not edit it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "egress admin API",
            "version": __version__,
            "description": "Read and edit the egress rule store; ask what the proxy decides."
            " Bodies are JSON; every error is an Error object. Writes need a token with role"
            " write, reads one with role read or write.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of [admin].tokens (the config keeps its SHA-256).",
                }
            },
            "schemas": _schemas(),
            "responses": _responses(max_body_bytes),
        },
    }
