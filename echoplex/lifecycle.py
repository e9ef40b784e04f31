"""How a connection lives and ends, the same for every model:

    accepted → admitted → [PROXY header] → [TLS handshake] → opened → echo
             → ended (an `Outcome`) → closed → released (its slot given back) → reported

`Connections` is that sequence for one server process, without I/O (as h11 keeps its
state machine apart from the sockets), and the owner of its time: it keeps every open
connection's deadlines (`echoplex.deadlines`) on one clock, and the stop sequence. The
models are I/O drivers of the same shape: each asks `steps(record)` what comes next,
does that step's reading and writing its own way (blocking sockets in
`models/_blocking.py`, ready-driven turns in `models/pool.py`, an event loop in
`models/asyncio_.py`), calls back here when the connection opens and when it is over,
runs `sweep()` from its own thread or loop at the times it says, and runs `stopping()`
when asked to stop. How each step can end is an `Outcome`, and how an exception becomes
one, is said in `echoplex.outcomes`, below this module (the records and the reporters
need it too).

A driver gives `Connections` two things about its handles (its sockets, or its asyncio
protocols): how to cut one off from outside (`cut_off`: make whoever serves it find it
ended) and, for the idle and send limits, how much it has received and has still to send
(`progress`; by default the record's own counts, less what its conditions hold on
purpose and what the handler is `working` on: a stalled or delayed echo, or one the
handler has not made yet, is not one the client is slow to take).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from ._accept import Acceptor, client_ip
from ._proxy_accept import ProxyGate
from .conditions import ConnectionConditions, Work
from .deadlines import Step, Timeouts, Watch
from .events import ConnectionRecord, ServerEvents
from .limits import Admission
from .outcomes import Outcome
from .plan import ServerPlan
from .shutdown import Shutdown

__all__ = ["CUT_OFF_GRACE_S", "Connections", "OnPurpose", "Step", "drain"]

log = logging.getLogger("echoplex.server")

Handle = TypeVar("Handle")
"""What a driver keeps of an open connection: its socket, or its asyncio protocol."""

Clock = Callable[[], float]

CUT_OFF_GRACE_S = 1.0
"""After the drain cuts off what is left, how long those connections get to close and
report before the server returns without them."""


class OnPurpose(NamedTuple):
    """What a connection gets on purpose (`echoplex.conditions`): conditions on its echo
    (None: the draw left it out, or none are set) and handler work before each chunk."""

    conditions: ConnectionConditions | None
    work: Work | None


Progress = Callable[[Any, ConnectionRecord], tuple[int, int]]
"""What the idle and send limits read of an open connection: bytes received, and bytes
the client has still to take (sent to it, or about to be)."""


class PeerCertified(Protocol):
    def getpeercert(self) -> Any: ...


# OpenSSL's short names for the parts of a subject, as `openssl x509 -subject` prints.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


def certificate_subject(certificate: Any) -> str | None:
    """A verified peer certificate's subject as `CN=alice,O=Example` (None: no
    certificate was asked for or given; `getpeercert()` is then empty)."""
    if not certificate:
        return None
    parts = [
        f"{_SHORT_NAMES.get(name, name)}={value}"
        for rdn in certificate.get("subject", ())
        for name, value in rdn
    ]
    return ",".join(parts) or None


def drain(
    open_count: Callable[[], int],
    cut_off_rest: Callable[[], object],
    deadline: Callable[[], float],
    clock: Clock,
    grace_s: float = CUT_OFF_GRACE_S,
) -> Iterator[float]:
    """The drain, for anything that holds open things and can cut them off: wait while
    any are open until `deadline()` (which a second stop request brings forward), then
    `cut_off_rest()` and wait up to `grace_s` more for them to be gone.

    Yields how long to wait for a change (one closing, a second request): the driver
    waits that long or until woken, however it waits, and the drain looks again."""
    while open_count():
        left_s = deadline() - clock()
        if left_s <= 0:
            break
        yield left_s
    if not open_count():
        return
    cut_off_rest()
    grace_ends = clock() + grace_s
    while open_count() and (left_s := grace_ends - clock()) > 0:
        yield left_s


class Connections(Generic[Handle]):
    """The open connections of one server process: their admission, their steps and
    deadlines, how they end and how they are reported, and the drain. Thread-safe.

    `cut_off(handle)` ends an open connection from outside its own thread or turn (a
    deadline, the drain's end), after its record has been given the outcome: the
    driver then finds it ended, and closes it."""

    def __init__(
        self,
        plan: ServerPlan,
        events: ServerEvents,
        cut_off: Callable[[Handle], None],
        admission: Admission,
        progress: Progress | None = None,
        clock: Clock = time.monotonic,
        wake: Callable[[Handle], None] | None = None,
    ) -> None:
        self.events = events
        self._cut_off = cut_off
        self.wake = wake
        """How to wake an open connection's driver at the time it asked (`wake_at`)."""
        self._progress = progress
        self.clock = clock
        self.admission = admission
        self.tls = plan.tls
        self.proxy = ProxyGate(plan.trusted_proxies, admission, events)
        self.timeouts = Timeouts(plan.proxy_header_s, plan.tls_handshake_s, plan.limits)
        self.drain_timeout_s = plan.drain_timeout_s
        self.conditions = plan.conditions
        # Hears how long conditions held each piece of echo (the metrics' histogram).
        self._on_held: Callable[[float], None] | None = getattr(events, "echo_held", None)
        self._max_buffer_bytes = plan.config.max_buffer_bytes
        self.on_change: Callable[[], None] = lambda: None
        """Called (on the closing thread) whenever a connection has been closed."""
        self.on_reschedule: Callable[[], None] = lambda: None
        """Called when a wake is asked for before the sweep's next look: the timekeeper
        waits for this or for the time `sweep` said, whichever comes first."""
        self._open: dict[ConnectionRecord, Watch] = {}
        self._working: dict[ConnectionRecord, int] = {}  # bytes under the handler's work
        self._wakes: list[tuple[float, int, ConnectionRecord]] = []  # a heap
        self._wake_order = itertools.count()  # ties: first asked, first woken
        self._next_look = -math.inf
        self._unreported = 0  # admitted, and not yet reported closed
        self._lock = threading.Lock()

    def acceptor(self) -> Acceptor:
        """Takes connections off a listener and admits them (`echoplex._accept`)."""
        return Acceptor(self.admission, self.events, self.proxy.is_proxy)

    def admitted(self, peer: Any, handle: Handle) -> ConnectionRecord:
        """An admitted connection is open from now on, until `closed`."""
        now = self.clock()
        record = ConnectionRecord(peer, opened_at=now)
        with self._lock:
            self._open[record] = Watch(handle, now)
            self._unreported += 1
        return record

    def steps(self, record: ConnectionRecord) -> Iterator[Step]:
        """The steps of a connection's life, in order; none after one ends it. Each
        step's deadline counts from when the driver asks for it."""
        watch = self._open[record]
        if self.proxy.expects_header(record):
            watch.enter(Step.PROXY_HEADER, self.clock())
            yield Step.PROXY_HEADER
            if record.outcome is not None:
                return
        if self.tls is not None:
            watch.enter(Step.TLS_HANDSHAKE, self.clock())
            yield Step.TLS_HANDSHAKE
            if record.outcome is not None:
                return
        watch.enter(Step.ECHO, self.clock())
        yield Step.ECHO

    def opened(
        self, record: ConnectionRecord, tls: PeerCertified | None = None
    ) -> OnPurpose | None:
        """Its header and handshake are done: the echo begins, with what it gets on
        purpose (drawn now, from the conditions set now), or None: a plain echo. `tls`
        is its TLS session (an SSLSocket or SSLObject): under mutual TLS the open line
        names the client certificate's subject."""
        if tls is not None:
            record.client_cert = certificate_subject(tls.getpeercert())
        on_purpose = self._draw(record)
        self.events.connection_opened(record)
        return on_purpose

    def stale(self, record: ConnectionRecord) -> bool:
        """Whether the conditions changed since this connection took its own: the driver
        then asks `renewed` before it echoes the chunk in hand."""
        return self.conditions.version != record.conditions_version

    def renewed(self, record: ConnectionRecord) -> OnPurpose | None:
        """What an open connection gets on purpose from its next chunk on, after a change
        (drawn afresh, as for a new connection); the log names the latest set."""
        return self._draw(record)

    def _draw(self, record: ConnectionRecord) -> OnPurpose | None:
        live = self.conditions
        record.conditions_version = live.version
        set_now = live.current
        conditions = None
        if set_now.active:
            conditions = live.for_connection(self.clock(), max_buffer_bytes=self._max_buffer_bytes)
            if conditions is not None:
                conditions.on_held = self._on_held
        with self._lock:
            watch = self._open.get(record)
            if watch is not None:
                watch.conditions = conditions
        if conditions is None and set_now.work is None:
            if record.conditions:
                record.conditions += " then none"
            return None
        names = [conditions.label] if conditions is not None else []
        if set_now.work is not None:
            names.append(f"work={set_now.work}")
        label = " ".join(names)
        record.conditions = f"{record.conditions} then {label}" if record.conditions else label
        return OnPurpose(conditions, set_now.work)

    def wake_at(self, record: ConnectionRecord, when: float) -> None:
        """Have the driver's `wake(handle)` called at `when` (on the clock), from the
        timekeeper: for a connection's next timed action (its conditions' `next_at`).
        An earlier wake already asked for stands; the driver asks again when woken."""
        with self._lock:
            watch = self._open.get(record)
            if watch is None or watch.wake_at <= when:
                return
            watch.wake_at = when
            first = self._wakes[0][0] if self._wakes else math.inf
            heapq.heappush(self._wakes, (when, next(self._wake_order), record))
        if when < min(first, self._next_look):
            self.on_reschedule()

    @contextlib.contextmanager
    def working(self, record: ConnectionRecord, nbytes: int) -> Iterator[None]:
        """The handler works on `nbytes` of input: held by the server, as the bytes that
        conditions hold, so not echo the client is slow to take (no `--send-timeout`),
        and the idle limit runs meanwhile, as it does in `asyncio` (whose progress
        counts only what its transport has still to write)."""
        self._working[record] = nbytes
        try:
            yield
        finally:
            del self._working[record]

    @staticmethod
    def failed(record: ConnectionRecord, exc: BaseException | None = None) -> None:
        """A bug (`exc`, or the one being handled): it ends this connection alone, as
        `error:handler`, and is logged once with its traceback. Every driver calls this
        wherever its own code for one connection could raise."""
        record.finish(Outcome.ERROR, "handler")
        log.error(
            "unexpected error serving %s; closing that connection",
            record.peer,
            exc_info=exc or True,
        )

    def closed(self, record: ConnectionRecord, close: Callable[[], None]) -> None:
        """It is over: `close()` its socket, give back its slot, report it; once, last."""
        with self._lock:
            # Before close(): from now on a cut-off cannot reach a socket whose
            # descriptor number the kernel may already have given to a new connection.
            del self._open[record]
        close()
        self.admission.release(client_ip(record.peer))
        self.events.connection_closed(record)
        with self._lock:
            self._unreported -= 1
        self.on_change()

    def cut_off(self, record: ConnectionRecord, outcome: Outcome) -> None:
        """End an open connection as `outcome` from outside its driver."""
        with self._lock:
            watch = self._open.get(record)
            if watch is None:
                return  # closed already
            record.finish(outcome)
            self._cut_off(watch.handle)

    def cut_off_all(self, outcome: Outcome) -> int:
        """Cut off every open connection (a drain's end); how many there were."""
        with self._lock:
            records = list(self._open)
        for record in records:
            self.cut_off(record, outcome)
        return len(records)

    def sweep(self) -> float | None:
        """Wake the connections whose time has come (`wake_at`), and cut off every one
        whose deadline has passed; how long until the next look is due (None: nothing
        is due until `on_reschedule` says so)."""
        now = self.clock()
        for handle in self._due_wakes(now):
            assert self.wake is not None, "a driver that asks for wakes has set one"
            self.wake(handle)
        if now >= self._next_look:
            self._next_look = self._check_deadlines(now)
        with self._lock:
            first_wake = self._wakes[0][0] if self._wakes else math.inf
        next_at = min(self._next_look, first_wake)
        return None if math.isinf(next_at) else max(0.0, next_at - now)

    def _due_wakes(self, now: float) -> list[Handle]:
        due = []
        with self._lock:
            wakes = self._wakes
            while wakes and wakes[0][0] <= now:
                when, _, record = heapq.heappop(wakes)
                watch = self._open.get(record)
                if watch is not None and watch.wake_at == when:  # else closed, or moved
                    watch.wake_at = math.inf
                    due.append(watch.handle)
        return due

    def _check_deadlines(self, now: float) -> float:
        """Cut off what has run out; when the next deadline look is due (inf: never)."""
        timeouts = self.timeouts
        look_every_s = timeouts.look_every_s
        if look_every_s is None:
            return math.inf
        next_look = now + look_every_s
        # A copy of the keys alone: a (record, watch) pair per connection each look
        # would be 64 bytes more per connection, every second, at 10,000 of them.
        with self._lock:
            records = list(self._open)
        for record in records:
            watch = self._open.get(record)
            if watch is None or record.outcome is not None:
                continue  # closed, or ending already: its driver is closing it
            bytes_in, pending = self._progress_of(watch, record)
            outcome = watch.check(timeouts, bytes_in, pending, now)
            if outcome is not None:
                self.cut_off(record, outcome)
            else:
                next_look = min(next_look, watch.next_deadline(timeouts))
        return next_look

    def _progress_of(self, watch: Watch, record: ConnectionRecord) -> tuple[int, int]:
        if watch.step is not Step.ECHO:
            return 0, 0
        if self._progress is not None:
            return self._progress(watch.handle, record)
        held = 0 if watch.conditions is None else watch.conditions.held
        held += self._working.get(record, 0)
        return record.bytes_in, record.bytes_in - record.bytes_out - held

    def stopping(self, shutdown: Shutdown, stop_listening: Callable[[], None]) -> Iterator[float]:
        """The stop sequence, the same in every model: stop listening, let the open
        connections finish until the drain deadline (or a second stop request), cut
        off the rest as `drained`, and give them `CUT_OFF_GRACE_S` to report.

        Yields how long to wait for a change: the driver waits that long, or until a
        connection closes (`on_change`) or another stop request arrives."""
        stop_listening()  # new connects are refused from now on
        self.events.stopping()
        stalled = self._cut_off_stalled()
        if stalled:
            log.info("stopping: closing %d connection(s) stalled on purpose", stalled)

        def cut_off_rest() -> None:
            left = self.cut_off_all(Outcome.DRAINED)
            if shutdown.forced:
                log.info(
                    "a second stop request skipped the drain: closing %d open connection(s)", left
                )
            else:
                log.info("drain timeout: closing %d open connection(s)", left)

        yield from drain(
            lambda: self._unreported,
            cut_off_rest,
            lambda: shutdown.drain_deadline(self.drain_timeout_s),
            self.clock,
        )

    def _cut_off_stalled(self) -> int:
        """Cut off, as `drained`, the connections that conditions stall now: a stall
        neither reads nor echoes, so they could only hold the drain to its deadline."""
        now = self.clock()
        with self._lock:
            stalled = [
                record
                for record, watch in self._open.items()
                if watch.conditions is not None and watch.conditions.stalled(now)
            ]
        for record in stalled:
            self.cut_off(record, Outcome.DRAINED)
        return len(stalled)

    @property
    def count(self) -> int:
        """Connections admitted and not yet reported closed: a drain waits for none."""
        return self._unreported
