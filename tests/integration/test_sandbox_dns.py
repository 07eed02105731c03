"""The sandbox DNS listener, end to end: real ``dig`` and ``curl`` as sandbox uids, in a fresh
network namespace, under the firewall controller's own transparent-mode rules.

Each test's namespace carries 10.77.0.1 (the "internet") on its loopback. The proxy's upstream
resolver is a DNS stub on 127.0.0.1 that records every question it is asked (so "nothing left
the node" is checked, not assumed). The sandbox programs ask 10.77.0.53, where nothing listens
on port 53: only the firewall's REDIRECT of port 53 gets them an answer. ``curl`` reads its
nameserver from /etc/resolv.conf, so it runs in a mount namespace of its own where a test file
is bind-mounted over /etc/resolv.conf (the machine's own file is never touched).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.configs import base_config, write_config
from tests.dnsstub import DnsStub
from tests.httpupstream import HttpUpstream
from tests.netns import network_namespace
from tests.processes import run_egress
from tests.support import APP_UID, OTHER_APP_UID, ProxyHandle, run, run_as_uid, running_proxy

pytestmark = pytest.mark.netns

INTERNET_V4 = "10.77.0.1"
INTERNET_V6 = "fd77::1"
# An address outside every special-purpose range (which a wildcard rule may reach); it exists
# only on the namespace's loopback, so nothing sent to it leaves the test.
PUBLIC_V4 = "93.184.215.14"
ABSENT_NAMESERVER = "10.77.0.53"  # local too, but nobody listens on port 53 there
NAMESPACE_ADDRESSES = (
    f"{INTERNET_V4}/32",
    f"{ABSENT_NAMESERVER}/32",
    f"{PUBLIC_V4}/32",
    f"{INTERNET_V6}/128",
)
STRANGER_UID = 10003  # a sandbox uid in no app
DNS_LISTEN = "127.0.0.153:53"


def free_port_both() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (the DNS listener serves both on one)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP")


def dns_config(dns: DnsStub, web_port: int, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """Transparent mode with the DNS listener; fixed ports (the firewall needs them)."""
    return base_config(
        proxy={
            "socks5_listen": [f"127.0.0.1:{free_port_both()}"],
            "http_listen": [],
            "transparent_listen": f"127.0.0.1:{free_port_both()}",
            # As the README advises: a loopback address of its own (so the firewall DNATs to
            # it) and a port below 1024, which no sandbox app can bind while the proxy is down.
            "dns_listen": DNS_LISTEN,
        },
        resolver={"nameservers": [dns.address], "min_ttl": 1.0, "max_ttl": 60.0},
        security={"allow_special": ["10.77.0.0/16", "fd77::/16"]},
        firewall={"mode": "transparent", "sandbox_uids": ["10000-10099"]},
        app=[
            {
                "name": "blog",
                "uids": [str(APP_UID)],
                "allow": [
                    f"web.example.test:{web_port}",
                    "*.cdn.example.test:443",
                    "metadata.example.test:80",
                    "v6.example.test:443",
                ],
            },
            {"name": "shop", "uids": [str(OTHER_APP_UID)], "allow": ["shop.example.test:443"]},
        ],
        **extra,
    )


def records() -> dict[str, list[str]]:
    return {
        "web.example.test": [INTERNET_V4],
        "shop.example.test": [INTERNET_V4],
        "evil.example.test": [INTERNET_V4],
        "a.cdn.example.test": [PUBLIC_V4],
        "b.cdn.example.test": [INTERNET_V4],
        "metadata.example.test": ["169.254.169.254"],
        "v6.example.test": [INTERNET_V6],
    }


def firewall_sync(config: dict[str, Any], tmp_path: Path) -> None:
    """The controller itself installs the rules (transparent mode, the DNS redirect included)."""
    path = write_config(tmp_path / "firewall.toml", config)
    result = run_egress("firewall", "sync", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def dig(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``dig`` as ``uid`` (blocking: call it through ``asyncio.to_thread``)."""
    return run_as_uid(uid, ["dig", f"@{ABSENT_NAMESERVER}", "+tries=1", "+time=3", *args])


def status(output: str) -> str:
    """``NOERROR``/``NXDOMAIN``/``REFUSED`` ... from dig's header line."""
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{output}")


def answers(output: str) -> list[str]:
    """The addresses in dig's ANSWER SECTION."""
    found, inside = [], False
    for line in output.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            inside = True
            continue
        if inside:
            if not line.strip():
                break
            found.append(line.split()[-1])
    return found


def curl(uid: int, url: str, resolv_conf: Path) -> subprocess.CompletedProcess[str]:
    """The real ``curl`` as ``uid``, resolving through the system resolver (glibc) with
    /etc/resolv.conf replaced in a private mount namespace."""
    inner = (
        f"mount --bind {resolv_conf} /etc/resolv.conf && exec setpriv --reuid={uid}"
        f" --regid={uid} --clear-groups curl --silent --show-error --max-time 10 {url}"
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=False,
    )


def dns_records(proxy: ProxyHandle, listener: str = "dns") -> list[dict[str, Any]]:
    return [r for r in proxy.records() if r["listener"] == listener]


async def eventually_records(
    proxy: ProxyHandle, count: int, *, listener: str = "dns"
) -> list[dict[str, Any]]:
    """The log records of ``listener`` once there are ``count`` (or what there is after 5 s:
    the assertions then say what is missing)."""
    deadline = time.monotonic() + 5
    while True:
        found = dns_records(proxy, listener)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def test_dig_gets_answers_only_for_names_its_app_may_reach(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path) as proxy:
                firewall_sync(config, tmp_path)
                allowed = await asyncio.to_thread(dig, APP_UID, "web.example.test", "A")
                over_tcp = await asyncio.to_thread(dig, APP_UID, "+tcp", "WEB.example.test", "A")
                wildcard = await asyncio.to_thread(dig, APP_UID, "a.cdn.example.test", "A")
                private = await asyncio.to_thread(dig, APP_UID, "b.cdn.example.test", "A")
                denied = await asyncio.to_thread(dig, APP_UID, "evil.example.test", "A")
                secret = await asyncio.to_thread(dig, APP_UID, "c2VjcmV0.exfil.example", "A")
                other_app = await asyncio.to_thread(dig, APP_UID, "shop.example.test", "A")
                shop = await asyncio.to_thread(dig, OTHER_APP_UID, "shop.example.test", "A")
                stranger = await asyncio.to_thread(dig, STRANGER_UID, "web.example.test", "A")
                found = await eventually_records(proxy, 9)
                counts = dict(proxy.runtime.metrics.dns_listener_queries)

        assert status(allowed.stdout) == "NOERROR", allowed.stdout
        assert answers(allowed.stdout) == [INTERNET_V4]
        assert status(over_tcp.stdout) == "NOERROR" and answers(over_tcp.stdout) == [INTERNET_V4]
        assert answers(wildcard.stdout) == [PUBLIC_V4]
        # A wildcard rule never reaches a special-purpose address, even an opened one.
        assert status(private.stdout) == "NXDOMAIN"
        assert "may not be given the addresses of b.cdn.example.test" in private.stdout
        assert INTERNET_V4 not in private.stdout  # where an internal name points stays inside
        logged = {r["dest"]: r for r in found}["b.cdn.example.test"]
        assert logged["reason"] == "special_address"
        assert "opened special-purpose range" in logged["error"]
        # A name no rule names: NXDOMAIN, the reason as an Extended DNS Error, and no lookup.
        assert status(denied.stdout) == "NXDOMAIN"
        assert "EDE: 15 (Blocked)" in denied.stdout
        assert "may not connect to evil.example.test" in denied.stdout
        assert status(secret.stdout) == "NXDOMAIN"
        asked = {name for name, _ in stub.queries}
        assert "evil.example.test" not in asked and "c2VjcmV0.exfil.example" not in asked
        assert "web.example.test" in asked
        # Per app: shop's name is not blog's, and a uid in no app is refused.
        assert status(other_app.stdout) == "NXDOMAIN"
        assert status(shop.stdout) == "NOERROR" and answers(shop.stdout) == [INTERNET_V4]
        assert status(stranger.stdout) == "REFUSED"
        assert "belongs to no app" in stranger.stdout
        # Counted and logged, per app and answer.
        assert counts[("blog", "answered")] == 3
        assert counts[("blog", "denied")] == 4
        assert counts[("shop", "answered")] == 1
        assert counts[("_unknown", "refused")] == 1
        by_name = {(r["uid"], r["dest"]): r for r in found}
        web = by_name[(APP_UID, "web.example.test")]
        assert (web["app"], web["decision"], web["answer"], web["qtype"]) == (
            "blog",
            "allowed",
            "answered",
            "A",
        )
        assert web["rule"] == "web.example.test:8080"
        evil = by_name[(APP_UID, "evil.example.test")]
        assert (evil["decision"], evil["reason"], evil["answer"]) == (
            "denied",
            "not_allowed",
            "denied",
        )

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main())


def test_special_addresses_other_types_and_families(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub(records(), ttl=30) as stub:
            config = dns_config(stub, 8080, tmp_path)
            async with running_proxy(config, tmp_path) as proxy:
                firewall_sync(config, tmp_path)
                metadata = await asyncio.to_thread(dig, APP_UID, "metadata.example.test", "A")
                v6 = await asyncio.to_thread(dig, APP_UID, "v6.example.test", "AAAA")
                no_aaaa = await asyncio.to_thread(dig, APP_UID, "web.example.test", "AAAA")
                txt = await asyncio.to_thread(dig, APP_UID, "web.example.test", "TXT")
                denied_txt = await asyncio.to_thread(dig, APP_UID, "evil.example.test", "TXT")
                found = await eventually_records(proxy, 5)

        # A rule names it, but it resolves to the metadata service: no address is handed out.
        assert status(metadata.stdout) == "NXDOMAIN"
        assert "may not be given the addresses of metadata.example.test" in metadata.stdout
        assert "169.254.169.254" not in metadata.stdout  # the app is not told; the log says
        logged = {r["dest"]: r for r in found}["metadata.example.test"]
        assert "169.254.169.254" in logged["error"] and "link-local" in logged["error"]
        assert answers(v6.stdout) == [INTERNET_V6]
        assert status(no_aaaa.stdout) == "NOERROR" and answers(no_aaaa.stdout) == []
        # Only A/AAAA are ever looked up: other types get an empty answer, and no TXT query
        # reaches the upstream (a TXT channel out is closed too).
        assert status(txt.stdout) == "NOERROR" and answers(txt.stdout) == []
        assert status(denied_txt.stdout) == "NXDOMAIN"
        assert all(qtype in ("A", "AAAA") for _, qtype in stub.queries)

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main())


def test_curl_resolves_and_connects_through_a_hostname_rule(loop_kind: str, tmp_path: Path) -> None:
    """The point of it: a program that is not Python, with no proxy settings, resolves an
    allowed name and reaches it through the transparent listener, whose name rule matches the
    address because the DNS listener answered it; a denied name does not even resolve."""

    async def main() -> None:
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(f"nameserver {ABSENT_NAMESERVER}\noptions timeout:2 attempts:1\n")
        with DnsStub(records(), ttl=30) as stub, HttpUpstream("web", host=INTERNET_V4) as web:
            config = dns_config(stub, web.port, tmp_path)
            async with running_proxy(config, tmp_path) as proxy:
                firewall_sync(config, tmp_path)
                url = f"http://web.example.test:{web.port}/hello"
                fetched = await asyncio.to_thread(curl, APP_UID, url, resolv)
                refused = await asyncio.to_thread(
                    curl, APP_UID, f"http://evil.example.test:{web.port}/", resolv
                )
                # By address, with no answer given for it to this app: the name rule cannot
                # match (shop's app never asked for web.example.test).
                by_address = await asyncio.to_thread(
                    curl, OTHER_APP_UID, f"http://{INTERNET_V4}:{web.port}/", resolv
                )
                tunnels = await eventually_records(proxy, 2, listener="transparent")

        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout == "hello /hello from web\n"
        assert web.requests[0]["host"] == f"web.example.test:{web.port}"
        assert refused.returncode == 6, refused.stderr  # curl: could not resolve host
        assert by_address.returncode != 0
        assert len(web.requests) == 1
        allowed = [r for r in tunnels if r["decision"] == "allowed"]
        assert [(r["app"], r["rule"]) for r in allowed] == [
            ("blog", f"web.example.test:{web.port}")
        ]
        assert {"evil.example.test"}.isdisjoint(name for name, _ in stub.queries)

    with network_namespace(addresses=NAMESPACE_ADDRESSES):
        run(loop_kind, main())
