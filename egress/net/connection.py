"""The per-connection driver: identity, handshake, policy, dial, then hand over to a Tunnel.

Each accepted client gets one protocol object, built with a :class:`ConnectionContext` (never the
server). At accept, before a byte is read, the kernel says which uid owns the client socket and
the current snapshot says which app that is; a uid in no app, a lookup that cannot be bound to
this connection, or an app over its handshake cap is refused at once. The handshake is parsed
by the sans-I/O code in ``egress.proto``; once a complete request is in, reading pauses and one
task runs the policy, the DNS lookup and the dial under one deadline. On success the client
transport is switched to a :class:`Tunnel` and no task is left running for the tunnel's
lifetime. Every outcome ends in exactly one call to :meth:`ClientConnection.finish`, which
releases the connection, writes the log line and counts the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import time
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from json.encoder import encode_basestring_ascii
from typing import cast

from egress.connlog import untrusted
from egress.context import ConnectionContext
from egress.limits import AppLimits
from egress.metrics import UNKNOWN_APP
from egress.net.dialer import DialError, Dialled, hostport
from egress.net.relay import StreamFilter, Tunnel, TunnelShaper
from egress.outcomes import OUTCOMES, SOCKS5_SUCCEEDED, Outcome
from egress.policy import Refusal, Verdict, combine, decide_again, evaluate
from egress.proto import http_proxy, socks4, socks5
from rules.addresses import HostSyntaxError, canonical_host
from rules.decide import AppPolicy
from rules.snapshot import PolicySnapshot
from rules.special import effective_address

__all__ = ["ClientConnection", "HttpConnection", "ListenerKind", "Socks5Connection"]

log = logging.getLogger("egress.connection")

# The same few destination texts come again and again; canonical_host is pure (and raises,
# uncached, for what it refuses).
_canonical_host = functools.lru_cache(maxsize=4096)(canonical_host)

IPAddress = IPv4Address | IPv6Address


class ListenerKind(StrEnum):
    SOCKS5 = "socks5"
    SOCKS5_UNIX = "socks5_unix"
    HTTP = "http"
    TRANSPARENT = "transparent"


class ClientConnection(asyncio.Protocol):
    """Shared machinery; subclasses speak one proxy protocol."""

    __slots__ = (
        "_client_eof",
        "_early",
        "_handshake_timer",
        "_task",
        "accepted_at",
        "app",
        "app_name",
        "ctx",
        "destination",
        "detail",
        "dialled",
        "finished",
        "kind",
        "limits",
        "outcome",
        "recheck_under",
        "rules_version",
        "settings",
        "started_wall",
        "target",
        "transport",
        "tunnel",
        "uid",
        "verdict",
    )

    def __init__(self, context: ConnectionContext, kind: ListenerKind) -> None:
        self.ctx = context
        self.kind = kind
        self.settings = context.settings  # what this connection was accepted under
        self.transport: asyncio.Transport | None = None
        self.uid: int | None = None
        # The app's compiled rules, until the request is decided; only the name is kept after,
        # so a long-lived tunnel holds no rules (and no snapshot) alive.
        self.app: AppPolicy | None = None
        self.app_name: str | None = None
        self.rules_version: int | None = None
        self.destination: str | None = None
        self.target: tuple[str | IPAddress, int] | None = None  # canonical host, port
        # Rules a revoke swept in while this connection was being decided: decide again.
        self.recheck_under: PolicySnapshot | None = None
        self.dialled: Dialled | None = None
        self.verdict: Verdict | None = None
        self.limits: AppLimits | None = None  # the app's limits, once the rules allowed it
        self.outcome: Outcome | None = None
        self.detail: str | None = None
        self.tunnel: Tunnel | None = None
        self.finished = False
        self._task: asyncio.Task[None] | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._early = bytearray()  # client bytes that arrived after the request, before the tunnel
        self._client_eof = False  # the client half-closed after its request, before the tunnel
        self.accepted_at = 0.0
        self.started_wall = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.accepted_at = time.perf_counter()
        self.started_wall = time.time()
        ctx = self.ctx
        refused = ctx.registry.accept(self)
        if refused is not None:
            self._refuse(refused)
            return
        bad = self.precheck()
        if bad is not None:
            self._refuse(*bad)
            return
        try:
            self.uid = self.identify()
        except (OSError, ValueError) as exc:
            # Fail closed: without the kernel's answer, bound to this connection, nobody calls.
            self._refuse(Outcome.IDENTITY_ERROR, _identity_detail(exc))
            return
        snapshot = ctx.rules.current
        self.rules_version = snapshot.version
        app = snapshot.app_for_uid(self.uid) if self.uid is not None else None
        if app is None:
            self._refuse(
                Outcome.UNKNOWN_CLIENT,
                f"uid {self.uid} belongs to no app"
                if self.uid is not None
                else "no local socket owner (only clients on this host can be identified)",
            )
            return
        self.app = app
        self.app_name = app.name
        refused = ctx.registry.admit(self, app.name)
        if refused is not None:
            self._refuse(refused)
            return
        self._handshake_timer = ctx.loop.call_later(
            self.settings.handshake_timeout, self._handshake_timed_out
        )
        self.admitted()

    def eof_received(self) -> bool:
        if self.outcome is None and self.destination is not None:
            # The request is complete and the dial is under way: a half-close is the client's
            # right (it sent everything it had); the tunnel passes it on once it exists.
            self._client_eof = True
            return True
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_CLOSED
            self.detail = "client closed before completing the handshake"
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
    def precheck(self) -> tuple[Outcome, str] | None:
        """A reason to refuse the connection before asking who it is, if any."""
        return None

    def identify(self) -> int | None:
        assert self.transport is not None
        return self.ctx.identify(self.transport)

    def admitted(self) -> None:
        """The client is a known app with a handshake slot: start reading its request."""

    def send_success(self, dialled: Dialled) -> None:
        raise NotImplementedError

    def send_failure(self, outcome: Outcome, text: str, retry_after: float | None) -> None:
        raise NotImplementedError

    def stream_filter(self) -> StreamFilter | None:
        return None

    def upstream_head(self) -> bytes:
        """Bytes to send upstream first, as they are (plain forwarding's rewritten request)."""
        return b""

    # --- shared steps -----------------------------------------------------------------------
    def hold_early(self, data: bytes) -> None:
        """Client bytes after the request, before the tunnel: keep them and pause again.

        uvloop does not always honour a pause made in ``connection_made``; one read is bounded
        by the loop's buffer and reading stays paused after it.
        """
        self._early += data
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def credentials_ok(self, username: str | bytes, password: str | bytes) -> bool:
        """Proxy credentials are an extra factor for apps that configure them."""
        app = self.app
        if app is None or app.app.proxy_auth is None:
            return True
        expected = app.app.proxy_auth
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        digest = hashlib.sha256(password.encode()).hexdigest()
        user_ok = hmac.compare_digest(username.encode(), expected.username.encode())
        return hmac.compare_digest(digest, expected.password_sha256) and user_ok

    @property
    def needs_credentials(self) -> bool:
        return self.app is not None and self.app.app.proxy_auth is not None

    def request_complete(self, raw_host: str | IPAddress, port: int, early: bytes) -> None:
        """The handshake produced a request: stop reading and start the policy/dial task."""
        transport = self.transport
        assert transport is not None and self.app is not None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        ctx = self.ctx
        ctx.registry.handshake_done(self)
        ctx.metrics.handshake(self.kind, time.perf_counter() - self.accepted_at)
        transport.pause_reading()
        shown = str(raw_host) if not isinstance(raw_host, IPv6Address) else f"[{raw_host}]"
        self.destination = f"{untrusted(shown)}:{port}"
        self._early += early
        if ctx.registry.draining:
            self.fail(Outcome.SHUTTING_DOWN)
            return
        try:
            host = raw_host if not isinstance(raw_host, str) else _canonical_host(raw_host)
        except HostSyntaxError as exc:
            self.fail(Outcome.BAD_ADDRESS, str(exc))
            return
        self.target = (host, port)
        self._task = ctx.loop.create_task(self._establish(self.app, host, port))
        self._task.add_done_callback(self._task_done)

    async def _establish(self, app: AppPolicy, host: str | IPAddress, port: int) -> None:
        ctx = self.ctx
        deadline = ctx.loop.time() + self.settings.connect_timeout  # DNS and every dial attempt
        names_for = ctx.names_for(app.name) if self.kind is ListenerKind.TRANSPARENT else None
        verdict = await evaluate(
            app, host, port, resolve=ctx.resolve, names_for=names_for, deadline=deadline
        )
        self.verdict = verdict
        limiter = ctx.limits
        limits = limiter.for_app(app.app) if limiter is not None and verdict.allowed else None
        self.app = None  # decided: from here on only the name is needed
        del app  # (this frame lives through the dial)
        if self.recheck_under is not None and verdict.allowed:
            # Rules were revoked while this was deciding: decide again under them.
            snapshot, self.recheck_under = self.recheck_under, None
            if self.recheck(snapshot):
                return
        if limits is not None:
            assert limiter is not None and self.app_name is not None
            self.limits = limits
            # One destination, one bucket: an address however it was spelled (::ffff:a.b.c.d
            # is a.b.c.d), as the rules judged it.
            where = host if isinstance(host, str) else effective_address(host)
            try:  # the limits share the connect deadline: no client waits on them past it
                async with asyncio.timeout_at(deadline):
                    refusal = await limiter.admit(
                        self, ctx.registry, self.app_name, limits, f"{where}:{port}"
                    )
            except TimeoutError:
                refusal = Refusal(
                    Outcome.LIMITER_UNAVAILABLE,
                    "no answer from the rate limiter within proxy.connect_timeout",
                    1.0,
                )
            if refusal is not None:
                verdict = self.verdict = combine(verdict, refusal)
        if not verdict.allowed:
            self.fail(verdict.outcome, verdict.detail, retry_after=verdict.retry_after)
            return
        started = time.perf_counter()
        try:
            dialled = await ctx.dial(verdict.addresses, port, deadline=deadline)
        except DialError as exc:
            self.fail(exc.outcome, exc.detail)
            return
        ctx.metrics.connect_seconds.observe(time.perf_counter() - started)
        self._start_tunnel(dialled)

    def _start_tunnel(self, dialled: Dialled) -> None:
        transport = self.transport
        upstream = dialled.upstream.transport
        assert transport is not None and upstream is not None
        if transport.is_closing():
            upstream.close()
            return
        self.dialled = dialled
        if self.recheck_under is not None:  # revoked while dialing: check the address it got
            snapshot, self.recheck_under = self.recheck_under, None
            if self.recheck(snapshot):
                upstream.close()
                return
        try:
            self.send_success(dialled)
            self.tunnel = Tunnel(
                transport,
                dialled.upstream,
                idle_timeout=self.settings.idle_timeout,
                on_closed=self._tunnel_closed,
                stream_filter=self.stream_filter(),
                shaper=self._shaper(),
            )
            self.ctx.metrics.tunnel_opened(self.app_name or UNKNOWN_APP)
            early, self._early = bytes(self._early), bytearray()
            self.tunnel.start(
                early, upstream_bytes=self.upstream_head(), client_eof=self._client_eof
            )
        except Exception as exc:  # a bug: never leave the connection paused with no timer
            log.exception("tunnel start failed")
            self.outcome = Outcome.UPSTREAM_ERROR
            self.detail = f"internal error starting the tunnel: {type(exc).__name__}"
            upstream.abort()
            transport.abort()

    def _shaper(self) -> TunnelShaper | None:
        """The bandwidth shaper of this tunnel, if its app has a bandwidth limit."""
        limits, limiter = self.limits, self.ctx.limits
        if limits is None or limits.bandwidth is None or limiter is None:
            return None
        return limiter.shaper.for_app(self.app_name or UNKNOWN_APP, limits.bandwidth)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("connection task failed", exc_info=exc)
            if self.tunnel is None:
                self.fail(Outcome.UPSTREAM_ERROR, f"internal error: {type(exc).__name__}")

    def fail(
        self, outcome: Outcome, detail: str | None = None, *, retry_after: float | None = None
    ) -> None:
        """Reply with the failure on the wire and close. The log line is written on close."""
        self.outcome = outcome
        self.detail = detail
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            self.send_failure(outcome, detail or OUTCOMES[outcome].detail, retry_after)
        finally:
            transport.close()

    def _refuse(self, outcome: Outcome, detail: str | None = None) -> None:
        """Refused at accept: nothing is read, the connection is dropped (connection_lost
        follows). A protocol may first write one fixed refusal, in the same turn."""
        self.outcome = outcome
        self.detail = detail
        transport = self.transport
        assert transport is not None
        refusal = self.accept_refusal(outcome, detail or OUTCOMES[outcome].detail)
        if refusal:
            transport.write(refusal)  # a fresh socket's buffer takes it at once
        transport.abort()

    def accept_refusal(self, outcome: Outcome, detail: str) -> bytes:
        """Bytes to write when refusing at accept, before reading anything: none by default."""
        return b""

    def reason_fields(
        self, outcome: Outcome, detail: str, retry_after: float | None
    ) -> dict[str, str | int | float | None]:
        """Why this connection was refused, for a client that can take more than a code."""
        return {
            "reason": outcome.value,
            "decision": OUTCOMES[outcome].decision.value,
            "app": self.app_name,
            "uid": self.uid,
            "destination": self.destination,
            "detail": untrusted(detail),
            "retry_after": None if retry_after is None else round(retry_after, 3),
        }

    def shut_down(self) -> None:
        if self.tunnel is None and self.transport is not None:
            self.fail(Outcome.SHUTTING_DOWN)

    def recheck(self, snapshot: PolicySnapshot) -> bool:
        """After an edit with revoke: close this connection if ``snapshot`` no longer allows
        it (its uid left the app, or the destination is no longer allowed for the address it
        was dialed to). True when it was closed. Report mode never closes anything."""
        if self.finished or self.transport is None or self.uid is None or self.outcome:
            return False
        policy = snapshot.app_for_uid(self.uid)
        if policy is None or policy.app.name != self.app_name:
            self._revoke(f"uid {self.uid} is no longer in app {self.app_name!r}")
            return True
        verdict, target = self.verdict, self.target
        if verdict is None or target is None:
            if self.app is not None:
                self.app = policy  # still in its handshake: decide under the new rules
            if self._task is not None:
                self.recheck_under = snapshot  # being decided now: decide again after
            return False
        if not verdict.allowed:
            return False
        host, port = target
        dialled = self.dialled
        transparent = self.kind is ListenerKind.TRANSPARENT
        again = decide_again(
            policy,
            host,
            port,
            verdict.addresses if dialled is None else (dialled.address,),
            allowed_by=verdict.rule,
            names_for=self.ctx.names_for(policy.name) if transparent else None,
        )
        if not again.allowed:
            self._revoke(f"{again.reason}: {again.detail or OUTCOMES[again.outcome].detail}")
            return True
        if dialled is None and self.tunnel is None:
            self.recheck_under = snapshot  # still dialing: check the address it connects to
        return False

    def _revoke(self, detail: str) -> None:
        self.outcome = Outcome.REVOKED
        self.detail = f"revoked by a rules edit ({detail})"
        self.ctx.metrics.rules_revoked.inc()
        if self.tunnel is not None:
            self.tunnel.abort("revoked")
        elif self._task is not None:
            self._task.cancel()
            assert self.transport is not None
            self.transport.abort()
        else:
            assert self.transport is not None
            self.transport.abort()

    def cut(self, reason: str) -> None:
        if self.tunnel is not None:
            self.tunnel.abort(reason)
        elif self.transport is not None:
            self.transport.abort()

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.outcome is None and self.transport is not None:
            self.outcome = Outcome.HANDSHAKE_TIMEOUT
            self.detail = f"no complete request within {self.settings.handshake_timeout:g} s"
            self.transport.abort()

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        if tunnel is self.tunnel:  # counted as opened (its construction completed)
            self.ctx.metrics.tunnel_closed(
                self.app_name or UNKNOWN_APP, tunnel.bytes_up, tunnel.bytes_down
            )
        if self.outcome is None:
            if tunnel.failure is not None:  # plain forwarding met a malformed message
                self.outcome = failure_outcome(tunnel.failure)
            else:
                self.outcome = Outcome.ALLOWED
            self.detail = tunnel.end_reason if tunnel.end_reason != "closed" else None
        self.finish()

    def finish(self) -> None:
        """Release the connection, write its log line and count it: exactly once."""
        if self.finished:
            return
        self.finished = True
        ctx = self.ctx
        ctx.registry.release(self)
        outcome = self.outcome or Outcome.BAD_REQUEST
        verdict = self.verdict
        if outcome is Outcome.ALLOWED and verdict is not None:
            decision, reason = verdict.decision, verdict.reason
        else:
            decision, reason = OUTCOMES[outcome].decision, outcome
        ctx.metrics.connection(self.app_name or UNKNOWN_APP, self.kind, decision, reason)
        tunnel = self.tunnel
        dialled = self.dialled
        uid = self.uid
        detail = untrusted(self.detail)
        rule = verdict.rule if verdict is not None else None
        dialed = None if dialled is None else hostport(dialled.address, dialled.port)
        # The line is formatted here rather than through json.dumps of a dict (a fifth of the
        # per-connection cost of logging): the same keys, in the same order, every string
        # through json's own escaper.
        ctx.connlog.emit_line(
            f'{{"ts":{self.started_wall:.3f},"listener":"{self.kind.value}",'
            f'"uid":{"null" if uid is None else uid},"app":{_json_str(self.app_name)},'
            f'"rules_version":{"null" if self.rules_version is None else self.rules_version},'
            f'"dest":{_json_str(self.destination)},'
            f'"dialed":{_json_str(dialed)},'
            f'"decision":"{decision.value}","reason":"{reason.value}","rule":{_json_str(rule)},'
            f'"bytes_up":{0 if tunnel is None else tunnel.bytes_up},'
            f'"bytes_down":{0 if tunnel is None else tunnel.bytes_down},'
            f'"duration_ms":{(time.perf_counter() - self.accepted_at) * 1000:.3f},'
            f'"error":{_json_str(detail)}}}'
        )


def _json_str(text: str | None) -> str:
    return "null" if text is None else encode_basestring_ascii(text)


def _identity_detail(exc: BaseException) -> str:
    text = str(exc) if exc.args else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return f"identity lookup failed: {text}"[:200]


_LASTING_REFUSALS = frozenset({Outcome.UNKNOWN_CLIENT, Outcome.IDENTITY_ERROR})


class Socks5Connection(ClientConnection):
    """SOCKS5 (RFC 1928) with optional RFC 1929 username/password, over TCP or a Unix socket.

    The same listeners take SOCKS4 and SOCKS4a: the client's first byte decides (0x04: the
    SOCKS4 driver below, anything else: SOCKS5, which refuses what is not SOCKS5). Identity,
    rules, outcomes and the log are the shared ones; only the bytes on the wire differ.
    """

    __slots__ = ("_parser", "_reasons", "_request_seen", "_socks4", "_version")

    def __init__(
        self, context: ConnectionContext, kind: ListenerKind = ListenerKind.SOCKS5
    ) -> None:
        super().__init__(context, kind)
        self._parser = socks5.Socks5Server(max_buffer=self.settings.max_handshake_bytes)
        self._request_seen = False
        self._reasons = False  # the client negotiated METHOD_EGRESS: refusals carry a record
        self._version: int | None = None  # the client's first byte, once it arrived
        self._socks4: socks4.Socks4Server | None = None

    def data_received(self, data: bytes) -> None:
        if self.destination is not None:
            self.hold_early(data)
            return
        if self._version is None:  # asyncio never delivers b""
            self._version = data[0]
            if data[0] == socks4.SOCKS_VERSION:
                self._socks4 = socks4.Socks4Server(max_buffer=self.settings.max_handshake_bytes)
        if self._socks4 is not None:
            self._socks4_data(self._socks4, data)
            return
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
                transport.write(parser.reply(exc.reply_code) + self._record(exc.outcome, str(exc)))
            transport.close()

    def _socks4_data(self, parser: socks4.Socks4Server, data: bytes) -> None:
        """SOCKS4/4a: one request, then the shared decision; the user id is ignored."""
        transport = self.transport
        assert transport is not None
        try:
            parser.receive_data(data)
            event = parser.next_event()
        except socks4.Socks4ProtocolError as exc:
            self.outcome = exc.outcome
            self.detail = str(exc)
            if exc.reply_code is not None and not transport.is_closing():
                transport.write(parser.reply(exc.reply_code))
            transport.close()
            return
        if event is socks4.NEED_DATA:
            return
        if self.needs_credentials:
            # SOCKS4 has no password: an app with proxy_auth cannot be served over it.
            self.destination = f"{untrusted(str(event.host))}:{event.port}"
            self.fail(
                Outcome.AUTH_REQUIRED,
                "this app needs proxy credentials, which SOCKS4 cannot carry (use SOCKS5)",
            )
            return
        self.request_complete(event.host, event.port, parser.trailing_data())

    def _greet(self, greeting: socks5.Greeting) -> bool:
        transport = self.transport
        assert transport is not None
        if self.needs_credentials:
            method = (
                socks5.METHOD_USERNAME_PASSWORD
                if socks5.METHOD_USERNAME_PASSWORD in greeting.methods
                else socks5.METHOD_NO_ACCEPTABLE
            )
        elif socks5.METHOD_EGRESS in greeting.methods:
            method = socks5.METHOD_EGRESS
        elif socks5.METHOD_NO_AUTH in greeting.methods:
            method = socks5.METHOD_NO_AUTH
        elif socks5.METHOD_USERNAME_PASSWORD in greeting.methods:
            method = socks5.METHOD_USERNAME_PASSWORD  # credentials offered but not needed: accepted
        else:
            method = socks5.METHOD_NO_ACCEPTABLE
        # Records follow refusals under the private method only, and the "no acceptable
        # method" a client that offered it gets; never after a method it did not choose.
        offered = socks5.METHOD_EGRESS in greeting.methods
        self._reasons = method == socks5.METHOD_EGRESS or (
            offered and method == socks5.METHOD_NO_ACCEPTABLE
        )
        reply = self._parser.choose_method(method)
        if method == socks5.METHOD_NO_ACCEPTABLE:
            self.outcome = Outcome.AUTH_REQUIRED
            self.detail = (
                "this app needs proxy credentials (username/password), which the client did"
                " not offer"
                if self.needs_credentials
                else "client offered no acceptable SOCKS5 authentication method"
            )
            transport.write(reply + self._record(self.outcome, self.detail))
            transport.close()
            return False
        transport.write(reply)
        return True

    def _record(self, outcome: Outcome, detail: str, retry_after: float | None = None) -> bytes:
        if not self._reasons:
            return b""
        return socks5.refusal_record(self.reason_fields(outcome, detail, retry_after))

    def accept_refusal(self, outcome: Outcome, detail: str) -> bytes:
        # Written before the greeting is read, so it answers any greeting: "no acceptable
        # method" (a plain client stops there) and the record, which only the shim reads.
        # Only for refusals that last (who the client is); the caps are transient and a plain
        # client would take "no acceptable method" for a permanent failure, so they stay a
        # bare reset (which also tells a stranger nothing about the node's load).
        if outcome not in _LASTING_REFUSALS:
            return b""
        fields = self.reason_fields(outcome, detail, None)
        return bytes((socks5.SOCKS_VERSION, socks5.METHOD_NO_ACCEPTABLE)) + socks5.refusal_record(
            fields
        )

    def send_success(self, dialled: Dialled) -> None:
        assert self.transport is not None and dialled.upstream.transport is not None
        bound = dialled.upstream.transport.get_extra_info("sockname")
        bind = (ip_address(bound[0]), int(bound[1])) if bound else None
        if self._socks4 is not None:
            self.transport.write(self._socks4.reply(socks4.SOCKS4_GRANTED, bind))
            return
        self.transport.write(self._parser.reply(SOCKS5_SUCCEEDED, bind))

    def send_failure(self, outcome: Outcome, text: str, retry_after: float | None) -> None:
        if self._socks4 is not None:
            code4 = socks4.reply_code(outcome)
            if code4 is not None and self._socks4.may_reply and self.transport is not None:
                self.transport.write(self._socks4.reply(code4))
            return
        code = OUTCOMES[outcome].socks5
        if self._request_seen and code is not None and self.transport is not None:
            self.transport.write(
                self._parser.reply(code) + self._record(outcome, text, retry_after)
            )


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
        outcome = failure_outcome(error)
        status = error.status if isinstance(error, http_proxy.HttpProxyError) else 502
        reason = error.reason if isinstance(error, http_proxy.HttpProxyError) else str(error)
        return http_proxy.render_error(
            status, f"{outcome}: {reason}", proxy_status=OUTCOMES[outcome].proxy_status
        )  # 502 http_protocol_error for the upstream's mistakes, 400 for the client's


def failure_outcome(error: ValueError) -> Outcome:
    """What a protocol error in the middle of plain forwarding ended the connection as."""
    if isinstance(error, http_proxy.HttpProxyError):
        return error.outcome
    return Outcome.UPSTREAM_ERROR


class HttpConnection(ClientConnection):
    """HTTP CONNECT and absolute-form plain HTTP forwarding."""

    __slots__ = ("_exchange", "_parser")

    def __init__(self, context: ConnectionContext) -> None:
        super().__init__(context, ListenerKind.HTTP)
        self._parser: http_proxy.HttpProxyParser | None = http_proxy.HttpProxyParser(
            max_header_bytes=self.settings.max_handshake_bytes
        )
        self._exchange: http_proxy.HttpForwardExchange | None = None

    def data_received(self, data: bytes) -> None:
        if self.destination is not None:
            self.hold_early(data)
            return
        parser = self._parser
        transport = self.transport
        assert transport is not None and parser is not None
        try:
            parser.receive_data(data)
            event = parser.next_event()
        except http_proxy.HttpProxyError as exc:
            self.outcome = exc.outcome
            self.detail = exc.reason
            if not transport.is_closing():
                transport.write(
                    http_proxy.render_error(
                        exc.status, exc.reason, proxy_status=OUTCOMES[exc.outcome].proxy_status
                    )
                )
            transport.close()
            return
        if event is http_proxy.NEED_DATA:
            return
        assert isinstance(event, http_proxy.ConnectRequest | http_proxy.ForwardRequest)
        if self.needs_credentials:
            creds = event.proxy_authorization
            if creds is None or not self.credentials_ok(*creds):
                self.destination = f"{untrusted(event.host)}:{event.port}"
                self.fail(Outcome.AUTH_REQUIRED if creds is None else Outcome.AUTH_FAILED)
                return
        if isinstance(event, http_proxy.ForwardRequest):
            self._exchange = http_proxy.HttpForwardExchange(event, parser)
            self.request_complete(event.host, event.port, b"")
        else:
            early = parser.trailing_data()
            self._parser = None  # a tunnel needs no parser (nor the bytes h11 may still hold)
            self.request_complete(event.host, event.port, early)

    def stream_filter(self) -> StreamFilter | None:
        return None if self._exchange is None else _ForwardFilter(self._exchange)

    def upstream_head(self) -> bytes:
        # Plain forwarding: the rewritten head and any body bytes the parser already holds.
        return b"" if self._exchange is None else self._exchange.start()

    def send_success(self, dialled: Dialled) -> None:
        if self._exchange is None:
            assert self.transport is not None
            self.transport.write(http_proxy.render_connect_ok())

    def send_failure(self, outcome: Outcome, text: str, retry_after: float | None) -> None:
        row = OUTCOMES[outcome]
        if self.transport is None or row.http is None:
            return
        self.transport.write(
            http_proxy.render_error(
                row.http,
                f"{outcome}: {text}",
                proxy_status=row.proxy_status,
                extra_headers=row.http_headers(retry_after),
            )
        )
