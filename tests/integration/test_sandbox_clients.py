"""Real client libraries, unchanged, through the sandbox shim and the real proxy.

One runtime node for the module, as in production, where the proxy outlives the apps: a real
proxy (in-process, on its own event loop thread), a DNS stub only the proxy asks, and real
loopback upstreams (HTTP, HTTPS with a test CA, echo, SMTP, redis-server). Each client library
is its own app with its own uid (10101..10109) whose rules allow exactly its upstream, by host
name. Each test runs a script under that uid with the shim installed (tests.sandboxing.run_app),
which makes one real exchange and one connection its rules do not allow, and prints what
happened as JSON lines.

The upstreams are known only by ``*.test`` names that the stub resolves; the app's own resolver
has never heard of them. So an exchange that works shows that the name went to the proxy (whose
hostname rule saw it) and that the app sent no DNS query. The denied destination is a live
listener, ``trap.test``: a bug would show up as a connection it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import shutil
import ssl
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from egress.net.connection import ListenerKind
from tests.configs import base_config
from tests.dnsstub import DnsStub
from tests.httpupstream import HttpUpstream
from tests.redisserver import RedisServer
from tests.sandboxing import run_app, world_readable_dir
from tests.smtpserver import SmtpServer
from tests.support import EchoUpstream, ProxyHandle, loop_factory, running_proxy
from tests.tlscerts import TestCA, make_ca

pytestmark = pytest.mark.root

T = TypeVar("T")

UIDS = {
    "urllib": 10101,
    "httpclient": 10102,
    "requests": 10103,
    "aiohttp": 10104,
    "asyncio": 10105,
    "redis": 10106,
    "smtplib": 10107,
    "tls": 10108,
    "socket": 10109,
}
NAMES = ("web.test", "secure.test", "wrong.test", "echo.test", "mail.test", "cache.test")
DENIED = "egress_sandbox.errors.EgressDenied"  # the shim's module name inside an app
ECHO_GREETING = b"echo.test here\n"

# Prepended to every app script: plain standard library, nothing from the checkout.
PRELUDE = '''
import json, sys

def emit(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)

def failure(exc):
    """The exception as the library raised it, and the chain of what it wraps."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        kind = type(seen)
        chain.append({"type": f"{kind.__module__}.{kind.__qualname__}",
                      "errno": getattr(seen, "errno", None), "text": str(seen)})
        seen = seen.__cause__ or seen.__context__
    return {"type": chain[0]["type"], "text": str(exc), "chain": chain}
'''


# --- upstreams ----------------------------------------------------------------------------
class LoopThread:
    """An event loop in a thread of its own (uvloop, as the proxy runs in production), so the
    proxy keeps serving while a test blocks on an app."""

    def __init__(self) -> None:
        self.loop = loop_factory("uvloop")()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 15.0) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` on the loop's thread (the proxy's state belongs to it)."""

        async def on_loop() -> T:
            return function()

        return self.run(on_loop())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Node:
    """Everything the tests share; see the module docstring."""

    def __init__(
        self,
        loop: LoopThread,
        proxy: ProxyHandle,
        dns: DnsStub,
        ca: TestCA,
        upstreams: dict[str, Any],
    ) -> None:
        self.loop = loop
        self.proxy = proxy
        self.dns = dns
        self.ca = ca
        self.web: HttpUpstream = upstreams["web"]
        self.secure: HttpUpstream = upstreams["secure"]
        self.echo: EchoUpstream = upstreams["echo"]
        self.trap: EchoUpstream = upstreams["trap"]
        self.smtp: SmtpServer = upstreams["smtp"]
        self.redis: RedisServer = upstreams["redis"]

    @property
    def denied_dest(self) -> str:
        return f"trap.test:{self.trap.port}"

    def run_app(self, app: str, script: str) -> list[dict[str, Any]]:
        """Run ``script`` as ``app``'s uid; the JSON lines it printed, by step."""
        code = PRELUDE + textwrap.dedent(script)
        result = run_app(
            code, uid=UIDS[app], proxy=self.proxy.address(ListenerKind.SOCKS5), timeout=30
        )
        assert result.returncode == 0, f"{app} app failed:\n{result.stdout}\n{result.stderr}"
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def log_size(self) -> int:
        return len(self.loop.call(self.proxy.records))

    def records_since(self, start: int, count: int) -> list[dict[str, Any]]:
        """The ``count`` connection log records written after the first ``start``."""
        return self.loop.run(self.proxy.wait_records(start + count))[start:]

    def connections(self, app: str, decision: str, reason: str) -> float:
        """``egress_connections_total`` for ``app`` on the SOCKS5 listener."""
        registry = self.proxy.runtime.metrics.registry
        labels = {"app": app, "listener": "socks5", "decision": decision, "reason": reason}
        value = self.loop.call(
            lambda: registry.get_sample_value("egress_connections_total", labels)
        )
        return value or 0.0


def node_config(dns: DnsStub, ports: dict[str, int]) -> dict[str, Any]:
    """One app per client; each rule names the host its client uses, never an address."""
    web, echo = f"web.test:{ports['web']}", f"echo.test:{ports['echo']}"
    allow = {
        "urllib": [web],
        "httpclient": [web],
        "requests": [web],
        "aiohttp": [web],
        "asyncio": [echo],
        "redis": [f"cache.test:{ports['redis']}"],
        "smtplib": [f"mail.test:{ports['smtp']}"],
        "tls": [f"secure.test:{ports['secure']}", f"wrong.test:{ports['secure']}"],
        "socket": [echo],
    }
    apps = [{"name": name, "uids": [str(UIDS[name])], "allow": allow[name]} for name in UIDS]
    return base_config(
        security={"allow_special": ["127.0.0.0/8"]},
        resolver={"nameservers": [dns.address]},
        app=apps,
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("node")
    readable = world_readable_dir()  # the apps read the CA certificate
    ca = make_ca(readable / "ca", ("secure.test",))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca.server_cert, ca.server_key)
    loop = LoopThread()
    try:
        with (
            DnsStub({name: ["127.0.0.1"] for name in (*NAMES, "trap.test")}) as dns,
            RedisServer(tmp / "redis") as redis_server,
            HttpUpstream("web.test") as web,
            HttpUpstream("secure.test", tls) as secure,
            contextlib.ExitStack() as stack,  # what runs on the loop; closed first, proxy first
        ):
            upstreams: dict[str, Any] = {"web": web, "secure": secure, "redis": redis_server}
            for key, server in (
                ("echo", EchoUpstream(greeting=ECHO_GREETING)),
                ("trap", EchoUpstream()),
                ("smtp", SmtpServer()),
            ):
                upstreams[key] = loop.run(server.__aenter__())
                stack.callback(loop.run, server.__aexit__(None, None, None))
            ports = {key: upstream.port for key, upstream in upstreams.items()}
            proxy_context = running_proxy(node_config(dns, ports), tmp)
            proxy = loop.run(proxy_context.__aenter__())
            stack.callback(loop.run, proxy_context.__aexit__(None, None, None))
            yield Node(loop, proxy, dns, ca, upstreams)
    finally:
        loop.close()
        shutil.rmtree(readable, ignore_errors=True)


# --- assertions ------------------------------------------------------------------------------
def steps(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["step"]: line for line in lines}


def assert_denied(failure: dict[str, Any], app: str, dest: str, raised: str) -> None:
    """The library raised ``raised``, wrapping the shim's EgressDenied (EACCES), and the text
    the user sees names the app, the destination and the reason."""
    assert failure["type"] == raised, failure
    wrapped = [e for e in failure["chain"] if e["type"] == DENIED]
    assert wrapped, failure["chain"]
    denied = wrapped[0]
    assert denied["errno"] == errno.EACCES
    expected = f'egress: app "{app}" may not connect to {dest} (no rule matches)'
    assert expected in denied["text"]
    assert expected in failure["text"], failure["text"]


def assert_logged(node: Node, start: int, app: str, allowed: list[str], denied: str) -> None:
    """The proxy logged the allowed connections (each by the rule naming its host) and the
    denial under ``app``; the denied destination was neither dialled nor looked up."""
    records = node.records_since(start, len(allowed) + 1)
    assert [(r["app"], r["uid"]) for r in records] == [(app, UIDS[app])] * len(records)
    passed = sorted(
        (r["dest"], r["rule"], r["dialed"]) for r in records if r["decision"] == "allowed"
    )
    assert passed == sorted((d, d, f"127.0.0.1:{d.rpartition(':')[2]}") for d in allowed)
    (refused,) = [r for r in records if r["decision"] != "allowed"]
    assert (refused["decision"], refused["reason"], refused["dest"]) == (
        "denied",
        "not_allowed",
        denied,
    )
    assert refused["dialed"] is None
    assert node.trap.accepted == 0
    asked = {name for name, _ in node.dns.queries}
    assert {d.rpartition(":")[0] for d in allowed} <= asked  # the proxy resolved the names
    host = denied.rpartition(":")[0]
    if host not in {d.rpartition(":")[0] for d in allowed}:  # a name denied on every port
        assert host not in asked


def synthetic(host: str) -> bool:
    """Whether ``host`` is one of the shim's made-up addresses for names (no DNS behind it)."""
    return ipaddress.ip_address(host) in ipaddress.ip_network("240.0.0.0/4")


class Counts:
    """The proxy's connection counters for one app, before and after a test."""

    def __init__(self, node: Node, app: str) -> None:
        self.node, self.app = node, app
        self.before = self._now()

    def _now(self) -> tuple[float, float]:
        return (
            self.node.connections(self.app, "allowed", "allowed"),
            self.node.connections(self.app, "denied", "not_allowed"),
        )

    def delta(self) -> tuple[float, float]:
        now = self._now()
        return now[0] - self.before[0], now[1] - self.before[1]


def assert_http_exchange(node: Node, line: dict[str, Any], path: str) -> None:
    assert line["status"] == 200
    assert line["body"] == f"hello {path} from web.test\n"
    seen = [r for r in node.web.requests if r["path"] == path]
    assert seen and seen[-1]["host"] in ("web.test", f"web.test:{node.web.port}"), seen


# --- one test per client --------------------------------------------------------------------
def test_urllib_request(node: Node) -> None:
    start, counts, web = node.log_size(), Counts(node, "urllib"), f"web.test:{node.web.port}"
    lines = node.run_app(
        "urllib",
        f"""
        import urllib.error, urllib.request
        with urllib.request.urlopen("http://{web}/urllib", timeout=10) as response:
            emit("exchange", status=response.status, body=response.read().decode())
        try:
            urllib.request.urlopen("http://{node.denied_dest}/", timeout=10)
        except urllib.error.URLError as exc:
            reason = type(exc.reason)
            emit("denial", reason=f"{{reason.__module__}}.{{reason.__qualname__}}",
                 reason_is_permission=isinstance(exc.reason, PermissionError), **failure(exc))
        """,
    )
    got = steps(lines)
    assert_http_exchange(node, got["exchange"], "/urllib")
    denial = got["denial"]
    assert_denied(denial, "urllib", node.denied_dest, "urllib.error.URLError")
    assert denial["reason"] == DENIED and denial["reason_is_permission"]
    assert_logged(node, start, "urllib", [web], node.denied_dest)
    assert counts.delta() == (1, 1)


def test_http_client(node: Node) -> None:
    start, counts, web = node.log_size(), Counts(node, "httpclient"), f"web.test:{node.web.port}"
    lines = node.run_app(
        "httpclient",
        f"""
        import http.client
        conn = http.client.HTTPConnection("web.test", {node.web.port}, timeout=10)
        conn.request("GET", "/httpclient")
        peer = conn.sock.getpeername()
        response = conn.getresponse()
        emit("exchange", status=response.status, body=response.read().decode(), peer=peer)
        conn.close()
        try:
            denied = http.client.HTTPConnection("trap.test", {node.trap.port}, timeout=10)
            denied.request("GET", "/")
        except OSError as exc:
            emit("denial", **failure(exc))
        """,
    )
    got = steps(lines)
    assert_http_exchange(node, got["exchange"], "/httpclient")
    # The app's socket seems connected to the name's synthetic address, not to the proxy.
    host, port = got["exchange"]["peer"]
    assert synthetic(host) and port == node.web.port
    assert_denied(got["denial"], "httpclient", node.denied_dest, DENIED)
    assert_logged(node, start, "httpclient", [web], node.denied_dest)
    assert counts.delta() == (1, 1)


def test_requests(node: Node) -> None:
    start, counts, web = node.log_size(), Counts(node, "requests"), f"web.test:{node.web.port}"
    lines = node.run_app(
        "requests",
        f"""
        import requests
        response = requests.get("http://{web}/requests", timeout=10)
        emit("exchange", status=response.status_code, body=response.text)
        try:
            requests.get("http://{node.denied_dest}/", timeout=10)
        except requests.exceptions.ConnectionError as exc:
            emit("denial", **failure(exc))
        """,
    )
    got = steps(lines)
    assert_http_exchange(node, got["exchange"], "/requests")
    assert node.web.requests[-1]["user_agent"].startswith("python-requests/")
    assert_denied(
        got["denial"], "requests", node.denied_dest, "requests.exceptions.ConnectionError"
    )
    assert_logged(node, start, "requests", [web], node.denied_dest)
    assert counts.delta() == (1, 1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aiohttp(node: Node, loop: str) -> None:
    """aiohttp's client on both loops: the shim patches asyncio's ``sock_connect`` and, for
    uvloop, also its ``create_connection``, which dials in C."""
    start, counts, web = node.log_size(), Counts(node, "aiohttp"), f"web.test:{node.web.port}"
    path = f"/aiohttp-{loop}"
    runner = "uvloop.run" if loop == "uvloop" else "asyncio.run"
    lines = node.run_app(
        "aiohttp",
        f"""
        import asyncio, aiohttp, uvloop

        async def main():
            emit("loop", module=type(asyncio.get_running_loop()).__module__)
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get("http://{web}{path}") as response:
                    emit("exchange", status=response.status, body=await response.text())
                try:
                    async with session.get("http://{node.denied_dest}/"):
                        pass
                except aiohttp.ClientConnectorError as exc:
                    emit("denial", os_error=type(exc.os_error).__qualname__, **failure(exc))

        {runner}(main())
        """,
    )
    got = steps(lines)
    assert got["loop"]["module"].startswith(loop)
    assert_http_exchange(node, got["exchange"], path)
    assert node.web.requests[-1]["user_agent"].startswith("Python/3")  # aiohttp's own agent
    denial = got["denial"]
    assert denial["os_error"] == "EgressDenied"
    assert_denied(
        denial, "aiohttp", node.denied_dest, "aiohttp.client_exceptions.ClientConnectorError"
    )
    assert_logged(node, start, "aiohttp", [web], node.denied_dest)
    assert counts.delta() == (1, 1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_asyncio_open_connection(node: Node, loop: str) -> None:
    """Streams on both loops; on uvloop this is the shim's own ``create_connection`` (uvloop
    dials names in C). There ``peername`` reports the proxy (a known limitation): not checked."""
    start, counts, echo = node.log_size(), Counts(node, "asyncio"), f"echo.test:{node.echo.port}"
    runner = "uvloop.run" if loop == "uvloop" else "asyncio.run"
    lines = node.run_app(
        "asyncio",
        f"""
        import asyncio, uvloop

        async def main():
            emit("loop", module=type(asyncio.get_running_loop()).__module__)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("echo.test", {node.echo.port}), 10)
            greeting = await reader.readline()
            writer.write(b"ping from {loop}\\n")
            echoed = await asyncio.wait_for(reader.readline(), 10)
            peer = writer.get_extra_info("peername")
            writer.close()
            await writer.wait_closed()
            emit("exchange", greeting=greeting.decode(), echoed=echoed.decode(), peer=peer)
            try:
                await asyncio.wait_for(asyncio.open_connection("trap.test", {node.trap.port}), 10)
            except OSError as exc:
                emit("denial", **failure(exc))

        {runner}(main())
        """,
    )
    got = steps(lines)
    assert got["loop"]["module"].startswith(loop)
    exchange = got["exchange"]
    assert exchange["greeting"] == ECHO_GREETING.decode()
    assert exchange["echoed"] == f"ping from {loop}\n"
    if loop == "asyncio":
        assert synthetic(exchange["peer"][0]) and exchange["peer"][1] == node.echo.port
    assert_denied(got["denial"], "asyncio", node.denied_dest, DENIED)
    assert_logged(node, start, "asyncio", [echo], node.denied_dest)
    assert counts.delta() == (1, 1)


def test_redis(node: Node) -> None:
    """redis-py to a real redis-server; the denial is the same name on a port not allowed."""
    start, counts = node.log_size(), Counts(node, "redis")
    cache, denied = f"cache.test:{node.redis.port}", f"cache.test:{node.trap.port}"
    lines = node.run_app(
        "redis",
        f"""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        def client(port):  # no retries, so one attempt is one connection
            return redis.Redis(host="cache.test", port=port, socket_timeout=10,
                               socket_connect_timeout=10, retry=Retry(NoBackoff(), 0))

        with client({node.redis.port}) as r:
            r.set("sandbox:redis", "set under uid 10106")
            emit("exchange", value=r.get("sandbox:redis").decode())
        try:
            with client({node.trap.port}) as r:
                r.ping()
        except redis.exceptions.ConnectionError as exc:
            emit("denial", **failure(exc))
        """,
    )
    got = steps(lines)
    assert got["exchange"]["value"] == "set under uid 10106"
    with contextlib.closing(node.redis.client()) as direct:  # the server really holds it
        assert direct.get("sandbox:redis") == b"set under uid 10106"
    assert_denied(got["denial"], "redis", denied, "redis.exceptions.ConnectionError")
    assert_logged(node, start, "redis", [cache], denied)
    assert counts.delta() == (1, 1)


def test_smtplib(node: Node) -> None:
    start, counts, mail = node.log_size(), Counts(node, "smtplib"), f"mail.test:{node.smtp.port}"
    lines = node.run_app(
        "smtplib",
        f"""
        import smtplib
        message = "Subject: from the sandbox\\r\\n\\r\\nsent by smtplib\\r\\n.leading dot\\r\\n"
        port = {node.smtp.port}
        with smtplib.SMTP("mail.test", port, local_hostname="app.test", timeout=10) as s:
            refused = s.sendmail("app@example.test", ["ops@example.test"], message)
            emit("exchange", refused=refused)
        try:
            smtplib.SMTP("trap.test", {node.trap.port}, timeout=10)
        except OSError as exc:
            emit("denial", **failure(exc))
        """,
    )
    got = steps(lines)
    assert got["exchange"]["refused"] == {}
    received = node.smtp.messages[-1]
    assert (received.helo, received.sender, received.recipients) == (
        "app.test",
        "app@example.test",
        ["ops@example.test"],
    )
    assert received.data == b"Subject: from the sandbox\r\n\r\nsent by smtplib\r\n.leading dot\r\n"
    assert_denied(got["denial"], "smtplib", node.denied_dest, DENIED)
    assert_logged(node, start, "smtplib", [mail], node.denied_dest)
    assert counts.delta() == (1, 1)


def test_tls_with_sni_and_verification(node: Node) -> None:
    """TLS over the shim's socket is the app's own: SNI and certificate checks as without it.

    Two ways of making the TLS socket (wrap a connected socket; wrap first, then connect, which
    runs the shim's handshake under an SSLSocket), then the same upstream by a name its
    certificate does not carry (allowed by the rules: verification, not the proxy, must fail).
    """
    start, counts, port = node.log_size(), Counts(node, "tls"), node.secure.port
    secure, wrong = f"secure.test:{port}", f"wrong.test:{port}"
    sni_before = len(node.secure.sni)
    lines = node.run_app(
        "tls",
        f"""
        import socket, ssl
        context = ssl.create_default_context(cafile="{node.ca.ca_cert}")

        def get(tls, path):
            tls.sendall(f"GET {{path}} HTTP/1.0\\r\\nHost: secure.test\\r\\n\\r\\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            san = tls.getpeercert()["subjectAltName"]
            return {{"response": data.decode(), "san": san, "version": tls.version()}}

        raw = socket.create_connection(("secure.test", {port}), timeout=10)
        with context.wrap_socket(raw, server_hostname="secure.test") as tls:
            emit("exchange", **get(tls, "/tls"))
        with context.wrap_socket(socket.socket(), server_hostname="secure.test") as tls:
            tls.settimeout(10)
            tls.connect(("secure.test", {port}))
            emit("wrapped_first", **get(tls, "/tls-wrapped"))
        try:
            raw = socket.create_connection(("wrong.test", {port}), timeout=10)
            context.wrap_socket(raw, server_hostname="wrong.test")
        except ssl.SSLCertVerificationError as exc:
            emit("mismatch", verify_message=exc.verify_message, **failure(exc))
        try:
            socket.create_connection(("trap.test", {node.trap.port}), timeout=10)
        except OSError as exc:
            emit("denial", **failure(exc))
        """,
    )
    got = steps(lines)
    for step, path in (("exchange", "/tls"), ("wrapped_first", "/tls-wrapped")):
        assert got[step]["response"].endswith(f"\r\n\r\nhello {path} from secure.test\n")
        assert got[step]["san"] == [["DNS", "secure.test"]]
        assert got[step]["version"].startswith("TLS")
    assert "Hostname mismatch" in got["mismatch"]["verify_message"]
    assert node.secure.sni[sni_before:] == ["secure.test", "secure.test", "wrong.test"]
    assert [r["path"] for r in node.secure.requests[-2:]] == ["/tls", "/tls-wrapped"]
    assert_denied(got["denial"], "tls", node.denied_dest, DENIED)
    assert_logged(node, start, "tls", [secure, secure, wrong], node.denied_dest)
    assert counts.delta() == (3, 1)


def test_raw_socket_connect(node: Node) -> None:
    """A hand-written socket: a name straight into ``connect()``; the denial is an IP literal
    (loopback is opened to the node, but no rule of this app names the port)."""
    start, counts, echo = node.log_size(), Counts(node, "socket"), f"echo.test:{node.echo.port}"
    denied = f"127.0.0.1:{node.trap.port}"
    lines = node.run_app(
        "socket",
        f"""
        import socket
        emit("names", address=socket.getaddrinfo("echo.test", {node.echo.port})[0][4][0])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(("echo.test", {node.echo.port}))
        greeting = s.recv(len({ECHO_GREETING!r}))
        s.sendall(b"raw bytes")
        echoed = b""
        while len(echoed) < 9:
            echoed += s.recv(9 - len(echoed))
        emit("exchange", greeting=greeting.decode(), echoed=echoed.decode())
        s.close()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", {node.trap.port}))
        except OSError as exc:
            emit("denial", **failure(exc))
        """,
    )
    got = steps(lines)
    assert synthetic(got["names"]["address"])  # no DNS query left the app
    assert got["exchange"] == {
        "step": "exchange",
        "greeting": ECHO_GREETING.decode(),
        "echoed": "raw bytes",
    }
    assert_denied(got["denial"], "socket", denied, DENIED)
    assert_logged(node, start, "socket", [echo], denied)
    assert counts.delta() == (1, 1)
