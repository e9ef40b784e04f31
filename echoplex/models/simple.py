"""`simple`: one client at a time, the tutorial's first server.

The next client waits in the listen backlog until the current one disconnects; that
wait is the lesson. The one client is served on a thread of its own while the main
thread waits for it to be closed, or for a stop request: so a stop, a deadline or the
drain's end reaches a client that sends nothing the same way as in `threads` (the
lifecycle cuts it off), and nothing here waits on a client.
"""

from __future__ import annotations

import socket
import threading

from ..events import ConnectionRecord, ServerEvents
from ..plan import ServerPlan
from ..shutdown import Shutdown
from ._blocking import BlockingServer, small_thread_stacks


def serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    server = BlockingServer(plan, events, shutdown)
    connections = server.connections
    connections.on_change = shutdown.nudge  # its close wakes the wait below

    def serve_alone(conn: socket.socket, record: ConnectionRecord) -> None:
        """Serve this client, and accept no other until it is closed (or a stop comes)."""
        threading.Thread(target=server.serve, args=(conn, record), daemon=True).start()
        while connections.count and not shutdown.requested:
            shutdown.sleep(None)

    with small_thread_stacks():
        server.serve_handing_off(serve_alone)
