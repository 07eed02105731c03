"""A small real SMTP server on loopback, for tests of mail clients (``smtplib``).

Enough of RFC 5321 for a client to deliver a message: the greeting, EHLO/HELO, MAIL, RCPT,
DATA (dot-unstuffed), RSET, NOOP and QUIT; anything else gets 502. Every accepted message is
kept in ``messages``. Lines and messages are bounded, like any server facing a client.

    async with SmtpServer() as smtp:
        ...  # smtplib.SMTP("127.0.0.1", smtp.port).sendmail(...)
        assert smtp.messages[0].recipients == ["ops@example.test"]
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

__all__ = ["Message", "SmtpServer"]

MAX_LINE = 1000  # RFC 5321 4.5.3.1.6: a text line, CRLF included
MAX_MESSAGE = 1 << 20


@dataclass
class Message:
    helo: str
    sender: str
    recipients: list[str]
    data: bytes  # the message as sent, dot-unstuffed, lines ending in CRLF


@dataclass
class _Session:
    helo: str = ""
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)


def _path(argument: str, keyword: str) -> str | None:
    """The address in ``FROM:<a@b>`` / ``TO:<a@b>`` (parameters after it are ignored)."""
    head, sep, rest = argument.partition(":")
    if not sep or head.strip().upper() != keyword:
        return None
    rest = rest.strip()
    if not rest.startswith("<") or ">" not in rest:
        return None
    return rest[1 : rest.index(">")]


class SmtpServer:
    """An SMTP server on a free port of ``host``; a context manager on the running loop."""

    def __init__(self, host: str = "127.0.0.1", *, name: str = "mail.test") -> None:
        self.host = host
        self.name = name
        self.port = 0
        self.messages: list[Message] = []
        self.sessions = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SmtpServer:
        self._server = await asyncio.start_server(self._handle, self.host, 0, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            async with asyncio.timeout(30):
                await self._converse(reader, writer)
        except (ConnectionError, OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pass  # a client that goes away or misbehaves just loses its session
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(text: str) -> None:
            writer.write(text.encode("ascii") + b"\r\n")
            await writer.drain()

        session = _Session()
        await reply(f"220 {self.name} ESMTP egress-test")
        while line := await reader.readuntil(b"\n"):
            verb, _, argument = line.decode("ascii", "replace").rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                session = _Session(helo=argument.strip())
                await reply(f"250-{self.name}\r\n250-8BITMIME\r\n250 SIZE {MAX_MESSAGE}")
            elif verb == "HELO":
                session = _Session(helo=argument.strip())
                await reply(f"250 {self.name}")
            elif verb == "MAIL":
                sender = _path(argument, "FROM")
                if sender is None:
                    await reply("501 syntax: MAIL FROM:<address>")
                    continue
                session.sender, session.recipients = sender, []
                await reply("250 OK")
            elif verb == "RCPT":
                recipient = _path(argument, "TO")
                if session.sender is None:
                    await reply("503 MAIL first")
                elif recipient is None:
                    await reply("501 syntax: RCPT TO:<address>")
                else:
                    session.recipients.append(recipient)
                    await reply("250 OK")
            elif verb == "DATA":
                if session.sender is None or not session.recipients:
                    await reply("503 MAIL and RCPT first")
                    continue
                await reply("354 end data with <CR><LF>.<CR><LF>")
                data = await self._read_data(reader)
                self.messages.append(
                    Message(session.helo, session.sender, session.recipients, data)
                )
                session.sender, session.recipients = None, []
                await reply(f"250 OK queued as {len(self.messages)}")
            elif verb == "RSET":
                session.sender, session.recipients = None, []
                await reply("250 OK")
            elif verb == "NOOP":
                await reply("250 OK")
            elif verb == "QUIT":
                await reply(f"221 {self.name} closing")
                return
            else:
                await reply("502 command not implemented")

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\n")
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 4.5.2: transparency
            size += len(line)
            if size > MAX_MESSAGE:
                raise ValueError("message too large")
            lines.append(line)
