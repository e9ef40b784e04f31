"""Prometheus metrics and /healthz, checked against a known load on every model."""

from __future__ import annotations

import logging
import re
import signal
import socket
import sys
import threading
import types
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echoplex import ServerConfig, run
from echoplex.events import ConnectionRecord, QuietEvents
from echoplex.models import threads
from echoplex.shutdown import Shutdown

from .procs import Server, echoplex
from .test_contract import recv_exactly
from .waiting import wait_for

METRICS_LINE = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def metrics_url(server: Server, path: str) -> str:
    match = server.wait_for_stderr(METRICS_LINE)
    return f"http://{match.group(1)}:{match.group(2)}{path}"


def scrape(server: Server) -> Samples:
    """Samples by name, then by labels (without model/worker, summed over workers)."""
    with urllib.request.urlopen(metrics_url(server, "/metrics"), timeout=10) as response:
        text = response.read().decode()
    samples: Samples = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(
                sorted(
                    (k, v) for k, v in sample.labels.items() if k not in ("model", "worker", "pid")
                )
            )
            samples[sample.name][labels] += sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if wanted <= set(k))


def settled(server: Server, closed: int) -> Samples:
    """A scrape once the server has seen `closed` connections end (closes are reported
    a moment after the client's) and none is open."""
    samples: Samples = {}

    def ended() -> Samples | None:
        nonlocal samples
        samples = scrape(server)
        done = (
            total(samples, "echoplex_connections_closed_total") == closed
            and total(samples, "echoplex_connections_open") == 0
        )
        return samples if done else None

    return wait_for(ended, 10, lambda: f"{closed} connections closed, none open: {samples}")


def health(server: Server) -> int:
    try:
        with urllib.request.urlopen(metrics_url(server, "/healthz"), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize("mode", ["simple", "threads", "pool", "asyncio", "workers"])
def test_counts_match_a_known_load_exactly(mode: str) -> None:
    with Server(
        "--metrics-port", "0", "--max-connections", "3", "--workers", "2", mode=mode
    ) as server:
        assert health(server) == 200
        sent = 0
        for size in (1, 10, 1000, 70_000, 5):
            with socket.create_connection(server.address, timeout=10) as sock:
                data = bytes([size % 251]) * size
                sock.sendall(data)
                assert recv_exactly(sock, size) == data
                sent += size
        rejected = 0
        if mode not in ("simple", "workers"):  # one worker-independent limit to exceed
            settled(server, closed=5)  # every slot free again
            held = [socket.create_connection(server.address, timeout=10) for _ in range(3)]
            try:
                for sock in held:
                    sock.sendall(b"x")
                    assert recv_exactly(sock, 1) == b"x"
                    sent += 1
                with socket.create_connection(server.address, timeout=10) as extra:
                    assert extra.recv(1) == b""
                rejected = 1
            finally:
                for sock in held:
                    sock.close()
        accepted = 5 + (3 if rejected else 0)

        samples = settled(server, closed=accepted)
        assert total(samples, "echoplex_connections_accepted_total") == accepted
        assert total(samples, "echoplex_connections_closed_total", outcome="closed") == accepted
        assert total(samples, "echoplex_connections_open") == 0
        assert total(samples, "echoplex_bytes_received_total") == sent
        assert total(samples, "echoplex_bytes_sent_total") == sent
        assert (
            total(samples, "echoplex_connections_rejected_total", reason="max-connections")
            == rejected
        )
        assert total(samples, "echoplex_errors_total") == 0
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ["simple", "threads", "pool", "asyncio", "workers"])
def test_the_echo_held_on_purpose_is_measured(mode: str) -> None:
    """Each piece of a delayed, sliced echo is one observation of how long it was held,
    and none is shorter than the latency: the delay line never lets a byte go sooner."""
    with Server(
        "--metrics-port", "0", "--latency", "200ms", "--slice", "4", "--workers", "2",
        mode=mode,
    ) as server:  # fmt: skip
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"0123456789ab")  # three slices of 4
            assert recv_exactly(sock, 12) == b"0123456789ab"
        samples = settled(server, closed=1)
        count = total(samples, "echoplex_echo_held_seconds_count")
        assert count >= 3  # a read may split the twelve bytes: then more pieces
        assert total(samples, "echoplex_echo_held_seconds_sum") >= 0.2 * count
        assert total(samples, "echoplex_echo_held_seconds_bucket", le="0.1") == 0
        assert total(samples, "echoplex_echo_held_seconds_bucket", le="+Inf") == count
        assert server.stop() == 0


def test_workers_report_per_worker_series() -> None:
    with Server("--metrics-port", "0", "--workers", "2", mode="workers") as server:
        for _ in range(20):
            with socket.create_connection(server.address, timeout=10) as sock:
                sock.sendall(b"hi")
                assert recv_exactly(sock, 2) == b"hi"
        url = metrics_url(server, "/metrics")
        accepted: list[tuple[str, str]] = []

        def all_counted() -> bool:
            nonlocal accepted
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            accepted = re.findall(
                r'echoplex_connections_accepted_total\{[^}]*worker="(worker-\d)"[^}]*\} (\S+)', text
            )
            return sum(float(v) for _, v in accepted) == 20

        wait_for(all_counted, 10, lambda: f"20 connections accepted by the workers: {accepted}")
        assert {w for w, _ in accepted} <= {"worker-0", "worker-1"}


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_healthz_says_503_while_draining(mode: str) -> None:
    with Server("--metrics-port", "0", "--workers", "1", mode=mode) as server:
        assert health(server) == 200
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"hold")
            assert recv_exactly(sock, 4) == b"hold"
            server.signal(signal.SIGTERM)
            server.wait_for_stderr("stopping")
            assert health(server) == 503
        assert server.wait() == 0


def test_metrics_without_prometheus_client_is_one_line(tmp_path: Path) -> None:
    # Shadow the package with one that cannot be imported, as on a machine without it.
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "echoplex", "serve", "--port", "0", "--metrics-port", "0"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "echoplex serve: error: metrics need prometheus-client: pip install 'echoplex[metrics]'\n"
    )


def test_busy_metrics_port_is_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        result = echoplex("serve", "--port", "0", "--metrics-port", str(holder.getsockname()[1]))
    assert result.returncode == 2
    assert "cannot serve metrics on 127.0.0.1" in result.stderr
    assert result.stderr.count("\n") == 1


def test_udp_datagrams_answered_and_dropped() -> None:
    with Server("--udp", "--tcp", "--metrics-port", "0", mode="asyncio") as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for index in range(5):
                client.sendto(b"d%d" % index, server.address)
                assert client.recv(100) == b"d%d" % index
        reserved = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            reserved.bind(("127.0.0.1", 19))  # chargen's port: never answered
        except PermissionError:
            reserved.close()
            pytest.skip("binding port 19 needs root")
        with reserved:
            reserved.sendto(b"loop?", server.address)

        def with_a_drop() -> Samples | None:
            samples = scrape(server)
            return samples if total(samples, "echoplex_udp_datagrams_dropped_total") else None

        samples = wait_for(with_a_drop, 10, "a dropped datagram counted")
        assert total(samples, "echoplex_udp_datagrams_answered_total") == 5
        assert total(samples, "echoplex_udp_datagrams_dropped_total", reason="reserved-port") == 1


class Heard(QuietEvents):
    """Says when the server listens (and where) and when a connection has been counted
    and closed: the metrics wrap these events and count first."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self.listens = threading.Event()
        self.closes = threading.Event()

    def listening(self, addresses: list[Any]) -> None:
        self.address = addresses[0]
        self.listens.set()

    def connection_closed(self, record: ConnectionRecord) -> None:
        self.closes.set()


@pytest.mark.timeout(60)
def test_series_are_labelled_with_the_model_that_runs(caplog: pytest.LogCaptureFixture) -> None:
    # A model of one's own, passed as a module object, while the config's mode names
    # another: every series says which model served, as echoplex_build_info does.
    caplog.set_level(logging.INFO, logger="echoplex.metrics")
    mine = types.ModuleType("my_echo_model")
    mine.__dict__["serve"] = threads.serve
    config = ServerConfig(mode="pool", hosts=("127.0.0.1",), port=0, metrics_port=0)
    events, shutdown = Heard(), Shutdown()
    server = threading.Thread(target=run, args=(config, events, shutdown), kwargs={"model": mine})
    server.start()
    try:
        assert events.listens.wait(20) and events.address is not None
        with socket.create_connection(events.address, timeout=10) as sock:
            sock.sendall(b"labelled")
            assert recv_exactly(sock, 8) == b"labelled"
        assert events.closes.wait(20)
        [where] = [r.args[0] for r in caplog.records if r.name == "echoplex.metrics"]  # type: ignore[index]
        with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        shutdown.request()
        server.join(30)
        shutdown.close()
    assert not server.is_alive()
    models: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "model" in sample.labels:
                models[sample.name].add(sample.labels["model"])
    assert models["echoplex_build_info"] == {"my_echo_model"}
    for name in (
        "echoplex_connections_accepted_total",
        "echoplex_connections_closed_total",
        "echoplex_bytes_received_total",
        "echoplex_accepting",
        "process_cpu_seconds_total",
    ):
        assert models[name] == {"my_echo_model"}, name
    assert set().union(*models.values()) == {"my_echo_model"}
