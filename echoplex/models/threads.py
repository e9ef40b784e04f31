"""`threads`: a thread per connection, the tutorial's second server.

Threads get a small stack (they only run the echo loop), so thousands of
connections cost little memory; `max_connections` caps how many there can be.
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

    def start_thread(conn: socket.socket, record: ConnectionRecord) -> None:
        threading.Thread(target=server.serve, args=(conn, record), daemon=True).start()

    with small_thread_stacks():
        server.serve_handing_off(start_thread)
