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
turns, so a client that stalls them holds no worker either. TLS runs over memory
buffers (`ssl.MemoryBIO`, as asyncio does): the socket stays a plain non-blocking
socket from accept to close, and only this module moves ciphertext in and out.
Deadlines and the drain's cut-off come from other threads (the lifecycle's sweep, on
the `BlockingServer.timekeeper` thread) as a shutdown(2) of the socket, which makes it
ready: the worker that takes it finds it ended and closes it with the recorded outcome.

No zero-copy here: splice needs a pipe pair per streaming connection, and a turn
that may not block cannot wait on the pipe; streams are echoed through Python.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import cast

from ..errors import StartupError
from ..events import ConnectionRecord, ServerEvents
from ..lifecycle import Step
from ..outcomes import Outcome, handshake_outcome, outcome_of
from ..plan import ServerPlan
from ..proxy_protocol import ProxyHeaderReader
from ..shutdown import Shutdown
from ._blocking import BlockingServer, small_thread_stacks

log = logging.getLogger("echoplex.server")

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT
# Reads a worker does for one connection before it lets the next ready one have a turn:
# a fast stream gets up to this many buffers per turn, and nobody waits behind it long.
READS_PER_TURN = 16


class TlsSession:
    """A server-side TLS session over two memory buffers: ciphertext in, ciphertext out."""

    __slots__ = ("handshaking", "incoming", "outgoing", "session")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.session = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaking = True

    def buffered(self) -> bool:
        """Bytes wait inside the session (ciphertext or plaintext): epoll cannot see them."""
        return bool(self.incoming.pending or self.session.pending())


class PooledConnection:
    """One connection's state between turns: where it is in its life, and owed echo."""

    __slots__ = ("header", "owed", "owed_plain", "record", "sock", "step", "steps", "tls")

    def __init__(
        self, sock: socket.socket, record: ConnectionRecord, steps: Iterator[Step]
    ) -> None:
        self.sock = sock
        self.record = record
        self.steps = steps
        self.step: Step | None = None
        self.header: ProxyHeaderReader | None = None  # while the PROXY header is read
        self.tls: TlsSession | None = None  # from the TLS handshake on
        # Bytes for the wire the client has not taken yet (echo, or TLS records); while
        # any wait, the connection is not read. `owed_plain`: the echo behind owed TLS
        # records, counted sent once all of them are.
        self.owed = b""
        self.owed_plain = 0


class ConnectionPool:
    """The epoll set and the worker threads."""

    def __init__(self, server: BlockingServer, threads: int) -> None:
        self.server = server
        self.connections = server.connections
        self.plan = server.plan
        self.config = server.plan.config
        self.events = server.events
        self.epoll = select.epoll()
        self.by_fd: dict[int, PooledConnection] = {}
        # Level-triggered and never read: once written, every worker's wait returns.
        self._stop_reader, self._stop_writer = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.epoll.register(self._stop_reader, READABLE)
        self._chunk_bytes = self.plan.chunk_bytes
        self._threads = [
            threading.Thread(target=self._work, name=f"echo-pool-{index}", daemon=True)
            for index in range(threads)
        ]
        try:
            with small_thread_stacks():
                for thread in self._threads:
                    thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or pids
            self.close()
            raise StartupError(f"cannot start {threads} pool threads: {exc}") from None

    def add(self, sock: socket.socket, record: ConnectionRecord) -> None:
        """Take an admitted connection; the workers serve it from now on."""
        sock.setblocking(False)
        connection = PooledConnection(sock, record, self.connections.steps(record))
        try:
            self._advance(connection)  # on the accept thread: a bug here ends this one alone
        except Exception:
            self.connections.failed(record)
            self.connections.closed(record, sock.close)
            return
        fd = sock.fileno()
        self.by_fd[fd] = connection
        self.epoll.register(fd, READABLE | select.EPOLLONESHOT)

    def close(self) -> None:
        """Stop the workers (the server has drained: nothing is left to serve)."""
        os.write(self._stop_writer, b"!")
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()
        for connection in list(self.by_fd.values()):  # none, unless the drain gave up
            connection.record.finish(Outcome.DRAINED)
            self._end(connection)
        self.epoll.close()
        os.close(self._stop_reader)
        os.close(self._stop_writer)

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self) -> None:
        # Anonymous mmap, not bytearray: its pages cost memory only once written, so
        # threads that only ever see small messages hold a page or two, not 64 KiB.
        with mmap.mmap(-1, self._chunk_bytes) as buffer:
            view = memoryview(buffer)
            try:
                while True:
                    # One event per wait: ready connections spread over the free workers.
                    for fd, _ in self.epoll.poll(-1, 1):
                        if fd == self._stop_reader:
                            return
                        self._take_turn(self.by_fd[fd], buffer, view)
            finally:
                view.release()

    def _take_turn(self, connection: PooledConnection, buffer: mmap.mmap, view: memoryview) -> None:
        """One turn, then arm the connection again or end it; whatever goes wrong ends
        this connection alone, never the worker."""
        try:
            wait_for = self._turn(connection, buffer, view)
        except Exception:
            self.connections.failed(connection.record)
            wait_for = None
        try:
            if wait_for is not None:
                self.epoll.modify(connection.sock.fileno(), wait_for | select.EPOLLONESHOT)
                return
        except OSError:  # not expected: end this connection, not the worker
            self.connections.failed(connection.record)
        try:
            self._end(connection)
        except Exception:
            log.exception("unexpected error closing %s", connection.record.peer)

    def _end(self, connection: PooledConnection) -> None:
        fd = connection.sock.fileno()
        self.epoll.unregister(fd)
        del self.by_fd[fd]  # before close(): its descriptor number may be reused
        self.connections.closed(connection.record, connection.sock.close)

    def _turn(
        self, connection: PooledConnection, buffer: mmap.mmap, view: memoryview
    ) -> int | None:
        """Do what is ready: the event to wait for next, or None when the connection ended."""
        record = connection.record
        if record.outcome is not None:
            return None  # cut off (a limit, the drain)
        try:
            if connection.owed and not self._flush(connection):
                return WRITABLE
            while connection.step is not Step.ECHO:
                if connection.step is Step.PROXY_HEADER:
                    wait_for = self._read_header(connection)
                else:
                    wait_for = self._handshake(connection)
                if wait_for is not None:
                    return wait_for
                if not self._advance(connection):
                    return None
            return self._echo(connection, buffer, view)
        except BlockingIOError:
            return READABLE  # only reads get this far: a send that would block is owed
        except OSError as exc:  # ssl.SSLError included
            record.finish(*outcome_of(exc))
            return None

    def _flush(self, connection: PooledConnection) -> bool:
        """Send what is owed, counting the echo it carries as sent; True once nothing is."""
        try:
            sent = connection.sock.send(connection.owed)
        except BlockingIOError:
            return False
        connection.owed = connection.owed[sent:]
        if connection.tls is None:
            connection.record.bytes_out += sent
        elif not connection.owed:
            connection.record.bytes_out += connection.owed_plain
            connection.owed_plain = 0
        return not connection.owed

    def _owe(self, connection: PooledConnection, data: bytes, plain_bytes: int) -> bool:
        """Send TLS records `data` (holding `plain_bytes` of echo), keeping what the
        socket does not take; True if it took all of it."""
        connection.owed, connection.owed_plain = data, plain_bytes
        return self._flush(connection)

    def _advance(self, connection: PooledConnection) -> bool:
        """On to the connection's next step; False if it has none left (it ended)."""
        step = connection.step = next(connection.steps, None)
        if step is Step.PROXY_HEADER:
            connection.header = ProxyHeaderReader()
        elif step is Step.TLS_HANDSHAKE:
            assert self.plan.tls is not None
            connection.header = None
            connection.tls = TlsSession(self.plan.tls)
        elif step is Step.ECHO:
            connection.header = None
            self.connections.opened(connection.record)
        return step is not None

    def _read_header(self, connection: PooledConnection) -> int | None:
        """The PROXY header step: the event to wait for, or None once it is done (or
        failed, with the record saying so)."""
        assert connection.header is not None
        proxy = self.connections.proxy
        taken = proxy.read_ready(connection.sock, connection.record, connection.header)
        return READABLE if taken is None else None

    def _handshake(self, connection: PooledConnection) -> int | None:
        """The TLS handshake step: the event to wait for, or None once it is done (or
        failed, with the record saying so)."""
        session = connection.tls
        assert session is not None
        while True:
            try:
                session.session.do_handshake()
                session.handshaking = False
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, OSError) as exc:
                connection.record.finish(*handshake_outcome(exc))
                return None
            try:
                if not self._owe(connection, session.outgoing.read(), 0):
                    return WRITABLE
                if not session.handshaking:
                    return None
                ciphertext = connection.sock.recv(self._chunk_bytes)
            except BlockingIOError:
                return READABLE
            except OSError as exc:
                connection.record.finish(*handshake_outcome(exc))
                return None
            if not ciphertext:
                connection.record.finish(*handshake_outcome(EOFError()))
                return None
            session.incoming.write(ciphertext)

    def _echo(
        self, connection: PooledConnection, buffer: mmap.mmap, view: memoryview
    ) -> int | None:
        record, session = connection.record, connection.tls
        while True:
            for _ in range(READS_PER_TURN):
                received = self._receive(connection, buffer)
                if received is None:
                    return READABLE
                if not received:
                    # The client shut down its write side, and every byte it sent has
                    # been echoed (nothing is read while echo is owed).
                    record.finish(Outcome.CLOSED)
                    return None
                record.bytes_in += received
                if self.config.log_data:
                    self.events.data_received(record, bytes(view[:received]))
                if session is None:
                    try:
                        sent = connection.sock.send(view[:received])
                    except BlockingIOError:
                        sent = 0
                    record.bytes_out += sent
                    if sent < received:
                        connection.owed = bytes(view[sent:received])
                        return WRITABLE
                    if received < len(buffer):
                        # Less than a buffer: the socket had nothing more just now (a
                        # ping-pong), so wait rather than pay for a read that finds nothing.
                        return READABLE
                else:
                    session.session.write(view[:received])
                    if not self._owe(connection, session.outgoing.read(), received):
                        return WRITABLE
            if session is None or not session.buffered():
                return READABLE  # budget spent: behind the other ready connections

    def _receive(self, connection: PooledConnection, buffer: mmap.mmap) -> int | None:
        """Echo bytes read into `buffer`: how many, 0 at the end of the stream, None if
        none are ready now."""
        session = connection.tls
        if session is None:
            try:
                return connection.sock.recv_into(buffer)
            except BlockingIOError:
                return None
        while True:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                return cast(int, session.session.read(len(buffer), buffer))
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return 0  # close_notify
            try:
                ciphertext = connection.sock.recv(self._chunk_bytes)
            except BlockingIOError:
                return None
            if not ciphertext:
                return 0  # closed without close_notify: as the other models, a close
            session.incoming.write(ciphertext)


def serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    server = BlockingServer(plan, events, shutdown)
    # Leaving the pool stops its workers; by then the drain has closed every connection.
    with ConnectionPool(server, plan.config.threads) as pool:
        server.serve_handing_off(pool.add)
