"""Hostname resolution for the proxy: A and AAAA over c-ares, with a TTL cache and coalescing.

The proxy resolves a hostname once, checks every address it got against the policy, and connects
to one of the addresses it checked (no second lookup, so DNS rebinding cannot slip in between).
This module does only the first step. **Addresses are returned as the DNS said**: loopback,
private, link-local or any other special-purpose address comes back unfiltered, and checking it
is the caller's job.

Threads and the event loop (aiodns 4 with pycares 5, c-ares >= 1.34):

- ``aiodns.DNSResolver`` creates one c-ares channel in *event thread* mode: c-ares starts **one
  native thread per channel** that owns the sockets, the retries and the timers, and calls back
  when a query completes; aiodns hands the result to the loop with ``call_soon_threadsafe``.
  Submitting a query only queues it under the channel lock, so the event loop never blocks on
  DNS, and no thread is spent per lookup. pycares adds **one process-wide daemon thread** that
  destroys closed channels once their queries have drained.
- If the event thread cannot be created (aiodns logs a warning; on Linux usually inotify
  exhaustion), aiodns falls back to registering c-ares' sockets with the event loop
  (``add_reader``/``add_writer`` plus a timer): no thread at all, still non-blocking.
- One :class:`Resolver` holds one channel, created lazily on the first :meth:`Resolver.resolve`
  and bound to that event loop.

c-ares keeps a cache of its own (the "query cache", on by default, up to 3600 s, TTLs counted
down; pycares 5 offers no switch for it). Answers with TTL 0 and negative answers without an SOA
record are not kept there. Consequently, after our entry expires, a name whose DNS TTL is longer
than ``max_ttl`` may be answered from c-ares' cache with the remaining TTL rather than from the
network; the answer is still within the TTL its authority gave it.

Lookups use ``ares_query`` semantics: no search domains, no ``/etc/hosts``. Names passed to
:meth:`Resolver.resolve` are already canonical (lower-case A-labels, no trailing dot).

DNS answers are untrusted: any tenant who controls a zone can publish a name with thousands of
records, or thousands of names pointing at one address. One app must not slow another, so the
work per connection and everything the event loop keeps are bounded by the resolver's settings,
never by what the DNS says: addresses kept per family (``max_addresses_per_family``), cache
entries and their estimated bytes (``max_cache_entries``, ``max_cache_bytes``), names remembered
per address (``max_names_per_address``), and expired entries leave the cache on time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

import aiodns
import pycares
from aiodns import error as ares_error

from egress.config.model import ResolverConfig
from rules.special import effective_address

__all__ = [
    "IPAddress",
    "Resolution",
    "ResolveError",
    "ResolveFailure",
    "Resolver",
    "ResolverStatistics",
    "make_resolver",
    "parse_nameserver",
]

_log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address

_TYPE_A = 1
_TYPE_CNAME = 5
_TYPE_AAAA = 28
_MAX_NAME_LENGTH = 253
_MAX_LOGGED_CHARS = 80
_BACKSTOP_GRACE = 0.5  # seconds a caller waits past ``timeout`` before giving up on the lookup
_DEFAULT_MAX_ADDRESSES = 32  # per family and answer; see Resolver's max_addresses_per_family
_EXPIRY_SLACK = 64  # stale expiry-heap items tolerated beyond 2 per cache entry before a rebuild


class ResolveFailure(StrEnum):
    """Why a name did not resolve. Values are the log and metric vocabulary."""

    NXDOMAIN = "nxdomain"  # the name does not exist
    NO_ADDRESS = "no_address"  # the name exists but has neither A nor AAAA records
    TIMEOUT = "timeout"  # no answer within the resolver's timeout
    SERVFAIL = "servfail"  # the DNS server reported a failure
    ERROR = "error"  # anything else: refused, unreachable server, malformed reply, closed


class ResolveError(Exception):
    """A name did not resolve. ``kind`` is for code and metrics, ``message`` for operators."""

    def __init__(self, name: str, kind: ResolveFailure, message: str) -> None:
        super().__init__(name, kind, message)
        self.name = name
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{_bounded(self.name)}: {self.message}"


@dataclass(frozen=True, slots=True)
class Resolution:
    """The addresses of ``name``: A records first, then AAAA, each deduplicated in DNS order
    and cut to the resolver's ``max_addresses_per_family`` (the first ones the DNS gave).

    ``ttl`` is how many seconds the answer stays valid from now (clamped to the resolver's
    ``[min_ttl, max_ttl]``); ``from_cache`` says whether it was served without a lookup.
    """

    name: str
    addresses: tuple[IPAddress, ...]
    ttl: float
    from_cache: bool


@dataclass(frozen=True, slots=True)
class ResolverStatistics:
    """A snapshot of the resolver's counters (see :meth:`Resolver.statistics`)."""

    cached_entries: int  # positive and negative entries held (expired ones leave on next use)
    cache_hits: int  # resolve() calls answered from the cache, positive or negative
    cache_misses: int  # resolve() calls that started or joined a lookup
    lookups_in_flight: int  # distinct names being looked up right now
    cached_bytes: int  # estimated memory of the cache and its indexes (see max_cache_bytes)
    answers_truncated: int  # lookups with over max_addresses_per_family distinct in a family


@dataclass(frozen=True, slots=True)
class _Entry:
    """The outcome of one lookup: addresses, or a failure (``kind`` set)."""

    addresses: tuple[IPAddress, ...]
    expires_at: float
    kind: ResolveFailure | None = None
    message: str = ""

    def result(self, name: str, now: float, *, from_cache: bool) -> Resolution:
        if self.kind is not None:
            raise ResolveError(name, self.kind, self.message)
        return Resolution(name, self.addresses, max(0.0, self.expires_at - now), from_cache)


@dataclass(frozen=True, slots=True)
class _Cached:
    """A cache slot: the entry, its serial (names it in the expiry heap and the reverse index)
    and its estimated size in bytes."""

    entry: _Entry
    serial: int
    size: int


@dataclass(frozen=True, slots=True)
class _Family:
    """What one query (A or AAAA) produced."""

    addresses: list[IPAddress]
    ttls: list[int]
    failure: ResolveFailure | None = None
    message: str = ""
    truncated: bool = False  # address records were left out: the cap was reached


def _per_item_bytes(empty: dict[int, None]) -> int:
    """The most bytes per item that a dict of ``empty``'s type holds at 256 to 4096 items (right
    after a resize its tables are emptiest), so that the estimate does not come out low."""
    base = sys.getsizeof(empty)
    worst = 0.0
    for i in range(4096):
        empty[i] = None
        if i >= 255:
            worst = max(worst, (sys.getsizeof(empty) - base) / (i + 1))
    return math.ceil(worst)


# Memory estimate of the cache, from sys.getsizeof() once at import (CPython's real sizes on
# this build). It errs high rather than low: every address is priced as an IPv6 address, every
# dict item at the dict's emptiest, and every (entry, address) pair as if its reverse-index dict
# were its own. Checked against tracemalloc: about 1.1-1.4 times what the cache really holds.
_POINTER_BYTES = struct.calcsize("P")
_DICT_ITEM_BYTES = _per_item_bytes({})
_CACHE_ITEM_BYTES = _per_item_bytes(OrderedDict())  # an OrderedDict item, its node included
_ENTRY_BYTES = (
    sys.getsizeof(_Cached(_Entry((), 0.0), 0, 0))
    + sys.getsizeof(_Entry((), 0.0))
    + sys.getsizeof(0.0)  # expires_at
    + sys.getsizeof(())  # the addresses tuple, without its items
    + sys.getsizeof(2**62)  # the serial (one object shared by the heap and the index)
    + sys.getsizeof(2**20)  # the size
    + _CACHE_ITEM_BYTES  # the slot in the cache
    + (sys.getsizeof((0.0, 0, "")) + 2 * _POINTER_BYTES)  # its expiry-heap item, 2 list slots
)
_ADDRESS_BYTES = (
    _POINTER_BYTES  # the slot in the entry's addresses tuple
    + sys.getsizeof(IPv6Address(2**128 - 1))
    + sys.getsizeof(2**128 - 1)  # the address's integer
    + _DICT_ITEM_BYTES  # its key in the reverse index
    + sys.getsizeof({"": 0})  # the reverse index's dict of names for the address, one item
)


def _entry_bytes(name: str, entry: _Entry) -> int:
    """Estimated bytes ``name``'s entry takes in the cache and its indexes (see above)."""
    return (
        sys.getsizeof(name)
        + sys.getsizeof(entry.message)
        + _ENTRY_BYTES
        + len(entry.addresses) * _ADDRESS_BYTES
    )


def parse_nameserver(text: str) -> str:
    """Turn a ``[resolver].nameservers`` entry into the form c-ares takes.

    Accepts ``"IP"``, ``"IPv4:PORT"``, ``"[IPv6]:PORT"`` and ``"[IPv6]"``; IP literals are parsed
    strictly (no ``127.1``, no leading zeros). Returns ``"IPv4:PORT"`` or ``"[IPv6]:PORT"``
    (port 53 when none is given). Raises ``ValueError`` with the reason otherwise.
    """
    raw = text.strip()
    port = 53
    address: IPAddress
    try:
        if raw.startswith("["):
            inner, bracket, rest = raw[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError("expected [IPv6]:PORT")
            address = IPv6Address(inner)
            if rest:
                port = _parse_port(rest[1:])
        else:
            try:
                address = ip_address(raw)
            except ValueError:
                host, colon, port_text = raw.rpartition(":")
                if not colon:
                    raise ValueError("expected IP, IPv4:PORT or [IPv6]:PORT") from None
                address = IPv4Address(host)  # an IPv6 address with a port needs brackets
                port = _parse_port(port_text)
    except ValueError as exc:
        raise ValueError(f"invalid nameserver {_bounded(text)}: {exc}") from None
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {_bounded(text)}")
    return int(text)


def _bounded(text: str) -> str:
    """``repr()`` of an untrusted string, cut to a length fit for a log line."""
    if len(text) > _MAX_LOGGED_CHARS:
        return repr(text[:_MAX_LOGGED_CHARS]) + "..."
    return repr(text)


class Resolver:
    """Resolves hostnames to A and AAAA addresses with a bounded TTL cache.

    - A and AAAA are queried in parallel; the result is the A addresses then the AAAA ones, each
      deduplicated in the order the DNS gave them. Every address is parsed with
      :func:`ipaddress.ip_address`; a malformed record is dropped (and logged), never returned.
      If one family fails but the other has addresses, those addresses are the answer.
    - The TTL is the smallest TTL of the address and CNAME records used, clamped to
      ``[min_ttl, max_ttl]``.
    - Failures raise :class:`ResolveError`. NXDOMAIN, no address, SERVFAIL and other errors are
      cached for ``negative_ttl`` (so a dead or refusing server is not asked again for every
      connection); timeouts are not cached, but concurrent callers share one lookup, so a name
      is asked at most once per ``timeout``.
    - ``timeout`` bounds each lookup as a whole (``asyncio.timeout`` around both queries), and
      so each :meth:`resolve` call; c-ares gets ``attempts`` tries of ``timeout / attempts``
      each, per server.
    - Concurrent resolves of one name share one lookup task owned by the resolver. A caller that
      is cancelled or times out leaves the lookup running for the others.
    - Addresses are returned as the DNS said. **Checking them against the policy (special-purpose
      ranges included) is the caller's job.**

    Bounds, because DNS answers are untrusted and one app must not slow another:

    - ``max_addresses_per_family``: at most that many distinct addresses of each family are
      kept, the first ones in DNS order. Every connection to the name walks its addresses (the
      policy check, the dialer), so they must not number in the thousands because a zone says
      so; records past the cap are skipped without being parsed.
    - Expired entries leave the cache on time: an expiry heap is looked at on every
      :meth:`resolve` and store (amortised O(log n) per entry), so a cache in use holds no
      pile of dead entries. :meth:`sweep` does the same on demand, for a runtime's timer.
    - ``max_cache_entries`` and ``max_cache_bytes`` bound the cache by count and by an estimate
      of its memory (names, entries, addresses, index items); when either is reached, expired
      entries go first, then the oldest stored. An entry larger than ``max_cache_bytes`` is
      not cached at all.
    - ``max_names_per_address``: :meth:`cached_names_for` remembers only the most recently
      stored names of each address, so a tenant pointing thousands of names at one address
      cannot make the per-connection name matching of transparent mode grow.

    ``nameservers`` entries take the forms :func:`parse_nameserver` accepts; empty means the
    system's ``/etc/resolv.conf``. ``clock`` is for tests (seconds, monotonic).
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[str] = (),
        timeout: float = 2.0,
        attempts: int = 2,
        min_ttl: float = 5.0,
        max_ttl: float = 300.0,
        negative_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_cache_entries: int = 10000,
        max_addresses_per_family: int = _DEFAULT_MAX_ADDRESSES,
        max_cache_bytes: int = 16 * 1024 * 1024,
        max_names_per_address: int = 16,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts!r}")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"need 0 <= min_ttl <= max_ttl, got {min_ttl!r} and {max_ttl!r}")
        if negative_ttl < 0:
            raise ValueError(f"negative_ttl must be >= 0, got {negative_ttl!r}")
        if max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be at least 1, got {max_cache_entries!r}")
        if max_addresses_per_family < 1:
            raise ValueError(
                f"max_addresses_per_family must be at least 1, got {max_addresses_per_family!r}"
            )
        if max_cache_bytes < 1:
            raise ValueError(f"max_cache_bytes must be at least 1, got {max_cache_bytes!r}")
        if max_names_per_address < 1:
            raise ValueError(
                f"max_names_per_address must be at least 1, got {max_names_per_address!r}"
            )
        if isinstance(nameservers, str):
            raise TypeError("nameservers must be a sequence of strings, not a string")
        self._nameservers = [parse_nameserver(entry) for entry in nameservers]
        self._timeout = timeout
        self._attempts = attempts
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._max_cache_entries = max_cache_entries
        self._max_addresses = max_addresses_per_family
        self._max_cache_bytes = max_cache_bytes
        self._max_names_per_address = max_names_per_address
        self._cache: OrderedDict[str, _Cached] = OrderedDict()  # oldest stored first
        self._cached_bytes = 0  # sum of the sizes in _cache
        # (expires_at, serial, name) of every entry stored, plus stale items of entries already
        # gone (the serial tells them apart); rebuilt when stale items outnumber live ones.
        self._expiry: list[tuple[float, int, str]] = []
        self._serials = itertools.count()
        # address -> {name: serial}, in the order stored, at most max_names_per_address names
        self._names_by_address: dict[IPAddress, dict[str, int]] = {}
        self._truncated = 0
        self._in_flight: dict[str, asyncio.Task[_Entry]] = {}
        self._dns: aiodns.DNSResolver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._hits = 0
        self._misses = 0

    # -- public API -----------------------------------------------------------------------------

    async def resolve(self, name: str) -> Resolution:
        """Return the addresses of ``name`` (canonical: lower-case A-label, no trailing dot).

        Raises :class:`ResolveError`; ``ValueError`` if ``name`` is an IP literal (a caller bug:
        IP literals must never reach a resolver); ``RuntimeError`` after :meth:`aclose`.
        """
        if self._closed:
            raise RuntimeError("Resolver is closed")
        if not name or len(name) > _MAX_NAME_LENGTH:
            raise ResolveError(name, ResolveFailure.ERROR, "invalid host name length")
        now = self._clock()
        self._expire(now)
        entry = self._cache_get(name, now)
        if entry is not None:  # only names ever get into the cache (checked below)
            self._hits += 1
            return entry.result(name, now, from_cache=True)
        if _is_ip_literal(name):
            raise ValueError(f"IP literal {_bounded(name)} passed to Resolver.resolve()")
        self._misses += 1
        task = self._in_flight.get(name)
        if task is None:
            task = self._bound_loop().create_task(self._lookup(name), name=f"resolve {name}")
            self._in_flight[name] = task
            task.add_done_callback(lambda done: self._lookup_done(name, done))
        try:
            # The lookup task ends by its own deadline, at most ``timeout`` after it started, so
            # no caller waits longer than ``timeout``; this is only a backstop against a bug.
            async with asyncio.timeout(self._timeout + _BACKSTOP_GRACE):
                entry = await asyncio.shield(task)
        except TimeoutError:
            raise ResolveError(name, ResolveFailure.TIMEOUT, self._timeout_message()) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and current.cancelling() == 0:
                # The shared lookup was cancelled by aclose(), not this caller.
                raise ResolveError(name, ResolveFailure.ERROR, "resolver closed") from None
            raise
        return entry.result(name, self._clock(), from_cache=False)

    def cached_names_for(self, address: IPAddress) -> tuple[str, ...]:
        """Names whose unexpired cached answer contains ``address`` (sorted): the
        ``max_names_per_address`` most recently stored ones at most.

        Addresses are indexed in their canonical form (:func:`rules.special.effective_address`):
        an IPv4-mapped IPv6 answer (``::ffff:a.b.c.d``) is found by its IPv4 form and the other
        way round. The cost is O(``max_names_per_address``), whatever number of names point at
        the address: this runs for every transparent-mode connection, on the event loop.
        """
        now = self._clock()
        self._expire(now)
        found = self._names_by_address.get(effective_address(address), {})
        return tuple(
            sorted(
                name
                for name in found
                if (cached := self._cache.get(name)) is not None and cached.entry.expires_at > now
            )
        )

    def sweep(self) -> int:
        """Drop every expired cache entry now and return how many went.

        :meth:`resolve` already does this as it goes; a runtime may call it from a timer so that
        an idle resolver lets go of its memory too. Cheap when nothing expired (one comparison).
        """
        return self._expire(self._clock())

    def statistics(self) -> ResolverStatistics:
        return ResolverStatistics(
            cached_entries=len(self._cache),
            cache_hits=self._hits,
            cache_misses=self._misses,
            lookups_in_flight=len(self._in_flight),
            cached_bytes=self._cached_bytes,
            answers_truncated=self._truncated,
        )

    async def aclose(self) -> None:
        """Cancel lookups in flight (their callers get ``ResolveError(error)``), close the c-ares
        channel and drop the cache. Idempotent."""
        self._closed = True
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        dns, self._dns = self._dns, None
        if dns is not None:
            await dns.close()  # cancels c-ares' pending queries, then destroys the channel
        self._cache.clear()
        self._cached_bytes = 0
        self._expiry.clear()
        self._names_by_address.clear()

    # -- lookups --------------------------------------------------------------------------------

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("Resolver is bound to another event loop")
        return loop

    def _channel(self) -> aiodns.DNSResolver:
        if self._dns is None:
            self._dns = aiodns.DNSResolver(
                nameservers=self._nameservers or None,
                loop=self._bound_loop(),
                timeout=self._timeout / self._attempts,
                tries=self._attempts,
            )
        return self._dns

    async def _lookup(self, name: str) -> _Entry:
        dns = self._channel()
        queries = (dns.query_dns(name, "A"), dns.query_dns(name, "AAAA"))
        try:
            async with asyncio.timeout(self._timeout):
                a_result, aaaa_result = await asyncio.gather(*queries, return_exceptions=True)
        except TimeoutError:
            # gather cancelled both futures; c-ares finishes the queries on its own and its
            # callbacks then find the futures done. Not cached: the next caller asks again.
            _log.debug("resolve %s: timed out", _bounded(name))
            return _Entry((), self._clock(), ResolveFailure.TIMEOUT, self._timeout_message())
        a = _family(name, a_result, _TYPE_A, 4, limit=self._max_addresses)
        aaaa = _family(name, aaaa_result, _TYPE_AAAA, 6, limit=self._max_addresses)
        if a.truncated or aaaa.truncated:
            self._truncated += 1
        entry = self._combine(a, aaaa, self._clock())
        self._cache_put(name, entry)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "resolve %s: %s",
                _bounded(name),
                entry.kind or ", ".join(str(address) for address in entry.addresses),
            )
        return entry

    def _combine(self, a: _Family, aaaa: _Family, now: float) -> _Entry:
        addresses = tuple(a.addresses + aaaa.addresses)
        if addresses:
            ttl = min(a.ttls + aaaa.ttls, default=self._min_ttl)
            ttl = min(max(float(ttl), self._min_ttl), self._max_ttl)
            return _Entry(addresses, now + ttl)
        failures = {a.failure, aaaa.failure} - {None}
        kind = next(
            (
                k
                for k in (
                    ResolveFailure.NXDOMAIN,
                    ResolveFailure.SERVFAIL,
                    ResolveFailure.TIMEOUT,
                    ResolveFailure.ERROR,
                )
                if k in failures
            ),
            ResolveFailure.NO_ADDRESS,
        )
        if kind is ResolveFailure.NO_ADDRESS:
            message = "the name has no A or AAAA records"
        else:
            message = a.message if a.failure is kind else aaaa.message
        expires_at = now if kind is ResolveFailure.TIMEOUT else now + self._negative_ttl
        return _Entry((), expires_at, kind, message)

    def _lookup_done(self, name: str, task: asyncio.Task[_Entry]) -> None:
        if self._in_flight.get(name) is task:
            del self._in_flight[name]

    def _timeout_message(self) -> str:
        return f"no answer from the DNS servers within {self._timeout:g} s"

    # -- the cache ------------------------------------------------------------------------------

    def _cache_get(self, name: str, now: float) -> _Entry | None:
        cached = self._cache.get(name)
        if cached is None:
            return None
        if cached.entry.expires_at <= now:
            self._cache_remove(name)
            return None
        return cached.entry

    def _cache_put(self, name: str, entry: _Entry) -> None:
        now = self._clock()
        if self._closed or entry.expires_at <= now:
            return
        self._cache_remove(name)
        self._expire(now)  # expired entries go before any live one is evicted
        size = _entry_bytes(name, entry)
        if size > self._max_cache_bytes:
            _log.debug("resolve %s: answer of %d bytes not cached", _bounded(name), size)
            return
        while self._cache and (
            len(self._cache) >= self._max_cache_entries
            or self._cached_bytes + size > self._max_cache_bytes
        ):
            oldest, old = self._cache.popitem(last=False)
            self._unlink(oldest, old)
        serial = next(self._serials)
        self._cache[name] = _Cached(entry, serial, size)
        self._cached_bytes += size
        heapq.heappush(self._expiry, (entry.expires_at, serial, name))
        if len(self._expiry) > 2 * len(self._cache) + _EXPIRY_SLACK:
            # Evicted and replaced entries left stale items behind: rebuild, O(n) once per
            # n stores at least, so the heap stays proportional to the cache.
            self._expiry = [
                (cached.entry.expires_at, cached.serial, cached_name)
                for cached_name, cached in self._cache.items()
            ]
            heapq.heapify(self._expiry)
        limit = self._max_names_per_address
        for answer in entry.addresses:
            address = effective_address(answer)  # how the policy asks (a mapped AAAA as IPv4)
            names = self._names_by_address.get(address)
            if names is None:
                names = self._names_by_address[address] = {}
            names[name] = serial
            if len(names) > limit:
                del names[next(iter(names))]  # the oldest stored name of this address

    def _expire(self, now: float) -> int:
        """Drop the entries that expired by ``now``; return how many. O(1) if none did."""
        expiry = self._expiry
        dropped = 0
        while expiry and expiry[0][0] <= now:
            _, serial, name = heapq.heappop(expiry)
            cached = self._cache.get(name)
            if cached is not None and cached.serial == serial:
                del self._cache[name]
                self._unlink(name, cached)
                dropped += 1
        return dropped

    def _cache_remove(self, name: str) -> None:
        cached = self._cache.pop(name, None)
        if cached is not None:
            self._unlink(name, cached)

    def _unlink(self, name: str, cached: _Cached) -> None:
        """Account for ``name``'s entry having left the cache; its heap item goes stale."""
        self._cached_bytes -= cached.size
        for answer in cached.entry.addresses:
            address = effective_address(answer)
            names = self._names_by_address.get(address)
            if names is not None and names.get(name) == cached.serial:
                del names[name]
                if not names:
                    del self._names_by_address[address]


def _is_ip_literal(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


_RECORDS_PER_ADDRESS = 4  # records looked at per address kept, at most


def _family(
    name: str,
    outcome: pycares.DNSResult | BaseException,
    rtype: int,
    version: int,
    *,
    limit: int = _DEFAULT_MAX_ADDRESSES,
) -> _Family:
    """Interpret one query's outcome: the first ``limit`` distinct valid addresses of
    ``version`` in DNS order, the TTLs of the records used, or a failure.

    The work is bounded by ``limit``, not by the answer: a text already seen is not parsed
    again, and once ``limit`` addresses are kept, further address records are looked up by text
    (duplicates of kept addresses still count as used, so their TTL counts) and otherwise
    skipped unparsed, their TTL ignored; and no more than ``_RECORDS_PER_ADDRESS * limit``
    records are looked at in all (a tenant's zone may answer with thousands). CNAME records
    give their TTL wherever they are, within that bound. Malformed records are logged once per
    answer (the first one and how many).
    """
    if isinstance(outcome, BaseException):
        return _failure(outcome)
    addresses: list[IPAddress] = []
    seen: set[IPAddress] = set()
    by_text: dict[str, IPAddress] = {}  # at most `limit` valid texts (c-ares gives canonical ones)
    ttls: list[int] = []
    skipped = dropped = 0
    first_dropped = ""
    answer = outcome.answer
    most = _RECORDS_PER_ADDRESS * limit
    if len(answer) > most:
        skipped += len(answer) - most
        answer = answer[:most]
    for record in answer:
        record_type = record.type
        if record_type == _TYPE_CNAME:
            ttls.append(record.ttl)
            continue
        if record_type != rtype:
            continue
        text = getattr(record.data, "addr", None)
        address = by_text.get(text) if isinstance(text, str) else None
        if address is None:
            if len(addresses) >= limit:
                skipped += 1  # past the cap: not parsed
                continue
            try:
                if not isinstance(text, str):
                    raise ValueError("no address")
                address = ip_address(text)
                if address.version != version:
                    raise ValueError("wrong address family")
            except ValueError as exc:
                dropped += 1
                if dropped == 1:
                    first_dropped = f"{_bounded(repr(text))}: {exc}"
                continue
            by_text[text] = address
        ttls.append(record.ttl)
        if address not in seen:
            seen.add(address)
            addresses.append(address)
    if dropped:
        _log.warning(
            "resolve %s: dropped %d malformed record(s), the first %s",
            _bounded(name),
            dropped,
            first_dropped,
        )
    if skipped:
        _log.debug(
            "resolve %s: kept the first %d addresses, skipped %d more record(s) of type %d",
            _bounded(name),
            limit,
            skipped,
            rtype,
        )
    if not addresses:  # NODATA for this family; CNAME TTLs do not matter then
        return _Family([], [], truncated=skipped > 0)
    return _Family(addresses, ttls, truncated=skipped > 0)


_ERRNO_KINDS = {
    ares_error.ARES_ENODATA: None,
    ares_error.ARES_ENOTFOUND: ResolveFailure.NXDOMAIN,
    ares_error.ARES_ESERVFAIL: ResolveFailure.SERVFAIL,
    ares_error.ARES_ETIMEOUT: ResolveFailure.TIMEOUT,
}


def _failure(exc: BaseException) -> _Family:
    """Map an aiodns/pycares exception to ours; this is the one place that knows their codes."""
    if isinstance(exc, ares_error.DNSError) and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
        text = str(exc.args[1]) if len(exc.args) > 1 else "DNS error"
        kind = _ERRNO_KINDS.get(code, ResolveFailure.ERROR)
        if kind is None:
            return _Family([], [])
        label = pycares.errno.errorcode.get(code, str(code))
        return _Family([], [], kind, f"{text} ({label})")
    if isinstance(exc, asyncio.CancelledError):
        return _Family([], [], ResolveFailure.ERROR, "query cancelled")
    if isinstance(exc, Exception):
        return _Family([], [], ResolveFailure.ERROR, f"DNS error: {type(exc).__name__}: {exc}")
    raise exc  # KeyboardInterrupt and friends are not DNS outcomes


def make_resolver(settings: ResolverConfig) -> Resolver:
    """The resolver ``[resolver]`` describes (the proxy's, and ``egress rules check``'s)."""
    return Resolver(
        nameservers=[str(server) for server in settings.nameservers],
        timeout=settings.timeout,
        attempts=settings.attempts,
        min_ttl=settings.min_ttl,
        max_ttl=settings.max_ttl,
        negative_ttl=settings.negative_ttl,
        max_addresses_per_family=settings.max_addresses_per_family,
        max_cache_bytes=settings.max_cache_bytes,
    )
