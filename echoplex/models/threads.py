"""`threads`: a thread per connection, the tutorial's second server.

Threads get a small stack (they only run the echo loop), so thousands of
connections cost little memory; `max_connections` caps how many there can be. Where
the system runs out of threads first (its thread or memory limits), the connection it
could not start one for is closed at once as `rejected:no thread`, and the server
serves on.
"""

from __future__ import annotations

import socket
import threading

from ..events import ConnectionRecord, ServerEvents
from ..outcomes import Outcome
from ..plan import ServerPlan
from ..shutdown import Shutdown
from ._blocking import BlockingServer, small_thread_stacks

NO_THREAD = "no thread"


def serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    server = BlockingServer(plan, events, shutdown)

    def start_thread(conn: socket.socket, record: ConnectionRecord) -> None:
        try:
            threading.Thread(target=server.serve, args=(conn, record), daemon=True).start()
        except RuntimeError:  # "can't start new thread": a limit of the system's, not ours
            record.finish(Outcome.REJECTED, NO_THREAD)
            server.connections.closed(record, conn.close)

    with small_thread_stacks():
        server.serve_handing_off(start_thread)
