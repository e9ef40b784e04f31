"""`echoplex load` fails honestly: missing extras are one line before anything starts,
`--json` prints an object with an `error` field for every failed run (never an empty
stdout), and UDP losses against a server's default rate limit are named as such."""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

import pytest

from echoplex.load.config import LoadConfig
from echoplex.load.report import format_summary
from echoplex.load.result import UDP_DEFAULT_LIMITS, LoadResult

from .procs import Server
from .test_load import load_json, run_cli
from .test_udp import UdpServer

pytestmark = pytest.mark.timeout(60)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def failed_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    status, out, err = run_cli(capsys, "load", *args, "--json")
    assert out.count("\n") == 1, (out, err)
    report: dict[str, Any] = json.loads(out)
    assert report["ok"] is False and isinstance(report["error"], str), report
    assert err == f"echoplex load: error: {report['error']}\n"  # the same line, for people
    return status, report, err


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_refused_run_is_a_json_error(capsys: pytest.CaptureFixture[str], processes: str) -> None:
    port = closed_port()
    status, report, _ = failed_json(
        capsys, "--port", str(port), "-c", "2", "-d", "0.2", "--processes", processes
    )
    assert status == 1
    assert report["error"] == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert (report["port"], report["connections"], report["pattern"]) == (port, 2, "pingpong")


def test_every_kind_of_failed_start_is_a_json_error(
    capsys: pytest.CaptureFixture[str], certificate: tuple[str, str, str]
) -> None:
    status, report, _ = failed_json(capsys, "--host", "no-such-host.invalid", "-d", "0.2")
    assert status == 1 and report["error"].startswith("cannot resolve 'no-such-host.invalid'")
    port = closed_port()
    status, report, _ = failed_json(capsys, "--udp", "--port", str(port), "-d", "0.2")
    assert status == 1 and report["error"].startswith("no udp echo server at ")
    assert report["transport"] == "udp"
    cert_file, key_file, _ = certificate
    with Server("--tls-cert", cert_file, "--tls-key", key_file, mode="asyncio") as server:
        status, report, _ = failed_json(capsys, "--port", str(server.port), "--tls", "-d", "0.2")
    assert status == 1 and "CERTIFICATE_VERIFY_FAILED" in report["error"]


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("hdrh", [], "hdrhistogram is not installed: pip install 'echoplex[load]'"),
        ("uvloop", ["--loop", "uvloop"], "uvloop is not installed: pip install 'echoplex[uvloop]'"),
    ],
)
def test_a_missing_extra_is_one_line_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    # Nothing listens there: had a connection been tried, that would be the error.
    port = str(closed_port())
    # A usage error (exit 2), as every missing extra is: one line, even with --json.
    for json_flag in ([], ["--json"]):
        status, out, err = run_cli(
            capsys, "load", "--port", port, "--processes", "2", *args, *json_flag
        )
        assert (status, out) == (2, ""), json_flag
        assert err.startswith(f"echoplex load: error: {expected}") and err.count("\n") == 1, err


def test_bad_arguments_stay_one_line_on_stderr_even_with_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for args in (["-c", "0"], ["--rate", "5"]):
        status, out, err = run_cli(capsys, "load", *args, "--json")
        assert (status, out) == (2, "")
        assert err.startswith("echoplex load: error: ") and err.count("\n") == 1


def test_losses_at_the_servers_default_udp_rate_limit_are_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The server's default limits: 100 datagrams a second per source, bursts of 200.
    with UdpServer() as server:
        args = ["--udp", "-c", "4", "-d", "1", "--timeout", "0.2"]
        status, report = load_json(capsys, server.port, *args)
        counts = server.stop()
    assert status == 1 and report["errors_by_kind"]["lost"] > 0, report
    assert counts["by_reason"].get("rate-source", 0) > 0
    suspected = report["udp_limit_suspected"]
    assert (suspected["option"], suspected["rate_per_s"], suspected["burst"]) == (
        "--udp-rate",
        100,
        200,
    )
    # Never more than the server answered (which includes the probe before the run).
    assert suspected["datagrams_answered"] < counts["answered"]


def udp_result(answered: int, lost: int, sending_s: float) -> LoadResult:
    result = LoadResult(LoadConfig(udp=True), loop="asyncio")
    result.requests = result.echoed_total = answered
    result.errors_by_kind = {"lost": lost} if lost else {}
    result.late_datagrams = 0
    result.sending_s = sending_s
    return result


def test_which_losses_fit_a_default_limit() -> None:
    per_source, total = UDP_DEFAULT_LIMITS
    assert (per_source.rate_per_s, per_source.burst) == (100, 200)
    assert (total.rate_per_s, total.burst) == (10_000, 20_000)
    assert udp_result(300, 700, 1.0).udp_limit_met() == per_source  # 200 + 100 a second
    assert udp_result(230, 700, 1.0).udp_limit_met() == per_source  # waits while it fills
    assert udp_result(52, 300, 0.6).udp_limit_met() is None  # a limit set lower by hand
    assert udp_result(5_000, 700, 1.0).udp_limit_met() is None  # more than it lets through
    assert udp_result(30_000, 9_000, 1.0).udp_limit_met() == total
    assert udp_result(300, 0, 1.0).udp_limit_met() is None  # nothing lost
    (hint,) = [
        line
        for line in format_summary(udp_result(300, 700, 1.0)).splitlines()
        if line.startswith("hint ")
    ]
    assert hint == (
        "hint         700 datagrams lost: 300 answered in 1.0 s is about what the server's "
        "per-source rate limit lets through at its default (--udp-rate 100: a burst of 200, "
        "then 100 a second); start `echoplex serve` with --udp-rate 0 (no limit) or above "
        "the load"
    )
    summary = udp_result(300, 700, 1.0).to_json()["udp_limit_suspected"]
    assert summary == {
        "option": "--udp-rate",
        "rate_per_s": 100.0,
        "burst": 200.0,
        "datagrams_answered": 300,
        "sending_s": 1.0,
    }
