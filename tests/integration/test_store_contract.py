"""The rule store's contract, run against every backend, then what only Redis can get wrong.

Every test drives :class:`rules.stores.base.RuleStore` (the service the CLI, the admin API and
the followers use) over a real backend: the memory backend, and ``RedisBackend`` against a real
``redis-server`` on a loopback port. A backend joins the contract with one entry in
:data:`BACKENDS`: a function that returns an opener of backends over one shared storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egress.config import parse_config
from rules.apps import App, Limits, Mode, RuleSet, UidRange
from rules.document import app_etag, app_from_data, app_to_data
from rules.edits import (
    AddRules,
    CreateApp,
    DeleteApp,
    EditConflictError,
    PutApp,
    RemoveRules,
    ReplaceAll,
    UnknownAppError,
    UpdateApp,
)
from rules.model import Rule
from rules.parse import parse_rule
from rules.problems import InvalidRuleSetError
from rules.stores.base import Actor, RuleStore, StoreBackend, StoreState
from rules.stores.errors import StoreConflictError, StoreUnavailableError
from rules.stores.file import FileBackend
from rules.stores.memory import MemoryBackend
from rules.stores.redis import RedisBackend
from tests.polling import eventually
from tests.redisserver import RedisServer, redis_server_fixture  # noqa: F401  (redis_server)
from tests.support import run

ALICE = Actor("alice", "api", "admin-1")
BOB = Actor("bob", "cli", "node-7")

# --- backends under test ----------------------------------------------------------------------
Opener = Callable[[int], StoreBackend]
"""``audit_max_records`` -> a new backend instance over the test's one shared storage."""


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    shared: list[MemoryBackend] = []  # one process: every "instance" is the same backend

    def open_backend(audit_max_records: int) -> StoreBackend:
        if not shared:
            shared.append(MemoryBackend(audit_max_records=audit_max_records))
        return shared[0]

    return open_backend


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    server: RedisServer = request.getfixturevalue("redis_server")

    def open_backend(audit_max_records: int) -> StoreBackend:
        return RedisBackend.from_url(
            server.url, audit_max_records=audit_max_records, display_url=server.url
        )

    return open_backend


def _file(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """A config file holding the apps; every instance opens it as the CLI and the admin API
    do (egress's whole-config check before each write), polling it often for the feed."""
    config = tmp_path / "egress.toml"
    config.write_text(
        "# the apps below are edited by the store\n"
        '[proxy]\nsocks5_listen = ["127.0.0.1:1080"]\n\n[rules]\nstore = "file"\n'
    )

    def open_backend(audit_max_records: int) -> StoreBackend:
        return FileBackend(
            config,
            audit_path=tmp_path / "egress.audit.jsonl",
            audit_max_records=audit_max_records,
            validate=lambda text, source: parse_config(tomllib.loads(text), source=source),
            poll_interval=0.02,
        )

    return open_backend


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Opener]] = {
    "memory": _memory,
    "redis": _redis,
    "file": _file,
}


@dataclass
class Stores:
    """Opens RuleStores over one backend kind's shared storage; closes them all at the end."""

    kind: str
    opener: Opener
    opened: list[RuleStore] = field(default_factory=list)

    def open(self, *, audit_max_records: int = 10_000) -> RuleStore:
        store = RuleStore(self.opener(audit_max_records))
        self.opened.append(store)
        return store

    def run(self, body: Callable[[], Awaitable[None]], *, timeout: float = 30.0) -> None:
        async def main() -> None:
            try:
                await body()
            finally:
                for store in self.opened:
                    await store.aclose()

        run("asyncio", main(), timeout=timeout)


@pytest.fixture(params=sorted(BACKENDS))
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    return Stores(request.param, BACKENDS[request.param](request, tmp_path))


# --- helpers ----------------------------------------------------------------------------------
def make_app(name: str, uid: int, *rules: str, **extra: Any) -> App:
    data = {"name": name, "uids": [str(uid)], "allow": list(rules), **extra}
    return app_from_data(data, source="test")


def parsed(*texts: str) -> tuple[Rule, ...]:
    return tuple(parse_rule(text) for text in texts)


def content(state: StoreState) -> dict[str, dict[str, Any]]:
    """What a user sees in a state: each app as data, by name (order is the backend's)."""
    return {app.name: app_to_data(app) for app in state.rule_set.apps}


def problems_text(error: InvalidRuleSetError) -> str:
    return "\n".join(str(problem) for problem in error.problems)


@contextlib.asynccontextmanager
async def feed_of(store: RuleStore) -> AsyncIterator[asyncio.Queue[int]]:
    """The store's change feed, read by a task into a queue while the block runs."""
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def pump() -> None:
        async for version in store.backend.changes():
            queue.put_nowait(version)

    task = asyncio.create_task(pump())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_version(queue: asyncio.Queue[int], timeout: float = 5.0) -> int:
    async with asyncio.timeout(timeout):
        return await queue.get()


# --- the contract -----------------------------------------------------------------------------
def test_each_edit_commits_one_version_and_a_no_op_commits_none(stores: Stores) -> None:
    async def body() -> None:
        store, other = stores.open(), stores.open()
        assert (await store.read()).version == 0
        assert content(await store.read()) == {}

        done = await store.commit(CreateApp(make_app("blog", 10001, "api.example.com:443")), ALICE)
        assert done.state.version == 1
        assert done.record is not None and done.record.version == 1

        blog = make_app("blog", 10001, "*.example.org:80,443", mode="report")
        assert (await store.commit(PutApp(blog), ALICE)).state.version == 2
        shop = make_app("shop", 10002, "203.0.113.0/24:8000-8100")
        assert (await store.commit(PutApp(shop), ALICE)).state.version == 3

        added = await store.commit(AddRules("blog", parsed("a.example.com:443")), ALICE)
        assert added.state.version == 4
        again = await store.commit(AddRules("blog", parsed("a.example.com:443")), ALICE)
        assert again.state.version == 4 and again.record is None and not again.change.changed

        removed = await store.commit(RemoveRules("blog", parsed("*.example.org:80,443")), ALICE)
        assert removed.state.version == 5
        limits = Limits(connections_per_second=5.0, burst=10)
        updated = await store.commit(UpdateApp("shop", mode=Mode.REPORT, limits=limits), ALICE)
        assert updated.state.version == 6
        deleted = await store.commit(DeleteApp("blog"), ALICE)
        assert deleted.state.version == 7

        seen = content(await other.read())  # another instance sees exactly what was committed
        assert seen == content(deleted.state) and seen.keys() == {"shop"}
        assert seen["shop"]["mode"] == "report"
        assert seen["shop"]["limits"] == {"connections_per_second": 5.0, "burst": 10}

        wanted = RuleSet((make_app("cms", 10003, "cms.example.com:443"), shop))
        replaced = await other.commit(ReplaceAll(wanted), BOB)
        assert replaced.state.version == 8
        assert content(await store.read()) == {app.name: app_to_data(app) for app in wanted.apps}
        same = await store.commit(ReplaceAll(wanted), BOB)
        assert same.state.version == 8 and same.record is None
        assert await store.version() == await other.version() == 8
        assert [r.version for r in await store.history()] == [8, 7, 6, 5, 4, 3, 2, 1]

    stores.run(body)


def test_an_invalid_edit_changes_nothing_and_says_what_is_wrong(stores: Stores) -> None:
    async def body() -> None:
        store = stores.open()
        await store.commit(CreateApp(make_app("blog", 10001, "api.example.com:443")), ALICE)
        before = await store.read()

        with pytest.raises(InvalidRuleSetError) as clash:
            await store.commit(CreateApp(make_app("shop", 10001)), ALICE)
        text = problems_text(clash.value)
        assert "app 'shop'.uids[0]" in text and "blog" in text, text

        with pytest.raises(EditConflictError, match="exists already"):
            await store.commit(CreateApp(make_app("blog", 10009)), ALICE)
        with pytest.raises(EditConflictError, match=r"has no rule 'b\.example\.com:443'"):
            await store.commit(RemoveRules("blog", parsed("b.example.com:443")), ALICE)
        with pytest.raises(UnknownAppError, match="no app named 'ghost'"):
            await store.commit(AddRules("ghost", parsed("b.example.com:443")), ALICE)
        with pytest.raises(UnknownAppError):
            await store.commit(DeleteApp("ghost"), ALICE)
        with pytest.raises(InvalidRuleSetError):
            await store.commit(
                ReplaceAll(RuleSet((make_app("a", 10005), make_app("b", 10005)))), ALICE
            )

        after = await stores.open().read()
        assert after.version == before.version == 1
        assert content(after) == content(before)
        assert len(await store.history()) == 1

    stores.run(body)


def test_if_match_compares_the_app_etag_and_the_store_version(stores: Stores) -> None:
    async def body() -> None:
        store = stores.open()
        first = await store.commit(CreateApp(make_app("blog", 10001, "a.example.com:443")), ALICE)
        blog = first.state.app("blog")
        assert blog is not None
        tag = app_etag(blog)

        moved = await store.commit(
            AddRules("blog", parsed("b.example.com:443")), ALICE, if_match=f'"{tag}"'
        )
        assert moved.state.version == 2
        new_blog = moved.state.app("blog")
        assert new_blog is not None
        with pytest.raises(StoreConflictError, match="changed since you read it") as stale:
            await store.commit(AddRules("blog", parsed("c.example.com:443")), ALICE, if_match=tag)
        assert stale.value.current == app_etag(new_blog)

        with pytest.raises(StoreConflictError, match="no app named 'shop'"):
            await store.commit(DeleteApp("shop"), ALICE, if_match="*")
        with pytest.raises(StoreConflictError) as missing:
            await store.commit(CreateApp(make_app("shop", 10002)), ALICE, if_match=tag)
        assert missing.value.current is None
        assert (await store.commit(UpdateApp("blog", mode=Mode.REPORT), ALICE, if_match="*")).state

        everything = RuleSet((make_app("cms", 10003),))
        with pytest.raises(StoreConflictError, match="version 3, not 2") as old:
            await store.commit(ReplaceAll(everything), ALICE, if_match="2")
        assert old.value.current == "3"
        done = await store.commit(ReplaceAll(everything), ALICE, if_match='"3"')
        assert done.state.version == 4 and content(done.state).keys() == {"cms"}
        assert (await stores.open().read()).version == 4

    stores.run(body)


def test_the_audit_trail_says_who_when_and_what(stores: Stores) -> None:
    async def body() -> None:
        store = stores.open()
        start = time.time()
        await store.commit(CreateApp(make_app("blog", 10001, "a.example.com:443")), ALICE)
        await store.commit(CreateApp(make_app("shop", 10002)), BOB)
        await store.commit(
            RemoveRules("blog", parsed("a.example.com:443")), BOB, revoke=True
        )  # a removal that must cut live connections
        await store.commit(
            AddRules("blog", parsed("b.example.com:443", "c.example.com:443")), ALICE
        )
        await store.commit(UpdateApp("shop", mode=Mode.REPORT), ALICE)
        end = time.time()

        records = await stores.open().history()
        assert [r.version for r in records] == [5, 4, 3, 2, 1]
        assert all(start - 1 <= r.at <= end + 1 for r in records), [r.at for r in records]
        assert [r.at for r in records] == sorted((r.at for r in records), reverse=True)
        update, add, revoke, create_shop, create_blog = records
        assert create_blog.actor == ALICE and create_shop.actor == BOB
        assert create_blog.changes[0]["action"] == "created"
        assert create_blog.changes[0]["rules_added"] == ["a.example.com:443"]
        assert revoke.revoke and not add.revoke and revoke.actor == BOB
        assert revoke.changes[0]["rules_removed"] == ["a.example.com:443"]
        assert add.changes[0]["rules_added"] == ["b.example.com:443", "c.example.com:443"]
        assert update.changes[0]["before"] == {"mode": "enforce"}
        assert update.changes[0]["after"] == {"mode": "report"}
        assert "blog" in add.summary and "+2" in add.summary

        state = await store.read()
        assert state.revoke_version == 3
        assert state.committed_at is not None and abs(state.committed_at - update.at) < 1e-3

        assert [r.version for r in await store.history("blog")] == [4, 3, 1]
        assert [r.version for r in await store.history("shop", limit=1)] == [5]
        assert [r.version for r in await store.history(limit=2)] == [5, 4]
        assert await store.history("ghost") == []

    stores.run(body)


def test_the_audit_trail_keeps_only_the_newest_records(stores: Stores) -> None:
    async def body() -> None:
        store = stores.open(audit_max_records=20)
        await store.commit(CreateApp(make_app("blog", 10001)), ALICE)
        for n in range(149):
            await store.commit(AddRules("blog", parsed(f"h{n}.example.com:443")), ALICE)
        assert await store.version() == 150
        records = await store.history(limit=1000)
        assert [r.version for r in records] == list(range(150, 130, -1))
        assert [r.version for r in await store.history("blog", limit=5)] == [
            150,
            149,
            148,
            147,
            146,
        ]

    stores.run(body)


def test_the_change_feed_hears_of_every_commit_once_listening(stores: Stores) -> None:
    async def body() -> None:
        writer, follower = stores.open(), stores.open()
        await writer.commit(CreateApp(make_app("blog", 10001)), ALICE)
        async with feed_of(follower) as feed:
            # The feed is listening once it has delivered anything: commit until it does.
            for n in range(50):
                await writer.commit(AddRules("blog", parsed(f"warm{n}.example.com:443")), ALICE)
                with contextlib.suppress(TimeoutError):
                    await next_version(feed, timeout=0.2)
                    break
            else:
                raise AssertionError("the change feed delivered nothing for 50 commits")
            while not feed.empty():
                feed.get_nowait()
            for round_ in range(3):
                base = await writer.version()
                for n in range(5):
                    rule = f"r{round_}-{n}.example.com:443"
                    await writer.commit(AddRules("blog", parsed(rule)), BOB)
                # A feed may fold commits that came together into the newest (it is a hint
                # to read): what it says rises, and it ends at the newest version.
                heard = [await next_version(feed)]
                while heard[-1] < base + 5:
                    heard.append(await next_version(feed))
                assert heard == sorted(set(heard)) and base < heard[0], heard
                assert heard[-1] == base + 5 == (await follower.read()).version

    stores.run(body)


def test_two_writers_lose_no_edit(stores: Stores) -> None:
    per_writer, batch = 500, 3  # 6 commits in flight: plenty of lost races to retry
    if stores.kind == "file":  # each commit re-reads, edits, checks and fsyncs the whole file
        per_writer = 100

    async def writer(store: RuleStore, who: int) -> None:
        for start in range(0, per_writer, batch):
            await asyncio.gather(
                *(
                    store.commit(AddRules("shared", parsed(f"w{who}-{n}.example.com:443")), ALICE)
                    for n in range(start, min(start + batch, per_writer))
                )
            )

    async def body() -> None:
        one, two = stores.open(), stores.open()
        await one.commit(CreateApp(make_app("shared", 10001)), ALICE)
        base = await one.version()
        await asyncio.gather(writer(one, 1), writer(two, 2))
        final = await stores.open().read()
        shared = final.app("shared")
        assert shared is not None
        texts = {rule.text for rule in shared.allow}
        expected = {f"w{w}-{n}.example.com:443" for w in (1, 2) for n in range(per_writer)}
        assert texts == expected, f"lost {len(expected - texts)} rules"
        assert final.version == base + 2 * per_writer

    stores.run(body, timeout=50)


# --- Redis only -------------------------------------------------------------------------------
PREFIX_KEYS = ("version", "apps", "revs", "revoke", "committed_at", "audit")


def redis_store(server: RedisServer, opened: list[RuleStore], **options: Any) -> RuleStore:
    options.setdefault("display_url", server.url)
    store = RuleStore(RedisBackend.from_url(server.url, **options))
    opened.append(store)
    return store


def run_redis(body: Callable[[list[RuleStore]], Awaitable[None]], *, timeout: float = 30) -> None:
    """Run ``body(opened)``; every store it appends to ``opened`` is closed afterwards."""

    async def main() -> None:
        opened: list[RuleStore] = []
        try:
            await body(opened)
        finally:
            for store in opened:
                await store.aclose()

    run("asyncio", main(), timeout=timeout)


def test_readers_never_see_half_an_edit(redis_server: RedisServer) -> None:
    commits, apps_per_set = 40, 6

    def generation(k: int) -> RuleSet:
        return RuleSet(
            tuple(
                make_app(f"a{n}", 20000 + n, f"g{k}-{n}.example.com:443")
                for n in range(apps_per_set)
            )
        )

    async def body(opened: list[RuleStore]) -> None:
        writer = redis_store(redis_server, opened)
        readers = [redis_store(redis_server, opened) for _ in range(3)]
        expected = {0: content(await writer.read())}
        seen: list[tuple[int, dict[str, Any]]] = []
        done = asyncio.Event()

        async def read_loop(reader: RuleStore) -> None:
            for _ in range(100_000):
                if done.is_set():
                    return
                state = await reader.read()
                seen.append((state.version, content(state)))

        async def write_all() -> None:
            try:
                for k in range(commits):
                    committed = await writer.commit(ReplaceAll(generation(k)), ALICE)
                    expected[committed.state.version] = content(committed.state)
                    await asyncio.sleep(0)
            finally:
                done.set()

        await asyncio.gather(write_all(), *(read_loop(r) for r in readers))
        assert len(expected) == commits + 1
        versions = {version for version, _ in seen}
        assert len(versions) >= 5, f"readers saw too few versions to test anything: {versions}"
        for version, apps in seen:
            assert apps == expected[version], f"a read at version {version} mixed two commits"

    run_redis(body)


def test_reads_and_writes_survive_a_script_flush(redis_server: RedisServer) -> None:
    async def body(opened: list[RuleStore]) -> None:
        store, follower = redis_store(redis_server, opened), redis_store(redis_server, opened)
        await store.commit(CreateApp(make_app("blog", 10001)), ALICE)
        assert (await follower.read()).version == 1
        for n in range(3):
            with redis_server.client() as admin:
                admin.script_flush()  # what a failover to a fresh replica looks like
                assert admin.script_exists("0" * 40) == [False]
            done = await store.commit(AddRules("blog", parsed(f"h{n}.example.com:443")), ALICE)
            assert done.state.version == n + 2
            with redis_server.client() as admin:
                admin.script_flush()
            assert content(await follower.read()) == content(done.state)

    run_redis(body)


class ReplyLosingLink:
    """A TCP relay to Redis that, once armed, forwards the next EVALSHA but drops the
    connection instead of passing its reply on: the client cannot know the commit happened."""

    def __init__(self, port: int) -> None:
        self.redis_port = port
        self.armed = False
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ReplyLosingLink:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        lose_reply = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"EVALSHA" in data:
                    self.armed = False
                    lose_reply.set()
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if lose_reply.is_set():
                    self.dropped += 1
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionError, OSError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_w, redis_w):
                writer.close()


def test_a_commit_whose_reply_was_lost_is_not_applied_twice(redis_server: RedisServer) -> None:
    async def body(opened: list[RuleStore]) -> None:
        async with ReplyLosingLink(redis_server.port) as link:
            url = f"redis://127.0.0.1:{link.port}/0"
            store = RuleStore(RedisBackend.from_url(url))
            opened.append(store)
            rules = parsed("a.example.com:443", "b.example.com:443")
            await store.commit(CreateApp(make_app("blog", 10001, *(r.text for r in rules))), ALICE)
            link.armed = True
            # Redis commits; the reply is lost; the client retries the script on a new
            # connection, which recognises its own commit instead of redoing the edit (redone,
            # this removal would fail: the rule is gone).
            done = await store.commit(RemoveRules("blog", rules[:1]), BOB)
            assert link.dropped == 1
            assert done.state.version == 2
            history = await store.history()
            assert [(r.version, r.actor) for r in history] == [(2, BOB), (1, ALICE)]
            assert done.record is not None and done.record.at == history[0].at
            blog = (await redis_store(redis_server, opened).read()).app("blog")
            assert blog is not None and [r.text for r in blog.allow] == ["b.example.com:443"]

    run_redis(body)


def test_redis_down_or_frozen_is_unavailable_naming_the_store_quickly(
    redis_server: RedisServer,
) -> None:
    async def fails_fast(call: Callable[[], Awaitable[object]], limit: float) -> str:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as failed:
            await call()
        assert time.monotonic() - started < limit
        message = str(failed.value)
        assert redis_server.url in message, message
        return message

    async def body(opened: list[RuleStore]) -> None:
        store = redis_store(redis_server, opened)
        await store.commit(CreateApp(make_app("blog", 10001)), ALICE)

        os.kill(redis_server.pid, signal.SIGSTOP)  # alive but answering nothing
        try:
            message = await fails_fast(store.read, 4.0)
            assert "reading the rules" in message and "imeout" in message, message
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        assert (await store.read()).version == 1

        redis_server.stop()
        message = await fails_fast(store.read, 2.0)
        assert "is Redis running" in message
        await fails_fast(store.version, 2.0)
        await fails_fast(lambda: store.history("blog"), 2.0)
        await fails_fast(lambda: store.commit(DeleteApp("blog"), ALICE), 2.0)
        await fails_fast(redis_store(redis_server, opened).read, 2.0)

    run_redis(body)


def test_messages_never_show_the_password(redis_server: RedisServer) -> None:
    url = f"redis://:hunter2@127.0.0.1:{redis_server.port}/0"
    with redis_server.client() as admin:
        admin.config_set("requirepass", "the-right-one")

    async def body(opened: list[RuleStore]) -> None:
        store = RuleStore(RedisBackend.from_url(url))
        opened.append(store)
        assert "hunter2" not in store.name and "***" in store.name
        with pytest.raises(StoreUnavailableError) as failed:
            await store.read()
        message = str(failed.value)
        assert "hunter2" not in message and store.name in message, message

    run_redis(body)


def test_a_restarted_redis_is_read_again_and_the_feed_resumes(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis-aof", persistent=True) as server:

        async def body(opened: list[RuleStore]) -> None:
            writer, follower = redis_store(server, opened), redis_store(server, opened)
            await writer.commit(CreateApp(make_app("blog", 10001, "a.example.com:443")), ALICE)
            async with feed_of(follower) as feed:
                with server.client() as admin:
                    await eventually(
                        lambda: admin.pubsub_numsub("{egress}:rules:changes")[0][1] == 1,
                        "the follower subscribed to the change channel",
                    )
                assert await next_version(feed) == 1  # a feed starts with the version it found
                before = await follower.read()
                await asyncio.to_thread(server.restart)
                after = await follower.read()  # the data was kept; the store answers again
                assert after.version == 1 and content(after) == content(before)

                await writer.commit(AddRules("blog", parsed("b.example.com:443")), BOB)
                assert await next_version(feed, timeout=8.0) == 2
                assert (await follower.read()).version == 2
                await writer.commit(AddRules("blog", parsed("c.example.com:443")), BOB)
                assert await next_version(feed) == 3
                history = await follower.history()
                assert [r.version for r in history] == [3, 2, 1]

        run_redis(body)


def test_a_commit_made_while_the_feed_reconnects_is_not_missed(redis_server: RedisServer) -> None:
    """redis-py reconnects and resubscribes a dropped pub/sub connection by itself; what was
    published in between never arrives. The feed reads the version again on resubscribing."""

    async def body(opened: list[RuleStore]) -> None:
        writer, follower = redis_store(redis_server, opened), redis_store(redis_server, opened)
        async with feed_of(follower) as feed:
            with redis_server.client() as admin:
                await eventually(
                    lambda: admin.pubsub_numsub("{egress}:rules:changes")[0][1] == 1,
                    "the follower subscribed to the change channel",
                )
                assert await next_version(feed) == 0
                for expected in (1, 2, 3):
                    admin.client_kill_filter(_type="pubsub")
                    # the follower is reconnecting now: this commit's message goes nowhere
                    app = make_app(f"app{expected}", 10000 + expected, "a.example.com:443")
                    await writer.commit(CreateApp(app), ALICE)
                    assert await next_version(feed, timeout=3.0) == expected

    run_redis(body)


def test_a_follower_does_not_trust_its_cache_after_redis_lost_its_data(
    redis_server: RedisServer,
) -> None:
    async def body(opened: list[RuleStore]) -> None:
        writer, follower = redis_store(redis_server, opened), redis_store(redis_server, opened)
        await writer.commit(CreateApp(make_app("blog", 10001, "a.example.com:443")), ALICE)
        await writer.commit(CreateApp(make_app("shop", 10002)), ALICE)
        assert (await follower.read()).version == 2
        await asyncio.to_thread(redis_server.restart)  # no persistence: everything is gone
        # Two new commits bring the store back to version 2, with other apps.
        await writer.commit(CreateApp(make_app("cms", 10003)), BOB)
        await writer.commit(CreateApp(make_app("blog", 10004, "b.example.com:443")), BOB)
        state = await follower.read()
        assert state.version == 2
        assert content(state) == content(await writer.read())
        assert content(state).keys() == {"blog", "cms"}
        blog = state.app("blog")
        assert blog is not None and [r.text for r in blog.allow] == ["b.example.com:443"]

    run_redis(body)


@pytest.mark.parametrize(
    ("junk", "where", "says"),
    [
        ("not json", "app 'blog'", "the JSON of an app"),
        ('{"name":"blog","uids":["10001"],"allow":["nope"]}', "app 'blog'.allow[0]", "nope"),
        ('{"name":"shop","uids":["10001"]}', "app 'blog'.name", "the name it is stored under"),
        ('["blog"]', "app 'blog'", "an app object"),
        (None, "app 'blog'", "it is listed in {egress}:rules:revs"),
    ],
    ids=["not-json", "bad-rule", "wrong-name", "not-an-object", "missing"],
)
def test_junk_written_by_hand_fails_the_read_naming_the_app(
    redis_server: RedisServer, junk: str | None, where: str, says: str
) -> None:
    async def body(opened: list[RuleStore]) -> None:
        store = redis_store(redis_server, opened)
        await store.commit(CreateApp(make_app("blog", 10001, "a.example.com:443")), ALICE)
        await store.commit(CreateApp(make_app("shop", 10002)), ALICE)
        with redis_server.client() as admin:
            good = admin.hget("{egress}:rules:apps", "blog")
            if junk is None:
                admin.hdel("{egress}:rules:apps", "blog")
            else:
                admin.hset("{egress}:rules:apps", "blog", junk)
            admin.hset("{egress}:rules:revs", "blog", 3)
            admin.incr("{egress}:rules:version")  # so the cached reader looks again too

            for reader in (store, redis_store(redis_server, opened)):
                with pytest.raises(InvalidRuleSetError) as failed:
                    await reader.read()
                text = problems_text(failed.value)
                assert where in text and says in text, text
                assert redis_server.url in text
            with pytest.raises(InvalidRuleSetError):  # and no edit is built on it
                await store.commit(DeleteApp("shop"), ALICE)
            assert await store.version() == 3

            assert good is not None
            admin.hset("{egress}:rules:apps", "blog", good)
        assert content(await store.read()).keys() == {"blog", "shop"}

    run_redis(body)


def test_an_app_written_by_hand_without_a_revision_fails_the_read(
    redis_server: RedisServer,
) -> None:
    async def body(opened: list[RuleStore]) -> None:
        store = redis_store(redis_server, opened)
        await store.commit(CreateApp(make_app("blog", 10001)), ALICE)
        with redis_server.client() as admin:
            admin.hset("{egress}:rules:apps", "ghost", '{"name":"ghost","uids":["10009"]}')
        with pytest.raises(InvalidRuleSetError) as failed:
            await redis_store(redis_server, opened).read()
        assert "app 'ghost'" in problems_text(failed.value)

    run_redis(body)


def test_every_key_is_under_the_prefix_hash_tag(redis_server: RedisServer) -> None:
    async def body(opened: list[RuleStore]) -> None:
        tenant = redis_store(redis_server, opened, prefix="tenant-a")
        other = redis_store(redis_server, opened)
        async with feed_of(tenant):
            await tenant.commit(CreateApp(make_app("blog", 10001, "a.example.com:443")), ALICE)
            await tenant.commit(
                RemoveRules("blog", parsed("a.example.com:443")), ALICE, revoke=True
            )
            await tenant.commit(DeleteApp("blog"), ALICE)
            await tenant.commit(CreateApp(make_app("shop", 10002)), ALICE)
            await tenant.history("shop")
        await other.commit(CreateApp(make_app("cms", 10003)), BOB)
        assert content(await other.read()).keys() == {"cms"}  # prefixes do not mix
        assert content(await tenant.read()).keys() == {"shop"}

        with redis_server.client() as admin:
            keys = {key.decode() for key in admin.scan_iter(count=1000)}
        tenant_keys = {f"{{tenant-a}}:rules:{name}" for name in PREFIX_KEYS}
        other_keys = {f"{{egress}}:rules:{name}" for name in PREFIX_KEYS if name != "revoke"}
        assert keys == tenant_keys | other_keys

    run_redis(body)


def test_the_audit_stream_stays_bounded(redis_server: RedisServer) -> None:
    async def body(opened: list[RuleStore]) -> None:
        store = redis_store(redis_server, opened, audit_max_records=20)
        await store.commit(CreateApp(make_app("blog", 10001)), ALICE)
        for n in range(299):
            await store.commit(AddRules("blog", parsed(f"h{n}.example.com:443")), ALICE)
        with redis_server.client() as admin:
            length = admin.xlen("{egress}:rules:audit")
            node = int(admin.config_get("stream-node-max-entries")["stream-node-max-entries"])
        assert 20 <= length <= 20 + node  # MAXLEN ~ trims whole stream nodes
        assert [r.version for r in await store.history(limit=100)] == list(range(300, 280, -1))

    run_redis(body)


def test_a_follower_of_ten_thousand_apps_parses_only_what_changed(
    redis_server: RedisServer,
) -> None:
    rule = parse_rule("api.example.com:443")
    many = RuleSet(
        tuple(App(f"app{n:05d}", (UidRange(20000 + n, 20000 + n),), (rule,)) for n in range(10_000))
    )

    async def body(opened: list[RuleStore]) -> None:
        writer, follower = redis_store(redis_server, opened), redis_store(redis_server, opened)
        await writer.commit(ReplaceAll(many), ALICE)
        first = await follower.read()
        assert len(first.rule_set) == 10_000
        assert await follower.read() is first  # nothing changed: nothing read again

        await writer.commit(AddRules("app05000", parsed("b.example.com:443")), BOB)
        started = time.monotonic()
        second = await follower.read()
        elapsed = time.monotonic() - started
        assert second.version == first.version + 1
        reused = sum(a is b for a, b in zip(first.rule_set.apps, second.rule_set.apps, strict=True))
        assert reused == 9_999
        changed = second.app("app05000")
        assert changed is not None and len(changed.allow) == 2
        assert elapsed < 1.0, f"an incremental read of 10,000 apps took {elapsed:.3f} s"

    run_redis(body, timeout=50)


def test_closing_the_backend_ends_its_change_feed(redis_server: RedisServer) -> None:
    async def body(opened: list[RuleStore]) -> None:
        store = redis_store(redis_server, opened)
        feed = store.backend.changes()
        assert await anext(feed) == 0  # the version found on subscribing
        waiting = asyncio.ensure_future(anext(feed, None))
        with redis_server.client() as admin:
            await eventually(
                lambda: admin.pubsub_numsub("{egress}:rules:changes")[0][1] == 1,
                "the feed subscribed",
            )
        await store.aclose()
        async with asyncio.timeout(3):
            assert await waiting is None

    run_redis(body)
