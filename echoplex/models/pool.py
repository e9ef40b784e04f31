"""`pool`: `config.threads` worker threads serve every connection, whatever their number.

One epoll set watches every admitted connection, each armed for one event at a time
(EPOLLONESHOT). When a connection is ready (readable, or writable while echo is still
owed) the kernel wakes one free worker blocked in epoll_wait; the worker does the work
that is ready without blocking (reads and echoes until the socket has nothing more, or
its turn's budget is spent) and arms the connection again. An idle client therefore
holds no thread, and N threads serve any number of clients: the tutorial's
one-at-a-time problem, one level up, is what a pool of blocking handlers would bring
back. ONESHOT also keeps a connection in one worker's hands at a time: no other
worker hears of it until that one re-arms it, and only that one closes it.

Backpressure as in every model: echo the client has not taken yet (at most one
buffer) is kept, and the connection is armed for writing alone, so it is not read
until its echo is out. The PROXY header and the TLS handshake are steps of the same
turns, so a client that stalls them holds no worker either. Time limits, handshake
deadlines and the drain's cut-off come from other threads as a shutdown(2) of the
socket (`BlockingServer.cut_off`), which makes it ready: the worker that takes it
finds it ended and closes it with the recorded outcome.

No zero-copy here: splice needs a pipe pair per streaming connection, and a turn
that may not block cannot wait on the pipe; streams are echoed through Python.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time

from .. import tls
from .._proxy_accept import HEADER_TIMEOUT
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..limits import ProgressWatch, TimeLimits
from ..proxy_protocol import ProxyHeaderReader
from ..shutdown import Shutdown
from ._blocking import BlockingServer, failure_outcome

log = logging.getLogger("echoplex.server")

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT
# Reads a worker does for one connection before it lets the next ready one have a turn:
# a fast stream gets up to this many buffers per turn, and nobody waits behind it long.
READS_PER_TURN = 16


class PooledConnection:
    """One connection's state between turns: where it is in its life, and owed echo."""

    __slots__ = ("cut", "handshaking", "header", "opened", "owed", "record", "sock", "watch")

    def __init__(self, sock: socket.socket, record: ConnectionRecord, *, header: bool, tls: bool):
        self.sock = sock
        self.record = record
        self.header = ProxyHeaderReader() if header else None  # a PROXY header is due
        self.handshaking = tls
        self.opened = False
        self.owed = b""  # received, not yet echoed: while any, the connection is not read
        self.watch = ProgressWatch(record.opened_at)
        self.cut = False  # cut off already (a limit, the drain): the next turn ends it


class ConnectionPool:
    """The epoll set, the worker threads and, if any limit is set, the limit sweeper."""

    def __init__(self, server: BlockingServer, threads: int) -> None:
        self.server = server
        self.config = server.config
        self.events = server.events
        self.limits = TimeLimits.from_config(self.config)
        self.epoll = select.epoll()
        self.connections: dict[int, PooledConnection] = {}
        # Level-triggered and never read: once written, every worker's wait returns.
        self._stop_reader, self._stop_writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.epoll.register(self._stop_reader, READABLE)
        self._stopped = threading.Event()
        self._chunk_bytes = min(self.config.recv_bytes, self.config.max_buffer_bytes)
        self._threads = [
            threading.Thread(target=self._work, name=f"echo-pool-{index}", daemon=True)
            for index in range(threads)
        ]
        if self._sweep_interval_s() is not None:
            self._threads.append(threading.Thread(target=self._sweep, name="echo-pool-limits"))
        for thread in self._threads:
            thread.start()

    def add(self, sock: socket.socket, record: ConnectionRecord) -> None:
        """Take an admitted connection; the workers serve it from now on."""
        sock.setblocking(False)
        header = self.server.proxy.expects_header(record)
        connection = PooledConnection(sock, record, header=header, tls=self.server.tls is not None)
        fd = sock.fileno()
        self.connections[fd] = connection
        self.epoll.register(fd, READABLE | select.EPOLLONESHOT)

    def close(self) -> None:
        """Stop the workers (the server has drained: nothing is left to serve)."""
        self._stopped.set()
        os.write(self._stop_writer, b"!")
        for thread in self._threads:
            thread.join()
        for connection in list(self.connections.values()):  # none, unless the drain gave up
            connection.record.finish("drained")
            self._end(connection)
        self.epoll.close()
        os.close(self._stop_reader)
        os.close(self._stop_writer)

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self) -> None:
        buffer = bytearray(self._chunk_bytes)
        view = memoryview(buffer)
        while True:
            # One event per wait: ready connections spread over the free workers.
            for fd, _ in self.epoll.poll(-1, 1):
                if fd == self._stop_reader:
                    return
                connection = self.connections[fd]
                try:
                    wait_for = self._turn(connection, buffer, view)
                except Exception:
                    self.server.failed(connection.record)
                    wait_for = None
                if wait_for is not None:
                    try:
                        self.epoll.modify(fd, wait_for | select.EPOLLONESHOT)
                        continue
                    except OSError as exc:  # not expected: end this connection, not the worker
                        log.error("cannot watch %s again: %s", connection.record.peer, exc)
                        connection.record.finish("error:handler")
                self._end(connection)

    def _end(self, connection: PooledConnection) -> None:
        fd = connection.sock.fileno()
        self.epoll.unregister(fd)
        del self.connections[fd]  # before close(): its descriptor number may be reused
        self.server.close(connection.sock, connection.record)

    def _turn(
        self, connection: PooledConnection, buffer: bytearray, view: memoryview
    ) -> int | None:
        """Do what is ready: the event to wait for next, or None when the connection ended."""
        record = connection.record
        if connection.cut:
            return None
        if connection.header is not None:
            try:
                taken = self.server.proxy.read_ready(connection.sock, record, connection.header)
            except BlockingIOError:
                return READABLE
            if taken is None:
                return READABLE
            if not taken:
                return None
            connection.header = None
        if connection.handshaking:
            wait_for = self._handshake(connection)
            if wait_for is not None or record.outcome is not None:
                return wait_for
        if not connection.opened:
            connection.opened = True
            self.events.connection_opened(record)
        try:
            return self._echo(connection, buffer, view)
        except ssl.SSLWantReadError:
            return READABLE
        except ssl.SSLWantWriteError:
            return WRITABLE
        except OSError as exc:
            record.finish(failure_outcome(exc))
            return None

    def _handshake(self, connection: PooledConnection) -> int | None:
        """A TLS handshake step: the event to wait for, or None when done (or failed,
        with the record saying so)."""
        sock = connection.sock
        if not isinstance(sock, ssl.SSLSocket):
            assert self.server.tls is not None
            sock = connection.sock = self.server.tls.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return READABLE
        except ssl.SSLWantWriteError:
            return WRITABLE
        except (ssl.SSLError, OSError):
            connection.record.finish(tls.HANDSHAKE_FAILED)
            return None
        connection.handshaking = False
        return None

    def _echo(
        self, connection: PooledConnection, buffer: bytearray, view: memoryview
    ) -> int | None:
        sock, record = connection.sock, connection.record
        if connection.owed:
            try:
                sent = sock.send(connection.owed)
            except BlockingIOError:
                return WRITABLE
            record.bytes_out += sent
            connection.owed = connection.owed[sent:]
            if connection.owed:
                return WRITABLE
        while True:
            for _ in range(READS_PER_TURN):
                try:
                    received = sock.recv_into(buffer)
                except BlockingIOError:
                    return READABLE
                if not received:
                    # The client shut down its write side, and every byte it sent has
                    # been echoed (nothing is read while echo is owed).
                    record.finish("closed")
                    return None
                record.bytes_in += received
                if self.config.log_data:
                    self.events.data_received(record, bytes(view[:received]))
                try:
                    sent = sock.send(view[:received])
                except (BlockingIOError, ssl.SSLWantWriteError):
                    sent = 0
                record.bytes_out += sent
                if sent < received:
                    connection.owed = bytes(view[sent:received])
                    return WRITABLE
                # Decrypted bytes waiting inside TLS are out of epoll's sight: read on.
                tls_pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
                if received < len(buffer) and not tls_pending:
                    # Less than a buffer: the socket had nothing more just now (a
                    # ping-pong), so wait rather than pay for a read that finds nothing.
                    return READABLE
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return READABLE  # budget spent: behind the other ready connections

    def _sweep_interval_s(self) -> float | None:
        limits = [self.limits.idle_s, self.limits.send_s, self.limits.lifetime_s]
        if self.server.proxy.networks:
            limits.append(self.config.proxy_header_timeout_s)
        if self.server.tls is not None:
            limits.append(self.config.tls_handshake_timeout_s)
        shortest_s = min((s for s in limits if s), default=None)
        if shortest_s is None:
            return None
        # A limit is enforced at most a quarter of itself late (and within a second).
        return min(1.0, max(0.01, shortest_s / 4))

    def _sweep(self) -> None:
        """Cut off connections whose time limit, or handshake deadline, has run out."""
        interval_s = self._sweep_interval_s()
        while not self._stopped.wait(interval_s):
            now = time.monotonic()
            for connection in list(self.connections.values()):
                outcome = self._expired(connection, now)
                if outcome is not None and not connection.cut:
                    self.server.cut_off(connection.record, outcome)
                    connection.cut = True  # after: a turn that sees it finds the outcome

    def _expired(self, connection: PooledConnection, now: float) -> str | None:
        age_s = now - connection.record.opened_at
        if connection.header is not None:
            timeout_s = self.config.proxy_header_timeout_s
            return HEADER_TIMEOUT if age_s >= timeout_s else None
        if connection.handshaking:
            timeout_s = self.config.tls_handshake_timeout_s
            return tls.HANDSHAKE_TIMEOUT if age_s >= timeout_s else None
        record = connection.record
        return connection.watch.check(self.limits, record.bytes_in, len(connection.owed), now)


def serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
    server = BlockingServer(config, events, shutdown)
    # Leaving the pool stops its workers; by then the drain has closed every connection.
    with ConnectionPool(server, config.threads) as pool:
        server.serve_handing_off(pool.add)
