"""urllib3's own test suite, run twice as one test uid: plainly, then under the socket shim with
a real ``egress proxy``; every test must end the same way both times.

urllib3's suite starts its own servers on loopback (raw socket servers, hypercorn over trio,
TLS with trustme certificates, HTTP and SOCKS proxies of its own), so under the shim every
connection it makes goes through the proxy, whose rules for the app allow loopback and the
tarpit below: about 800 connections relayed and 100 refused or failed as the tests expect
(connection refused, connect timeouts, NXDOMAIN), made by code written with no thought of
egress: timeouts of every kind, half-closed sockets, TLS, ``getpeername``, non-blocking
connects, proxies inside the app.

Both runs happen in one fresh network namespace with only loopback, so neither can reach
anything else. Its loopback also carries a route for 240.0.0.0/4, so packets to urllib3's
``TARPIT_HOST`` (240.0.0.0) are dropped unanswered: the connect-timeout tests time out as on a
machine with a default route, and nothing leaves the namespace. The proxy's DNS is a stub that
knows no name (the suite's other names are ``*.invalid``).

``scripts/third-party-suite`` runs :func:`main` (the same code) by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.configs import base_config, write_config
from tests.dnsstub import DnsStub
from tests.netns import network_namespace
from tests.processes import EgressProcess, start_proxy
from tests.sandboxing import SYSTEM_PYTHON, shim_environment, uv_path
from tests.support import APP_UID, read_connection_log

pytestmark = pytest.mark.netns

URLLIB3 = "2.8.0"
URLLIB3_SDIST_SHA256 = "63bf2ead4c879426ebf22ef2a781eeb4aa3b4ae798a0435506f8687fd5bb9b63"
# urllib3's "test" and "dev" dependency groups at the versions of its own uv.lock. The lock's
# hypercorn is urllib3's fork of 0.15.0, which is not on PyPI: the tests that need the fork are
# deselected below.
TEST_REQUIREMENTS = (
    "anyio[trio]==4.13.0",
    "cryptography==49.0.0",
    "h2==4.3.0",
    "httpx==0.28.1",
    "hypercorn==0.15.0",
    "idna==3.13",
    "pyopenssl==26.3.0",
    "pysocks==1.7.1",
    "pytest==9.1.1",
    "pytest-socket==0.7.0",
    "pytest-timeout==2.4.0",
    "quart==0.20.0",
    "quart-trio==0.12.0",
    "trio==0.33.0",
    "trustme==1.2.1",
)
# What those pull in, at the versions the comparison was measured with.
TRANSITIVE_REQUIREMENTS = (
    *("aiofiles==25.1.0", "attrs==26.1.0", "blinker==1.9.0", "certifi==2026.10.19.post1"),
    *("cffi==2.1.1", "click==8.5.1", "exceptiongroup==1.3.2", "flask==3.1.3", "h11==0.16.0"),
    *("hpack==4.2.0", "httpcore==1.0.9", "hyperframe==6.1.0", "iniconfig==2.3.1"),
    *("itsdangerous==2.2.0", "jinja2==3.1.6", "markupsafe==3.0.4", "outcome==1.3.0.post0"),
    *("packaging==26.4", "pluggy==1.7.0", "priority==2.0.0", "pycparser==3.12"),
    *("pygments==2.21.0", "sniffio==1.3.1", "sortedcontainers==2.4.0"),
    *("typing-extensions==4.16.0", "werkzeug==3.1.9", "wsproto==1.3.2"),
)
TARPIT = "240.0.0.0"  # urllib3's TARPIT_HOST on Linux
APP = "urllib3-suite"

# Left out of both runs, each for a reason said once here. Two kinds: tests that cannot pass
# here with or without the shim, and the differences the shim makes on purpose or by design
# (measured: each of these ends differently with the shim, and only these).
IGNORED = ("test/contrib/emscripten",)  # needs Pyodide and a browser
HTTPS = "test/with_dummyserver/test_https.py"
PYOPENSSL = "test/contrib/test_pyopenssl.py"
PROXIES = "test/with_dummyserver/test_proxy_poolmanager.py"
SOCKS = "test/contrib/test_socks.py"
SOCKET_LEVEL = "test/with_dummyserver/test_socketlevel.py"
CHUNKED = "test/with_dummyserver/test_chunked_transfer.py::TestChunkedTransfer"
TLS_CLASSES = [f"{m}::TestHTTPS_TLSv1_{v}" for m in (HTTPS, PYOPENSSL) for v in (2, 3)]

NEEDS_FORK = "fails without the shim too: needs urllib3's hypercorn fork (not on PyPI)"
NO_FQDN = (
    "skips without the shim, as this machine's resolver cannot resolve 'localhost.' (its"
    " /etc/hosts has 'localhost' only, its DNS neither), and passes with it: the shim answers"
    " 'localhost' and 'localhost.' itself, as loopback (RFC 6761)"
)
SOURCE_PORT = (
    "the test server checks the client's source port, but through egress its peer is the"
    " proxy's socket: the app's own port (getsockname) is the one it has towards the proxy"
)
TRIO_BLOCKED = (
    "shim limitation: the dummy proxy (hypercorn on trio) dials the tarpit with a non-blocking"
    " socket outside asyncio, so the shim's handshake blocks trio's loop until the egress proxy"
    " gives up (connect_timeout), and the client's next TLS handshake with it times out"
)
ONE_MS_CONNECT = (
    "needs a connect to a loopback server to finish within urllib3's SHORT_TIMEOUT (1 ms),"
    " which then expects a read timeout; through egress a connect is a round trip through the"
    " proxy (0.3 ms median, over 1 ms now and then on 2 busy cores), so it fails at random"
)
NAME_IN_CONNECT = (
    "expects a name error with a 1 ms timeout; under the shim the proxy resolves the name"
    " inside connect(), so the lookup counts against the connect timeout, and the NXDOMAIN"
    " comes back in time only when the proxy has it cached from an earlier test"
)
POOL_TIMEOUTS = "test/with_dummyserver/test_connectionpool.py::TestConnectionPoolTimeouts"
PYOPENSSL = "test/contrib/test_pyopenssl.py"
DESELECTED: dict[str, str] = {
    # The "tls" ASGI scope extension (HTTP 500, KeyError: 'tls').
    **{
        f"{cls}::{test}": NEEDS_FORK
        for cls in TLS_CLASSES
        for test in (
            "test_client_intermediate",
            "test_client_key_password",
            "test_alpn_default[h11]",
            "test_alpn_default[h2]",
            "test_http2_probe_result_is_cached[h11]",
            "test_http2_probe_result_is_cached[h2]",
        )
    },
    # The dummy CONNECT proxy needs the fork's scope["_transport"] (KeyError: '_transport').
    **{
        f"{PROXIES}::{test}": NEEDS_FORK
        for test in (
            *(
                f"TestHTTPProxyManager::{name}"
                for name in (
                    "test_basic_proxy",
                    "test_https_proxy",
                    "test_is_verified_http_proxy_to_https_target",
                    "test_is_verified_https_proxy_to_https_target",
                    "test_http_and_https_kwarg_ca_cert_data_proxy",
                    "test_https_proxy_with_proxy_ssl_context",
                    "test_oldapi",
                    "test_proxy_verified",
                    "test_cross_protocol_redirect",
                    "test_headers",
                    "test_https_headers",
                    "test_proxy_pooling",
                    "test_forwarding_non_https_proxy_ssl_context_fallback",
                    "test_scheme_host_case_insensitive",
                    "test_proxy_https_fqdn",  # also NO_FQDN
                )
            ),
            *(
                f"TestHTTPSProxyVerification::{name}"
                for name in (
                    "test_https_proxy_assert_fingerprint_md5",
                    "test_https_proxy_assert_hostname[localhost]",
                    "test_https_proxy_assert_hostname[127.0.0.1]",
                    "test_https_proxy_ipv4_san",
                    "test_https_proxy_ipv6_san",
                    "test_https_proxy_no_san_hostname_checks_common_name",
                )
            ),
        )
    },
    **{f"{cls}::test_dotted_fqdn": NO_FQDN for cls in TLS_CLASSES},
    "test/test_poolmanager.py::TestPoolManager::test_same_url": NO_FQDN,
    f"{SOCKET_LEVEL}::TestHeaders::test_request_host_header_ignores_fqdn_dot": NO_FQDN,
    f"{SOCKS}::TestSocks5Proxy::test_source_address_works": SOURCE_PORT,
    f"{CHUNKED}::test_preserve_chunked_on_redirect": SOURCE_PORT,
    f"{CHUNKED}::test_preserve_chunked_on_broken_connection": SOURCE_PORT,
    **{
        f"{POOL_TIMEOUTS}::{test}": ONE_MS_CONNECT
        for test in ("test_timeout_float", "test_conn_closed", "test_timeout", "test_total_timeout")
    },
    f"{SOCKET_LEVEL}::TestSocketClosing::test_connection_read_timeout": ONE_MS_CONNECT,
    "test/with_dummyserver/test_connectionpool.py::TestRetry::test_disabled_retry": (
        NAME_IN_CONNECT
    ),
    f"{SOCKET_LEVEL}::TestSSL::test_ssl_load_default_certs_when_empty": ONE_MS_CONNECT,
    # The same socket-level tests, run again by the pyOpenSSL module under its own class names.
    f"{PYOPENSSL}::TestSocketClosing::test_connection_read_timeout": ONE_MS_CONNECT,
    f"{PYOPENSSL}::TestSocketSSL::test_ssl_load_default_certs_when_empty": ONE_MS_CONNECT,
    # All five: the three that fail leave trio's loop blocked for the tests after them.
    **{
        f"{PROXIES}::TestHTTPProxyManager::{test}": TRIO_BLOCKED
        for test in (
            "test_forwarding_proxy_request_timeout[http-http-False]",
            "test_forwarding_proxy_request_timeout[https-http-False]",
            "test_forwarding_proxy_request_timeout[https-https-True]",
            "test_tunneling_proxy_request_timeout[http-https]",
            "test_tunneling_proxy_request_timeout[https-https]",
        )
    },
}


@dataclass
class Run:
    """One run of the suite: each test's outcome, by test id."""

    outcomes: dict[str, str]
    returncode: int
    seconds: float
    tail: str

    def counts(self) -> Counter[str]:
        return Counter(self.outcomes.values())


@dataclass
class Comparison:
    """Both runs, and the reruns of the tests that ended differently (``again``: each such
    test's outcomes in every plain and every shim run). A difference counts only when no plain
    run ever ended the way a shim run did: urllib3 has a few tests that fail now and then on a
    busy machine (an unclosed socket collected during the next test), with or without the shim.
    """

    plain: Run
    shim: Run
    again: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)
    connections: list[dict[str, Any]] = field(default_factory=list)

    def first_differences(self) -> list[str]:
        ids = self.plain.outcomes.keys() | self.shim.outcomes.keys()
        return sorted(t for t in ids if self.plain.outcomes.get(t) != self.shim.outcomes.get(t))

    def outcomes(self, test: str) -> tuple[set[str], set[str]]:
        plain, shim = self.again.get(test, (set(), set()))
        return (
            {self.plain.outcomes.get(test, "absent"), *plain},
            {self.shim.outcomes.get(test, "absent"), *shim},
        )

    def differences(self) -> dict[str, tuple[list[str], list[str]]]:
        """The tests that never ended the same way with and without the shim."""
        found = {}
        for test in self.first_differences():
            plain, shim = self.outcomes(test)
            if not plain & shim:
                found[test] = (sorted(plain), sorted(shim))
        return found

    def flaky(self) -> dict[str, tuple[list[str], list[str]]]:
        """Tests that differed in the first runs but ended the same in some rerun."""
        confirmed = self.differences()
        found = {}
        for test in self.first_differences():
            if test not in confirmed:
                plain, shim = self.outcomes(test)
                found[test] = (sorted(plain), sorted(shim))
        return found

    def summary(self) -> dict[str, Any]:
        decisions = Counter(f"{r.get('decision')}:{r.get('reason')}" for r in self.connections)
        return {
            "plain": {"counts": dict(self.plain.counts()), "seconds": round(self.plain.seconds)},
            "shim": {"counts": dict(self.shim.counts()), "seconds": round(self.shim.seconds)},
            "differences": self.differences(),
            "flaky": self.flaky(),
            "proxy_connections": dict(decisions),
        }


# --- the suite's environment ---------------------------------------------------------------------
def suite_home() -> Path:
    """urllib3's sdist unpacked beside a virtualenv holding it and its test dependencies, built
    once per version set under the temp directory and readable by every test uid."""
    requirements = (*TEST_REQUIREMENTS, *TRANSITIVE_REQUIREMENTS)
    key = hashlib.sha256(repr((URLLIB3, requirements, SYSTEM_PYTHON)).encode()).hexdigest()
    home = Path(tempfile.gettempdir()) / f"egress-urllib3-suite-{key[:10]}"
    if (home / "ready").exists():
        return home
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    uv, venv = uv_path(), home / "venv"
    python = venv / "bin" / "python"
    subprocess.run([uv, "venv", "-q", "--seed", "--python", SYSTEM_PYTHON, str(venv)], check=True)
    subprocess.run(
        [python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-binary", ":all:", "-d", str(home), f"urllib3=={URLLIB3}"],
        check=True, timeout=300,
    )  # fmt: skip
    sdist = home / f"urllib3-{URLLIB3}.tar.gz"
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    assert digest == URLLIB3_SDIST_SHA256, f"{sdist}: sha256 {digest}, not the pinned one"
    with tarfile.open(sdist) as archive:
        archive.extractall(home, filter="data")
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(python), str(sdist), *requirements],
        check=True, timeout=600,
    )  # fmt: skip
    subprocess.run(["chmod", "-R", "a+rX", str(home)], check=True)
    (home / "ready").touch()
    return home


# --- one run --------------------------------------------------------------------------------------
def outcomes_from_junit(path: Path) -> dict[str, str]:
    """Each test's outcome from pytest's JUnit XML: passed, failed, error, skipped or xfailed.

    A test reported twice (an error in teardown after it passed) keeps the worse outcome.
    """
    rank = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        test = node_id(case.get("classname", ""), case.get("name", ""))
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "error"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        if rank[outcome] >= rank.get(outcomes.get(test, "passed"), 0):
            outcomes[test] = outcome
    return outcomes


def node_id(classname: str, name: str) -> str:
    """pytest's id for a JUnit test case: ``test.mod.TestClass`` -> ``test/mod.py::TestClass``."""
    parts = classname.split(".")
    if parts[-1][:1].isupper():
        return f"{'/'.join(parts[:-1])}.py::{parts[-1]}::{name}"
    return f"{'/'.join(parts)}.py::{name}"


def run_suite(
    home: Path, uid: int, env: Mapping[str, str], report_dir: Path, name: str, *,
    extra: Sequence[str] = (),
) -> Run:  # fmt: skip
    """Run urllib3's tests as ``uid`` from its unpacked sdist, with ``env`` and nothing else."""
    tree = home / f"urllib3-{URLLIB3}"
    junit = report_dir / f"{name}.xml"
    command = [
        str(home / "venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "--timeout", "30", "-o", "log_level=WARNING", f"--junitxml={junit}",
        *(f"--ignore={path}" for path in IGNORED),
        *(f"--deselect={test}" for test in DESELECTED),
        *(extra or ["test"]),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, user=uid, group=uid, extra_groups=[], cwd=tree, env=dict(env),
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert junit.exists(), f"the {name} run wrote no report (exit {result.returncode}):\n{tail}"
    return Run(outcomes_from_junit(junit), result.returncode, seconds, tail)


def base_environment() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        "LANG": "C.UTF-8",
        "CI": "true",  # urllib3 then allows its LONG_TIMEOUT 0.5 s rather than 0.1 s
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def proxy_config(port: int, nameserver: str, log: Path) -> dict[str, Any]:
    """The suite's app may reach loopback and the tarpit. (The shim answers ``localhost``
    itself, so the proxy sees loopback addresses only.)"""
    return base_config(
        proxy={
            "socks5_listen": [f"127.0.0.1:{port}"],
            "http_listen": [],
            "handshake_timeout": 10.0,
            "connect_timeout": 10.0,
            "idle_timeout": 120.0,
        },
        resolver={"nameservers": [nameserver], "negative_ttl": 1.0},
        security={"allow_special": ["127.0.0.0/8", "::1/128", f"{TARPIT}/32"]},
        log={"connection_log": str(log)},
        app=[
            {
                "name": APP,
                "uids": [str(APP_UID)],
                "allow": ["127.0.0.0/8:*", "[::1]:*", f"{TARPIT}:*"],
            }
        ],
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def suite_namespace() -> Iterator[None]:
    """This thread (and what it starts) in a fresh namespace: loopback, plus the tarpit route."""
    with network_namespace() as namespace:
        namespace.check(["ip", "route", "add", "240.0.0.0/4", "dev", "lo"])
        yield


def compare(workdir: Path, extra: Sequence[str] = (), *, reruns: int = 2) -> Comparison:
    """Both runs, in one fresh network namespace, then ``reruns`` more of each for the tests
    that ended differently; the runs' JUnit XML is kept in ``workdir/reports``."""
    home = suite_home()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "connections.log"
    # Written by the test uid, so not under a private tmp_path; copied to workdir after.
    reports = Path(tempfile.mkdtemp(prefix="egress-urllib3-reports-"))
    reports.chmod(0o777)
    try:
        with suite_namespace(), DnsStub() as dns:  # the stub knows no name: all are NXDOMAIN
            port = free_port()
            config = write_config(workdir / "egress.toml", proxy_config(port, dns.address, log))
            with start_proxy(config) as proxy:
                envs = {
                    "plain": base_environment(),
                    "shim": shim_environment(
                        ("127.0.0.1", port), listen="any", extra=base_environment()
                    ),
                }
                plain = run_suite(home, APP_UID, envs["plain"], reports, "plain", extra=extra)
                shim = run_suite(home, APP_UID, envs["shim"], reports, "shim", extra=extra)
                result = Comparison(plain, shim)
                for attempt in range(reruns):
                    tests = list(result.differences())
                    if not tests:
                        break
                    for index, mode in enumerate(("plain", "shim")):
                        run = run_suite(
                            home, APP_UID, envs[mode], reports, f"{mode}-again-{attempt}",
                            extra=tests,
                        )  # fmt: skip
                        for test in tests:
                            seen = result.again.setdefault(test, (set(), set()))
                            seen[index].add(run.outcomes.get(test, "absent"))
                stop_gracefully(proxy)
        result.connections = read_connection_log(log)
        return result
    finally:
        shutil.copytree(reports, workdir / "reports", dirs_exist_ok=True)
        shutil.rmtree(reports, ignore_errors=True)


def stop_gracefully(proxy: EgressProcess) -> None:
    """SIGTERM, so the connection log is flushed; the proxy must still have been running."""
    assert proxy.proc.poll() is None, f"the proxy exited during the run: {proxy.logs()[-20:]}"
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=15) == 0, proxy.logs()[-20:]


# --- the test -------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_urllib3_suite_ends_the_same_under_the_shim(tmp_path: Path) -> None:
    """Every one of urllib3's tests ends as it does without the shim, and the shim run really
    went through the proxy: hundreds of allowed connections, all made by the app's uid."""
    result = compare(tmp_path)
    summary = json.dumps(result.summary(), indent=1)
    for run in (result.plain, result.shim):
        assert run.counts()["passed"] > 2000, run.tail
    assert not result.differences(), summary
    assert len(result.flaky()) <= 3, summary  # a few at most, each ending the same in a rerun
    allowed = [r for r in result.connections if r.get("decision") == "allowed"]
    assert len(allowed) > 500, summary
    assert {r["uid"] for r in allowed} == {APP_UID}
    assert {r["app"] for r in allowed} == {APP}


# --- by hand: scripts/third-party-suite ---------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/third-party-suite",
        description="Run urllib3's test suite plainly and under the egress shim; compare.",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the proxy's files here")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for urllib3's pytest")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("third-party-suite needs root (a network namespace, a test uid)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="egress-urllib3-"))
    result = compare(workdir, args.pytest_args)
    print(json.dumps(result.summary(), indent=1))
    return 1 if result.differences() else 0


if __name__ == "__main__":
    sys.exit(main())
