"""One table maps every connection outcome to the wire, the metrics and the log.

A SOCKS5 reply code, an HTTP status, an RFC 9209 ``Proxy-Status`` error type, a metric ``reason``
label and the log's ``reason`` field all come from the same row, so the vocabulary is the same
everywhere an operator looks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """Why a connection ended the way it did. Values are the metric and log vocabulary."""

    ALLOWED = "allowed"
    NOT_ALLOWED = "not_allowed"  # no rule of the app covers the destination
    SPECIAL_ADDRESS = "special_address"  # destination (or each resolved address) is special
    UNKNOWN_CLIENT = "unknown_client"  # the kernel-reported uid maps to no app
    AUTH_REQUIRED = "auth_required"  # app needs proxy credentials, none were offered
    AUTH_FAILED = "auth_failed"  # credentials offered but wrong
    BAD_REQUEST = "bad_request"  # malformed or oversized handshake
    BAD_ADDRESS = "bad_address"  # unsupported address type or an invalid host/IP spelling
    UNSUPPORTED_COMMAND = "unsupported_command"  # SOCKS5 BIND / UDP ASSOCIATE
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    DNS_FAILURE = "dns_failure"  # NXDOMAIN, SERVFAIL, no A/AAAA
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    UNREACHABLE = "unreachable"  # network or host unreachable
    UPSTREAM_ERROR = "upstream_error"  # any other failure talking to the upstream
    RATE_LIMITED = "rate_limited"
    SHUTTING_DOWN = "shutting_down"
    CONNECTION_LIMIT = "connection_limit"  # [proxy].max_connections reached at accept
    CLIENT_CLOSED = "client_closed"  # the client hung up before a reply (scanners, impatience)
    IDENTITY_ERROR = "identity_error"  # the kernel could not say who owns the client socket


@dataclass(frozen=True, slots=True)
class WireReply:
    """How one outcome is spelled on each protocol."""

    socks5_code: int
    http_status: int
    proxy_status_error: str | None  # RFC 9209 error type; None for success


# SOCKS5 reply codes (RFC 1928 section 6).
SOCKS5_SUCCEEDED = 0x00
SOCKS5_GENERAL_FAILURE = 0x01
SOCKS5_NOT_ALLOWED = 0x02
SOCKS5_NETWORK_UNREACHABLE = 0x03
SOCKS5_HOST_UNREACHABLE = 0x04
SOCKS5_CONNECTION_REFUSED = 0x05
SOCKS5_TTL_EXPIRED = 0x06
SOCKS5_COMMAND_NOT_SUPPORTED = 0x07
SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

WIRE: dict[Outcome, WireReply] = {
    Outcome.ALLOWED: WireReply(SOCKS5_SUCCEEDED, 200, None),
    Outcome.NOT_ALLOWED: WireReply(SOCKS5_NOT_ALLOWED, 403, "destination_ip_prohibited"),
    Outcome.SPECIAL_ADDRESS: WireReply(SOCKS5_NOT_ALLOWED, 403, "destination_ip_prohibited"),
    Outcome.UNKNOWN_CLIENT: WireReply(SOCKS5_NOT_ALLOWED, 403, "http_request_denied"),
    Outcome.AUTH_REQUIRED: WireReply(SOCKS5_NOT_ALLOWED, 407, "http_request_denied"),
    Outcome.AUTH_FAILED: WireReply(SOCKS5_NOT_ALLOWED, 407, "http_request_denied"),
    Outcome.BAD_REQUEST: WireReply(SOCKS5_GENERAL_FAILURE, 400, "http_request_error"),
    Outcome.BAD_ADDRESS: WireReply(SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED, 400, "http_request_error"),
    Outcome.UNSUPPORTED_COMMAND: WireReply(
        SOCKS5_COMMAND_NOT_SUPPORTED, 405, "http_request_denied"
    ),
    Outcome.HANDSHAKE_TIMEOUT: WireReply(SOCKS5_GENERAL_FAILURE, 408, "http_request_error"),
    Outcome.DNS_FAILURE: WireReply(SOCKS5_HOST_UNREACHABLE, 502, "dns_error"),
    Outcome.DNS_TIMEOUT: WireReply(SOCKS5_HOST_UNREACHABLE, 504, "dns_timeout"),
    Outcome.CONNECT_REFUSED: WireReply(SOCKS5_CONNECTION_REFUSED, 502, "connection_refused"),
    Outcome.CONNECT_TIMEOUT: WireReply(SOCKS5_TTL_EXPIRED, 504, "connection_timeout"),
    Outcome.UNREACHABLE: WireReply(SOCKS5_HOST_UNREACHABLE, 502, "destination_unavailable"),
    Outcome.UPSTREAM_ERROR: WireReply(SOCKS5_GENERAL_FAILURE, 502, "proxy_internal_error"),
    Outcome.RATE_LIMITED: WireReply(SOCKS5_NOT_ALLOWED, 429, "connection_limit_reached"),
    Outcome.SHUTTING_DOWN: WireReply(SOCKS5_GENERAL_FAILURE, 503, "proxy_internal_error"),
    Outcome.CONNECTION_LIMIT: WireReply(SOCKS5_GENERAL_FAILURE, 503, "connection_limit_reached"),
    Outcome.CLIENT_CLOSED: WireReply(SOCKS5_GENERAL_FAILURE, 400, "http_request_error"),  # unsent
    Outcome.IDENTITY_ERROR: WireReply(SOCKS5_NOT_ALLOWED, 403, "http_request_denied"),
}
