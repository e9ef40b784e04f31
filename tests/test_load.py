"""`echoplex load`: its command line, every pattern against every model, and servers
that lie (corrupt, drop, duplicate, swap, close early, stall, reset), which it must catch."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import pytest

from echoplex.cli import main
from echoplex.commands.load import size_bytes
from echoplex.load.config import LoadConfig
from echoplex.load.connections import LoadConnection, PingPong, Rate, Stream, Tally
from echoplex.load.engine import Progress, _percentile
from echoplex.load.report import live_progress, progress_line
from echoplex.payload import PayloadPattern

from .procs import ROOT, Process, Server, echoplex

PAYLOAD = PayloadPattern(seed=0)
UNINTERRUPTED_S = 600  # a run's duration that only a stop can end within a test

# --- helpers -------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`echoplex ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        status = int(exc.code or 0)
    out = capsys.readouterr()
    return status, out.out, out.err


def load_json(capsys: pytest.CaptureFixture[str], port: int, *args: str) -> tuple[int, dict]:
    status, out, err = run_cli(capsys, "load", "--port", str(port), *args, "--json")
    assert out.count("\n") == 1, (out, err)
    report: dict = json.loads(out)
    return status, report


def recv_chunks(sock: socket.socket, stop: threading.Event) -> Iterator[bytes]:
    """What the peer sends, chunk by chunk, until it closes or the test ends."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        yield data


Handler = Callable[[list[socket.socket], threading.Event], None]


class LyingServer:
    """A small thread server whose `handler` decides what to send back; `group` > 1
    hands it that many connections at once (to swap data between them)."""

    def __init__(self, handler: Handler, group: int = 1) -> None:
        self.handler, self.group = handler, group
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        waiting: list[socket.socket] = []
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.sockets.append(sock)
            waiting.append(sock)
            if len(waiting) == self.group:
                thread = threading.Thread(
                    target=self._handle, args=(waiting, self.stop), daemon=True
                )
                self.threads.append(thread)
                thread.start()
                waiting = []

    def _handle(self, socks: list[socket.socket], stop: threading.Event) -> None:
        with contextlib.suppress(OSError):
            self.handler(socks, stop)

    def __enter__(self) -> LyingServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=5)
        for sock in self.sockets:
            sock.close()
        self.listener.close()


def echo_through(transform: Callable[[int, bytes], bytes]) -> Handler:
    """Echo each chunk as `transform(stream offset of the chunk, chunk)` returns it."""

    def handle(socks: list[socket.socket], stop: threading.Event) -> None:
        (sock,) = socks
        seen = 0
        for data in recv_chunks(sock, stop):
            sock.sendall(transform(seen, data))
            seen += len(data)

    return handle


def flip_byte_at(offset: int) -> Handler:
    def transform(seen: int, data: bytes) -> bytes:
        if seen <= offset < seen + len(data):
            damaged = bytearray(data)
            damaged[offset - seen] ^= 0xFF
            return bytes(damaged)
        return data

    return echo_through(transform)


def drop_bytes(offset: int, count: int) -> Handler:
    def transform(seen: int, data: bytes) -> bytes:
        lo, hi = max(offset - seen, 0), max(min(offset + count - seen, len(data)), 0)
        return data[:lo] + data[hi:] if lo < hi else data

    return echo_through(transform)


def repeat_bytes(offset: int, count: int) -> Handler:
    """Sends the `count` bytes before `offset` a second time, once it has echoed them."""
    history = bytearray()

    def transform(seen: int, data: bytes) -> bytes:
        before = len(history)
        history.extend(data)
        if before < offset <= len(history):
            cut = offset - before
            return data[:cut] + bytes(history[offset - count : offset]) + data[cut:]
        return data

    return echo_through(transform)


def swap_two(socks: list[socket.socket], stop: threading.Event) -> None:
    """Each connection's bytes are sent to the other one."""
    first, second = socks

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for data in recv_chunks(source, stop):
                sink.sendall(data)

    helper = threading.Thread(target=pump, args=(second, first), daemon=True)
    helper.start()
    pump(first, second)
    helper.join(timeout=5)


def close_after(limit: int) -> Handler:
    def handle(socks: list[socket.socket], stop: threading.Event) -> None:
        (sock,) = socks
        echoed = 0
        for data in recv_chunks(sock, stop):
            data = data[: limit - echoed]
            sock.sendall(data)
            echoed += len(data)
            if echoed >= limit:
                sock.shutdown(socket.SHUT_RDWR)
                return

    return handle


def never_echo(socks: list[socket.socket], stop: threading.Event) -> None:
    for _ in recv_chunks(socks[0], stop):
        pass


def reset_after_first_chunk(socks: list[socket.socket], stop: threading.Event) -> None:
    (sock,) = socks
    for data in recv_chunks(sock, stop):
        sock.sendall(data[: len(data) // 2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with SO_LINGER 0: an RST, not a FIN
        return


def append_a_byte(socks: list[socket.socket], stop: threading.Event) -> None:
    (sock,) = socks
    for data in recv_chunks(sock, stop):
        sock.sendall(data + b"!")


def echo_in_pieces(socks: list[socket.socket], stop: threading.Event) -> None:
    """Honest, but echoes every chunk in 3-byte sends (TCP_NODELAY: separate segments)."""
    (sock,) = socks
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for data in recv_chunks(sock, stop):
        for start in range(0, len(data), 3):
            sock.sendall(data[start : start + 3])


def first_difference(expected: bytes, received: bytes) -> int:
    return next(i for i, (e, r) in enumerate(zip(expected, received, strict=False)) if e != r)


# --- the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1024", 1024),
        ("1K", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("64KiB", 65536),
        ("1KB", 1000),
        ("2M", 2 * 1024 * 1024),
        ("1MB", 1_000_000),
        ("1MiB", 1024 * 1024),
        ("10B", 10),
        ("1G", 1024**3),
    ],
)
def test_sizes_accept_suffixes(text: str, value: int) -> None:
    assert size_bytes(text) == value


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-s", "-5"], "must be 1 byte to 1GiB, not -5"),
        (["-s", "0"], "must be 1 byte to 1GiB"),
        (["-s", "2G"], "must be 1 byte to 1GiB"),
        (["-s", "1iB"], "not a size in bytes"),
        (["-s", "lots"], "not a size in bytes"),
        (["--pattern", "bogus"], "invalid choice: 'bogus'"),
        (["--pattern", "rate"], "--pattern rate needs --rate"),
        (["--pattern", "rate", "--rate", "0"], "above 0"),
        (["--rate", "100"], "--rate applies only to --pattern rate"),
        (["--window", "1K"], "--window applies only to --pattern stream"),
        (["--port", "70000"], "port must be 1..65535"),
        (["--port", "0"], "port must be 1..65535"),
        (["-c", "0"], "must be at least 1"),
        (["-c", "1000000"], "connections must be 1..100000"),
        (["-d", "0"], "more than 0 seconds"),
        (["-d", "-1"], "0 or more"),
        (["--warmup", "nan"], "0 or more"),
        (["--connect-rate", "-2"], "above 0"),
        (["--timeout", "inf"], "at most a year"),
        (["--loop", "tokio"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    status, out, err = run_cli(capsys, "load", *args)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("echoplex load: error: ")
    assert expected in err


def test_bad_arguments_from_the_real_command_have_no_traceback() -> None:
    result = echoplex("load", "--pattern", "rate", "-c", "4")
    assert result.returncode == 2
    assert result.stderr == "echoplex load: error: --pattern rate needs --rate MESSAGES_PER_S\n"


def test_a_refused_connection_is_one_clear_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        port = probe.getsockname()[1]
        status, out, err = run_cli(capsys, "load", "--port", str(port), "-d", "0.2")
    assert status == 1
    assert out == ""
    assert err == f"echoplex load: error: cannot connect to 127.0.0.1:{port}: Connection refused\n"


def test_an_unknown_host_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "load", "--host", "no-such-host.invalid", "-d", "0.2")
    assert out == ""
    assert status == 1
    assert err.count("\n") == 1
    assert err.startswith("echoplex load: error: cannot resolve 'no-such-host.invalid'")


def test_missing_hdrhistogram_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hdrh", None)
    status, _, err = run_cli(capsys, "load", "--port", "1", "-d", "0.2")
    assert status == 2  # a usage error, as every missing extra is
    assert err == (
        "echoplex load: error: hdrhistogram is not installed: pip install 'echoplex[load]'\n"
    )


def test_the_other_commands_do_not_import_the_load_extras() -> None:
    code = (
        "import sys; from echoplex.cli import build_parser; build_parser(); "
        "print(sorted({'hdrh', 'rich'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.stdout == "[]\n", result.stderr


# --- every pattern against every model -----------------------------------------------

PATTERNS = [
    ["--pattern", "pingpong", "-s", "1K", "-d", "0.3", "--warmup", "0.1"],
    ["--pattern", "rate", "--rate", "400", "-s", "700", "-d", "0.3"],
    ["--pattern", "stream", "-s", "4KiB", "--window", "64K", "-d", "0.3"],
    ["--pattern", "hold", "-s", "100", "-d", "0.3", "--connect-rate", "200"],
]


def test_every_pattern_verifies_clean_against_every_model(
    capsys: pytest.CaptureFixture[str], server: Server, mode: str
) -> None:
    # `simple` serves one connection at a time: a second one would wait for good.
    connections = 1 if mode == "simple" else 3
    for args in PATTERNS:
        status, report = load_json(capsys, server.port, "-c", str(connections), *args)
        where = f"{mode} {args[1]}: {report}"
        assert status == 0, where
        assert report["ok"] is True, where
        assert report["pattern"] == args[1]
        assert report["requests"] > 0, where
        assert report["errors"] == 0 and report["errors_by_kind"] == {}, where
        assert report["mismatches"] == 0, where
        assert report["connections_opened"] == connections, where
        assert report["connections_alive"] == connections, where
        latency = report["latency_us"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"]
        assert latency["p999"] <= latency["max"], where
        if args[1] == "hold":
            assert report["requests"] == 2 * connections, where  # one check before, one after
    assert server.stop() == 0


def test_the_json_has_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    with Server(mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "2", "-d", "0.3", "--seed", "9")
    assert status == 0
    for key in [
        "requests",
        "requests_per_s",
        "mb_per_s",
        "bytes",
        "latency_us",
        "errors",
        "errors_by_kind",
        "mismatches",
        "connections_alive",
        "client_cpu_s",
        "client_cpu_us_per_request",
        "pattern",
        "connections",
        "size",
        "duration_s",
        "warmup_s",
        "seed",
        "loop",
    ]:
        assert key in report, key
    assert set(report["latency_us"]) >= {"p50", "p90", "p99", "p999", "max"}
    assert (report["pattern"], report["connections"], report["size"]) == ("pingpong", 2, 1024)
    assert (report["duration_s"], report["seed"]) == (0.3, 9)
    assert report["bytes"] == report["requests"] * 1024
    assert report["client_cpu_s"] >= 0
    assert report["send_lag_us"] is None  # rate only


def test_the_human_summary(capsys: pytest.CaptureFixture[str]) -> None:
    with Server(mode="asyncio") as server:
        status, out, err = run_cli(
            capsys, "load", "--port", str(server.port), "--pattern", "rate", "--rate", "300",
            "-c", "2", "-d", "0.3",
        )  # fmt: skip
    assert status == 0, err
    assert err == ""
    assert out.startswith("rate · 2 connections · 1,024 B messages · 300 messages/s due")
    assert re.search(r"^latency +p50 [\d,]+ µs +p90 [\d,]+ µs +p99 [\d,]+ µs", out, re.M)
    assert re.search(r"^send lag +p50 [\d,]+ µs", out, re.M)
    assert re.search(r"^requests +[\d,]+ verified +[\d,.]+ req/s +[\d,.]+ MB/s", out, re.M)
    assert re.search(r"^client CPU +[\d.]+ s +[\d,.]+ µs/request$", out, re.M)
    assert out.rstrip().endswith("result       OK")


# --- servers that lie ----------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["pingpong", "stream", "hold"])
def test_an_honest_server_that_echoes_in_pieces_passes(
    capsys: pytest.CaptureFixture[str], pattern: str
) -> None:
    with LyingServer(echo_in_pieces) as honest:
        status, report = load_json(
            capsys, honest.port, "--pattern", pattern, "-c", "1", "-s", "100", "-d", "0.2"
        )
    assert status == 0, report
    assert report["requests"] > 0 and report["mismatches"] == 0


def test_a_corrupted_byte_is_reported_with_connection_and_offset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingServer(flip_byte_at(5000)) as liar:
        status, out, _ = run_cli(
            capsys, "load", "--port", str(liar.port), "-c", "1", "-s", "1000", "-d", "0.3"
        )
    assert status == 1
    assert re.search(r"^mismatches   1$", out, re.M), out
    assert re.search(r"^  connection 0 offset 5000: expected byte 0x[0-9a-f]{2}", out, re.M), out
    assert out.rstrip().endswith("result       FAILED")


def test_lost_bytes_are_a_mismatch_where_the_stream_goes_wrong(
    capsys: pytest.CaptureFixture[str],
) -> None:
    expected = PayloadPattern(seed=3).slice(0, 0, 10_000)
    at = first_difference(expected, expected[:3000] + expected[3010:])
    with LyingServer(drop_bytes(3000, 10)) as liar:
        status, report = load_json(
            capsys, liar.port, "-c", "1", "-s", "1000", "-d", "0.3", "--seed", "3"
        )
    assert status == 1
    assert report["ok"] is False
    assert report["mismatches"] == 1
    (sample,) = report["mismatch_samples"]
    assert (sample["connection"], sample["offset"]) == (0, at)
    assert sample["expected"] == expected[at]


def test_duplicated_bytes_are_a_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    expected = PayloadPattern(seed=0).slice(0, 0, 10_000)
    at = first_difference(expected, expected[:3500] + expected[3400:])
    with LyingServer(repeat_bytes(3500, 100)) as liar:
        status, report = load_json(capsys, liar.port, "-c", "1", "-s", "1000", "-d", "0.3")
    assert status == 1
    (sample,) = report["mismatch_samples"]
    assert (sample["connection"], sample["offset"]) == (0, at)


def test_bytes_swapped_between_connections_are_a_mismatch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingServer(swap_two, group=2) as liar:
        status, report = load_json(capsys, liar.port, "-c", "2", "-s", "512", "-d", "0.3")
    assert status == 1
    assert report["mismatches"] >= 1
    for sample in report["mismatch_samples"]:
        assert sample["connection"] in (0, 1)
        assert sample["offset"] == first_difference(
            PayloadPattern(0).slice(sample["connection"], 0, 512),
            PayloadPattern(0).slice(1 - sample["connection"], 0, 512),
        )


def test_a_server_that_closes_before_echoing_everything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingServer(close_after(2500)) as liar:
        status, report = load_json(capsys, liar.port, "-c", "1", "-s", "1000", "-d", "0.3")
    assert status == 1
    assert report["errors"] == 1
    assert report["errors_by_kind"] == {"closed early": 1}
    (sample,) = report["error_samples"]
    assert (sample["connection"], sample["offset"], sample["kind"]) == (0, 2500, "closed early")
    assert report["connections_alive"] == 0


def test_a_stalled_server_is_a_timeout_not_a_quiet_slowdown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingServer(never_echo) as liar:
        status, report = load_json(
            capsys, liar.port, "--pattern", "rate", "--rate", "100", "-c", "1",
            "-d", "0.3", "--timeout", "0.5",
        )  # fmt: skip
    assert status == 1
    assert report["errors_by_kind"] == {"timeout": 1}
    assert report["requests"] == 0
    assert report["error_samples"][0]["offset"] == 0


def test_a_reset_is_counted_by_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with LyingServer(reset_after_first_chunk) as liar:
        status, report = load_json(capsys, liar.port, "-c", "1", "-s", "1000", "-d", "0.3")
    assert status == 1
    assert report["errors_by_kind"] == {"reset": 1}


def test_more_bytes_than_were_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with LyingServer(append_a_byte) as liar:
        status, report = load_json(capsys, liar.port, "-c", "1", "-s", "1", "-d", "0.3")
    assert status == 1
    assert report["errors_by_kind"] == {"extra bytes": 1}
    assert report["error_samples"][0]["offset"] == 1


def test_connect_failures_after_the_first_are_counted_by_kind(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server that stops listening after its first connection: the rest are refused."""
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=1) as listener:
        port = listener.getsockname()[1]

        def accept_one_then_close() -> None:
            sock, _ = listener.accept()
            accepted.append(sock)
            listener.close()

        closer = threading.Thread(target=accept_one_then_close, daemon=True)
        closer.start()
        try:
            status, report = load_json(
                capsys, port, "--pattern", "hold", "-c", "3", "-d", "0.1", "--timeout", "0.5",
                "--connect-rate", "20",
            )  # fmt: skip
        finally:
            closer.join(timeout=5)
            for sock in accepted:
                sock.close()
    assert status == 1
    assert report["connections_opened"] == 1
    assert report["errors_by_kind"].get("connect refused") == 2


# --- stopping early ------------------------------------------------------------------


def test_ctrl_c_stops_the_run_and_still_reports() -> None:
    with Server(mode="asyncio") as server:
        argv = [sys.executable, "-m", "echoplex", "load", "--port", str(server.port)]
        with Process([*argv, "-c", "2", "-d", str(UNINTERRUPTED_S), "--json"]) as load:
            # Both connections are open (the second connect follows the first's success).
            server.wait_for_stderr(r"open 127\.0\.0\.1:")
            first = next(i for i, line in enumerate(server.stderr_seen) if " open " in line)
            server.wait_for_stderr(r"open 127\.0\.0\.1:", start=first + 1)
            load.signal(signal.SIGINT)
            status = load.wait(timeout_s=20)
        assert status == 0, load.stderr
        assert "Traceback" not in load.stderr
        report = json.loads(load.stdout)
        assert report["interrupted"] is True
        assert report["errors"] == 0 and report["mismatches"] == 0
        assert report["measured_s"] < UNINTERRUPTED_S  # cut short by the stop, not run out


# --- the connection protocols, without sockets ---------------------------------------


class FakeTransport:
    """Records what a connection writes; no I/O."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


def attach(connection: LoadConnection) -> FakeTransport:
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    return transport


def measuring_tally(**config: Any) -> Tally:
    tally = Tally(LoadConfig(**config))
    tally.sending = True
    tally.window_start_ns = 0
    return tally


def counted(tally: Tally) -> int:
    """Messages measured so far: each is one latency count."""
    return sum(tally.latency_counts.values())


def pieces(data: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def test_pingpong_whole_and_split_echoes_are_verified_alike() -> None:
    tally = measuring_tally(size_bytes=100)
    connection = PingPong(tally, PAYLOAD, 4)
    transport = attach(connection)
    connection.begin()
    for cuts in [(), (1,), (30, 31, 99), (50,), ()]:
        message = bytes(transport.written[-100:])
        for piece in pieces(message, *cuts):
            connection.data_received(piece)
    assert counted(tally) == 5 and tally.mismatches == 0
    assert bytes(transport.written) == PAYLOAD.slice(4, 0, 600)  # the 6th is in flight
    assert connection.verified() == 500
    assert connection.outstanding() == 100


def test_pingpong_damage_after_a_partial_echo_is_located_exactly() -> None:
    tally = measuring_tally(size_bytes=100)
    connection = PingPong(tally, PAYLOAD, 4)
    transport = attach(connection)
    connection.begin()
    connection.data_received(bytes(transport.written))  # message 0, whole
    second = bytearray(transport.written[100:])
    second[70] ^= 0x10
    first_part, rest = pieces(bytes(second), 40)
    connection.data_received(first_part)
    connection.data_received(rest)
    assert tally.mismatches == 1
    (mismatch,) = tally.mismatch_samples
    assert (mismatch.connection, mismatch.offset) == (4, 170)
    assert transport.aborted and not connection.alive


def test_pingpong_more_than_was_sent_is_an_error_at_the_end_of_what_was() -> None:
    tally = measuring_tally(size_bytes=10)
    connection = PingPong(tally, PAYLOAD, 0)
    transport = attach(connection)
    connection.begin()
    connection.data_received(bytes(transport.written) + b"x")
    assert tally.errors_by_kind == {"extra bytes": 1}
    assert tally.error_samples[0].offset == 10


def test_stream_counts_messages_across_any_chunking() -> None:
    tally = measuring_tally(size_bytes=10)
    connection = Stream(tally, PAYLOAD, 2, window=35)  # three messages in flight
    transport = attach(connection)
    connection.begin()
    assert len(transport.written) == 30
    echoed = 0
    for size in [7, 3, 15, 1, 4, 20, 10]:
        connection.data_received(bytes(transport.written[echoed : echoed + size]))
        echoed += size
    assert counted(tally) == echoed // 10 == 6
    assert connection.outstanding() == len(transport.written) - echoed <= 35


def test_rate_keeps_what_is_due_while_paused_and_times_from_the_schedule() -> None:
    tally = measuring_tally(size_bytes=8, pattern="rate", rate_per_s=1000.0)
    connection = Rate(tally, PAYLOAD, 1)
    transport = attach(connection)
    connection.schedule(first_ns=0.0, interval_ns=1000.0)  # due at 0, 1 µs, 2 µs...
    connection.send_due()
    connection.pause_writing()
    connection.send_due()
    connection.send_due()
    assert len(transport.written) == 8 and connection.owed == 16
    connection.resume_writing()
    assert bytes(transport.written) == PAYLOAD.slice(1, 0, 24) and connection.owed == 0
    connection.data_received(bytes(transport.written))
    assert counted(tally) == 3
    # Timed from when each was due (long ago: time 0 of perf_counter), not when sent.
    assert min(tally.latency_counts) > 1000


def test_the_progress_line_and_its_recent_p99() -> None:
    assert _percentile({}, 99.0) == 0
    assert _percentile({10: 98, 50: 1, 900: 1}, 99.0) == 50
    assert _percentile({10: 98, 50: 1, 900: 1}, 100.0) == 900
    line = progress_line(Progress("measuring", 1.25, 5000, 41234.0, 42.2, 180, 0, 0, 3, 4))
    assert " ".join(line.split()) == "measuring 1.2 s 41,234 req/s 42.20 MB/s p99 180 µs alive 3/4"


def test_no_progress_line_when_stdout_is_not_a_terminal() -> None:
    with io.StringIO() as stream, live_progress(stream) as show:
        assert show is None
