"""The concurrency models, by name. Each is one module exposing the same function:

    serve(config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None

It binds its listener(s), calls `events.listening(...)` once it accepts, echoes
until `shutdown` is requested, drains for `config.drain_timeout_s`, and returns.
Modules are imported only when chosen, so optional dependencies stay optional.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..events import ServerEvents
    from ..shutdown import Shutdown

MODELS: dict[str, str] = {
    "simple": "echoplex.models.simple",
    "threads": "echoplex.models.threads",
    "pool": "echoplex.models.pool",
    "asyncio": "echoplex.models.asyncio_",
    "workers": "echoplex.models.workers",
}

DESCRIPTIONS: dict[str, str] = {
    "simple": "one client at a time (the tutorial's first server)",
    "threads": "a thread per connection (the tutorial's second server)",
    "pool": "a fixed pool of worker threads serves every connection that is ready",
    "asyncio": "one event loop (uvloop when installed)",
    "workers": "one asyncio process per CPU on SO_REUSEPORT listeners, supervised",
}


class Model(Protocol):
    def serve(self, config: ServerConfig, events: ServerEvents, shutdown: Shutdown) -> None: ...


def load_model(name: str) -> Model:
    try:
        module_name = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (choose from {', '.join(MODELS)})") from None
    module: Model = importlib.import_module(module_name)
    return module
