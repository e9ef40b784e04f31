"""Taking the PROXY protocol header off a new connection, for the blocking and the
event-loop models alike, before anything else (TLS included) reads from it.

The header is looked at with MSG_PEEK and only its own bytes are taken, so not a
byte of what follows is taken out of the stream: the echo, or the TLS handshake
that HAProxy may start right after the header, finds the stream untouched. Only
trusted proxies get here, and only until the header deadline (kept by the lifecycle).
"""

from __future__ import annotations

import asyncio
import socket

from ._accept import client_ip
from ._net import plain_peer
from .events import ConnectionRecord, ServerEvents
from .limits import Admission
from .outcomes import Outcome
from .proxy_protocol import (
    MAX_HEADER_BYTES,
    Network,
    ProxyHeaderReader,
    ProxyProtocolError,
    ProxyResult,
    is_trusted,
)


def take_header(conn: socket.socket, reader: ProxyHeaderReader) -> ProxyResult | None:
    """Move what has arrived of the header from `conn` into `reader`, never a byte past
    it: the result once the header is complete, else None (call again when more has
    arrived). Raises ProxyProtocolError for a bad or truncated header; the socket's own
    errors (BlockingIOError, TimeoutError) propagate."""
    peeked = conn.recv(MAX_HEADER_BYTES, socket.MSG_PEEK)
    if not peeked:
        reader.feed_eof()  # closed before a complete header: raises
    result = reader.feed(peeked)
    # Incomplete, the header runs past every byte peeked, so all of them are taken;
    # complete, it ends where the remainder (the stream's first bytes) begins.
    conn.recv(len(peeked) - (len(result.remainder) if result is not None else 0))
    return result


def read_header_blocking(conn: socket.socket) -> ProxyResult:
    """Read the header off a blocking socket; ProxyProtocolError if it is not a valid
    header. No deadline here: the lifecycle's sweep cuts the socket off at the header
    deadline (`echoplex.deadlines`), and the read then finds the stream ended."""
    reader = ProxyHeaderReader()
    while (result := take_header(conn, reader)) is None:
        pass
    return result


async def read_header(conn: socket.socket) -> ProxyResult:
    """The same, on a non-blocking socket, without blocking the event loop (the sweep
    cancels it at the header deadline)."""
    loop = asyncio.get_running_loop()
    reader = ProxyHeaderReader()
    while True:
        try:
            result = take_header(conn, reader)
        except BlockingIOError:
            await readable(loop, conn)
            continue
        if result is not None:
            return result


async def readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


class ProxyGate:
    """Which connections must start with a PROXY header, and what the header changes."""

    def __init__(
        self,
        networks: list[Network],
        admission: Admission,
        events: ServerEvents,
    ) -> None:
        self.networks = networks
        self.admission = admission
        self.events = events

    def is_proxy(self, ip: str) -> bool:
        return bool(self.networks) and is_trusted(ip, self.networks)

    def expects_header(self, record: ConnectionRecord) -> bool:
        return self.is_proxy(client_ip(record.peer))

    def read_blocking(self, conn: socket.socket, record: ConnectionRecord) -> bool:
        """Take the header off `conn`; False (with `record.outcome` saying why) to drop it."""
        try:
            result = read_header_blocking(conn)
        except (ProxyProtocolError, OSError) as exc:
            record.finish(*_failure(exc))
            return False
        return self._apply(record, result)

    async def read(self, conn: socket.socket, record: ConnectionRecord) -> bool:
        try:
            result = await read_header(conn)
        except (ProxyProtocolError, OSError) as exc:
            record.finish(*_failure(exc))
            return False
        return self._apply(record, result)

    def read_ready(
        self, conn: socket.socket, record: ConnectionRecord, reader: ProxyHeaderReader
    ) -> bool | None:
        """Take what has arrived of the header off a non-blocking `conn`: None while it
        is incomplete, else as `read_blocking`. BlockingIOError propagates (nothing
        arrived); the caller keeps the header deadline."""
        try:
            result = take_header(conn, reader)
        except BlockingIOError:
            raise
        except (ProxyProtocolError, OSError) as exc:
            record.finish(*_failure(exc))
            return False
        return None if result is None else self._apply(record, result)

    def _apply(self, record: ConnectionRecord, result: ProxyResult) -> bool:
        client = plain_peer(result.client_address(record.peer))
        reason = self.admission.transfer(client_ip(record.peer), client_ip(client))
        if reason is not None:
            self.events.connection_rejected(client, reason)
            record.finish(Outcome.REJECTED, reason)
            return False
        if result.source is not None:  # a LOCAL header (a health check) names nobody
            record.via, record.peer = record.peer, client
        return True


def _failure(exc: BaseException) -> tuple[Outcome, str | None]:
    # A header deadline has been recorded before the cut-off that ended the read.
    if isinstance(exc, ProxyProtocolError):
        return Outcome.PROXY_ERROR, str(exc.reason)
    return Outcome.RESET, None
