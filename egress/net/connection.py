"""The per-connection driver: identity, handshake, policy, dial, then hand over to a Tunnel.

Each accepted client gets one protocol object. The handshake is parsed by the sans-I/O code in
``egress.proto``; once a complete request is in, reading pauses and one task runs the policy,
the DNS lookup and the dial. On success the client transport is switched to a :class:`Tunnel`
and no task is left running for the tunnel's lifetime. Every outcome, success or not, ends in
exactly one call to :meth:`ClientConnection.finish`, which writes the log line and the metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any, cast

from egress.connlog import untrusted
from egress.metrics import UNKNOWN_APP
from egress.net.dialer import DialError, Dialled, dial
from egress.net.identity import peer_uid_unix
from egress.net.relay import StreamFilter, Tunnel
from egress.outcomes import WIRE, Outcome
from egress.policy import AppRuntime, Verdict, evaluate
from egress.proto import http_proxy, socks5
from rules.addresses import HostSyntaxError, canonical_host

if TYPE_CHECKING:
    from egress.server import ProxyServer

log = logging.getLogger("egress.connection")

IPAddress = IPv4Address | IPv6Address


class ListenerKind(StrEnum):
    SOCKS5 = "socks5"
    SOCKS5_UNIX = "socks5_unix"
    HTTP = "http"
    TRANSPARENT = "transparent"


_DEFAULT_DETAIL = {
    Outcome.NOT_ALLOWED: "no rule of this app allows the destination",
    Outcome.SPECIAL_ADDRESS: "destination is a special-purpose address",
    Outcome.UNKNOWN_CLIENT: "the connecting uid belongs to no app",
    Outcome.AUTH_REQUIRED: "proxy credentials required",
    Outcome.AUTH_FAILED: "proxy credentials rejected",
    Outcome.SHUTTING_DOWN: "proxy is shutting down",
}


class ClientConnection(asyncio.Protocol):
    """Shared machinery; subclasses speak one proxy protocol."""

    __slots__ = (
        "_handshake_timer",
        "_task",
        "accepted_at",
        "app",
        "destination",
        "detail",
        "dialled",
        "finished",
        "identity_error",
        "kind",
        "outcome",
        "rule",
        "server",
        "snapshot",
        "started_wall",
        "transport",
        "tunnel",
        "uid",
        "verdict",
    )

    def __init__(self, server: ProxyServer, kind: ListenerKind) -> None:
        self.server = server
        self.kind = kind
        # Decided entirely under the rules current at accept; a reload applies to new clients.
        self.snapshot = server.snapshot
        self.transport: asyncio.Transport | None = None
        self.uid: int | None = None
        self.app: AppRuntime | None = None
        self.destination: str | None = None
        self.dialled: Dialled | None = None
        self.verdict: Verdict | None = None
        self.outcome: Outcome | None = None
        self.rule: str | None = None
        self.detail: str | None = None
        self.tunnel: Tunnel | None = None
        self.finished = False
        self.identity_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.accepted_at = 0.0
        self.started_wall = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        self.accepted_at = time.perf_counter()
        self.started_wall = time.time()
        if not server.register(self):
            self.outcome = Outcome.SHUTTING_DOWN if server.draining else Outcome.CONNECTION_LIMIT
            self.transport.abort()
            return
        try:
            self.uid = self._identify()
        except (OSError, ValueError) as exc:
            # Fail closed: without the kernel's answer the client is nobody. The request is
            # still read so the denial is explicit on the wire and in the log.
            log.warning("identity lookup failed", extra={"error": repr(exc)[:200]})
            self.identity_error = f"identity lookup failed: {type(exc).__name__}"
        if self.uid is not None:
            self.app = self.snapshot.app_for_uid(self.uid)
        self._handshake_timer = server.loop.call_later(
            server.settings.handshake_timeout, self._handshake_timed_out
        )

    def eof_received(self) -> bool:
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_CLOSED
            self.detail = (
                "client closed before completing the handshake"
                if self.destination is None
                else "client closed before the upstream connected"
            )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._task is not None:
            self._task.cancel()
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_CLOSED
            self.detail = (
                "client went away during the handshake"
                if self.destination is None
                else "client went away before the upstream connected"
            )
        self.finish()

    # --- hooks for subclasses ---------------------------------------------------------------
    def send_success(self, dialled: Dialled) -> None:
        raise NotImplementedError

    def send_failure(self, outcome: Outcome, text: str) -> None:
        raise NotImplementedError

    def stream_filter(self) -> StreamFilter | None:
        return None

    def first_upstream_bytes(self, early: bytes) -> bytes:
        return early

    # --- shared steps -----------------------------------------------------------------------
    def _identify(self) -> int | None:
        assert self.transport is not None
        if self.kind is ListenerKind.SOCKS5_UNIX:
            return peer_uid_unix(self.transport.get_extra_info("socket"))
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        if not peer or not local:
            return None
        return self.server.tcp_identity.lookup(peer[:2], local[:2])

    def credentials_ok(self, username: str | bytes, password: str | bytes) -> bool:
        """Proxy credentials are an extra factor for apps that configure them."""
        app = self.app
        if app is None or app.config.proxy_auth is None:
            return True
        expected = app.config.proxy_auth
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        digest = hashlib.sha256(password.encode()).hexdigest()
        user_ok = hmac.compare_digest(username.encode(), expected.username.encode())
        return hmac.compare_digest(digest, expected.password_sha256) and user_ok

    def request_complete(self, raw_host: str | IPAddress, port: int, early: bytes) -> None:
        """The handshake produced a request: stop reading and start the policy/dial task."""
        assert self.transport is not None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        server = self.server
        server.metrics.handshake(self.kind, time.perf_counter() - self.accepted_at)
        self.transport.pause_reading()
        shown = str(raw_host) if not isinstance(raw_host, IPv6Address) else f"[{raw_host}]"
        self.destination = f"{untrusted(shown)}:{port}"
        if self.identity_error is not None:
            self.fail(Outcome.IDENTITY_ERROR, self.identity_error)
            return
        if self.app is None:
            detail = (
                f"uid {self.uid} belongs to no app"
                if self.uid is not None
                else "no local socket owner (only clients on this host can be identified)"
            )
            self.fail(Outcome.UNKNOWN_CLIENT, detail)
            return
        if server.draining:
            self.fail(Outcome.SHUTTING_DOWN)
            return
        try:
            host = raw_host if not isinstance(raw_host, str) else canonical_host(raw_host)
        except HostSyntaxError as exc:
            self.fail(Outcome.BAD_ADDRESS, str(exc))
            return
        self._task = server.loop.create_task(self._establish(self.app, host, port, early))
        self._task.add_done_callback(self._task_done)

    async def _establish(
        self, app: AppRuntime, host: str | IPAddress, port: int, early: bytes
    ) -> None:
        server = self.server
        verdict = await evaluate(
            self.snapshot,
            app,
            host,
            port,
            resolver=server.resolver,
            metrics=server.metrics,
            names_from_cache=self.kind is ListenerKind.TRANSPARENT,
        )
        self.verdict = verdict
        self.rule = verdict.rule
        if not verdict.allowed:
            self.fail(verdict.outcome, verdict.detail)
            return
        started = time.perf_counter()
        try:
            dialled = await dial(verdict.addresses, port, timeout=server.settings.connect_timeout)
        except DialError as exc:
            self.fail(exc.outcome, exc.detail)
            return
        server.metrics.connect_seconds.observe(time.perf_counter() - started)
        transport = self.transport
        assert transport is not None and dialled.upstream.transport is not None
        if transport.is_closing():
            dialled.upstream.transport.close()
            return
        self.dialled = dialled
        self.send_success(dialled)
        self.tunnel = Tunnel(
            transport,
            dialled.upstream,
            idle_timeout=server.settings.idle_timeout,
            on_closed=self._tunnel_closed,
            stream_filter=self.stream_filter(),
        )
        server.metrics.tunnel_opened(app.name)
        self.tunnel.start(self.first_upstream_bytes(early))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("connection task failed", exc_info=exc)
            if self.tunnel is None:
                self.fail(Outcome.UPSTREAM_ERROR, f"internal error: {type(exc).__name__}")

    def fail(self, outcome: Outcome, detail: str | None = None) -> None:
        """Reply with the failure on the wire and close. The log line is written on close."""
        self.outcome = outcome
        self.detail = detail
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            self.send_failure(outcome, detail or _DEFAULT_DETAIL.get(outcome, str(outcome)))
        finally:
            transport.close()

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.outcome is None and self.transport is not None:
            self.outcome = Outcome.HANDSHAKE_TIMEOUT
            self.detail = f"no complete request within {self.server.settings.handshake_timeout}s"
            self.transport.abort()

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        self.server.metrics.tunnel_closed(self.app_name, tunnel.bytes_up, tunnel.bytes_down)
        self.outcome = Outcome.ALLOWED
        self.detail = tunnel.end_reason if tunnel.end_reason != "closed" else None
        self.finish()

    @property
    def app_name(self) -> str:
        return self.app.name if self.app is not None else UNKNOWN_APP

    def finish(self) -> None:
        """Write the one log line and the metrics for this connection, exactly once."""
        if self.finished:
            return
        self.finished = True
        server = self.server
        server.unregister(self)
        outcome = self.outcome or Outcome.BAD_REQUEST
        verdict = self.verdict
        if outcome is Outcome.ALLOWED or (verdict is not None and verdict.allowed):
            decision = verdict.decision if verdict is not None else "allowed"
        else:
            decision = "denied"
        # Report mode: the tunnel ran, but the reason says why enforce mode would have denied it.
        reason = str(outcome)
        if verdict is not None and verdict.would_deny is not None and outcome is Outcome.ALLOWED:
            reason = str(verdict.would_deny)
        server.metrics.connection(self.app_name, self.kind, decision, reason)
        tunnel = self.tunnel
        dialled = self.dialled
        record: dict[str, Any] = {
            "ts": round(self.started_wall, 3),
            "listener": self.kind.value,
            "uid": self.uid,
            "app": self.app.name if self.app is not None else None,
            "dest": self.destination,
            "dialed": (
                f"[{dialled.address}]:{dialled.port}"
                if dialled is not None and dialled.address.version == 6
                else (f"{dialled.address}:{dialled.port}" if dialled is not None else None)
            ),
            "decision": decision,
            "reason": reason,
            "rule": self.rule,
            "bytes_up": tunnel.bytes_up if tunnel is not None else 0,
            "bytes_down": tunnel.bytes_down if tunnel is not None else 0,
            "duration_ms": round((time.perf_counter() - self.accepted_at) * 1000, 3),
            "error": untrusted(self.detail),
        }
        if verdict is not None and verdict.reported:
            record["reported"] = True
        server.connlog.emit(record)


class Socks5Connection(ClientConnection):
    """SOCKS5 (RFC 1928) with optional RFC 1929 username/password, over TCP or a Unix socket."""

    __slots__ = ("_parser", "_request_seen")

    def __init__(self, server: ProxyServer, kind: ListenerKind = ListenerKind.SOCKS5) -> None:
        super().__init__(server, kind)
        self._parser = socks5.Socks5Server(max_buffer=server.settings.max_handshake_bytes)
        self._request_seen = False

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        transport = self.transport
        assert transport is not None
        try:
            parser.receive_data(data)
            while True:
                event = parser.next_event()
                if event is socks5.NEED_DATA:
                    return
                if isinstance(event, socks5.Greeting):
                    if not self._greet(event):
                        return
                elif isinstance(event, socks5.Credentials):
                    ok = self.credentials_ok(event.username, event.password)
                    transport.write(parser.auth_reply(ok=ok))
                    if not ok:
                        self.outcome = Outcome.AUTH_FAILED
                        transport.close()
                        return
                elif isinstance(event, socks5.ConnectRequest):
                    self._request_seen = True
                    self.request_complete(event.host, event.port, parser.trailing_data())
                    return
        except socks5.Socks5ProtocolError as exc:
            self._request_seen = exc.reply_code is not None
            self.outcome = exc.outcome
            self.detail = str(exc)
            if exc.reply_code is not None and not transport.is_closing():
                transport.write(parser.reply(exc.reply_code))
            transport.close()

    def _greet(self, greeting: socks5.Greeting) -> bool:
        transport = self.transport
        assert transport is not None
        needs_auth = self.app is not None and self.app.config.proxy_auth is not None
        if needs_auth:
            method = (
                socks5.METHOD_USERNAME_PASSWORD
                if socks5.METHOD_USERNAME_PASSWORD in greeting.methods
                else socks5.METHOD_NO_ACCEPTABLE
            )
        elif socks5.METHOD_NO_AUTH in greeting.methods:
            method = socks5.METHOD_NO_AUTH
        elif socks5.METHOD_USERNAME_PASSWORD in greeting.methods:
            method = socks5.METHOD_USERNAME_PASSWORD  # credentials offered but not needed: accepted
        else:
            method = socks5.METHOD_NO_ACCEPTABLE
        transport.write(self._parser.choose_method(method))
        if method == socks5.METHOD_NO_ACCEPTABLE:
            self.outcome = Outcome.AUTH_REQUIRED
            self.detail = "client offered no acceptable SOCKS5 authentication method"
            transport.close()
            return False
        return True

    def send_success(self, dialled: Dialled) -> None:
        assert self.transport is not None and dialled.upstream.transport is not None
        bound = dialled.upstream.transport.get_extra_info("sockname")
        bind = (ip_address(bound[0]), int(bound[1])) if bound else None
        self.transport.write(self._parser.reply(0, bind))

    def send_failure(self, outcome: Outcome, text: str) -> None:
        if self._request_seen and self.transport is not None:
            self.transport.write(self._parser.reply(WIRE[outcome].socks5_code))


class _ForwardFilter:
    """Adapts the sans-I/O forward exchange to the relay: a malformed response becomes a 502
    while the client has not seen a response yet, otherwise just a close."""

    __slots__ = ("_exchange",)

    def __init__(self, exchange: http_proxy.HttpForwardExchange) -> None:
        self._exchange = exchange

    def client_data(self, data: bytes) -> bytes:
        return self._exchange.client_data(data)

    def upstream_data(self, data: bytes) -> bytes:
        return self._exchange.upstream_data(data)

    def upstream_eof(self) -> bytes:
        return self._exchange.upstream_eof()

    @property
    def done(self) -> bool:
        return self._exchange.done

    def failure_reply(self, error: ValueError) -> bytes:
        if self._exchange.response_started:
            return b""
        status = error.status if isinstance(error, http_proxy.HttpProxyError) else 502
        reason = error.reason if isinstance(error, http_proxy.HttpProxyError) else str(error)
        return http_proxy.render_error(
            status, f"upstream_error: {reason}", proxy_status="http_protocol_error"
        )


class HttpConnection(ClientConnection):
    """HTTP CONNECT and absolute-form plain HTTP forwarding."""

    __slots__ = ("_exchange", "_parser")

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server, ListenerKind.HTTP)
        self._parser = http_proxy.HttpProxyParser(
            max_header_bytes=server.settings.max_handshake_bytes
        )
        self._exchange: http_proxy.HttpForwardExchange | None = None

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        transport = self.transport
        assert transport is not None
        if self._exchange is not None:
            return  # reading is paused once the request head is in; nothing more is expected
        try:
            parser.receive_data(data)
            event = parser.next_event()
        except http_proxy.HttpProxyError as exc:
            self.outcome = exc.outcome
            self.detail = exc.reason
            if not transport.is_closing():
                transport.write(
                    http_proxy.render_error(
                        exc.status, exc.reason, proxy_status=WIRE[exc.outcome].proxy_status_error
                    )
                )
            transport.close()
            return
        if event is http_proxy.NEED_DATA:
            return
        assert isinstance(event, http_proxy.ConnectRequest | http_proxy.ForwardRequest)
        if self.app is not None and self.app.config.proxy_auth is not None:
            creds = event.proxy_authorization
            if creds is None:
                self._auth_failure(Outcome.AUTH_REQUIRED, event)
                return
            if not self.credentials_ok(*creds):
                self._auth_failure(Outcome.AUTH_FAILED, event)
                return
        if isinstance(event, http_proxy.ForwardRequest):
            self._exchange = http_proxy.HttpForwardExchange(event, parser)
            self.request_complete(event.host, event.port, b"")
        else:
            self.request_complete(event.host, event.port, parser.trailing_data())

    def _auth_failure(
        self, outcome: Outcome, event: http_proxy.ConnectRequest | http_proxy.ForwardRequest
    ) -> None:
        self.destination = f"{untrusted(event.host)}:{event.port}"
        self.fail(outcome)

    def stream_filter(self) -> StreamFilter | None:
        return None if self._exchange is None else _ForwardFilter(self._exchange)

    def first_upstream_bytes(self, early: bytes) -> bytes:
        # Plain forwarding: send_success already wrote exchange.start() (the rewritten head and
        # any body bytes the parser holds); later client bytes go through the filter.
        return early if self._exchange is None else b""

    def send_success(self, dialled: Dialled) -> None:
        assert self.transport is not None and dialled.upstream.transport is not None
        if self._exchange is None:
            self.transport.write(http_proxy.render_connect_ok())
        else:
            dialled.upstream.transport.write(self._exchange.start())

    def send_failure(self, outcome: Outcome, text: str) -> None:
        if self.transport is None:
            return
        wire = WIRE[outcome]
        extra: list[tuple[str, str]] = []
        if wire.http_status == 407:
            extra.append(("Proxy-Authenticate", 'Basic realm="egress"'))
        self.transport.write(
            http_proxy.render_error(
                wire.http_status,
                f"{outcome}: {text}",
                proxy_status=wire.proxy_status_error,
                extra_headers=extra,
            )
        )
