"""SIGHUP's work, in process: what a reload applies live, what it refuses, what needs a restart.

``ProxyRuntime.reload()`` is what the SIGHUP handler runs; these tests call it directly after
rewriting the config file, with real listeners, real DNS stubs and real upstreams.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import types
from pathlib import Path
from typing import Any

import pytest

from egress.net.connection import ListenerKind
from tests.configs import base_config, write_config
from tests.dnsstub import DnsStub
from tests.polling import eventually
from tests.support import (
    APP_UID,
    EchoUpstream,
    ProxyHandle,
    open_as_uid,
    run,
    running_proxy,
    socks5_connect,
)

pytestmark = pytest.mark.root


def loopback(port: int, **sections: Any) -> dict[str, Any]:
    sections.setdefault("security", {"allow_special": ["127.0.0.0/8"]})
    sections.setdefault(
        "app", [{"name": "blog", "uids": [str(APP_UID)], "allow": [f"127.0.0.1:{port}"]}]
    )
    return base_config(**sections)


async def reload_with(proxy: ProxyHandle, data: dict[str, Any]) -> bool:
    write_config(Path(proxy.runtime.config.source), data)
    return await proxy.runtime.reload()


async def connect_code(proxy: ProxyHandle, host: str | bytes, port: int) -> int:
    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
    code = await socks5_connect(reader, writer, host, port)
    writer.close()
    return code


def test_rules_change_live_and_the_log_carries_the_version(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream() as upstream, EchoUpstream() as other:
            data = loopback(upstream.port)
            async with running_proxy(data, tmp_path) as proxy:
                data["log"]["connection_log"] = str(proxy.log_path)
                assert await connect_code(proxy, "127.0.0.1", other.port) == 0x02
                changed = copy.deepcopy(data)
                changed["app"][0]["allow"] = [f"127.0.0.1:{other.port}"]
                assert await reload_with(proxy, changed)
                assert await connect_code(proxy, "127.0.0.1", other.port) == 0
                # The same rules again are not a new version.
                assert await reload_with(proxy, changed)
                records = await proxy.wait_records(2)
                version = proxy.runtime.holder.current.version
        assert [r["rules_version"] for r in records] == [0, 1]  # the file's version, then +1
        assert version == 1

    run(loop_kind, main())


def test_a_bad_file_changes_nothing_and_is_counted(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream() as upstream:
            data = loopback(upstream.port)
            async with running_proxy(data, tmp_path) as proxy:
                data["log"]["connection_log"] = str(proxy.log_path)
                bad = copy.deepcopy(data)
                bad["app"][0]["allow"] = ["not a rule"]
                bad["proxy"]["handshake_timeout"] = 0.1
                assert not await reload_with(proxy, bad)
                assert proxy.runtime.context.settings.handshake_timeout == 2.0
                assert await connect_code(proxy, "127.0.0.1", upstream.port) == 0
                registry = proxy.runtime.metrics.registry
                errors = registry.get_sample_value(
                    "egress_config_reloads_total", {"result": "error"}
                )
        assert errors == 1.0

    run(loop_kind, main())


def test_resolver_log_and_proxy_knobs_apply_live(
    loop_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        with (
            DnsStub({"svc.example.test": ["127.0.0.1"]}) as first,
            DnsStub({"svc.example.test": ["127.0.0.1"]}) as second,
        ):
            async with EchoUpstream() as upstream:
                data = loopback(
                    upstream.port,
                    resolver={"nameservers": [first.address]},
                    app=[
                        {
                            "name": "blog",
                            "uids": [str(APP_UID)],
                            "allow": [f"svc.example.test:{upstream.port}"],
                        }
                    ],
                )
                async with running_proxy(data, tmp_path) as proxy:
                    data["log"]["connection_log"] = str(proxy.log_path)
                    assert await connect_code(proxy, b"svc.example.test", upstream.port) == 0
                    assert first.query_count("svc.example.test") > 0
                    changed = copy.deepcopy(data)
                    changed["resolver"]["nameservers"] = [second.address]
                    changed["proxy"]["handshake_timeout"] = 1.5
                    changed["log"]["level"] = "debug"
                    moved = tmp_path / "moved.log"
                    changed["log"]["connection_log"] = str(moved)
                    assert await reload_with(proxy, changed)
                    # The log's writer thread opens the new file; wait for it before this test
                    # switches its effective uid (seteuid applies to every thread) to connect.
                    connlog = proxy.runtime.connlog
                    await eventually(lambda: connlog.target == str(moved), "log reopened")
                    assert proxy.runtime.context.settings.handshake_timeout == 1.5
                    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
                    # A fresh resolver: the old cache is gone, the new server is asked.
                    assert await connect_code(proxy, b"svc.example.test", upstream.port) == 0
                    assert second.query_count("svc.example.test") > 0
                    proxy.runtime.connlog.flush()
                    await eventually(
                        lambda: moved.exists() and moved.read_text().count("\n") >= 1,
                        "a log line in the new connection_log",
                    )
                    assert proxy.runtime.config.log.connection_log == str(moved)

    logging.getLogger().setLevel(logging.INFO)
    try:
        run(loop_kind, main())
    finally:
        logging.getLogger().setLevel(logging.WARNING)


def test_listener_changes_need_a_restart_and_are_named(
    loop_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with EchoUpstream() as upstream:
            data = loopback(upstream.port)
            async with running_proxy(data, tmp_path) as proxy:
                data["log"]["connection_log"] = str(proxy.log_path)
                before = proxy.runtime.config.proxy.socks5_listen
                changed = copy.deepcopy(data)
                changed["proxy"]["socks5_listen"] = ["127.0.0.1:0", "[::1]:0"]
                changed["proxy"]["idle_timeout"] = 7.0
                with caplog.at_level(logging.WARNING, logger="egress.runtime"):
                    assert await reload_with(proxy, changed)
                config = proxy.runtime.config
                # The running config still describes the listeners that are bound ...
                assert config.proxy.socks5_listen == before
                # ... and what could be applied was.
                assert config.proxy.idle_timeout == 7.0
        (warning,) = [r for r in caplog.records if "restart" in r.getMessage()]
        assert getattr(warning, "keys", "") == "proxy.socks5_listen"

    run(loop_kind, main())


def test_opening_a_special_range_recompiles_the_rules(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with EchoUpstream() as upstream:
            data = loopback(upstream.port, security={"allow_special": []})
            async with running_proxy(data, tmp_path) as proxy:
                data["log"]["connection_log"] = str(proxy.log_path)
                assert await connect_code(proxy, "127.0.0.1", upstream.port) == 0x02
                changed = copy.deepcopy(data)
                changed["security"]["allow_special"] = ["127.0.0.0/8"]
                assert await reload_with(proxy, changed)
                assert await connect_code(proxy, "127.0.0.1", upstream.port) == 0
                first, second = await proxy.wait_records(2)
        assert first["reason"] == "special_address"
        assert second["reason"] == "allowed"
        # One version names one policy: the same apps under other exceptions are a new one.
        assert (first["rules_version"], second["rules_version"]) == (0, 1)

    run(loop_kind, main())


def test_logrotate_moves_the_log_and_sighup_reopens_it(loop_kind: str, tmp_path: Path) -> None:
    """logrotate renames the file, then sends SIGHUP: lines before go to the moved file,
    lines after to a new file at the configured path."""

    async def main() -> None:
        async with EchoUpstream() as upstream:
            data = loopback(upstream.port)
            async with running_proxy(data, tmp_path) as proxy:
                assert await connect_code(proxy, "127.0.0.1", upstream.port) == 0
                await proxy.wait_records(1)
                rotated = proxy.log_path.with_suffix(".log.1")
                proxy.log_path.rename(rotated)
                data["log"]["connection_log"] = str(proxy.log_path)
                assert await proxy.runtime.reload()  # what logrotate's postrotate triggers
                # The writer thread reopens the path; wait before switching uids to connect
                # (seteuid applies to every thread of the process).
                await eventually(proxy.log_path.exists, "the log file recreated")
                assert await connect_code(proxy, "127.0.0.1", upstream.port) == 0
                after = await proxy.wait_records(1)
        before = [line for line in rotated.read_text().splitlines() if line]
        assert len(before) == 1 and len(after) == 1
        assert after[0]["ts"] >= json.loads(before[0])["ts"]

    run(loop_kind, main())


def test_a_file_that_breaks_the_parser_changes_nothing(loop_kind: str, tmp_path: Path) -> None:
    """Whatever the file holds, a reload never takes the running proxy down."""

    async def main() -> None:
        async with EchoUpstream() as upstream:
            data = loopback(upstream.port)
            async with running_proxy(data, tmp_path) as proxy:
                path = Path(proxy.runtime.config.source)
                path.write_text(path.read_text() + "\nx = " + "[" * 5000 + "]" * 5000 + "\n")
                assert not await proxy.runtime.reload()
                assert await connect_code(proxy, "127.0.0.1", upstream.port) == 0
                errors = proxy.runtime.metrics.registry.get_sample_value(
                    "egress_config_reloads_total", {"result": "error"}
                )
        assert errors == 1.0

    run(loop_kind, main())


def test_reloads_under_load_leave_nothing_frozen_behind(tmp_path: Path) -> None:
    """After each install the survivors are frozen out of the collector's way (uvloop); none of
    the proxy's garbage may be among them: once unfrozen, a collection finds none of its objects
    (config reading, rules, connections, transports), however many tunnels were open during the
    reloads and have closed since."""

    mine: set[int] = set()  # ids of this test's loop and the proxy's transports

    async def main() -> list[object]:
        mine.add(id(asyncio.get_running_loop()))
        async with EchoUpstream() as upstream:
            data = loopback(upstream.port)
            data["app"] += [  # enough of a config that its reading outlives the young generations
                {"name": f"app{i}", "uids": [str(20000 + i)], "allow": [f"a{i}.example.com:443"]}
                for i in range(3000)
            ]
            async with running_proxy(data, tmp_path) as proxy:
                data["log"]["connection_log"] = str(proxy.log_path)
                tunnels = []
                for _ in range(50):
                    reader, writer = await open_as_uid(APP_UID, *proxy.address(ListenerKind.SOCKS5))
                    assert await socks5_connect(reader, writer, "127.0.0.1", upstream.port) == 0
                    tunnels.append(writer)
                frozen = gc.get_freeze_count()
                for round_ in range(3):  # the rules change each time: three installs
                    changed = copy.deepcopy(data)
                    changed["app"][0]["allow"].append(f"api{round_}.example.com:443")
                    write_config(Path(proxy.runtime.config.source), changed)
                    gc.collect()  # the test's own garbage (tomlkit's) is not the proxy's
                    assert await proxy.runtime.reload()
                assert gc.get_freeze_count() > frozen  # it did freeze (uvloop)
                for connection in proxy.connections():
                    mine.add(id(connection.transport))
                    if connection.dialled is not None:
                        mine.add(id(connection.dialled.upstream.transport))
                for writer in tunnels:
                    writer.close()
                await proxy.wait_records(50)
        gc.collect()  # garbage made since the last freeze is collected as usual ...
        gc.unfreeze()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()  # ... what is left had been frozen
            return list(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    gc.collect()
    try:
        garbage = run("uvloop", main())
    finally:
        gc.unfreeze()
    # The proxy's own objects; earlier tests' loops and transports may die late in this
    # process and are not this test's business.
    ours = sorted(
        {
            f"{type(o).__module__}.{type(o).__qualname__}"
            for o in garbage
            if type(o).__module__.split(".")[0] in ("egress", "rules") or id(o) in mine
        }
    )
    assert ours == [], f"frozen garbage of the proxy: {ours}; {cycle_hints(garbage)}"


def cycle_hints(garbage: list[object]) -> str:
    """What usually closes a cycle around a runtime: an exception (its traceback holds the
    frames, the frames hold the objects) or a frame itself. Said on failure, to find it."""
    frames = sorted({o.f_code.co_qualname for o in garbage if isinstance(o, types.FrameType)})
    errors = sorted({repr(o)[:120] for o in garbage if isinstance(o, BaseException)})
    return f"frames in the garbage: {frames[:20]}; exceptions: {errors[:10]}"


def test_concurrent_reloads_are_one_at_a_time(tmp_path: Path) -> None:
    """A SIGHUP, the config watcher and a caller may reload at once: each succeeds, and one
    change is one new version (two reads versioned against the same rules used to collide)."""

    async def main() -> None:
        async with EchoUpstream() as upstream, EchoUpstream() as other:
            data = loopback(upstream.port)
            async with running_proxy(data, tmp_path) as proxy:
                before = proxy.runtime.holder.current.version
                changed = copy.deepcopy(data)
                changed["app"][0]["allow"].append(f"127.0.0.1:{other.port}")
                write_config(Path(proxy.runtime.config.source), changed)
                results = await asyncio.gather(*(proxy.runtime.reload() for _ in range(3)))
                assert results == [True, True, True]
                assert proxy.runtime.holder.current.version == before + 1
                assert await connect_code(proxy, "127.0.0.1", other.port) == 0

    run("uvloop", main())
