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
import selectors
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

from .._accept import ACCEPT_BACKOFF_S
from .._net import Listeners
from ..events import ConnectionRecord, ServerEvents
from ..lifecycle import Connections, Step
from ..outcomes import Outcome, handshake_outcome, outcome_of
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
                    connections.opened(record)
                    echo_until_closed(over_tls or conn, record, self.plan, self.events)
        except Exception:
            connections.failed(record)
        finally:
            if over_tls is not None:
                over_tls.close()
            connections.closed(record, conn.close)

    def _handshake(self, conn: socket.socket, record: ConnectionRecord) -> ssl.SSLSocket | None:
        """The TLS session over `conn`, or None with the record saying why there is none.

        A duplicate of the socket is wrapped: a wrap that fails part-way (a client that
        resets at once) has already taken the descriptor of the socket it was given, and
        `conn` must keep its own until it is closed. (A handshake past its deadline is
        cut off by the sweep, which has recorded why before the handshake fails.)"""
        assert self.plan.tls is not None
        try:
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
        """While the block runs, a thread sweeps the connections' deadlines at the times
        the lifecycle asks for (none if the server has no deadline to keep)."""
        stopped = threading.Event()

        def keep_time() -> None:
            wait_s = self.connections.sweep()
            while wait_s is not None and not stopped.wait(wait_s):
                wait_s = self.connections.sweep()

        thread = threading.Thread(target=keep_time, name="echo-timekeeper", daemon=True)
        if self.connections.timeouts.look_every_s is not None:
            thread.start()
        try:
            yield
        finally:
            stopped.set()
            if thread.ident is not None:
                thread.join()


def _shut_down(conn: socket.socket) -> None:
    """Cut a connection off from another thread: whoever serves it (blocked in recv or
    send, or about to be) finds it ended at once, and closes it."""
    with contextlib.suppress(OSError):  # the client is gone already
        conn.shutdown(socket.SHUT_RDWR)


def echo_until_closed(
    conn: socket.socket, record: ConnectionRecord, plan: ServerPlan, events: ServerEvents
) -> None:
    """Echo every byte back until the client closes; `record.finish()` says how it ended.
    The record's counts are kept as bytes come and go: the idle and send limits read them."""
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
                return
            record.bytes_in += received
            if log_data:
                events.data_received(record, bytes(view[:received]))
            sent = conn.send(view[:received])
            record.bytes_out += sent
            while sent < received:  # a client slow to read: count each part it takes
                part = conn.send(view[sent:received])
                sent += part
                record.bytes_out += part
            if zero_copy and received == len(buffer):
                # A full buffer: the client is streaming. The rest goes kernel to kernel.
                _splice.splice_echo(conn, record)
                return
    except OSError as exc:  # ssl.SSLError included
        record.finish(*outcome_of(exc))
    finally:
        view.release()
        buffer.close()


@contextlib.contextmanager
def small_thread_stacks() -> Iterator[None]:
    """Threads started inside the block get `THREAD_STACK_BYTES` stacks."""
    previous_stack_bytes = threading.stack_size(THREAD_STACK_BYTES)
    try:
        yield
    finally:
        threading.stack_size(previous_stack_bytes)
