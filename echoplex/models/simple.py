"""`simple`: one client at a time, the tutorial's first server.

The next client waits in the listen backlog until the current one disconnects;
that wait is the lesson. To notice a stop request while a client is connected,
each read first waits on both the connection and the shutdown wakeup.
"""

from __future__ import annotations

import math
import select
import socket
import time
from functools import partial

from .._net import open_listener
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..shutdown import Shutdown
from ._blocking import accept_connections, serve_connection


def serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
    listener = open_listener(config)
    stopped_listening = False

    def stop_listening() -> None:
        nonlocal stopped_listening
        if not stopped_listening:
            stopped_listening = True
            listener.close()  # new connects are refused from now on
            events.stopping()

    def readable_before_deadline(conn: socket.socket) -> bool:
        while True:
            if shutdown.requested:
                stop_listening()
                shutdown.clear_wakeup()
            deadline = shutdown.drain_deadline(config.drain_timeout_s)
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([conn.fileno(), shutdown.fileno()], [], [], timeout)
            if conn.fileno() in readable:
                return True
            if time.monotonic() >= deadline:
                return False

    try:
        events.listening([listener.getsockname()])
        for conn, peer in accept_connections(listener, shutdown):
            serve_connection(
                conn,
                ConnectionRecord(peer),
                config,
                events,
                partial(readable_before_deadline, conn),
            )
    finally:
        stop_listening()
