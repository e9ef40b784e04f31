"""`asyncio`: one event loop serves every connection (uvloop when installed).

Each connection is an `asyncio.Protocol` whose `data_received` writes the chunk
straight back. When the client stops reading and the transport's write buffer
passes `max_buffer_bytes`, the protocol pauses reading that connection, so a
client can never make the server hold more than about one buffer of its bytes.

Connections are taken off the listener by the shared `Acceptor` (the same
descriptor-exhaustion and limit handling as the blocking models) and handed to
the loop with `connect_accepted_socket`. Time limits are checked by one periodic
sweep over all connections rather than a timer per connection per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from typing import Any, cast

from .. import tls
from .._accept import ACCEPT_BACKOFF_S, Acceptor, client_ip
from .._net import Listeners
from .._proxy_accept import ProxyGate
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..limits import Admission, ProgressWatch, TimeLimits
from ..loops import loop_factory
from ..outcomes import Outcome, outcome_of
from ..shutdown import Shutdown

log = logging.getLogger("echoplex.server")


class _Server:
    """What every connection's protocol shares: config, reporting, limits, open set."""

    def __init__(self, config: ServerConfig, events: ServerEvents, admission: Admission) -> None:
        self.config = config
        self.events = events
        self.admission = admission
        self.limits = TimeLimits.from_config(config)
        self.open: set[EchoProtocol] = set()
        self.changed = asyncio.Event()

    def closed(self, protocol: EchoProtocol) -> None:
        self.open.discard(protocol)
        self.admission.release(client_ip(protocol.record.peer))
        self.changed.set()


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("received", "record", "server", "transport", "watch")

    def __init__(self, server: _Server, peer: Any) -> None:
        self.server = server
        self.received = 0  # here, not on the record: one attribute less per chunk
        self.record = ConnectionRecord(peer)
        self.watch = ProgressWatch(self.record.opened_at)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        max_buffer = self.server.config.max_buffer_bytes
        self.transport.set_write_buffer_limits(high=max_buffer, low=max_buffer // 4)
        self.server.open.add(self)
        self.server.events.connection_opened(self.record)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        self.received += len(data)

    def eof_received(self) -> bool:
        # Returning False closes our side once every queued echo is written:
        # a half-closing client still gets all its bytes back.
        return False

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        record.bytes_in = self.received
        # Closed cleanly, the transport wrote out every byte it was handed first. (No
        # transport at all: the connection failed before it was made.)
        transport = getattr(self, "transport", None)
        unsent = 0 if exc is None or transport is None else transport.get_write_buffer_size()
        record.bytes_out = max(0, self.received - unsent)
        self.record.finish(*outcome_of(exc))
        self.server.closed(self)
        self.server.events.connection_closed(self.record)

    def end(self, outcome: Outcome) -> None:
        """Close for a limit or a drain: gracefully if nothing is waiting to be sent."""
        self.record.finish(outcome)
        if outcome == Outcome.IDLE_TIMEOUT:
            self.transport.close()
        else:
            self.transport.abort()


class DataLoggingEchoProtocol(EchoProtocol):
    """Also reports every chunk (`--log-data`); a separate class keeps the default path lean."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.record.bytes_in = self.received + len(data)
        self.server.events.data_received(self.record, data)
        super().data_received(data)


def serve(
    config: ServerConfig,
    events: ServerEvents,
    shutdown: Shutdown,
    *,
    listeners: Listeners | None = None,
    admission: Admission | None = None,
) -> None:
    """Serve on `listeners` (by default, those the config asks for) until stopped, counting
    connections against the limits in `admission` (by default, this process's own)."""
    factory = loop_factory(config.loop)
    context = tls.server_context(config)
    listeners = listeners or Listeners.open(config)
    admission = admission or Admission.from_config(config)
    with listeners, asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(listeners, context, config, events, shutdown, admission))


async def _serve(
    listeners: Listeners,
    tls_context: ssl.SSLContext | None,
    config: ServerConfig,
    events: ServerEvents,
    shutdown: Shutdown,
    admission: Admission,
) -> None:
    loop = asyncio.get_running_loop()
    server = _Server(config, events, admission)
    proxy = ProxyGate(config, server.admission, events)
    acceptor = Acceptor(server.admission, events, proxy.is_proxy)
    protocol_class = DataLoggingEchoProtocol if config.log_data else EchoProtocol
    stop_wakeup = asyncio.Event()
    adopting: set[asyncio.Task[None]] = set()
    handshake_timeout_s = config.tls_handshake_timeout_s if tls_context else None

    async def adopt(conn: socket.socket, peer: Any) -> None:
        protocol = protocol_class(server, peer)
        conn.setblocking(False)
        if proxy.expects_header(protocol.record) and not await proxy.read(conn, protocol.record):
            conn.close()
            protocol.connection_lost(None)
            return
        try:
            await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=tls_context, ssl_handshake_timeout=handshake_timeout_s
            )
        except (OSError, ssl.SSLError) as exc:
            # Gone before the loop took it, or (TLS) a handshake that failed or timed out:
            # dropped, but not a server error.
            if tls_context is not None:
                timed_out = isinstance(exc, ConnectionAbortedError | TimeoutError)
                protocol.record.finish(
                    Outcome.TLS_HANDSHAKE_TIMEOUT if timed_out else Outcome.TLS_HANDSHAKE_FAILED
                )
            conn.close()
            protocol.connection_lost(None if tls_context else exc)

    def on_acceptable(listener: socket.socket) -> None:
        admitted, back_off = acceptor.accept_ready(listener)
        for conn, peer in admitted:
            task = loop.create_task(adopt(conn, peer))
            adopting.add(task)
            task.add_done_callback(adopting.discard)
        if back_off:  # out of descriptors: pause accepting instead of spinning
            loop.remove_reader(listener.fileno())
            loop.call_later(ACCEPT_BACKOFF_S, watch, listener)

    def watch(listener: socket.socket) -> None:
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), on_acceptable, listener)

    def on_stop_requested() -> None:
        shutdown.clear_wakeup()
        stop_wakeup.set()

    # Stop signals reach us through this wakeup too (`shutdown.stop_on_signals`).
    loop.add_reader(shutdown.fileno(), on_stop_requested)
    interval_s = server.limits.sweep_interval_s()
    sweeper = loop.create_task(_sweep_limits(server, interval_s)) if interval_s else None
    try:
        for listener in listeners:
            watch(listener)
        events.listening(listeners.addresses)
        while not shutdown.requested:
            await stop_wakeup.wait()
            stop_wakeup.clear()
        for listener in listeners:
            loop.remove_reader(listener.fileno())
        listeners.close()  # stop listening: new connects are refused
        events.stopping()
        if adopting:
            await asyncio.wait(adopting)
        await _drain(server, stop_wakeup, config, shutdown)
    finally:
        if sweeper is not None:
            sweeper.cancel()
        acceptor.close()
        for listener in listeners:
            if listener.fileno() != -1:
                loop.remove_reader(listener.fileno())
        loop.remove_reader(shutdown.fileno())


async def _sweep_limits(server: _Server, interval_s: float) -> None:
    """End connections whose idle, send or lifetime limit has run out."""
    limits = server.limits
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        for protocol in list(server.open):
            pending = protocol.transport.get_write_buffer_size()
            outcome = protocol.watch.check(limits, protocol.received, pending, now)
            if outcome is not None:
                protocol.end(outcome)


async def _drain(
    server: _Server, stop_wakeup: asyncio.Event, config: ServerConfig, shutdown: Shutdown
) -> None:
    """Wait for open connections to end until the deadline, then abort the rest."""

    async def next_change(timeout_s: float) -> None:
        # Whichever comes first: a connection ends, or a second stop request.
        server.changed.clear()
        waiters = [
            asyncio.ensure_future(server.changed.wait()),
            asyncio.ensure_future(stop_wakeup.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        stop_wakeup.clear()

    while server.open:
        left_s = shutdown.drain_deadline(config.drain_timeout_s) - time.monotonic()
        if left_s <= 0:
            break
        await next_change(left_s)
    for protocol in list(server.open):
        protocol.end(Outcome.DRAINED)
    # connection_lost runs on a later loop iteration; let the aborted ones report.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while server.open:
                server.changed.clear()
                await server.changed.wait()
