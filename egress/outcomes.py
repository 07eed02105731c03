"""One table maps every connection outcome to the wire, the metrics and the log.

Each :class:`Outcome` has exactly one :class:`Row`: the ``decision`` label it is counted under,
the SOCKS5 reply code, the HTTP status, the RFC 9209 ``Proxy-Status`` error type, the extra
headers its HTTP reply carries and the default one-line detail. The outcome's value is the
metric ``reason`` label and the log's ``reason`` field. Nothing else maps outcomes to codes or
texts, so the vocabulary is the same everywhere an operator (or a sandboxed app) looks; only an
HTTP parser error may make a 400 or 502 more precise (431, 501, 505), as HTTP allows.

``socks5`` and ``http`` are ``None`` for outcomes that get no reply at all: the connection is
closed (refused at accept, timed out, or the client already left).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class Outcome(StrEnum):
    """Why a connection ended the way it did. Values are the metric and log vocabulary."""

    ALLOWED = "allowed"
    NOT_ALLOWED = "not_allowed"
    SPECIAL_ADDRESS = "special_address"
    UNKNOWN_CLIENT = "unknown_client"
    IDENTITY_ERROR = "identity_error"
    AUTH_REQUIRED = "auth_required"
    AUTH_FAILED = "auth_failed"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    LIMITER_UNAVAILABLE = "limiter_unavailable"
    CONNECTION_LIMIT = "connection_limit"
    HANDSHAKE_LIMIT = "handshake_limit"
    BAD_REQUEST = "bad_request"
    BAD_ADDRESS = "bad_address"
    UNSUPPORTED_COMMAND = "unsupported_command"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    CLIENT_CLOSED = "client_closed"
    DNS_FAILURE = "dns_failure"
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    UNREACHABLE = "unreachable"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    SHUTTING_DOWN = "shutting_down"
    REVOKED = "revoked"


class DecisionLabel(StrEnum):
    """The metric and log ``decision``: what kind of ending an outcome is."""

    ALLOWED = "allowed"  # relayed
    REPORTED = "reported"  # relayed in report mode although enforce mode would have denied it
    DENIED = "denied"  # refused on purpose: rules, identity, credentials, limits
    ERROR = "error"  # never reached a decision, or failed after it: protocol, DNS, upstream


# SOCKS5 reply codes (RFC 1928 section 6).
SOCKS5_SUCCEEDED: Final = 0x00
SOCKS5_GENERAL_FAILURE: Final = 0x01
SOCKS5_NOT_ALLOWED: Final = 0x02
SOCKS5_NETWORK_UNREACHABLE: Final = 0x03
SOCKS5_HOST_UNREACHABLE: Final = 0x04
SOCKS5_CONNECTION_REFUSED: Final = 0x05
SOCKS5_TTL_EXPIRED: Final = 0x06
SOCKS5_COMMAND_NOT_SUPPORTED: Final = 0x07
SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

PROXY_AUTHENTICATE: Final = ("Proxy-Authenticate", 'Basic realm="egress"')


@dataclass(frozen=True, slots=True)
class Row:
    """How one outcome is counted, logged and spelled on each protocol."""

    decision: DecisionLabel
    socks5: int | None  # RFC 1928 reply code; None: closed without a reply
    http: int | None  # HTTP status; None: closed without a reply
    proxy_status: str | None  # RFC 9209 error type; None for success or no reply
    detail: str  # the default one-line detail, when nothing more specific is known
    challenge: bool = False  # the HTTP reply carries Proxy-Authenticate
    retry_after: bool = False  # the HTTP reply carries Retry-After (seconds, from the verdict)

    def http_headers(self, retry_after: float | None = None) -> list[tuple[str, str]]:
        """The extra headers of this outcome's HTTP reply."""
        headers: list[tuple[str, str]] = []
        if self.challenge:
            headers.append(PROXY_AUTHENTICATE)
        if self.retry_after:
            headers.append(("Retry-After", str(max(1, math.ceil(retry_after or 1)))))
        return headers


_D, _R = DecisionLabel.DENIED, DecisionLabel.ERROR
_DENIED_IP: Final = "destination_ip_prohibited"
_DENIED: Final = "http_request_denied"
_BAD: Final = "http_request_error"

OUTCOMES: Final[Mapping[Outcome, Row]] = MappingProxyType(
    {
        Outcome.ALLOWED: Row(DecisionLabel.ALLOWED, SOCKS5_SUCCEEDED, 200, None, "allowed"),
        Outcome.NOT_ALLOWED: Row(
            _D, SOCKS5_NOT_ALLOWED, 403, _DENIED_IP, "no rule of this app allows the destination"
        ),
        Outcome.SPECIAL_ADDRESS: Row(
            _D, SOCKS5_NOT_ALLOWED, 403, _DENIED_IP, "destination is a special-purpose address"
        ),
        Outcome.UNKNOWN_CLIENT: Row(
            _D, None, None, None, "the connecting uid belongs to no app; refused at accept"
        ),
        Outcome.IDENTITY_ERROR: Row(
            _R, None, None, None, "the kernel could not confirm who owns the client socket"
        ),
        Outcome.AUTH_REQUIRED: Row(
            _D, SOCKS5_NOT_ALLOWED, 407, _DENIED, "proxy credentials required", challenge=True
        ),
        Outcome.AUTH_FAILED: Row(
            _D, SOCKS5_NOT_ALLOWED, 407, _DENIED, "proxy credentials rejected", challenge=True
        ),
        Outcome.RATE_LIMITED: Row(
            _D,
            SOCKS5_NOT_ALLOWED,
            429,
            "connection_limit_reached",
            "this app opens connections faster than its limit",
            retry_after=True,
        ),
        Outcome.TOO_MANY_CONNECTIONS: Row(
            _D,
            SOCKS5_NOT_ALLOWED,
            429,
            "connection_limit_reached",
            "this app holds as many tunnels as its max_concurrent limit allows",
        ),
        Outcome.LIMITER_UNAVAILABLE: Row(
            _R,
            SOCKS5_GENERAL_FAILURE,
            503,
            "proxy_internal_error",
            'the rate limiter\'s Redis is unreachable and ratelimit.on_redis_error = "deny"',
            retry_after=True,
        ),
        Outcome.CONNECTION_LIMIT: Row(
            _D, None, None, None, "proxy.max_connections reached; refused at accept"
        ),
        Outcome.HANDSHAKE_LIMIT: Row(
            _D, None, None, None, "proxy.max_handshakes_per_app reached; refused at accept"
        ),
        Outcome.BAD_REQUEST: Row(
            _R, SOCKS5_GENERAL_FAILURE, 400, _BAD, "malformed or oversized request"
        ),
        Outcome.BAD_ADDRESS: Row(
            _R, SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED, 400, _BAD, "invalid destination address"
        ),
        Outcome.UNSUPPORTED_COMMAND: Row(
            _R, SOCKS5_COMMAND_NOT_SUPPORTED, 405, _DENIED, "only CONNECT is supported"
        ),
        Outcome.HANDSHAKE_TIMEOUT: Row(
            _R, None, None, None, "no complete request within proxy.handshake_timeout"
        ),
        Outcome.CLIENT_CLOSED: Row(_R, None, None, None, "the client closed before a reply"),
        Outcome.DNS_FAILURE: Row(
            _R, SOCKS5_HOST_UNREACHABLE, 502, "dns_error", "the name did not resolve"
        ),
        Outcome.DNS_TIMEOUT: Row(
            _R, SOCKS5_HOST_UNREACHABLE, 504, "dns_timeout", "no DNS answer in time"
        ),
        Outcome.CONNECT_REFUSED: Row(
            _R, SOCKS5_CONNECTION_REFUSED, 502, "connection_refused", "the upstream refused"
        ),
        Outcome.CONNECT_TIMEOUT: Row(
            _R, SOCKS5_TTL_EXPIRED, 504, "connection_timeout", "no connection within the deadline"
        ),
        Outcome.UNREACHABLE: Row(
            _R, SOCKS5_HOST_UNREACHABLE, 502, "destination_unavailable", "no route to the upstream"
        ),
        Outcome.UPSTREAM_ERROR: Row(
            _R,
            SOCKS5_GENERAL_FAILURE,
            502,
            "proxy_internal_error",
            "talking to the upstream failed",
        ),
        Outcome.UPSTREAM_PROTOCOL_ERROR: Row(
            _R,
            SOCKS5_GENERAL_FAILURE,
            502,
            "http_protocol_error",
            "the upstream's response was not valid HTTP",
        ),
        Outcome.SHUTTING_DOWN: Row(
            _R, SOCKS5_GENERAL_FAILURE, 503, "proxy_internal_error", "the proxy is shutting down"
        ),
        Outcome.REVOKED: Row(
            _D, None, None, None, "a rules edit with revoke no longer allows this tunnel"
        ),
    }
)
