"""`threads`: a thread per connection, the tutorial's second server.

Threads get a small stack (they only run the echo loop), so thousands of
connections cost little address space.
"""

from __future__ import annotations

import socket
import threading

from .._net import open_listener
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..shutdown import Shutdown
from ._blocking import OpenConnections, accept_connections, drain, serve_connection

THREAD_STACK_BYTES = 256 * 1024


def serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
    open_connections = OpenConnections()

    def handle(conn: socket.socket, record: ConnectionRecord) -> None:
        try:
            serve_connection(conn, record, config, events)
        finally:
            open_connections.discard(conn)

    threading.stack_size(THREAD_STACK_BYTES)
    try:
        with open_listener(config) as listener:
            events.listening([listener.getsockname()])
            for conn, peer in accept_connections(listener, shutdown):
                record = ConnectionRecord(peer)
                open_connections.add(conn, record)
                threading.Thread(
                    target=handle, args=(conn, record), name=f"echo {peer}", daemon=True
                ).start()
    finally:
        threading.stack_size(0)
    events.stopping()
    drain(open_connections, config, shutdown)
