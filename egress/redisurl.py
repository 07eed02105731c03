"""Where Redis is: the ``[redis].url`` forms, parsed without I/O.

One server (as redis-py spells it)::

    redis://[user:password@]host[:port][/db]          port 6379, db 0 by default
    rediss://...                                      the same over TLS
    unix://[user:password@]/path/to/redis.sock[?db=N]

Sentinels, asked for the current master of ``service_name`` (the client follows failovers)::

    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db]
    rediss+sentinel://...                             TLS to the sentinels and the master

    port 26379 by default. The credentials are the master's; the sentinels are asked without.

The startup nodes of a Redis Cluster (any few of its nodes; the rest are discovered)::

    redis+cluster://[user:password@]host[:port][,host[:port]...][/0]
    rediss+cluster://...

    port 6379 by default; a Cluster has only db 0.

Hosts are names or IP addresses, IPv6 in brackets (``[::1]:6379``). Reserved characters in the
user name or password may be percent-encoded (``%40`` for ``@``); an unencoded ``@``, ``/`` or
``:`` in the password is read correctly too (the last ``@`` ends the credentials). No other
query parameters are accepted: an option the client does not know would fail only when it
connects. Error messages never contain the password.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

__all__ = [
    "RedisKind",
    "RedisNode",
    "RedisTarget",
    "RedisUrlError",
    "parse_redis_url",
    "redact_redis_url",
]


class RedisKind(enum.Enum):
    SERVER = "server"  # one server over TCP
    UNIX = "unix"  # one server over a Unix socket
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


_SERVER_FORM: Final = "redis://[user:password@]host[:port][/db] (or rediss://)"
_UNIX_FORM: Final = "unix://[user:password@]/path/to/redis.sock[?db=N]"
_SENTINEL_FORM: Final = (
    "redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db]"
    " (or rediss+sentinel://)"
)
_CLUSTER_FORM: Final = (
    "redis+cluster://[user:password@]host[:port][,host[:port]...] (or rediss+cluster://)"
)
FORMS: Final = {
    RedisKind.SERVER: _SERVER_FORM,
    RedisKind.UNIX: _UNIX_FORM,
    RedisKind.SENTINEL: _SENTINEL_FORM,
    RedisKind.CLUSTER: _CLUSTER_FORM,
}
"""The expected form of each kind, as error messages show it."""

_SCHEMES: Final = {
    "redis": (RedisKind.SERVER, False),
    "rediss": (RedisKind.SERVER, True),
    "unix": (RedisKind.UNIX, False),
    "redis+sentinel": (RedisKind.SENTINEL, False),
    "rediss+sentinel": (RedisKind.SENTINEL, True),
    "redis+cluster": (RedisKind.CLUSTER, False),
    "rediss+cluster": (RedisKind.CLUSTER, True),
}
_DEFAULT_PORT: Final = {RedisKind.SERVER: 6379, RedisKind.SENTINEL: 26379, RedisKind.CLUSTER: 6379}
_MAX_NODES: Final = 64
_MAX_DB: Final = 2**31 - 1  # redis.conf `databases` is an int
_HOSTNAME: Final = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_SERVICE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_DIGITS: Final = re.compile(r"[0-9]{1,10}")


class RedisUrlError(ValueError):
    """A ``[redis].url`` that is not one of the accepted forms. ``problem`` says what is wrong
    (it never contains the password), ``expected`` the form that was expected."""

    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(f"{problem}; expected {expected}")
        self.problem = problem
        self.expected = expected


@dataclass(frozen=True, slots=True)
class RedisNode:
    host: str  # a name or an IP address (IPv6 without brackets)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis URL names: the servers to ask, and how to log in."""

    kind: RedisKind
    nodes: tuple[RedisNode, ...] = ()  # the server, the sentinels, or the cluster's startup nodes
    service: str | None = None  # Sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    path: str | None = None  # UNIX: the socket's path

    def __post_init__(self) -> None:
        expected = FORMS[self.kind]
        if self.kind is RedisKind.UNIX:
            if self.path is None or not self.path.startswith("/") or self.nodes:
                raise RedisUrlError("a Unix socket URL needs an absolute path", expected)
        elif not 1 <= len(self.nodes) <= (1 if self.kind is RedisKind.SERVER else _MAX_NODES):
            raise RedisUrlError(f"{len(self.nodes)} hosts", expected)
        if (self.kind is RedisKind.SENTINEL) != (self.service is not None):
            raise RedisUrlError("a service name belongs to (only) a Sentinel URL", expected)
        if self.kind is RedisKind.CLUSTER and self.db != 0:
            raise RedisUrlError(f"db {self.db} (a Redis Cluster has only db 0)", expected)
        if not 0 <= self.db <= _MAX_DB:
            raise RedisUrlError(f"db {self.db} is not a number >= 0", expected)

    def __str__(self) -> str:
        """The target as a URL without the password (for messages and logs)."""
        scheme = next(name for name, kind in _SCHEMES.items() if kind == (self.kind, self.tls))
        user = f"{self.username or ''}{':***' if self.password is not None else ''}"
        login = f"{user}@" if user else ""
        if self.kind is RedisKind.UNIX:
            return f"{scheme}://{login}{self.path}?db={self.db}"
        hosts = ",".join(str(node) for node in self.nodes)
        if self.kind is RedisKind.SENTINEL:
            return f"{scheme}://{login}{hosts}/{self.service}/{self.db}"
        if self.kind is RedisKind.CLUSTER:
            return f"{scheme}://{login}{hosts}"
        return f"{scheme}://{login}{hosts}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The target ``url`` names. Raises :class:`RedisUrlError` saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        shown = repr(scheme) if sep else "none"
        *others, last = (f"{name}://" for name in _SCHEMES)
        known = f"{', '.join(others)} or {last}"
        raise RedisUrlError(f"unknown scheme {shown}", f"a Redis URL starting with {known}")
    kind, tls = _SCHEMES[scheme]
    expected = FORMS[kind]
    username, password, rest = _split_login(rest, kind)
    if "#" in rest:
        raise RedisUrlError("a '#' fragment", expected)
    rest, qmark, query = rest.partition("?")
    if kind is RedisKind.UNIX:
        if not rest.startswith("/"):
            raise RedisUrlError(f"path {rest!r} is not absolute", expected)
        db = _unix_query(query, expected) if qmark else 0
        return RedisTarget(kind, db=db, username=username, password=password, path=rest)
    if qmark:
        raise RedisUrlError(f"query parameters {query!r} (none are accepted here)", expected)
    hosts, _, path = rest.partition("/")
    host_texts = hosts.split(",")
    if kind is RedisKind.SERVER and len(host_texts) > 1:
        raise RedisUrlError(
            f"{len(host_texts)} hosts (for Sentinel or Cluster use redis+sentinel:// or"
            " redis+cluster://)",
            expected,
        )
    if len(host_texts) > _MAX_NODES:
        raise RedisUrlError(f"{len(host_texts)} hosts (at most {_MAX_NODES})", expected)
    nodes = tuple(_node(text, kind, index) for index, text in enumerate(host_texts))
    service: str | None = None
    if kind is RedisKind.SENTINEL:
        service, _, path = path.partition("/")
        if not service:
            raise RedisUrlError("no service name (the master's name in sentinel.conf)", expected)
        if not _SERVICE.fullmatch(service):
            raise RedisUrlError(
                f"service name {service!r} (letters, digits and '_.:-', at most 128)", expected
            )
    db = _db(path.removesuffix("/"), kind, expected)
    return RedisTarget(kind, nodes, service, db, username, password, tls)


def redact_redis_url(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``, whatever the URL's form; text
    that is not a URL is returned with anything after a ``:`` and before a last ``@`` hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    kind = _SCHEMES.get(scheme.lower(), (RedisKind.SERVER, False))[0]
    at = _login_end(rest, kind)
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    redacted = f"{scheme}{sep}{rest}"
    return re.sub(r"(?i)(password=)[^&#]*", r"\1***", redacted)


def _login_end(rest: str, kind: RedisKind) -> int:
    """Where the credentials end (the last ``@``), or -1. Hosts, service names and db numbers
    never hold an ``@``, so a password may; a Unix path starts at the first ``/``."""
    if kind is RedisKind.UNIX and rest.startswith("/"):
        return -1
    return rest.rfind("@")


def _split_login(rest: str, kind: RedisKind) -> tuple[str | None, str | None, str]:
    at = _login_end(rest, kind)
    if at < 0:
        return None, None, rest
    user, colon, password = rest[:at].partition(":")
    return unquote(user) or None, unquote(password) if colon else None, rest[at + 1 :]


def _node(text: str, kind: RedisKind, index: int) -> RedisNode:
    expected = FORMS[kind]
    which = f"host {index + 1}" if kind is not RedisKind.SERVER else "the host"
    if not text:
        raise RedisUrlError(f"{which} is empty", expected)
    if text.startswith("["):
        address, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise RedisUrlError(f"{which} {text!r}: an IPv6 address needs [addr]:port", expected)
        port_text = port_text[1:]
        try:
            host = str(ipaddress.IPv6Address(address))
        except ValueError:
            raise RedisUrlError(f"{which} {text!r}: not an IPv6 address", expected) from None
    else:
        host, colon, port_text = text.partition(":")
        if colon and not port_text:
            raise RedisUrlError(f"{which} {text!r}: empty port", expected)
        if not _HOSTNAME.fullmatch(host):
            raise RedisUrlError(f"{which} {text!r}: not a host name or IPv4 address", expected)
    if not port_text:
        return RedisNode(host, _DEFAULT_PORT[kind])
    if not _DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise RedisUrlError(f"{which} {text!r}: port must be 1-65535", expected)
    return RedisNode(host, int(port_text))


def _db(text: str, kind: RedisKind, expected: str) -> int:
    if not text:
        return 0
    if not _DIGITS.fullmatch(text) or int(text) > _MAX_DB:
        raise RedisUrlError(f"db {text!r} is not a number >= 0", expected)
    db = int(text)
    if kind is RedisKind.CLUSTER and db != 0:
        raise RedisUrlError(f"db {db} (a Redis Cluster has only db 0)", expected)
    return db


def _unix_query(query: str, expected: str) -> int:
    name, equals, value = query.partition("=")
    if name != "db" or not equals or "&" in value:
        raise RedisUrlError(f"query parameters {query!r} (only db=N is accepted)", expected)
    return _db(value, RedisKind.UNIX, expected)
