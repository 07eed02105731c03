"""The patched socket module: every TCP connect goes to the proxy, by name where there is one.

:func:`install` replaces methods of :class:`socket.socket` itself (so sockets made before it,
``ssl.SSLSocket`` and sockets from ``socket.fromfd`` are covered too) and the module's name
functions:

* ``connect``/``connect_ex`` of an AF_INET/AF_INET6 stream socket connect the socket to the
  proxy and run the handshake of :mod:`.wire` on it; the socket stays the app's own TCP socket,
  so options, timeouts, ``makefile``, TLS and ``sendfile`` behave as usual, and ``getpeername``
  answers with the destination the app asked for. A refusal raises at ``connect()`` (see
  :mod:`.errors`). A non-blocking socket outside asyncio completes the handshake before
  ``connect`` returns (it then reports success, or the error, at once); asyncio's and uvloop's
  ``sock_connect`` wait without blocking the loop (:mod:`.aio`).
* ``getaddrinfo``, ``gethostbyname(_ex)``, ``gethostbyaddr`` and ``getnameinfo`` never send a
  DNS query: numeric hosts are parsed as before, names get synthetic addresses (:mod:`.names`).
* UDP, raw and packet sockets are refused when created; ``sendto``/``sendmsg`` with an address
  on a TCP socket (TCP Fast Open would connect without ``connect``) are refused;
  ``bind``/``listen`` follow :attr:`Settings.listen`.

Whatever goes around this module (``_socket`` used directly, ctypes, C extensions, other
programs) is the firewall's to stop: see THREAT_MODEL.md.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .errors import error_for, proxy_garbled, proxy_unreachable
from .names import NameTable, normalize
from .settings import Settings
from .wire import HandshakeError, Reply, ReplyReader, connect_request

__all__ = ["Destination", "install", "installed", "uninstall"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_INET: Final = (socket.AF_INET, socket.AF_INET6)
_TYPE_MASK: Final = ~(getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0))
_AF_PACKET: Final = getattr(socket, "AF_PACKET", -1)

# The real things, from the C module: what the patches call.
real_connect: Final = _socket.socket.connect
real_connect_ex: Final = _socket.socket.connect_ex
real_getpeername: Final = _socket.socket.getpeername
real_getsockname: Final = _socket.socket.getsockname
real_getsockopt: Final = _socket.socket.getsockopt
_real_bind: Final = _socket.socket.bind
_real_listen: Final = _socket.socket.listen
_real_sendto: Final = _socket.socket.sendto
_real_sendmsg: Final = _socket.socket.sendmsg
# The handshake uses the C methods: an ssl.SSLSocket connects with its TLS object already made,
# and its own send/recv would speak TLS to the proxy.
_real_sendall: Final = _socket.socket.sendall
_real_recv: Final = _socket.socket.recv

NAMES = NameTable()


class _State:
    """What install() set up, and what uninstall() puts back."""

    settings: Settings | None = None
    problem: str | None = None  # set when the shim is installed closed (bad settings)
    saved: dict[tuple[object, str], object] = {}


# fd -> (the socket's own address when it connected, the address the app asked for). The own
# address guards against a descriptor reused after a close this module did not see.
_peers: dict[int, tuple[Any, Any]] = {}
# fd -> errno a non-blocking connect ended with, for the app's getsockopt(SO_ERROR).
_pending_errors: dict[int, int] = {}
_lock = threading.Lock()


class Destination:
    """Where the app asked to go: a name (from a synthetic address or a name in ``connect``)
    or an address, and the port; ``text`` is how messages show it."""

    __slots__ = ("host", "peer", "port", "text")

    def __init__(self, host: str | IPAddress, port: int, peer: Any) -> None:
        self.host = host
        self.port = port
        self.peer = peer  # what getpeername() reports
        shown = f"[{host}]" if isinstance(host, ipaddress.IPv6Address) else str(host)
        self.text = f"{shown}:{port}"


def proxied(sock: socket.socket) -> bool:
    return sock.family in _INET and (sock.type & _TYPE_MASK) == socket.SOCK_STREAM


def destination_of(sock: socket.socket, address: Any) -> Destination:
    """Parse a connect() address the way the kernel would, without resolving names."""
    if not isinstance(address, tuple) or len(address) < 2:
        raise TypeError(f"{sock.family.name} address must be a tuple (host, port), not {address!r}")
    host, port = address[0], address[1]
    if isinstance(host, bytes):
        host = host.decode("idna")
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"address must be (str, int), not {address!r}")
    if not 0 < port <= 0xFFFF:
        raise OverflowError("connect(): port must be 1-65535.")
    named = NAMES.by_text.get(host)  # the common case: an address getaddrinfo handed out
    if named is not None and (":" in host) == (sock.family == socket.AF_INET6):
        peer_fast: Any = (host, port) if sock.family == socket.AF_INET else (host, port, 0, 0)
        return Destination(named, port, peer_fast)
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        ip = None
    if ip is None and _is_localhost(host):
        ip = ipaddress.ip_address("127.0.0.1" if sock.family == socket.AF_INET else "::1")
    if ip is None:  # a name given straight to connect(): the kernel would have resolved it
        host = _name_text(host)  # what getaddrinfo would refuse is refused here, before any I/O
        synthetic = NAMES.v4(host) if sock.family == socket.AF_INET else NAMES.v6(host)
        peer: Any = (synthetic, port) if sock.family == socket.AF_INET else (synthetic, port, 0, 0)
        return Destination(normalize(host), port, peer)
    if sock.family == socket.AF_INET and ip.version != 4:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
    # the peer as the kernel would format it (inet_ntop: "::ffff:127.0.0.1", not ::ffff:7f00:1)
    shown = socket.inet_ntop(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, ip.packed)
    peer = (shown, port) if sock.family == socket.AF_INET else (shown, port, *address[2:4])
    if sock.family == socket.AF_INET6 and len(peer) == 2:
        peer = (*peer, 0, 0)
    name = NAMES.name_for(ip)
    return Destination(name if name is not None else ip, port, peer)


# --- the handshake, blocking ------------------------------------------------------------------
def _settings() -> Settings:
    settings = _State.settings
    if settings is None:
        raise PermissionError(
            errno.EACCES, f"egress: outbound connections are closed: {_State.problem}"
        )
    return settings


def handshake_blocking(sock: socket.socket, dest: Destination) -> None:
    """Connect ``sock`` to the proxy and through it to ``dest``; raise what the app should see.

    Bounded by the socket's own timeout if it has one (as a real connect would be), else by
    the shim's ``connect_timeout``. The socket's timeout mode is what it was afterwards.
    """
    settings = _settings()
    proxy = settings.proxy_for(sock.family)  # a PermissionError of its own when it cannot be
    saved = sock.gettimeout()
    budget = saved if saved else settings.connect_timeout
    deadline = time.monotonic() + budget
    try:
        sock.settimeout(budget)
        try:
            real_connect(sock, proxy)
        except TimeoutError:
            raise TimeoutError(
                errno.ETIMEDOUT, f"egress: timed out reaching the proxy at {settings.proxy_text}"
            ) from None
        except OSError as exc:
            raise proxy_unreachable(settings.proxy_text, dest.text, exc) from None
        with contextlib.suppress(OSError):  # refused at accept: the refusal waits to be read
            _real_sendall(sock, connect_request(dest.host, dest.port))
        reader = ReplyReader()
        while reader.reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"egress: no answer from the proxy at {settings.proxy_text} for {dest.text}"
                    f" within {budget:g} s",
                )
            sock.settimeout(left)
            try:
                data = _real_recv(sock, reader.want)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            reader.take(data)
    except HandshakeError as exc:
        raise proxy_garbled(settings.proxy_text, exc) from None
    finally:
        sock.settimeout(saved)
    settle(sock, dest, reader.reply, settings)


def settle(sock: socket.socket, dest: Destination, reply: Reply | None, settings: Settings) -> None:
    """The handshake is over: raise the refusal, or remember whom the app asked for."""
    assert reply is not None
    if not reply.ok:
        raise error_for(reply, dest.text, settings.proxy_text)
    remember_peer(sock, dest)


def remember_peer(sock: socket.socket, dest: Destination) -> None:
    with _lock:
        _peers[sock.fileno()] = (real_getsockname(sock), dest.peer)


# --- the patches --------------------------------------------------------------------------------
def _connect(self: socket.socket, address: Any) -> None:
    if not proxied(self):
        return real_connect(self, address)
    handshake_blocking(self, destination_of(self, address))
    return None


def _connect_ex(self: socket.socket, address: Any) -> int:
    if not proxied(self):
        return real_connect_ex(self, address)
    try:
        handshake_blocking(self, destination_of(self, address))
    except (OSError, OverflowError, TypeError) as exc:
        if not isinstance(exc, OSError) or exc.errno is None:
            raise
        if self.gettimeout() == 0.0:
            with _lock:
                _pending_errors[self.fileno()] = exc.errno
        return exc.errno
    return 0


def _getpeername(self: socket.socket) -> Any:
    entry = _peers.get(self.fileno())
    if entry is not None and real_getsockname(self) == entry[0]:  # not a reused descriptor
        real_getpeername(self)  # still connected: ENOTCONN as usual when not
        return entry[1]
    return real_getpeername(self)


def _getsockopt(self: socket.socket, level: int, option: int, *rest: int) -> Any:
    if level == socket.SOL_SOCKET and option == socket.SO_ERROR and not rest:
        with _lock:
            pending = _pending_errors.pop(self.fileno(), None)
        if pending is not None:
            return pending
    return real_getsockopt(self, level, option, *rest)


def _make_real_close(original: Callable[..., None]) -> Callable[..., None]:
    def _real_close(self: socket.socket, _ss: Any = _socket.socket) -> None:
        fd = self.fileno()
        if fd >= 0:
            with _lock:
                _peers.pop(fd, None)
                _pending_errors.pop(fd, None)
        original(self, _ss)

    return _real_close


def _make_init(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(  # noqa: N807 - it becomes socket.socket.__init__
        self: socket.socket, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None
    ) -> None:
        original(self, family, type, proto, fileno)
        why = refused_kind(self.family, self.type)
        if why is not None:
            if fileno is None:
                self.close()
            else:
                self.detach()
            raise PermissionError(errno.EACCES, f"egress: {why} sockets are not allowed here")

    return __init__


def refused_kind(family: int, kind: int) -> str | None:
    """Why a socket of this family and type may not exist in the sandbox, or None."""
    if family == _AF_PACKET:
        return "packet"
    if family in _INET:
        kind &= _TYPE_MASK
        if kind == socket.SOCK_DGRAM:
            return "UDP"
        if kind == socket.SOCK_RAW:
            return "raw"
        if kind != socket.SOCK_STREAM:
            return f"{socket.SocketKind(kind).name} (not TCP)"
    return None


def _bind(self: socket.socket, address: Any) -> None:
    if proxied(self) and isinstance(address, tuple) and address and isinstance(address[0], str):
        address = (_bind_host(self, address[0]), *address[1:])
    policy = _State.settings.listen if _State.settings is not None else "none"
    if proxied(self) and policy != "any" and isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if port != 0:
            loopback = _is_loopback(host)
            if policy == "none" or not loopback:
                raise PermissionError(
                    errno.EACCES,
                    f"egress: bind to {host}:{port} is not allowed here (EGRESS_SANDBOX_LISTEN"
                    f"={policy}; {'port 0 only' if policy == 'none' else 'loopback only'})",
                )
    return _real_bind(self, address)


def _bind_host(sock: socket.socket, host: str) -> str:
    """bind() would resolve a name in C (a DNS query): loopback names are answered here, the
    empty host is "any", and any other name is refused."""
    if not host or _numeric(host) or host == "<broadcast>":
        return host
    if _is_localhost(host):
        return "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
    raise socket.gaierror(
        socket.EAI_NONAME,
        f"egress: bind() to the name {host!r} would need DNS, which the sandbox has none of:"
        " bind to an address",
    )


def _listen(self: socket.socket, *backlog: int) -> None:
    policy = _State.settings.listen if _State.settings is not None else "none"
    if proxied(self) and policy != "any":
        bound = real_getsockname(self)
        if policy == "none" or not _is_loopback(bound[0]):
            raise PermissionError(
                errno.EACCES,
                f"egress: listen() on {bound[0]}:{bound[1]} is not allowed here"
                f" (EGRESS_SANDBOX_LISTEN={policy})",
            )
    return _real_listen(self, *backlog)


def _is_loopback(host: Any) -> bool:
    try:
        address = ipaddress.ip_address(str(host).partition("%")[0])
    except ValueError:
        return bool(host == "localhost")
    return address.is_loopback


def _sendto(self: socket.socket, data: Any, *args: Any) -> int:
    if proxied(self) and args and not isinstance(args[-1], int):
        raise PermissionError(
            errno.EACCES, "egress: sendto() with an address (TCP Fast Open) is not allowed here"
        )
    return _real_sendto(self, data, *args)


def _sendmsg(self: socket.socket, buffers: Any, *args: Any) -> int:
    if proxied(self) and len(args) >= 3 and args[2] is not None:
        raise PermissionError(
            errno.EACCES, "egress: sendmsg() with an address (TCP Fast Open) is not allowed here"
        )
    return _real_sendmsg(self, buffers, *args)


# --- names ---------------------------------------------------------------------------------
_orig_getaddrinfo: Final = socket.getaddrinfo
_orig_gethostbyname: Final = socket.gethostbyname
_orig_gethostbyname_ex: Final = socket.gethostbyname_ex
_orig_getnameinfo: Final = socket.getnameinfo


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _name_text(host: str | bytes) -> str:
    """The name as getaddrinfo would send it (IDNA), or gaierror for what no DNS could carry."""
    try:
        text = host.decode("ascii") if isinstance(host, bytes) else host.encode("idna").decode()
    except (UnicodeError, ValueError):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    labels = text.rstrip(".").split(".")
    if (
        not text.rstrip(".")
        or len(text) > 253
        or any(not 0 < len(label) <= 63 for label in labels)
        or not all(0x21 <= ord(c) < 0x7F for c in text)
    ):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return text


def _port_number(port: Any) -> int:
    if port is None:
        return 0
    if isinstance(port, int):
        return port
    text = port.decode() if isinstance(port, bytes) else str(port)
    if text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")  # /etc/services, no DNS
    except OSError:
        raise socket.gaierror(
            socket.EAI_SERVICE, "Servname not supported for ai_socktype"
        ) from None


def getaddrinfo(  # noqa: PLR0917 - socket.getaddrinfo's own signature
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[tuple[Any, Any, int, str, Any]]:
    if host is None or (isinstance(host, str | bytes) and _numeric(_as_text(host))):
        return _orig_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    if flags & socket.AI_NUMERICHOST:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    name = _name_text(host)
    number = _port_number(port)
    if _is_localhost(name):  # RFC 6761: loopback, answered here, as the system resolver would
        loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        return _orig_getaddrinfo(loopback, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    address: tuple[str, int] | tuple[str, int, int, int]
    if family in {socket.AF_UNSPEC, socket.AF_INET}:
        af, address = socket.AF_INET, (NAMES.v4(name), number)
    elif family == socket.AF_INET6:
        af, address = socket.AF_INET6, (NAMES.v6(name), number, 0, 0)
    else:
        raise socket.gaierror(socket.EAI_FAMILY, "ai_family not supported")
    kinds = [type] if type else [socket.SOCK_STREAM]
    canon = name.rstrip(".") if flags & socket.AI_CANONNAME else ""
    results = []
    for kind in kinds:
        proto_for = proto or (
            socket.IPPROTO_TCP
            if kind == socket.SOCK_STREAM
            else socket.IPPROTO_UDP
            if kind == socket.SOCK_DGRAM
            else 0
        )
        results.append(
            (socket.AddressFamily(af), socket.SocketKind(kind), proto_for, canon, address)
        )
    return results


def _is_localhost(name: str) -> bool:
    name = normalize(name)
    return name == "localhost" or name.endswith(".localhost")


def _as_text(host: str | bytes) -> str:
    return host.decode("ascii", "replace") if isinstance(host, bytes) else host


def gethostbyname(host: str) -> str:
    if _numeric(host):
        return _orig_gethostbyname(host)
    name = _name_text(host)
    return "127.0.0.1" if _is_localhost(name) else NAMES.v4(name)


def gethostbyname_ex(host: str) -> tuple[str, list[str], list[str]]:
    if _numeric(host):
        return _orig_gethostbyname_ex(host)
    name = _name_text(host)
    return name, [], [gethostbyname(name)]


def gethostbyaddr(host: str) -> tuple[str, list[str], list[str]]:
    if not _numeric(host):
        name = _name_text(host)
        return name, [], [NAMES.v4(name)]
    found = NAMES.name_for(ipaddress.ip_address(host.partition("%")[0]))
    if found is None:  # a reverse lookup would be a DNS query: answer as if there were no PTR
        raise socket.herror(1, "Unknown host")
    return found, [], [host]


def getnameinfo(sockaddr: Any, flags: int) -> tuple[str, str]:
    host = sockaddr[0]
    numeric_host, service = _orig_getnameinfo(sockaddr, flags | socket.NI_NUMERICHOST)
    if flags & socket.NI_NUMERICHOST or not _numeric(host):
        return numeric_host, service
    name = NAMES.name_for(ipaddress.ip_address(host.partition("%")[0]))
    if name is not None:
        return name, service
    if flags & socket.NI_NAMEREQD:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return numeric_host, service


# --- install -----------------------------------------------------------------------------------
def _patch(owner: object, name: str, value: object) -> None:
    key = (owner, name)
    if key not in _State.saved:
        _State.saved[key] = vars(owner).get(name, _MISSING)
    setattr(owner, name, value)


_MISSING: Final = object()


def install(settings: Settings | None, problem: str | None = None) -> None:
    """Patch the socket module for ``settings``; with None, install closed: every outbound
    connect raises PermissionError quoting ``problem``. Idempotent (a second call updates the
    settings)."""
    _State.settings = settings
    _State.problem = problem
    if _State.saved:
        return
    cls = socket.socket
    _patch(cls, "connect", _connect)
    _patch(cls, "connect_ex", _connect_ex)
    _patch(cls, "getpeername", _getpeername)
    _patch(cls, "getsockopt", _getsockopt)
    _patch(cls, "bind", _bind)
    _patch(cls, "listen", _listen)
    _patch(cls, "sendto", _sendto)
    _patch(cls, "sendmsg", _sendmsg)
    _patch(cls, "_real_close", _make_real_close(cls._real_close))  # type: ignore[attr-defined]
    _patch(cls, "__init__", _make_init(cls.__init__))
    for name, function in (
        ("getaddrinfo", getaddrinfo),
        ("gethostbyname", gethostbyname),
        ("gethostbyname_ex", gethostbyname_ex),
        ("gethostbyaddr", gethostbyaddr),
        ("getnameinfo", getnameinfo),
    ):
        _patch(socket, name, function)
    from . import aio  # noqa: PLC0415 - asyncio is imported only when the shim is installed

    aio.install()


def installed() -> bool:
    return bool(_State.saved)


def uninstall() -> None:
    """Put everything back (tests use it; an app has no reason to)."""
    from . import aio  # noqa: PLC0415

    aio.uninstall()
    for (owner, name), value in reversed(list(_State.saved.items())):
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _State.saved.clear()
    _State.settings = None
    _State.problem = None
