"""The HAProxy harness (tests/haproxy.py) in front of real echoplex servers."""

from __future__ import annotations

import random
import re
import socket
import time
from pathlib import Path

import pytest

from .haproxy import haproxy, render_config
from .procs import Server

OPEN = re.compile(r"\bopen 127\.0\.0\.1:\d+")


def echo_through(address: tuple[str, int], payload: bytes, timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(address, timeout=timeout_s) as sock:
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
    deadline = time.monotonic() + timeout_s
    while (counts := [opens(s) for s in servers]) and sum(counts) < total:
        if time.monotonic() >= deadline:
            pytest.fail(f"{counts} open lines, expected {total} in all")
        time.sleep(0.02)
    return counts


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
        port=5000,
        backends=[("127.0.0.1", 1), ("127.0.0.1", 2)],
        stats_socket=Path("/tmp/x.sock"),
        send_proxy_v2=True,
        health_check=True,
        check_payload=b"hi",
    )
    assert "    bind 127.0.0.1:5000\n" in config
    assert "    server s2 127.0.0.1:2 check inter 200ms fall 1 rise 1 send-proxy-v2\n" in config
    assert "tcp-check send-binary 6869\n" in config
    assert "balance roundrobin" in config
    with pytest.raises(ValueError, match="exclusive"):
        render_config(
            port=1,
            backends=[("127.0.0.1", 1)],
            stats_socket=Path("/tmp/x.sock"),
            send_proxy=True,
            send_proxy_v2=True,
        )


def test_a_port_taken_before_haproxy_binds_it_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import haproxy as harness

    with socket.create_server(("127.0.0.1", 0)) as squatter, Server(mode="asyncio") as server:
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = harness.free_port
        monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or real_free_port())
        with haproxy([server.address]) as proxy:
            assert proxy.port != taken
            assert echo_through(proxy.address, b"x") == b"x"
        assert server.stop() == 0
