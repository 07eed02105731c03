"""One app cannot slow another: what one tenant controls (its DNS answers, its handshakes)
costs bounded work on the shared event loop.

A tenant with a wildcard rule on a zone it controls can publish a name with thousands of
A/AAAA records. Before the fix, each connection to it cost about a second of loop time even
from the cache, and four such connections delayed another app's connect by seconds. Here the
noisy app hammers such a name while a quiet app's connections must stay quick.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from egress.net.connection import ListenerKind
from tests.configs import base_config
from tests.dnsstub import DnsStub
from tests.netns import network_namespace
from tests.support import (
    APP_UID,
    OTHER_APP_UID,
    EchoUpstream,
    open_as_uid,
    run,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.netns

BIG_NAME = "big.noisy.test"
# Public addresses: inside the test's network namespace nothing routes to them, so each dial
# fails at once (network unreachable) and the test measures the policy path, not timeouts.
V4 = [f"11.{i // 250}.{i % 250}.1" for i in range(3000)]
V6 = [f"2600:1::{i:x}" for i in range(1000)]


def test_a_huge_dns_answer_does_not_slow_another_app(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        with DnsStub({BIG_NAME: V4 + V6}, ttl=300, truncate_udp=True) as dns:
            async with EchoUpstream() as upstream:
                config = base_config(
                    resolver={"nameservers": [dns.address], "timeout": 5.0},
                    security={"allow_special": ["127.0.0.0/8"]},
                    app=[
                        {"name": "noisy", "uids": [str(APP_UID)], "allow": ["*.noisy.test:443"]},
                        {
                            "name": "quiet",
                            "uids": [str(OTHER_APP_UID)],
                            "allow": [f"127.0.0.1:{upstream.port}"],
                        },
                    ],
                )
                async with running_proxy(config, tmp_path) as proxy:
                    socks = proxy.address(ListenerKind.SOCKS5)

                    async def noisy(count: int) -> None:
                        for _ in range(count):
                            reader, writer = await open_as_uid(APP_UID, *socks)
                            code = await socks5_connect(reader, writer, BIG_NAME.encode(), 443)
                            assert code in {0x03, 0x04}, code  # unreachable
                            writer.close()

                    await noisy(1)  # the answer is cached from here on
                    stats = proxy.runtime.resolver.statistics()
                    assert stats.answers_truncated >= 1

                    async def quiet(count: int) -> float:
                        worst = 0.0
                        for _ in range(count):
                            started = time.perf_counter()
                            reader, writer = await open_as_uid(OTHER_APP_UID, *socks)
                            assert (
                                await socks5_connect(reader, writer, "127.0.0.1", upstream.port)
                                == 0
                            )
                            writer.write(b"q")
                            assert await reader.readexactly(1) == b"q"
                            worst = max(worst, time.perf_counter() - started)
                            writer.close()
                        return worst

                    results = await asyncio.gather(*(noisy(25) for _ in range(8)), quiet(30))
                    worst = results[-1]
                    assert isinstance(worst, float)
                    records = await proxy.wait_records(1 + 8 * 25 + 30)
        noisy_records = [r for r in records if r["app"] == "noisy"]
        assert {r["reason"] for r in noisy_records} == {"unreachable"}
        # At most max_attempts of the capped, checked addresses were dialled per connection.
        assert all(r["dialed"] is None for r in noisy_records)
        assert worst < 0.5, f"the quiet app waited {worst:.3f} s for a connection"

    with network_namespace():
        run(loop_kind, main(), timeout=60)
