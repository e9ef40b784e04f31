"""Many connections from `echoplex load`. `--source ADDR[-ADDR]`: each connection binds
to a source address in turn by its number in the run, over every process, so a real
server on 127.0.0.1 sees each source equally; bad values are one line and exit 2. A
connection the server closes while the others connect is an error; the watchdog looks
at a share of the connections each tick and still never fails one early."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import pytest

from echoplex.load.config import LoadConfig
from echoplex.load.connections import Rate
from echoplex.load.engine import TICK_S, WATCH_ROUND_S, LoadRun
from echoplex.load.sources import MAX_SOURCES, source_addresses, source_for
from echoplex.load.transport import PROBE_DATAGRAM
from echoplex.payload import PayloadPattern

from .procs import Server, needs_ipv6
from .test_load import PAYLOAD, attach, load_json, measuring_tally, run_cli
from .waiting import wait_for

pytestmark = pytest.mark.timeout(60)

# Enough of a connection's first bytes to tell which connection of the run sent them.
SIGNATURE_BYTES = 32


@dataclass
class Seen:
    """One connection as the server saw it."""

    peer: str
    received: bytearray = field(default_factory=bytearray)
    ended: bool = False

    def number(self, connections: int, seed: int = 0) -> int:
        """Which connection of the run this was, by the payload it sent."""
        payload = PayloadPattern(seed)
        head = bytes(self.received[:SIGNATURE_BYTES])
        (number,) = [n for n in range(connections) if payload.matches(n, 0, head)]
        return number


class CountingServer:
    """A TCP echo server in threads that keeps what each connection sent, and from where."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.stop = threading.Event()
        self.listener = socket.create_server(
            (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.seen: list[Seen] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            seen = Seen(peer[0])
            self.seen.append(seen)
            thread = threading.Thread(target=self._echo, args=(sock, seen), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _echo(self, sock: socket.socket, seen: Seen) -> None:
        with sock, contextlib.suppress(OSError):
            sock.settimeout(0.05)
            while not self.stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                seen.received += data
                sock.sendall(data)
        seen.ended = True

    def ended(self, connections: int) -> list[Seen]:
        """Every connection, once `connections` of them have come and gone."""
        wait_for(
            lambda: len(self.seen) == connections and all(s.ended for s in self.seen),
            10,
            lambda: f"{connections} connections closed: {self.seen}",
        )
        return self.seen

    def __enter__(self) -> CountingServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=5)
        self.listener.close()


# --- the addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("127.0.0.2", ("127.0.0.2",)),
        (" 127.0.0.1-127.0.0.3 ", ("127.0.0.1", "127.0.0.2", "127.0.0.3")),
        ("10.0.0.255-10.0.1.0", ("10.0.0.255", "10.0.1.0")),  # across a /24: contiguous
        ("::1", ("::1",)),
        ("fd00::1-fd00::2", ("fd00::1", "fd00::2")),
    ],
)
def test_a_source_is_an_address_or_a_contiguous_range(
    text: str, addresses: tuple[str, ...]
) -> None:
    assert source_addresses(text) == addresses
    assert LoadConfig(source=text, host="::1" if ":" in text else "127.0.0.1").sources == addresses


def test_the_range_holds_at_most_max_sources() -> None:
    assert len(source_addresses("127.0.1.0-127.0.1.255")) == MAX_SOURCES
    with pytest.raises(ValueError, match="holds 257 addresses, at most 256"):
        source_addresses("127.0.1.0-127.0.2.0")


def test_connections_take_the_sources_in_turn_by_number() -> None:
    sources = source_addresses("127.0.0.2-127.0.0.4")
    assert [source_for(sources, n) for n in range(7)] == [
        "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--source", "127.0.0.x"], "--source: not an IP address: '127.0.0.x'"),
        (["--source", "127.0.0.1-"], "--source: not an IP address: ''"),
        (["--source", "127.0.0.8-127.0.0.1"], "is reversed: 127.0.0.1 comes before 127.0.0.8"),
        (["--source", "127.0.0.0-127.0.1.0"], "holds 257 addresses, at most 256"),
        (["--source", "127.0.0.1-::1"], "mixes IPv4 and IPv6"),
        (["--source", "::1"], "--source does not go with --host: source ::1 is IPv6"),
        (["--host", "::1", "--source", "127.0.0.2"], "source 127.0.0.2 is IPv4, server ::1"),
        (["--source", "127.0.0.2", "--unix", "/tmp/e.sock"], "--source does not go with --unix"),
    ],
)
def test_a_bad_source_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    status, out, err = run_cli(capsys, "load", *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err


def test_a_bad_source_through_the_api_names_the_setting() -> None:
    with pytest.raises(ValueError, match="`source`: not an IP address"):
        LoadConfig(source="nowhere")
    with pytest.raises(ValueError, match="`source` does not go with `unix_path`"):
        LoadConfig(source="127.0.0.2", unix_path="/tmp/e.sock")


# --- against a real server -----------------------------------------------------------


@pytest.mark.parametrize(("connections", "processes"), [(8, 1), (12, 2)])
def test_each_source_carries_an_equal_share_of_the_connections(
    capsys: pytest.CaptureFixture[str], connections: int, processes: int
) -> None:
    with CountingServer() as server:
        status, report = load_json(
            capsys, server.port, "-c", str(connections), "-d", "0.2", "--size", "64",
            "--source", "127.0.0.2-127.0.0.5", "--processes", str(processes),
        )  # fmt: skip
        seen = server.ended(connections)
    assert status == 0 and report["ok"], report
    assert report["processes"] == processes
    assert report["source"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    by_source = Counter(s.peer for s in seen)
    assert by_source == {f"127.0.0.{2 + k}": connections // 4 for k in range(4)}
    # Connection n of the run, in whichever process, came from source n mod 4.
    assert {s.number(connections): s.peer for s in seen} == {
        n: f"127.0.0.{2 + n % 4}" for n in range(connections)
    }


@needs_ipv6
def test_an_ipv6_source(capsys: pytest.CaptureFixture[str]) -> None:
    with CountingServer("::1") as server:
        status, report = load_json(
            capsys, server.port, "--host", "::1", "--source", "::1", "-c", "2", "-d", "0.1"
        )
        seen = server.ended(2)
    assert status == 0 and report["ok"], report
    assert [s.peer for s in seen] == ["::1", "::1"]


def test_a_source_this_machine_does_not_have_is_one_line_before_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with CountingServer() as server:
        # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): no machine's own address.
        status, out, err = run_cli(
            capsys, "load", "--port", str(server.port), "--source", "192.0.2.1", "-d", "0.1"
        )
        assert server.seen == []  # refused before any connection
    assert status == 1 and out == ""
    assert err == (
        "echoplex load: error: cannot use source address 192.0.2.1: Cannot assign requested "
        "address\n"
    )


class CountingUdpServer:
    """A UDP echo server that notes the address and port each datagram came from."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.senders: Counter[tuple[str, int]] = Counter()  # load datagrams per socket
        self.thread = threading.Thread(target=self._echo, daemon=True)
        self.thread.start()

    def _echo(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if data != PROBE_DATAGRAM:
                self.senders[peer] += 1
            self.sock.sendto(data, peer)

    def __enter__(self) -> CountingUdpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_udp_sockets_bind_to_the_sources_too(capsys: pytest.CaptureFixture[str]) -> None:
    with CountingUdpServer() as server:
        status, report = load_json(
            capsys, server.port, "--udp", "-c", "4", "-d", "0.2", "--size", "64",
            "--source", "127.0.0.2-127.0.0.3",
        )  # fmt: skip
    assert status == 0 and report["ok"], report
    assert Counter(address for address, _port in server.senders) == {
        "127.0.0.2": 2,
        "127.0.0.3": 2,
    }


# --- every connection opened is one the run holds --------------------------------------


def test_connections_the_server_closes_while_others_connect_are_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Over its limit the server accepts a connection and closes it at once; slow
    # connects leave those closes time to arrive before the traffic begins, where they
    # once went uncounted and the run said OK with a third of its connections gone.
    with Server("--max-connections", "2", mode="asyncio") as server:
        status, report = load_json(
            capsys, server.port, "-c", "6", "--connect-rate", "20", "-d", "0.2"
        )
    assert status == 1 and not report["ok"], report
    assert report["errors"] == 4, report
    assert set(report["errors_by_kind"]) <= {"closed early", "reset"}, report
    assert report["connections_alive"] == 2


# --- the watchdog, looking at many connections a share at a time -----------------------


def test_the_watchdog_never_fails_a_connection_early_however_seldom_it_looks() -> None:
    tally = measuring_tally(size_bytes=100, timeout_s=2.0)
    connection = Rate(tally, PAYLOAD, 0)
    attach(connection)
    second = 1_000_000_000
    connection.watch(0.0, 1 * second)  # idle
    connection.send_due()  # its echo never comes
    connection.watch(0.0, 2 * second)  # the first look that sees it waiting
    connection.watch(0.0, 3 * second)  # 2 s after a look saw it idle: it may have sent late
    assert connection.alive and dict(tally.errors_by_kind) == {}
    connection.watch(0.0, 4 * second - 1)
    assert connection.alive
    connection.watch(0.0, 4 * second)  # waiting since the look at 2 s, at least
    assert not connection.alive and dict(tally.errors_by_kind) == {"timeout": 1}
    connection = Rate(tally, PAYLOAD, 1)
    attach(connection)
    connection.send_due()
    connection.watch(0.0, 1 * second)
    connection.data_received(PAYLOAD.slice(1, 0, 40))  # some echo: progress
    connection.watch(0.0, 2 * second)  # seen moving: waiting from here at the earliest
    connection.watch(0.0, 2 * second + tally.timeout_ns - 1)
    assert connection.alive
    connection.watch(0.0, 2 * second + tally.timeout_ns)
    assert not connection.alive and dict(tally.errors_by_kind) == {"timeout": 2}
    assert tally.error_samples[1].detail == "no echo for 2s"


def test_many_stream_connections_are_watched_a_share_each_tick() -> None:
    many = LoadRun(LoadConfig(connections=100, timeout_s=10.0))
    assert many.watch_every_ticks == int(WATCH_ROUND_S / TICK_S)
    assert LoadRun(LoadConfig(timeout_s=0.5)).watch_every_ticks == 1  # four looks a timeout
    assert LoadRun(LoadConfig(udp=True)).watch_every_ticks == 1  # it notices losses
