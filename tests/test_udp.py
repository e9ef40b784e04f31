"""UDP echo with real sockets on loopback: `echoplex serve --udp [--tcp]` and
`echoplex client --udp`. The guard's rules themselves are in test_udp_guard.py."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import random
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from echoplex import ServerConfig, Shutdown, run
from echoplex.events import QuietEvents

from .procs import LISTENING, Process, Server, echoplex, needs_ipv6
from .waiting import wait_for

UDP_LISTENING = re.compile(r"listening on udp (\S+):(\d+)")
STOPPED = re.compile(r"udp: stopped; answered (\d+) datagrams?, dropped (\d+)(?: \((.*)\))?")
DROPPED = re.compile(r"^(\S+ \S+) WARNING .*udp: dropped (\d+) datagrams? \((.*)\)", re.M)


class UdpServer(Process):
    """`python -m echoplex serve --udp --port 0 ...`, started and answering."""

    def __init__(self, *args: str) -> None:
        super().__init__([sys.executable, "-m", "echoplex", "serve", "--udp", "--port", "0", *args])
        match = self.wait_for_stderr(UDP_LISTENING)
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
        self.address = (self.host, self.port)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; check it exits 0 and return its final counts."""
        self.signal(signal.SIGTERM)
        assert self.wait() == 0, self.stderr
        return final_counts(self)


def final_counts(server: Process) -> dict[str, Any]:
    match = STOPPED.search(server.stderr)
    assert match, server.stderr
    reasons = dict(item.rsplit(" ", 1) for item in match.group(3).split(", ")) if match[3] else {}
    return {
        "answered": int(match[1]),
        "dropped": int(match[2]),
        "by_reason": {reason: int(count) for reason, count in reasons.items()},
    }


@contextlib.contextmanager
def udp_socket(
    family: socket.AddressFamily = socket.AF_INET, bind: tuple[str, int] | None = None
) -> Iterator[socket.socket]:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        if bind is not None:
            sock.bind(bind)
        yield sock


def echo(sock: socket.socket, address: tuple[str, int], payload: bytes) -> bytes:
    sock.sendto(payload, address)
    reply, source = sock.recvfrom(70_000)
    assert source[1] == address[1]
    return reply


@pytest.mark.parametrize(
    ("host", "largest"),
    [
        ("127.0.0.1", 65_507),
        pytest.param("::1", 65_527, marks=needs_ipv6),
    ],
)
@pytest.mark.parametrize("loop", ["auto", "asyncio"])  # uvloop where installed, and asyncio's
def test_each_datagram_is_echoed_exactly(host: str, largest: int, loop: str) -> None:
    rng = random.Random(862)
    sizes = [0, 1, 2, 255, 1472, 1473, 9000, 65_000, largest]
    payloads = [rng.randbytes(size) for size in sizes] + [bytes(range(256)), b"\x00" * 300]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with UdpServer("--host", host, "--loop", loop) as server, udp_socket(family) as sock:
        for payload in payloads:
            assert echo(sock, (host, server.port), payload) == payload  # the empty one too
        counts = server.stop()
    assert counts == {"answered": len(payloads), "dropped": 0, "by_reason": {}}


def test_the_udp_listening_line_is_not_taken_for_a_tcp_one() -> None:
    # Tests and the benchmark find the TCP port with LISTENING; a UDP line must not match.
    with UdpServer() as server:
        assert f"listening on udp 127.0.0.1:{server.port}" in server.stderr
        assert LISTENING.search(server.stderr) is None
        server.stop()


def test_a_flood_from_one_source_is_rate_limited_and_drops_logged_once_a_second() -> None:
    rate, burst = 20, 40
    sent = 0
    with UdpServer("--udp-rate", str(rate), "--udp-rate-total", "0") as server:
        with udp_socket() as sock:

            def reported_drops_three_times() -> bool:
                """40 more datagrams each time wait_for asks; true once the server has
                logged drops three times (a second apart: the flood goes on that long)."""
                nonlocal sent
                for _ in range(40):
                    sock.sendto(b"flood", server.address)
                    sent += 1
                return len(DROPPED.findall(server.stderr)) >= 3

            started = time.monotonic()
            wait_for(reported_drops_three_times, 20, lambda: f"three drop reports ({sent} sent)")
            counts = server.stop()
            elapsed_s = time.monotonic() - started
            replies = 0
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while sock.recv(100):
                    replies += 1
    assert replies <= counts["answered"] < sent
    # The guarantee, whatever the machine's speed: never more than the burst plus the rate.
    assert counts["answered"] <= burst + rate * elapsed_s
    assert counts["by_reason"]["rate-source"] > 0
    assert counts["answered"] + counts["dropped"] <= sent
    # Drop reports are a second apart at least (the last one comes with the stop).
    reports = [
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        for stamp, *_ in DROPPED.findall(server.stderr)
    ]
    assert reports, server.stderr
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(reports)]
    assert all(gap >= 0.99 for gap in gaps[:-1]), gaps
    assert sum(int(count) for _, count, _ in DROPPED.findall(server.stderr)) == counts["dropped"]


def test_the_total_rate_caps_all_sources_together() -> None:
    rate_total, burst_total = 10, 20
    with UdpServer("--udp-rate", "0", "--udp-rate-total", str(rate_total)) as server:
        started = time.monotonic()
        with udp_socket() as first, udp_socket() as second:
            for _ in range(30):
                first.sendto(b"a", server.address)
                second.sendto(b"b", server.address)
        server.wait_for_stderr(r"udp: dropped 1 datagram \(rate-total 1\)")
        counts = server.stop()
        elapsed_s = time.monotonic() - started
    assert counts["answered"] <= burst_total + rate_total * elapsed_s
    assert counts["by_reason"]["rate-total"] > 0
    assert counts["answered"] + counts["dropped"] <= 60


@pytest.mark.parametrize("reserved_port", [7, 19])
def test_datagrams_from_the_classic_service_ports_are_dropped(reserved_port: int) -> None:
    try:
        reserved = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            reserved.bind(("127.0.0.1", reserved_port))
        except OSError:
            reserved.close()
            raise
    except PermissionError:
        pytest.skip(f"binding port {reserved_port} needs root (or CAP_NET_BIND_SERVICE)")
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        pytest.skip(f"port {reserved_port} is in use here")
    with reserved, UdpServer() as server, udp_socket() as normal:
        # As a spoofed datagram "from" another echo or chargen service would: no answer,
        # or the two servers would answer each other for ever.
        reserved.sendto(b"loop?", server.address)
        server.wait_for_stderr(
            rf"udp: dropped 1 datagram \(reserved-port 1\), the last from "
            rf"127\.0\.0\.1:{reserved_port}"
        )
        assert echo(normal, server.address, b"still answering") == b"still answering"
        reserved.setblocking(False)
        with pytest.raises(BlockingIOError):
            reserved.recv(100)
        counts = server.stop()
    assert counts == {"answered": 1, "dropped": 1, "by_reason": {"reserved-port": 1}}


@pytest.mark.parametrize("mode", ["simple", "threads", "pool", "asyncio", "workers"])
def test_tcp_and_udp_on_the_same_port(mode: str) -> None:
    with Server("--udp", "--tcp", "--workers", "2", mode=mode) as server:
        udp_port = int(server.wait_for_stderr(UDP_LISTENING).group(2))
        assert udp_port == server.port
        with socket.create_connection(server.address, timeout=10) as tcp:
            tcp.sendall(b"over tcp")
            assert tcp.recv(100) == b"over tcp"
        with udp_socket() as sock:
            assert echo(sock, server.address, b"over udp") == b"over udp"
        assert server.stop() == 0, server.stderr
    assert final_counts(server)["answered"] == 1


def test_a_busy_udp_port_is_one_line_and_exit_2() -> None:
    with udp_socket(bind=("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = echoplex("serve", "--udp", "--tcp", "--port", str(port), timeout_s=30)
    assert result.returncode == 2, result
    assert result.stderr == (
        f"echoplex serve: error: cannot listen on udp 127.0.0.1:{port}: Address already in use\n"
    )


def test_a_busy_tcp_port_beside_udp_stops_the_udp_side_too() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = echoplex("serve", "--udp", "--tcp", "--port", str(port), timeout_s=30)
    assert result.returncode == 2, result
    assert "echoplex serve: error: cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--udp-rate", "-1"], "0 (no limit) or more"),
        (["--udp-rate", "nan"], "0 (no limit) or more"),
        (["--udp-rate-total", "inf"], "0 (no limit) or more"),
        (["--udp-rate-total", "lots"], "not a number of datagrams a second"),
        (["--udp-max-sources", "0"], "must be at least 1"),
    ],
)
def test_bad_udp_settings_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = echoplex("serve", "--udp", *args, timeout_s=30)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr


class Recorder(QuietEvents):
    """Events without the UDP hooks: they hear of UDP through `listening`."""

    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.ready = threading.Event()

    def listening(self, addresses: list[Any]) -> None:
        self.addresses += addresses
        self.ready.set()


@pytest.mark.parametrize("tcp", [False, True])
def test_run_serves_udp_in_process_and_leaves_no_thread(tcp: bool) -> None:
    threads_before = set(threading.enumerate())
    events = Recorder()
    shutdown = Shutdown()
    config = ServerConfig(mode="asyncio", port=0, udp=True, tcp=tcp, drain_timeout_s=1)
    server = threading.Thread(target=run, args=(config, events, shutdown))
    server.start()
    try:
        assert events.ready.wait(10)
        port = events.addresses[0][1]
        with udp_socket() as sock:
            assert echo(sock, ("127.0.0.1", port), b"in process") == b"in process"
    finally:
        shutdown.request()
        server.join(timeout=15)
        shutdown.close()
    assert not server.is_alive()
    if tcp:
        assert [address[1] for address in events.addresses] == [port, port]  # UDP, then TCP
    assert set(threading.enumerate()) <= threads_before


# The client.


@pytest.fixture(scope="module")
def udp_server() -> Iterator[UdpServer]:
    with UdpServer() as server:
        yield server


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A bound UDP port where nothing answers: datagrams sent there are lost."""
    with udp_socket(bind=("127.0.0.1", 0)) as sink:
        yield sink.getsockname()[1]


def test_client_sends_each_message_as_a_datagram(udp_server: UdpServer) -> None:
    result = echoplex(
        "client", "--udp", "--port", str(udp_server.port), "-m", "hello", "-m", "", "--count", "2"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "Starting client...\nReceived: b'hello'\nReceived: b''\nReceived: b'hello'\nReceived: b''\n"
    )


def test_client_raw_udp(udp_server: UdpServer) -> None:
    result = echoplex("client", "--udp", "--port", str(udp_server.port), "-m", "raw", "--raw")
    assert (result.returncode, result.stdout) == (0, "raw")


def test_interactive_udp_client_sends_a_datagram_per_line(udp_server: UdpServer) -> None:
    result = echoplex(
        "client", "--udp", "--port", str(udp_server.port), input=b"line one\nline two\nlast"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line one\nline two\nlast"


def test_client_without_an_echo_is_one_line_and_exit_1(silent_port: int) -> None:
    result = echoplex("client", "--udp", "--port", str(silent_port), "-m", "hi", "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr == (
        f"echoplex client: error: no echo from udp 127.0.0.1:{silent_port} within 0.5s "
        "(lost, or not answered)\n"
    )


def test_interactive_client_without_an_echo_is_one_line_and_exit_1(silent_port: int) -> None:
    result = echoplex(
        "client", "--udp", "--port", str(silent_port), "--timeout", "0.5", input=b"a\nb\n"
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"echoplex client: error: no echo of 2 datagram(s) from udp 127.0.0.1:{silent_port} "
        "within 0.5s\n"
    )


def test_client_to_a_port_without_a_server_is_one_line() -> None:
    with udp_socket(bind=("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    # Nothing is bound there now: loopback answers with ICMP port unreachable.
    result = echoplex("client", "--udp", "--port", str(port), "-m", "hi")
    assert result.returncode == 1
    assert result.stderr == (
        f"echoplex client: error: no udp echo server at 127.0.0.1:{port}: Connection refused\n"
    )


@pytest.mark.parametrize("udp", [["--udp"], []])
def test_client_timeout_must_be_positive(udp: list[str]) -> None:
    # As `echoplex load --timeout`: a timeout of 0 would make the socket non-blocking.
    result = echoplex("client", *udp, "--timeout", "0", "-m", "hi")
    assert result.returncode == 2
    assert result.stderr == (
        "echoplex client: error: argument --timeout: must be more than 0 seconds (see --help)\n"
    )


@pytest.mark.timeout(30)
def test_every_udp_log_line_has_an_event() -> None:
    command = [sys.executable, "-m", "echoplex", "serve", "--udp", "--port", "0"]
    options = ["--log-format", "json", "--udp-rate", "1", "--udp-rate-total", "0"]
    with Process([*command, *options]) as server:
        match = server.wait_for_stderr(r'"event": "udp_listening", "address": "127.0.0.1:(\d+)"')
        with udp_socket() as sock:
            for _ in range(10):  # one a second is allowed, after a burst of two: drops
                sock.sendto(b"\xff\xfenot utf-8", ("127.0.0.1", int(match.group(1))))
            sock.settimeout(5)
            assert sock.recv(100) == b"\xff\xfenot utf-8"
        server.wait_for_stderr(r'"event": "udp_dropped"')
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    entries = [json.loads(line) for line in server.stderr.splitlines()]
    udp_entries = [entry for entry in entries if "udp" in entry["message"]]
    assert {entry["event"] for entry in udp_entries} == {
        "udp_listening",
        "udp_dropped",
        "udp_stopped",
    }, udp_entries
    dropped = [entry for entry in udp_entries if entry["event"] == "udp_dropped"]
    assert all(entry["dropped"]["rate-source"] > 0 for entry in dropped)
    (stopped,) = [entry for entry in udp_entries if entry["event"] == "udp_stopped"]
    assert stopped["answered"] >= 1
    assert stopped["answered"] + sum(stopped["dropped"].values()) == 10


# ---------------------------------------------------------------- the --udp-rate hint


@pytest.mark.timeout(60)
def test_a_few_connections_at_the_default_rate_limit_get_the_hint() -> None:
    # The command: 2 pingpong connections for 3s against the default limits
    # (100 a second per source, bursts of 200) lose a handful of datagrams, under 1%
    # of them, as each connection waits --timeout (2s) after a loss while the bucket
    # refills; the hint must name --udp-rate all the same.
    with UdpServer() as server:
        result = echoplex("load", "--udp", "--port", str(server.port), "-c", "2", "-d", "3s")
        counts = server.stop()
    assert result.returncode == 1, result.stderr
    assert counts["by_reason"].get("rate-source", 0) > 0, counts
    # At most one loss per connection per --timeout wait, and two bursts answered: under
    # 1% lost, the case the hint used to miss.
    lost = int(re.search(r"lost (\d+)", result.stdout)[1])  # type: ignore[index]
    assert 0 < lost <= 4 and counts["answered"] >= 400, (result.stdout, counts)
    (hint,) = [line for line in result.stdout.splitlines() if line.startswith("hint ")]
    assert "per-source rate limit" in hint and "--udp-rate 0" in hint, hint


def test_few_losses_that_fit_a_default_limit_are_named_and_others_are_not() -> None:
    from echoplex.load.config import LoadConfig
    from echoplex.load.result import UDP_DEFAULT_LIMITS, LoadResult

    def result(answered: int, lost: int, sending_s: float) -> LoadResult:
        found = LoadResult(LoadConfig(udp=True), loop="asyncio")
        found.requests = found.echoed_total = answered
        found.errors_by_kind = {"lost": lost}
        found.late_datagrams = 0
        found.sending_s = sending_s
        return found

    per_source, _ = UDP_DEFAULT_LIMITS
    fits = result(400, 4, 3.0)  # two bursts of 200 in 3s: 0.8 of 200 + 3 x 100
    assert fits.udp_limit_met() == per_source and fits.high_udp_loss
    stray = result(5_000, 4, 3.0)  # more answered than either default lets through
    assert stray.udp_limit_met() is None and not stray.high_udp_loss
