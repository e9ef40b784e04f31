"""`simple`: one client at a time, the tutorial's first server.

The next client waits in the listen backlog until the current one disconnects;
that wait is the lesson. To notice a stop request (and its own time limits)
while a client is connected, each read first waits on both the connection and
the shutdown wakeup.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import time

from ..events import ServerEvents
from ..limits import Deadlines
from ..outcomes import Outcome
from ..plan import ServerPlan
from ..shutdown import Shutdown
from ._blocking import BlockingServer


def serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    server = BlockingServer(plan, events, shutdown)
    listeners = plan.listeners
    stopped_listening = False

    def stop_listening() -> None:
        nonlocal stopped_listening
        if not stopped_listening:
            stopped_listening = True
            listeners.close()  # new connects are refused from now on
            events.stopping()

    def read_gate(conn: socket.socket, deadlines: Deadlines) -> Outcome | None:
        """Wait until the client sends something: None, or why to stop instead."""
        if isinstance(conn, ssl.SSLSocket) and conn.pending():
            return None  # already decrypted, waiting in the TLS layer
        while True:
            if shutdown.requested:
                stop_listening()
            limit = deadlines.for_read()
            timeout_s = math.inf if limit.timeout_s is None else limit.timeout_s
            outcome = limit.outcome
            drain_left_s = shutdown.drain_deadline(plan.drain_timeout_s) - time.monotonic()
            if drain_left_s <= 0:
                return Outcome.DRAINED
            if drain_left_s <= timeout_s:
                timeout_s, outcome = max(0.0, drain_left_s), Outcome.DRAINED
            readable, _, _ = select.select(
                [conn.fileno(), shutdown.fileno()],
                [],
                [],
                None if timeout_s == math.inf else timeout_s,
            )
            if conn.fileno() in readable:
                return None
            if not readable:
                return outcome  # timed out
            # A stop request woke us (or another signal's wakeup byte): look again.
            shutdown.clear_wakeup()

    try:
        events.listening(listeners.addresses)
        for conn, record in server.accept(listeners):
            server.serve(conn, record, read_gate)
    finally:
        stop_listening()
