"""Rate limits end to end with ``[ratelimit].backend = "redis"``: real ``egress proxy`` processes
sharing a real ``redis-server``, clients acting as apps through sockets owned by the apps' uids,
and Redis made to misbehave while they connect (a fault-injecting relay in front of it, or the
server killed and restarted).

What a user would notice is what is asserted: how many connections get through (counted by the
clients, by the upstream and by the proxies' ``/metrics``), what a refused client is told
(SOCKS5 reply code, HTTP status, ``Retry-After``), how long any client waits, and what
``/metrics`` and ``/readyz`` say about the limiter's mode.

The numbers of the fault tests are exact because the rates are tiny: a bucket refills one
token in ten seconds (its Redis key is deleted before each phase that needs it full), so a
burst of attempts admits exactly the burst and the refill during a test does not blur it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.configs import base_config, write_config
from tests.faultproxy import Fault, FaultProxy
from tests.netns import network_namespace
from tests.polling import eventually
from tests.processes import EgressProcess
from tests.redisserver import RedisServer
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    EchoUpstream,
    http_connect,
    open_as_uid,
    open_unix_as_uid,
    run,
    socks5_connect,
)

pytestmark = pytest.mark.root

PROBE_UID = 10003  # an app whose checks warm up Redis connections and probe the breaker
FREE_UID = 10004  # an app without limits

SOCKS5_NOT_ALLOWED = 0x02
SOCKS5_GENERAL_FAILURE = 0x01
RESET = -1  # the proxy closed or reset the connection without a reply
HUNG = -2  # no reply within HANG_S
HANG_S = 5.0  # longer than any deadline in these configs: a client still waiting is hung
CONNECT_TIMEOUT_S = 2.0  # [proxy].connect_timeout of every config here
START_TIMEOUT_S = 20.0  # several proxies start at once on two cores


# --- configs and processes --------------------------------------------------------------------
def app(name: str, uid: int, *allow: str, **limits: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "uids": [str(uid)], "allow": list(allow)}
    if limits:
        entry["limits"] = limits
    return entry


INTERNET = "10.77.0.1"  # the destination in a network namespace (on its loopback)
PROBE_APP = app(
    "probe", PROBE_UID, "127.0.0.1:*", f"{INTERNET}:*", connections_per_second=1000, burst=1000
)


def node_config(
    tmp_path: Path,
    name: str,
    redis_url: str,
    apps: Sequence[dict[str, Any]],
    *,
    ratelimit: dict[str, Any] | None = None,
    proxy: dict[str, Any] | None = None,
    allow_special: Sequence[str] = ("127.0.0.0/8",),
) -> Path:
    """One node's config: Redis buckets at ``redis_url``, an admin listener, ``apps``."""
    data = base_config(
        proxy={"connect_timeout": CONNECT_TIMEOUT_S, **(proxy or {})},
        ratelimit={"backend": "redis", **(ratelimit or {})},
        redis={"url": redis_url},
        security={"allow_special": list(allow_special)},
        admin={"listen": "127.0.0.1:0"},
        app=[PROBE_APP, *apps],
    )
    data["log"]["connection_log"] = str(tmp_path / f"{name}-connections.log")
    return write_config(tmp_path / f"{name}.toml", data)


@dataclass
class Node:
    """A running ``egress proxy`` and the addresses it logged at start."""

    process: EgressProcess
    listeners: dict[str, str]  # kind -> address ("127.0.0.1:1234", or the Unix socket's path)
    admin: str

    def address(self, kind: str) -> tuple[str, int]:
        host, _, port = self.listeners[kind].rpartition(":")
        return host, int(port)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
            return text

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.admin}/readyz", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def alive(self) -> bool:
        return self.process.proc.poll() is None


@contextlib.contextmanager
def running_nodes(*configs: Path) -> Iterator[list[Node]]:
    """``egress proxy`` for each config, started together; all stopped by pid at the end."""
    with contextlib.ExitStack() as stack:
        processes = [stack.enter_context(EgressProcess("proxy", config=c)) for c in configs]
        nodes = []
        for process in processes:
            started = process.wait_log(
                lambda entry: entry.get("msg") == "proxy started",
                "proxy started",
                timeout=START_TIMEOUT_S,
            )
            listeners = dict(part.split("=", 1) for part in started["listeners"].split(", "))
            nodes.append(Node(process, listeners, started["admin"]))
        yield nodes


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                total += found.value
    return total


def mode_of(text: str) -> str:
    """The rate limiter's mode as ``egress_ratelimit_mode`` says (the label whose value is 1)."""
    modes = [
        s.labels["mode"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "egress_ratelimit_mode" and s.value == 1
    ]
    assert len(modes) == 1, f"egress_ratelimit_mode must be 1 for exactly one mode: {modes}"
    return modes[0]


def bucket_key(app_name: str) -> str:
    """The Redis key of an app's connection bucket (README, "Rate limits")."""
    return f"{{egress:{app_name}}}:rl:conn"


def unix_socket_dir() -> Path:
    """A directory the test uids can reach (pytest's tmp_path is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="egress-rl-"))
    directory.chmod(0o755)
    return directory


class Upstream(EchoUpstream):
    """The echo upstream, which on leaving waits for its open connections to end (the proxy
    closes its side soon after the client's), so no handler is cut off by the loop's end."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.open = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            await super()._handle(reader, writer)
        finally:
            self.open -= 1

    async def __aenter__(self) -> Upstream:
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await eventually(lambda: self.open == 0, "the upstream's connections closed")
        await super().__aexit__(*exc)


# --- clients ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """One client's try to open a connection through the proxy, as the client saw it."""

    protocol: str  # socks5, http, unix (SOCKS5 over the Unix socket) or transparent
    started: float  # time.monotonic()
    took: float  # seconds until the reply (or the reset)
    code: int  # SOCKS5 reply code or HTTP status; RESET or HUNG
    retry_after: str | None = None  # the HTTP Retry-After header
    body: str = ""  # the HTTP error body ("<outcome>: <detail>")

    @property
    def admitted(self) -> bool:
        return self.code in (0, 200)


async def attempt(node: Node, protocol: str, uid: int, destination: tuple[str, int]) -> Attempt:
    """Open a connection as ``uid`` through ``node`` to ``destination`` and close it again."""
    started = time.monotonic()
    host, port = destination
    code, retry_after, body = RESET, None, ""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(HANG_S):
            if protocol == "transparent":  # straight to the destination: iptables redirects it
                reader, writer = await open_as_uid(uid, host, port)
                writer.write(b"ping")
                code = 0 if await reader.read(4) == b"ping" else RESET
            elif protocol == "unix":
                reader, writer = await open_unix_as_uid(uid, node.listeners["socks5_unix"])
                code = await socks5_connect(reader, writer, host, port)
            elif protocol == "socks5":
                reader, writer = await open_as_uid(uid, *node.address("socks5"))
                code = await socks5_connect(reader, writer, host, port)
            else:
                reader, writer = await open_as_uid(uid, *node.address("http"))
                code, headers, raw = await http_connect(reader, writer, f"{host}:{port}")
                retry_after, body = headers.get("retry-after"), raw.decode(errors="replace")
    except TimeoutError:
        code = HUNG
    except (ConnectionError, asyncio.IncompleteReadError):
        code = RESET
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return Attempt(protocol, started, time.monotonic() - started, code, retry_after, body)


async def burst(
    nodes: Sequence[Node], uid: int, destination: tuple[str, int], count: int
) -> list[Attempt]:
    """``count`` attempts at once, spread over ``nodes`` and over SOCKS5 and HTTP."""
    protocols = ("socks5", "http")
    return await asyncio.gather(
        *(
            attempt(nodes[i % len(nodes)], protocols[(i // len(nodes)) % 2], uid, destination)
            for i in range(count)
        )
    )


def assert_refused_as(
    attempts: Sequence[Attempt], outcome: str, *, retry_after_s: int | None = None
) -> None:
    """Every refused attempt was refused as ``outcome`` says it should be, on the wire; HTTP
    refusals carry ``Retry-After`` where the outcome has one (``retry_after_s`` if given)."""
    socks5_code, http_status, retry_after = {
        "rate_limited": (SOCKS5_NOT_ALLOWED, 429, True),
        "too_many_connections": (SOCKS5_NOT_ALLOWED, 429, False),
        "limiter_unavailable": (SOCKS5_GENERAL_FAILURE, 503, True),
    }[outcome]
    for refused in (a for a in attempts if not a.admitted):
        if refused.protocol == "http":
            assert refused.code == http_status, refused
            assert refused.body.startswith(f"{outcome}: "), refused
            if retry_after:
                assert refused.retry_after is not None, refused
                assert int(refused.retry_after) >= 1, refused
                if retry_after_s is not None:
                    assert int(refused.retry_after) == retry_after_s, refused
        elif refused.protocol == "transparent":
            assert refused.code == RESET, refused
        else:
            assert refused.code == socks5_code, refused


def assert_no_internal_error_logged(node: Node) -> None:
    """Redis failing is weather, not a bug: the Redis buckets log only their own internal
    errors (with a traceback, "failed unexpectedly"), and those skip the error metrics."""
    logged = [entry for entry in node.process.logs() if entry.get("logger") == "ratelimit.redis"]
    assert not logged, [
        (entry.get("msg"), str(entry.get("exc", "")).splitlines()[-1:]) for entry in logged
    ]


async def scrape(node: Node) -> str:
    return await asyncio.to_thread(node.metrics)


async def wait_for_redis_mode(node: Node, probe_destination: tuple[str, int]) -> float:
    """Probe (as the probe app, whose bucket never runs dry) until the node's limiter is back
    on Redis; the seconds it took. The breaker tries Redis again only when a check comes."""
    started = time.monotonic()
    deadline = started + 15.0  # the breaker's longest wait is 8 s
    while time.monotonic() < deadline:
        probe = await attempt(node, "socks5", PROBE_UID, probe_destination)
        assert probe.code != HUNG, probe
        if mode_of(await scrape(node)) == "redis":
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"the limiter was not back on Redis within 15 s: {node.readyz()}")


# --- 1. accuracy across nodes ------------------------------------------------------------------
RATE, BURST = 50, 10
WINDOW_S = 3.0
OFFERED_PER_S = 400  # all clients together: 8 times the rate
WORKERS_PER_NODE = 8  # enough in flight to keep the pace when replies slow down
MAX_ATTEMPTS = 2000  # the load's bound in count (the window bounds it in time)
SLICE_S = 0.5


def test_three_nodes_admit_what_one_shared_bucket_allows(tmp_path: Path) -> None:
    """Clients hammer one app on three nodes at once; the admitted connections, counted three
    ways, stay within 2% of burst + rate x (last attempt - first attempt)."""
    with RedisServer(tmp_path / "redis") as server:
        blog = app("blog", APP_UID, "127.0.0.1:*", connections_per_second=RATE, burst=BURST)
        # Deny, with a long deadline: a hiccup of Redis must show up as a refusal the test sees,
        # never as local buckets admitting more than the shared one (it would skew the count).
        ratelimit = {"on_redis_error": "deny", "redis_timeout": 1.0}
        configs = [
            node_config(tmp_path, f"node{i}", server.url, [blog], ratelimit=ratelimit)
            for i in range(3)
        ]
        with running_nodes(*configs) as nodes:

            async def main() -> None:
                async with Upstream() as upstream:
                    destination = ("127.0.0.1", upstream.port)
                    for node in nodes:  # each node's Redis connection and script are ready
                        for protocol in ("socks5", "http"):
                            warmed = await attempt(node, protocol, PROBE_UID, destination)
                            assert warmed.admitted, warmed
                    warm = upstream.accepted
                    attempts = await hammer(nodes, destination)
                    await check_accuracy(nodes, attempts, upstream, warm)

            run("asyncio", main(), timeout=45)


async def hammer(nodes: Sequence[Node], destination: tuple[str, int]) -> list[Attempt]:
    """Paced workers (half SOCKS5, half HTTP) on every node for WINDOW_S seconds."""
    workers = len(nodes) * WORKERS_PER_NODE
    period = workers / OFFERED_PER_S  # each worker starts an attempt this often
    attempts: list[Attempt] = []
    end = time.monotonic() + WINDOW_S

    async def worker(index: int) -> None:
        node = nodes[index % len(nodes)]
        protocol = ("socks5", "http")[(index // len(nodes)) % 2]
        next_start = time.monotonic() + period * index / workers  # staggered
        while len(attempts) < MAX_ATTEMPTS:
            if (wait := next_start - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if time.monotonic() >= end:
                return
            next_start += period
            attempts.append(await attempt(node, protocol, APP_UID, destination))

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return sorted(attempts, key=lambda a: a.started)


async def check_accuracy(
    nodes: Sequence[Node], attempts: Sequence[Attempt], upstream: Upstream, warm: int
) -> None:
    assert all(a.code != HUNG for a in attempts), [a for a in attempts if a.code == HUNG][:5]
    first, last = attempts[0].started, attempts[-1].started
    window = last - first
    # The offered load was well over the rate all through the window, or the bound is no test.
    slices = [0] * max(1, math.floor(window / SLICE_S))  # whole slices; the tail is shorter
    for a in attempts:
        if (index := int((a.started - first) / SLICE_S)) < len(slices):
            slices[index] += 1
    # (5 times over the window, and 3 times in every half second even when other tests load
    # the two cores: the bucket stays drained, so every token is taken as it comes.)
    offered = f"{len(attempts)} attempts in {window:.2f} s, per {SLICE_S} s: {slices}"
    assert len(attempts) >= 5 * RATE * window, offered
    assert min(slices) >= 3 * RATE * SLICE_S, offered

    admitted = [a for a in attempts if a.admitted]
    allowed = BURST + RATE * window
    assert abs(len(admitted) - allowed) <= 0.02 * allowed, (
        f"{len(admitted)} admitted of {len(attempts)} in {window:.3f} s; the bucket allows "
        f"{allowed:.1f} (burst {BURST} + {RATE}/s)"
    )
    assert_refused_as(attempts, "rate_limited")
    assert {a.protocol for a in admitted} == {"socks5", "http"}

    # The upstream saw every admitted connection, and the proxies counted the same decisions.
    await eventually(
        lambda: upstream.accepted - warm >= len(admitted),
        "the upstream accepted every admitted connection",
    )
    assert upstream.accepted - warm == len(admitted)
    texts = [await scrape(node) for node in nodes]
    decisions = {
        result: sum(
            sample(
                text,
                "egress_ratelimit_decisions_total",
                app="blog",
                limit="connections",
                result=result,
            )
            for text in texts
        )
        for result in ("allowed", "limited", "unavailable")
    }
    assert decisions == {
        "allowed": len(admitted),
        "limited": len(attempts) - len(admitted),
        "unavailable": 0,
    }
    for node, text in zip(nodes, texts, strict=True):
        assert sample(text, "egress_ratelimit_decisions_total", app="blog", result="allowed") > 0
        assert sample(text, "egress_ratelimit_redis_seconds_count") > 0
        assert sample(text, "egress_ratelimit_redis_errors_total") == 0, node.readyz()
        assert mode_of(text) == "redis"
        assert sample(text, "egress_ratelimit_fallback_active") == 0


# --- 2. every entry path, one bucket -----------------------------------------------------------
ENTRY_BURST = 12
LISTENERS = ("socks5", "http", "unix", "transparent")


def redirect_to(port: int, uid: int) -> None:
    """What the firewall controller installs in transparent mode, reduced to one rule for the
    test "internet" (the explicit listeners on 127.0.0.1 stay reachable)."""
    subprocess.run(
        ["iptables", "-t", "nat", "-A", "OUTPUT", "-d", f"{INTERNET}/32", "-p", "tcp",
         "-m", "owner", "--uid-owner", str(uid), "-j", "REDIRECT", "--to-ports", str(port)],
        check=True,
        timeout=10,
    )  # fmt: skip


@pytest.mark.netns
def test_every_listener_takes_from_the_same_bucket(tmp_path: Path) -> None:
    """A burst spread evenly over SOCKS5, HTTP, the Unix socket and the transparent listener
    admits exactly the burst in total (a bucket per listener would admit all of it)."""
    sockets = unix_socket_dir()
    try:
        with (
            network_namespace(addresses=(f"{INTERNET}/32",)),
            RedisServer(tmp_path / "redis") as server,
        ):
            blog = app(
                "blog", APP_UID, f"{INTERNET}:*", connections_per_second=0.1, burst=ENTRY_BURST
            )
            config = node_config(
                tmp_path,
                "node",
                server.url,
                [blog],
                proxy={
                    "unix_socket": str(sockets / "socks.sock"),
                    "unix_socket_mode": "0666",
                    "transparent_listen": "127.0.0.1:0",
                },
                allow_special=("127.0.0.0/8", f"{INTERNET}/32"),
            )
            with running_nodes(config) as (node,):
                redirect_to(node.address("transparent")[1], APP_UID)
                run("asyncio", entry_paths(node), timeout=30)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


async def entry_paths(node: Node) -> None:
    async with Upstream(INTERNET) as upstream:
        destination = (INTERNET, upstream.port)
        assert (await attempt(node, "socks5", PROBE_UID, destination)).admitted  # warm
        offered = 2 * ENTRY_BURST
        attempts = await asyncio.gather(
            *(
                attempt(node, LISTENERS[i % len(LISTENERS)], APP_UID, destination)
                for i in range(offered)
            )
        )
        admitted = [a for a in attempts if a.admitted]
        assert len(admitted) == ENTRY_BURST, attempts
        assert_refused_as(attempts, "rate_limited", retry_after_s=10)  # a token per 10 s
        # The bucket is empty for every listener now, whichever listener emptied it.
        after = [await attempt(node, kind, APP_UID, destination) for kind in LISTENERS]
        assert not any(a.admitted for a in after), after
        assert_refused_as(after, "rate_limited", retry_after_s=10)

        text = await scrape(node)
        counted = {
            result: sample(
                text,
                "egress_ratelimit_decisions_total",
                app="blog",
                limit="connections",
                result=result,
            )
            for result in ("allowed", "limited")
        }
        assert counted == {
            "allowed": ENTRY_BURST,
            "limited": offered + len(LISTENERS) - ENTRY_BURST,
        }
        assert mode_of(text) == "redis"


# --- 3. Redis misbehaving: delay, blackhole, cut, killed ----------------------------------------
SLOW_RATE = 0.1  # a token every 10 s: no refill blurs a burst
FAULT_BURST = 10
LOCAL_SHARE = 0.5  # "local" fallback: a burst of 5
OFFER = 20  # attempts per burst
DELAY_MS = 200  # each way: far past the 50 ms redis_timeout
ANSWERED_WITHIN_S = 1.0  # about the deadline (50 ms, twice that queued), with room for 2 cores


def fault_apps() -> list[dict[str, Any]]:
    blog = app("blog", APP_UID, "127.0.0.1:*", connections_per_second=SLOW_RATE, burst=FAULT_BURST)
    return [blog, app("free", FREE_UID, "127.0.0.1:*")]


def apply_fault(relay: FaultProxy, fault: Fault) -> None:
    if fault is Fault.DELAY:
        relay.delay(DELAY_MS)
    elif fault is Fault.BLACKHOLE:
        relay.blackhole()
    else:
        relay.cut()


@pytest.mark.parametrize(
    ("fault", "policy"),
    [
        (Fault.DELAY, "local"),
        (Fault.DELAY, "deny"),
        (Fault.DELAY, "allow"),
        (Fault.BLACKHOLE, "local"),
        (Fault.CUT, "local"),
        (Fault.CUT, "deny"),
    ],
)
def test_a_redis_fault_applies_on_redis_error_and_heals(
    tmp_path: Path, fault: Fault, policy: str
) -> None:
    """Node A reaches Redis through the fault relay, node B directly. While the relay
    misbehaves, A answers every client within about the deadline and follows
    ``on_redis_error`` (B stays on Redis); healed, A is back on the shared bucket."""
    with (
        RedisServer(tmp_path / "redis") as server,
        FaultProxy(("127.0.0.1", server.port)) as relay,
    ):
        ratelimit = {"on_redis_error": policy, "local_share": LOCAL_SHARE}
        configs = [
            node_config(tmp_path, "a", relay.redis_url, fault_apps(), ratelimit=ratelimit),
            node_config(tmp_path, "b", server.url, fault_apps(), ratelimit=ratelimit),
        ]
        with running_nodes(*configs) as nodes:
            run("asyncio", fault_and_heal(server, relay, nodes, fault, policy), timeout=50)
            assert all(node.alive() for node in nodes)


async def fault_and_heal(
    server: RedisServer, relay: FaultProxy, nodes: Sequence[Node], fault: Fault, policy: str
) -> None:
    a, b = nodes
    async with Upstream() as upstream:
        destination = ("127.0.0.1", upstream.port)
        for node in nodes:
            await wait_for_redis_mode(node, destination)
        healthy = await scrape(a)

        await asyncio.to_thread(apply_fault, relay, fault)
        await asyncio.sleep(0.2)  # the node has seen a cut's resets before its next check
        attempts = await burst([a], APP_UID, destination, OFFER)
        slowest = max(a.took for a in attempts)
        assert slowest < ANSWERED_WITHIN_S, sorted(a.took for a in attempts)[-5:]
        admitted = sum(a.admitted for a in attempts)
        if policy == "local":  # this node's own bucket, at local_share of the burst
            assert admitted == math.ceil(FAULT_BURST * LOCAL_SHARE), attempts
            # Retry-After from the local bucket: its next token comes in 1 / (rate x share) s.
            assert_refused_as(
                attempts, "rate_limited", retry_after_s=round(1 / (SLOW_RATE * LOCAL_SHARE))
            )
        elif policy == "deny":
            assert admitted == 0, attempts
            assert_refused_as(attempts, "limiter_unavailable")
            free = await attempt(a, "http", FREE_UID, destination)  # no limits: not affected
            assert free.admitted, free
        else:
            assert admitted == OFFER, attempts

        text = await scrape(a)
        assert mode_of(text) == policy
        assert sample(text, "egress_ratelimit_fallback_active") == 1
        status, body = await asyncio.to_thread(a.readyz)
        assert status == 200, body  # degraded, not unready
        assert body.splitlines()[1].startswith(f"ratelimit: {policy} (Redis unreachable: "), body
        kind = "connection" if fault is Fault.CUT else "timeout"
        errors = "egress_ratelimit_redis_errors_total"
        assert sample(text, errors, kind=kind) > sample(healthy, errors, kind=kind), text
        if policy != "allow":
            counted = "unavailable" if policy == "deny" else "limited"
            assert (
                sample(text, "egress_ratelimit_decisions_total", app="blog", result=counted)
                == OFFER - admitted
            )
        assert mode_of(await scrape(b)) == "redis"  # the fault is A's alone
        assert_no_internal_error_logged(a)

        # Healed: A is back on Redis within a few seconds, and the bucket is global again.
        await asyncio.to_thread(relay.pass_through)
        took = await wait_for_redis_mode(a, destination)
        assert took < 10.0
        text = await scrape(a)
        assert sample(text, "egress_ratelimit_fallback_active") == 0
        status, body = await asyncio.to_thread(a.readyz)
        assert (status, body) == (200, "ready\nratelimit: redis\n")
        # Full again: the fault's late calls (held in the relay, then delivered) may have drawn
        # on the bucket; let them land, then start it afresh.
        await asyncio.sleep(2 * DELAY_MS / 1000 + 0.3)
        with server.client() as client:
            client.delete(bucket_key("blog"))
        attempts = await burst(nodes, APP_UID, destination, OFFER)
        assert sum(a.admitted for a in attempts) == FAULT_BURST, attempts
        assert_refused_as(attempts, "rate_limited", retry_after_s=round(1 / SLOW_RATE))
        with server.client() as client:
            assert client.pttl(bucket_key("blog")) > 0  # the bucket lives in Redis


def test_redis_killed_mid_load_and_restarted(tmp_path: Path) -> None:
    """SIGKILL the redis-server while clients connect, start it again on the same port: the
    proxy stays up, every client is answered within connect_timeout, and the limiter is back
    on the new server (which knows no script yet) by itself."""
    with RedisServer(tmp_path / "redis") as server:
        blog = app("blog", APP_UID, "127.0.0.1:*", connections_per_second=20, burst=5)
        config = node_config(tmp_path, "node", server.url, [blog])
        with running_nodes(config) as (node,):
            run("asyncio", kill_mid_load(server, node), timeout=50)
            assert node.alive()


async def kill_mid_load(server: RedisServer, node: Node) -> None:
    async with Upstream() as upstream:
        destination = ("127.0.0.1", upstream.port)
        await wait_for_redis_mode(node, destination)
        attempts: list[Attempt] = []
        stop = asyncio.Event()
        deadline = time.monotonic() + 30.0

        async def load(protocol: str) -> None:  # about 60 attempts a second in all
            while not stop.is_set() and time.monotonic() < deadline and len(attempts) < 3000:
                attempts.append(await attempt(node, protocol, APP_UID, destination))
                await asyncio.sleep(0.05)

        workers = [asyncio.create_task(load(p)) for p in ("socks5", "http", "socks5")]
        try:
            await asyncio.sleep(1.0)
            assert server.proc is not None
            os.kill(server.pid, signal.SIGKILL)
            await asyncio.to_thread(server.proc.wait, 10)
            killed_at = time.monotonic()
            await eventually(
                lambda: mode_of(node.metrics()) == "local", "local mode", timeout=5, every=0.1
            )
            await asyncio.sleep(1.0)  # down a while, under load
            await asyncio.to_thread(server.start)  # the same port, empty, no script cached
            restarted_at = time.monotonic()
            await eventually(
                lambda: mode_of(node.metrics()) == "redis", "back on Redis", timeout=15, every=0.1
            )
            recovered = time.monotonic() - restarted_at
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert recovered < 10.0
        assert node.alive()
        during = [a for a in attempts if killed_at <= a.started < restarted_at]
        assert during, "no client tried while Redis was down"
        assert any(a.admitted for a in during), "local buckets admitted nothing"
        slowest = max(a.took for a in attempts)
        assert slowest < CONNECT_TIMEOUT_S, sorted(a.took for a in attempts)[-5:]
        assert all(a.admitted or a.code in (SOCKS5_NOT_ALLOWED, 429) for a in attempts), [
            a for a in attempts if not (a.admitted or a.code in (SOCKS5_NOT_ALLOWED, 429))
        ][:5]
        assert_refused_as(attempts, "rate_limited")

        assert_no_internal_error_logged(node)
        text = await scrape(node)
        assert sample(text, "egress_ratelimit_redis_errors_total", kind="connection") > 0
        assert sample(text, "egress_ratelimit_fallback_active") == 0
        assert (await attempt(node, "socks5", APP_UID, destination)).code != HUNG
        with server.client() as client:  # the new server holds the app's bucket
            assert client.exists(bucket_key("blog"))


# --- 4. concurrency caps with tunnels held open -------------------------------------------------
CAP = 3
NEWS_UID = 10005  # an app with both a concurrency cap and a rate


@dataclass
class Tunnel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def echo(self, payload: bytes) -> bytes:
        self.writer.write(payload)
        return await asyncio.wait_for(self.reader.readexactly(len(payload)), 5)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def open_tunnel(node: Node, uid: int, destination: tuple[str, int]) -> Tunnel | int:
    """A SOCKS5 tunnel held open, or the reply code that refused it."""
    reader, writer = await open_as_uid(uid, *node.address("socks5"))
    code = await asyncio.wait_for(socks5_connect(reader, writer, *destination), HANG_S)
    if code != 0:
        writer.close()
        return code
    return Tunnel(reader, writer)


def test_max_concurrent_counts_tunnels_held_open(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        apps = [
            app("blog", APP_UID, "127.0.0.1:*", max_concurrent=CAP),
            app("shop", OTHER_APP_UID, "127.0.0.1:*", max_concurrent=CAP),
            app(
                "news",
                NEWS_UID,
                "127.0.0.1:*",
                max_concurrent=2,
                connections_per_second=0.1,
                burst=2,
            ),
        ]
        config = node_config(tmp_path, "node", server.url, apps)
        with running_nodes(config) as (node,):
            run("asyncio", hold_tunnels(node), timeout=30)
            run("asyncio", refusals_give_their_slots_back(node), timeout=30)


async def hold_tunnels(node: Node) -> None:
    async with Upstream() as upstream:
        destination = ("127.0.0.1", upstream.port)
        held: list[Tunnel] = []
        try:
            for index in range(CAP):
                tunnel = await open_tunnel(node, APP_UID, destination)
                assert isinstance(tunnel, Tunnel), f"tunnel {index + 1} refused: {tunnel}"
                held.append(tunnel)
                assert await tunnel.echo(b"held") == b"held"
            over = [
                await attempt(node, "socks5", APP_UID, destination),
                await attempt(node, "http", APP_UID, destination),
            ]
            assert [a.code for a in over] == [SOCKS5_NOT_ALLOWED, 429], over
            assert_refused_as(over, "too_many_connections")

            # Another app is not held back by this one's tunnels.
            others = [await open_tunnel(node, OTHER_APP_UID, destination) for _ in range(CAP)]
            assert all(isinstance(t, Tunnel) for t in others), others
            held += [t for t in others if isinstance(t, Tunnel)]
            text = await scrape(node)
            assert sample(text, "egress_open_tunnels", app="blog") == CAP
            assert sample(text, "egress_open_tunnels", app="shop") == CAP

            # Closing one frees its slot (once the proxy has seen the close).
            await held.pop(0).close()
            deadline = time.monotonic() + 5.0
            reopened: Tunnel | int = SOCKS5_NOT_ALLOWED
            while not isinstance(reopened, Tunnel) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                reopened = await open_tunnel(node, APP_UID, destination)
            assert isinstance(reopened, Tunnel), "the closed tunnel's slot was not freed"
            held.append(reopened)
            assert await reopened.echo(b"again") == b"again"
            assert (await attempt(node, "socks5", APP_UID, destination)).code == SOCKS5_NOT_ALLOWED

            text = await scrape(node)
            limited = sample(
                text,
                "egress_ratelimit_decisions_total",
                app="blog",
                limit="concurrent",
                result="limited",
            )
            assert limited >= 3
            assert (
                sample(text, "egress_ratelimit_decisions_total", app="shop", result="limited") == 0
            )
        finally:
            for tunnel in held:
                await tunnel.close()


async def refusals_give_their_slots_back(node: Node) -> None:
    """The slot is taken before the token (README): a connection the rate refuses must give
    its slot back, or a rate-limited app would soon be refused as too_many_connections."""
    async with Upstream() as upstream:
        destination = ("127.0.0.1", upstream.port)
        held = [await open_tunnel(node, NEWS_UID, destination) for _ in range(2)]  # both tokens
        tunnels = [t for t in held if isinstance(t, Tunnel)]
        try:
            assert len(tunnels) == 2, held
            over = await attempt(node, "http", NEWS_UID, destination)
            assert over.body.startswith("too_many_connections: "), over  # the slot comes first
        finally:
            for tunnel in tunnels:
                await tunnel.close()
        deadline = time.monotonic() + 5.0  # until the proxy has seen both closes
        while over.body.startswith("too_many_connections: ") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            over = await attempt(node, "http", NEWS_UID, destination)
        refused = [over] + [
            await attempt(node, ("socks5", "http")[i % 2], NEWS_UID, destination) for i in range(6)
        ]
        assert not any(a.admitted for a in refused), refused
        assert_refused_as(refused, "rate_limited")


# --- max_concurrent across nodes ----------------------------------------------------------------
GLOBAL_TTL_S = 2.0  # [ratelimit].tunnel_ttl: how soon a dead node's tunnels stop counting


def test_max_concurrent_across_nodes_holds_and_a_dead_node_leaks_nothing(tmp_path: Path) -> None:
    """concurrency = "global": one cap over both nodes' tunnels. A node killed with tunnels
    open stops counting once its counts expire (tunnel_ttl); nothing is leaked for good."""
    with RedisServer(tmp_path / "redis") as server:
        apps = [app("blog", APP_UID, "127.0.0.1:*", max_concurrent=CAP)]
        ratelimit = {"concurrency": "global", "tunnel_ttl": GLOBAL_TTL_S}
        configs = [
            node_config(tmp_path, name, server.url, apps, ratelimit=ratelimit)
            for name in ("a", "b")
        ]
        with running_nodes(*configs) as (a, b):
            run("asyncio", across_nodes(a, b), timeout=60)
            assert b.alive()  # (a was killed on purpose)


async def across_nodes(a: Node, b: Node) -> None:
    async with Upstream() as upstream:
        destination = ("127.0.0.1", upstream.port)
        on_a = [await open_tunnel(a, APP_UID, destination) for _ in range(2)]
        on_b = [await open_tunnel(b, APP_UID, destination)]
        held = [t for t in (*on_a, *on_b) if isinstance(t, Tunnel)]
        try:
            assert len(held) == CAP, (on_a, on_b)
            # Either node is full now: the cap counts both.
            over = [
                await attempt(b, "socks5", APP_UID, destination),
                await attempt(a, "http", APP_UID, destination),
            ]
            assert [o.code for o in over] == [SOCKS5_NOT_ALLOWED, 429], over
            assert "3 tunnels open across nodes; max_concurrent is 3" in over[1].body

            # A close on A frees a slot that B can take.
            first = on_a[0]
            assert isinstance(first, Tunnel)
            await first.close()
            held.remove(first)
            reopened = await eventually_open(b, destination)
            held.append(reopened)
            assert (await attempt(a, "socks5", APP_UID, destination)).code == SOCKS5_NOT_ALLOWED
        finally:
            for tunnel in held:
                await tunnel.close()
        # Everything closed: the whole cap is free again, on one node.
        fresh = [await eventually_open(a, destination) for _ in range(CAP)]
        try:
            # A dies holding all three: B is refused until A's counts expire, then admitted.
            a.process.proc.kill()
            a.process.proc.wait(timeout=10)
            assert (await attempt(b, "socks5", APP_UID, destination)).code == SOCKS5_NOT_ALLOWED
            killed_at = time.monotonic()
            back = await eventually_open(b, destination, within=GLOBAL_TTL_S + 5.0)
            waited = time.monotonic() - killed_at
            await back.close()
            assert waited < GLOBAL_TTL_S + 5.0
        finally:
            for tunnel in fresh:
                await tunnel.close()


async def eventually_open(
    node: Node, destination: tuple[str, int], *, within: float = 5.0
) -> Tunnel:
    """A tunnel, retried while the node still refuses it (a close takes a moment to count)."""
    deadline = time.monotonic() + within
    while True:
        tunnel = await open_tunnel(node, APP_UID, destination)
        if isinstance(tunnel, Tunnel):
            return tunnel
        if time.monotonic() > deadline:
            raise AssertionError(f"still refused after {within} s: {tunnel}")
        await asyncio.sleep(0.1)
