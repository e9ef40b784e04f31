"""The blocking-socket pieces the `simple`, `threads` and `pool` models share.

The accept loop waits on the listener *and* the shutdown wakeup, so a stop request
interrupts it at once. The echo loop reads into one preallocated buffer per
connection (no allocation per chunk) and writes each chunk back in full before
reading again, which also bounds what a connection can hold to one buffer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._net import tune_connection
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..shutdown import Shutdown, wait_until

log = logging.getLogger("echoplex.server")

# accept() errors that concern one connection that already went away: skip it.
# (trio's _highlevel_socket.py surveys these; ECONNABORTED is the common one.)
_GONE_BEFORE_ACCEPT = {errno.ECONNABORTED, errno.EPERM, errno.EPROTO}
# Out of descriptors: back off instead of spinning on a listener that stays readable.
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BACKOFF_S = 0.1
_CUT_OFF_GRACE_S = 1.0


def accept_connections(
    listener: socket.socket, shutdown: Shutdown
) -> Iterator[tuple[socket.socket, Any]]:
    """Yield accepted, tuned, blocking connections until a stop is requested."""
    listener.setblocking(False)
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        selector.register(shutdown.fileno(), selectors.EVENT_READ)
        while not shutdown.requested:
            for key, _ in selector.select():
                if key.fileobj is not listener:
                    continue
                try:
                    conn, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if exc.errno in _OUT_OF_DESCRIPTORS:
                        log.warning("accept failed: %s; backing off", exc.strerror)
                        time.sleep(_ACCEPT_BACKOFF_S)
                    elif exc.errno not in _GONE_BEFORE_ACCEPT:
                        raise
                    continue
                conn.setblocking(True)
                tune_connection(conn)
                yield conn, peer


def echo_until_closed(
    conn: socket.socket,
    record: ConnectionRecord,
    config: ServerConfig,
    events: ServerEvents,
    wait_readable: Callable[[], bool] | None = None,
) -> None:
    """Echo every byte back until the client closes; set `record.outcome` to how it ended.

    `wait_readable`, when given, is called before each read and returns False to
    stop (the `simple` model uses it to notice a shutdown while it waits).
    """
    buffer = bytearray(config.recv_bytes)
    view = memoryview(buffer)
    log_data = config.log_data
    try:
        while wait_readable is None or wait_readable():
            received = conn.recv_into(buffer)
            if not received:
                # The client shut down its write side and every byte it sent has
                # been echoed (we write each chunk in full before reading again).
                record.finish("closed")
                return
            record.bytes_in += received
            if log_data:
                events.data_received(record, bytes(view[:received]))
            conn.sendall(view[:received])
            record.bytes_out += received
        record.finish("drained")
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
    wait_readable: Callable[[], bool] | None = None,
) -> None:
    """Serve one accepted connection to the end, report it, and close it whatever happens."""
    try:
        events.connection_opened(record)
        echo_until_closed(conn, record, config, events, wait_readable)
    finally:
        conn.close()
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
