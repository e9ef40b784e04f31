"""`pool`: a fixed pool of `config.threads` worker threads.

Connections are accepted at once and queued; each waits its turn until a worker
is free. Unlike `threads`, the thread count stays bounded however many clients come
(and `max_connections` bounds the queue).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..config import ServerConfig
from ..events import ServerEvents
from ..shutdown import Shutdown
from ._blocking import BlockingServer


def serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
    server = BlockingServer(config, events, shutdown)
    # Leaving the pool waits for its workers; by then every socket they hold has been
    # closed by its client or shut down by the drain.
    with ThreadPoolExecutor(config.threads, thread_name_prefix="echo-pool") as pool:
        server.serve_handing_off(pool.submit)
