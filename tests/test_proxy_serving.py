"""The PROXY protocol as the server applies it: headers from trusted proxies are
required and name the real client; other peers are plain clients. Real HAProxy too."""

from __future__ import annotations

import re
import socket

import pytest

from echoplex.proxy_protocol import Command, encode_v1, encode_v2

from .haproxy import haproxy
from .kernel import read_by_peer
from .procs import Server
from .test_contract import recv_exactly, recv_until_eof
from .waiting import wait_for

MODES = ["simple", "threads", "pool", "asyncio", "workers"]
TRUST_LOOPBACK = ("--proxy-protocol", "--trusted-proxy", "127.0.0.0/8", "--workers", "1")


def closed_without_echo(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("mode", MODES)
def test_a_v1_header_names_the_client_and_is_not_echoed(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            header = encode_v1(("203.0.113.7", 4242), ("10.0.0.1", 7))
            sock.sendall(header + b"hello after the header")
            assert recv_exactly(sock, 22) == b"hello after the header"
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""
        server.wait_for_stderr(r"open 203\.0\.113\.7:4242 via 127\.0\.0\.1:\d+")
        server.wait_for_stderr(r"close 203\.0\.113\.7:4242 in=22 out=22")


@pytest.mark.parametrize("mode", MODES)
def test_a_v2_header_split_across_reads(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            header = encode_v2(("2001:db8::5", 5555), ("2001:db8::1", 7))
            for number, piece in enumerate((header[:5], header[5:17], header[17:]), 1):
                sock.sendall(piece)  # each read apart: the server has it before the next
                wait_for(lambda: read_by_peer(sock), 10, f"part {number} of the header read")
            sock.sendall(b"\x00binary\xff")
            assert recv_exactly(sock, 8) == b"\x00binary\xff"
        server.wait_for_stderr(r"open \[2001:db8::5\]:5555 via 127\.0\.0\.1:\d+")


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_a_local_command_keeps_the_connection_address(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(encode_v2(command=Command.LOCAL) + b"check")
            assert recv_exactly(sock, 5) == b"check"
            host, port = sock.getsockname()[:2]
        server.wait_for_stderr(rf"open {re.escape(host)}:{port}\n")


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_an_untrusted_peer_is_a_plain_client_and_its_header_is_data(mode: str) -> None:
    with Server(
        "--proxy-protocol", "--trusted-proxy", "10.0.0.0/8", "--workers", "1", mode=mode
    ) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            forged = encode_v1(("198.51.100.1", 1), ("10.0.0.1", 7))
            sock.sendall(forged)
            assert recv_exactly(sock, len(forged)) == forged
            host, port = sock.getsockname()[:2]
        server.wait_for_stderr(rf"open {re.escape(host)}:{port}\n")
        assert "198.51.100.1" not in server.stderr


@pytest.mark.parametrize("mode", MODES)
def test_a_bad_header_from_a_trusted_proxy_drops_the_connection(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed_without_echo(sock)
        server.wait_for_stderr("outcome=proxy-error:not-proxy-protocol")
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 300.1.1.1 10.0.0.1 1 2\r\n")
            assert closed_without_echo(sock)
        server.wait_for_stderr("outcome=proxy-error:bad-address")


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_header_times_out(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, "--proxy-header-timeout", "0.3", mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 ")  # and then nothing more
            assert closed_without_echo(sock)
        server.wait_for_stderr("outcome=proxy-header-timeout")


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_per_ip_limits_count_the_real_client(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, "--max-per-ip", "1", mode=mode) as server:

        def proxied(client: str) -> socket.socket:
            sock = socket.create_connection(server.address, timeout=10)
            sock.sendall(encode_v1((client, 1000), ("10.0.0.1", 7)) + b"hi")
            return sock

        with proxied("198.51.100.1") as first, proxied("198.51.100.2") as other:
            assert recv_exactly(first, 2) == b"hi"
            assert recv_exactly(other, 2) == b"hi"  # same proxy, another client: admitted
            with proxied("198.51.100.1") as again:
                assert closed_without_echo(again)
        server.wait_for_stderr(r"rejected 198\.51\.100\.1:1000: over max-per-ip")


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_real_haproxy_with_send_proxy_v2(mode: str) -> None:
    with Server(*TRUST_LOOPBACK, mode=mode) as server:
        with haproxy([server.address], send_proxy_v2=True, health_check=True) as proxy:
            sock = socket.socket()
            sock.settimeout(10)
            sock.bind(("127.0.0.5", 0))  # a client address HAProxy itself does not use
            with sock:
                sock.connect(proxy.address)
                client_port = sock.getsockname()[1]
                data = bytes(range(256)) * 100
                sock.sendall(data)
                assert recv_exactly(sock, len(data)) == data
            server.wait_for_stderr(rf"open 127\.0\.0\.5:{client_port} via 127\.0\.0\.1:\d+")
            # HAProxy's health checks (PROXY v2 LOCAL) pass: the server stays UP.
            assert proxy.server_status() == {"s1": "UP"}
        assert "proxy-error" not in server.stderr
