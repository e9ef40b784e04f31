"""The conformance kit (`echoplex.testing`) against every model, and against broken ones."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable

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
            check_model("threads")
        except BaseException as exc:
            errors.append(exc)

    caplog.set_level(logging.INFO, logger="echoplex.testing")
    thread = threading.Thread(target=check)
    thread.start()
    thread.join(50)
    assert not thread.is_alive()
    assert not errors, errors
    assert "stopping threads with Shutdown.request(), not SIGTERM" in caplog.text


class BrokenModel:
    """A thread per connection whose echo `damage` spoils: the kit must notice."""

    def __init__(self, name: str, damage: Callable[[bytes, bool], bytes]) -> None:
        self.__name__ = name
        self.damage = damage  # (chunk, first chunk?) -> what is sent back

    def serve(self, plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
        threads: list[threading.Thread] = []
        with plan.listeners as listeners:
            (listener,) = listeners
            events.listening(listeners.addresses)
            while not shutdown.requested:
                ready, _, _ = select.select([listener.fileno(), shutdown.fileno()], [], [])
                if listener.fileno() in ready:
                    conn, _ = listener.accept()
                    thread = threading.Thread(target=self.echo, args=(conn,))
                    thread.start()
                    threads.append(thread)
            events.stopping()
        for thread in threads:
            thread.join(10)

    def echo(self, conn: socket.socket) -> None:
        # Reports no connection: the kit's first check, of the echoed bytes, fails first.
        first = True
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            while chunk := conn.recv(65536):
                conn.sendall(self.damage(chunk, first))
                first = False


def corrupt_first_byte(chunk: bytes, first: bool) -> bytes:
    return bytes([chunk[0] ^ 1]) + chunk[1:] if first else chunk


def drop_the_last_byte_of_each_chunk(chunk: bytes, first: bool) -> bytes:
    return chunk[:-1]


@pytest.mark.parametrize("damage", [corrupt_first_byte, drop_the_last_byte_of_each_chunk])
def test_the_kit_catches_a_broken_echo(damage: Callable[[bytes, bool], bytes]) -> None:
    with pytest.raises(AssertionError, match=r"^broken: streams: client \d+ "):
        check_model(BrokenModel("broken", damage))


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
