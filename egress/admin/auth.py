"""Bearer tokens for the admin API: who is calling, and may they do this?

The config holds only the SHA-256 of each token (``[admin].tokens``). A presented token is
hashed and compared with every configured hash with :func:`hmac.compare_digest`, with no early
exit, so the time taken says nothing about which hash, or how much of one, matched.

Reads need a ``read`` or ``write`` token, writes a ``write`` token. With no token configured the
API serves nobody (every ``/v1`` route but the OpenAPI document answers 403): the CLI reads and
edits the store on the node without a token, so a local operator loses nothing, while anonymous
reads on loopback would hand every tenant's whitelist to any local user, or to the world through
a reverse proxy put in front of the listener.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from enum import Enum

from egress.admin.errors import ApiError
from egress.config.model import AdminRole, AdminToken

__all__ = ["Access", "TokenCheck"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="egress"'}
_MAX_TOKEN = 4096


class Access(Enum):
    """What a route needs: ``PUBLIC`` (no token), ``READ``, ``WRITE``."""

    PUBLIC = "public"
    READ = "read"
    WRITE = "write"


class TokenCheck:
    """Authorises requests against the configured tokens."""

    def __init__(self, tokens: Sequence[AdminToken]) -> None:
        self._tokens = tuple((bytes.fromhex(token.sha256), token) for token in tokens)

    @property
    def configured(self) -> bool:
        return bool(self._tokens)

    def identify(self, presented: str) -> AdminToken | None:
        """The token whose hash matches ``presented``; every hash is compared."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: AdminToken | None = None
        for expected, token in self._tokens:
            matched = hmac.compare_digest(digest, expected)
            if matched and found is None:
                found = token
        return found

    def authorize(self, authorization: str | None, access: Access) -> AdminToken | None:
        """The caller's token (``None`` for a public route), or raise 401 / 403."""
        if access is Access.PUBLIC:
            return None
        if not self._tokens:
            raise ApiError(
                403,
                "no_tokens_configured",
                "the admin API is off: no token is configured; add [admin].tokens ="
                ' [{ name = "ops", sha256 = "<sha256 hex of the token>", role = "write" }]'
                " and restart (the egress CLI edits rules without a token)",
            )
        presented = _bearer(authorization)
        token = self.identify(presented)
        if token is None:
            raise ApiError(
                401,
                "bad_token",
                "the bearer token matches no configured token ([admin].tokens holds their SHA-256)",
                headers={"WWW-Authenticate": 'Bearer realm="egress", error="invalid_token"'},
            )
        if access is Access.WRITE and token.role is not AdminRole.WRITE:
            raise ApiError(
                403,
                "read_only_token",
                f"token {token.name!r} has role {token.role.value}; this request changes rules"
                " and needs a token with role write",
            )
        return token


def _bearer(authorization: str | None) -> str:
    if authorization is None:
        raise ApiError(
            401,
            "missing_token",
            "send the admin token as 'Authorization: Bearer <token>'",
            headers=_CHALLENGE,
        )
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or len(credentials) > _MAX_TOKEN:
        raise ApiError(
            401,
            "missing_token",
            "the Authorization header must be 'Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="egress", error="invalid_request"'},
        )
    return credentials
