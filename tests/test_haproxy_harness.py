"""The HAProxy harness (tests/haproxy.py) in front of real echoplex servers."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from .haproxy import frontend_socket, haproxy, render_config, start, wait_until_open
from .procs import Server, require_tool
from .waiting import wait_for

OPEN = re.compile(r"\bopen 127\.0\.0\.1:\d+")


def echo_through(address: tuple[str, int], payload: bytes, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(address, timeout=timeout_s) as sock:
        return echoed(sock, payload)


def echoed(sock: socket.socket, payload: bytes) -> bytes:
    """What comes back for `payload` sent and half-closed, up to the proxy's EOF."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def opens(server: Server) -> int:
    return sum(1 for line in server.stderr_seen if OPEN.search(line))


def wait_for_opens(servers: list[Server], total: int, timeout_s: float = 5.0) -> list[int]:
    """Each server's count of `open` log lines, once they add up to `total`."""
    counts: list[int] = []

    def added_up() -> list[int] | None:
        nonlocal counts
        counts = [opens(s) for s in servers]
        return counts if sum(counts) >= total else None

    return wait_for(added_up, timeout_s, lambda: f"{counts} open lines, expected {total} in all")


def test_echoes_through_haproxy_reach_both_servers() -> None:
    rng = random.Random(7)
    with Server(mode="asyncio") as first, Server(mode="asyncio") as second:
        with haproxy([first.address, second.address]) as proxy:
            assert proxy.server_status() == {"s1": "no check", "s2": "no check"}
            for size in (1, 1000, 100_000, 7):
                payload = rng.randbytes(size)
                assert echo_through(proxy.address, payload) == payload
            counts = wait_for_opens([first, second], 4)
            # Readiness came from the runtime API: no probe connection reached a server.
            assert sum(counts) == 4
            assert all(count >= 1 for count in counts), counts
            assert proxy.wait_for_output(r"echo_in echo_servers/s\d")  # tcplog lines
        assert proxy.process.proc.poll() is not None
        assert first.stop() == 0
        assert second.stop() == 0


def test_health_checks_take_a_stopped_server_out() -> None:
    with Server(mode="asyncio") as first, Server(mode="asyncio") as second:
        with haproxy(
            [first.address, second.address], health_check=True, check_payload=b"ping\n"
        ) as proxy:
            proxy.wait_for_status("UP")
            assert second.stop() == 0
            proxy.wait_for_status({"s1": "UP", "s2": "DOWN"})
            proxy.wait_for_output(r"Server echo_servers/s2 is DOWN")
            for _ in range(4):  # all to s1 now
                assert echo_through(proxy.address, b"still here") == b"still here"
        assert first.stop() == 0


def test_config_options() -> None:
    config = render_config(
        frontend_fd=5,
        backends=[("127.0.0.1", 1), ("127.0.0.1", 2)],
        stats_socket=Path("/tmp/x.sock"),
        send_proxy_v2=True,
        health_check=True,
        check_payload=b"hi",
    )
    assert "    bind fd@5\n" in config
    assert "    server s2 127.0.0.1:2 check inter 200ms fall 1 rise 1 send-proxy-v2\n" in config
    assert "tcp-check send-binary 6869\n" in config
    assert "balance roundrobin" in config
    with pytest.raises(ValueError, match="exclusive"):
        render_config(
            frontend_fd=5,
            backends=[("127.0.0.1", 1)],
            stats_socket=Path("/tmp/x.sock"),
            send_proxy=True,
            send_proxy_v2=True,
        )


def test_the_frontend_listens_before_haproxy_starts() -> None:
    # HAProxy inherits a socket bound and listening already: nothing can take its port,
    # and a client that connects before HAProxy is up waits in the backlog, then is served.
    binary = require_tool("haproxy")
    with contextlib.ExitStack() as stack:
        directory = Path(tempfile.mkdtemp(prefix="echoplex-haproxy-", dir="/tmp"))
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        server = stack.enter_context(Server(mode="asyncio"))
        with frontend_socket() as frontend:
            early = stack.enter_context(socket.create_connection(frontend.getsockname(), 10))
            config_path, stats_socket = directory / "haproxy.cfg", directory / "admin.sock"
            config_path.write_text(
                render_config(
                    frontend_fd=frontend.fileno(),
                    backends=[server.address],
                    stats_socket=stats_socket,
                )
            )
            proxy = start(binary, config_path, frontend, stats_socket, ["s1"])
            stack.callback(proxy.stop)
        assert echoed(early, b"early") == b"early"
        wait_until_open(proxy)
        assert echo_through(proxy.address, b"later") == b"later"
        assert server.stop() == 0
