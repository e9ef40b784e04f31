"""The concurrency models, by name: the registry `echoplex serve --mode` chooses from.

Each model is one module exposing the same function (`echoplex.plan.Model`):

    serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None

It serves the plan's listeners, calls `events.listening(...)` once it accepts, echoes
until `shutdown` is requested, drains for `plan.drain_timeout_s`, and returns. A new
model is one module here plus one line below; `echoplex.testing.check_model` checks it.
Modules are imported only when chosen, so optional dependencies stay optional, and this
registry imports nothing, so any layer may read it.
"""

from __future__ import annotations

from typing import NamedTuple


class ModelEntry(NamedTuple):
    module: str
    description: str


MODELS: dict[str, ModelEntry] = {
    "simple": ModelEntry(
        "echoplex.models.simple", "one client at a time (the tutorial's first server)"
    ),
    "threads": ModelEntry(
        "echoplex.models.threads", "a thread per connection (the tutorial's second server)"
    ),
    "pool": ModelEntry(
        "echoplex.models.pool",
        "a fixed pool of worker threads serves every connection that is ready",
    ),
    "asyncio": ModelEntry("echoplex.models.asyncio_", "one event loop (uvloop when installed)"),
    "workers": ModelEntry(
        "echoplex.models.workers",
        "one asyncio process per CPU on SO_REUSEPORT listeners, supervised",
    ),
}
