"""`threads`: a thread per connection, the tutorial's second server.

Threads get a small stack (they only run the echo loop), so thousands of
connections cost little memory; `max_connections` caps how many there can be.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..config import ServerConfig
from ..events import ServerEvents
from ..shutdown import Shutdown
from ._blocking import BlockingServer

THREAD_STACK_BYTES = 256 * 1024


def serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None:
    def start_thread(serve_one: Callable[[], None]) -> None:
        threading.Thread(target=serve_one, daemon=True).start()

    server = BlockingServer(config, events, shutdown)
    previous_stack_bytes = threading.stack_size(THREAD_STACK_BYTES)
    try:
        server.serve_handing_off(start_thread)
    finally:
        threading.stack_size(previous_stack_bytes)
