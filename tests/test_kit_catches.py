"""The conformance kit (`echoplex.testing`) fails against models that break the contract.

Each broken model is a real one (`threads`) serving a plan altered to skip one promise
(a deadline, a limit, the trust rule), or a model of its own that spoils the echo or
holds what a client sends without bound. Each
test runs only the checks it needs (`checks=`), with a short `timeout_s`, so that a
deadline the model never keeps fails in about a second; the same checks pass against
the unaltered model, so each failure is the alteration's.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from echoplex.conditions import Conditions, LiveConditions
from echoplex.events import ServerEvents
from echoplex.limits import Admission
from echoplex.models import threads
from echoplex.plan import ServerPlan
from echoplex.proxy_protocol import parse_networks
from echoplex.shutdown import Shutdown
from echoplex.testing import CHECKS, LATENCY_S, check_model

pytestmark = pytest.mark.timeout(30)

FAIL_FAST_S = 1.0  # timeout_s: how long past a limit the kit waits before it fails


class Altered:
    """`threads`, serving its plan as `alter` changes it."""

    def __init__(self, name: str, alter: Callable[[ServerPlan], ServerPlan]) -> None:
        self.__name__ = name
        self.alter = alter

    def serve(self, plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
        threads.serve(self.alter(plan), events, shutdown)


FOREVER_S = 1e6

SKIPPED = [
    pytest.param(
        lambda plan: replace(plan, tls_handshake_s=FOREVER_S),
        "tls-handshake-timeout",
        "the silent TLS client was not cut off",
        id="no-tls-handshake-deadline",
    ),
    pytest.param(
        lambda plan: replace(plan, proxy_header_s=FOREVER_S),
        "proxy-header-timeout",
        "the silent trusted proxy was not cut off",
        id="no-proxy-header-deadline",
    ),
    pytest.param(
        lambda plan: replace(plan, limits=replace(plan.limits, lifetime_s=None)),
        "max-lifetime",
        "a busy client was not cut off",
        id="no-lifetime",
    ),
    pytest.param(
        lambda plan: replace(plan, trusted_proxies=parse_networks(["0.0.0.0/0"])),
        "proxy-untrusted",
        "an untrusted client sending PROXY headers sent",
        id="trusts-every-peer",
    ),
    pytest.param(
        lambda plan: replace(plan, trusted_proxies=[]),
        "proxy-v1",
        "the v1 client sent",
        id="trusts-no-proxy",
    ),
    pytest.param(
        lambda plan: replace(plan, conditions=LiveConditions(Conditions())),
        "latency",
        "an echo came back before the server had read the messages sent after it",
        id="no-latency",
    ),
    pytest.param(
        lambda plan: replace(plan, conditions=LiveConditions(Conditions())),
        "close-after",
        "timed out",
        id="no-close-after",
    ),
    pytest.param(
        lambda plan: replace(plan, conditions=LiveConditions(Conditions())),
        "stall",
        "the stalled client sent 100 bytes and got 300 back",
        id="no-stall",
    ),
    pytest.param(
        lambda plan: replace(plan, admission=Admission(plan.config.max_connections, 0)),
        "max-per-ip",
        "the second client of one address was served",
        id="no-per-ip-limit",
    ),
]


@pytest.mark.parametrize(("alter", "check", "message"), SKIPPED)
def test_the_kit_catches_a_model_that_skips_a_promise(
    alter: Callable[[ServerPlan], ServerPlan], check: str, message: str
) -> None:
    with pytest.raises(AssertionError, match=rf"^skips: {check}: {message}"):
        check_model(Altered("skips", alter), checks=[check], timeout_s=FAIL_FAST_S)


@pytest.mark.parametrize("check", sorted({str(param.values[1]) for param in SKIPPED}))
def test_the_same_checks_pass_against_the_model_as_it_is(check: str) -> None:
    check_model(Altered("as-it-is", lambda plan: plan), checks=[check], timeout_s=FAIL_FAST_S)


class BrokenModel:
    """A thread per connection whose echo `damage` spoils: the kit must notice."""

    def __init__(self, name: str, damage: Callable[[bytes, bool], bytes]) -> None:
        self.__name__ = name
        self.damage = damage  # (chunk, first chunk?) -> what is sent back

    def serve(self, plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
        workers: list[threading.Thread] = []
        with plan.listeners as listeners:
            (listener,) = listeners
            events.listening(listeners.addresses)
            while not shutdown.requested:
                ready, _, _ = select.select([listener.fileno(), shutdown.fileno()], [], [])
                if listener.fileno() in ready:
                    conn, _ = listener.accept()
                    worker = threading.Thread(target=self.echo, args=(conn,))
                    worker.start()
                    workers.append(worker)
            events.stopping()
        for worker in workers:
            worker.join(10)

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


def stall_per_chunk(chunk: bytes, first: bool) -> bytes:
    time.sleep(LATENCY_S)  # the latency as a stall: nothing is read meanwhile
    return chunk


def test_the_kit_catches_a_latency_that_stalls_the_reading() -> None:
    with pytest.raises(AssertionError, match=r"^stalls: latency: an echo came back before"):
        check_model(BrokenModel("stalls", stall_per_chunk), checks=["latency"], timeout_s=5)


class Hoarder(BrokenModel):
    """Reads all that a client sends, and echoes it from a second thread: it holds
    whatever the client does not take, without bound."""

    def __init__(self) -> None:
        super().__init__("hoarder", lambda chunk, first: chunk)

    def echo(self, conn: socket.socket) -> None:
        backlog: queue.SimpleQueue[bytes] = queue.SimpleQueue()

        def write_back() -> None:
            with contextlib.suppress(OSError):
                while chunk := backlog.get():
                    conn.sendall(chunk)

        writer = threading.Thread(target=write_back)
        writer.start()
        with conn:
            with contextlib.suppress(OSError):
                conn.settimeout(10)
                while chunk := conn.recv(65536):
                    backlog.put(chunk)
            backlog.put(b"")
            writer.join(10)


def test_the_kit_catches_a_model_that_buffers_without_bound() -> None:
    with pytest.raises(AssertionError, match=r"^hoarder: max-buffer: the server took \d+ bytes"):
        check_model(Hoarder(), checks=["max-buffer"], timeout_s=FAIL_FAST_S)


def test_without_trustme_the_tls_checks_fail_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "trustme", None)  # import trustme: ImportError
    with pytest.raises(RuntimeError, match=r"TLS checks need trustme .*pip install trustme"):
        check_model("threads", checks=["streams", "tls-echo"])


def test_an_unknown_check_is_a_value_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown checks \['tls'\] \(choose from streams, "):
        check_model("threads", checks=["streams", "tls"])
    with pytest.raises(ValueError, match="a collection of names, not one name"):
        check_model("threads", checks="streams")
    assert len(set(CHECKS)) == len(CHECKS) == 30
