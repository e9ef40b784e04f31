"""The blocking-socket pieces the `simple`, `threads` and `pool` models share.

The accept loop waits on the listener *and* the shutdown wakeup, so a stop request
interrupts it at once. The echo loop reads into one preallocated buffer per
connection (no allocation per chunk) and writes each chunk back in full before
reading again: a client that does not read its echo stops being read, so it can
never make the server hold more than one buffer (`max_buffer_bytes`) of its bytes.
Time limits are socket timeouts, set only when a limit is configured.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._accept import ACCEPT_BACKOFF_S, Acceptor, client_ip
from .._net import open_listener
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..limits import Admission, Deadlines
from ..shutdown import Shutdown, wait_until

log = logging.getLogger("echoplex.server")

_CUT_OFF_GRACE_S = 1.0


def accept_connections(
    listener: socket.socket, admission: Admission, events: ServerEvents, shutdown: Shutdown
) -> Iterator[tuple[socket.socket, Any]]:
    """Yield admitted, tuned, blocking connections until a stop is requested."""
    acceptor = Acceptor(listener, admission, events)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(shutdown.fileno(), selectors.EVENT_READ)
            while not shutdown.requested:
                if not any(key.fileobj is listener for key, _ in selector.select()):
                    continue
                admitted, back_off = acceptor.accept_ready()
                for conn, peer in admitted:
                    conn.setblocking(True)
                    yield conn, peer
                if back_off:
                    shutdown.wait(ACCEPT_BACKOFF_S)
    finally:
        acceptor.close()


ReadGate = Callable[[], str | None]
"""Called before each read by the `simple` model: None to read, or an outcome to stop with."""


def echo_until_closed(
    conn: socket.socket,
    record: ConnectionRecord,
    config: ServerConfig,
    events: ServerEvents,
    read_gate: ReadGate | None = None,
) -> None:
    """Echo every byte back until the client closes; `record.finish()` says how it ended."""
    buffer = bytearray(min(config.recv_bytes, config.max_buffer_bytes))
    view = memoryview(buffer)
    log_data = config.log_data
    deadlines = Deadlines(config, record.opened_at)
    timed = deadlines.any
    wait = deadlines.for_read()
    try:
        while True:
            if read_gate is not None and (stop := read_gate()) is not None:
                record.finish(stop)
                return
            if timed:
                wait = deadlines.for_read()
                conn.settimeout(wait.timeout_s)
            received = conn.recv_into(buffer)
            if not received:
                # The client shut down its write side and every byte it sent has
                # been echoed (each chunk is written in full before the next read).
                record.finish("closed")
                return
            record.bytes_in += received
            if log_data:
                events.data_received(record, bytes(view[:received]))
            if timed:
                wait = deadlines.for_send()
                conn.settimeout(wait.timeout_s)
            conn.sendall(view[:received])
            record.bytes_out += received
    except TimeoutError:
        record.finish(wait.outcome)
    except (ConnectionResetError, BrokenPipeError):
        record.finish("reset")
    except OSError as exc:
        record.finish(f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}")
    finally:
        view.release()


def serve_connection(
    conn: socket.socket,
    record: ConnectionRecord,
    config: ServerConfig,
    events: ServerEvents,
    admission: Admission,
    read_gate: ReadGate | None = None,
) -> None:
    """Serve one admitted connection to the end, report it, close it whatever happens.

    An unexpected exception is logged once, with its traceback, and ends this
    connection alone.
    """
    try:
        events.connection_opened(record)
        echo_until_closed(conn, record, config, events, read_gate)
    except Exception:
        record.finish("error:handler")
        log.exception("unexpected error serving %s; closing that connection", record.peer)
    finally:
        conn.close()
        admission.release(client_ip(record.peer))
        events.connection_closed(record)


class OpenConnections:
    """The connections being served, so a drain can wait for them and then cut them off."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[socket.socket, ConnectionRecord] = {}

    def add(self, sock: socket.socket, record: ConnectionRecord) -> None:
        with self._lock:
            self._records[sock] = record

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._records.pop(sock, None)

    def __len__(self) -> int:
        return len(self._records)

    def cut_off(self) -> None:
        """Shut every socket down: threads blocked in recv/send on them return at once.

        shutdown() rather than close(): closing a descriptor another thread is
        using could let a new connection reuse its number under that thread.
        """
        with self._lock:
            for sock, record in self._records.items():
                record.finish("drained")
                with contextlib.suppress(OSError):  # already gone
                    sock.shutdown(socket.SHUT_RDWR)


def drain(open_connections: OpenConnections, config: ServerConfig, shutdown: Shutdown) -> None:
    """Let open connections finish until the drain deadline, then cut off the rest."""
    if not shutdown.wait_drained(config.drain_timeout_s, lambda: not open_connections):
        if open_connections:
            log.info("drain timeout: closing %d open connection(s)", len(open_connections))
        open_connections.cut_off()
        # Give the cut-off threads a moment to close and report their connections.
        grace_ends = time.monotonic() + _CUT_OFF_GRACE_S
        wait_until(lambda: not open_connections, lambda: grace_ends)


def serve_handing_off(
    config: ServerConfig,
    events: ServerEvents,
    shutdown: Shutdown,
    hand_off: Callable[[Callable[[], None]], object],
) -> None:
    """Accept on this thread and `hand_off` each connection's serving to another
    (a new thread, a pool's queue); on a stop, close the listener and drain."""
    open_connections = OpenConnections()
    admission = Admission.from_config(config)

    def serve_then_forget(conn: socket.socket, record: ConnectionRecord) -> None:
        try:
            serve_connection(conn, record, config, events, admission)
        finally:
            open_connections.discard(conn)

    with open_listener(config) as listener:
        events.listening([listener.getsockname()])
        for conn, peer in accept_connections(listener, admission, events, shutdown):
            record = ConnectionRecord(peer)
            # Registered before it is handed off, so a drain also cuts off queued clients.
            open_connections.add(conn, record)
            hand_off(functools.partial(serve_then_forget, conn, record))
    events.stopping()
    drain(open_connections, config, shutdown)
