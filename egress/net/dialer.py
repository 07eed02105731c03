"""Connect to the addresses the policy checked, in order, and nothing else.

The dialer is handed IP addresses only and passes ``AI_NUMERICHOST`` so no name lookup can
happen on this path: what was checked is what gets dialled.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from egress.net.relay import UpstreamSide
from egress.outcomes import Outcome

# A name may resolve to many addresses; the whole connect phase has one deadline, shared by at
# most three attempts (the usual A+AAAA pair and one spare).
MAX_ATTEMPTS = 3

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN, errno.EHOSTDOWN}
)


@dataclass(frozen=True, slots=True)
class DialError(Exception):
    """Every attempt failed; ``outcome`` is the last attempt's failure."""

    outcome: Outcome
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True, slots=True)
class Dialled:
    upstream: UpstreamSide
    address: IPv4Address | IPv6Address
    port: int


def classify_connect_error(exc: BaseException) -> Outcome:
    if isinstance(exc, TimeoutError):
        return Outcome.CONNECT_TIMEOUT
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.CONNECT_REFUSED
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return Outcome.UNREACHABLE
    return Outcome.UPSTREAM_ERROR


async def dial(
    addresses: Sequence[IPv4Address | IPv6Address], port: int, *, deadline: float
) -> Dialled:
    """Open a TCP connection to the first address that accepts, all by ``deadline`` (loop time).

    Each attempt gets an equal share of the time left, so a first address that never answers
    still leaves time for the next one, and the client never waits past the deadline.
    """
    loop = asyncio.get_running_loop()
    last: DialError | None = None
    candidates = addresses[:MAX_ATTEMPTS]
    for index, address in enumerate(candidates):
        left = deadline - loop.time()
        if left <= 0:
            last = DialError(Outcome.CONNECT_TIMEOUT, f"{hostport(address, port)}: timed out")
            break
        upstream = UpstreamSide()
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        try:
            async with asyncio.timeout(left / (len(candidates) - index)):
                await loop.create_connection(
                    lambda upstream=upstream: upstream,  # type: ignore[misc]
                    host=str(address),
                    port=port,
                    family=family,
                    flags=socket.AI_NUMERICHOST,
                )
        except (OSError, TimeoutError) as exc:
            outcome = classify_connect_error(exc)
            text = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            last = DialError(outcome, f"{hostport(address, port)}: {text}")
            continue
        return Dialled(upstream, address, port)
    if last is None:
        raise DialError(Outcome.UPSTREAM_ERROR, "no address to dial")
    raise last


def hostport(address: IPv4Address | IPv6Address, port: int) -> str:
    """``"192.0.2.1:443"`` or ``"[2001:db8::1]:443"``."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
