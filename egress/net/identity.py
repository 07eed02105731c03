"""Which local uid owns the client end of an accepted connection — asked of the kernel.

App identity is never taken from what a client says. For a connection accepted on

* an ``AF_UNIX`` socket, :func:`peer_uid_unix` reads ``SO_PEERCRED`` (the credentials the kernel
  recorded when the client called ``connect()``);
* a loopback TCP socket, :class:`TcpOwnerLookup` asks ``NETLINK_SOCK_DIAG`` for the one socket
  whose 4-tuple is the *client's* end of the connection and reads its owner uid. It sends an
  exact-id request (not a dump), so the kernel does one hash lookup: the cost does not grow with
  the number of open sockets. :class:`ProcNetTcpLookup` does the same by scanning
  ``/proc/net/tcp{,6}`` and is only a fallback for kernels without ``inet_diag`` (its cost grows
  with the number of sockets). :func:`make_tcp_owner_lookup` picks one at start-up.

Both TCP lookups see the sockets of one **network namespace** only: the netlink socket (and
``/proc/net``) belong to the netns of the thread that creates or reads them. Create the lookup in
the same netns as the listener; the caller is responsible for that.

A peer on another host has no local socket: the lookup finds nothing and returns ``None``. The
kernel's exact lookup falls back to *listening* sockets when no connected socket matches (it is
the receive-path lookup), and reports ``TIME_WAIT`` sockets with uid 0; neither is the client, so
every reply is checked to be the very 4-tuple asked for, in a state that still has an owner, before
its uid is believed.

The uid reported is the one the socket was created with (``sk_uid``: the creator's fsuid), even if
the descriptor was later passed to another process. A client socket bound to a device
(``SO_BINDTODEVICE``) is not found (``idiag_if`` is 0), which fails closed.

Kernel structures used (native byte order unless marked big-endian)::

    linux/netlink.h
      struct nlmsghdr {            /* 16 bytes, "=IHHII" */
          __u32 nlmsg_len;         /* header + payload */
          __u16 nlmsg_type;        /* SOCK_DIAG_BY_FAMILY, NLMSG_ERROR (2), NLMSG_DONE (3) */
          __u16 nlmsg_flags;       /* NLM_F_REQUEST (1) */
          __u32 nlmsg_seq;
          __u32 nlmsg_pid;         /* 0 = kernel */
      };
      struct nlmsgerr {            /* payload of NLMSG_ERROR */
          int error;               /* negative errno, 0 = ack */
          struct nlmsghdr msg;     /* the request that failed */
      };

    linux/sock_diag.h
      #define SOCK_DIAG_BY_FAMILY 20

    linux/inet_diag.h
      struct inet_diag_sockid {    /* 48 bytes */
          __be16 idiag_sport;      /* big-endian */
          __be16 idiag_dport;      /* big-endian */
          __be32 idiag_src[4];     /* IPv4: src[0], rest zero; IPv6: all 16 bytes */
          __be32 idiag_dst[4];
          __u32  idiag_if;
          __u32  idiag_cookie[2];  /* INET_DIAG_NOCOOKIE = {~0U, ~0U}: do not check */
      };
      struct inet_diag_req_v2 {    /* 56 bytes */
          __u8  sdiag_family;      /* AF_INET / AF_INET6 */
          __u8  sdiag_protocol;    /* IPPROTO_TCP */
          __u8  idiag_ext;         /* no extensions requested */
          __u8  pad;
          __u32 idiag_states;      /* bit mask of TCP states; all */
          struct inet_diag_sockid id;
      };
      struct inet_diag_msg {       /* 72 bytes, followed by attributes we ignore */
          __u8  idiag_family;
          __u8  idiag_state;
          __u8  idiag_timer;
          __u8  idiag_retrans;
          struct inet_diag_sockid id;
          __u32 idiag_expires;
          __u32 idiag_rqueue;
          __u32 idiag_wqueue;
          __u32 idiag_uid;
          __u32 idiag_inode;
      };
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

__all__ = [
    "AmbiguousOwnerError",
    "ConnectionOwners",
    "IdentityUnconfirmedError",
    "ProcNetTcpLookup",
    "SockAddr",
    "SocketOwner",
    "TcpOwnerLookup",
    "UdpOwnerLookup",
    "make_tcp_owner_lookup",
    "peer_uid_unix",
]

log = logging.getLogger(__name__)

SockAddr = tuple[str, int] | tuple[str, int, int, int]
"""An address as ``getpeername()``/``getsockname()`` return it; only host and port are read."""

# --- SO_PEERCRED --------------------------------------------------------------------------------

_UCRED: Final = struct.Struct("=iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


def peer_uid_unix(sock: socket.socket) -> int:
    """The uid of the process that connected an accepted ``AF_UNIX`` stream socket.

    Reads ``SO_PEERCRED`` (``struct ucred {pid_t pid; uid_t uid; gid_t gid;}`` from
    ``<sys/socket.h>``): the credentials the kernel recorded at ``connect()`` time.
    Raises ``ValueError`` for a socket that is not ``AF_UNIX``, ``OSError`` from the kernel.
    """
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"SO_PEERCRED needs an AF_UNIX socket, not {sock.family!r}")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


# --- common -------------------------------------------------------------------------------------

# include/net/tcp_states.h. A client socket connected to us is ESTABLISHED, or FIN_WAIT1/2 once
# it half-closed; in any other state (SYN_SENT above all: another socket dialling the same
# 4-tuple) it is not the client of the connection we accepted.
_TCP_ESTABLISHED: Final = 1
_TCP_FIN_WAIT1: Final = 4
_TCP_FIN_WAIT2: Final = 5
_TCP_CLOSE_WAIT: Final = 8
_CLIENT_STATES: Final = frozenset({_TCP_ESTABLISHED, _TCP_FIN_WAIT1, _TCP_FIN_WAIT2})
_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96


@dataclass(frozen=True, slots=True)
class SocketOwner:
    """The owner of the client socket of a connection."""

    uid: int
    inode: int  # socket inode; 0 when the client already closed its descriptor (orphaned)


def _owner(state: int, uid: int, inode: int) -> SocketOwner | None:
    """The owner a matching socket reports, or None when it is no connected client's.

    Only the states of a client connected to us count (``_CLIENT_STATES``): a listener, a
    ``TIME_WAIT`` socket, or a socket still dialling (``SYN_SENT``, which may be another app's
    socket taking a 4-tuple over) is not the client of an accepted connection. Orphaned
    ``FIN_WAIT2`` sockets the kernel turned into time-wait minisocks report state ``FIN_WAIT2``
    but no owner, uid 0 and inode 0: treating that as root would be wrong, so uid 0 with inode
    0 is "no owner"; a root socket whose descriptor is already closed looks the same and is
    dropped too.
    """
    if state not in _CLIENT_STATES or (uid == 0 and inode == 0):
        return None
    return SocketOwner(uid=int(uid), inode=int(inode))


class _Query(NamedTuple):
    """The client socket's 4-tuple, as seen from the client: src = its own end."""

    family: int  # AF_INET or AF_INET6
    src: bytes  # packed address, 4 or 16 bytes
    sport: int
    dst: bytes
    dport: int


@functools.lru_cache(maxsize=1024)  # a connection's two addresses are usually the last ones seen
def _pack(host: str) -> bytes:
    """A strict IP literal (dotted quad or IPv6, zone stripped) -> 4 or 16 packed bytes."""
    host = host.partition("%")[0]  # "fe80::1%eth0": the lookup is not scoped (idiag_if = 0)
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None


def _client_query(peer: SockAddr, local: SockAddr) -> _Query:
    """Turn our accepted socket's (peer, local) into the client socket's id.

    An IPv4 client of a dual-stack IPv6 listener shows as ``::ffff:a.b.c.d`` on our side; its own
    socket is IPv4, so such a pair is turned into an IPv4 query.
    """
    src, dst = _pack(peer[0]), _pack(local[0])
    sport, dport = int(peer[1]), int(local[1])
    if not (0 < sport < 65536 and 0 < dport < 65536):
        raise ValueError(f"bad port in {peer!r} / {local!r}")
    if len(src) != len(dst):
        raise ValueError(f"address families differ: {peer!r} / {local!r}")
    if len(src) == 4:
        return _Query(socket.AF_INET, src, sport, dst, dport)
    if src[:12] == _V4_MAPPED_PREFIX and dst[:12] == _V4_MAPPED_PREFIX:
        return _Query(socket.AF_INET, src[12:], sport, dst[12:], dport)
    return _Query(socket.AF_INET6, src, sport, dst, dport)


# --- NETLINK_SOCK_DIAG --------------------------------------------------------------------------

_NETLINK_SOCK_DIAG: Final = 4  # linux/netlink.h
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_NLM_F_REQUEST: Final = 0x01
_SOCK_DIAG_BY_FAMILY: Final = 20  # linux/sock_diag.h
_ALL_STATES: Final = 0xFFFFFFFF
_NOCOOKIE: Final = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE, both halves

_NLMSGHDR: Final = struct.Struct("=IHHII")
# nlmsghdr + inet_diag_req_v2 (family, protocol, ext, pad, states, sockid)
_REQUEST: Final = struct.Struct("=IHHII" + "BBBxI" + "HH16s16s" + "III")  # ports pre-swapped
# inet_diag_msg up to idiag_inode, after the nlmsghdr
_DIAG_MSG: Final = struct.Struct("=BBBB" + "36s" + "III" + "III" + "II")
_NLMSGERR: Final = struct.Struct("=i")
_RECV_BUFSIZE: Final = 8192


def _pad16(addr: bytes) -> bytes:
    return addr + b"\x00" * (16 - len(addr))


def _messages(data: memoryview, seq: int) -> Iterator[tuple[int, int, int]]:
    """``(type, body offset, length)`` of each netlink message in ``data`` answering ``seq``
    (others answer earlier requests that timed out)."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise OSError(errno.EBADMSG, "truncated netlink message")
        body = offset + _NLMSGHDR.size
        offset += (length + 3) & ~3  # NLMSG_ALIGN
        if mseq == seq:
            if mtype == _NLMSG_ERROR:
                (err,) = _NLMSGERR.unpack_from(data, body)
                if err not in (-errno.ENOENT, 0):
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                mtype = _NLMSG_DONE  # "no such socket" and an ack both end the answer
            elif mtype != _NLMSG_DONE and (
                mtype != _SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + _DIAG_MSG.size
            ):
                raise OSError(errno.EBADMSG, f"unexpected netlink message type {mtype}")
            yield mtype, body, length


class _SockDiag:
    """One ``NETLINK_SOCK_DIAG`` socket: send an ``inet_diag_req_v2``, read the kernel's
    datagrams. Created in ``__init__``, so in the caller's network namespace."""

    def __init__(self, *, timeout_s: float = 0.2) -> None:
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = self._open(timeout_s)
        self._seq = 0
        self._buf = bytearray(_RECV_BUFSIZE)

    @staticmethod
    def _open(timeout_s: float) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
        try:
            sock.settimeout(None)  # really blocking, whatever socket.setdefaulttimeout() says
            sec = int(timeout_s)
            timeval = struct.pack("@ll", sec, int((timeout_s - sec) * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.bind((0, 0))  # kernel assigns our port id
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Close the netlink socket. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _reset(self) -> None:
        """A fresh netlink socket: drops the rest of a dump read only in part (the kernel
        would otherwise go on with it, and refuse a new request while it runs)."""
        self.close()
        self._sock = self._open(self._timeout_s)

    def _send(self, q: _Query, *, protocol: int, flags: int) -> tuple[int, bytes]:
        """Send one request; its sequence number and its packed socket id (ports, addresses)."""
        sock = self._sock
        if sock is None:
            raise ValueError(f"{type(self).__name__} is closed")
        self._seq = self._seq % 0xFFFFFFFF + 1  # 1 .. 2**32-1
        seq = self._seq
        # fmt: off
        request = _REQUEST.pack(
            _REQUEST.size, _SOCK_DIAG_BY_FAMILY, flags, seq, 0,  # nlmsghdr
            q.family, protocol, 0, _ALL_STATES,  # inet_diag_req_v2
            socket.htons(q.sport), socket.htons(q.dport), _pad16(q.src), _pad16(q.dst),
            0, _NOCOOKIE, _NOCOOKIE,  # idiag_if, idiag_cookie
        )
        # fmt: on
        try:
            sock.sendto(request, (0, 0))
        except BlockingIOError as exc:
            raise TimeoutError(errno.ETIMEDOUT, "sock_diag send timed out") from exc
        return seq, request[_NLMSGHDR.size + 8 : _NLMSGHDR.size + 8 + 36]

    def _receive(self) -> memoryview:
        """The kernel's next datagram; ``TimeoutError`` after the timeout without one. (A
        plain call, not a generator: a TCP lookup runs per connection, on the event loop.)"""
        sock = self._sock
        assert sock is not None
        buf = self._buf
        while True:
            try:
                n, (sender, _groups) = sock.recvfrom_into(buf)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired (EAGAIN)
                raise TimeoutError(errno.ETIMEDOUT, "sock_diag reply timed out") from exc
            if sender == 0:  # from the kernel
                return memoryview(buf)[:n]


class TcpOwnerLookup(_SockDiag):
    """Find the uid owning the client socket of an accepted local TCP connection (sock_diag).

    One ``NETLINK_SOCK_DIAG`` socket per instance, created in ``__init__`` (so in the caller's
    network namespace, which must be the listener's) and reused; ``close()`` releases it. The
    socket is blocking with a short ``SO_RCVTIMEO``: a lookup is one ``sendto`` and one
    ``recvfrom`` (a few µs), fine to call on the event loop thread. Not thread-safe: use one
    instance per thread.

    ``lookup()`` raises ``TimeoutError`` if the kernel did not answer in time, ``OSError`` for any
    other netlink failure and ``ValueError`` for addresses that are not IP literals; ``None``
    means "no local socket is the client's end" (remote peer, socket gone, ``TIME_WAIT``).
    """

    def __enter__(self) -> TcpOwnerLookup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lookup(self, peer: SockAddr, local: SockAddr) -> int | None:
        """The uid owning the client socket; ``peer``/``local`` are our accepted socket's
        ``getpeername()``/``getsockname()``. ``None`` when no local socket matches."""
        owner = self.lookup_owner(peer, local)
        return None if owner is None else owner.uid

    def lookup_owner(self, peer: SockAddr, local: SockAddr) -> SocketOwner | None:
        """Like :meth:`lookup`, with the client socket's inode as well."""
        return self._query(_client_query(peer, local))

    def _query(self, q: _Query) -> SocketOwner | None:
        seq, want = self._send(q, protocol=socket.IPPROTO_TCP, flags=_NLM_F_REQUEST)
        while True:
            data = self._receive()
            # The answer is one message (an exact-id request): the first one for seq decides.
            for mtype, body, _length in _messages(data, seq):
                if mtype == _NLMSG_DONE:
                    return None
                fields = _DIAG_MSG.unpack_from(data, body)
                r_family, state, sockid, uid, inode = fields[0], fields[1], fields[4], *fields[-2:]
                if r_family != q.family:
                    # An IPv6 client socket talking to an IPv4 address: v4-mapped on its side.
                    sockid = _unmap_sockid(sockid)
                if sockid != want:
                    return None  # the kernel fell back to a listener: not the client socket
                return _owner(state, uid, inode)


def _unmap_sockid(sockid: bytes) -> bytes:
    """ports + IPv6 src/dst, both ``::ffff:a.b.c.d`` -> the IPv4 layout; else unchanged."""
    src, dst = sockid[4:20], sockid[20:36]
    if src[:12] == _V4_MAPPED_PREFIX and dst[:12] == _V4_MAPPED_PREFIX:
        return sockid[:4] + _pad16(src[12:]) + _pad16(dst[12:])
    return sockid


# --- /proc/net/tcp fallback ---------------------------------------------------------------------


def _proc_hex(addr: bytes) -> bytes:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word as ``%08X`` in host order."""
    return b"".join(
        b"%08X" % int.from_bytes(addr[i : i + 4], sys.byteorder) for i in range(0, len(addr), 4)
    )


class ProcNetTcpLookup:
    """Same API as :class:`TcpOwnerLookup`, by scanning ``/proc/net/tcp`` and ``/proc/net/tcp6``.

    A fallback for kernels without ``inet_diag``: every lookup makes the kernel print the whole
    socket table, so its cost grows with the number of open sockets. Reads the tables of the
    calling thread's network namespace.
    """

    def __init__(self, *, proc_net: str = "/proc/net") -> None:
        self._tcp4 = os.path.join(proc_net, "tcp")
        self._tcp6 = os.path.join(proc_net, "tcp6")

    def close(self) -> None:
        """Nothing to release; present for API parity."""

    def __enter__(self) -> ProcNetTcpLookup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lookup(self, peer: SockAddr, local: SockAddr) -> int | None:
        """The uid owning the client socket, or ``None`` when no local socket matches."""
        owner = self.lookup_owner(peer, local)
        return None if owner is None else owner.uid

    def lookup_owner(self, peer: SockAddr, local: SockAddr) -> SocketOwner | None:
        """Like :meth:`lookup`, with the client socket's inode as well."""
        q = _client_query(peer, local)
        if q.family == socket.AF_INET6:
            return self._scan(self._tcp6, q.src, q.sport, q.dst, q.dport)
        found = self._scan(self._tcp4, q.src, q.sport, q.dst, q.dport)
        if found is None:  # an IPv6 client socket connected to a v4 address
            mapped_src, mapped_dst = _V4_MAPPED_PREFIX + q.src, _V4_MAPPED_PREFIX + q.dst
            found = self._scan(self._tcp6, mapped_src, q.sport, mapped_dst, q.dport)
        return found

    @staticmethod
    def _scan(path: str, src: bytes, sport: int, dst: bytes, dport: int) -> SocketOwner | None:
        # Row: "sl: local:port rem:port st tx:rx tr:when retrnsmt uid timeout inode ..."
        needle = b": %s:%04X %s:%04X " % (_proc_hex(src), sport, _proc_hex(dst), dport)
        try:
            with open(path, "rb") as f:
                table = f.read()
        except FileNotFoundError:  # no IPv6 in this kernel
            return None
        at = table.find(needle)
        if at < 0:
            return None
        end = table.find(b"\n", at)
        fields = table[at + len(needle) : end if end >= 0 else len(table)].split()
        return _owner(int(fields[0], 16), int(fields[4]), int(fields[6]))


# --- bound to the accepted connection ------------------------------------------------------


class IdentityUnconfirmedError(OSError):
    """The accepted connection was gone before its owner could be confirmed.

    A TCP lookup finds the client socket by its 4-tuple. If the client reset the connection
    between ``accept()`` and the lookup, another socket (another app's) may already have taken
    the same source port and so the same 4-tuple; the answer would describe that socket. So
    after every lookup the accepted socket must still be connected, or the answer is refused.
    """


def _still_connected(sock: Any) -> bool:
    """Whether the kernel still has ``sock`` connected (``TCP_INFO``'s ``tcpi_state``).

    While it is, its 4-tuple is ours: no other connection to this listener can have the same
    one, so a lookup made before this check described our client.
    """
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    # CLOSE_WAIT: the client half-closed; its socket still exists and holds the tuple.
    return state in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT)


class ConnectionOwners:
    """The uid owning the client end of an accepted connection, bound to that very connection.

    ``SO_PEERCRED`` for ``AF_UNIX`` (recorded by the kernel at ``connect()``, nothing to
    confirm); for TCP the 4-tuple lookup of ``tcp`` followed by the check that the accepted
    socket is still connected (:class:`IdentityUnconfirmedError` otherwise). Works with asyncio
    and uvloop transports.
    """

    __slots__ = ("_tcp",)

    def __init__(self, tcp: TcpOwnerLookup | ProcNetTcpLookup) -> None:
        self._tcp = tcp

    def __call__(self, transport: Any, *, remote: tuple[str, int] | None = None) -> int | None:
        """``remote``: where the client socket is connected to when that is not our listener's
        address (transparent mode: the original destination)."""
        sock = transport.get_extra_info("socket")
        if sock is None:
            raise ValueError("the transport has no socket")
        if sock.family == socket.AF_UNIX:
            return peer_uid_unix(sock)
        peer = transport.get_extra_info("peername")
        local = remote if remote is not None else transport.get_extra_info("sockname")
        if not peer or not local:
            raise IdentityUnconfirmedError(errno.ENOTCONN, "the client was gone before the lookup")
        uid = self._tcp.lookup(peer[:2], local[:2])
        if not _still_connected(sock):
            raise IdentityUnconfirmedError(
                errno.ECONNRESET,
                "the client reset the connection before its owner was confirmed"
                " (its 4-tuple may belong to another socket now)",
            )
        return uid

    def close(self) -> None:
        self._tcp.close()


# --- UDP: the sandbox DNS listener --------------------------------------------------------------

_NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH


class AmbiguousOwnerError(OSError):
    """Sockets of more than one uid share the client's UDP port: the sender is not known."""


class UdpOwnerLookup(_SockDiag):
    """The uid owning the UDP socket a datagram came from (``NETLINK_SOCK_DIAG``, a dump).

    A UDP query carries nothing but its source address and port. The client socket may be
    connected to the nameserver it *meant* to ask (glibc and Go connect theirs), which after a
    ``REDIRECT`` is an address only conntrack knows, so the exact-id lookup TCP uses cannot find
    it. Instead this asks the kernel for every UDP socket on the source port (the kernel filters
    a dump by port; ``inet_diag`` lets unprivileged processes do this) and keeps every one that
    *could* have sent the datagram: the source address proves nothing, because a socket bound
    to any local address may send from any other with ``IP_PKTINFO``. So for IPv4, every IPv4
    socket on the port and every IPv6 one that can send IPv4 (bound to ``::`` or a v4-mapped
    address, and not reported ``IPV6_V6ONLY``); for IPv6, every IPv6 socket on the port.

    One uid among them, with a socket bound to the source address or the wildcard: that is the
    sender (one bound elsewhere only is taken for a sender that closed before the lookup:
    ``None``). Several uids (another app on the port, through a
    second address or ``SO_REUSEADDR``): :class:`AmbiguousOwnerError`, never a guess; so is more
    than :data:`MAX_SOCKETS_PER_PORT` sockets on the port (one uid can pile up ``SO_REUSEPORT``
    sockets; their walk must not grow with it). A dump costs tens of µs more than a TCP lookup;
    it runs once per query, not per packet of a tunnel.

    The answer is sent to the same address and port, so it reaches a socket on that port: a
    sender gone between the query and the lookup is refused (``None``), and a port reused since
    gets an answer its new owner was entitled to anyway.
    """

    MAX_SOCKETS_PER_PORT: Final = 64

    def lookup(
        self, host: str, port: int, *, claimed: Callable[[int], bool] | None = None
    ) -> int | None:
        """The uid sending from ``host:port`` (a local address), or ``None`` when no local UDP
        socket holds that port (a remote sender, or one already gone).

        ``claimed``: the kernel itself says which app sent the datagram (the firewall marks
        each app's DNS queries); the sender is then the socket on the port of a uid for which
        ``claimed`` is true, whatever other sockets share the port, and ``None`` if there is
        none (the sender closed: nobody to answer)."""
        packed = _pack(host)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port!r}")
        ipv4 = len(packed) == 4 or packed[:12] == _V4_MAPPED_PREFIX
        source = packed[-4:] if ipv4 else packed
        found: list[tuple[int, bool]] = []
        if ipv4:
            found += self._dump(socket.AF_INET, port, source, v4_sender=True)
        found += self._dump(socket.AF_INET6, port, source, v4_sender=ipv4)
        uids = {uid for uid, _ in found}
        if claimed is not None:
            return next((uid for uid in sorted(uids) if claimed(uid)), None)
        if len(found) > self.MAX_SOCKETS_PER_PORT:
            raise AmbiguousOwnerError(
                errno.ENOTUNIQ,
                f"more than {self.MAX_SOCKETS_PER_PORT} sockets share UDP port {port}",
            )
        if len(uids) > 1:
            raise AmbiguousOwnerError(
                errno.ENOTUNIQ, f"UDP port {port} is shared by sockets of uids {sorted(uids)}"
            )
        if not any(at_source for _, at_source in found):
            # The one socket left on the port is bound elsewhere: it could have sent from here
            # only through IP_PKTINFO; far likelier, the sender (another one, on another
            # address) closed before the lookup. Not a sender we can name.
            return None
        return next(iter(uids), None)

    def _dump(
        self, family: int, port: int, source: bytes, *, v4_sender: bool
    ) -> list[tuple[int, bool]]:
        """``(uid, bound to the source address or the wildcard)`` of each socket of ``family``
        on ``port`` that could have sent the datagram (an IPv4 one: ``v4_sender``) from
        ``source`` (4 or 16 bytes); past MAX_SOCKETS_PER_PORT, one more and no further."""
        zero = b"\x00" * 16  # the kernel filters a dump by source port only
        seq, _ = self._send(
            _Query(family, zero, port, zero, 0),
            protocol=socket.IPPROTO_UDP,
            flags=_NLM_F_REQUEST | _NLM_F_DUMP,
        )
        uids: list[tuple[int, bool]] = []
        wildcard = b"\x00" * 16
        while True:
            data = self._receive()
            for mtype, body, length in _messages(data, seq):
                if mtype == _NLMSG_DONE:
                    return uids
                fields = _DIAG_MSG.unpack_from(data, body)
                sockid, uid = fields[4], fields[-2]
                if int.from_bytes(sockid[0:2], "big") != port:
                    continue
                local = bytes(sockid[4:8] if family == socket.AF_INET else sockid[4:20])
                if family == socket.AF_INET6 and v4_sender:
                    sends_v4 = local == wildcard or local[:12] == _V4_MAPPED_PREFIX
                    if not sends_v4 or _v6only(data, body + _DIAG_MSG.size, body - 16 + length):
                        continue
                    local = local[12:] if local != wildcard else local
                at_source = local == source or local == wildcard[: len(local)]
                uids.append((int(uid), at_source))
                if len(uids) > self.MAX_SOCKETS_PER_PORT:
                    self._reset()  # the rest of the dump is not wanted
                    return uids


_INET_DIAG_SKV6ONLY: Final = 11  # linux/inet_diag.h; sent for unconnected (CLOSE) sockets
_RTATTR: Final = struct.Struct("=HH")


def _v6only(data: memoryview, offset: int, end: int) -> bool:
    """Whether the attributes after an ``inet_diag_msg`` say ``IPV6_V6ONLY``. The kernel
    reports it for unconnected sockets only; a connected one counts as able to send IPv4 (more
    candidates: an ambiguity refused, never a wrong sender)."""
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return False
        if kind == _INET_DIAG_SKV6ONLY and length >= _RTATTR.size + 1:
            return bool(data[offset + _RTATTR.size])
        offset += (length + 3) & ~3
    return False


# --- choice at start-up -------------------------------------------------------------------------


def _probe(lookup: TcpOwnerLookup) -> bool:
    """Look up a loopback connection we own; True when the kernel names us."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with listener:
            try:
                listener.bind((host, 0))
                listener.listen(1)
                client = socket.create_connection(listener.getsockname()[:2], timeout=1.0)
            except OSError:
                continue
            with client:
                server, _ = listener.accept()
                with server:
                    found = lookup.lookup(server.getpeername(), server.getsockname())
                    return found == os.geteuid()
    return False


def make_tcp_owner_lookup() -> TcpOwnerLookup | ProcNetTcpLookup:
    """A :class:`TcpOwnerLookup` when a probe through sock_diag works, else the /proc fallback.

    Call it in the listener's network namespace.
    """
    try:
        lookup = TcpOwnerLookup()
    except OSError as exc:
        log.warning("sock_diag unavailable (%s); using /proc/net/tcp for socket owners", exc)
        return ProcNetTcpLookup()
    try:
        works = _probe(lookup)
    except OSError as exc:
        log.warning("sock_diag probe failed (%s); using /proc/net/tcp for socket owners", exc)
        works = False
    else:
        if not works:
            log.warning("sock_diag probe found no owner; using /proc/net/tcp for socket owners")
    if works:
        return lookup
    lookup.close()
    return ProcNetTcpLookup()
