"""Run a server: pick the model, route stop signals to it, serve until stopped.

    from echoplex import ServerConfig, run
    run(ServerConfig(mode="asyncio", port=0))   # logs "listening on 127.0.0.1:PORT"

Pass your own `ServerEvents` to be told when it listens and of every connection,
and your own `Shutdown` to stop it from another thread.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable, Iterator

from ._version import __version__
from .config import ServerConfig
from .events import BuildInfo, LogEvents, ServerEvents
from .models import MODELS
from .plan import Model, ServerPlan, load_model, resolve
from .shutdown import Shutdown, stop_on_signals


def run(
    config: ServerConfig,
    events: ServerEvents | None = None,
    shutdown: Shutdown | None = None,
    *,
    model: Model | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (in the main thread) or `shutdown.request()`, then drain.

    TCP through `config.mode` (or a `model` of your own: `echoplex.plan.Model`), UDP echo
    (`config.udp`) alone or beside it (`echoplex.udp`).

    Raises `StartupError` when the server cannot start (busy port, missing uvloop).
    """
    name = config.mode if model is None else model_name(model)
    model = model or load_model(config.mode)
    raise_descriptor_limit()
    own_shutdown = shutdown is None
    shutdown = shutdown or Shutdown()
    events = events or LogEvents()
    stop_metrics: Callable[[], None] = lambda: None  # noqa: E731
    if config.metrics_port is not None:
        from .metrics import metrics_events  # prometheus-client and http.server: only if asked

        events, stop_metrics = metrics_events(config, events, name)
    try:
        with (
            stop_on_signals(shutdown),
            resolve(config, model) as plan,
            controlled(plan, events) as events,
            announced(plan, name, events),
        ):
            if not config.udp:
                model.serve(plan, events, shutdown)
                return
            from . import udp  # only when asked for: it imports asyncio

            if not config.tcp:
                udp.serve_udp(plan, events, shutdown)
            else:
                # UDP in a thread of its own beside the model (in `workers` mode, beside the
                # supervisor: the workers serve TCP only).
                with udp.serving_beside_tcp(plan, events, shutdown):
                    model.serve(plan, events, shutdown)
    finally:
        stop_metrics()
        if own_shutdown:
            shutdown.close()


@contextlib.contextmanager
def controlled(plan: ServerPlan, events: ServerEvents) -> Iterator[ServerEvents]:
    """The events to serve with, and the control API while serving if the config asks
    for it (`echoplex.control`: it needs the plan's live conditions)."""
    if plan.config.control_port is None:
        yield events
        return
    from .control import serving  # json, hmac and the HTTP machinery: only if asked

    with serving(plan, events) as controlled_events:
        yield controlled_events


def model_name(model: Model) -> str:
    """A model's name: its registry name, or for a model of one's own its own name
    (never the config's mode, which did not choose it)."""
    module = getattr(model, "__name__", None)
    registered = [name for name, entry in MODELS.items() if entry.module == module]
    return registered[0] if registered else module or type(model).__name__


@contextlib.contextmanager
def announced(plan: ServerPlan, model: str, events: ServerEvents) -> Iterator[None]:
    """Report `starting` now and, if the block ends without an exception, `stopped`, to
    events that have these hooks (`echoplex.events.RunEvents`)."""
    starting: Callable[[BuildInfo], None] | None = getattr(events, "starting", None)
    if starting is not None:
        # A loop factory is `uvloop.new_event_loop` or `asyncio.new_event_loop`.
        loop = "none" if plan.loop is None else plan.loop.__module__.partition(".")[0]
        starting(BuildInfo(__version__, model, loop))
    yield
    stopped: Callable[[], None] | None = getattr(events, "stopped", None)
    if stopped is not None:
        stopped()


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard limit: every connection is a
    descriptor, and the usual soft limit of 1024 is far below what a server needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
