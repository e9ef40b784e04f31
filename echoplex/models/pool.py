"""`pool`: a fixed pool of `config.threads` worker threads.

Connections are accepted at once and queued; each waits its turn until a worker
is free. Unlike `threads`, the thread count stays bounded however many clients come.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

from .._net import open_listener
from ..config import ServerConfig
from ..events import ConnectionRecord, ServerEvents
from ..shutdown import Shutdown
from ._blocking import OpenConnections, accept_connections, drain, serve_connection


def serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
    open_connections = OpenConnections()

    def handle(conn: socket.socket, record: ConnectionRecord) -> None:
        try:
            serve_connection(conn, record, config, events)
        finally:
            open_connections.discard(conn)

    with ThreadPoolExecutor(config.threads, thread_name_prefix="echo-pool") as pool:
        with open_listener(config) as listener:
            events.listening([listener.getsockname()])
            for conn, peer in accept_connections(listener, shutdown):
                record = ConnectionRecord(peer)
                # Registered while still queued, so a drain cuts off waiting clients too.
                open_connections.add(conn, record)
                pool.submit(handle, conn, record)
        events.stopping()
        drain(open_connections, config, shutdown)
    # Leaving the pool waits for the workers; every socket they hold is shut down by now.
