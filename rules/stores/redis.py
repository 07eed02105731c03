"""The rule store in Redis: shared by every node, versioned, audited, with a change feed.

Keys (all under one hash tag, so a Redis Cluster keeps them in one slot and one script may
touch them all)::

    {<prefix>}:rules:version       the store's version (an integer; absent = 0)
    {<prefix>}:rules:apps          hash: app name -> canonical JSON of the app
    {<prefix>}:rules:revs          hash: app name -> the version at which it last changed
    {<prefix>}:rules:revoke        the newest version committed with ``revoke``
    {<prefix>}:rules:committed_at  the server's clock at the newest commit (Unix seconds)
    {<prefix>}:rules:audit         stream of audit records (about ``audit_max_records`` kept)
    {<prefix>}:rules:changes       pub/sub channel: {"version", "apps", "revoke", "at"}

A write is one Lua script (compare the version, write the apps, bump the version, add the
audit record, publish), so readers never see half an edit and two writers never lose one; a
script retried after its reply was lost recognises its own commit instead of redoing the edit.

A read takes the index atomically (a read-only script returns the version, the ``revs`` hash as
one JSON string, revoke and committed_at), then fetches, in one MULTI with the version again,
only the apps whose revision it has not parsed yet; if the version moved in between it reads
again (a bounded number of times, the last fetching every app in the same script). So a
follower of 10,000 apps parses one app when one app changes, and never mixes two versions.
Apps are listed by name. An app that fails validation (written into Redis by hand) fails the
whole read with ``InvalidRuleSetError`` naming it; a backend that read the app before keeps
its parsed copy until the app's revision changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from rules.apps import App, RuleSet
from rules.document import app_from_data, app_to_data, canonical_json
from rules.edits import Change
from rules.problems import InvalidRuleSetError, Problem, value_repr
from rules.stores.base import AuditDraft, AuditRecord, StoreState
from rules.stores.errors import StoreUnavailableError

__all__ = ["RedisBackend", "redact_url"]

TIMEOUT_S: Final = 2.0
"""How long one Redis call may take (connect, or wait for a reply) before the store is
unavailable: a hung Redis must not hang an edit or a follower for longer."""

_READ_ATTEMPTS: Final = 5  # incremental reads before one that fetches every app at once
_FEED_BACKOFF_FIRST_S: Final = 0.05
_FEED_BACKOFF_MAX_S: Final = 2.0
_AUDIT_BATCH: Final = 200
_CLOSED: Final = object()

# KEYS: version, apps, revs, revoke, committed_at, audit
# ARGV: base version, commit token, revoke (0/1), audit max records, channel,
#       JSON list of the changed app names, the audit record's JSON without its opening "{"
#       and without version/at, then name, document pairs (document "" deletes the app).
_WRITE_LUA: Final = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  -- A retried call whose first attempt did commit (the reply was lost): report that commit.
  local newest = redis.call('XREVRANGE', KEYS[6], '+', '-', 'COUNT', 1)[1]
  if newest then
    local fields = {}
    for i = 1, #newest[2], 2 do fields[newest[2][i]] = newest[2][i + 1] end
    if fields['commit'] == ARGV[2] then return {fields['version'], fields['at']} end
  end
  return false
end
local version = redis.call('INCR', KEYS[1])
for i = 8, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[3], ARGV[i], version)
  end
end
local revoke = 'false'
if ARGV[3] == '1' then
  redis.call('SET', KEYS[4], version)
  revoke = 'true'
end
local now = redis.call('TIME')
local at = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
redis.call('SET', KEYS[5], at)
local record = '{"at":' .. at .. ',"version":' .. version .. ',' .. ARGV[7]
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*',
  'commit', ARGV[2], 'version', version, 'at', at, 'record', record)
redis.call('PUBLISH', ARGV[5], '{"apps":' .. ARGV[6] .. ',"at":' .. at .. ',"revoke":' ..
  revoke .. ',"version":' .. version .. '}')
return {version, at}
"""

# The index of a read, atomically: version, the revs hash (as one JSON string), revoke,
# committed_at, the number of stored app documents, and (ARGV[1] == "1") every document.
# KEYS: version, revs, revoke, committed_at, apps
_INDEX_LUA: Final = """
local reply = {
  redis.call('GET', KEYS[1]),
  cjson.encode(redis.call('HGETALL', KEYS[2])),
  redis.call('GET', KEYS[3]),
  redis.call('GET', KEYS[4]),
  redis.call('HLEN', KEYS[5]),
}
if ARGV[1] == '1' then reply[6] = redis.call('HGETALL', KEYS[5]) end
return reply
"""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (what messages may show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


_PARSE_ON_LOOP_MAX = 64  # changed apps parsed on the event loop; more go to a thread
_BUILD_ON_LOOP_MAX_APPS = 500  # a bigger RuleSet (checked across apps) is built in a thread


@dataclass(frozen=True, slots=True)
class _Keys:
    version: str
    apps: str
    revs: str
    revoke: str
    committed_at: str
    audit: str
    channel: str

    @classmethod
    def under(cls, prefix: str) -> _Keys:
        base = f"{{{prefix}}}:rules:"
        return cls(
            version=base + "version",
            apps=base + "apps",
            revs=base + "revs",
            revoke=base + "revoke",
            committed_at=base + "committed_at",
            audit=base + "audit",
            channel=base + "changes",
        )

    def script_keys(self) -> list[str]:
        return [self.version, self.apps, self.revs, self.revoke, self.committed_at, self.audit]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A state this backend read or wrote, with the revision of each app it parsed (never
    mutated once made, so concurrent reads can share it)."""

    state: StoreState
    revs: Mapping[str, int]
    apps: Mapping[str, App]


class RedisBackend:
    """A :class:`rules.stores.base.StoreBackend` over ``redis.asyncio``.

    ``display_url`` names the store in messages (it must hold no password; see
    :func:`redact_url`). One instance may serve many tasks; it keeps the newest state it saw
    so reads parse only apps that changed since.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "egress",
        audit_max_records: int = 10_000,
        display_url: str = "redis",
    ) -> None:
        self._client = client
        self._keys = _Keys.under(prefix)
        self._audit_max = max(1, audit_max_records)
        self._name = display_url
        self._write_script = client.register_script(_WRITE_LUA)
        self._index_script = client.register_script(_INDEX_LUA)
        self._snapshot: _Snapshot | None = None
        self._pubsubs: set[Any] = set()
        self._closed = False
        self._closing = asyncio.Event()  # set by aclose: wakes feeds waiting for a message

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "egress",
        audit_max_records: int = 10_000,
        display_url: str | None = None,
    ) -> RedisBackend:
        """A backend with its own client for ``url``: short timeouts, one quick retry of a
        dropped connection (a write retried after a lost reply is recognised by the script)."""
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            retry=Retry(
                ExponentialBackoff(cap=0.2, base=0.02),
                retries=1,
                supported_errors=(redis.exceptions.ConnectionError,),
            ),
            decode_responses=False,
        )
        return cls(
            client,
            prefix=prefix,
            audit_max_records=audit_max_records,
            display_url=display_url if display_url is not None else redact_url(url),
        )

    @property
    def name(self) -> str:
        return self._name

    # --- reading ------------------------------------------------------------------------------
    async def read(self, cached: StoreState | None = None) -> StoreState:
        """The current state. ``cached`` is not needed: the backend keeps what it parsed."""
        snapshot = self._snapshot
        try:
            raw_version, raw_at = await self._client.mget(
                self._keys.version, self._keys.committed_at
            )
        except redis.exceptions.RedisError as error:
            self._fail("reading the rules", error)
        version, committed_at = self._parse_version(raw_version), self._parse_time(raw_at)
        if snapshot is not None:
            if (snapshot.state.version, snapshot.state.committed_at) == (version, committed_at):
                return snapshot.state
            if snapshot.state.version >= version:
                # The store went back (emptied, restored from a backup): trust nothing cached.
                snapshot = self._snapshot = None
        for attempt in range(_READ_ATTEMPTS):
            try:
                found = await self._read_once(snapshot, whole=attempt == _READ_ATTEMPTS - 1)
            except redis.exceptions.RedisError as error:
                self._fail("reading the rules", error)
            if found is not None:
                self._install(found)
                return found.state
        raise AssertionError("unreachable: the last attempt reads atomically")

    async def _read_once(self, known: _Snapshot | None, *, whole: bool) -> _Snapshot | None:
        """One consistent read, reusing ``known``'s apps; ``None`` if the store moved between
        the index and the documents (``whole`` reads everything in one transaction: never)."""
        keys = self._keys
        replies = await self._index_script(
            keys=[keys.version, keys.revs, keys.revoke, keys.committed_at, keys.apps],
            args=[int(whole)],
        )
        version = self._parse_version(replies[0])
        revs = self._parse_revs(replies[1])
        revoke = self._parse_int(replies[2], "revoke", "the newest version committed with revoke")
        committed_at = self._parse_time(replies[3])
        stored_count: int = replies[4]
        if known is not None and known.state.version > version:
            known = None
        wanted = [
            name
            for name, rev in revs.items()
            if known is None or known.revs.get(name) != rev or name not in known.apps
        ]
        docs: dict[str, bytes | None]
        strays: list[str] = []
        if whole:
            flat = replies[5]
            everything = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
            docs = {name: everything.get(name) for name in wanted}
            strays = sorted(everything.keys() - revs.keys())
        elif wanted or stored_count != len(revs):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(keys.version)
                if wanted:
                    pipe.hmget(keys.apps, wanted)
                if stored_count != len(revs):
                    pipe.hkeys(keys.apps)
                again = await pipe.execute()
            if self._parse_version(again[0]) != version:
                return None
            docs = dict(zip(wanted, again[1], strict=True)) if wanted else {}
            if stored_count != len(revs):
                strays = sorted({_text(k) for k in again[-1]} - revs.keys())
        else:
            docs = {}
        if len(docs) > _PARSE_ON_LOOP_MAX or len(revs) > _BUILD_ON_LOOP_MAX_APPS:
            # Parsing thousands of apps (a first read, a restored store) would stall the
            # event loop of the proxy that reads them: do it in a thread.
            apps, rule_set = await asyncio.to_thread(
                self._built, revs, docs, strays, known, version
            )
        else:
            apps, rule_set = self._built(revs, docs, strays, known, version)
        return _Snapshot(StoreState(rule_set, revoke, committed_at), revs, apps)

    def _built(
        self,
        revs: Mapping[str, int],
        docs: Mapping[str, bytes | None],
        strays: Sequence[str],
        known: _Snapshot | None,
        version: int,
    ) -> tuple[dict[str, App], RuleSet]:
        apps = self._parsed(revs, docs, strays, known)
        return apps, self._rule_set(apps, version)

    def _parsed(
        self,
        revs: Mapping[str, int],
        docs: Mapping[str, bytes | None],
        strays: Sequence[str],
        known: _Snapshot | None,
    ) -> dict[str, App]:
        """Every app of ``revs``: parsed from ``docs``, or reused from ``known``; any app that
        is not valid fails the whole read, naming it (never a partial set)."""
        problems: list[Problem] = []
        parsed: dict[str, App] = {}
        for name, raw in docs.items():
            key = f"app {name!r}"
            if raw is None:
                problems.append(
                    Problem(
                        self.name,
                        key,
                        "nothing",
                        f"its JSON in {self._keys.apps} (it is listed in {self._keys.revs})",
                    )
                )
                continue
            try:
                app = app_from_data(json.loads(raw), source=self.name, key=key)
            except ValueError as error:  # bad JSON, or InvalidRuleSetError
                if isinstance(error, InvalidRuleSetError):
                    problems += error.problems
                else:
                    problems.append(Problem(self.name, key, value_repr(raw), "the JSON of an app"))
                continue
            if app.name != name:
                problems.append(
                    Problem(
                        self.name,
                        f"{key}.name",
                        value_repr(app.name),
                        f"{name!r}, the name it is stored under",
                    )
                )
                continue
            parsed[name] = app
        for name in strays:
            problems.append(
                Problem(
                    self.name,
                    f"app {name!r}",
                    f"an app in {self._keys.apps} without a revision in {self._keys.revs}",
                    "apps written through egress (`egress rules` or the admin API)",
                )
            )
        if problems:
            raise InvalidRuleSetError(problems)
        if known is None:
            return parsed
        return {name: parsed[name] if name in parsed else known.apps[name] for name in revs}

    def _rule_set(self, apps: Mapping[str, App], version: int) -> RuleSet:
        ordered = tuple(apps[name] for name in sorted(apps))
        try:
            return RuleSet(ordered, version, self.name)
        except InvalidRuleSetError as invalid:  # two stored apps disagree (e.g. a shared uid)
            names = {f"app[{i}]": app.name for i, app in enumerate(ordered)}
            raise InvalidRuleSetError(_by_name(invalid.problems, names)) from None

    def _install(self, snapshot: _Snapshot) -> None:
        current = self._snapshot
        if current is None or snapshot.state.version >= current.state.version:
            self._snapshot = snapshot

    # --- writing ------------------------------------------------------------------------------
    async def write(self, base: StoreState, change: Change, audit: AuditDraft) -> StoreState | None:
        documents: list[str] = []
        for each in change.apps:
            after = "" if each.after is None else canonical_json(app_to_data(each.after))
            documents += [each.name, after]
        record = AuditRecord.of(audit, 0, 0.0).to_data()
        del record["version"], record["at"]
        body = canonical_json(record)
        try:
            reply = await self._write_script(
                keys=self._keys.script_keys(),
                args=[
                    base.version,
                    secrets.token_hex(12),
                    int(audit.revoke),
                    self._audit_max,
                    self._keys.channel,
                    canonical_json([each.name for each in change.apps]),
                    body[1:],
                    *documents,
                ],
            )
        except redis.exceptions.RedisError as error:
            self._fail("committing the edit (it may or may not have been stored)", error)
        if reply is None:
            return None
        version, at = int(reply[0]), float(reply[1])
        apps = change.rule_set.apps
        names = [app.name for app in apps]
        if names == sorted(names):
            rule_set = change.rule_set.with_version(version)
        else:  # reads list apps by name: so does the state a write returns
            rule_set = RuleSet(tuple(sorted(apps, key=lambda app: app.name)), version, self.name)
        state = StoreState(rule_set, version if audit.revoke else base.revoke_version, at)
        known = self._snapshot
        if known is not None and known.state.version == base.version:
            revs = dict(known.revs)
            for each in change.apps:
                if each.after is None:
                    revs.pop(each.name, None)
                else:
                    revs[each.name] = version
            self._install(_Snapshot(state, revs, {app.name: app for app in rule_set.apps}))
        return state

    # --- version, history, changes -------------------------------------------------------------
    async def version(self) -> int:
        try:
            return self._parse_version(await self._client.get(self._keys.version))
        except redis.exceptions.RedisError as error:
            self._fail("reading the version", error)

    async def history(self, app: str | None = None, limit: int = 50) -> list[AuditRecord]:
        """Newest first; scans at most ``audit_max_records`` entries (the trail's length)."""
        found: list[AuditRecord] = []
        scanned = 0
        newest = "+"
        while len(found) < limit and scanned < self._audit_max:
            count = min(self._audit_max - scanned, _AUDIT_BATCH if app else limit - len(found))
            try:
                entries: list[Any] = (
                    await self._client.xrevrange(self._keys.audit, newest, "-", count) or []
                )
            except redis.exceptions.RedisError as error:
                self._fail("reading the audit trail", error)
            # Parsing a batch of records is JSON work a read token can ask for again and again:
            # keep big batches off the loop of the proxy serving the API.
            if len(entries) > _PARSE_ON_LOOP_MAX:
                records = await asyncio.to_thread(_audit_records, entries)
            else:
                records = _audit_records(entries)
            for record in records:
                scanned += 1
                if record is not None and (app is None or record.touches(app)):
                    found.append(record)
                    if len(found) >= limit:
                        break
            if len(entries) < count:
                break
            newest = "(" + _text(entries[-1][0])
        return found

    async def changes(self) -> AsyncIterator[int]:
        """Versions from the change channel. A lost connection is retried, backing off up to
        2 s; once back (by this loop, or by redis-py resubscribing on its own), the current
        version is read and yielded if it moved meanwhile."""
        delay = _FEED_BACKOFF_FIRST_S
        last: int | None = None
        while not self._closed:
            pubsub = self._client.pubsub()
            self._pubsubs.add(pubsub)
            try:
                await pubsub.subscribe(self._keys.channel)
                # Subscribed first, then read: a commit in between is seen one way or the other.
                current = self._parse_version(await self._client.get(self._keys.version))
                if current != last:  # the first time too: a commit may predate the subscribe
                    last = current
                    yield current
                delay = _FEED_BACKOFF_FIRST_S
                while (message := await self._next_message(pubsub)) is not _CLOSED:
                    version: int | None
                    if _resubscribed(message):
                        # redis-py reconnects a dropped pub/sub connection and subscribes
                        # again by itself; what was published meanwhile never arrives.
                        version = self._parse_version(await self._client.get(self._keys.version))
                    else:
                        version = _message_version(message)
                    if version is not None and version != last:  # heard twice across a resubscribe
                        last = version
                        yield version
                return
            except (redis.exceptions.RedisError, OSError, InvalidRuleSetError):
                if self._stopped():
                    return
            finally:
                self._pubsubs.discard(pubsub)
                await _quietly_close(pubsub)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _FEED_BACKOFF_MAX_S)

    async def _next_message(self, pubsub: Any) -> Any:
        """The next pub/sub message, or ``_CLOSED`` once :meth:`aclose` runs (a pending read
        is not woken by closing its connection, so it races the closing event)."""
        reading = asyncio.ensure_future(pubsub.get_message(timeout=None))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((reading, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (reading, closing):
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()  # retrieved here: an error is raised below or moot
        if self._closing.is_set() or reading.cancelled():
            return _CLOSED
        return reading.result()

    async def aclose(self) -> None:
        self._closed = True
        self._closing.set()
        for pubsub in list(self._pubsubs):
            await _quietly_close(pubsub)
        await self._client.aclose()

    # --- helpers ------------------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self._closed

    def _fail(self, what: str, error: redis.exceptions.RedisError) -> NoReturn:
        hint = ""
        if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            hint = "; is Redis running and reachable from this host?"
        raise StoreUnavailableError(
            f"rule store {self.name}: {what} failed: {str(error).rstrip('.')}{hint}"
        ) from error

    def _parse_version(self, raw: object) -> int:
        return self._parse_int(raw, "version", "the store's version")

    def _parse_int(self, raw: object, key: str, what: str) -> int:
        if raw is None:
            return 0
        try:
            value: int = int(raw)  # type: ignore[call-overload]
        except (ValueError, TypeError):
            value = -1
        if value < 0:
            raise InvalidRuleSetError(
                [Problem(self.name, key, value_repr(raw), f"an integer >= 0 ({what})")]
            )
        return value

    def _parse_time(self, raw: object) -> float | None:
        try:
            return None if raw is None else float(raw)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return None

    def _parse_revs(self, raw: bytes) -> dict[str, int]:
        """The ``revs`` hash, sent by the index script as one JSON list ``[name, rev, ...]``
        (one string parses in microseconds; 20,000 RESP items take the client 200 ms)."""
        flat = json.loads(_text(raw))
        if not isinstance(flat, list):  # cjson spells an empty list as {}
            flat = []
        revs: dict[str, int] = {}
        problems: list[Problem] = []
        for name, rev_raw in zip(flat[::2], flat[1::2], strict=False):
            try:
                revs[name] = int(rev_raw)
            except ValueError:
                problems.append(
                    Problem(
                        self.name,
                        f"app {name!r}",
                        f"revision {value_repr(rev_raw)} in {self._keys.revs}",
                        "an integer (the version at which the app last changed)",
                    )
                )
        if problems:
            raise InvalidRuleSetError(problems)
        return revs


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _by_name(problems: Iterable[Problem], names: Mapping[str, str]) -> list[Problem]:
    fixed = []
    for problem in problems:
        head, dot, rest = problem.key.partition(".")
        key = f"app {names[head]!r}{dot}{rest}" if head in names else problem.key
        fixed.append(Problem(problem.file, key, problem.value, problem.expected, problem.hint))
    return fixed


def _audit_records(entries: Sequence[Any]) -> list[AuditRecord | None]:
    return [_audit_record(fields) for _entry_id, fields in entries]


def _audit_record(fields: Mapping[Any, Any] | None) -> AuditRecord | None:
    """The record of a stream entry; ``None`` for an entry that is not one of ours."""
    raw = None if fields is None else fields.get(b"record")
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return AuditRecord.from_data(data) if isinstance(data, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def _resubscribed(message: Mapping[str, Any] | None) -> bool:
    """A subscribe confirmation: the first, or one after redis-py reconnected by itself."""
    return message is not None and message.get("type") in ("subscribe", b"subscribe")


def _message_version(message: Mapping[str, Any] | None) -> int | None:
    if message is None or message.get("type") != "message":
        return None
    try:
        data = json.loads(message["data"])
        version = data.get("version") if isinstance(data, dict) else None
    except (ValueError, TypeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


async def _quietly_close(pubsub: Any) -> None:
    with contextlib.suppress(redis.exceptions.RedisError, OSError, RuntimeError):
        await pubsub.aclose()
