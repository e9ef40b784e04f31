"""How a connection lives and ends, the same for every model:

    accepted → admitted → [PROXY header] → [TLS handshake] → opened → echo
             → ended (an `Outcome`) → closed → released (its slot given back) → reported

`Connections` is that sequence for one server process, without I/O (as h11 keeps its
state machine apart from the sockets). The models are I/O drivers of the same shape:
each asks `steps(record)` what comes next, does that step's reading and writing its own
way (blocking sockets in `models/_blocking.py`, ready-driven turns in `models/pool.py`,
an event loop in `models/asyncio_.py`), and calls back here when the connection opens
and when it is over. How each step can end is an `Outcome`, and how an exception becomes
one, is said in `echoplex.outcomes`, below this module (the records and the reporters
need it too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any, Generic, TypeVar

from ._accept import Acceptor, client_ip
from ._proxy_accept import ProxyGate
from .events import ConnectionRecord, ServerEvents
from .limits import Admission
from .outcomes import Outcome
from .plan import ServerPlan

log = logging.getLogger("echoplex.server")

Handle = TypeVar("Handle")
"""What a driver keeps of an open connection: its socket, or its asyncio protocol."""


class Step(Enum):
    PROXY_HEADER = "a trusted proxy's PROXY header"
    TLS_HANDSHAKE = "the TLS handshake"
    ECHO = "echo until the connection ends"


class Connections(Generic[Handle]):
    """The open connections of one server process: their admission, their steps, how
    they end and how they are reported. Thread-safe.

    `cut_off(handle)` ends an open connection from outside its own thread or turn (a
    time limit, the drain's end), after its record has been given the outcome: the
    driver then finds it ended, and closes it."""

    def __init__(
        self,
        plan: ServerPlan,
        events: ServerEvents,
        cut_off: Callable[[Handle], None],
        admission: Admission,
    ) -> None:
        self.events = events
        self._cut_off = cut_off
        self.admission = admission
        self.tls = plan.tls
        self.proxy = ProxyGate(plan.trusted_proxies, plan.proxy_header_s, admission, events)
        self.on_change: Callable[[], None] = lambda: None
        """Called (on the closing thread) whenever a connection has been closed."""
        self._open: dict[ConnectionRecord, Handle] = {}
        self._unreported = 0  # admitted, and not yet reported closed
        self._lock = threading.Lock()

    def acceptor(self) -> Acceptor:
        """Takes connections off a listener and admits them (`echoplex._accept`)."""
        return Acceptor(self.admission, self.events, self.proxy.is_proxy)

    def admitted(self, peer: Any, handle: Handle) -> ConnectionRecord:
        """An admitted connection is open from now on, until `closed`."""
        record = ConnectionRecord(peer)
        with self._lock:
            self._open[record] = handle
            self._unreported += 1
        return record

    def steps(self, record: ConnectionRecord) -> Iterator[Step]:
        """The steps of a connection's life, in order; none after one ends it."""
        if self.proxy.expects_header(record):
            yield Step.PROXY_HEADER
            if record.outcome is not None:
                return
        if self.tls is not None:
            yield Step.TLS_HANDSHAKE
            if record.outcome is not None:
                return
        yield Step.ECHO

    def opened(self, record: ConnectionRecord) -> None:
        """Its header and handshake are done: the echo begins."""
        self.events.connection_opened(record)

    @staticmethod
    def failed(record: ConnectionRecord) -> None:
        """A bug: it ends this connection alone, and is logged once with its traceback."""
        record.finish(Outcome.ERROR, "handler")
        log.exception("unexpected error serving %s; closing that connection", record.peer)

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
            if record not in self._open:
                return  # closed already
            record.finish(outcome)
            self._cut_off(self._open[record])

    def cut_off_all(self, outcome: Outcome) -> int:
        """Cut off every open connection (a drain's end); how many there were."""
        with self._lock:
            records = list(self._open)
        for record in records:
            self.cut_off(record, outcome)
        return len(records)

    @property
    def count(self) -> int:
        """Connections admitted and not yet reported closed: a drain waits for none."""
        return self._unreported

    def handles(self) -> list[Handle]:
        """The open connections' handles, as they are now."""
        with self._lock:
            return list(self._open.values())
