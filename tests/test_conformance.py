"""The conformance kit (`echoplex.testing`) against every model; against broken models in
`tests/test_kit_catches.py`."""

from __future__ import annotations

import logging
import threading

import pytest

from echoplex import MODELS, ServerConfig, run
from echoplex.events import BuildInfo, QuietEvents, ServerEvents
from echoplex.plan import ServerPlan, load_model
from echoplex.shutdown import Shutdown
from echoplex.testing import check_model

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_keeps_the_contract(model: str) -> None:
    check_model(model)


def test_off_the_main_thread_the_kit_stops_the_server_by_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[BaseException] = []

    def check() -> None:
        try:
            check_model("threads", checks=["streams", "drain"])
        except BaseException as exc:
            errors.append(exc)

    caplog.set_level(logging.INFO, logger="echoplex.testing")
    thread = threading.Thread(target=check)
    thread.start()
    thread.join(50)
    assert not thread.is_alive()
    assert not errors, errors
    assert "stopping threads with Shutdown.request(), not SIGTERM" in caplog.text


class Announced(QuietEvents):
    def __init__(self) -> None:
        self.builds: list[BuildInfo] = []

    def starting(self, build: BuildInfo) -> None:
        self.builds.append(build)


class ServesNothing:
    """A model of one's own that stops as soon as it listens."""

    __name__ = "mine"

    def serve(self, plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
        with plan.listeners as listeners:
            events.listening(listeners.addresses)


@pytest.mark.timeout(30)
def test_a_model_of_ones_own_is_announced_under_its_own_name() -> None:
    config = ServerConfig(mode="threads", hosts=("127.0.0.1",), port=0)
    events = Announced()
    run(config, events, model=ServesNothing())
    stopped = Shutdown()
    stopped.request()  # it starts, announces itself, and stops at once
    try:
        run(config, events, stopped, model=load_model("pool"))  # registered, given as itself
    finally:
        stopped.close()
    assert [build.model for build in events.builds] == ["mine", "pool"]
