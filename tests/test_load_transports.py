"""`echoplex load` over every transport the server and client speak: TLS, Unix sockets,
PROXY headers, UDP; against real `echoplex serve` processes, and UDP servers that lie
(drop, corrupt, duplicate, cross datagrams), which it must catch."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from echoplex.load.config import LoadConfig
from echoplex.load.connections import Tally
from echoplex.load.datagrams import DatagramPingPong, DatagramRate
from echoplex.payload import PayloadPattern

from .procs import Process, Server, echoplex, needs_ipv6
from .test_load import load_json, run_cli
from .test_udp import UdpServer

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio", "uvloop"] if importlib.util.find_spec("uvloop") else ["asyncio"]
CLEAN_PATTERNS = {
    "pingpong": ["--pattern", "pingpong", "-s", "1K", "-d", "0.2"],
    "rate": ["--pattern", "rate", "--rate", "300", "-s", "700", "-d", "0.2"],
    "stream": ["--pattern", "stream", "-s", "4KiB", "--window", "64K", "-d", "0.2"],
    "hold": ["--pattern", "hold", "-s", "100", "-d", "0.2"],
}
NO_RATE_LIMITS = ("--udp-rate", "0", "--udp-rate-total", "0")
VIA = re.compile(r"open 127\.0\.0\.1:(\d+) via 127\.0\.0\.1:\1\b")


def assert_clean(report: dict[str, Any], connections: int, where: str = "") -> None:
    where = f"{where}: {report}"
    assert report["ok"] is True, where
    assert report["requests"] > 0, where
    assert report["errors"] == 0 and report["errors_by_kind"] == {}, where
    assert report["mismatches"] == 0, where
    assert report["connections_opened"] == connections, where
    assert report["connections_alive"] == connections, where


# --- TLS -----------------------------------------------------------------------------


def tls_server(certificate: tuple[str, str, str], mode: str, *args: str) -> Server:
    cert_file, key_file, _ = certificate
    return Server("--tls-cert", cert_file, "--tls-key", key_file, *args, mode=mode)


@pytest.mark.parametrize(
    ("mode", "patterns"),
    [("threads", ["pingpong", "stream"]), ("asyncio", list(CLEAN_PATTERNS))],
)
def test_patterns_over_tls_verify_clean(
    capsys: pytest.CaptureFixture[str],
    certificate: tuple[str, str, str],
    mode: str,
    patterns: list[str],
) -> None:
    ca_file = certificate[2]
    with tls_server(certificate, mode) as server:
        for loop in LOOPS:
            for pattern in patterns:
                status, report = load_json(
                    capsys, server.port, "--tls", "--ca", ca_file, "--loop", loop, "-c", "3",
                    *CLEAN_PATTERNS[pattern],
                )  # fmt: skip
                where = f"{mode} {loop} {pattern}"
                assert status == 0, f"{where}: {report}"
                assert_clean(report, 3, where)
                assert (report["transport"], report["loop"]) == ("tls", loop)
        assert server.stop() == 0


def test_an_unverified_server_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], certificate: tuple[str, str, str]
) -> None:
    with tls_server(certificate, "asyncio") as server:
        status, out, err = run_cli(capsys, "load", "--port", str(server.port), "--tls", "-d", "0.2")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith(f"echoplex load: error: TLS with 127.0.0.1:{server.port} failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in err


@pytest.mark.parametrize("loop", LOOPS)
def test_handshakes_that_fail_later_are_tls_errors_with_one_line_samples(
    capsys: pytest.CaptureFixture[str], certificate: tuple[str, str, str], loop: str
) -> None:
    # The server takes one connection and closes any more at once: mid-handshake.
    with tls_server(certificate, "asyncio", "--max-connections", "1") as server:
        status, report = load_json(
            capsys, server.port, "--tls", "--ca", certificate[2], "--loop", loop,
            "-c", "3", "-d", "0.2",
        )  # fmt: skip
    assert status == 1
    assert report["errors_by_kind"] == {"tls": 2}, report
    assert report["connections_opened"] == 1 and report["mismatches"] == 0
    for sample in report["error_samples"]:
        assert sample["kind"] == "tls" and sample["connection"] in (1, 2)
        assert sample["detail"] and "\n" not in sample["detail"]


# --- Unix sockets --------------------------------------------------------------------


def unix_server(path: str, mode: str, *args: str) -> Process:
    argv = [sys.executable, "-m", "echoplex", "serve", "--unix", path, "--mode", mode, *args]
    server = Process(argv)
    server.wait_for_stderr(re.escape(f"listening on {path}"))
    return server


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_pingpong_and_stream_over_a_unix_socket(
    capsys: pytest.CaptureFixture[str], unix_path: str, mode: str
) -> None:
    with unix_server(unix_path, mode) as server:
        for pattern in ("pingpong", "stream"):
            status, out, err = run_cli(
                capsys, "load", "--unix", unix_path, "-c", "3", *CLEAN_PATTERNS[pattern], "--json"
            )
            assert status == 0, err
            report = json.loads(out)
            assert_clean(report, 3, pattern)
            assert (report["transport"], report["unix_path"]) == ("unix", unix_path)
        server.wait_for_stderr(r"close unix#\d+ in=\d+ out=\d+")


def test_a_missing_unix_socket_is_one_line(
    capsys: pytest.CaptureFixture[str], unix_path: str
) -> None:
    status, out, err = run_cli(capsys, "load", "--unix", unix_path, "-d", "0.2")
    assert (status, out) == (1, "")
    assert err == (
        f"echoplex load: error: cannot connect to unix:{unix_path}: No such file or directory\n"
    )


# --- PROXY headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "tls"), [("v1", False), ("v2", False), ("v2", True)], ids=["v1", "v2", "v2-tls"]
)
def test_each_connection_names_itself_in_a_proxy_header(
    capsys: pytest.CaptureFixture[str], certificate: tuple[str, str, str], version: str, tls: bool
) -> None:
    cert_file, key_file, ca_file = certificate
    tls_args = ["--tls-cert", cert_file, "--tls-key", key_file] if tls else []
    proxy_args = ["--proxy-protocol", "--trusted-proxy", "127.0.0.1/32"]
    with Server(*proxy_args, *tls_args, mode="asyncio") as server:
        client_tls = ["--tls", "--ca", ca_file] if tls else []
        status, report = load_json(
            capsys, server.port, "--send-proxy", version, *client_tls, "-c", "2", "-d", "0.2"
        )
        assert status == 0, report
        assert_clean(report, 2)
        assert report["proxy_header"] == version
        assert report["transport"] == ("tls" if tls else "tcp")
        # The server read each header (sent before TLS) and logged the client it names.
        server.wait_for_stderr(VIA)
        first = next(i for i, line in enumerate(server.stderr_seen) if VIA.search(line))
        server.wait_for_stderr(VIA, start=first + 1)


# --- UDP against the real server -----------------------------------------------------


@pytest.fixture(scope="module")
def udp_server() -> Iterator[UdpServer]:
    with UdpServer(*NO_RATE_LIMITS) as server:
        yield server


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "args",
    [
        ["--pattern", "pingpong", "-c", "4", "-s", "1K"],
        ["--pattern", "rate", "--rate", "1000", "-c", "4", "-s", "300"],
        ["--pattern", "pingpong", "-c", "2", "-s", "65507"],  # the largest datagram
    ],
    ids=["pingpong", "rate", "largest"],
)
def test_udp_verifies_clean_against_the_server(
    capsys: pytest.CaptureFixture[str], udp_server: UdpServer, loop: str, args: list[str]
) -> None:
    status, report = load_json(capsys, udp_server.port, "--udp", "--loop", loop, "-d", "0.3", *args)
    assert status == 0, report
    assert_clean(report, int(args[args.index("-c") + 1]))
    assert report["transport"] == "udp" and report["late_datagrams"] == 0
    assert report["timeout_s"] == 2.0  # the UDP default, as `echoplex client --udp`


@needs_ipv6
def test_udp_over_ipv6_verifies_clean(capsys: pytest.CaptureFixture[str]) -> None:
    with UdpServer("--host", "::1", *NO_RATE_LIMITS) as server:
        status, report = load_json(
            capsys, server.port, "--udp", "--host", "::1", "-c", "3", "-s", "1200", "-d", "0.3"
        )
        counts = server.stop()
    assert status == 0, report
    assert_clean(report, 3)
    assert report["host"] == "::1" and report["transport"] == "udp"
    # Every verified echo was a datagram the server answered (plus the run's probe).
    assert counts["answered"] >= report["requests"] and counts["dropped"] == 0


def test_a_rate_limited_udp_server_loses_datagrams_and_says_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with UdpServer("--udp-rate", "20") as server:  # bursts of 40, then 20 a second
        status, out, _ = run_cli(
            capsys, "load", "--udp", "--port", str(server.port), "-c", "2", "-d", "0.6",
            "--timeout", "0.1",
        )  # fmt: skip
        counts = server.stop()
    assert status == 1
    assert re.search(r"^errors +\d+ \(lost \d+\)$", out, re.M), out
    assert re.search(r"^mismatches   0$", out, re.M), out
    assert "hint         " in out and "the server may be rate-limiting: see --udp-rate" in out
    assert counts["by_reason"].get("rate-source", 0) > 0


def test_no_udp_server_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    status, out, err = run_cli(capsys, "load", "--udp", "--port", str(port), "-d", "0.2")
    assert (status, out) == (1, "")
    assert (
        err == f"echoplex load: error: no udp echo server at 127.0.0.1:{port}: Connection refused\n"
    )


# --- UDP servers that lie ------------------------------------------------------------

Reply = list[tuple[bytes, Any]]
Liar = Callable[[bytes, Any], Reply]


class LyingUdpServer:
    """A UDP echo in a thread whose `answer(data, source)` says what to send, and where."""

    def __init__(self, answer: Liar) -> None:
        self.answer = answer
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:  # an ICMP error for an earlier answer: nothing to do
                continue
            for reply, destination in self.answer(data, source):
                with contextlib.suppress(OSError):
                    self.sock.sendto(reply, destination)

    def __enter__(self) -> LyingUdpServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def per_source(answer: Callable[[int, bytes], list[bytes]]) -> Liar:
    """`answer(n, data)` for the n-th datagram (from 0) of each source, back to it."""
    seen: dict[Any, int] = {}

    def reply(data: bytes, source: Any) -> Reply:
        n = seen[source] = seen.get(source, -1) + 1
        return [(out, source) for out in answer(n, data)]

    return reply


def flip_byte(n: int, data: bytes, which: int = 2, at: int = 100) -> list[bytes]:
    if n != which:
        return [data]
    damaged = bytearray(data)
    damaged[at] ^= 0xFF
    return [bytes(damaged)]


def other_sources_datagram() -> Liar:
    """Answers each source with the last datagram of the same size another source sent
    (a datagram echoed to the wrong socket); honest while there is none."""
    last: dict[Any, bytes] = {}

    def reply(data: bytes, source: Any) -> Reply:
        others = [d for s, d in last.items() if s != source and len(d) == len(data)]
        last[source] = data
        return [(others[-1] if others else data, source)]

    return reply


def test_udp_datagrams_a_server_drops_are_lost_errors_not_mismatches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingUdpServer(per_source(lambda n, data: [data] if n % 2 == 0 else [])) as liar:
        status, report = load_json(
            capsys, liar.port, "--udp", "-c", "2", "-s", "200", "-d", "0.5", "--timeout", "0.1"
        )
    assert status == 1
    assert report["ok"] is False
    assert set(report["errors_by_kind"]) == {"lost"} and report["errors"] > 0, report
    assert report["mismatches"] == 0
    assert report["requests"] > 0
    assert report["connections_alive"] == 2  # a loss does not end the connection
    for sample in report["error_samples"]:
        assert sample["offset"] % 200 == 0  # the lost datagram's own offset
        assert (sample["offset"] // 200) % 2 == 1  # every other one, from datagram 1


@pytest.mark.parametrize(
    "pattern", [["--pattern", "pingpong"], ["--pattern", "rate", "--rate", "200"]]
)
def test_a_corrupted_udp_byte_is_a_mismatch_with_connection_and_offset(
    capsys: pytest.CaptureFixture[str], pattern: list[str]
) -> None:
    with LyingUdpServer(per_source(flip_byte)) as liar:
        status, report = load_json(
            capsys, liar.port, "--udp", "-c", "1", "-s", "500", "-d", "0.3", *pattern
        )
    assert status == 1
    assert report["mismatches"] == 1 and report["errors"] == 0, report
    (sample,) = report["mismatch_samples"]
    assert (sample["connection"], sample["offset"]) == (0, 2 * 500 + 100)  # datagram 2
    assert sample["expected"] == PayloadPattern(0).slice(0, 1100, 1)[0]
    assert sample["received"] == sample["expected"] ^ 0xFF


def test_a_udp_datagram_echoed_to_the_wrong_socket_is_a_mismatch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingUdpServer(other_sources_datagram()) as liar:
        status, report = load_json(
            capsys, liar.port, "--udp", "-c", "2", "-s", "64", "-d", "0.3", "--timeout", "0.2"
        )
    assert status == 1
    assert report["mismatches"] >= 1 and report["late_datagrams"] == 0, report
    payload = PayloadPattern(0)
    for sample in report["mismatch_samples"]:
        mine, offset = sample["connection"], sample["offset"]
        assert mine in (0, 1)
        seq, at = divmod(offset, 64)
        assert sample["expected"] == payload.slice(mine, offset, 1)[0]
        # What came back is the other connection's byte at the same place of one of its
        # datagrams: the first where the two differ.
        theirs = [payload.slice(1 - mine, k * 64, 64) for k in range(seq + 2)]
        ours = payload.slice(mine, seq * 64, 64)
        assert any(
            datagram[at] == sample["received"]
            and next(i for i in range(64) if datagram[i] != ours[i]) == at
            for datagram in theirs
        ), sample


def test_duplicated_udp_echoes_are_counted_late_not_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with LyingUdpServer(per_source(lambda n, data: [data, data])) as liar:
        status, report = load_json(capsys, liar.port, "--udp", "-c", "2", "-s", "100", "-d", "0.3")
    assert status == 0, report
    assert_clean(report, 2)
    assert report["late_datagrams"] > 0


# --- options that do not go together -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--udp", "--pattern", "stream"], "--pattern stream does not go with --udp: UDP has no"),
        (["--udp", "--pattern", "hold"], "--pattern hold does not go with --udp: UDP has no"),
        (["--udp", "--tls"], "--udp does not go with --tls, --unix or --send-proxy"),
        (["--udp", "--unix", "/tmp/x.sock"], "--udp does not go with --tls, --unix or"),
        (["--udp", "--send-proxy", "v1"], "--udp does not go with --tls, --unix or"),
        (["--udp", "-s", "65508"], "with --udp, size must be 1..65507 bytes (one datagram)"),
        (["--ca", "ca.pem"], "--ca and --insecure go with --tls"),
        (["--insecure"], "--ca and --insecure go with --tls"),
        (["--tls", "--ca", "/nonexistent/ca.pem"], "no such CA file: /nonexistent/ca.pem"),
        (["--send-proxy", "v3"], "invalid choice: 'v3'"),
    ],
)
def test_bad_transport_options_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    status, out, err = run_cli(capsys, "load", *args)
    assert (status, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith("echoplex load: error: ") and expected in err, err


def test_a_ca_file_that_is_not_certificates_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    status, _, err = run_cli(capsys, "load", "--tls", "--ca", str(bogus))
    assert status == 2
    assert err.count("\n") == 1 and f"cannot load CA file {bogus}: " in err, err


def test_a_bad_combination_from_the_real_command_has_no_traceback() -> None:
    result = echoplex("load", "--udp", "--pattern", "hold")
    assert result.returncode == 2
    assert result.stderr == (
        "echoplex load: error: --pattern hold does not go with --udp: UDP has no connections "
        "to hold open (use pingpong or rate)\n"
    )


def test_the_config_checks_transport_combinations_too() -> None:
    with pytest.raises(ValueError, match="`udp` does not go with"):
        LoadConfig(udp=True, tls=True)
    with pytest.raises(ValueError, match="`send_proxy` must be one of v1, v2"):
        LoadConfig(send_proxy="v9")
    assert LoadConfig(udp=True).transport == "udp"
    assert LoadConfig(unix_path="/tmp/e.sock", tls=True).transport == "tls"
    assert LoadConfig(unix_path="/tmp/e.sock").target == "unix:/tmp/e.sock"
    assert LoadConfig(port=7, send_proxy="v2", tls=True).target == "tls 127.0.0.1:7 with PROXY v2"


# --- the datagram connections, without sockets ---------------------------------------

PAYLOAD = PayloadPattern(seed=0)


class FakeDatagramTransport:
    """Records what a connection sends; no I/O."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.aborted = self.closed = False

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


def udp_tally(**config: Any) -> Tally:
    tally = Tally(LoadConfig(udp=True, timeout_s=1.0, **config))
    tally.sending = True
    tally.window_start_ns = 0
    return tally


def test_datagram_pingpong_late_lost_and_wrong_echoes() -> None:
    tally = udp_tally(size_bytes=10)
    connection = DatagramPingPong(tally, PAYLOAD, 3)
    transport = FakeDatagramTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.begin()
    connection.datagram_received(transport.sent[0], None)  # datagram 0 back
    assert connection.answered == 1 and transport.sent[1] == PAYLOAD.slice(3, 10, 10)
    connection.datagram_received(transport.sent[0], None)  # datagram 0 again: a duplicate
    assert tally.late_datagrams == 1 and tally.mismatches == 0 and connection.alive
    # Datagram 1 never comes back: lost once its timeout has passed, and 2 goes out.
    connection.watch(0.25, connection.sent_ns + tally.timeout_ns - 1)
    assert tally.errors_by_kind == {} and len(transport.sent) == 2
    connection.watch(0.25, connection.sent_ns + tally.timeout_ns)
    assert tally.errors_by_kind == {"lost": 1}
    assert tally.error_samples[0].offset == 10
    assert transport.sent[2] == PAYLOAD.slice(3, 20, 10)
    connection.datagram_received(transport.sent[1], None)  # datagram 1, after all: late
    assert tally.late_datagrams == 2 and connection.alive
    connection.datagram_received(transport.sent[2][:4], None)  # a clean prefix of 2
    assert tally.errors_by_kind == {"lost": 1, "truncated": 1} and not connection.alive


def test_datagram_pingpong_foreign_bytes_are_a_mismatch_at_their_offset() -> None:
    tally = udp_tally(size_bytes=10)
    connection = DatagramPingPong(tally, PAYLOAD, 0)
    transport = FakeDatagramTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.begin()
    connection.datagram_received(transport.sent[0], None)
    damaged = bytearray(transport.sent[1])
    damaged[7] ^= 1
    connection.datagram_received(bytes(damaged), None)
    (mismatch,) = tally.mismatch_samples
    assert (mismatch.connection, mismatch.offset) == (0, 17)
    assert transport.aborted and not connection.alive


def test_datagram_rate_accepts_reordered_echoes_and_expires_the_oldest() -> None:
    tally = udp_tally(size_bytes=8, pattern="rate", rate_per_s=1000.0)
    connection = DatagramRate(tally, PAYLOAD, 1)
    transport = FakeDatagramTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.schedule(first_ns=0.0, interval_ns=1000.0)
    for _ in range(3):
        connection.send_due()
    connection.datagram_received(transport.sent[2], None)  # out of order: fine for UDP
    connection.datagram_received(transport.sent[1], None)
    assert connection.answered == 2 and connection.in_flight() == 1
    assert sum(tally.latency_counts.values()) == 2 and tally.mismatches == 0
    connection.watch(0.25, connection.flying[0][1] + tally.timeout_ns)
    assert tally.errors_by_kind == {"lost": 1} and tally.error_samples[0].offset == 0
    assert connection.outstanding() == 0 and connection.settled()
    connection.datagram_received(transport.sent[0], None)  # the lost one, late
    assert tally.late_datagrams == 1 and connection.alive
