"""The control API (`--control-port`) and `echoplex conditions`, against real servers.

Every request is real HTTP on a real port; every bad one is answered with a 4xx and a
one-line JSON reason, and the conditions stay as they were. The API is checked on
`threads` (one process) and `workers` (the supervisor serves it, each worker must
hear of every change).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echoplex.models import MODELS
from echoplex.testing import recv_exactly, recv_until_eof

from .procs import Server, echoplex
from .test_metrics import scrape, total
from .test_metrics_hostile import reset, thread_count
from .waiting import wait_for

CONTROL_LINE = re.compile(r"control API on http://(\S+):(\d+)/conditions")
MODES = ["threads", "workers"]
TOKEN = "correct horse battery staple"
DEADLINE_S = 30.0  # for the server to close a slow client: a bound, not a measurement

Answer = tuple[int, Any]


def control_address(server: Server) -> tuple[str, int]:
    match = server.wait_for_stderr(CONTROL_LINE)
    return match.group(1), int(match.group(2))


def call(
    server: Server,
    method: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    token: str | None = None,
    path: str = "/conditions",
) -> Answer:
    """(status, the JSON answer) of one request to the server's control API."""
    host, port = control_address(server)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        text = response.read()
    finally:
        connection.close()
    assert response.getheader("Content-Type") == "application/json", text
    assert text.count(b"\n") == 1 and text.endswith(b"\n"), text  # one line of JSON
    return response.status, json.loads(text)


def raw_request(server: Server, request: bytes) -> bytes:
    """What the control port answers to these bytes (all it sends, until it closes)."""
    with socket.create_connection(control_address(server), timeout=10) as sock:
        sock.sendall(request)
        return recv_until_eof(sock)


def echo_once(server: Server, data: bytes) -> bytes | None:
    """Send `data` on a new connection, half-close, and read until the server closes
    (None: it reset the connection)."""
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
            return recv_until_eof(sock)
        except (ConnectionResetError, OSError) as exc:
            # A reset may come before the half-close: then shutdown says ENOTCONN.
            if isinstance(exc, ConnectionResetError) or exc.errno == errno.ENOTCONN:
                return None
            raise


def echoed_as(server: Server, data: bytes, wanted: bytes | None) -> None:
    """A new connection's echo of `data` comes back as `wanted` at once: a change is in
    force in every process (each `workers` worker too) when the API answers it."""
    assert echo_once(server, data) == wanted, f"an echo of {data!r} not as {wanted!r}"


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    args = ["--control-port", "0"]
    if request.param == "workers":
        args += ["--workers", "2"]
    with Server(*args, mode=request.param) as running:
        yield running


def test_get_put_patch_delete_round_trip(server: Server) -> None:
    assert call(server, "GET") == (200, {})
    asked = {"latency": "200ms", "bandwidth": "64KiB", "toxicity": 0.5}
    wanted = {"latency": "0.2s", "bandwidth": 65536, "toxicity": 0.5}
    assert call(server, "PUT", asked) == (200, wanted)
    assert call(server, "GET") == (200, wanted)
    server.wait_for_stderr(
        r"conditions set: latency=0\.2s bandwidth=65536 toxicity=0\.5 \(from 127\.0\.0\.1:\d+\)"
    )
    # PATCH keeps what it does not name; null unsets one; a name may be dashed.
    patched = call(server, "PATCH", {"close-after": 100, "toxicity": None})
    assert patched == (200, {"latency": "0.2s", "bandwidth": 65536, "close_after": 100})
    # PUT replaces the whole set: what the GET showed can be PUT back as it is.
    assert call(server, "PUT", {"jitter": 0.05}) == (200, {"jitter": "0.05s"})
    assert call(server, "PUT", {}) == (200, {})
    assert call(server, "PUT", wanted) == (200, wanted)
    assert call(server, "DELETE") == (200, {})
    assert call(server, "GET") == (200, {})
    server.wait_for_stderr(r"conditions set: none \(from 127\.0\.0\.1:\d+\)")
    assert server.stop() == 0
    assert "Traceback" not in server.stderr, server.stderr


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("PUT", {"raw": b"{not json"}, 400, "not JSON"),
    ("PUT", {"raw": b'{"latency": "\xff\xfe"}'}, 400, "not JSON"),
    ("PUT", {"raw": b"[" * 8000 + b"]" * 8000}, 400, "not JSON"),
    ("PUT", {"raw": b'{"latency": "1s", "latency": "2s"}'}, 400, "given twice"),
    ("PUT", {"raw": b""}, 400, "not JSON"),
    ("PUT", {"body": ["latency", "1s"]}, 400, "a JSON object"),
    ("PUT", {"body": "latency=1s"}, 400, "a JSON object"),
    ("PUT", {"body": {"latency": "1s", "lag": "1s"}}, 400, "unknown condition: lag"),
    ("PUT", {"body": {"latency": -1}}, 400, "`latency` must be"),
    ("PUT", {"body": {"latency": "soon"}}, 400, "`latency`"),
    ("PUT", {"body": {"toxicity": 2}}, 400, "`toxicity`"),
    ("PUT", {"body": {"toxicity": True}}, 400, "`toxicity`"),
    ("PUT", {"body": {"bandwidth": [1, 2]}}, 400, "`bandwidth`"),
    ("PUT", {"body": {"slice": {"bytes": 1}}}, 400, "`slice`"),
    ("PUT", {"raw": b'{"latency": NaN}'}, 400, "`latency`"),
    ("PUT", {"raw": b'{"bandwidth": 1e999}'}, 400, "`bandwidth`"),
    ("PUT", {"body": {"close_after": 1, "reset_after": 1}}, 400, "exclude each other"),
    ("PUT", {"body": {"latency\nforged": 1}}, 400, "unknown condition: 'latency\\nforged'"),
    ("PATCH", {"body": {"reset-after": 5}}, 400, "exclude each other"),
    ("PATCH", {"raw": b"1"}, 400, "a JSON object"),
    ("POST", {"body": {}}, 405, "POST is not served"),
    ("HEAD", {}, 405, ""),
    ("GET", {"path": "/"}, 404, "no such path"),
    ("GET", {"path": "/conditions/latency"}, 404, "no such path"),
    ("PUT", {"path": "/metrics", "body": {}}, 404, "no such path"),
]


def test_every_bad_request_is_a_4xx_with_a_reason_and_changes_nothing(server: Server) -> None:
    before = {"latency": "0.2s", "close_after": 100}
    assert call(server, "PUT", before) == (200, before)
    server.wait_for_stderr("conditions set: latency=0.2s close-after=100")
    changes = len(re.findall("conditions set:", server.stderr))
    for method, request, status, reason in BAD_REQUESTS:
        if method == "HEAD":  # an answer to HEAD has no body to read
            host, port = control_address(server)
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request("HEAD", "/conditions")
            assert connection.getresponse().status == status
            connection.close()
            continue
        answer = call(server, method, **request)
        assert answer[0] == status, (method, request, answer)
        assert set(answer[1]) == {"error"} and reason in answer[1]["error"], (request, answer)
        assert call(server, "GET") == (200, before), (method, request)
    # One good change after them, and its line is the only one since the first.
    assert call(server, "DELETE") == (200, {})
    server.wait_for_stderr("conditions set: none")
    assert len(re.findall("conditions set:", server.stderr)) == changes + 1
    assert server.stop() == 0
    assert "Traceback" not in server.stderr, server.stderr


def test_hostile_bytes_on_the_control_port(server: Server) -> None:
    before = {"latency": "0.2s"}
    assert call(server, "PUT", before) == (200, before)
    garbage = raw_request(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.0 400 ") and b'{"error": "not an HTTP request"}' in garbage
    # A body too large is refused from its Content-Length, before it is sent.
    huge = raw_request(server, b"PUT /conditions HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n")
    assert huge.startswith(b"HTTP/1.0 413 ") and b"more than the 16384 taken" in huge
    bad_length = raw_request(server, b"PUT /conditions HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
    assert bad_length.startswith(b"HTTP/1.0 400 ")
    two_lengths = b"PUT /conditions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    assert raw_request(server, two_lengths).startswith(b"HTTP/1.0 400 ")
    # A head over the limit is dropped, unanswered (the server stops reading it).
    with socket.create_connection(control_address(server), timeout=10) as sock:
        sock.sendall(b"GET /conditions HTTP/1.1\r\nX-Big: " + b"x" * 20_000)
        # Closed with the rest unread, which Linux answers with a reset: either is no answer.
        with contextlib.suppress(ConnectionResetError):
            assert recv_until_eof(sock) == b""
    # A body that stops short is dropped when the request's time runs out.
    with socket.create_connection(control_address(server), timeout=DEADLINE_S) as sock:
        sock.sendall(b'PUT /conditions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"latency": ')
        assert sock.recv(1) == b""
    for _ in range(20):  # resets mid-request are the client's business: quiet
        sock = socket.create_connection(control_address(server), timeout=10)
        sock.sendall(b'PUT /conditions HTTP/1.1\r\nContent-Length: 20\r\n\r\n{"lat')
        reset(sock)
    assert call(server, "GET") == (200, before)
    assert server.stop() == 0
    assert "Traceback" not in server.stderr, server.stderr


def test_a_trickling_client_is_closed_and_others_are_answered(server: Server) -> None:
    """Slowloris: a byte at a time never completes the request; the server must close
    it anyway, and answer others meanwhile, with the threads it had."""
    threads_before = thread_count(server)
    holders = [socket.create_connection(control_address(server), timeout=10) for _ in range(100)]
    try:
        for sock in holders:
            sock.sendall(b"PUT /condi")
        assert call(server, "GET") == (200, {})
        assert thread_count(server) == threads_before
        with socket.create_connection(control_address(server), timeout=10) as sock:
            request = iter(b"GET /conditions HTTP/1.1\r\nX-Slow: " + b"x" * 1000)
            deadline = time.monotonic() + DEADLINE_S
            closed = False
            while not closed and time.monotonic() < deadline:
                try:
                    sock.sendall(bytes([next(request)]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable:
                    try:
                        closed = sock.recv(1) == b""
                    except ConnectionResetError:
                        closed = True
            assert closed, f"the control API kept a trickling client for {DEADLINE_S}s"
    finally:
        for sock in holders:
            sock.close()
    assert call(server, "GET") == (200, {})
    assert server.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_token_is_required_and_checked(mode: str) -> None:
    args = ["--control-port", "0", "--control-host", "0.0.0.0", "--control-token", TOKEN]
    with Server(*args, *(["--workers", "2"] if mode == "workers" else []), mode=mode) as server:
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
            for method, body in (("GET", None), ("PUT", {"latency": "1s"}), ("DELETE", None)):
                status, answer = call(server, method, body, token=token)
                assert (status, set(answer)) == (401, {"error"}), (token, method)
        # Any path: without the token nothing says what the API serves.
        assert call(server, "GET", path="/nothing")[0] == 401
        assert call(server, "GET", token=TOKEN) == (200, {})
        assert call(server, "PUT", {"latency": "1s"}, token=TOKEN) == (200, {"latency": "1s"})
        assert call(server, "GET", token=TOKEN) == (200, {"latency": "1s"})
        assert TOKEN not in server.stderr
        assert server.stop() == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_off_loopback_without_a_token_the_server_refuses_to_start(host: str) -> None:
    result = echoplex("serve", "--port", "0", "--control-port", "0", "--control-host", host)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--control-token" in lines[0], result.stderr


def test_a_busy_control_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = echoplex("serve", "--port", "0", "--control-port", port)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"echoplex serve: error: cannot serve the control API on 127.0.0.1:{port}: "
        "Address already in use"
    ]


@pytest.mark.parametrize("mode", list(MODELS))
def test_a_change_reaches_new_connections_and_open_ones_from_their_next_chunk(mode: str) -> None:
    args = ["--control-port", "0", *(["--workers", "1"] if mode == "workers" else [])]
    with Server(*args, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as opened_before:
            opened_before.sendall(b"first")
            assert recv_exactly(opened_before, 5) == b"first"  # its echo has begun, plain
            assert call(server, "PUT", {"close-after": 3, "latency": "20ms"})[0] == 200
            if mode != "simple":  # (simple serves the next client once this one is gone)
                echoed_as(server, b"hello", b"hel")  # then a FIN, after exactly 3 bytes
            # The open connection takes them from its next chunk: its marks count from then.
            opened_before.sendall(b"hello")
            assert recv_until_eof(opened_before) == b"hel"
        server.wait_for_stderr(r"in=10 out=8 .*outcome=close-after conditions: latency=0\.02s")
        assert call(server, "DELETE")[0] == 200
        echoed_as(server, b"hello", b"hello")
        assert server.stop() == 0


def worker_closes(server: Server, index: int, pattern: str, start: int = 0) -> bool:
    return any(
        f"worker-{index} " in line and re.search(pattern, line)
        for line in server.stderr_seen[start:]
    )


def served_by_each(server: Server, pattern: str, start: int = 0) -> bool:
    """Open one more connection; whether both workers have closed one matching `pattern`
    (since log line `start`). The kernel spreads connections over the workers by their
    addresses, so enough connections reach both."""
    echo_once(server, b"hello")
    return all(worker_closes(server, index, pattern, start) for index in (0, 1))


def test_every_worker_gets_every_change_and_a_restarted_one_too() -> None:
    args = ["--control-port", "0", "--workers", "2", "--log-level", "debug"]
    with Server(*args, mode="workers") as server:
        assert call(server, "PUT", {"close-after": 3})[0] == 200
        wait_for(lambda: served_by_each(server, "outcome=close-after"), 30, "both workers")
        # A worker killed and restarted starts with the conditions in force...
        workers = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
        victim = min(int(pid) for pid in workers.split())
        os.kill(victim, signal.SIGKILL)
        exited = server.wait_for_stderr(rf"worker (\d) \(pid {victim}\) exited .*restarting")
        index = int(exited.group(1))
        # From the exit on, worker-N's lines are its replacement's (a killed one says nothing).
        restarted = next(
            at for at, line in enumerate(server.stderr_seen) if f"(pid {victim}) exited" in line
        )
        server.wait_for_stderr(rf"worker {index} \(pid \d+\) is listening", start=restarted)
        wait_for(
            lambda: (
                echo_once(server, b"hello") == b"hel"
                and worker_closes(server, index, "outcome=close-after", restarted)
            ),
            30,
            f"the restarted worker {index} closing after 3 bytes",
        )
        # ...and hears of the changes after it, through its own pipe.
        assert call(server, "PUT", {"reset-after": 2})[0] == 200
        changed = len(server.stderr_seen)
        wait_for(lambda: served_by_each(server, "outcome=reset-after", changed), 30, "both")
        assert server.stop() == 0


def test_a_change_is_in_every_worker_when_the_api_answers() -> None:
    # The kernel spreads new connections over both workers by a hash of their ports: of
    # 20 after each answer, some reach each worker, and every one has the new conditions.
    with Server("--control-port", "0", "--workers", "2", mode="workers") as server:
        for _ in range(5):
            assert call(server, "PUT", {"close-after": 1})[0] == 200
            assert [echo_once(server, b"hello") for _ in range(20)] == [b"h"] * 20
            assert call(server, "DELETE")[0] == 200
            assert [echo_once(server, b"hello") for _ in range(20)] == [b"hello"] * 20
        assert server.stop() == 0


def test_the_conditions_command_against_a_live_server(monkeypatch: pytest.MonkeyPatch) -> None:
    with Server("--control-port", "0", "--control-token", TOKEN) as server:
        port = str(control_address(server)[1])
        monkeypatch.setenv("ECHOPLEX_CONTROL_TOKEN", TOKEN)

        def conditions(*args: str) -> tuple[int, str, str]:
            result = echoplex("conditions", "--port", port, *args)
            return result.returncode, result.stdout, result.stderr

        assert conditions() == (0, "none\n", "")
        assert conditions("set", "latency=200ms", "bandwidth=64KiB") == (
            0,
            "latency=0.2s bandwidth=65536\n",
            "",
        )
        assert conditions("set", "close_after=10") == (
            0,
            "latency=0.2s bandwidth=65536 close-after=10\n",
            "",
        )
        assert conditions("show") == (0, "latency=0.2s bandwidth=65536 close-after=10\n", "")
        assert conditions("replace", "jitter=1ms")[1] == "jitter=0.001s\n"
        # The server's reason, when it refuses.
        status, out, err = conditions("set", "reset-after=1", "close-after=2")
        assert status == 2 and out == "" and "exclude each other" in err  # checked here first
        assert conditions("set", "close-after=2")[0] == 0
        status, out, err = conditions("set", "reset-after=1")
        assert (status, out) == (1, "")
        assert err.splitlines() == [
            "echoplex conditions: error: the server refused (400): `close_after` and "
            "`reset_after` exclude each other: a connection ends one way"
        ]
        status, _, err = conditions("--token", "wrong")
        assert status == 1 and "refused (401)" in err and len(err.splitlines()) == 1
        for bad in (["set"], ["set", "latency"], ["set", "latency=-1"], ["set", "lag=1"]):
            status, out, err = conditions(*bad)
            assert status == 2 and out == "" and len(err.splitlines()) == 1, (bad, err)
        assert conditions("clear", "latency=1s")[0] == 2
        assert conditions("bogus")[0] == 2
        assert conditions("clear") == (0, "none\n", "")
        assert call(server, "GET", token=TOKEN) == (200, {})
        assert server.stop() == 0
    result = echoplex("conditions", "--port", port)
    assert result.returncode == 1 and "cannot reach the control API" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert echoplex("conditions").returncode == 2  # no port


@pytest.mark.parametrize("mode", MODES)
def test_metrics_count_the_connections_each_condition_touched(mode: str) -> None:
    args = ["--control-port", "0", "--metrics-port", "0"]
    with Server(*args, *(["--workers", "2"] if mode == "workers" else []), mode=mode) as server:
        assert echo_once(server, b"plain") == b"plain"
        assert call(server, "PUT", {"latency": "1ms", "close-after": 3})[0] == 200
        for _ in range(3):
            echoed_as(server, b"hello", b"hel")
        assert call(server, "DELETE")[0] == 200
        echoed_as(server, b"plain", b"plain")

        def counted() -> dict[str, float]:
            samples = scrape(server)
            name = "echoplex_connections_conditioned_total"
            return {c: total(samples, name, condition=c) for c in ("latency", "close-after")}

        def as_logged() -> dict[str, float] | None:
            """Each connection that got them, as its close line says (the 3 above at
            least); None until the counts agree with it."""
            got = len(re.findall(r"outcome=close-after conditions: latency=", server.stderr))
            wanted = {"latency": float(got), "close-after": float(got)}
            return wanted if got >= 3 and counted() == wanted else None

        wait_for(as_logged, 15, lambda: f"{counted()} as the close lines count them")
        assert server.stop() == 0
