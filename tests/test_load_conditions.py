"""`echoplex load` tells the truth against a server with conditions on purpose (issue 20):
latency percentiles include the delay, every byte is still verified, and a connection
the server ends is counted with its cause (a FIN told from a reset), with exit status
1, as against any broken server.

Real `echoplex serve` processes on free ports; each load runs in this process. Time is
only ever checked from below, by what the condition itself implies (an echo held 50 ms
cannot come back sooner): a busy machine makes a server late, never early.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from echoplex.conditions import PACING_QUANTUM_S

from .procs import Server
from .test_load import load_json

pytestmark = pytest.mark.timeout(60)

LATENCY_US = 50_000


def verified_clean(report: dict[str, Any], size: int) -> None:
    """Every message counted was echoed whole and verified, and nothing went wrong."""
    assert report["ok"] is True, report
    assert (report["errors"], report["mismatches"]) == (0, 0), report
    assert report["requests"] > 0
    assert report["latency_us"]["count"] == report["requests"]
    assert report["bytes"] == report["requests"] * size


@pytest.fixture(scope="module")
def delayed() -> Iterator[Server]:
    with Server("--latency", "50ms", mode="asyncio") as server:
        yield server


@pytest.mark.parametrize(
    "pattern",
    [["--pattern", "pingpong"], ["--pattern", "stream"], ["--pattern", "rate", "--rate", "40"]],
)
def test_latency_is_in_every_percentile(
    capsys: pytest.CaptureFixture[str], delayed: Server, pattern: list[str]
) -> None:
    # Every echo is held 50 ms from the moment the server read it: no message, in any
    # pattern, can be measured under that (`rate` measures from the intended send,
    # which is never after the actual one).
    status, report = load_json(capsys, delayed.port, "-c", "2", "-d", "1", *pattern)
    assert status == 0
    verified_clean(report, 1024)
    latency = report["latency_us"]
    assert latency["min"] >= LATENCY_US, latency
    assert latency["p50"] >= LATENCY_US and latency["p99"] >= LATENCY_US


def test_a_sliced_echo_is_verified_and_held_by_its_slices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    size = 100
    with Server("--slice", "7", "--slice-delay", "1ms", mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "2", "-d", "1", "-s", str(size))
        assert server.stop() == 0
    assert status == 0
    verified_clean(report, size)
    # 100 bytes in slices of 7 are 15 slices, 1 ms apart: the last leaves 14 ms after the first.
    assert report["latency_us"]["min"] >= (math.ceil(size / 7) - 1) * 1000, report["latency_us"]


def test_a_bandwidth_cap_is_verified_and_paces_each_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rate, size = 64 * 1024, 16 * 1024
    with Server("--bandwidth", "64KiB", mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "2", "-d", "1", "-s", str(size))
        assert server.stop() == 0
    assert status == 0
    verified_clean(report, size)
    # The cap sends pieces of at most a quantum's worth, each followed by its time at the
    # rate: a message's last piece leaves at least (size - one piece) / rate after its first.
    piece = int(rate * PACING_QUANTUM_S)
    assert report["latency_us"]["min"] >= (size - piece) * 1_000_000 // rate, report


def test_a_stall_that_ends_is_in_the_latency_not_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ("--stall-after", "500", "--stall-for", "300ms")
    with Server(*args, mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "2", "-d", "1", "-s", "100")
        assert server.stop() == 0
    assert status == 0
    verified_clean(report, 100)
    # The message that crosses byte 500 waits out the stall (each connection has one).
    assert report["latency_us"]["max"] >= 300_000, report["latency_us"]


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize(
    ("condition", "kind", "detail"),
    [
        ("--close-after", "closed early", "the server closed the connection"),
        ("--reset-after", "reset", "Connection reset by peer"),
    ],
)
def test_a_connection_the_server_ends_is_counted_with_its_cause(
    capsys: pytest.CaptureFixture[str], condition: str, kind: str, detail: str, processes: str
) -> None:
    # 1050 bytes of echo, then a FIN or an RST: 10 whole messages of 100 bytes verified
    # and counted on each connection, the 11th cut off 50 bytes in.
    with Server(condition, "1050", mode="asyncio") as server:
        args = ("-c", "4", "-d", "1", "-s", "100", "--processes", processes)
        status, report = load_json(capsys, server.port, *args)
        assert server.stop() == 0
    assert status == 1 and report["ok"] is False  # as for any server that breaks
    assert report["errors_by_kind"] == {kind: 4}, report
    assert report["mismatches"] == 0
    assert report["requests"] == 4 * 10
    assert [(f["kind"], f["offset"], f["detail"]) for f in report["error_samples"]] == [
        (kind, 1050, detail)
    ] * 4
    assert report["tls_suspected"] is None  # it echoed: nothing says it speaks TLS


def test_a_server_that_never_echoes_is_a_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with Server("--stall-after", "0", "--drain-timeout", "0", mode="asyncio") as server:
        args = ("-c", "2", "-d", "0.5", "--timeout", "1")
        status, report = load_json(capsys, server.port, *args)
        assert server.stop() == 0
    assert status == 1
    assert report["errors_by_kind"] == {"timeout": 2}, report
    assert (report["requests"], report["mismatches"]) == (0, 0)
    assert all(failure["offset"] == 0 for failure in report["error_samples"])
    assert report["tls_suspected"] is None


def test_only_the_connections_that_drew_the_condition_are_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Half the connections, drawn by a seeded --toxicity, are closed at byte 1050; load's
    # count of connections closed early is the server's own count of them, and every
    # other connection's echo is verified to the end.
    args = ("--close-after", "1050", "--toxicity", "0.5", "--condition-seed", "1")
    with Server(*args, mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "8", "-d", "1", "-s", "100")
        assert server.stop() == 0
    closed_by_server = server.stderr.count("outcome=close-after")
    assert 0 < closed_by_server < 8, server.stderr  # this seed draws some, not all
    assert status == 1
    assert report["errors_by_kind"] == {"closed early": closed_by_server}, report
    assert report["mismatches"] == 0
    assert report["connections_alive"] == 8 - closed_by_server
    assert all(failure["offset"] == 1050 for failure in report["error_samples"])


def test_a_slow_close_after_the_run_is_no_error(capsys: pytest.CaptureFixture[str]) -> None:
    # The server waits an hour after load's EOF before it closes: load has every echo
    # back by then, and its own close does not wait for the server's.
    with Server("--slow-close", "1h", "--drain-timeout", "0", mode="asyncio") as server:
        status, report = load_json(capsys, server.port, "-c", "2", "-d", "0.5")
        assert server.stop() == 0
    assert status == 0
    verified_clean(report, 1024)
