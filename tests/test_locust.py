"""Locust's distributed engine driving `echoplex.locust.EchoUser` (bench/locustfile.py).

Locust is only ever run as subprocesses: importing it monkey-patches the standard
library with gevent, which would change every other test in this process.
"""

from __future__ import annotations

import contextlib
import json
import re
import selectors
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from echoplex._tcp_target import InvalidTarget, parse_tcp_target

from .procs import ROOT, Process, Server

LOCUSTFILE = ROOT / "bench" / "locustfile.py"
USERS = 4
RUN_TIME = "3s"
CLOSE_LINE = re.compile(r"close (\S+) in=(\d+) out=(\d+) duration=\S+ outcome=(\S+)")
MISMATCH = re.compile(
    r"connection (\d+) offset (\d+): expected byte 0x([0-9a-f]{2}), received 0x([0-9a-f]{2})"
)
# As echoplex.locust (not importable here); duplicated to check the numbering it promises.
CONNECTIONS_PER_WORKER = 1_000_000_000
MAX_DETAILED_FAILURES = 100


def free_port() -> int:
    """A loopback port nobody listens on right now (for Locust's master, not 5557)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def locust_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


# Listener-only locustfile, loaded by the master beside bench/locustfile.py: the final
# failure table, written once the workers' last reports are in. (`--csv`'s failures
# file is rewritten each second while the test runs and is not refreshed at exit, so
# it can miss what the workers report as they quit.)
FINAL_FAILURES_LOCUSTFILE = """
import json, os
from locust import events

@events.quitting.add_listener
def write_failures(environment, **_):
    errors = [error.to_dict() for error in environment.runner.stats.errors.values()]
    with open(os.environ["ECHOPLEX_TEST_FAILURES"], "w") as file:
        json.dump(errors, file)
"""


@dataclass
class LocustRun:
    exit_code: int
    entries: list[dict[str, Any]]
    """The master's final statistics over all workers, from `--json-file`."""
    failures: list[dict[str, Any]]
    """The master's final failure table: method, name, error, occurrences."""
    log: str

    def total(self, key: str) -> int:
        return sum(int(entry[key]) for entry in self.entries)

    @property
    def requests(self) -> int:
        return self.total("num_requests")

    @property
    def failure_count(self) -> int:
        return self.total("num_failures")


def run_distributed(tmp_path: Path, host: str, *extra: str) -> LocustRun:
    """One headless master and two workers on loopback, to completion."""
    master_port = free_port()
    stats_prefix = tmp_path / "stats"
    failures_file = tmp_path / "failures.json"
    listener_file = tmp_path / "final_failures.py"
    listener_file.write_text(FINAL_FAILURES_LOCUSTFILE)
    master_argv = [
        sys.executable,
        "-m",
        "locust",
        f"--locustfile={LOCUSTFILE},{listener_file}",
        "--master",
        "--headless",
        "--only-summary",
        "--master-bind-host=127.0.0.1",
        f"--master-bind-port={master_port}",
        "--expect-workers=2",
        "--expect-workers-max-wait=20",
        f"--users={USERS}",
        f"--spawn-rate={USERS}",
        f"--run-time={RUN_TIME}",
        # Users finish their round trip instead of being killed mid-echo,
        # so no request is in flight when the server counts its bytes.
        "--stop-timeout=5",
        f"--host={host}",
        f"--json-file={stats_prefix}",
        *extra,
    ]
    worker_argv = locust_argv("--worker", "--master-host=127.0.0.1", f"--master-port={master_port}")
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(
            Process(master_argv, env={"ECHOPLEX_TEST_FAILURES": str(failures_file)})
        )
        workers = [stack.enter_context(Process(worker_argv)) for _ in range(2)]
        exit_code = master.wait(timeout_s=40)
        for worker in workers:
            # The master tells its workers to quit as it exits.
            worker.wait(timeout_s=15)
        log = master.stderr + "".join(f"\n--- worker ---\n{w.stderr}" for w in workers)
    assert failures_file.exists(), log[-4000:]
    entries = json.loads(stats_prefix.with_suffix(".json").read_text())
    assert entries, f"no statistics reported:\n{log[-4000:]}"
    return LocustRun(exit_code, entries, json.loads(failures_file.read_text()), log)


def close_lines(server: Server) -> list[tuple[str, int, int, str]]:
    return [
        (m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))
        for m in map(CLOSE_LINE.search, server.stderr_seen)
        if m
    ]


@pytest.mark.timeout(55)
def test_master_and_two_workers_verify_every_echo(tmp_path: Path) -> None:
    size = 1000  # not the default 1024: shows --echo-size reaches the workers
    with Server(mode="asyncio") as server:
        run = run_distributed(tmp_path, f"tcp://127.0.0.1:{server.port}", "--echo-size", str(size))
        assert server.stop() == 0
    assert run.exit_code == 0, run.log[-4000:]
    assert [(e["method"], e["name"]) for e in run.entries] == [("echo", f"{size} bytes")]
    assert run.requests > 0
    assert run.failure_count == 0, run.failures
    assert run.total("total_content_length") == run.requests * size

    # The server's own count. Each user kept one connection for the whole run.
    closes = close_lines(server)
    assert len(closes) == USERS, server.stderr[-3000:]
    assert all(
        outcome == "closed" and bytes_in == bytes_out for _, bytes_in, bytes_out, outcome in closes
    )
    echoed = sum(bytes_out for _, _, bytes_out, _ in closes)
    # Exact, not a bound: with --stop-timeout each user finishes the round trip it is
    # in, and workers send a final report before they quit, so every byte the server
    # echoed belongs to a request Locust counted. (Killed mid-echo instead, each user
    # could add up to one unreported message: echoed <= (requests + USERS) * size.)
    assert echoed == run.requests * size


class LyingEchoServer:
    """Echoes every byte except the one at `corrupt_offset` of each connection: that one
    comes back with its bits flipped. One thread, a selector, loopback port 0."""

    def __init__(self, corrupt_offset: int) -> None:
        self.corrupt_offset = corrupt_offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.connections_served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lying-echo", daemon=True)

    def __enter__(self) -> LyingEchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        offsets: dict[socket.socket, int] = {}
        with self.listener, selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    for key, _ in selector.select(timeout=0.05):
                        if key.fileobj is self.listener:
                            self._accept(selector, offsets)
                        else:
                            assert isinstance(key.fileobj, socket.socket)
                            self._echo(key.fileobj, selector, offsets)
            finally:
                for conn in offsets:
                    conn.close()

    def _accept(self, selector: selectors.BaseSelector, offsets: dict[socket.socket, int]) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(5)  # readable means recv returns at once; sendall may wait a little
        offsets[conn] = 0
        selector.register(conn, selectors.EVENT_READ)
        self.connections_served += 1

    def _echo(
        self,
        conn: socket.socket,
        selector: selectors.BaseSelector,
        offsets: dict[socket.socket, int],
    ) -> None:
        try:
            data = bytearray(conn.recv(65536))
            if data:
                at = self.corrupt_offset - offsets[conn]
                if 0 <= at < len(data):
                    data[at] ^= 0xFF
                offsets[conn] += len(data)
                conn.sendall(data)
                return
        except OSError:
            pass
        selector.unregister(conn)
        del offsets[conn]
        conn.close()


@pytest.mark.timeout(55)
def test_corrupted_echoes_are_failures_naming_connection_and_offset(tmp_path: Path) -> None:
    size, corrupt_offset = 256, 300  # each connection's second echo is corrupt
    with LyingEchoServer(corrupt_offset) as liar:
        run = run_distributed(tmp_path, f"tcp://127.0.0.1:{liar.port}", "--echo-size", str(size))
    assert run.exit_code != 0  # Locust exits non-zero when a run had failures
    assert run.failure_count > 0
    assert sum(row["occurrences"] for row in run.failures) == run.failure_count
    # The first echo of every connection is right, the second is corrupt, and the user
    # reconnects: one success per connection; as many failures, less those that were
    # between their two echoes when the users stopped.
    successes = run.requests - run.failure_count
    assert successes == liar.connections_served
    assert run.failure_count <= successes <= run.failure_count + USERS

    details = [(m, row) for row in run.failures if (m := MISMATCH.search(row["error"]))]
    assert details, run.failures
    for match, row in details:
        assert (row["method"], row["name"], row["occurrences"]) == ("echo", f"{size} bytes", 1)
        assert int(match.group(2)) == corrupt_offset
        assert int(match.group(3), 16) ^ 0xFF == int(match.group(4), 16)
    connections = {int(match.group(1)) for match, _ in details}
    # Each failing connection fails once, and numbers never repeat across the workers.
    assert len(connections) == len(details)
    assert {n // CONNECTIONS_PER_WORKER for n in connections} == {0, 1}
    # Distinct messages are bounded: after 100 per worker they no longer carry detail.
    assert len(details) <= 2 * MAX_DETAILED_FAILURES
    if run.failure_count > 2 * MAX_DETAILED_FAILURES:
        assert any("details left out" in row["error"] for row in run.failures)


@pytest.mark.timeout(40)
def test_messages_larger_than_the_socket_buffers_in_a_local_run(tmp_path: Path) -> None:
    # Over the payload's ~1 MiB period and sent while the echo is read (a server that
    # stops reading while its replies are unread cannot stall the user). One process:
    # Locust's local runner, no master.
    size = 3 * 1024 * 1024 + 1
    stats_prefix = tmp_path / "stats"
    with Server(mode="threads") as server:
        with Process(
            locust_argv(
                "--headless",
                "--only-summary",
                "--users=2",
                "--spawn-rate=2",
                "--run-time=2s",
                "--stop-timeout=5",
                f"--host=tcp://127.0.0.1:{server.port}",
                f"--json-file={stats_prefix}",
            ),
            env={"LOCUST_ECHO_SIZE": str(size)},  # the environment form of --echo-size
        ) as locust:
            exit_code = locust.wait(timeout_s=30)
        assert server.stop() == 0
    assert exit_code == 0, locust.stderr[-4000:]
    run = LocustRun(exit_code, json.loads(stats_prefix.with_suffix(".json").read_text()), [], "")
    assert [entry["name"] for entry in run.entries] == [f"{size} bytes"]
    assert run.requests > 0
    assert run.failure_count == 0
    assert sum(bytes_out for _, _, bytes_out, _ in close_lines(server)) == run.requests * size


def test_a_bad_host_stops_locust_at_start_up() -> None:
    with Process(
        locust_argv("--headless", "-u", "1", "-t", "5s", "--host", "http://127.0.0.1:1")
    ) as locust:
        assert locust.wait(timeout_s=30) != 0
    assert "is not tcp://HOST:PORT" in locust.stderr, locust.stderr[-2000:]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("tcp://127.0.0.1:5555", ("127.0.0.1", 5555)),
        ("tcp://localhost:1", ("localhost", 1)),
        ("tcp://echo.example:65535/", ("echo.example", 65535)),
        ("tcp://[::1]:5555", ("::1", 5555)),
        ("tcp://[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
    ],
)
def test_parse_tcp_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_tcp_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        None,
        "",
        "127.0.0.1:5555",
        "http://127.0.0.1:5555",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:port",
        "tcp://::1:5555",
        "tcp://[::1]",
        "tcp://[127.0.0.1]:5555",
        "tcp://user@host:5555",
        "tcp://host:5555/path",
        "tcp://:5555",
    ],
)
def test_parse_tcp_target_refuses(target: str | None) -> None:
    with pytest.raises(InvalidTarget, match=r"tcp://HOST:PORT|port|IPv6|target"):
        parse_tcp_target(target)


def test_this_process_never_imported_locust() -> None:
    # A Locust import here would have monkey-patched sockets and threads for every test.
    assert "locust" not in sys.modules
    assert "echoplex.locust" not in sys.modules


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
