"""What an app sees when the proxy refuses: ordinary OSError subclasses with messages that say
who, where and why.

* denied (no rule, special-purpose address, uid in no app, credentials): :class:`EgressDenied`,
  a :class:`PermissionError` (``errno.EACCES``);
* rate limited, or over one of the proxy's connection caps: :class:`EgressRateLimited`, also a
  :class:`PermissionError`, with ``retry_after`` in seconds (when the proxy knows it) and a
  message that says when to retry;
* the upstream refused, timed out or was unreachable, or the name did not resolve: the error
  the kernel or resolver would have given (:class:`ConnectionRefusedError`,
  :class:`TimeoutError`, ``OSError(EHOSTUNREACH)``, :class:`socket.gaierror`), saying it came
  through the proxy;
* the proxy itself cannot be reached: :class:`ConnectionRefusedError` naming the proxy.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from .wire import REPLY_TEXT, Reply

__all__ = ["EgressDenied", "EgressRateLimited", "error_for", "proxy_garbled", "proxy_unreachable"]

# Short texts for the parenthesis of a denial, by reason.
_DENIAL_TEXT = {
    "not_allowed": "no rule matches",
    "auth_required": "the app needs proxy credentials, which the sandbox shim does not send",
    "auth_failed": "proxy credentials rejected",
    "revoked": "revoked by a rules edit",
}
_DENIED = frozenset(
    {"not_allowed", "special_address", "unknown_client", "auth_required", "auth_failed", "revoked"}
)
_LIMITED = frozenset(
    {"rate_limited", "too_many_connections", "handshake_limit", "connection_limit"}
)
_LIMIT_TEXT = {
    "rate_limited": "opens connections faster than its limit",
    "too_many_connections": "holds as many connections as its max_concurrent limit allows",
    "handshake_limit": "has proxy.max_handshakes_per_app connections in their handshake",
    "connection_limit": "found the proxy at proxy.max_connections",
}


class EgressDenied(PermissionError):  # noqa: N818 - a PermissionError, named for what it says
    """The app's rules (or its identity) do not allow this connection."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(errno.EACCES, message)
        self.reason = reason


class EgressRateLimited(PermissionError):  # noqa: N818 - likewise
    """The app is over a connection limit; ``retry_after`` says when a token is due."""

    def __init__(self, message: str, reason: str, retry_after: float | None) -> None:
        super().__init__(errno.EACCES, message)
        self.reason = reason
        self.retry_after = retry_after


def proxy_unreachable(proxy: str, destination: str, cause: OSError) -> ConnectionRefusedError:
    why = cause.strerror or str(cause) or type(cause).__name__
    return ConnectionRefusedError(
        errno.ECONNREFUSED,
        f"egress: cannot reach the egress proxy at {proxy} ({why}) to connect to {destination};"
        " is `egress proxy` running with that socks5_listen?",
    )


def proxy_garbled(proxy: str, cause: Exception) -> ConnectionAbortedError:
    """What answered on the proxy's port did not speak the handshake."""
    return ConnectionAbortedError(errno.ECONNABORTED, f"egress: the proxy at {proxy}: {cause}")


def error_for(reply: Reply, destination: str, proxy: str) -> OSError:
    """The exception for a refusal (``reply.ok`` is false)."""
    record: dict[str, Any] = reply.record or {}
    reason = str(record.get("reason") or "")
    app = record.get("app")
    detail = str(record.get("detail") or "")
    who = f'app "{app}"' if app else "this process"
    if not reason:  # an older proxy, or one that is not egress: only the code is known
        if reply.code is None:
            return EgressDenied(
                f"egress: the proxy at {proxy} accepted no method of the shim's (is it egress?)",
                "unknown",
            )
        text = REPLY_TEXT.get(reply.code, f"reply 0x{reply.code:02x}")
        if reply.code == 0x02:
            return EgressDenied(f"egress: {who} may not connect to {destination} ({text})", "")
        return ConnectionRefusedError(
            errno.ECONNREFUSED, f"egress: connecting to {destination} failed via {proxy}: {text}"
        )
    if reason in _DENIED:
        if reason == "unknown_client":
            uid = record.get("uid")
            text = f"uid {uid} belongs to no app" if uid is not None else detail
            return EgressDenied(
                f"egress: this process may not connect to {destination} ({text})", reason
            )
        text = _DENIAL_TEXT.get(reason, detail)
        if reason == "special_address":
            text = f"special-purpose address: {detail}"
        return EgressDenied(f"egress: {who} may not connect to {destination} ({text})", reason)
    if reason in _LIMITED:
        retry = record.get("retry_after")
        retry_after = float(retry) if isinstance(retry, int | float) else None
        when = f"; retry in {retry_after:.3g} s" if retry_after is not None else ""
        what = _LIMIT_TEXT[reason]
        return EgressRateLimited(
            f"egress: {who} is rate limited connecting to {destination} ({what}){when}",
            reason,
            retry_after,
        )
    message = f"egress: connecting to {destination} failed via the proxy ({reason}: {detail})"
    if reason in ("dns_failure", "dns_timeout"):
        code = socket.EAI_NONAME if reason == "dns_failure" else socket.EAI_AGAIN
        return socket.gaierror(code, message)
    if reason == "connect_refused":
        return ConnectionRefusedError(errno.ECONNREFUSED, message)
    if reason == "connect_timeout":
        return TimeoutError(errno.ETIMEDOUT, message)
    if reason == "unreachable":
        return OSError(errno.EHOSTUNREACH, message)
    return ConnectionAbortedError(errno.ECONNABORTED, message)
