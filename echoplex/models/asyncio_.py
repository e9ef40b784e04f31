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

from .._accept import ACCEPT_BACKOFF_S
from .._net import Listeners
from ..events import ServerEvents
from ..lifecycle import Connections, Step
from ..limits import Admission, ProgressWatch
from ..outcomes import Outcome, handshake_outcome, outcome_of
from ..plan import ServerPlan
from ..shutdown import Shutdown

log = logging.getLogger("echoplex.server")


RUNS_EVENT_LOOP = True


class _Server:
    """What every connection's protocol shares: reporting, limits, the open connections."""

    def __init__(self, plan: ServerPlan, events: ServerEvents, admission: Admission) -> None:
        self.plan = plan
        self.events = events
        self.limits = plan.limits
        self.connections: Connections[EchoProtocol] = Connections(
            plan, events, EchoProtocol.cut_off, admission
        )
        self.changed = asyncio.Event()
        self.connections.on_change = self.changed.set


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("adopting", "received", "record", "server", "transport", "watch")

    def __init__(self, server: _Server, peer: Any) -> None:
        self.server = server
        self.received = 0  # here, not on the record: one attribute less per chunk
        self.transport: asyncio.Transport | None = None
        self.adopting: asyncio.Task[None] | None = None  # while in its PROXY or TLS step
        self.record = server.connections.admitted(peer, self)
        self.watch = ProgressWatch(self.record.opened_at)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        max_buffer = self.server.plan.config.max_buffer_bytes
        self.transport.set_write_buffer_limits(high=max_buffer, low=max_buffer // 4)
        self.server.connections.opened(self.record)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]
        self.received += len(data)

    def eof_received(self) -> bool:
        # Returning False closes our side once every queued echo is written:
        # a half-closing client still gets all its bytes back.
        return False

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        record.bytes_in = self.received
        # Closed cleanly, the transport wrote out every byte it was handed first. (No
        # transport at all: the connection ended before it was made.)
        transport = self.transport
        unsent = 0 if exc is None or transport is None else transport.get_write_buffer_size()
        record.bytes_out = max(0, self.received - unsent)
        record.finish(*outcome_of(exc))
        self.server.connections.closed(record, lambda: None)  # the transport has closed it

    def cut_off(self) -> None:
        """End it for a limit or a drain: gracefully if nothing is waiting to be sent.
        Not made yet, it is in its PROXY or TLS step: that step is cancelled."""
        if self.transport is None:
            if self.adopting is not None:
                self.adopting.cancel()
            return
        if self.record.outcome == Outcome.IDLE_TIMEOUT:
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


def serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    serve_on(plan.listeners, plan, events, shutdown, plan.admission)


def serve_on(
    listeners: Listeners,
    plan: ServerPlan,
    events: ServerEvents,
    shutdown: Shutdown,
    admission: Admission,
) -> None:
    """Serve on `listeners` until stopped, counting connections in `admission` (this
    process's own, or a `workers` server's shared table)."""
    assert plan.loop is not None, "the plan resolves a loop for this model"
    with listeners, asyncio.Runner(loop_factory=plan.loop) as runner:
        runner.run(_serve(listeners, plan, events, shutdown, admission))


async def _serve(
    listeners: Listeners,
    plan: ServerPlan,
    events: ServerEvents,
    shutdown: Shutdown,
    admission: Admission,
) -> None:
    loop = asyncio.get_running_loop()
    server = _Server(plan, events, admission)
    connections = server.connections
    acceptor = connections.acceptor()
    protocol_class = DataLoggingEchoProtocol if plan.config.log_data else EchoProtocol
    stop_wakeup = asyncio.Event()
    adopting: set[asyncio.Task[None]] = set()

    async def adopt(conn: socket.socket, peer: Any) -> None:
        protocol = protocol_class(server, peer)
        protocol.adopting = asyncio.current_task()
        record = protocol.record
        conn.setblocking(False)
        context = None
        try:
            for step in connections.steps(record):
                if step is Step.PROXY_HEADER:
                    await connections.proxy.read(conn, record)
                elif step is Step.TLS_HANDSHAKE:
                    context = plan.tls  # the loop does the handshake as it takes the socket
                else:
                    await _connect(loop, protocol, conn, context, plan.tls_handshake_s)
        except asyncio.CancelledError:
            pass  # cut off in its PROXY or TLS step (the drain): the record says so
        finally:
            protocol.adopting = None
        if record.outcome is not None and protocol.transport is None:
            conn.close()
            protocol.connection_lost(None)

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
        # Connections still in their PROXY or TLS step drain like the others: the
        # drain's end cancels their step (`EchoProtocol.cut_off`).
        await _drain(server, stop_wakeup, plan.drain_timeout_s, shutdown)
    finally:
        if sweeper is not None:
            sweeper.cancel()
        acceptor.close()
        for listener in listeners:
            if listener.fileno() != -1:
                loop.remove_reader(listener.fileno())
        loop.remove_reader(shutdown.fileno())


async def _connect(
    loop: asyncio.AbstractEventLoop,
    protocol: EchoProtocol,
    conn: socket.socket,
    context: ssl.SSLContext | None,
    handshake_timeout_s: float | None,
) -> None:
    """Hand the socket to the loop (through a TLS handshake with `context`); the record
    says why if that failed."""
    try:
        await loop.connect_accepted_socket(
            lambda: protocol,
            conn,
            ssl=context,
            ssl_handshake_timeout=handshake_timeout_s,
        )
    except (OSError, ssl.SSLError) as exc:
        # Gone before the loop took it, or a handshake that failed or timed out (the
        # loop aborts a handshake past its timeout: ConnectionAbortedError).
        if context is None:
            protocol.record.finish(*outcome_of(exc))
        elif isinstance(exc, ConnectionAbortedError):
            protocol.record.finish(Outcome.TLS_HANDSHAKE_TIMEOUT)
        else:
            protocol.record.finish(*handshake_outcome(exc))


async def _sweep_limits(server: _Server, interval_s: float) -> None:
    """End connections whose idle, send or lifetime limit has run out."""
    limits = server.limits
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        for protocol in server.connections.handles():
            if protocol.transport is None:
                continue  # not made yet: its PROXY or TLS step has a deadline of its own
            pending = protocol.transport.get_write_buffer_size()
            outcome = protocol.watch.check(limits, protocol.received, pending, now)
            if outcome is not None:
                server.connections.cut_off(protocol.record, outcome)


async def _drain(
    server: _Server, stop_wakeup: asyncio.Event, drain_timeout_s: float, shutdown: Shutdown
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

    connections = server.connections
    while connections.count:
        left_s = shutdown.drain_deadline(drain_timeout_s) - time.monotonic()
        if left_s <= 0:
            break
        await next_change(left_s)
    connections.cut_off_all(Outcome.DRAINED)
    # connection_lost runs on a later loop iteration; let the aborted ones report.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while connections.count:
                server.changed.clear()
                await server.changed.wait()
