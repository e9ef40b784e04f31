"""What the thread-based models (`simple`, `threads`, `pool`) share: accepting, the
record of open connections, closing and cutting off, the drain; and the blocking echo
loop of `simple` and `threads`.

The accept loop waits on the listeners *and* the shutdown wakeup, so a stop request
interrupts it at once. The echo loop reads into one preallocated buffer per
connection (no allocation per chunk) and writes each chunk back in full before
reading again: a client that does not read its echo stops being read, so it can
never make the server hold more than one buffer (`max_buffer_bytes`) of its bytes.
Its time limits are socket timeouts, set only when a limit is configured.
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
from ..events import ConnectionRecord, ServerEvents
from ..lifecycle import Connections, Step
from ..limits import Deadlines, TimeLimits
from ..outcomes import Outcome, handshake_outcome, outcome_of
from ..plan import ServerPlan
from ..shutdown import Shutdown, wait_until
from . import _splice
from ._splice import ReadGate

log = logging.getLogger("echoplex.server")

_CUT_OFF_GRACE_S = 1.0
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

    def serve(
        self, conn: socket.socket, record: ConnectionRecord, read_gate: ReadGate | None = None
    ) -> None:
        """Serve one admitted connection to the end, report it, close it whatever happens."""
        connections = self.connections
        over_tls: ssl.SSLSocket | None = None
        try:
            for step in connections.steps(record):
                if step is Step.PROXY_HEADER:
                    connections.proxy.read_blocking(conn, record)
                elif step is Step.TLS_HANDSHAKE:
                    over_tls = self._handshake(conn, record, read_gate)
                else:
                    connections.opened(record)
                    echo_until_closed(over_tls or conn, record, self.plan, self.events, read_gate)
        except Exception:
            connections.failed(record)
        finally:
            if over_tls is not None:
                over_tls.close()
            connections.closed(record, conn.close)

    def _handshake(
        self, conn: socket.socket, record: ConnectionRecord, read_gate: ReadGate | None
    ) -> ssl.SSLSocket | None:
        """The TLS session over `conn`, or None with the record saying why there is none.

        A duplicate of the socket is wrapped: a wrap that fails part-way (a client that
        resets at once) has already taken the descriptor of the socket it was given, and
        `conn` must keep its own until it is closed. With a `read_gate` (`simple`, whose
        one thread must also notice a stop), each wait for the client goes through it."""
        assert self.plan.tls is not None and self.plan.tls_handshake_s is not None
        timeout_s = self.plan.tls_handshake_s
        conn.settimeout(timeout_s)
        try:
            wrapped = self.plan.tls.wrap_socket(
                conn.dup(), server_side=True, do_handshake_on_connect=read_gate is None
            )
            if read_gate is not None:
                stop = _handshake_through(wrapped, conn, read_gate, timeout_s, record)
                if stop is not None:
                    wrapped.close()
                    record.finish(stop)
                    return None
        except (ssl.SSLError, OSError) as exc:
            record.finish(*handshake_outcome(exc))
            return None
        wrapped.settimeout(None)
        return wrapped

    def serve_handing_off(
        self, hand_off: Callable[[socket.socket, ConnectionRecord], object]
    ) -> None:
        """Accept on this thread and `hand_off` each connection (to a new thread, to a
        pool); on a stop, close the listeners and drain."""
        with self.plan.listeners as listeners:
            self.events.listening(listeners.addresses)
            for conn, record in self.accept(listeners):
                hand_off(conn, record)
        self.events.stopping()
        self.drain()

    def drain(self) -> None:
        """Let open connections finish until the drain deadline, then cut off the rest."""
        connections = self.connections
        if self.shutdown.wait_drained(self.plan.drain_timeout_s, lambda: not connections.count):
            return
        left = connections.cut_off_all(Outcome.DRAINED)
        if left:
            log.info("drain timeout: closing %d open connection(s)", left)
        # Give the cut-off threads a moment to close and report their connections.
        grace_ends = time.monotonic() + _CUT_OFF_GRACE_S
        wait_until(lambda: not connections.count, lambda: grace_ends)


def _handshake_through(
    wrapped: ssl.SSLSocket,
    conn: socket.socket,
    read_gate: ReadGate,
    timeout_s: float,
    record: ConnectionRecord,
) -> Outcome | None:
    """Do the handshake in steps, waiting for the client through `read_gate` (with the
    handshake's deadline as its idle limit): None once done, or why to stop."""
    deadlines = Deadlines(TimeLimits(timeout_s, None, None), record.opened_at)
    wrapped.setblocking(False)
    while True:
        try:
            wrapped.do_handshake()
            wrapped.setblocking(True)
            return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:  # a full send buffer, mid-handshake: rare
            select.select([], [conn], [], timeout_s)
            continue
        stop = read_gate(conn, deadlines)
        if stop is not None:
            return Outcome.TLS_HANDSHAKE_TIMEOUT if stop is Outcome.IDLE_TIMEOUT else stop


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
    read_gate: ReadGate | None = None,
) -> None:
    """Echo every byte back until the client closes; `record.finish()` says how it ended."""
    config = plan.config
    # Anonymous mmap, not bytearray: its pages cost memory only once written, so an idle
    # connection (or one sending small messages) holds a page or two, not 64 KiB.
    buffer = mmap.mmap(-1, plan.chunk_bytes)
    view = memoryview(buffer)
    log_data = config.log_data
    deadlines = Deadlines(plan.limits, record.opened_at)
    # Idle and send timeouts are the same for every call: the kernel enforces them
    # (SO_RCVTIMEO, SO_SNDTIMEO), so a chunk costs one recv and one send, with no poll
    # before each. Only a lifetime limit, which shrinks as the connection ages, needs
    # a timeout worked out before every call.
    timed = deadlines.lifetime_ends is not None
    if not timed:
        _kernel_timeouts(conn, deadlines.idle_s, deadlines.send_s)
    read_wait, send_wait = deadlines.for_read(), deadlines.for_send()
    wait = read_wait
    zero_copy = config.zero_copy and not log_data and _splice.can_splice(conn)
    try:
        while True:
            if read_gate is not None and (stop := read_gate(conn, deadlines)) is not None:
                record.finish(stop)
                return
            wait = read_wait
            if timed:
                wait = deadlines.for_read()
                conn.settimeout(wait.timeout_s)
            received = conn.recv_into(buffer)
            if not received:
                # The client shut down its write side and every byte it sent has
                # been echoed (each chunk is written in full before the next read).
                record.finish(Outcome.CLOSED)
                return
            record.bytes_in += received
            if log_data:
                events.data_received(record, bytes(view[:received]))
            wait = send_wait
            if timed:
                wait = deadlines.for_send()
                conn.settimeout(wait.timeout_s)
            conn.sendall(view[:received])
            record.bytes_out += received
            if zero_copy and received == len(buffer):
                # A full buffer: the client is streaming. The rest goes kernel to kernel.
                _splice.splice_echo(conn, record, deadlines, read_gate)
                return
    except (TimeoutError, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        # Python's timeout, or the kernel's (a blocking call failing with EAGAIN).
        record.finish(wait.outcome)
    except OSError as exc:
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


def _kernel_timeouts(conn: socket.socket, receive_s: float | None, send_s: float | None) -> None:
    for option, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
        if seconds:
            whole = int(seconds)
            timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
            with contextlib.suppress(OSError):  # gone already: the next call says so
                conn.setsockopt(socket.SOL_SOCKET, option, timeval)
