"""The sandbox shim's own behaviour: real apps (child interpreters under test uids, with the shim
installed at start) talking through the real proxy to real upstreams on loopback.

One proxy serves the whole module: it runs in-process on an event loop in a thread of its own
(with its upstreams), so the tests stay synchronous while the apps they start block. Every app
prints one JSON object describing what it saw (bytes echoed, exceptions with their class and
message); the test asserts on it and on the proxy's connection log. Names are resolved by a
real DNS stub the proxy is pointed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dnslib import RCODE, DNSRecord

from egress.net.connection import ListenerKind
from egress.server import BoundListener
from tests.configs import base_config
from tests.dnsstub import DnsStub
from tests.netns import NetworkNamespace
from tests.polling import eventually
from tests.privilege import require
from tests.processes import REPO, egress_command, run_egress
from tests.sandboxing import (
    SYSTEM_PYTHON,
    app_python,
    run_app,
    shim_dir,
    shim_environment,
    world_readable_dir,
)
from tests.support import (
    EchoUpstream,
    ProxyHandle,
    loop_factory,
    read_connection_log,
    running_proxy,
)

pytestmark = pytest.mark.root

T = TypeVar("T")

SHIM_UID = 10201  # app "shim" (uids 10201-10220)
CLI_UID = 10202
HOOK_UID = 10203
NETNS_UID = 10204
LIMITED_UID = 10221  # app "limited": one connection a second, burst 1
STRANGER_UID = 10230  # belongs to no app
GREETING = b"hello from upstream\n"  # sent by the upstream at accept, before the app says a word
APP_LOOPS = ("asyncio", "uvloop")


# --- the node: proxy, upstreams and DNS on a loop in a thread ------------------------------------
@dataclass
class Node:
    proxy: ProxyHandle
    loop: asyncio.AbstractEventLoop
    echo: EchoUpstream  # 127.0.0.1
    echo6: EchoUpstream  # ::1
    dns: DnsStub
    slow_port: int  # a listener whose accept queue is full: the proxy's SYNs are dropped
    refused_port: int  # bound, not listening: the kernel answers RST

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def socks(self, family: int = socket.AF_INET) -> tuple[str, int]:
        """The proxy's SOCKS5 listener on 127.0.0.1 (or on ::1)."""
        for listener in self.proxy.runtime.listeners.bound:
            if listener.kind is ListenerKind.SOCKS5 and _family(listener) == family:
                host, _, port = listener.address.rpartition(":")
                return host.strip("[]"), int(port)
        raise LookupError(family)

    def mark(self) -> int:
        """How many records the connection log holds, once every connection so far has ended."""
        return len(self.settled())

    def records_since(self, mark: int) -> list[dict[str, Any]]:
        """The records written after :meth:`mark` returned ``mark``, once all are written."""
        return self.settled()[mark:]

    def settled(self) -> list[dict[str, Any]]:
        """The whole connection log once the proxy holds no connection and has written every
        line (an app has exited by the time this is asked, but the proxy may not have seen it)."""
        proxy = self.proxy

        def quiet() -> tuple[list[dict[str, Any]]] | None:
            if proxy.connections():
                return None
            connlog = proxy.runtime.connlog
            connlog.flush()
            if connlog.statistics().bytes_pending:
                return None
            return (read_connection_log(proxy.log_path),)

        async def wait() -> tuple[list[dict[str, Any]]]:
            found = await eventually(quiet, "the proxy's connections ended and were logged")
            assert found is not None
            return found

        return self.call(wait())[0]

    def ports(self) -> dict[str, int]:
        return {
            "echo": self.echo.port,
            "echo6": self.echo6.port,
            "slow": self.slow_port,
            "refused": self.refused_port,
        }


def _family(listener: BoundListener) -> int:
    return socket.AF_INET6 if listener.address.startswith("[") else socket.AF_INET


def node_config(node_ports: Mapping[str, int], dns_port: int) -> dict[str, Any]:
    echo, echo6 = node_ports["echo"], node_ports["echo6"]
    allow = [
        f"127.0.0.1:{echo}",
        f"[::1]:{echo6}",
        f"echo.test:{echo}",
        f"names.test:{echo}",
        f"nx.test:{echo}",  # allowed, but the DNS stub does not know it
        f"127.0.0.1:{node_ports['refused']}",
        f"127.0.0.1:{node_ports['slow']}",
        "169.254.169.254:80",  # a rule, but the address stays special (not opened)
    ]
    return base_config(
        proxy={"socks5_listen": ["127.0.0.1:0", "[::1]:0"], "connect_timeout": 1.5},
        resolver={"nameservers": [f"127.0.0.1:{dns_port}"]},
        security={"allow_special": ["127.0.0.0/8", "::1/128"]},
        app=[
            {"name": "shim", "uids": ["10201-10220"], "allow": allow},
            {
                "name": "limited",
                "uids": [str(LIMITED_UID)],
                "allow": [f"127.0.0.1:{echo}"],
                "limits": {"connections_per_second": 1, "burst": 1},
            },
        ],
    )


@contextlib.contextmanager
def full_listener() -> Iterator[socket.socket]:
    """A listener nobody accepts on, its queue (backlog 0) filled by one connection: the kernel
    drops every further SYN, so a dial to it hangs until the dialler gives up."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.settimeout(5)
        filler.connect(listener.getsockname())
        yield listener
    finally:
        filler.close()
        listener.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The node every test of the module shares: starting one per test would cost more than
    the tests. Its app "limited" is used by one test only, so no test sees another's tokens."""
    tmp_path = tmp_path_factory.mktemp("shim-node")
    ready: list[Node] = []
    failed: list[BaseException] = []
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def serve(slow: int, refused: int) -> None:
        stop.append(asyncio.Event())
        with DnsStub({"echo.test": ["127.0.0.1"], "names.test": ["127.0.0.1"]}) as dns:
            async with (
                EchoUpstream(greeting=GREETING) as echo,
                EchoUpstream("::1", greeting=GREETING) as echo6,
            ):
                ports = {"echo": echo.port, "echo6": echo6.port, "slow": slow, "refused": refused}
                async with running_proxy(node_config(ports, dns.port), tmp_path) as proxy:
                    loop = asyncio.get_running_loop()
                    ready.append(Node(proxy, loop, echo, echo6, dns, slow, refused))
                    started.set()
                    await stop[0].wait()

    def thread_main(slow: int, refused: int) -> None:
        try:
            with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
                runner.run(serve(slow, refused))
        except BaseException as exc:
            failed.append(exc)
        finally:
            started.set()

    with full_listener() as slow, socket.socket() as refused:
        refused.bind(("127.0.0.1", 0))
        ports = (slow.getsockname()[1], refused.getsockname()[1])
        thread = threading.Thread(target=thread_main, args=ports, name="shim-node")
        thread.start()
        try:
            started.wait(30)
            assert ready, f"the proxy did not start: {failed}"
            yield ready[0]
        finally:
            if ready:
                ready[0].loop.call_soon_threadsafe(stop[0].set)
            thread.join(30)
            assert not thread.is_alive(), "the proxy's thread did not stop"
        assert not failed, failed


# --- apps ----------------------------------------------------------------------------------
# Every app script starts with this: ``attempt`` describes how a call ended, as JSON.
PRELUDE = """
import asyncio, errno, json, os, socket, sys, time
ARGS = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
PORTS = ARGS.get("ports", {})

def describe(exc):
    return {"error": type(exc).__name__, "errno": exc.errno if isinstance(exc, OSError) else None,
            "message": exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc),
            "permission": isinstance(exc, PermissionError),
            "retry_after": getattr(exc, "retry_after", None)}

def attempt(fn, *args):
    try:
        return {"ok": fn(*args)}
    except Exception as exc:
        return describe(exc)

async def attempt_async(coro):
    try:
        return {"ok": await coro}
    except Exception as exc:
        return describe(exc)

def echo_over(sock, payload=b"ping"):
    "The upstream's greeting, then the payload echoed: proof the bytes went through."
    f = sock.makefile("rb")
    greeting = f.readline()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    f.close()
    return greeting.decode() + got.decode()

def done(result):
    print(json.dumps(result))
"""


def describe_run(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def result_of(result: subprocess.CompletedProcess[str], *, exit_code: int = 0) -> Any:
    assert result.returncode == exit_code, describe_run(result)
    lines = result.stdout.strip().splitlines()
    assert lines, describe_run(result)
    return json.loads(lines[-1])


def run_as(
    uid: int,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    netns: NetworkNamespace | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``uid`` (no supplementary groups), for what ``run_app`` does not do: another
    interpreter (the hook's venv), no shim at all, a network namespace."""
    require("root", f"an app under uid {uid}")
    options: dict[str, Any] = {
        "user": uid,
        "group": uid,
        "extra_groups": [],
        "cwd": "/",
        "env": dict(env),
        "capture_output": True,
        "text": True,
        "timeout": timeout,
        "check": False,
    }
    if netns is not None:
        return netns.run(list(argv), **options)
    return subprocess.run(list(argv), **options)


@contextlib.contextmanager
def script(code: str) -> Iterator[str]:
    """``PRELUDE + code`` in a world-readable file, removed afterwards."""
    workdir = world_readable_dir()
    try:
        path = workdir / "app.py"
        path.write_text(PRELUDE + code)
        path.chmod(0o644)
        yield str(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def app(
    node: Node,
    code: str,
    *,
    uid: int = SHIM_UID,
    proxy: tuple[str, int] | None = None,
    listen: str | None = None,
    env: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    exit_code: int = 0,
) -> Any:
    """Run ``code`` as an app under the shim (installed by ``sitecustomize``, as ``egress
    sandbox`` installs it) and return the JSON it printed last."""
    argument = json.dumps({"ports": node.ports(), **(args or {})})
    result = run_app(
        PRELUDE + code,
        uid=uid,
        proxy=proxy or node.socks(),
        args=[argument],
        listen=listen,
        env=env,
        timeout=30.0,
    )
    return result_of(result, exit_code=exit_code)


def echoed(text: str = "ping") -> dict[str, str]:
    return {"ok": GREETING.decode() + text}


# --- 1. the two ways in ------------------------------------------------------------------------
CLI_APP = """
s = socket.create_connection(("127.0.0.1", PORTS["echo"]))
done({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
      "echo": attempt(echo_over, s),
      "patched": socket.socket.connect.__module__, "proxy": os.environ.get("EGRESS_SANDBOX_PROXY"),
      "listen": os.environ.get("EGRESS_SANDBOX_LISTEN")})
sys.stdout.flush()
os._exit(7)  # the exit status is the program's own: egress sandbox exec'd it
"""


def test_egress_sandbox_cli_runs_the_program_under_the_shim(node: Node) -> None:
    """``egress sandbox --proxy H:P -- CMD`` (as an operator runs it: root, dropping to the app's
    uid with setpriv) puts the checkout's own shim in front of the program and execs it."""
    boot = REPO / "egress" / "sandbox" / "boot" / "sitecustomize.py"
    readable = run_as(CLI_UID, [app_python(), "-c", f"open({str(boot)!r}).close()"], {})
    assert readable.returncode == 0, (
        f"the checkout is not readable by uid {CLI_UID}, so `egress sandbox` from it would run"
        f" the program without the shim: {readable.stderr}"
    )
    before = node.mark()
    host, port = node.socks()
    with script(CLI_APP) as path:
        command = egress_command(
            "sandbox", "--proxy", f"{host}:{port}", "--listen", "loopback", "--",
            "setpriv", "--reuid", str(CLI_UID), "--regid", str(CLI_UID), "--clear-groups",
            app_python(), path, json.dumps({"ports": node.ports()}),
        )  # fmt: skip
        environment = {"PATH": os.environ["PATH"], "HOME": "/", "LANG": "C.UTF-8"}
        result = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=60, check=False
        )
    seen = result_of(result, exit_code=7)
    assert seen["echo"] == echoed()
    assert (seen["uid"], seen["gid"], seen["groups"]) == (CLI_UID, CLI_UID, [])
    assert seen["patched"] == "egress_sandbox.patch"
    assert (seen["proxy"], seen["listen"]) == (f"{host}:{port}", "loopback")
    (record,) = node.records_since(before)
    assert (record["app"], record["uid"], record["decision"]) == ("shim", CLI_UID, "allowed")


def test_egress_sandbox_cli_refuses_a_bad_proxy_before_starting_the_program() -> None:
    result = run_egress("sandbox", "--proxy", "10.0.0.1:1080", "--", "/bin/echo", "started")
    assert result.returncode != 0
    assert "started" not in result.stdout
    assert "EGRESS_SANDBOX_PROXY='10.0.0.1:1080'" in result.stderr
    assert "loopback" in result.stderr


HOOK_APP = """
import egress_sandbox
s = socket.create_connection(("echo.test", PORTS["echo"]))
done({"echo": attempt(echo_over, s), "peer": s.getpeername(),
      "synthetic": socket.gethostbyname("echo.test"),
      "patched": socket.socket.connect.__module__, "installed": egress_sandbox.installed(),
      "denied": attempt(socket.create_connection, ("127.0.0.1", 1)),
      "foreign": [m for m in sys.modules if m.split(".")[0] in ("egress", "rules", "ratelimit")],
      "prefix": sys.prefix})
"""


def test_install_hook_puts_the_shim_in_every_interpreter_of_a_venv(node: Node) -> None:
    """``egress sandbox --install-hook SITE`` into a fresh venv's site-packages: its interpreter
    starts with the shim with nothing but EGRESS_SANDBOX_PROXY set (no PYTHONPATH)."""
    venv = Path(tempfile.mkdtemp(prefix="egress-hookenv-"))
    try:
        base = SYSTEM_PYTHON if Path(SYSTEM_PYTHON).exists() else sys.executable
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        python = str(venv / "bin" / "python")
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True, timeout=30)
        # under a strict umask: what it installs must still be readable by every app uid
        installed = subprocess.run(
            ["sh", "-c", 'umask 077 && exec "$@"', "sh",
             *egress_command("sandbox", "--install-hook", site)],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        assert (Path(site) / "egress_sandbox.pth").read_text() == "import egress_sandbox.auto\n"
        assert not (Path(site) / "egress_sandbox" / "boot").exists()
        host, port = node.socks()
        environment = {"PATH": "/usr/bin:/bin", "EGRESS_SANDBOX_PROXY": f"{host}:{port}"}
        with script(HOOK_APP) as path:
            result = run_as(
                HOOK_UID, [python, path, json.dumps({"ports": node.ports()})], env=environment
            )
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    seen = result_of(result)
    assert seen["prefix"] == str(venv)
    assert seen["installed"] is True and seen["patched"] == "egress_sandbox.patch"
    assert seen["echo"] == echoed()
    assert seen["peer"] == [seen["synthetic"], node.echo.port]
    assert seen["denied"]["error"] == "EgressDenied"
    assert seen["foreign"] == []


CLOSED_APP = """
results = {
    "v4": attempt(socket.create_connection, ("127.0.0.1", PORTS["echo"])),
    "name": attempt(socket.create_connection, ("echo.test", PORTS["echo"])),
    "proxy_itself": attempt(socket.create_connection, tuple(ARGS["proxy"])),
    "ex": attempt(lambda: socket.socket().connect_ex(("127.0.0.1", PORTS["echo"]))),
    "asyncio": asyncio.run(attempt_async(asyncio.open_connection("127.0.0.1", PORTS["echo"]))),
    "udp": attempt(socket.socket, socket.AF_INET, socket.SOCK_DGRAM),
    "resolves": attempt(socket.gethostbyname, "echo.test"),
}
done(results)
"""


@pytest.mark.parametrize(
    ("setting", "value", "variable"),
    [
        ("EGRESS_SANDBOX_PROXY", "", "EGRESS_SANDBOX_PROXY"),
        ("EGRESS_SANDBOX_PROXY", "10.0.0.1:1080", "EGRESS_SANDBOX_PROXY"),
        ("EGRESS_SANDBOX_PROXY", "localhost:1080", "EGRESS_SANDBOX_PROXY"),
        ("EGRESS_SANDBOX_PROXY", "127.0.0.1:0", "EGRESS_SANDBOX_PROXY"),
        ("EGRESS_SANDBOX_LISTEN", "everything", "EGRESS_SANDBOX_LISTEN"),
        ("EGRESS_SANDBOX_TIMEOUT", "soon", "EGRESS_SANDBOX_TIMEOUT"),
    ],
    ids=[
        "proxy-missing",
        "proxy-not-loopback",
        "proxy-a-name",
        "proxy-port-0",
        "listen",
        "timeout",
    ],
)
def test_bad_settings_install_the_shim_closed(
    node: Node, setting: str, value: str, variable: str
) -> None:
    """Nothing gets out, the app's error names the variable to fix, and nothing reaches the
    proxy or the upstream (the next record in the proxy's log is a later probe of the test's)."""
    before, accepted = node.mark(), node.echo.accepted
    proxy = node.socks()
    result = None
    environment = shim_environment(proxy, extra={setting: value})
    with script(CLOSED_APP) as path:
        argument = json.dumps({"ports": node.ports(), "proxy": proxy})
        result = run_as(SHIM_UID, [app_python(), path, argument], environment)
    seen = result_of(result)
    assert f"egress sandbox: {variable}" in result.stderr
    assert "outbound connections are refused" in result.stderr
    for key in ("v4", "name", "proxy_itself", "ex", "asyncio"):
        outcome = seen[key]
        if key == "ex":
            assert outcome == {"ok": errno.EACCES}, outcome
            continue
        assert outcome["error"] == "PermissionError" and outcome["errno"] == errno.EACCES, key
        assert outcome["message"].startswith("egress: outbound connections are closed: "), key
        assert variable in outcome["message"], outcome
    assert seen["udp"]["permission"] is True
    assert seen["resolves"]["ok"].startswith("240.")  # names still answer, without DNS
    with socket.create_connection(proxy, timeout=5) as probe:  # root: in no app
        assert probe.recv(2) == b"\x05\xff"
    (record,) = node.records_since(before)
    assert (record["uid"], record["reason"]) == (0, "unknown_client")
    assert node.echo.accepted == accepted


IMAGE_SITECUSTOMIZE = """
import os, socket
os.environ["IMAGE_SITECUSTOMIZE"] = socket.socket.connect.__module__
"""

IMAGE_APP = """
s = socket.create_connection(("127.0.0.1", PORTS["echo"]))
done({"theirs": os.environ.get("IMAGE_SITECUSTOMIZE"), "echo": attempt(echo_over, s),
      "module": sys.modules["sitecustomize"].__file__,
      "boot_on_path": [p for p in sys.path if p.rstrip("/").endswith("boot")]})
"""


def test_an_images_own_sitecustomize_still_runs_after_the_shim(node: Node) -> None:
    image = world_readable_dir()
    try:
        (image / "sitecustomize.py").write_text(IMAGE_SITECUSTOMIZE)
        (image / "sitecustomize.py").chmod(0o644)
        pythonpath = f"{shim_dir() / 'boot'}{os.pathsep}{image}"
        seen = app(node, IMAGE_APP, env={"PYTHONPATH": pythonpath})
    finally:
        shutil.rmtree(image, ignore_errors=True)
    assert seen["theirs"] == "egress_sandbox.patch"  # it ran, and after the shim was in
    assert seen["module"] == str(image / "sitecustomize.py")
    assert seen["echo"] == echoed()
    assert seen["boot_on_path"] == []


SHADOW_APP = """
s = socket.create_connection(("127.0.0.1", PORTS["echo"]))
done({"patched": socket.socket.connect.__module__, "echo": attempt(echo_over, s),
      "denied": attempt(socket.create_connection, ("no-rule.example", 443))})
"""


def test_an_app_module_named_like_the_stdlib_does_not_keep_the_shim_out(node: Node) -> None:
    """The shim loads with only the standard library on sys.path: an ``ipaddress.py`` of the
    app's own, first on PYTHONPATH, neither breaks it nor leaves the app unpatched."""
    image = world_readable_dir()
    try:
        (image / "ipaddress.py").write_text("raise ImportError('the app shadows ipaddress')\n")
        (image / "ipaddress.py").chmod(0o644)
        pythonpath = f"{image}{os.pathsep}{shim_dir() / 'boot'}"
        seen = app(node, SHADOW_APP, env={"PYTHONPATH": pythonpath})
    finally:
        shutil.rmtree(image, ignore_errors=True)
    assert seen["patched"] == "egress_sandbox.patch"
    assert seen["echo"] == echoed()
    assert seen["denied"]["error"] == "EgressDenied"


BROKEN_APP = """
left, right = socket.socketpair()  # AF_UNIX is not the shim's
left.sendall(b"x")
done({"unix": right.recv(1).decode(),
      "tcp": attempt(socket.create_connection, ("127.0.0.1", PORTS["echo"])),
      "ex": socket.socket().connect_ex(("127.0.0.1", PORTS["echo"]))})
"""


def test_a_shim_that_fails_to_start_closes_outbound_connections(node: Node) -> None:
    """Whatever breaks while the shim starts (here: one of its modules raises on import),
    TCP connects are refused, not left unpatched; the app still starts."""
    broken = world_readable_dir()
    before = node.mark()
    try:
        shutil.copytree(shim_dir(), broken / "sandbox")
        (broken / "sandbox" / "aio.py").write_text("raise ImportError('simulated breakage')\n")
        subprocess.run(["chmod", "-R", "a+rX", str(broken)], check=True, timeout=30)
        seen = app(node, BROKEN_APP, env={"PYTHONPATH": str(broken / "sandbox" / "boot")})
    finally:
        shutil.rmtree(broken, ignore_errors=True)
    assert seen["unix"] == "x"
    assert seen["tcp"]["error"] == "PermissionError"
    assert (
        "sandbox shim failed to start (ImportError: simulated breakage)" in seen["tcp"]["message"]
    )
    assert seen["ex"] == errno.EACCES
    assert node.records_since(before) == []  # nothing reached the proxy


# --- 2. connect modes ------------------------------------------------------------------------
SYNC_APP = """
import selectors, threading
ECHO = ("127.0.0.1", PORTS["echo"])
out = {}

s = socket.socket()
s.connect(ECHO)
out["blocking"] = attempt(echo_over, s)
out["blocking_peer"] = s.getpeername()
s.close()

s = socket.socket()
s.settimeout(5.0)
s.connect(ECHO)
out["timeout"] = attempt(echo_over, s)
out["timeout_kept"] = s.gettimeout()
s.close()

s = socket.socket()
s.settimeout(0.3)  # its own timeout bounds the handshake too, as it would bound a real connect
start = time.monotonic()
out["timeout_slow"] = attempt(s.connect, ("127.0.0.1", PORTS["slow"]))
out["timeout_slow_elapsed"] = time.monotonic() - start
out["timeout_slow_kept"] = s.gettimeout()
s.close()

s = socket.socket()
s.setblocking(False)
out["nonblocking_rc"] = s.connect_ex(ECHO)
out["nonblocking_so_error"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
out["nonblocking_kept"] = s.gettimeout()
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ)
data = b""
deadline = time.monotonic() + 10
while not data.endswith(b"\\n") and time.monotonic() < deadline:
    if sel.select(1):
        data += s.recv(100)
s.sendall(b"sel")
sel.modify(s, selectors.EVENT_READ)
echo = b""
while len(echo) < 3 and time.monotonic() < deadline:
    if sel.select(1):
        echo += s.recv(3)
out["nonblocking"] = (data + echo).decode()
s.close()

s = socket.socket()
s.setblocking(False)
out["refused_rc"] = s.connect_ex(("127.0.0.1", PORTS["refused"]))
out["refused_so_error"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
out["refused_so_error_again"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
s.close()
s = socket.socket()
s.setblocking(False)
out["refused_connect"] = attempt(s.connect, ("127.0.0.1", PORTS["refused"]))
s.close()

threads_out = {}
def worker(i):
    c = socket.create_connection(ECHO, timeout=10)
    threads_out[i] = echo_over(c, f"thread-{i}".encode())
    c.close()
start = time.monotonic()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join(20)
out["threads"] = [threads_out.get(i) for i in range(8)]

c = socket.create_connection(ECHO)
out["create_connection"] = attempt(echo_over, c)
c.close()
c = socket.create_connection(("echo.test", PORTS["echo"]), timeout=5)
out["create_connection_name"] = attempt(echo_over, c)
out["name_peer"] = c.getpeername()
out["name_synthetic"] = socket.gethostbyname("echo.test")
c.close()
s = socket.socket()
s.connect(("Echo.Test.", PORTS["echo"]))  # a name straight to connect(), as the kernel never takes
out["connect_name_peer"] = s.getpeername()
s.close()

s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.connect(ECHO)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
out["options"] = [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                  s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)]
f = s.makefile("rwb")
out["makefile_greeting"] = f.readline().decode()
import tempfile
with tempfile.TemporaryFile() as payload:
    payload.write(b"x" * 100000)
    payload.seek(0)
    out["sendfile_sent"] = s.sendfile(payload)
got = b""
while len(got) < 100000:
    chunk = f.read1(65536)
    if not chunk: break
    got += chunk
out["sendfile_echoed"] = len(got) if got == b"x" * 100000 else repr(got[:50])
f.close()
s.close()
out["closed_peer"] = attempt(s.getpeername)
done(out)
"""


def test_sync_connect_modes(node: Node) -> None:
    """Blocking, with a timeout, non-blocking with selectors (the handshake is done before
    ``connect_ex`` returns), from 8 threads at once, through ``create_connection``; the socket
    stays the app's own: getpeername, options, makefile and sendfile work as without the shim."""
    before = node.mark()
    seen = app(node, SYNC_APP)
    echo = node.echo.port
    assert seen["blocking"] == echoed() and seen["blocking_peer"] == ["127.0.0.1", echo]
    assert seen["timeout"] == echoed() and seen["timeout_kept"] == 5.0
    assert seen["timeout_slow"]["error"] == "TimeoutError", seen["timeout_slow"]
    assert 0.25 < seen["timeout_slow_elapsed"] < 1.0 and seen["timeout_slow_kept"] == 0.3
    assert (seen["nonblocking_rc"], seen["nonblocking_so_error"]) == (0, 0)
    assert seen["nonblocking_kept"] == 0.0
    assert seen["nonblocking"] == GREETING.decode() + "sel"
    assert seen["refused_rc"] == errno.ECONNREFUSED
    assert seen["refused_so_error"] == errno.ECONNREFUSED
    assert seen["refused_so_error_again"] == 0  # read once, as the kernel's pending error is
    assert seen["refused_connect"]["error"] == "ConnectionRefusedError"
    assert seen["threads"] == [GREETING.decode() + f"thread-{i}" for i in range(8)]
    assert seen["create_connection"] == echoed()
    assert seen["create_connection_name"] == echoed()
    synthetic = seen["name_synthetic"]
    assert synthetic.startswith("240.") and seen["name_peer"] == [synthetic, echo]
    assert seen["connect_name_peer"] == [synthetic, echo]
    assert seen["options"] == [1, 1]
    assert seen["makefile_greeting"] == GREETING.decode()
    assert seen["sendfile_sent"] == 100000 and seen["sendfile_echoed"] == 100000
    assert seen["closed_peer"]["error"] == "OSError" and seen["closed_peer"]["errno"] == errno.EBADF
    records = node.records_since(before)
    assert {(r["app"], r["uid"]) for r in records} == {("shim", SHIM_UID)}
    by_dest = sorted((r["dest"], r["reason"]) for r in records)
    refused = f"127.0.0.1:{node.refused_port}"
    assert by_dest.count((refused, "connect_refused")) == 2
    # The app gave up at its own 0.3 s; its close is a half-close, which the proxy keeps (it is
    # not reading while it dials), so its dial runs on to connect_timeout.
    assert by_dest.count((f"127.0.0.1:{node.slow_port}", "connect_timeout")) == 1
    assert by_dest.count((f"echo.test:{echo}", "allowed")) == 2  # the name reached the proxy
    assert by_dest.count((f"127.0.0.1:{echo}", "allowed")) == 13
    assert len(records) == 18


V6_APP = """
out = {}
s = socket.create_connection(("::1", PORTS["echo6"]), timeout=5)
out["echo"] = attempt(echo_over, s)
out["peer"] = s.getpeername()
s.close()
s = socket.socket(socket.AF_INET6)
s.connect(("echo.test", PORTS["echo"]))
out["name_peer"] = s.getpeername()
out["name_synthetic"] = socket.getaddrinfo("echo.test", PORTS["echo"], socket.AF_INET6)[0][4]
out["name_echo"] = attempt(echo_over, s)
s.close()
out["v4_socket"] = attempt(lambda: socket.create_connection(("127.0.0.1", PORTS["echo"])).close())
done(out)
"""


@pytest.mark.parametrize("proxy_family", [socket.AF_INET, socket.AF_INET6], ids=["proxy-v4", "v6"])
def test_ipv6_destinations(node: Node, proxy_family: int) -> None:
    """An IPv6 socket reaches [::1] (and a name, at its synthetic 100::/64 address) through the
    proxy's 127.0.0.1 listener (IPv4-mapped) or its [::1] listener; getpeername says where."""
    before = node.mark()
    proxy = node.socks(proxy_family)
    seen = app(node, V6_APP, proxy=proxy)
    assert seen["echo"] == echoed()
    assert seen["peer"] == ["::1", node.echo6.port, 0, 0]
    synthetic = seen["name_synthetic"]
    assert synthetic[0].startswith("100::") and seen["name_peer"] == synthetic
    assert seen["name_echo"] == echoed()
    if proxy_family == socket.AF_INET:
        assert seen["v4_socket"] == {"ok": None}
    else:  # an IPv4 socket cannot reach a proxy on ::1: refused, saying why
        assert seen["v4_socket"]["errno"] in (errno.EACCES, errno.ECONNREFUSED)
        assert "IPv4 sockets need the proxy's 127.0.0.1 listener" in seen["v4_socket"]["message"]
    expected = 3 if proxy_family == socket.AF_INET else 2
    records = node.records_since(before)
    assert len(records) == expected
    assert {(r["app"], r["uid"], r["decision"]) for r in records} == {("shim", SHIM_UID, "allowed")}
    assert f"[::1]:{node.echo6.port}" in [r["dest"] for r in records]


ASYNC_APP = """
ECHO = PORTS["echo"]

async def exchange(reader, writer, text):
    greeting = await reader.readline()
    writer.write(text.encode())
    await writer.drain()
    got = await reader.readexactly(len(text))
    return greeting.decode() + got.decode()

async def through(host, port, **kw):
    reader, writer = await asyncio.open_connection(host, port, **kw)
    try:
        return {"echo": await exchange(reader, writer, "aio"),
                "peername": writer.get_extra_info("peername"),
                "socket_peer": writer.get_extra_info("socket").getpeername()}
    finally:
        writer.close()

async def by_sock_connect(host, port):
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, (host, port))
    greeting = await loop.sock_recv(s, 100)
    await loop.sock_sendall(s, b"raw")
    echo = await loop.sock_recv(s, 3)
    peer = s.getpeername()
    s.close()
    return {"echo": (greeting + echo).decode(), "peer": peer}

async def main():
    out = {"loop": type(asyncio.get_running_loop()).__module__}
    out["ip"] = await attempt_async(through("127.0.0.1", ECHO))
    out["name"] = await attempt_async(through("echo.test", ECHO))
    out["sock_connect"] = await attempt_async(by_sock_connect("127.0.0.1", ECHO))
    out["sock_connect_name"] = await attempt_async(by_sock_connect("echo.test", ECHO))
    if ARGS["loop"] == "asyncio":  # uvloop has no happy_eyeballs_delay, with or without the shim
        eyeballs = through("echo.test", ECHO, happy_eyeballs_delay=0.1)
        out["happy_eyeballs"] = await attempt_async(eyeballs)
    loop = asyncio.get_running_loop()
    out["getaddrinfo"] = await loop.getaddrinfo("echo.test", ECHO, type=socket.SOCK_STREAM)
    out["refused"] = await attempt_async(asyncio.open_connection("127.0.0.1", PORTS["refused"]))
    out["denied"] = await attempt_async(asyncio.open_connection("127.0.0.1", 1))
    out["gathered"] = await asyncio.gather(*(through("127.0.0.1", ECHO) for _ in range(8)))
    return out

if ARGS["loop"] == "uvloop":
    import uvloop
    done(uvloop.run(main()))
else:
    done(asyncio.run(main()))
"""


@pytest.mark.parametrize("app_loop", APP_LOOPS)
def test_asyncio_connect_modes(node: Node, app_loop: str) -> None:
    """open_connection (address, name, happy eyeballs on asyncio), loop.sock_connect and eight
    connections at once, on asyncio's default loop and on uvloop; refusals raise from the
    connect with the app's exception classes."""
    seen = app(node, ASYNC_APP, args={"loop": app_loop})
    echo = node.echo.port
    aio = GREETING.decode() + "aio"
    assert seen["loop"] == ("uvloop" if app_loop == "uvloop" else "asyncio.unix_events")
    assert seen["ip"]["ok"]["echo"] == aio
    assert seen["ip"]["ok"]["socket_peer"] == ["127.0.0.1", echo]
    assert seen["name"]["ok"]["echo"] == aio
    synthetic = seen["getaddrinfo"][0][4]
    assert synthetic[0].startswith("240.") and seen["name"]["ok"]["socket_peer"] == synthetic
    assert seen["sock_connect"] == {
        "ok": {"echo": GREETING.decode() + "raw", "peer": ["127.0.0.1", echo]}
    }
    assert seen["sock_connect_name"]["ok"]["echo"] == GREETING.decode() + "raw"
    assert seen["sock_connect_name"]["ok"]["peer"] == synthetic
    if app_loop == "asyncio":
        assert seen["happy_eyeballs"]["ok"]["echo"] == aio
        assert seen["happy_eyeballs"]["ok"]["peername"] == synthetic
    assert seen["refused"]["error"] == "ConnectionRefusedError"
    assert seen["refused"]["errno"] == errno.ECONNREFUSED
    assert seen["denied"]["error"] == "EgressDenied"
    assert seen["denied"]["message"] == (
        'egress: app "shim" may not connect to 127.0.0.1:1 (no rule matches)'
    )
    assert [g["echo"] for g in seen["gathered"]] == [aio] * 8


PEERNAME_APP = """
async def main():
    reader, writer = await asyncio.open_connection("127.0.0.1", PORTS["echo"])
    await reader.readline()
    peer = writer.get_extra_info("peername")
    writer.close()
    return peer
if ARGS["loop"] == "uvloop":
    import uvloop
    done(uvloop.run(main()))
else:
    done(asyncio.run(main()))
"""


V4_SOCKET_APP = """
done(attempt(lambda: socket.create_connection(("127.0.0.1", PORTS["echo"]), timeout=5).close()))
"""


def test_an_ipv4_socket_with_a_proxy_on_ipv6_is_refused_as_a_setting(node: Node) -> None:
    seen = app(node, V4_SOCKET_APP, proxy=node.socks(socket.AF_INET6))
    assert (seen["error"], seen["errno"]) == ("PermissionError", errno.EACCES), seen
    assert "is `egress proxy` running" not in seen["message"]


@pytest.mark.parametrize(
    "app_loop",
    [
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.xfail(
                strict=True,
                reason="uvloop's transport asks libuv for the peer: it reports the proxy's address",
            ),
        ),
    ],
)
def test_the_transports_peername_is_the_destination(node: Node, app_loop: str) -> None:
    seen = app(node, PEERNAME_APP, args={"loop": app_loop})
    assert seen == ["127.0.0.1", node.echo.port]


# --- 3. names ----------------------------------------------------------------------------------
NAMES_APP = """
from socket import AF_INET6, AI_NUMERICHOST, NI_NUMERICHOST, NI_NUMERICSERV, SOCK_STREAM
from socket import getaddrinfo
ECHO = PORTS["echo"]
out = {}
start = time.monotonic()
out["getaddrinfo"] = socket.getaddrinfo("names.test", ECHO)
out["getaddrinfo_v6"] = socket.getaddrinfo("names.test", "http", AF_INET6, SOCK_STREAM)
out["getaddrinfo_canon"] = socket.getaddrinfo("names.test", ECHO, flags=socket.AI_CANONNAME)[0][3]
out["getaddrinfo_numeric"] = socket.getaddrinfo("127.0.0.1", ECHO, type=socket.SOCK_STREAM)[0][4]
out["numeric_only"] = attempt(socket.getaddrinfo, "names.test", ECHO, 0, 0, 0, AI_NUMERICHOST)
out["gethostbyname"] = socket.gethostbyname("names.test")
out["same_name"] = [socket.gethostbyname("NAMES.Test."), getaddrinfo("names.TEST", 1)[0][4][0]]
out["gethostbyname_ex"] = socket.gethostbyname_ex("names.test")
address = out["gethostbyname"]
out["getnameinfo"] = socket.getnameinfo((address, ECHO), 0)
out["getnameinfo_numeric"] = socket.getnameinfo((address, ECHO), NI_NUMERICHOST | NI_NUMERICSERV)
out["getnameinfo_foreign"] = socket.getnameinfo(("203.0.113.7", 443), socket.NI_NUMERICSERV)
out["gethostbyaddr"] = socket.gethostbyaddr(address)
out["gethostbyaddr_foreign"] = attempt(socket.gethostbyaddr, "203.0.113.7")
out["only_resolved"] = socket.gethostbyname("only-resolved.test")
out["bad_name"] = attempt(socket.getaddrinfo, "a" * 64 + ".test", 80)
out["elapsed"] = time.monotonic() - start
s = socket.socket()
s.connect((address, ECHO))  # the synthetic address: the proxy gets the name
out["echo"] = attempt(echo_over, s)
s.close()
done(out)
"""


def test_name_functions_answer_without_dns_and_the_proxy_resolves(node: Node) -> None:
    """Every name function of the socket module answers from the shim's table; a connect to a
    synthetic address sends the name, which only the proxy looks up (the DNS stub it uses sees
    names.test, asked once, and never a name the app only resolved)."""
    before = node.mark()
    node.dns.clear_queries()
    seen = app(node, NAMES_APP)
    echo = node.echo.port
    address = seen["gethostbyname"]
    assert address.startswith("240.")
    assert seen["getaddrinfo"] == [[socket.AF_INET, socket.SOCK_STREAM, 6, "", [address, echo]]]
    ((family, kind, proto, canon, v6),) = seen["getaddrinfo_v6"]
    assert (family, kind, proto, canon) == (socket.AF_INET6, socket.SOCK_STREAM, 6, "")
    assert v6[0].startswith("100::") and v6[1:] == [80, 0, 0]
    assert seen["getaddrinfo_canon"] == "names.test"
    assert seen["getaddrinfo_numeric"] == ["127.0.0.1", echo]
    assert seen["numeric_only"]["error"] == "gaierror"
    assert seen["same_name"] == [address, address]
    assert seen["gethostbyname_ex"] == ["names.test", [], [address]]
    assert seen["getnameinfo"] == ["names.test", str(echo)]
    assert seen["getnameinfo_numeric"] == [address, str(echo)]
    assert seen["getnameinfo_foreign"] == ["203.0.113.7", "443"]
    assert seen["gethostbyaddr"] == ["names.test", [], [address]]
    assert seen["gethostbyaddr_foreign"]["error"] == "herror"
    assert seen["only_resolved"].startswith("240.") and seen["only_resolved"] != address
    assert seen["bad_name"]["error"] == "gaierror"
    assert seen["elapsed"] < 0.5
    assert seen["echo"] == echoed()
    (record,) = node.records_since(before)
    assert (record["dest"], record["dialed"]) == (f"names.test:{echo}", f"127.0.0.1:{echo}")
    assert sorted(node.dns.queries) == [("names.test", "A"), ("names.test", "AAAA")]


LOCALHOST_APP = """
from socket import SOCK_STREAM
ECHO = PORTS["echo"]
named = socket.socket()
named.connect(("localhost", ECHO))  # a name straight to connect(), as the kernel would take it
done({
    "getaddrinfo": [i[4][:2] for i in socket.getaddrinfo("localhost", ECHO, type=SOCK_STREAM)],
    "getaddrinfo_v6": [
        i[4][:2] for i in socket.getaddrinfo("LocalHost.", ECHO, socket.AF_INET6, SOCK_STREAM)
    ],
    "sub": socket.gethostbyname("app.localhost"),
    "echo": attempt(echo_over, socket.create_connection(("localhost", ECHO))),
    "direct": attempt(echo_over, named),
})
"""


def test_localhost_is_loopback_without_dns(node: Node) -> None:
    """RFC 6761: ``localhost`` and names under it are loopback. The shim answers them itself
    (as the system resolver does from /etc/hosts), so a connect goes to the proxy as
    127.0.0.1, never as a name the proxy's DNS cannot resolve."""
    before = node.mark()
    seen = app(node, LOCALHOST_APP)
    echo = node.echo.port
    assert seen["getaddrinfo"] == [["127.0.0.1", echo]]
    assert seen["getaddrinfo_v6"] == [["::1", echo]]
    assert seen["sub"] == "127.0.0.1"
    assert seen["echo"] == echoed() and seen["direct"] == echoed()
    records = node.records_since(before)
    assert [(r["dest"], r["reason"]) for r in records] == [(f"127.0.0.1:{echo}", "allowed")] * 2


NETNS_APP = """
start = time.monotonic()
out = {"answers": [attempt(socket.gethostbyname, "probe%d.test" % i) for i in range(5)]}
out["getaddrinfo"] = attempt(lambda: socket.getaddrinfo("probe.test", 443)[0][4])
out["reverse"] = attempt(socket.gethostbyaddr, "203.0.113.7")
out["elapsed"] = time.monotonic() - start
done(out)
"""


class DnsSink:
    """Counts every DNS question sent to ``addresses`` port 53 (UDP and TCP) inside a network
    namespace, answering REFUSED at once so a resolver that asks gives up quickly."""

    def __init__(self, namespace: NetworkNamespace, addresses: Sequence[str]) -> None:
        self.questions = 0
        self._sockets: list[socket.socket] = []
        with namespace.entered():
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                udp = socket.socket(family, socket.SOCK_DGRAM)
                udp.bind((address, 53))
                tcp = socket.socket(family, socket.SOCK_STREAM)
                tcp.bind((address, 53))
                tcp.listen(8)
                self._sockets += [udp, tcp]
        self._selector = selectors.DefaultSelector()
        for sock in self._sockets:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    if sock.type == socket.SOCK_DGRAM:
                        data, peer = sock.recvfrom(65535)
                        self.questions += 1
                        sock.sendto(self._refused(data), peer)
                    else:
                        conn, _ = sock.accept()
                        self.questions += 1
                        conn.close()

    @staticmethod
    def _refused(data: bytes) -> bytes:
        reply = DNSRecord.parse(data).reply()
        reply.header.rcode = RCODE.REFUSED
        return bytes(reply.pack())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._selector.close()
        for sock in self._sockets:
            sock.close()


def system_nameservers() -> list[str]:
    lines = Path("/etc/resolv.conf").read_text().splitlines()
    found = [
        line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1
    ]
    return found or ["127.0.0.1"]


@pytest.mark.netns
def test_no_dns_query_leaves_the_app(node: Node) -> None:
    """In a namespace with only loopback, where the system's nameservers are a sink that counts
    questions: under the shim names answer at once and the sink hears nothing; the same
    script without the shim asks the sink (so the sink would have heard)."""
    servers = system_nameservers()
    own = [f"{s}/{128 if ':' in s else 32}" for s in servers if not s.startswith("127.")]
    with NetworkNamespace(addresses=own) as namespace:
        sink = DnsSink(namespace, servers)
        try:
            environment = shim_environment(("127.0.0.1", 9))  # never dialled
            plain = {k: v for k, v in environment.items() if k != "PYTHONPATH"}
            with script(NETNS_APP) as path:
                shimmed = result_of(
                    run_as(NETNS_UID, [app_python(), path], environment, netns=namespace)
                )
                heard_with_shim = sink.questions
                unshimmed = result_of(
                    run_as(NETNS_UID, [app_python(), path], plain, netns=namespace)
                )
                heard_without = sink.questions
        finally:
            sink.close()
    assert all(answer["ok"].startswith("240.") for answer in shimmed["answers"]), shimmed
    assert len({answer["ok"] for answer in shimmed["answers"]}) == 5
    assert shimmed["getaddrinfo"]["ok"][0].startswith("240.")
    assert shimmed["reverse"]["error"] == "herror"
    assert shimmed["elapsed"] < 0.5, shimmed
    assert heard_with_shim == 0
    assert all(answer["error"] == "gaierror" for answer in unshimmed["answers"]), unshimmed
    assert heard_without > 0


# --- 4. everything else --------------------------------------------------------------------------
SOCKETS_APP = """
out = {}
kinds = {
    "udp": (socket.AF_INET, socket.SOCK_DGRAM, 0),
    "udp6": (socket.AF_INET6, socket.SOCK_DGRAM, 0),
    "udp_nonblock": (socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, 0),
    "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0),
    "tcp": (socket.AF_INET, socket.SOCK_STREAM, 0),
    "unix_dgram": (socket.AF_UNIX, socket.SOCK_DGRAM, 0),
}
for name, (family, kind, proto) in kinds.items():
    out[name] = attempt(lambda: socket.socket(family, kind, proto).close())
out["socketpair"] = attempt(lambda: [s.close() for s in socket.socketpair()] and None)
out["fds_before"] = len(os.listdir("/proc/self/fd"))
for _ in range(20):
    attempt(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
out["fds_after"] = len(os.listdir("/proc/self/fd"))

s = socket.socket()
out["sendto"] = attempt(s.sendto, b"x", socket.MSG_FASTOPEN, ("127.0.0.1", PORTS["echo"]))
out["sendmsg"] = attempt(s.sendmsg, [b"x"], [], socket.MSG_FASTOPEN, ("127.0.0.1", PORTS["echo"]))
s.close()
done(out)
"""


def test_udp_raw_packet_sockets_and_fast_open_are_refused(node: Node) -> None:
    """UDP is refused by the shim when the socket is made; raw and packet sockets a test uid
    cannot make anyway (the kernel says EPERM first: see the next test for the shim's own
    refusal); a TCP "connect" by sendto/sendmsg with an address (Fast Open) is refused."""
    before, accepted = node.mark(), node.echo.accepted
    seen = app(node, SOCKETS_APP)
    for name in ("udp", "udp6", "udp_nonblock", "raw", "packet"):
        assert seen[name]["permission"] is True, (name, seen[name])
    assert seen["udp"]["message"] == "egress: UDP sockets are not allowed here"
    assert seen["udp6"]["message"] == "egress: UDP sockets are not allowed here"
    assert seen["udp_nonblock"]["message"] == "egress: UDP sockets are not allowed here"
    assert seen["tcp"] == seen["unix_dgram"] == seen["socketpair"] == {"ok": None}
    assert seen["fds_after"] == seen["fds_before"]  # a refused socket is closed, not leaked
    for name in ("sendto", "sendmsg"):
        assert seen[name]["error"] == "PermissionError", seen[name]
        assert "with an address (TCP Fast Open) is not allowed here" in seen[name]["message"]
    assert node.echo.accepted == accepted
    assert node.mark() == before


PRIVILEGED_SOCKETS_APP = """
out = {
    "raw": attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "raw6": attempt(socket.socket, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
    "packet": attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0),
    "fds_before": len(os.listdir("/proc/self/fd")),
}
for _ in range(20):
    attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
out["fds_after"] = len(os.listdir("/proc/self/fd"))
done(out)
"""


def test_the_shim_refuses_raw_and_packet_sockets_the_kernel_would_allow(node: Node) -> None:
    """Run as root (who may make them), so it is the shim that refuses."""
    seen = app(node, PRIVILEGED_SOCKETS_APP, uid=0)
    assert seen["raw"]["message"] == "egress: raw sockets are not allowed here"
    assert seen["raw6"]["message"] == "egress: raw sockets are not allowed here"
    assert seen["packet"]["message"] == "egress: packet sockets are not allowed here"
    assert all(seen[k]["errno"] == errno.EACCES for k in ("raw", "raw6", "packet"))
    assert seen["fds_after"] == seen["fds_before"]


LISTEN_APP = """
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

def bind(host, port, listen=False):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.bind((host, port))
        if listen:
            s.listen()
        return s.getsockname()[0]
    finally:
        s.close()

out = {
    "bind_port0": attempt(bind, "127.0.0.1", 0),
    "bind_any_port0": attempt(bind, "0.0.0.0", 0),
    "bind_port": attempt(bind, "127.0.0.1", free_port()),
    "bind_any_port": attempt(bind, "0.0.0.0", free_port()),
    "listen_loopback": attempt(bind, "127.0.0.1", 0, True),
    "listen_loopback6": attempt(bind, "::1", 0, True),
    "listen_any": attempt(bind, "0.0.0.0", 0, True),
    "listen_any6": attempt(bind, "::", free_port(), True),
}
done(out)
"""

LISTEN_EXPECTED = {
    "none": {"bind_port0", "bind_any_port0"},
    "loopback": {
        "bind_port0", "bind_any_port0", "bind_port", "listen_loopback", "listen_loopback6",
    },
    "any": {
        "bind_port0", "bind_any_port0", "bind_port", "bind_any_port",
        "listen_loopback", "listen_loopback6", "listen_any", "listen_any6",
    },
}  # fmt: skip


@pytest.mark.parametrize("policy", list(LISTEN_EXPECTED))
def test_listen_policy(node: Node, policy: str) -> None:
    """EGRESS_SANDBOX_LISTEN: ``none`` binds port 0 only (to pick a source address) and never
    listens; ``loopback`` listens on loopback addresses only; ``any`` is unrestricted."""
    seen = app(node, LISTEN_APP, listen=policy)
    allowed = {name for name, outcome in seen.items() if "ok" in outcome}
    assert allowed == LISTEN_EXPECTED[policy], seen
    for outcome in seen.values():
        if "ok" not in outcome:
            assert outcome["error"] == "PermissionError" and outcome["errno"] == errno.EACCES
            assert f"(EGRESS_SANDBOX_LISTEN={policy}" in outcome["message"], outcome


# --- 5. errors ---------------------------------------------------------------------------------
ERRORS_APP = """
out = {
    "denied": attempt(socket.create_connection, ("127.0.0.1", 1)),
    "special": attempt(socket.create_connection, ("169.254.169.254", 80)),
    "refused": attempt(socket.create_connection, ("127.0.0.1", PORTS["refused"])),
    "unknown_name": attempt(socket.create_connection, ("nx.test", PORTS["echo"])),
    "name_denied": attempt(socket.create_connection, ("elsewhere.test", 443)),
}
done(out)
"""


def test_refusals_name_the_app_the_destination_and_the_reason(node: Node) -> None:
    before = node.mark()
    node.dns.clear_queries()
    seen = app(node, ERRORS_APP)
    denied = seen["denied"]
    assert (denied["error"], denied["errno"], denied["permission"]) == ("EgressDenied", 13, True)
    assert (
        denied["message"] == 'egress: app "shim" may not connect to 127.0.0.1:1 (no rule matches)'
    )
    special = seen["special"]
    assert special["error"] == "EgressDenied"
    assert special["message"] == (
        'egress: app "shim" may not connect to 169.254.169.254:80 (special-purpose address:'
        " 169.254.169.254 is link-local (169.254.0.0/16))"
    )
    refused = seen["refused"]
    assert (refused["error"], refused["errno"]) == ("ConnectionRefusedError", errno.ECONNREFUSED)
    assert f"connecting to 127.0.0.1:{node.refused_port} failed via the proxy" in refused["message"]
    unknown = seen["unknown_name"]
    assert (unknown["error"], unknown["errno"]) == ("gaierror", socket.EAI_NONAME)
    assert (
        f"connecting to nx.test:{node.echo.port} failed via the proxy (dns_failure"
        in unknown["message"]
    )
    name_denied = seen["name_denied"]
    assert name_denied["message"] == (
        'egress: app "shim" may not connect to elsewhere.test:443 (no rule matches)'
    )
    records = node.records_since(before)
    assert sorted(r["reason"] for r in records) == sorted(
        ["not_allowed", "special_address", "connect_refused", "dns_failure", "not_allowed"]
    )
    assert ("elsewhere.test", "A") not in node.dns.queries  # denied without a lookup


STRANGER_APP = """
done(attempt(socket.create_connection, ("127.0.0.1", PORTS["echo"])))
"""


def test_a_uid_in_no_app_is_told_so(node: Node) -> None:
    seen = app(node, STRANGER_APP, uid=STRANGER_UID)
    assert (seen["error"], seen["errno"]) == ("EgressDenied", errno.EACCES)
    assert seen["message"] == (
        f"egress: this process may not connect to 127.0.0.1:{node.echo.port}"
        f" (uid {STRANGER_UID} belongs to no app)"
    )


LIMITED_APP = """
first = socket.create_connection(("127.0.0.1", PORTS["echo"]))
out = {"first": attempt(echo_over, first)}
out["second"] = attempt(socket.create_connection, ("127.0.0.1", PORTS["echo"]))
first.close()
done(out)
"""


def test_rate_limited_says_when_to_retry(node: Node) -> None:
    seen = app(node, LIMITED_APP, uid=LIMITED_UID)
    assert seen["first"] == echoed()
    second = seen["second"]
    assert (second["error"], second["errno"], second["permission"]) == (
        "EgressRateLimited",
        errno.EACCES,
        True,
    )
    assert 0 < second["retry_after"] <= 1.0
    assert second["message"].startswith(
        f'egress: app "limited" is rate limited connecting to 127.0.0.1:{node.echo.port}'
        " (opens connections faster than its limit); retry in "
    )


def test_proxy_not_running_is_connection_refused_naming_the_proxy(node: Node) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # nobody listens on it while the app runs
        nowhere = closed.getsockname()
        seen = app(node, STRANGER_APP, proxy=nowhere)
    assert (seen["error"], seen["errno"]) == ("ConnectionRefusedError", errno.ECONNREFUSED)
    assert seen["message"].startswith(
        f"egress: cannot reach the egress proxy at 127.0.0.1:{nowhere[1]} (Connection refused)"
        f" to connect to 127.0.0.1:{node.echo.port}"
    )


# --- 6. the event loop keeps running while the proxy dials -------------------------------------
STALL_APP = """
async def main():
    loop = asyncio.get_running_loop()
    lags, running = [], True
    async def ticker():
        last = loop.time()
        while running:
            await asyncio.sleep(0.01)
            now = loop.time()
            lags.append(now - last - 0.01)
            last = now
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    lags.clear()
    start = loop.time()
    outcome = await attempt_async(asyncio.open_connection("127.0.0.1", PORTS["slow"]))
    elapsed = loop.time() - start
    running = False
    await task
    return {"outcome": outcome, "elapsed": elapsed, "max_lag": max(lags), "ticks": len(lags)}

if ARGS["loop"] == "uvloop":
    import uvloop
    out = uvloop.run(main())
else:
    out = asyncio.run(main())
s = socket.socket()
s.setblocking(False)
start = time.monotonic()
out["plain_rc"] = s.connect_ex(("127.0.0.1", PORTS["slow"]))
out["plain_elapsed"] = time.monotonic() - start
s.close()
done(out)
"""


@pytest.mark.parametrize("app_loop", APP_LOOPS)
def test_the_event_loop_runs_while_the_proxy_dials_a_slow_upstream(
    node: Node, app_loop: str
) -> None:
    """A 10 ms ticker keeps ticking while open_connection waits 1.5 s (the proxy's
    connect_timeout) for an upstream that never answers the SYN; the connect then raises
    TimeoutError. Contrast: outside asyncio a non-blocking connect_ex does the whole handshake
    before it returns (that is the shim's documented behaviour, not a loop stall)."""
    seen = app(node, STALL_APP, args={"loop": app_loop})
    print(
        f"\n{app_loop}: max tick lag {seen['max_lag'] * 1000:.1f} ms over {seen['ticks']} ticks;"
        f" connect raised after {seen['elapsed']:.2f} s; plain non-blocking connect_ex took"
        f" {seen['plain_elapsed']:.2f} s and returned {seen['plain_rc']}"
    )
    outcome = seen["outcome"]
    assert (outcome["error"], outcome["errno"]) == ("TimeoutError", errno.ETIMEDOUT), outcome
    assert "(connect_timeout: " in outcome["message"]
    assert 1.3 < seen["elapsed"] < 3.0
    assert seen["ticks"] > 50
    assert seen["max_lag"] < 0.1
    assert seen["plain_rc"] == errno.ETIMEDOUT  # informative: it returned after the dial


SLOW_APP = """
s = socket.socket()
start = time.monotonic()
out = {"connect": attempt(s.connect, ("127.0.0.1", PORTS["slow"]))}
out["elapsed"] = time.monotonic() - start
done(out)
"""


def test_egress_sandbox_timeout_bounds_a_connect_without_its_own_timeout(node: Node) -> None:
    seen = app(node, SLOW_APP, env={"EGRESS_SANDBOX_TIMEOUT": "0.4"})
    connect = seen["connect"]
    assert (connect["error"], connect["errno"]) == ("TimeoutError", errno.ETIMEDOUT)
    assert connect["message"] == (
        f"egress: no answer from the proxy at 127.0.0.1:{node.socks()[1]} for"
        f" 127.0.0.1:{node.slow_port} within 0.4 s"
    )
    assert 0.35 < seen["elapsed"] < 1.2


# --- 7. standard library only ------------------------------------------------------------------
STDLIB_APP = """
heavy = ("aiohttp", "uvloop", "redis", "rules", "ratelimit", "egress", "requests")
done({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
      "shim": sorted(m for m in sys.modules if m.split(".")[0] == "egress_sandbox"),
      "patched": socket.socket.connect.__module__,
      "available": [m for m in heavy[:3] if __import__("importlib.util").util.find_spec(m)]})
"""


def test_the_shim_loads_only_the_standard_library(node: Node) -> None:
    seen = app(node, STDLIB_APP)
    assert seen["available"] == ["aiohttp", "uvloop", "redis"]  # installed, yet not loaded
    assert seen["loaded"] == []
    assert "egress_sandbox" in seen["shim"] and "egress_sandbox.patch" in seen["shim"]
    assert seen["patched"] == "egress_sandbox.patch"


# --- what a security review found around the edges -------------------------------------------
EDGES_APP = """
import asyncio, importlib.machinery, uvloop.loop as _probe  # noqa
out = {}
s = socket.socket()
s.bind(("localhost", 0))
out["bind_localhost"] = s.getsockname()[0]
s.close()
out["bind_name"] = attempt(lambda: socket.socket().bind(("exfil.example", 0)))

async def denied():
    await asyncio.open_connection("no-rule.example", 443)

out["cdef_loop"] = attempt(_probe.Loop().run_until_complete, denied())
done(out)
"""

HOOK_AHEAD_APP = """
import asyncio, importlib.machinery, sys

class Plain:
    '''An import hook ahead of the shim's, as some tools install: uvloop is imported past it.'''
    def find_spec(self, name, path, target=None):
        return importlib.machinery.PathFinder.find_spec(name, path) if name == "uvloop" else None

sys.meta_path.insert(0, Plain())
import uvloop

async def denied():
    await asyncio.open_connection("no-rule.example", 443)

done({"denied": attempt(uvloop.run, denied())})
"""


def test_bind_to_a_name_never_asks_dns_and_odd_event_loops_fail_closed(node: Node) -> None:
    """bind() would resolve a name in C: localhost is loopback, any other name is refused.
    uvloop's C base loop connects around ``sock_connect``: it refuses to start."""
    seen = app(node, EDGES_APP)
    assert seen["bind_localhost"] == "127.0.0.1"
    assert seen["bind_name"]["error"] == "gaierror"
    assert "would need DNS" in seen["bind_name"]["message"]
    assert seen["cdef_loop"]["error"] == "RuntimeError"
    assert "connects around the sandbox shim" in seen["cdef_loop"]["message"]


def test_uvloop_imported_past_the_shims_hook_is_patched_when_its_loop_starts(node: Node) -> None:
    seen = app(node, HOOK_AHEAD_APP)
    assert seen["denied"]["error"] == "EgressDenied"


def test_install_hook_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    """Run as root, --install-hook must not write through links a tenant planted."""
    shared = tmp_path / "site"
    shared.mkdir()
    shared.chmod(0o777)
    result = run_egress("sandbox", "--install-hook", str(shared))
    assert result.returncode == 2
    assert "writable by others" in result.stderr
    assert list(shared.iterdir()) == []
