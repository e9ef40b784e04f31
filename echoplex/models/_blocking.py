"""What the thread-based models (`simple`, `threads`, `pool`) share: accepting, the
thread that keeps the lifecycle's time, cutting off, the stop sequence; and the
blocking echo loop of `simple` and `threads`.

The accept loop waits on the listeners *and* the shutdown wakeup, so a stop request
interrupts it at once. The echo loop reads into one preallocated buffer per
connection (no allocation per chunk) and writes each chunk back in full before
reading again: a client that does not read its echo stops being read, so it can
never make the server hold more than one buffer (`max_buffer_bytes`) of its bytes.
Its reads and writes block with no timeout: a deadline that passes (the lifecycle's
sweep, run by the `timekeeper` thread) or the drain's end cuts the socket off with
shutdown(2), and the blocked call returns at once.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

from .._accept import ACCEPT_BACKOFF_S
from .._net import Listeners
from ..conditions import Close, ConnectionConditions, Finish, Reset, Send, Work
from ..events import ConnectionRecord, ServerEvents
from ..lifecycle import Connections, OnPurpose, Step
from ..outcomes import Outcome, handshake_outcome, not_a_client_hello, outcome_of
from ..plan import ServerPlan
from ..shutdown import Shutdown
from . import _splice

log = logging.getLogger("echoplex.server")

# Stacks of the threads that serve connections: they only run the echo loop (and a
# TLS handshake), so thousands of them cost little memory.
THREAD_STACK_BYTES = 256 * 1024


class BlockingServer:
    """Accepting, serving and draining connections on blocking sockets."""

    def __init__(self, plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
        self.plan = plan
        self.events = events
        self.shutdown = shutdown
        self.connections: Connections[socket.socket] = Connections(
            plan, events, _shut_down, plan.admission
        )

    def accept(self, listeners: Listeners) -> Iterator[tuple[socket.socket, ConnectionRecord]]:
        """Yield admitted, tuned, blocking connections until a stop is requested."""
        acceptor = self.connections.acceptor()
        try:
            with selectors.DefaultSelector() as selector:
                for listener in listeners:
                    listener.setblocking(False)
                    selector.register(listener, selectors.EVENT_READ)
                selector.register(self.shutdown.fileno(), selectors.EVENT_READ)
                while not self.shutdown.requested:
                    for key, _ in selector.select():
                        if key.fd == self.shutdown.fileno():
                            self.shutdown.clear_wakeup()  # a signal's byte, or request()'s
                            continue
                        admitted, back_off = acceptor.accept_ready(key.fileobj)  # type: ignore[arg-type]
                        for conn, peer in admitted:
                            conn.setblocking(True)
                            yield conn, self.connections.admitted(peer, conn)
                        if back_off:
                            self.shutdown.wait(ACCEPT_BACKOFF_S)
        finally:
            acceptor.close()

    def serve(self, conn: socket.socket, record: ConnectionRecord) -> None:
        """Serve one admitted connection to the end, report it, close it whatever happens."""
        connections = self.connections
        over_tls: ssl.SSLSocket | None = None
        try:
            for step in connections.steps(record):
                if step is Step.PROXY_HEADER:
                    connections.proxy.read_blocking(conn, record)
                elif step is Step.TLS_HANDSHAKE:
                    over_tls = self._handshake(conn, record)
                else:
                    self._echo(conn, over_tls, record)
        except Exception:
            connections.failed(record)
        finally:
            if over_tls is not None:
                over_tls.close()
            connections.closed(record, conn.close)

    def _echo(
        self, conn: socket.socket, over_tls: ssl.SSLSocket | None, record: ConnectionRecord
    ) -> None:
        """The plain echo, unless the connection gets conditions or work (now, or from
        the chunk in hand when the control API changes them)."""
        connections = self.connections
        on_purpose = connections.opened(record, over_tls)
        in_hand = b""
        if on_purpose is None:
            taken = echo_until_closed(over_tls or conn, record, self.plan, self.events, connections)
            if taken is None:
                return  # it ended
            in_hand, on_purpose = taken, connections.renewed(record)
        OnPurposeEcho(conn, over_tls, record, self, on_purpose).run(in_hand)

    def _handshake(self, conn: socket.socket, record: ConnectionRecord) -> ssl.SSLSocket | None:
        """The TLS session over `conn`, or None with the record saying why there is none.

        A duplicate of the socket is wrapped: a wrap that fails part-way (a client that
        resets at once) has already taken the descriptor of the socket it was given, and
        `conn` must keep its own until it is closed. (A handshake past its deadline is
        cut off by the sweep, which has recorded why before the handshake fails.)"""
        assert self.plan.tls is not None
        try:
            not_tls = not_a_client_hello(conn.recv(1, socket.MSG_PEEK))
            if not_tls is not None:
                record.finish(*not_tls)
                return None
            return self.plan.tls.wrap_socket(conn.dup(), server_side=True)
        except (ssl.SSLError, OSError) as exc:
            record.finish(*handshake_outcome(exc))
            return None

    def serve_handing_off(
        self, hand_off: Callable[[socket.socket, ConnectionRecord], object]
    ) -> None:
        """Accept on this thread and `hand_off` each connection (to a new thread, to a
        pool); on a stop, run the stop sequence."""
        with self.plan.listeners as listeners, self.timekeeper():
            self.events.listening(listeners.addresses)
            for conn, record in self.accept(listeners):
                hand_off(conn, record)
            self.stop(listeners)

    def stop(self, listeners: Listeners) -> None:
        """The lifecycle's stop sequence, waiting on the shutdown's wakeup socket: a
        closing connection nudges it (`on_change`), and so does a second stop signal,
        whichever thread it lands on."""
        self.connections.on_change = self.shutdown.nudge
        for wait_s in self.connections.stopping(self.shutdown, listeners.close):
            self.shutdown.sleep(wait_s)

    @contextlib.contextmanager
    def timekeeper(self) -> Iterator[None]:
        """While the block runs, a thread sweeps the connections' deadlines and wakes at
        the times the lifecycle asks for (or sooner, when it reschedules)."""
        stopped = False
        rescheduled = threading.Event()

        def keep_time() -> None:
            while not stopped:
                rescheduled.clear()  # before the sweep: a wake asked during it is seen
                rescheduled.wait(self.connections.sweep())

        self.connections.on_reschedule = rescheduled.set
        thread = threading.Thread(target=keep_time, name="echo-timekeeper", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stopped = True
            rescheduled.set()
            thread.join()


def _shut_down(conn: socket.socket) -> None:
    """Cut a connection off from another thread: whoever serves it (blocked in recv or
    send, or about to be) finds it ended at once, and closes it."""
    with contextlib.suppress(OSError):  # the client is gone already
        conn.shutdown(socket.SHUT_RDWR)


def echo_until_closed(
    conn: socket.socket,
    record: ConnectionRecord,
    plan: ServerPlan,
    events: ServerEvents,
    connections: Connections[socket.socket],
) -> bytes | None:
    """Echo every byte back until the client closes; `record.finish()` says how it ended.
    The record's counts are kept as bytes come and go: the idle and send limits read them.
    Returns the chunk in hand, unechoed, if the conditions changed (the control API):
    the echo goes on with them; None once the connection has ended."""
    config = plan.config
    # Anonymous mmap, not bytearray: its pages cost memory only once written, so an idle
    # connection (or one sending small messages) holds a page or two, not 64 KiB.
    buffer = mmap.mmap(-1, plan.chunk_bytes)
    view = memoryview(buffer)
    log_data = config.log_data
    zero_copy = config.zero_copy and not log_data and _splice.can_splice(conn)
    try:
        while True:
            received = conn.recv_into(buffer)
            if not received:
                # The client shut down its write side and every byte it sent has
                # been echoed (each chunk is written in full before the next read).
                record.finish(Outcome.CLOSED)
                return None
            record.bytes_in += received
            if log_data:
                events.data_received(record, bytes(view[:received]))
            if connections.stale(record):
                return bytes(view[:received])
            sent = conn.send(view[:received])
            record.bytes_out += sent
            while sent < received:  # a client slow to read: count each part it takes
                part = conn.send(view[sent:received])
                sent += part
                record.bytes_out += part
            if zero_copy and received == len(buffer):
                # A full buffer: the client is streaming. The rest goes kernel to kernel.
                _splice.splice_echo(conn, record)
                return None
    except OSError as exc:  # ssl.SSLError included
        record.finish(*outcome_of(exc))
    finally:
        view.release()
        buffer.close()
    return None


def do_work(work: Work) -> None:
    """The handler's work before a chunk's echo, on this thread: `io` waits (a blocking
    call: the GIL is free), `cpu` computes for that much of this thread's CPU time, with
    the GIL held as Python code holds it: threads that compute take turns."""
    if work.kind == "io":
        time.sleep(work.seconds)
        return
    ends_at = time.thread_time() + work.seconds
    while time.thread_time() < ends_at:
        pass


def work_on(
    work: Work,
    chunk: bytes,
    record: ConnectionRecord,
    connections: Connections[socket.socket],
    sock: socket.socket,
) -> None:
    """The handler's work on `chunk`, in a blocking model. The chunk is held by the
    server meanwhile (`Connections.working`: not echo owed, as in `asyncio`), and `io`
    work ends early when the connection is cut off (a limit, the drain) or reset: it
    waits on the socket for a hang-up or an error, not in a sleep, so the close is
    logged when the client sees it, and the thread is free again."""
    with connections.working(record, len(chunk)):
        if work.kind != "io":
            do_work(work)
            return
        poller = select.poll()
        poller.register(sock, 0)  # errors and hang-ups only: input waits in the kernel
        poller.poll(work.seconds * 1000)


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def arrange_reset(sock: socket.socket) -> None:
    """Make the socket's close an RST (a reset on purpose): linger on, for 0 seconds."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class OnPurposeEcho:
    """The blocking echo of a connection with conditions or work: the same reads and
    writes as `echo_until_closed`, timed by its `ConnectionConditions` (which say what
    to send when, when to read, and when to close or reset). The serving thread waits
    with poll(2) for the socket or the next action's time, whichever comes first; a
    cut-off (shutdown(2) from the sweep) ends the wait at once, as it ends a recv."""

    def __init__(
        self,
        raw: socket.socket,
        over_tls: ssl.SSLSocket | None,
        record: ConnectionRecord,
        server: BlockingServer,
        on_purpose: OnPurpose | None,
    ) -> None:
        self.connections = server.connections
        self.raw = raw
        self.conn = over_tls or raw
        self.tls = over_tls
        self.record = record
        self.events = server.events
        self.log_data = server.plan.config.log_data
        self.clock = server.connections.clock
        self.conditions: ConnectionConditions | None = None
        self.work: Work | None = None
        if on_purpose is not None:
            self.conditions, self.work = on_purpose
        self.buffer = bytearray(server.plan.chunk_bytes)
        self.poller = select.poll()
        self.poller.register(raw, 0)

    def run(self, in_hand: bytes = b"") -> None:
        """Echo to the end, beginning with `in_hand` (bytes read before these conditions)."""
        try:
            if in_hand:
                self._take(in_hand)
            self._echo()
        except OSError as exc:  # ssl.SSLError included
            self.record.finish(*outcome_of(exc))

    def _echo(self) -> None:
        record = self.record
        while record.outcome is None:
            conditions, now = self.conditions, self.clock()  # (a chunk may renew them)
            if conditions is not None and not self._act(conditions.due(now)):
                return
            reading = conditions is None or conditions.may_read(now)
            next_at = None if conditions is None else conditions.next_at()
            if reading and self._readable(next_at):
                self._receive()
            elif not reading:
                self._wait(0, next_at)  # only a cut-off or the client's reset ends it early

    def _receive(self) -> None:
        conditions, record = self.conditions, self.record  # (as they were before this chunk)
        received = self.conn.recv_into(self.buffer)
        if not received:
            if conditions is None:
                record.finish(Outcome.CLOSED)  # each chunk was echoed before the next read
            else:
                conditions.eof(self.clock())
            return
        record.bytes_in += received
        chunk = bytes(self.buffer[:received])
        if self.log_data:
            self.events.data_received(record, chunk)
        if self.connections.stale(record):
            chunk = self._renew() + chunk
        self._take(chunk)

    def _renew(self) -> bytes:
        """Take the conditions the control API set; what the old ones held goes first."""
        held = b"" if self.conditions is None else self.conditions.handover()
        self.conditions, self.work = self.connections.renewed(self.record) or (None, None)
        return held

    def _take(self, chunk: bytes) -> None:
        if self.work is not None:
            work_on(self.work, chunk, self.record, self.connections, self.raw)
        if self.conditions is None:
            self._send(chunk)
        else:
            self.conditions.received(chunk, self.clock())

    def _act(self, actions: list[Send | Close | Reset | Finish]) -> bool:
        """Do what the conditions say; False once the connection has ended."""
        for action in actions:
            if isinstance(action, Send):
                self._send(action.data)
            elif isinstance(action, Close):
                self.record.finish(Outcome.CLOSE_AFTER)
                self._close_after(action.discard_until)
                return False
            elif isinstance(action, Reset):
                self.record.finish(Outcome.RESET_AFTER)
                arrange_reset(self.raw)
                return False
            else:
                self.record.finish(Outcome.CLOSED)
                return False
        return True

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = self.conn.send(view)
            self.record.bytes_out += sent
            view = view[sent:]

    def _close_after(self, discard_until: float) -> None:
        """A FIN after what was sent; then read and drop what the client still sends,
        until its EOF or `discard_until` (closing with unread input would send RST).
        Over TLS the session's close_notify goes first, as in `asyncio`: a FIN alone is
        a truncation to a strict TLS client (Python's `SSLEOFError`)."""
        if self.tls is not None:
            self._close_notify(discard_until)
        self.raw.shutdown(socket.SHUT_WR)
        while self._wait(select.POLLIN, discard_until):
            if not self.raw.recv(len(self.buffer)):
                return

    def _close_notify(self, until: float) -> None:
        """Send the TLS close_notify, without waiting for the client's own: most clients
        never send one back (Python's reads ours as an EOF and stops there). Unwrapping a
        non-blocking session sends ours and stops where it would wait for theirs; a client
        whose socket buffer is full gets until `until` to make room, then the FIN alone."""
        assert self.tls is not None
        self.tls.setblocking(False)  # for the raw socket too: one open file, one flag
        try:
            while True:
                try:
                    self.tls.unwrap()  # theirs had come already: the session is closed
                    return
                except ssl.SSLWantWriteError:
                    if not self._wait(select.POLLOUT, until):
                        return
                except ssl.SSLError:
                    # Ours is sent: theirs is not awaited (SSLWantReadError), and input
                    # past the mark is refused (APPLICATION_DATA_AFTER_CLOSE_NOTIFY), as
                    # the discarding drops it anyway.
                    return
        finally:
            self.tls.setblocking(True)

    def _readable(self, until: float | None) -> bool:
        """Whether a read will not block: bytes inside the TLS session, or on the socket
        before `until` (None: wait as long as it takes)."""
        if self.tls is not None and self.tls.pending():
            return True
        return self._wait(select.POLLIN, until)

    def _wait(self, events: int, until: float | None) -> bool:
        """Wait for `events` (errors and hang-ups always) until `until`; whether any came."""
        self.poller.modify(self.raw, events)
        timeout_ms = None if until is None else max(0.0, (until - self.clock()) * 1000)
        ready = self.poller.poll(timeout_ms)
        if ready and not events:
            # An error or hang-up while not reading: a cut-off (the record says so) or
            # the client gone; a read says which, as it does in the plain echo.
            self.conn.recv_into(self.buffer)
            self.record.finish(Outcome.CLOSED)
        return bool(ready)


@contextlib.contextmanager
def small_thread_stacks() -> Iterator[None]:
    """Threads started inside the block get `THREAD_STACK_BYTES` stacks."""
    previous_stack_bytes = threading.stack_size(THREAD_STACK_BYTES)
    try:
        yield
    finally:
        threading.stack_size(previous_stack_bytes)
