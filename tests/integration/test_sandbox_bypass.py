"""What goes around the socket shim is stopped by the firewall.

The shim (egress/sandbox) patches Python's ``socket`` module, so only code that goes through
that module is sent to the proxy. Native code, ``_socket``, ctypes, other programs and Python
interpreters started with ``-I``/``-S`` never see it: the firewall controller is what stops
them. This file proves both halves together, on a real node: a fresh network namespace with
the real upstream, ``egress proxy`` and ``egress firewall sync`` of
tests/integration/test_firewall_enforcement.py (its node is reused, not copied).

In that node one app's uid runs one Python program under the shim (the app interpreter of
tests/sandboxing.py, with the shim's ``sitecustomize`` on PYTHONPATH, as ``egress sandbox``
starts it). The program first shows the shim path is live (the allowed upstream echoes through
the proxy; a denial names the app), then tries every way around it. The test checks what a
tenant and an operator would see: each bypass fails at once with the kernel's errno
(ECONNREFUSED from the firewall's TCP reset, EPERM for UDP; the shim's own refusals are EACCES),
the upstream saw only the connections the proxy relayed, and each attempt is counted, once,
for the app that made it and for no other.

Both firewall backends run (iptables-restore and iptc), each with both apps as the attacker:
five tests per combination share one run of the program; the file takes under ten seconds.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_firewall_enforcement import (
    BACKENDS,
    BLOG_UID,
    DNS_PORT,
    ECHO_PORT,
    FOREIGN_PORT,
    REPORTS_UID,
    SOCKS_PORT,
    UPSTREAM_V4,
    UPSTREAM_V6,
    Node,
    firewalled_node,
    status_counters,
)
from tests.processes import wait_ready
from tests.sandboxing import app_python, shim_environment, world_readable_dir

pytestmark = pytest.mark.netns

TIMEOUT_S = 2.0  # per network attempt inside the app; every refusal here takes milliseconds
FAST_S = 1.0  # "refused at once": well under any timeout
APP_RUN_TIMEOUT_S = 60.0
BYPASS_MODULE = "egress_bypass"

# --- native code: one C file, built at test time as a CPython extension (or, where the app
# interpreter's headers are missing, as a standalone program: labelled so in the results) ----
NATIVE_SOURCE = textwrap.dedent(
    r"""
    #ifndef BYPASS_PROGRAM
    #define PY_SSIZE_T_CLEAN
    #include <Python.h>
    #endif
    #include <errno.h>
    #include <netdb.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/socket.h>
    #include <sys/time.h>
    #include <unistd.h>

    /* socket() + connect() + an echo, straight to libc: no Python socket code involved.
       0 on an echo; otherwise an errno, with *stage saying where it stopped. */
    static int bypass_connect(const char *host, const char *port, int timeout,
                              const char **stage) {
        struct addrinfo hints, *ai = NULL;
        memset(&hints, 0, sizeof hints);
        hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
        hints.ai_socktype = SOCK_STREAM;
        *stage = "setup";
        if (getaddrinfo(host, port, &hints, &ai) != 0) return EINVAL;
        *stage = "socket";
        int fd = socket(ai->ai_family, SOCK_STREAM, 0);
        if (fd < 0) { int e = errno; freeaddrinfo(ai); return e; }
        struct timeval tv = {timeout, 0};  /* SO_SNDTIMEO bounds connect() too */
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        *stage = "connect";
        int rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
        int e = errno;
        freeaddrinfo(ai);
        if (rc < 0) { close(fd); return e == EINPROGRESS ? ETIMEDOUT : e; }
        *stage = "exchange";
        char buf[4];
        if (send(fd, "ping", 4, 0) != 4 || recv(fd, buf, 4, MSG_WAITALL) != 4) {
            e = errno ? errno : EPROTO; close(fd); return e;
        }
        close(fd);
        return memcmp(buf, "ping", 4) == 0 ? 0 : EPROTO;
    }

    #ifdef BYPASS_PROGRAM
    int main(int argc, char **argv) {
        if (argc != 4) return 2;
        const char *stage;
        int e = bypass_connect(argv[1], argv[2], atoi(argv[3]), &stage);
        if (e == 0) { puts("echoed"); return 0; }
        printf("%d %s\n", e, stage);
        return 1;
    }
    #else
    static PyObject *py_connect(PyObject *self, PyObject *args) {
        const char *host, *stage;
        int port, timeout, e;
        char service[8];
        if (!PyArg_ParseTuple(args, "sii", &host, &port, &timeout)) return NULL;
        snprintf(service, sizeof service, "%d", port);
        Py_BEGIN_ALLOW_THREADS
        e = bypass_connect(host, service, timeout, &stage);
        Py_END_ALLOW_THREADS
        if (e == 0) return PyUnicode_FromString("echoed");
        errno = e;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, stage);  /* filename: the stage */
    }

    static PyMethodDef methods[] = {
        {"connect", py_connect, METH_VARARGS, "libc socket()/connect() and an echo"},
        {NULL, NULL, 0, NULL},
    };
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "egress_bypass", NULL, -1,
                                        methods};
    PyMODINIT_FUNC PyInit_egress_bypass(void) { return PyModule_Create(&module); }
    #endif
    """
)


@dataclass(frozen=True)
class Native:
    """The compiled bypass: ``kind`` "extension" (importable from ``directory``) or "program"
    (the fallback when the app interpreter has no headers; ``path`` is the executable)."""

    kind: str
    directory: Path
    path: Path


def build_native(directory: Path) -> Native:
    """Compile NATIVE_SOURCE for the app interpreter with gcc, into ``directory``."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "a C compiler (gcc) is needed to build the C-extension bypass: apt-get install gcc"
    source = directory / "egress_bypass.c"
    source.write_text(NATIVE_SOURCE)
    query = "import sysconfig as s; print(s.get_paths()['include'], s.get_config_var('EXT_SUFFIX'))"
    info = subprocess.run(
        [app_python(), "-I", "-c", query], capture_output=True, text=True, timeout=30, check=True
    )
    include, suffix = info.stdout.split()
    if (Path(include) / "Python.h").is_file():
        target, kind = directory / f"{BYPASS_MODULE}{suffix}", "extension"
        command = [gcc, "-shared", "-fPIC", "-O1", f"-I{include}", "-o", str(target), str(source)]
    else:  # no headers for the app interpreter (python3-dev missing): same C, as a program
        target, kind = directory / "egress_bypass", "program"
        command = [gcc, "-DBYPASS_PROGRAM", "-O1", "-o", str(target), str(source)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert built.returncode == 0, f"{command} failed:\n{built.stderr}"
    target.chmod(0o755)
    return Native(kind, directory, target)


# --- the app: runs under the shim as the attacking app's uid ------------------------------------
# argv[1]: JSON settings. Prints one JSON object: {"shim_loaded", "shim": [...], "bypass": [...],
# "synthetic"}; each result has name, outcome ("ok", "refused", "eperm", "eacces", "timeout",
# "oserror:ENAME", "curl-exit-N", "error:Type"), stage, elapsed seconds and detail.
# With argv[1] == "child" it is the -I/-S interpreter: one direct connect, reported the same way.
APP_CODE = textwrap.dedent(
    """
    import ctypes, errno, json, os, socket, struct, subprocess, sys, time
    import _socket

    stage = ["setup"]

    def at(name):
        stage[0] = name

    def classify(exc):
        if isinstance(exc, Reported):  # a child interpreter's own outcome
            return exc.args[0]
        if isinstance(exc, CurlFailed):
            return f"curl-exit-{exc.args[0]}"
        if isinstance(exc, ConnectionRefusedError):
            return "refused"
        if isinstance(exc, PermissionError):
            return "eperm" if exc.errno == errno.EPERM else "eacces"
        if isinstance(exc, TimeoutError):
            return "timeout"
        if isinstance(exc, OSError) and exc.errno:
            return "oserror:" + errno.errorcode.get(exc.errno, str(exc.errno))
        return "error:" + type(exc).__name__

    def attempt(name, function, *args):
        stage[0] = "setup"
        started = time.monotonic()
        try:
            detail, outcome = function(*args), "ok"
        except Exception as exc:
            detail, outcome = f"{type(exc).__name__}: {exc}", classify(exc)
            if isinstance(exc, Reported):
                detail = f"child: {exc.args[1]}"
            if isinstance(exc, OSError) and exc.filename in ("socket", "connect", "exchange"):
                stage[0] = exc.filename  # from the C code
        return {"name": name, "outcome": outcome, "stage": stage[0],
                "elapsed": round(time.monotonic() - started, 3), "detail": str(detail)[:300]}

    class CurlFailed(Exception):
        pass

    class Reported(Exception):
        pass

    def fam(host):
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    if sys.argv[1] == "child":  # python -I / -S: no sitecustomize, so no shim
        host, port, timeout = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        def direct():
            at("connect")
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(b"ping")
                return s.recv(4).decode()
        result = attempt("child", direct)
        print(json.dumps({"shim_loaded": "egress_sandbox" in sys.modules, **result}))
        sys.exit(0)

    CFG = json.loads(sys.argv[1])
    V4, V6, PORT, TIMEOUT = CFG["v4"], CFG["v6"], CFG["port"], CFG["timeout"]
    PROXY = f"socks5://127.0.0.1:{CFG['socks']}"

    def echo(send, recv):
        at("exchange")
        send(b"ping")
        data = b""
        while len(data) < 4:
            chunk = recv(4 - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        if data != b"ping":
            raise RuntimeError(f"unexpected echo {data!r}")
        return "echoed"

    # -- 1. the shim path -------------------------------------------------------------------
    def shim_tcp(host, port):
        at("connect")
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            return echo(s.sendall, s.recv)

    def shim_udp():
        at("socket")
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        return "created"

    def curl(url, *options):
        at("curl")
        r = subprocess.run(
            ["curl", "--silent", "--show-error", "--max-time", str(int(TIMEOUT) + 1),
             *options, url],
            capture_output=True, timeout=TIMEOUT + 10)
        if r.returncode != 0:
            raise CurlFailed(r.returncode, r.stderr.decode(errors="replace").strip())
        return r.stdout.decode(errors="replace")

    synthetic = socket.getaddrinfo("leak.example", PORT, type=socket.SOCK_STREAM)[0][4][0]

    shim = [
        attempt("tcp4", shim_tcp, V4, PORT),
        attempt("tcp6", shim_tcp, V6, PORT),
        attempt("denied_port", shim_tcp, V4, CFG["denied_port"]),
        attempt("udp", shim_udp),
        attempt("curl_socks5", curl, f"http://{V4}:{PORT}/", "--proxy", PROXY),
        # a synthetic address handed to a program without the shim: the proxy refuses it
        attempt("synthetic_leak", curl, f"http://{synthetic}:{PORT}/", "--proxy", PROXY),
    ]

    # -- 2. around the shim -----------------------------------------------------------------
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc):
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return rc

    def ctypes_tcp(host):
        at("socket")
        family = fam(host)
        fd = check(libc.socket(family, socket.SOCK_STREAM, 0))
        try:
            tv = struct.pack("ll", int(TIMEOUT), 0)
            for opt in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
                check(libc.setsockopt(fd, socket.SOL_SOCKET, opt, tv, len(tv)))
            if family == socket.AF_INET:
                addr = (struct.pack("=H", family) + struct.pack("!H", PORT)
                        + socket.inet_pton(family, host) + bytes(8))
            else:
                addr = (struct.pack("=H", family) + struct.pack("!HI", PORT, 0)
                        + socket.inet_pton(family, host) + struct.pack("=I", 0))
            at("connect")
            check(libc.connect(fd, addr, len(addr)))
            def send(data):
                check(libc.send(fd, data, len(data), 0))
            def recv(n):
                buf = ctypes.create_string_buffer(n)
                got = check(libc.recv(fd, buf, n, 0))
                return buf.raw[:got]
            return echo(send, recv)
        finally:
            libc.close(fd)

    def native_tcp(host):
        at("connect")
        if CFG["native"]["kind"] == "extension":
            sys.path.insert(0, CFG["native"]["directory"])
            import egress_bypass
            return egress_bypass.connect(host, PORT, int(TIMEOUT))
        r = subprocess.run([CFG["native"]["path"], host, str(PORT), str(int(TIMEOUT))],
                           capture_output=True, text=True, timeout=TIMEOUT + 10)
        if r.returncode == 0:
            return r.stdout.strip()
        code, where = r.stdout.split()
        raise OSError(int(code), os.strerror(int(code)), where)

    def socket_module_tcp(host, port=PORT):
        at("socket")
        s = _socket.socket(fam(host), _socket.SOCK_STREAM)
        try:
            s.settimeout(TIMEOUT)
            at("connect")
            s.connect((host, port))
            return echo(s.sendall, s.recv)
        finally:
            s.close()

    def socket_module_dns(host):
        at("socket")
        s = _socket.socket(fam(host), _socket.SOCK_DGRAM)
        try:
            s.settimeout(TIMEOUT)
            query = (b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
                     b"\\x07example\\x04test\\x00\\x00\\x01\\x00\\x01")
            at("send")
            s.sendto(query, (host, CFG["dns"]))
            at("receive")
            reply = s.recv(512)
            return f"answered {reply[:2].hex()}"
        finally:
            s.close()

    def os_system_curl(url):
        at("curl")
        status = os.system(f"curl --silent --noproxy '*' --max-time {int(TIMEOUT) + 1}"
                           f" -o /dev/null '{url}'")
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise CurlFailed(code, "os.system")
        return "fetched"

    def interpreter(flag, host):
        at("exec")
        r = subprocess.run([sys.executable, flag, os.path.abspath(__file__), "child", host,
                            str(PORT), str(TIMEOUT)],
                           capture_output=True, text=True, timeout=TIMEOUT + 20)
        if r.returncode != 0:
            raise RuntimeError(f"child exited {r.returncode}: {r.stderr[-300:]}")
        child = json.loads(r.stdout)
        if child["shim_loaded"]:
            raise RuntimeError(f"the shim loaded in python {flag}: not a bypass")
        at(child["stage"])
        if child["outcome"] == "ok":
            return child["detail"]
        raise Reported(child["outcome"], child["detail"])

    native = "c_extension" if CFG["native"]["kind"] == "extension" else "c_program"
    bypass = [
        attempt("ctypes_tcp4", ctypes_tcp, V4),
        attempt("ctypes_tcp6", ctypes_tcp, V6),
        attempt(f"{native}_tcp4", native_tcp, V4),
        attempt(f"{native}_tcp6", native_tcp, V6),
        attempt("_socket_tcp4", socket_module_tcp, V4),
        attempt("_socket_tcp6", socket_module_tcp, V6),
        # another SOCKS server at the proxy's port number: not the proxy, so not open
        attempt("_socket_tcp4_port_1080_elsewhere", socket_module_tcp, V4, CFG["socks"]),
        attempt("os_system_curl4", os_system_curl, f"http://{V4}:{PORT}/"),
        attempt("subprocess_curl6", curl, f"http://[{V6}]:{PORT}/", "--noproxy", "*"),
        attempt("_socket_dns4", socket_module_dns, V4),
        attempt("_socket_dns6", socket_module_dns, V6),
        attempt("python_-I_tcp4", interpreter, "-I", V4),
        attempt("python_-S_tcp4", interpreter, "-S", V4),
    ]
    print(json.dumps({"shim_loaded": "egress_sandbox" in sys.modules
                      and socket.socket.connect is not _socket.socket.connect,
                      "synthetic": synthetic, "shim": shim, "bypass": bypass}))
    """
)


def expected_bypasses(native: Native) -> dict[str, tuple[str, str]]:
    """What each bypass must end in, and at which stage: the firewall's TCP reset refuses
    connect() (ECONNREFUSED; curl exit 7, "couldn't connect"); a UDP datagram is dropped on its
    way out (EPERM from sendto). Never EACCES: that is the shim refusing, and these go around it.
    """
    c = "c_extension" if native.kind == "extension" else "c_program"  # the program: no headers
    refused, curl, dropped = ("refused", "connect"), ("curl-exit-7", "curl"), ("eperm", "send")
    return {
        "ctypes_tcp4": refused,
        "ctypes_tcp6": refused,
        f"{c}_tcp4": refused,
        f"{c}_tcp6": refused,
        "_socket_tcp4": refused,
        "_socket_tcp6": refused,
        "_socket_tcp4_port_1080_elsewhere": refused,
        "os_system_curl4": curl,
        "subprocess_curl6": curl,
        "_socket_dns4": dropped,
        "_socket_dns6": dropped,
        "python_-I_tcp4": refused,
        "python_-S_tcp4": refused,
    }


@dataclass(frozen=True)
class Attacker:
    app: str
    uid: int
    other: str  # the app that attempted nothing: its counter must not move
    v6_allowed: bool  # whether its rules allow the upstream's IPv6 address (reports: no)


ATTACKERS = (
    Attacker("blog", BLOG_UID, "reports", v6_allowed=True),
    Attacker("reports", REPORTS_UID, "blog", v6_allowed=False),
)


@dataclass(frozen=True)
class Attack:
    """One run of APP_CODE by ``attacker`` and what the node saw around it."""

    attacker: Attacker
    native: Native
    report: dict[str, Any]
    counters_before: dict[str, int]
    counters_after: dict[str, int]
    status: subprocess.CompletedProcess[str]  # `egress firewall status` right after the run
    upstream_hits: list[str]  # the upstream's log lines written during the run
    records: list[dict[str, Any]]  # the proxy's connection log records of the run

    def shim(self, name: str) -> dict[str, Any]:
        return next(r for r in self.report["shim"] if r["name"] == name)


def describe(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {r['name']}: {r['outcome']} at {r['stage']} after {r['elapsed']}s ({r['detail']})"
        for r in results
    )


# A listener at the proxy's port number on a non-proxy address (root, in the namespace): the
# firewall's ACCEPT is for the proxy's own address and port, not for "port 1080 anywhere".
OTHER_PROXY_CODE = textwrap.dedent(
    f"""
    import socket, sys
    log = open(sys.argv[1], "a", buffering=1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[2], {SOCKS_PORT}))
    s.listen(16)
    print("ready", flush=True)
    while True:
        conn, peer = s.accept()
        log.write(f"tcp {{sys.argv[2]}} {SOCKS_PORT} {{peer[0]}}\\n")
        conn.settimeout(5)
        try:
            conn.sendall(conn.recv(64))
        except OSError:
            pass
        conn.close()
    """
)


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native() -> Iterator[Native]:
    directory = world_readable_dir()
    try:
        yield build_native(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", params=BACKENDS)
def bypass_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """The firewalled node of test_firewall_enforcement, one per backend, plus "someone else's
    proxy": an echo server on the upstream's address at the proxy's port number."""
    with firewalled_node(tmp_path_factory.mktemp(f"bypass-{request.param}"), request.param) as n:
        other = n.ns.popen(
            [sys.executable, "-I", "-c", OTHER_PROXY_CODE, str(n.upstream_log), UPSTREAM_V4],
            stdout=subprocess.PIPE,
            text=True,
        )
        n.processes.append(other)  # stopped by pid with the node
        wait_ready(other, "the other proxy")
        yield n


@pytest.fixture(scope="module", params=ATTACKERS, ids=lambda a: a.app)
def attack(request: pytest.FixtureRequest, bypass_node: Node, native: Native) -> Attack:
    """Run the app once as the attacker, under the shim, inside the node; snapshot around it."""
    attacker: Attacker = request.param
    node = bypass_node
    assert node.proxy is not None
    records_before = len(node.proxy.connection_records())
    hits_before = len(node.upstream_hits())
    counters_before = node.app_counters()
    workdir = world_readable_dir()
    try:
        script = workdir / "app.py"
        script.write_text(APP_CODE)
        script.chmod(0o644)
        settings = {
            "v4": UPSTREAM_V4,
            "v6": UPSTREAM_V6,
            "port": ECHO_PORT,
            "denied_port": FOREIGN_PORT,
            "dns": DNS_PORT,
            "socks": SOCKS_PORT,
            "timeout": TIMEOUT_S,
            "native": {
                "kind": native.kind,
                "directory": str(native.directory),
                "path": str(native.path),
            },
        }
        result = node.ns.run(
            [app_python(), str(script), json.dumps(settings)],
            user=attacker.uid,
            group=attacker.uid,
            extra_groups=[],
            cwd=str(workdir),
            env=shim_environment(
                ("127.0.0.1", SOCKS_PORT), extra={"EGRESS_SANDBOX_TIMEOUT": str(TIMEOUT_S)}
            ),
            timeout=APP_RUN_TIMEOUT_S,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    counters_after = node.app_counters()
    status = node.firewall("status")
    assert result.returncode == 0, f"the app (uid {attacker.uid}) failed:\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    # tcp4, tcp6, denied_port, curl_socks5 and synthetic_leak each leave one record
    records = node.proxy.wait_connection_records(records_before + 5)[records_before:]
    return Attack(
        attacker=attacker,
        native=native,
        report=report,
        counters_before=counters_before,
        counters_after=counters_after,
        status=status,
        upstream_hits=node.upstream_hits()[hits_before:],
        records=records,
    )


# --- 1. the shim path is live -------------------------------------------------------------------
def test_the_shim_path_reaches_the_upstream_under_the_firewall(attack: Attack) -> None:
    """Plain socket code goes through the proxy and echoes, v4 (and v6 where the app's rules
    allow it); the proxy names the app in a denial, which it can only know from the kernel; the
    shim refuses UDP at creation (EACCES); curl pointed at the proxy works."""
    a, report = attack.attacker, attack.report
    assert report["shim_loaded"], "the shim is not installed in the app interpreter"
    tcp4, tcp6, denied = attack.shim("tcp4"), attack.shim("tcp6"), attack.shim("denied_port")
    assert tcp4["outcome"] == "ok" and tcp4["detail"] == "echoed", describe([tcp4])
    if a.v6_allowed:
        assert tcp6["outcome"] == "ok" and tcp6["detail"] == "echoed", describe([tcp6])
    else:
        assert tcp6["outcome"] == "eacces", describe([tcp6])
        assert tcp6["detail"] == (
            f'EgressDenied: [Errno 13] egress: app "{a.app}" may not connect to'
            f" [{UPSTREAM_V6}]:{ECHO_PORT} (no rule matches)"
        ), describe([tcp6])
    assert denied["outcome"] == "eacces", describe([denied])
    assert denied["detail"] == (
        f'EgressDenied: [Errno 13] egress: app "{a.app}" may not connect to'
        f" {UPSTREAM_V4}:{FOREIGN_PORT} (no rule matches)"
    ), describe([denied])
    udp = attack.shim("udp")
    assert (udp["outcome"], udp["stage"]) == ("eacces", "socket"), describe([udp])
    assert "egress: UDP sockets are not allowed here" in udp["detail"], describe([udp])
    control = attack.shim("curl_socks5")
    assert (control["outcome"], control["detail"]) == ("ok", "hello"), describe([control])


# --- 2. every way around it is refused by the kernel ---------------------------------------------
def test_every_bypass_is_refused_by_the_kernel_at_once(attack: Attack) -> None:
    """ctypes, the C extension, ``_socket`` (TCP v4/v6 and UDP DNS), curl via os.system and
    subprocess, and ``python -I``/``-S`` children (which load no shim) all fail within a second
    with the firewall's answer: ECONNREFUSED / curl exit 7 for TCP, EPERM for UDP."""
    results = attack.report["bypass"]
    expected = expected_bypasses(attack.native)
    assert [r["name"] for r in results] == list(expected), describe(results)
    wrong = [
        r
        for r in results
        if (r["outcome"], r["stage"]) != expected[r["name"]] or r["elapsed"] >= FAST_S
    ]
    assert not wrong, (
        f"{attack.attacker.app}: expected each bypass to be refused at once by the firewall"
        f" (outcome, stage: {expected}):\n{describe(wrong)}"
    )


# --- 3. nothing but the proxy reached anyone -----------------------------------------------
def test_the_upstream_saw_only_what_the_proxy_relayed(attack: Attack) -> None:
    """Every connection the upstream accepted during the run has an "allowed" record in the
    proxy's log for this app's uid, and no datagram arrived: not one bypass got a packet to it."""
    a = attack.attacker
    allowed = [r for r in attack.records if r["decision"] == "allowed"]
    expected_dests = sorted(
        [f"{UPSTREAM_V4}:{ECHO_PORT}"] * 2
        + ([f"[{UPSTREAM_V6}]:{ECHO_PORT}"] if a.v6_allowed else [])
    )
    assert sorted(r["dest"] for r in allowed) == expected_dests, attack.records
    assert all((r["uid"], r["app"]) == (a.uid, a.app) for r in attack.records), attack.records
    tcp = sorted(h for h in attack.upstream_hits if h.startswith("tcp "))
    expected_hits = sorted(
        [f"tcp {UPSTREAM_V4} {ECHO_PORT} {UPSTREAM_V4}"] * 2
        + ([f"tcp {UPSTREAM_V6} {ECHO_PORT} {UPSTREAM_V6}"] if a.v6_allowed else [])
    )
    assert tcp == expected_hits, (
        f"the upstream accepted connections the proxy did not relay: {attack.upstream_hits}"
    )
    assert not [h for h in attack.upstream_hits if h.startswith("udp ")], attack.upstream_hits


def test_a_leaked_synthetic_address_reaches_nobody(attack: Attack) -> None:
    """A synthetic address (240.0.0.0/4) handed to a program without the shim is a
    special-purpose address to the proxy: refused there, with the reason in its log."""
    synthetic = attack.report["synthetic"]
    assert ipaddress.ip_address(synthetic) in ipaddress.ip_network("240.0.0.0/4"), synthetic
    leak = attack.shim("synthetic_leak")
    assert leak["outcome"].startswith("curl-exit-") and leak["elapsed"] < FAST_S, describe([leak])
    record = next(r for r in attack.records if r["dest"] == f"{synthetic}:{ECHO_PORT}")
    assert (record["decision"], record["reason"], record["dialed"]) == (
        "denied",
        "special_address",
        None,
    ), record


# --- 4. counted for the right app ----------------------------------------------------------------
def test_each_bypass_is_counted_once_for_that_app_and_no_other(attack: Attack) -> None:
    """Every bypass sent exactly one packet (a SYN or a datagram) and the kernel counted each
    under the attacker's rule (``egress app=NAME``): its counter rose by exactly the number of
    attempts, the other app's and the unassigned catch-all's did not move, and
    `egress firewall status` shows the same numbers. The shim path (to the proxy's port) and
    the proxy's own traffic are not counted."""
    a = attack.attacker
    before, after = attack.counters_before, attack.counters_after
    attempts = len(expected_bypasses(attack.native))
    assert {a.app, a.other} <= set(after), f"no counting rule per app in the kernel: {after}"
    rose = {app: after[app] - before.get(app, 0) for app in after}
    assert rose[a.app] == attempts, (
        f"expected {a.app}'s counter to rise by {attempts}, one per bypass: {before} -> {after}"
    )
    assert rose[a.other] == 0 and rose["_unassigned"] == 0, (before, after)
    status = attack.status
    assert status.returncode == 0, f"status exited {status.returncode} (drift?):\n{status.stdout}"
    shown = status_counters(status.stdout)
    assert (shown.get(a.app), shown.get(a.other)) == (after[a.app], after[a.other]), (
        f"`egress firewall status` should show the kernel's counters {after}:\n{status.stdout}"
    )
