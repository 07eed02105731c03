"""sd_notify: the datagram on the wire, addresses, the environment, and never raising."""

from __future__ import annotations

import logging
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress.sdnotify import ENVIRONMENT_VARIABLE, Notifier


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket at a short path (a Unix socket path must fit in 108 bytes)."""
    with (
        tempfile.TemporaryDirectory(prefix="egress-sdn-", dir="/tmp") as name,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(name) / "notify")
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


@pytest.fixture
def make() -> Iterator[type[Notifier]]:
    """``Notifier``, with every one it made closed after the test (no socket left open)."""
    made: list[Notifier] = []

    class Closing(Notifier):
        def __init__(self, address: str | None) -> None:
            super().__init__(address)
            made.append(self)

    yield Closing
    for notifier in made:
        notifier.close()


def fields(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def test_messages_are_newline_separated_assignments(
    make: type[Notifier], listener: tuple[str, socket.socket]
) -> None:
    path, sock = listener
    notifier = make(path)
    assert notifier.ready("serving socks5=127.0.0.1:1080")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving socks5=127.0.0.1:1080"
    assert notifier.stopping("draining 3 connections")
    assert fields(sock) == {"STOPPING": "1", "STATUS": "draining 3 connections"}
    notifier.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(
    make: type[Notifier],
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert make(path).reloading("reloading the config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = fields(sock)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_status_is_one_bounded_line(
    make: type[Notifier], listener: tuple[str, socket.socket]
) -> None:
    """A newline would end STATUS= and start a bogus assignment (e.g. a forged READY=1)."""
    path, sock = listener
    make(path).status("bad config:\nREADY=1\n" + "x" * 500)
    message = sock.recv(4096).decode()
    assert "\n" not in message
    assert message.startswith("STATUS=bad config: READY=1 x")
    assert len(message) <= len("STATUS=") + 200


def test_an_abstract_name_is_spelled_with_an_at_sign(make: type[Notifier]) -> None:
    name = f"egress-sdnotify-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert make("@" + name).ready("up")
        assert fields(sock)["READY"] == "1"


def test_no_socket_means_nothing_is_sent(make: type[Notifier]) -> None:
    notifier = make.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready("up")


def test_the_address_is_taken_out_of_the_environment(
    make: type[Notifier],
    listener: tuple[str, socket.socket],
) -> None:
    """Children (the controller's iptables-restore) must not speak for the service."""
    path, _ = listener
    environ = {ENVIRONMENT_VARIABLE: path, "PATH": "/usr/bin"}
    notifier = make.from_environment(environ)
    assert environ == {"PATH": "/usr/bin"}
    assert notifier.ready("up")
    kept = {ENVIRONMENT_VARIABLE: path}
    assert make.from_environment(kept, unset=False).enabled
    assert kept == {ENVIRONMENT_VARIABLE: path}


def test_a_failed_notification_never_raises_and_is_logged_once(
    make: type[Notifier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = make("/nonexistent/egress/notify")
    with caplog.at_level(logging.WARNING, logger="egress.sdnotify"):
        for _ in range(3):
            assert not notifier.ready("up")
        assert not notifier.stopping("down")
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert "cannot notify" in record.getMessage()
    assert record.notify_socket == "/nonexistent/egress/notify"  # type: ignore[attr-defined]


def test_a_socket_that_comes_back_is_used_again(make: type[Notifier]) -> None:
    """Each notification is tried: one lost while the manager was away does not silence the
    next (STOPPING=1 after a failed READY=1 still arrives)."""
    with tempfile.TemporaryDirectory(prefix="egress-sdn-", dir="/tmp") as name:
        path = str(Path(name) / "notify")
        notifier = make(path)
        assert not notifier.ready("up")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            assert notifier.stopping("down")
            assert fields(sock)["STOPPING"] == "1"


@pytest.mark.parametrize("address", ["relative/path", "vsock:2:1234", "@"])
def test_an_address_it_cannot_use_is_logged_not_raised(
    make: type[Notifier], address: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="egress.sdnotify"):
        notifier = make(address)
        assert not notifier.ready("up")
    assert [r.getMessage() for r in caplog.records] == [
        "cannot notify the service manager; readiness, reload and stop are not reported"
    ]
