"""`echoplex load --processes N`: the connections spread over N processes, against real
servers: merged figures are the sums of each process's, connection numbers stay the
run's (a lying server is caught at the right connection and offset), a stop reaches
every process and still reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from typing import Any

import pytest

from echoplex.load.config import LoadConfig, process_count
from echoplex.load.processes import shares
from echoplex.payload import PayloadPattern

from .procs import Process, Server
from .test_load import UNINTERRUPTED_S, LyingServer, load_json, recv_chunks, run_cli
from .test_load_transports import NO_RATE_LIMITS
from .test_udp import UdpServer
from .waiting import wait_for

pytestmark = pytest.mark.timeout(60)

SUMMED = (
    "requests",
    "bytes",
    "errors",
    "mismatches",
    "connections_opened",
    "connections_alive",
    "unfinished",
)


def assert_sums(report: dict[str, Any], processes: int) -> None:
    """The run's figures are the sums of its processes', which hold every connection once."""
    parts = report["per_process"]
    assert report["processes"] == len(parts) == processes, report
    assert [part["first_connection"] for part in parts] == [
        sum(p["connections"] for p in parts[:i]) for i in range(len(parts))
    ]
    assert sum(part["connections"] for part in parts) == report["connections"]
    for key in SUMMED:
        assert report[key] == sum(part[key] for part in parts), key
    # The merged histogram holds every latency each process measured.
    assert report["latency_us"]["count"] == report["requests"]
    assert report["latency_us"]["max"] == max(part["latency_us"]["max"] for part in parts)
    assert report["latency_us"]["min"] == min(
        part["latency_us"]["min"] for part in parts if part["requests"]
    )
    assert report["client_cpu_s"] == pytest.approx(
        sum(part["client_cpu_s"] for part in parts), abs=1e-5
    )


def test_merged_figures_are_the_sums_of_the_processes() -> None:
    with Server(mode="asyncio") as server:
        argv = ["--port", str(server.port), "-c", "5", "-s", "1K", "-d", "0.3", "--json"]
        load = Process([sys.executable, "-m", "echoplex", "load", *argv, "--processes", "2"])
        status = load.wait(timeout_s=30)
    assert status == 0, load.stderr
    report = json.loads(load.stdout)
    assert report["ok"] is True and report["requests"] > 0
    assert_sums(report, 2)
    assert [part["connections"] for part in report["per_process"]] == [3, 2]
    assert all(part["requests"] > 0 for part in report["per_process"])


def flip_byte_on(connection: int, offset: int, connections: int) -> Any:
    """An echo that recognises each load connection by its first bytes (its payload
    stream) and flips one byte of `connection`'s echo, at stream `offset`."""
    payload = PayloadPattern(seed=0)
    heads = {payload.slice(number, 0, 16): number for number in range(connections)}

    def handle(socks: list[socket.socket], stop: threading.Event) -> None:
        (sock,) = socks
        seen = 0
        number = None
        held = b""
        for data in recv_chunks(sock, stop):
            if number is None:
                held += data
                if len(held) < 16:
                    continue
                number, data, held = heads[held[:16]], held, b""
            if number == connection and seen <= offset < seen + len(data):
                damaged = bytearray(data)
                damaged[offset - seen] ^= 0xFF
                data = bytes(damaged)
            sock.sendall(data)
            seen += len(data)

    return handle


def test_a_lying_server_is_caught_at_the_runs_connection_number_and_offset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Four connections over two processes: connection 3 is the second process's second.
    with LyingServer(flip_byte_on(3, 5000, 4)) as liar:
        status, report = load_json(
            capsys, liar.port, "-c", "4", "-s", "1000", "-d", "0.3", "--processes", "2"
        )
    assert status == 1
    assert report["ok"] is False and report["mismatches"] == 1, report
    (sample,) = report["mismatch_samples"]
    expected = PayloadPattern(seed=0).slice(3, 5000, 1)[0]
    assert (sample["connection"], sample["offset"]) == (3, 5000)
    assert (sample["expected"], sample["received"]) == (expected, expected ^ 0xFF)
    assert [part["mismatches"] for part in report["per_process"]] == [0, 1]
    assert report["per_process"][1]["mismatch_samples"] == [sample]
    assert_sums(report, 2)


def test_udp_rate_is_split_over_the_processes(capsys: pytest.CaptureFixture[str]) -> None:
    with UdpServer(*NO_RATE_LIMITS) as server:
        status, report = load_json(
            capsys, server.port, "--udp", "--pattern", "rate", "--rate", "600", "-c", "3",
            "-s", "300", "-d", "0.5", "--processes", "2",
        )  # fmt: skip
        counts = server.stop()
    assert status == 0, report
    assert_sums(report, 2)
    assert [part["rate"] for part in report["per_process"]] == [400, 200]
    assert report["late_datagrams"] == 0 and report["send_lag_us"]["count"] > 0
    assert counts["answered"] >= report["requests"] and counts["dropped"] == 0


def test_fewer_connections_than_processes_use_one_process_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Server(mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "2", "-d", "0.2", "--processes", "5")
        assert status == 0, report
        assert_sums(report, 2)
        status, report = load_json(capsys, server.port, "-c", "1", "-d", "0.2", "--processes", "3")
        assert status == 0, report
        assert_sums(report, 1)  # the run itself is its one process


@pytest.mark.parametrize(
    ("signal_number", "group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c to the process group", "sigterm to the parent"],
)
def test_a_stop_reaches_every_process_and_still_reports(signal_number: int, group: bool) -> None:
    with Server(mode="asyncio") as server:
        argv = [sys.executable, "-m", "echoplex", "load", "--port", str(server.port)]
        duration = ["-d", str(UNINTERRUPTED_S)]
        with Process([*argv, "-c", "4", *duration, "--processes", "2", "--json"]) as load:
            wait_for_lines(server, " open ", 4)
            if group:
                os.killpg(load.proc.pid, signal_number)  # as a terminal's Ctrl-C does
            else:
                load.signal(signal_number)
            status = load.wait(timeout_s=30)
        assert status == 0, load.stderr
        assert "Traceback" not in load.stderr
        report = json.loads(load.stdout)
        assert report["interrupted"] is True
        assert all(part["interrupted"] for part in report["per_process"])
        assert report["errors"] == 0 and report["mismatches"] == 0
        assert report["measured_s"] < UNINTERRUPTED_S  # cut short by the stop, not run out
        assert_sums(report, 2)
        # Every process closed its connections.
        wait_for_lines(server, " close ", 4)


def wait_for_lines(server: Server, word: str, count: int) -> None:
    """Until the server has logged `count` lines with `word` in them."""
    wait_for(
        lambda: sum(word in line for line in server.stderr_seen) >= count,
        20,
        lambda: f"{count} lines with {word!r}: {server.stderr[-3000:]}",
    )


def test_processes_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert process_count("auto") == len(os.sched_getaffinity(0))
    assert process_count("3") == 3
    for value, expected in [("0", "must be at least 1"), ("many", "not a whole number")]:
        status, out, err = run_cli(capsys, "load", "--processes", value)
        assert (status, out) == (2, "")
        assert err.startswith("echoplex load: error: argument --processes: ") and expected in err
        assert "(a number of processes, or auto)" in err and err.count("\n") == 1


def test_shares_split_connections_and_rates_in_proportion() -> None:
    config = LoadConfig(pattern="rate", rate_per_s=700.0, connections=7, connect_rate_per_s=70.0)
    parts = shares(config, 3)
    assert [(p.first_connection, p.connections) for p in parts] == [(0, 3), (3, 2), (5, 2)]
    assert [p.rate_per_s for p in parts] == [300.0, 200.0, 200.0]
    assert [p.connect_rate_per_s for p in parts] == [30.0, 20.0, 20.0]
    assert all(p.processes == 1 for p in parts)
