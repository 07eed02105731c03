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
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

import aiodns
import pycares
from aiodns import error as ares_error

__all__ = [
    "IPAddress",
    "Resolution",
    "ResolveError",
    "ResolveFailure",
    "Resolver",
    "ResolverStatistics",
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
    """The addresses of ``name``: A records first, then AAAA, each deduplicated in DNS order.

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

    cached_entries: int  # positive and negative entries held (expired ones until evicted)
    cache_hits: int  # resolve() calls answered from the cache, positive or negative
    cache_misses: int  # resolve() calls that started or joined a lookup
    lookups_in_flight: int  # distinct names being looked up right now


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
class _Family:
    """What one query (A or AAAA) produced."""

    addresses: list[IPAddress]
    ttls: list[int]
    failure: ResolveFailure | None = None
    message: str = ""


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
        self._cache: OrderedDict[str, _Entry] = OrderedDict()  # oldest stored first
        self._names_by_address: dict[IPAddress, set[str]] = {}
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
        if _is_ip_literal(name):
            raise ValueError(f"IP literal {_bounded(name)} passed to Resolver.resolve()")
        now = self._clock()
        entry = self._cache_get(name, now)
        if entry is not None:
            self._hits += 1
            return entry.result(name, now, from_cache=True)
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
        """Names whose unexpired cached answer contains ``address`` (sorted).

        An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) also matches its IPv4 form.
        """
        now = self._clock()
        candidates = set(self._names_by_address.get(address, ()))
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            candidates |= self._names_by_address.get(address.ipv4_mapped, set())
        return tuple(
            sorted(
                name
                for name in candidates
                if (entry := self._cache.get(name)) is not None and entry.expires_at > now
            )
        )

    def statistics(self) -> ResolverStatistics:
        return ResolverStatistics(
            cached_entries=len(self._cache),
            cache_hits=self._hits,
            cache_misses=self._misses,
            lookups_in_flight=len(self._in_flight),
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
        a = _family(name, a_result, _TYPE_A, 4)
        aaaa = _family(name, aaaa_result, _TYPE_AAAA, 6)
        entry = self._combine(a, aaaa, self._clock())
        self._cache_put(name, entry)
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
        entry = self._cache.get(name)
        if entry is None:
            return None
        if entry.expires_at <= now:
            self._cache_remove(name)
            return None
        return entry

    def _cache_put(self, name: str, entry: _Entry) -> None:
        if self._closed or entry.expires_at <= self._clock():
            return
        self._cache_remove(name)
        if len(self._cache) >= self._max_cache_entries:
            now = self._clock()
            while self._cache:  # drop expired entries at the old end, then the oldest
                oldest, old_entry = next(iter(self._cache.items()))
                self._cache_remove(oldest)
                if old_entry.expires_at > now or len(self._cache) < self._max_cache_entries:
                    break
        self._cache[name] = entry
        for address in entry.addresses:
            self._names_by_address.setdefault(address, set()).add(name)

    def _cache_remove(self, name: str) -> None:
        entry = self._cache.pop(name, None)
        if entry is None:
            return
        for address in entry.addresses:
            names = self._names_by_address.get(address)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._names_by_address[address]


def _is_ip_literal(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


def _family(
    name: str, outcome: pycares.DNSResult | BaseException, rtype: int, version: int
) -> _Family:
    """Interpret one query's outcome: the valid addresses of ``version`` in DNS order (deduped),
    the TTLs of the records used, or a failure."""
    if isinstance(outcome, BaseException):
        return _failure(outcome)
    addresses: list[IPAddress] = []
    ttls: list[int] = []
    for record in outcome.answer:
        if record.type == _TYPE_CNAME:
            ttls.append(record.ttl)
            continue
        if record.type != rtype:
            continue
        text = getattr(record.data, "addr", None)
        try:
            if not isinstance(text, str):
                raise ValueError("no address")
            address = ip_address(text)
            if address.version != version:
                raise ValueError("wrong address family")
        except ValueError as exc:
            _log.warning(
                "resolve %s: dropped malformed record %s: %s",
                _bounded(name),
                _bounded(repr(text)),
                exc,
            )
            continue
        ttls.append(record.ttl)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        return _Family([], [])  # NODATA for this family; CNAME TTLs do not matter then
    return _Family(addresses, ttls)


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
