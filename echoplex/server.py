"""Run a server: pick the model, route stop signals to it, serve until stopped.

    from echoplex import ServerConfig, run
    run(ServerConfig(mode="asyncio", port=0))   # logs "listening on 127.0.0.1:PORT"

Pass your own `ServerEvents` to be told when it listens and of every connection,
and your own `Shutdown` to stop it from another thread.
"""

from __future__ import annotations

from .config import ServerConfig
from .events import LogEvents, ServerEvents
from .models import load_model
from .shutdown import Shutdown, stop_on_signals


def run(
    config: ServerConfig,
    events: ServerEvents | None = None,
    shutdown: Shutdown | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (in the main thread) or `shutdown.request()`, then drain.

    Raises `StartupError` when the server cannot start (busy port, missing uvloop).
    """
    model = load_model(config.mode)
    own_shutdown = shutdown is None
    shutdown = shutdown or Shutdown()
    try:
        with stop_on_signals(shutdown):
            model.serve(config, events or LogEvents(), shutdown)
    finally:
        if own_shutdown:
            shutdown.close()
