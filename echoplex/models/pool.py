"""`pool`: `config.threads` worker threads serve every connection, whatever their number.

One epoll set watches every admitted connection, each armed for one event at a time
(EPOLLONESHOT). When connections are ready (readable, or writable while echo is still
owed) the kernel wakes one free worker blocked in epoll_wait and hands it up to a batch
of them; for each in turn the worker does the work that is ready without blocking
(reads and echoes until the socket has nothing more, or its turn's budget is spent)
and arms the connection again, and only then waits again: one wakeup serves them all.
An idle client therefore holds no thread, and N threads serve any number of clients:
the tutorial's one-at-a-time problem, one level up, is what a pool of blocking handlers
would bring back. ONESHOT also keeps a connection in one worker's hands at a time: no
other worker hears of it until that one re-arms it, and only that one closes it.

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

import collections
import contextlib
import logging
import mmap
import os
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import cast

from ..conditions import Close, Finish, Reset, Send
from ..errors import StartupError
from ..events import ConnectionRecord, ServerEvents
from ..lifecycle import OnPurpose, Step
from ..outcomes import Outcome, handshake_outcome, not_a_client_hello, outcome_of
from ..plan import ServerPlan
from ..proxy_protocol import ProxyHeaderReader
from ..shutdown import Shutdown
from ._blocking import BlockingServer, arrange_reset, small_thread_stacks, work_on

log = logging.getLogger("echoplex.server")

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT
GONE = select.EPOLLERR | select.EPOLLHUP
# Reads a worker does for one connection before it lets the next ready one have a turn:
# a fast stream gets up to this many buffers per turn, and nobody waits behind it long.
READS_PER_TURN = 16
# Events a worker takes from one epoll_wait and serves, one turn each, before it waits
# again: one wakeup (and one GIL hand-over) for many short turns, not one per turn.
# Each is this worker's alone (ONESHOT): a batch is bounded so that, while it is
# served, the others wait behind at most this many turns; a turn that may block (the
# handler's work) first hands the rest back.
READY_PER_WAIT = 32


class TlsSession:
    """A server-side TLS session over two memory buffers: ciphertext in, ciphertext out."""

    __slots__ = ("handshaking", "heard", "incoming", "outgoing", "session")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.session = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaking = True
        self.heard = False  # whether any ciphertext came: its first byte is checked

    def buffered(self) -> bool:
        """Bytes wait inside the session (ciphertext or plaintext): epoll cannot see them."""
        return bool(self.incoming.pending or self.session.pending())


class PooledConnection:
    """One connection's state between turns: where it is in its life, and owed echo."""

    __slots__ = (
        "again",
        "busy",
        "discard_until",
        "ended",
        "ending",
        "guard",
        "header",
        "on_purpose",
        "owed",
        "owed_plain",
        "record",
        "sock",
        "step",
        "steps",
        "tls",
    )

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
        self.on_purpose: OnPurpose | None = None  # conditions or work, from the echo on
        self.ending: Close | Reset | Finish | None = None  # once what is owed is out
        self.discard_until: float | None = None  # closed after --close-after: discarding
        # A connection with conditions is also woken by the timekeeper: `guard` keeps
        # it in one worker's hands, and `again` asks that worker for one more turn.
        self.guard = threading.Lock()
        self.busy = self.again = self.ended = False


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
        # Connections the timekeeper woke (their conditions' time came), and a counter
        # of them that one free worker at a time hears of (ONESHOT, re-armed per wake).
        self._woken: collections.deque[PooledConnection] = collections.deque()
        self._wake_fd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self._wake_fd, READABLE | select.EPOLLONESHOT)
        self.connections.wake = self._wake
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
        if connection.on_purpose is not None:  # its first actions may be due at once
            self.connections.wake_at(record, self.connections.clock())

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
        os.close(self._wake_fd)

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
                while self._serve_ready(self._ready_events(), buffer, view):
                    pass
            finally:
                view.release()

    def _ready_events(self) -> list[tuple[int, int]]:
        """Wait for what is ready: up to a batch of events, each this worker's alone."""
        return self.epoll.poll(-1, READY_PER_WAIT)

    def _serve_ready(
        self, ready: list[tuple[int, int]], buffer: mmap.mmap, view: memoryview
    ) -> bool:
        """A turn for every event of one wait, in order; False once the pool stops."""
        for index, (fd, events) in enumerate(ready):
            if fd == self._stop_reader:
                return False
            if fd == self._wake_fd:
                connection, events = self._take_woken(), 0
            else:
                # None: a connection with conditions, ended by the worker its wake gave
                # a turn to while this event for it was on its way.
                connection = self.by_fd.get(fd)
            if connection is None:
                continue
            if connection.on_purpose is not None and connection.on_purpose.work is not None:
                # Its turn holds this thread for the handler's work: the rest of the
                # batch goes back to the kernel, for a free worker, rather than wait.
                self._hand_back(ready[index + 1 :])
                self._take_turn(connection, buffer, view, events)
                return True
            self._take_turn(connection, buffer, view, events)
        return True

    def _hand_back(self, events: list[tuple[int, int]]) -> None:
        """Arm again events taken and not served: level-triggered, they are still
        ready, so the kernel hands each at once to another worker blocked in its wait."""
        for fd, mask in events:
            if fd == self._stop_reader:
                continue  # not ONESHOT: every worker hears it anyway
            # The wake counter is still up (only a turn reads it), so it fires again.
            wanted = READABLE if fd == self._wake_fd else mask & (READABLE | WRITABLE)
            # OSError: ended meanwhile by its wake's turn (unregistered), nothing to hand.
            with contextlib.suppress(OSError):
                self.epoll.modify(fd, wanted | select.EPOLLONESHOT)

    def _wake(self, sock: socket.socket) -> None:
        """The timekeeper's wake for a connection: a free worker gives it a turn."""
        connection = self.by_fd.get(sock.fileno())  # (-1 once closed: none)
        if connection is not None:
            self._woken.append(connection)  # before the count: a worker finds it there
            os.eventfd_write(self._wake_fd, 1)

    def _take_woken(self) -> PooledConnection | None:
        try:
            os.eventfd_read(self._wake_fd)  # one of the count
        except BlockingIOError:
            return None
        self.epoll.modify(self._wake_fd, READABLE | select.EPOLLONESHOT)  # the next one
        return self._woken.popleft()

    def _take_turn(
        self, connection: PooledConnection, buffer: mmap.mmap, view: memoryview, events: int
    ) -> None:
        """Turns until nothing is ready, then arm the connection again or end it;
        whatever goes wrong ends this connection alone, never the worker."""
        with connection.guard:
            if connection.ended:
                return
            if connection.busy:  # another worker has it: it takes one more turn
                connection.again = True
                return
            connection.busy = True
        while True:
            try:
                wait_for = self._turn(connection, buffer, view, events)
            except Exception:
                self.connections.failed(connection.record)
                wait_for = None
            events = 0
            with connection.guard:
                if wait_for is not None and connection.again:
                    connection.again = False
                    continue
                connection.busy = False
                try:
                    if wait_for is not None:
                        self.epoll.modify(connection.sock.fileno(), wait_for | select.EPOLLONESHOT)
                        return
                except OSError:  # not expected: end this connection, not the worker
                    self.connections.failed(connection.record)
                connection.ended = True
            break
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
        self, connection: PooledConnection, buffer: mmap.mmap, view: memoryview, events: int
    ) -> int | None:
        """Do what is ready: the event to wait for next, or None when the connection ended."""
        record = connection.record
        if record.outcome is not None:
            # Cut off (a limit, the drain); or closed on purpose, and discarding.
            return None if connection.discard_until is None else self._discard(connection, buffer)
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
            if connection.on_purpose is not None:
                return self._echo_on_purpose(connection, buffer, view, events)
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
            tls = connection.tls.session if connection.tls is not None else None
            connection.on_purpose = self.connections.opened(connection.record, tls)
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
            not_tls = None if session.heard else not_a_client_hello(ciphertext)
            if not_tls is not None:
                connection.record.finish(*not_tls)
                return None
            session.heard = True
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
                if self.connections.stale(record):  # the control API changed them
                    connection.on_purpose = self.connections.renewed(record) or OnPurpose(
                        None, None
                    )
                    self._take(connection, bytes(view[:received]))
                    return self._echo_on_purpose(connection, buffer, view, 0)
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

    def _echo_on_purpose(
        self, connection: PooledConnection, buffer: mmap.mmap, view: memoryview, events: int
    ) -> int | None:
        """The echo of a connection with conditions or work, in turns as `_echo`: what its
        conditions say is due goes out, then one read, a budget of times; then it waits
        to be readable (if its conditions let it read) and for its next action's time."""
        assert connection.on_purpose is not None
        conditions = connection.on_purpose.conditions
        record, clock = connection.record, self.connections.clock
        for _ in range(READS_PER_TURN):
            if conditions is not None:
                for action in conditions.due(clock()):
                    if isinstance(action, Send):
                        self._owe_more(connection, action.data)
                    else:
                        connection.ending = action
            if connection.owed and not self._flush(connection):
                return WRITABLE
            if connection.ending is not None:
                return self._end_on_purpose(connection, connection.ending)
            if conditions is not None and not conditions.may_read(clock()):
                break
            received = self._receive(connection, buffer)
            if received is None:
                break
            if not received:
                if conditions is None:
                    record.finish(Outcome.CLOSED)
                    return None
                conditions.eof(clock())
                continue
            record.bytes_in += received
            chunk = bytes(view[:received])
            if self.config.log_data:
                self.events.data_received(record, chunk)
            if self.connections.stale(record):  # the control API changed them
                held = b"" if conditions is None else conditions.handover()
                connection.on_purpose = self.connections.renewed(record) or OnPurpose(None, None)
                conditions = connection.on_purpose.conditions
                chunk = held + chunk
            self._take(connection, chunk)
        reading = conditions is None or conditions.may_read(clock())
        if events & GONE and not reading:
            # Reset while not being read: end it now, or its error event would come back
            # at once, again and again. (The socket says so itself: an event may be the
            # last one of a closed connection whose descriptor number this one reuses.)
            error = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                record.finish(*outcome_of(OSError(error, os.strerror(error))))
                return None
        next_at = None if conditions is None else conditions.next_at()
        if reading and connection.tls is not None and connection.tls.buffered():
            next_at = clock()  # bytes inside the TLS session: epoll cannot see them
        if next_at is not None:
            self.connections.wake_at(record, next_at)
        return READABLE if reading else 0

    def _take(self, connection: PooledConnection, chunk: bytes) -> None:
        """A chunk read: after the handler's work, owed at once, or to the conditions."""
        assert connection.on_purpose is not None
        conditions, work = connection.on_purpose
        if work is not None:  # on this worker: it holds it, as real work does
            work_on(work, chunk, connection.record, self.connections, connection.sock)
        if conditions is None:
            self._owe_more(connection, chunk)
        else:
            conditions.received(chunk, self.connections.clock())

    def _owe_more(self, connection: PooledConnection, plain: bytes) -> None:
        """Add echo to what is owed (as TLS records, over TLS); `_flush` sends it."""
        session = connection.tls
        if session is None:
            connection.owed += plain
        else:
            session.session.write(plain)
            connection.owed += session.outgoing.read()
            connection.owed_plain += len(plain)

    def _end_on_purpose(
        self, connection: PooledConnection, end: Close | Reset | Finish
    ) -> int | None:
        """End as the conditions say, now that every byte of echo is out."""
        record = connection.record
        if isinstance(end, Finish):
            record.finish(Outcome.CLOSED)
            return None
        if isinstance(end, Reset):
            record.finish(Outcome.RESET_AFTER)
            arrange_reset(connection.sock)
            return None
        if connection.tls is not None and not self._close_notify(connection):
            return WRITABLE
        record.finish(Outcome.CLOSE_AFTER)
        connection.sock.shutdown(socket.SHUT_WR)  # a FIN after exactly what was sent
        connection.discard_until = end.discard_until
        self.connections.wake_at(record, end.discard_until)
        return READABLE

    def _close_notify(self, connection: PooledConnection) -> bool:
        """Owe the TLS close_notify, ahead of the FIN as in the other models (a FIN alone
        is a truncation to a strict TLS client), and send it; True once it is out. The
        client's own is not waited for: most never send one. (Again after a turn that
        could not send it all: the session, closed already, adds nothing.)"""
        assert connection.tls is not None
        # Ours is written first, whatever follows: theirs is not awaited (SSLWantReadError),
        # and input past the mark is refused (APPLICATION_DATA_AFTER_CLOSE_NOTIFY), as
        # the discarding drops it anyway.
        with contextlib.suppress(ssl.SSLError):
            connection.tls.session.unwrap()
        connection.owed += connection.tls.outgoing.read()
        return self._flush(connection)

    def _discard(self, connection: PooledConnection, buffer: mmap.mmap) -> int | None:
        """After a close on purpose: read and drop what the client sends, until its EOF
        or the time is up (closing with unread input would send RST, not the FIN)."""
        assert connection.discard_until is not None
        while True:
            try:
                if not connection.sock.recv_into(buffer):
                    return None
            except BlockingIOError:
                return READABLE if self.connections.clock() < connection.discard_until else None
            except OSError:
                return None

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
