"""UDP echo under conditions on purpose (`--latency`, `--jitter`, `--drop`), on real
sockets: what a client sees, and the server's counts by reason. No test times an
answer: a delay is shown by an answer that waits (held, then counted) or never comes
while the server runs, and the counts say why each datagram went unanswered."""

from __future__ import annotations

import contextlib
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from echoplex import ServerConfig, Shutdown
from echoplex.conditions import Conditions
from echoplex.events import QuietEvents
from echoplex.plan import ServerPlan, load_model, resolve
from echoplex.udp import DROP, HELD, STOPPED, Tally, UdpEchoServer

from .procs import Process, Server, echoplex
from .test_control import call
from .test_metrics import scrape, total
from .test_udp import DROPPED, final_counts, udp_socket
from .waiting import wait_for

WAIT_S = 10.0
UDP_LISTENING = re.compile(r"listening on udp (\S+):(\d+)")


class Heard(QuietEvents):
    """The UDP hooks, with the live tally the server hands to metrics."""

    def __init__(self) -> None:
        self.tally: Tally | None = None
        self.stopped: tuple[int, dict[str, int]] | None = None

    def udp_listening(self, addresses: list[Any]) -> None:
        pass

    def udp_dropped(self, counts: dict[str, int], last_source: Any) -> None:
        pass

    def udp_stopped(self, answered: int, dropped: dict[str, int]) -> None:
        self.stopped = (answered, dropped)

    def udp_watch(self, tally: Tally) -> None:
        self.tally = tally


@dataclass
class Running:
    """A UDP echo served in a thread, with its plan (to change the conditions live)."""

    plan: ServerPlan
    server: UdpEchoServer
    events: Heard
    address: tuple[str, int]
    sent: int = 0
    replies: list[bytes] = field(default_factory=list)

    @property
    def tally(self) -> Tally:
        assert self.events.tally is not None
        return self.events.tally

    def counted(self) -> int:
        """Datagrams the server has decided on: answered, dropped, or held."""
        assert self.server.held is not None
        return self.tally.answered + sum(self.tally.dropped.values()) + len(self.server.held)

    def send(self, sock: socket.socket, payload: bytes) -> None:
        """Send one datagram and wait until the server has decided on it."""
        sock.sendto(payload, self.address)
        self.sent += 1
        wait_for(lambda: self.counted() == self.sent, WAIT_S, f"datagram {self.sent} counted")

    def read_replies(self, sock: socket.socket) -> list[bytes]:
        """Every reply the server has sent so far (each one counted as answered)."""

        def all_in() -> bool:
            while (reply := received_now(sock)) is not None:
                self.replies.append(reply)
            return len(self.replies) == self.tally.answered

        wait_for(all_in, WAIT_S, lambda: f"{self.tally.answered} replies, {len(self.replies)} in")
        return self.replies


@contextlib.contextmanager
def serving(**settings: Any) -> Iterator[Running]:
    held_bounds = {
        name: settings.pop(name)
        for name in ("max_held_answers", "max_held_bytes")
        if name in settings
    }
    config = ServerConfig(port=0, udp=True, **settings)
    events, shutdown = Heard(), Shutdown()
    with resolve(config, load_model(config.mode)) as plan:
        server = UdpEchoServer(plan, events, shutdown, **held_bounds)
        thread = threading.Thread(target=server.serve)
        thread.start()
        try:
            assert server.ready.wait(WAIT_S) and server.error is None
            host, port = plan.udp_sockets[0].getsockname()[:2]
            yield Running(plan, server, events, (host, port))
        finally:
            server.stop()
            thread.join(WAIT_S)
            shutdown.close()
        assert not thread.is_alive()


def received_now(sock: socket.socket) -> bytes | None:
    """A datagram already in the socket's queue, or None: without waiting (a socket with
    a timeout waits for one even with MSG_DONTWAIT, so the timeout is set aside)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(70_000)
    except BlockingIOError:
        return None
    finally:
        sock.settimeout(timeout)


def nothing_waiting(sock: socket.socket) -> bool:
    return received_now(sock) is None


@pytest.mark.parametrize("loop", ["auto", "asyncio"])  # uvloop where installed, and asyncio's
def test_a_delayed_answer_comes_once_and_empty_ones_too(loop: str) -> None:
    with serving(latency_s=0.1, loop=loop) as running, udp_socket() as sock:
        for payload in (b"later", b""):
            sock.sendto(payload, running.address)
            assert sock.recv(100) == payload
        wait_for(lambda: running.tally.answered == 2, WAIT_S, "both answers counted")
        assert nothing_waiting(sock)
    assert running.events.stopped == (2, {})


def test_an_answer_due_in_an_hour_is_held_then_dropped_on_stop() -> None:
    with serving() as plain, udp_socket() as sock:
        plain.send(sock, b"now")  # the same exchange, without latency, is answered
        assert plain.read_replies(sock) == [b"now"]
    with serving(latency_s=3600) as running, udp_socket() as sock:
        running.send(sock, b"in an hour")
        assert running.server.held is not None
        assert (len(running.server.held), running.tally.answered) == (1, 0)
        assert nothing_waiting(sock)
    assert running.events.stopped == (0, {STOPPED: 1})


def test_jittered_answers_each_come_once() -> None:
    payloads = [b"j%d" % index for index in range(20)]
    with serving(latency_s=0.05, jitter_s=0.05, udp_rate_per_source=0) as running:
        with udp_socket() as sock:
            for payload in payloads:
                sock.sendto(payload, running.address)
            replies = [sock.recv(100) for _ in payloads]  # in any order, as UDP may
            assert sorted(replies) == sorted(payloads)
            assert nothing_waiting(sock)
    assert running.events.stopped == (20, {})


def answered_of(seed: int, count: int) -> list[bytes]:
    with serving(drop=0.5, condition_seed=seed, udp_rate_per_source=0) as running:
        with udp_socket() as sock:
            for index in range(count):
                running.send(sock, b"d%d" % index)
            replies = running.read_replies(sock)
    assert running.events.stopped == (len(replies), {DROP: count - len(replies)})
    return replies


def test_half_dropped_by_a_seed_and_the_same_half_again() -> None:
    replies = answered_of(seed=1, count=200)
    assert 0 < len(replies) < 200
    assert len(set(replies)) == len(replies)  # each answered once
    assert answered_of(seed=1, count=200) == replies  # the seed repeats the run


def test_the_guard_decides_before_the_delay() -> None:
    # --udp-rate 1 allows a burst of 2: the others are refused, not held.
    with serving(latency_s=3600, udp_rate_per_source=1) as running, udp_socket() as sock:
        for index in range(5):
            running.send(sock, b"r%d" % index)
        assert running.server.held is not None and len(running.server.held) == 2
        assert running.tally.dropped == {"rate-source": 3}
    assert running.events.stopped == (0, {"rate-source": 3, STOPPED: 2})


@pytest.mark.parametrize(
    ("bounds", "payload", "held"),
    [({"max_held_answers": 3}, b"x", 3), ({"max_held_bytes": 100}, b"x" * 40, 2)],
)
def test_what_waits_is_bounded(bounds: dict[str, int], payload: bytes, held: int) -> None:
    settings: dict[str, Any] = {"latency_s": 3600, "udp_rate_per_source": 0, **bounds}
    with serving(**settings) as running, udp_socket() as sock:
        for _ in range(5):
            running.send(sock, payload)
        assert running.server.held is not None and len(running.server.held) == held
        assert running.tally.dropped == {HELD: 5 - held}
    assert running.events.stopped == (0, {HELD: 5 - held, STOPPED: held})


def test_a_live_change_reaches_the_next_datagram() -> None:
    with serving() as running, udp_socket() as sock:
        running.send(sock, b"before")
        running.plan.conditions.set(Conditions(drop=1.0))
        running.send(sock, b"dropped")
        running.plan.conditions.set(Conditions())
        running.send(sock, b"after")
        assert running.read_replies(sock) == [b"before", b"after"]
    assert running.events.stopped == (2, {DROP: 1})


def test_drop_1_answers_nothing_and_the_log_and_metrics_say_why() -> None:
    args = ("--udp", "--tcp", "--drop", "1", "--metrics-port", "0")
    with Server(*args, mode="asyncio") as server, udp_socket() as sock:
        for index in range(5):
            sock.sendto(b"d%d" % index, server.address)

        def dropped() -> float:
            return total(scrape(server), "echoplex_udp_datagrams_dropped_total", reason=DROP)

        wait_for(lambda: dropped() == 5, WAIT_S, "5 drops counted")
        assert total(scrape(server), "echoplex_udp_datagrams_answered_total") == 0
        assert nothing_waiting(sock)
        match = server.wait_for_stderr(DROPPED)
        assert match.group(3) == f"{DROP} {match.group(2)}"  # the one reason
        assert server.stop() == 0
    assert final_counts(server) == {"answered": 0, "dropped": 5, "by_reason": {DROP: 5}}


# A condition the server's transports would not serve is refused, not accepted to
# change nothing: on the command line (one line, exit 2) and through the control API
# (a 400 with the reason, the set in force unchanged). One rule: `check_served`.


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--udp", "--close-after", "3"], "--close-after changes TCP echo only"),
        (["--udp", "--bandwidth", "1KiB"], "--bandwidth changes TCP echo only"),
        (["--udp", "--work", "io:1s"], "--work changes TCP echo only"),
        (["--udp", "--latency", "1s", "--slow-close", "1s"], "--slow-close changes TCP"),
        (["--drop", "0.5"], "--drop is a share of UDP datagrams: it needs --udp"),
    ],
)
def test_a_condition_not_served_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = echoplex("serve", "--port", "0", *args, timeout_s=30)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


class UdpAloneServer(Server):
    """`echoplex serve --udp ...`: no TCP listener, ready once its UDP socket is."""

    def __init__(self, *args: str) -> None:
        Process.__init__(self, [sys.executable, "-m", "echoplex", "serve", "--port", "0", *args])
        match = self.wait_for_stderr(UDP_LISTENING)
        self.host, self.port = match.group(1), int(match.group(2))
        self.address = (self.host, self.port)


def test_the_control_api_of_a_udp_server_refuses_tcp_only_conditions() -> None:
    with UdpAloneServer("--udp", "--control-port", "0", "--latency", "1s") as server:
        status, answer = call(server, "PATCH", {"close_after": 3})
        assert status == 400
        assert answer["error"].startswith("`close_after` changes TCP echo only")
        assert call(server, "PUT", {"work": "io:1s"})[0] == 400
        assert call(server, "GET") == (200, {"latency": "1s"})  # unchanged
        assert call(server, "PUT", {"drop": 0.5}) == (200, {"drop": 0.5})
        assert server.stop() == 0


def test_the_control_api_of_a_tcp_server_refuses_drop() -> None:
    with Server("--control-port", "0", "--latency", "1s") as server:
        status, answer = call(server, "PATCH", {"drop": 0.5})
        assert status == 400
        assert answer["error"].startswith("`drop` is a share of UDP datagrams")
        assert call(server, "GET") == (200, {"latency": "1s"})  # unchanged
        assert call(server, "PUT", {"close_after": 3}) == (200, {"close_after": 3})
        assert server.stop() == 0
