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
import collections
import contextlib
import logging
import socket
import ssl
from typing import Any, ClassVar, cast

from .._accept import ACCEPT_BACKOFF_S
from .._net import Listeners
from .._proxy_accept import readable
from ..conditions import Close, Reset, Send
from ..events import ConnectionRecord, ServerEvents
from ..lifecycle import Connections, OnPurpose, Step
from ..limits import Admission
from ..outcomes import Outcome, handshake_outcome, not_a_client_hello, outcome_of
from ..plan import ServerPlan
from ..shutdown import Shutdown
from ._blocking import arrange_reset, do_work

log = logging.getLogger("echoplex.server")


RUNS_EVENT_LOOP = True

# The loop's own handshake timer, kept out of the way: the lifecycle's sweep owns the
# handshake deadline and cancels the step when it passes.
_LOOP_HANDSHAKE_BACKSTOP_S = 24 * 3600.0


def _progress(protocol: EchoProtocol, _record: ConnectionRecord) -> tuple[int, int]:
    """What the idle and send limits read: bytes received, and echo the transport holds."""
    transport = protocol.transport
    return protocol.received, 0 if transport is None else transport.get_write_buffer_size()


class _Server:
    """What every connection's protocol shares: the plan, reporting, the open connections,
    and one wakeup for the stop sequence (a connection closed, a stop request)."""

    def __init__(self, plan: ServerPlan, events: ServerEvents, admission: Admission) -> None:
        self.plan = plan
        self.events = events
        self.connections: Connections[EchoProtocol] = Connections(
            plan, events, EchoProtocol.cut_off, admission, _progress, wake=EchoProtocol.on_time
        )
        self.live = plan.conditions  # what new chunks are checked against (`version`)
        self.changed = asyncio.Event()
        # The connections in their PROXY, TLS or connect step, with the task taking them
        # through it: here, not on each protocol, which then needs one slot less.
        self.adopting: dict[EchoProtocol, asyncio.Task[None]] = {}
        # Each server's own protocol class carries it (`protocol_class`): one slot less.
        base = DataLoggingEchoProtocol if plan.config.log_data else EchoProtocol
        self.protocol_class = type(base.__name__, (base,), {"__slots__": (), "server": self})

    async def changes(self, timeout_s: float | None) -> None:
        """Wait for the next change, at most `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()
        self.changed.clear()


class EchoProtocol(asyncio.Protocol):
    # Every slot is 8 bytes of each idle connection: what can live elsewhere does.
    __slots__ = ("purpose", "received", "record", "transport")

    server: ClassVar[_Server]
    """Set on each server's own subclass (`_Server.protocol_class`)."""

    def __init__(self, peer: Any) -> None:
        self.received = 0  # here, not on the record: one attribute less per chunk
        self.transport: asyncio.Transport | None = None
        self.purpose: _OnPurpose | None = None  # conditions or work, once made
        self.record = self.server.connections.admitted(peer, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        max_buffer = self.server.plan.config.max_buffer_bytes
        self.transport.set_write_buffer_limits(high=max_buffer, low=max_buffer // 4)
        try:
            tls = self.transport.get_extra_info("ssl_object")
            on_purpose = self.server.connections.opened(self.record, tls)
            if on_purpose is not None:
                self.purpose = _OnPurpose(self, self.transport, on_purpose)
                self.purpose.act()  # a limit of 0 bytes acts at once
        except Exception:
            self.server.connections.failed(self.record)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.purpose is not None:
            self.purpose.received(data)
            return
        if self.server.live.version != self.record.conditions_version:
            self._renew(data)  # the control API changed the conditions
            return
        self.transport.write(data)  # type: ignore[union-attr]
        self.received += len(data)

    def _renew(self, data: bytes) -> None:
        on_purpose = self.server.connections.renewed(self.record)
        if on_purpose is None:
            self.transport.write(data)  # type: ignore[union-attr]
            self.received += len(data)
            return
        self.purpose = _OnPurpose(self, self.transport, on_purpose)  # type: ignore[arg-type]
        self.purpose.received(data)

    def eof_received(self) -> bool:
        if self.purpose is not None:
            return self.purpose.eof()
        # Returning False closes our side once every queued echo is written:
        # a half-closing client still gets all its bytes back.
        return False

    def pause_writing(self) -> None:
        if self.purpose is not None:
            self.purpose.write_paused = True
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.purpose is not None:
            self.purpose.write_paused = False
            self.purpose.act()
            return
        self.transport.resume_reading()  # type: ignore[union-attr]

    def on_time(self) -> None:
        """The time its conditions asked for has come (the timekeeper's wake)."""
        if self.purpose is not None:
            self.purpose.act()

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        record.bytes_in = self.received
        # Closed cleanly, the transport wrote out every byte it was handed first. (No
        # transport at all: the connection ended before it was made.)
        transport = self.transport
        unsent = 0 if exc is None or transport is None else transport.get_write_buffer_size()
        handed = self.received if self.purpose is None else self.purpose.sent
        record.bytes_out = max(0, handed - unsent)
        connections = self.server.connections
        if exc is not None and not isinstance(exc, OSError):
            # Raised by a callback of ours (the loop has logged it): a handler bug.
            record.finish(Outcome.ERROR, "handler")
        record.finish(*outcome_of(exc))
        connections.closed(record, lambda: None)  # the transport has closed it

    def cut_off(self) -> None:
        """End it for a deadline or a drain: gracefully if nothing is waiting to be sent.
        Not made yet, it is in its PROXY or TLS step: that step is cancelled."""
        if self.transport is None:
            adopting = self.server.adopting.get(self)
            if adopting is not None:
                adopting.cancel()
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()


class _OnPurpose:
    """A connection's conditions and work on the event loop. Its conditions say what to
    write when, when to read (reading is paused otherwise), and when to close or reset;
    the lifecycle's timekeeper wakes it (`EchoProtocol.on_time`) at the times they ask
    for, so nothing here blocks the loop but `cpu` work, which is meant to. `io` work
    waits on a timer, one chunk at a time: the connection's next chunk waits behind it,
    the other connections do not."""

    __slots__ = (
        "conditions",
        "discard_until",
        "protocol",
        "reading",
        "sent",
        "transport",
        "waiting",
        "work",
        "working",
        "write_paused",
    )

    def __init__(
        self, protocol: EchoProtocol, transport: asyncio.Transport, on_purpose: OnPurpose
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.conditions, self.work = on_purpose
        self.sent = protocol.received  # bytes of echo handed to the transport (before: all)
        self.reading = True
        self.write_paused = False
        self.waiting: collections.deque[bytes] = collections.deque()  # for their work
        self.working = False
        self.discard_until: float | None = None

    @property
    def _connections(self) -> Connections[EchoProtocol]:
        return self.protocol.server.connections

    def received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.received += len(data)
        if self.discard_until is not None:
            return  # closed on purpose: what follows is dropped
        if protocol.server.live.version != protocol.record.conditions_version:
            # The control API changed them: the new ones take what the old ones held.
            if self.conditions is not None:
                data = self.conditions.handover() + data
            self.conditions, self.work = self._connections.renewed(protocol.record) or (None, None)
        if self.work is None and not self.working:
            self._take(data)
            return
        self.waiting.append(data)  # behind the chunk being worked on, if any
        if not self.working:
            self._work_next()
        self.act()

    def _work_next(self) -> None:
        """Work on the waiting chunks in order: `cpu` at once (holding the loop, as such
        work does), `io` on a timer, one chunk at a time; with no work (a change took it
        away), straight on."""
        while self.waiting:
            work = self.work
            if work is not None and work.kind == "io":
                self.working = True
                asyncio.get_running_loop().call_later(work.seconds, self._worked)
                return
            if work is not None:
                do_work(work)
            self._take(self.waiting.popleft())
        self.working = False

    def _worked(self) -> None:
        if self.transport.is_closing():
            return
        self._take(self.waiting.popleft())
        self._work_next()

    def _take(self, chunk: bytes) -> None:
        if self.conditions is None:
            self._write(chunk)
        else:
            self.conditions.received(chunk, self._connections.clock())
        self.act()

    def eof(self) -> bool:
        if self.discard_until is not None:
            self.transport.close()
            return True
        if self.conditions is None and not self.waiting:
            return False  # as the plain echo: close once every echo is written
        if self.conditions is not None:
            self.conditions.eof(self._connections.clock())
        self.act()
        return True  # kept open: the conditions say when to close (TLS closes anyway)

    def act(self) -> None:
        """Do what is due now, then read or not, and ask to be woken for what is next."""
        conditions, transport = self.conditions, self.transport
        if transport.is_closing():
            return
        record = self.protocol.record
        clock = self._connections.clock
        if self.discard_until is not None:
            if clock() >= self.discard_until:
                transport.close()
            return
        if conditions is not None and not self.write_paused:
            for action in conditions.due(clock()):
                if isinstance(action, Send):
                    self._write(action.data)
                elif isinstance(action, Close):
                    self._close_after(action.discard_until)
                    return
                elif isinstance(action, Reset):
                    record.finish(Outcome.RESET_AFTER)
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        arrange_reset(sock)
                    transport.abort()
                    return
                else:
                    transport.close()
                    return
        self._read_if(conditions is None or conditions.may_read(clock()))
        next_at = None if conditions is None else conditions.next_at()
        if next_at is not None:
            self._connections.wake_at(record, next_at)

    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        self.sent += len(data)

    def _read_if(self, may_read: bool) -> None:
        held = sum(map(len, self.waiting))
        reading = may_read and not self.write_paused
        reading = reading and held < self.protocol.server.plan.config.max_buffer_bytes
        if reading != self.reading:
            self.reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _close_after(self, discard_until: float) -> None:
        """A FIN after exactly what was written, then read and drop until the client's
        EOF or `discard_until` (TLS cannot half-close: it closes, with close_notify)."""
        self.protocol.record.finish(Outcome.CLOSE_AFTER)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.discard_until = discard_until
        self._read_if(True)
        self._connections.wake_at(self.protocol.record, discard_until)


class DataLoggingEchoProtocol(EchoProtocol):
    """Also reports every chunk (`--log-data`); a separate class keeps the default path lean."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.record.bytes_in = self.received + len(data)
        try:
            self.server.events.data_received(self.record, data)
        except Exception:
            self.server.connections.failed(self.record)
            self.transport.abort()  # type: ignore[union-attr]
            return
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
    await _Serving(listeners, _Server(plan, events, admission), shutdown).run()


class _Serving:
    """One server run on this loop: accept, adopt each connection, keep the time, stop."""

    def __init__(self, listeners: Listeners, server: _Server, shutdown: Shutdown) -> None:
        self.loop = asyncio.get_running_loop()
        self.listeners = listeners
        self.server = server
        self.connections = server.connections
        self.shutdown = shutdown
        self.acceptor = self.connections.acceptor()
        self.adopting: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop, shutdown, server = self.loop, self.shutdown, self.server
        # Stop signals reach us through this wakeup too (`shutdown.stop_on_signals`).
        loop.add_reader(shutdown.fileno(), self._on_wakeup)
        timekeeper = loop.create_task(self._keep_time())
        try:
            for listener in self.listeners:
                self._watch(listener)
            server.events.listening(self.listeners.addresses)
            while not shutdown.requested:
                await server.changes(None)
            self.connections.on_change = server.changed.set  # from now on, closes wake us
            # Connections still in their PROXY or TLS step drain like the others: the
            # drain's end cancels their step (`EchoProtocol.cut_off`).
            for wait_s in self.connections.stopping(shutdown, self._stop_listening):
                await server.changes(wait_s)
        finally:
            timekeeper.cancel()
            self.acceptor.close()
            self._stop_listening()
            loop.remove_reader(shutdown.fileno())

    def _on_wakeup(self) -> None:
        self.shutdown.clear_wakeup()
        self.server.changed.set()

    async def _keep_time(self) -> None:
        """Sweep the connections' deadlines and wake them at the times the lifecycle
        asks for (or sooner, when it reschedules)."""
        rescheduled = asyncio.Event()
        self.connections.on_reschedule = rescheduled.set
        while True:
            rescheduled.clear()  # before the sweep: a wake asked during it is seen
            wait_s = self.connections.sweep()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await rescheduled.wait()

    def _stop_listening(self) -> None:
        for listener in self.listeners:
            if listener.fileno() != -1:
                self.loop.remove_reader(listener.fileno())
        self.listeners.close()  # new connects are refused

    def _watch(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._on_acceptable, listener)

    def _on_acceptable(self, listener: socket.socket) -> None:
        admitted, back_off = self.acceptor.accept_ready(listener)
        for conn, peer in admitted:
            task = self.loop.create_task(self._adopt(conn, peer))
            self.adopting.add(task)
            task.add_done_callback(self.adopting.discard)
        if back_off:  # out of descriptors: pause accepting instead of spinning
            self.loop.remove_reader(listener.fileno())
            self.loop.call_later(ACCEPT_BACKOFF_S, self._watch, listener)

    async def _adopt(self, conn: socket.socket, peer: Any) -> None:
        """Take a connection through its steps, until the loop has it as a transport."""
        connections = self.connections
        protocol = self.server.protocol_class(peer)
        adopting = self.server.adopting
        adopting[protocol] = asyncio.current_task()  # type: ignore[assignment]
        record = protocol.record
        conn.setblocking(False)
        try:
            for step in connections.steps(record):
                if step is Step.PROXY_HEADER:
                    await connections.proxy.read(conn, record)
                elif step is Step.TLS_HANDSHAKE:
                    if await self._client_hello_may_come(conn, record):
                        await self._connect(protocol, conn, self.server.plan.tls)
                elif protocol.transport is None:
                    await self._connect(protocol, conn, None)
        except asyncio.CancelledError:
            pass  # cut off in its PROXY or TLS step: the record says why
        except Exception:
            connections.failed(record)
        finally:
            del adopting[protocol]
        if record.outcome is not None and protocol.transport is None:
            conn.close()
            protocol.connection_lost(None)

    async def _client_hello_may_come(self, conn: socket.socket, record: ConnectionRecord) -> bool:
        """Whether the client's first byte may begin a TLS handshake; if not, the record
        says so (see `not_a_client_hello`)."""
        await readable(self.loop, conn)
        try:
            not_tls = not_a_client_hello(conn.recv(1, socket.MSG_PEEK))
        except OSError:
            return True  # gone already: the handshake finds out how
        if not_tls is not None:
            record.finish(*not_tls)
        return not_tls is None

    async def _connect(
        self, protocol: EchoProtocol, conn: socket.socket, context: ssl.SSLContext | None
    ) -> None:
        """Hand the socket to the loop (through a TLS handshake with `context`); the
        record says why if that failed."""
        try:
            await self.loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=context,
                ssl_handshake_timeout=_LOOP_HANDSHAKE_BACKSTOP_S if context else None,
            )
        except (OSError, ssl.SSLError) as exc:
            # Gone before the loop took it, or a handshake that failed.
            outcome = handshake_outcome(exc) if context is not None else outcome_of(exc)
            protocol.record.finish(*outcome)
