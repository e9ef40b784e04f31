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
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

from .. import tls
from .._accept import ACCEPT_BACKOFF_S, Acceptor, client_ip
from .._net import Listeners
from .._proxy_accept import ProxyGate
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..limits import Admission, Deadlines
from ..outcomes import Outcome, outcome_of
from ..shutdown import Shutdown, wait_until
from . import _splice

log = logging.getLogger("echoplex.server")

_CUT_OFF_GRACE_S = 1.0
# Stacks of the threads that serve connections: they only run the echo loop (and a
# TLS handshake), so thousands of them cost little memory.
THREAD_STACK_BYTES = 256 * 1024

ReadGate = Callable[[socket.socket], Outcome | None]
"""Called with the connection before each read by the `simple` model: None to read, or
an outcome to stop with."""


class BlockingServer:
    """Accepting, serving and draining connections on blocking sockets."""

    def __init__(self, config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
        self.config = config
        self.events = events
        self.shutdown = shutdown
        self.admission = Admission.from_config(config)
        self.tls = tls.server_context(config)
        self.proxy = ProxyGate(config, self.admission, events)
        # Every connection accepted and not yet closed (the plain socket, also under TLS),
        # so that a drain can wait for them and then cut them off.
        self._open: dict[ConnectionRecord, socket.socket] = {}
        self._lock = threading.Lock()

    def accept(self, listeners: Listeners) -> Iterator[tuple[socket.socket, ConnectionRecord]]:
        """Yield admitted, tuned, blocking connections until a stop is requested."""
        acceptor = Acceptor(self.admission, self.events, self.proxy.is_proxy)
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
                            record = ConnectionRecord(peer)
                            with self._lock:
                                self._open[record] = conn
                            yield conn, record
                        if back_off:
                            self.shutdown.wait(ACCEPT_BACKOFF_S)
        finally:
            acceptor.close()

    def serve(
        self, conn: socket.socket, record: ConnectionRecord, read_gate: ReadGate | None = None
    ) -> None:
        """Serve one admitted connection to the end, report it, close it whatever happens.

        An unexpected exception is logged once, with its traceback, and ends this
        connection alone.
        """
        over_tls: ssl.SSLSocket | None = None
        try:
            if self.proxy.expects_header(record):
                self.proxy.read_blocking(conn, record)
            if self.tls is not None and record.outcome is None:
                over_tls = self._handshake(conn, record)
            if record.outcome is None:
                self.events.connection_opened(record)
                echo_until_closed(over_tls or conn, record, self.config, self.events, read_gate)
        except Exception:
            self.failed(record)
        finally:
            if over_tls is not None:
                over_tls.close()
            self.close(conn, record)

    @staticmethod
    def failed(record: ConnectionRecord) -> None:
        record.finish(Outcome.ERROR, "handler")
        log.exception("unexpected error serving %s; closing that connection", record.peer)

    def close(self, conn: socket.socket, record: ConnectionRecord) -> None:
        """Close an admitted connection, give back its slot and report it: once, last."""
        with self._lock:
            del self._open[record]  # before close(): its descriptor number may be reused
        conn.close()
        self.admission.release(client_ip(record.peer))
        self.events.connection_closed(record)

    def cut_off(self, record: ConnectionRecord, outcome: Outcome) -> None:
        """End an open connection from another thread, as `outcome`: shut it down, so
        whoever serves it (blocked in recv or send, or about to be) finds it ended at
        once and closes it. Under the lock, an open connection's socket is not closed
        under us: `close` takes it off the record first."""
        with self._lock:
            conn = self._open.get(record)
            if conn is None:
                return  # closed already
            record.finish(outcome)
            with contextlib.suppress(OSError):  # the client is gone already
                conn.shutdown(socket.SHUT_RDWR)

    def _handshake(self, conn: socket.socket, record: ConnectionRecord) -> ssl.SSLSocket | None:
        """The TLS session over `conn`, or None with the record saying why there is none.

        A duplicate of the socket is wrapped: a wrap that fails part-way (a client that
        resets at once) has already taken the descriptor of the socket it was given, and
        `conn` must keep its own until `close`."""
        assert self.tls is not None
        conn.settimeout(self.config.tls_handshake_timeout_s)
        try:
            wrapped = self.tls.wrap_socket(conn.dup(), server_side=True)
        except TimeoutError:
            record.finish(Outcome.TLS_HANDSHAKE_TIMEOUT)
            return None
        except (ssl.SSLError, OSError):
            record.finish(Outcome.TLS_HANDSHAKE_FAILED)
            return None
        wrapped.settimeout(None)
        return wrapped

    def serve_handing_off(
        self, hand_off: Callable[[socket.socket, ConnectionRecord], object]
    ) -> None:
        """Accept on this thread and `hand_off` each connection (to a new thread, to a
        pool); on a stop, close the listeners and drain."""
        with Listeners.open(self.config) as listeners:
            self.events.listening(listeners.addresses)
            for conn, record in self.accept(listeners):
                hand_off(conn, record)
        self.events.stopping()
        self.drain()

    def drain(self) -> None:
        """Let open connections finish until the drain deadline, then cut off the rest."""
        drain_timeout_s = self.config.drain_timeout_s
        if self.shutdown.wait_drained(drain_timeout_s, lambda: not self._open):
            return
        with self._lock:
            left = list(self._open)
        if left:
            log.info("drain timeout: closing %d open connection(s)", len(left))
        for record in left:
            self.cut_off(record, Outcome.DRAINED)
        # Give the cut-off threads a moment to close and report their connections.
        grace_ends = time.monotonic() + _CUT_OFF_GRACE_S
        wait_until(lambda: not self._open, lambda: grace_ends)


def echo_until_closed(
    conn: socket.socket,
    record: ConnectionRecord,
    config: ServerConfig,
    events: ServerEvents,
    read_gate: ReadGate | None = None,
) -> None:
    """Echo every byte back until the client closes; `record.finish()` says how it ended."""
    # Anonymous mmap, not bytearray: its pages cost memory only once written, so an idle
    # connection (or one sending small messages) holds a page or two, not 64 KiB.
    buffer = mmap.mmap(-1, min(config.recv_bytes, config.max_buffer_bytes))
    view = memoryview(buffer)
    log_data = config.log_data
    deadlines = Deadlines(config, record.opened_at)
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
            if read_gate is not None and (stop := read_gate(conn)) is not None:
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
