"""Listening beyond one IPv4 address: IPv6 and dual stack, several hosts, Unix sockets,
systemd socket activation, TLS."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from .kernel import accepted_by_peer
from .procs import Process, Server, echoplex, needs_ipv6, require_tool
from .test_contract import recv_exactly
from .waiting import wait_for

CONCURRENT = ["threads", "pool", "asyncio", "workers"]
ALL_MODES = ["simple", *CONCURRENT]


def echo_over(sock: socket.socket, data: bytes = b"over the wire") -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def listening_ports(server: Server) -> set[str]:
    return set(re.findall(r"listening on (\S+)", server.stderr))


@needs_ipv6
@pytest.mark.parametrize("mode", ALL_MODES)
def test_ipv6_loopback(mode: str) -> None:
    with Server("--host", "::1", "--workers", "1", mode=mode) as server:
        with socket.create_connection(("::1", server.port), timeout=10) as sock:
            assert echo_over(sock) == b"over the wire"
        server.wait_for_stderr(r"close \[::1\]:\d+ in=13 out=13")


@needs_ipv6
@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_dual_stack_serves_ipv4_clients_and_logs_them_as_ipv4(mode: str) -> None:
    with Server("--host", "::", "--workers", "1", mode=mode) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            assert echo_over(sock) == b"over the wire"
            host, port = sock.getsockname()[:2]
        with socket.create_connection(("::1", server.port), timeout=10) as sock6:
            assert echo_over(sock6) == b"over the wire"
        server.wait_for_stderr(rf"open {re.escape(host)}:{port}\b")
        assert "::ffff:" not in server.stderr


@needs_ipv6
@pytest.mark.parametrize("mode", ["simple", "asyncio", "workers"])
def test_several_hosts_listen_on_the_same_port(mode: str) -> None:
    with Server("--host", "127.0.0.1", "--host", "::1", "--workers", "1", mode=mode) as server:
        assert {f"127.0.0.1:{server.port}", f"[::1]:{server.port}"} <= listening_ports(server)
        for address in (("127.0.0.1", server.port), ("::1", server.port)):
            with socket.create_connection(address, timeout=10) as sock:
                assert echo_over(sock) == b"over the wire"


def start_unix_server(path: str, mode: str, *args: str) -> Process:
    server = Process(
        [
            sys.executable,
            "-m",
            "echoplex",
            "serve",
            "--unix",
            path,
            "--mode",
            mode,
            "--workers",
            "1",
            *args,
        ]
    )
    server.wait_for_stderr(re.escape(f"listening on {path}"))
    return server


@pytest.mark.parametrize("mode", ALL_MODES)
def test_unix_socket_echoes_with_the_asked_mode_and_is_removed_on_exit(
    mode: str, unix_path: str
) -> None:
    with start_unix_server(unix_path, mode, "--unix-mode", "660") as server:
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o660
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(unix_path)
            assert echo_over(sock, b"\x00unix\xff") == b"\x00unix\xff"
        server.wait_for_stderr(r"close unix#\d+ in=6 out=6")
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    assert not os.path.exists(unix_path)


def test_unix_socket_default_mode_is_owner_only(unix_path: str) -> None:
    with start_unix_server(unix_path, "asyncio"):
        assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o600


def test_a_stale_unix_socket_file_is_replaced(unix_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(unix_path)  # a file left behind by a server that crashed
    stale.close()
    with start_unix_server(unix_path, "threads") as server:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(unix_path)
            assert echo_over(sock) == b"over the wire"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def test_a_unix_path_held_by_a_live_server_is_an_error(unix_path: str) -> None:
    with start_unix_server(unix_path, "asyncio"):
        result = echoplex("serve", "--unix", unix_path)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert "another server is listening there" in result.stderr
        assert os.path.exists(unix_path)  # the live server's file is left alone


def test_a_unix_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    precious = tmp_path / "data.txt"
    precious.write_text("keep me")
    result = echoplex("serve", "--unix", str(precious))
    assert result.returncode == 2 and "is not a socket" in result.stderr
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_socket_activation_adopts_the_passed_socket(mode: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    # As systemd does: the socket as descriptor 3, and LISTEN_PID the server's own pid
    # (the shell execs the server, which keeps the shell's pid). Moved off 3 first if it
    # is there already, or the redirections below would close it.
    fd = listener.fileno() if listener.fileno() != 3 else os.dup(3)
    command = (
        f"LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=echo exec {sys.executable} "
        f"-m echoplex serve --mode {mode} --workers 2 --port 1 3<&{fd} {fd}<&-"
    )
    with listener, Process(["bash", "-c", command], pass_fds=[fd]) as server:
        if fd != listener.fileno():
            os.close(fd)
        server.wait_for_stderr(rf"listening on 127\.0\.0\.1:{port}\b")
        assert "passed by systemd" in server.stderr
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                assert echo_over(sock) == b"over the wire"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def test_socket_activation_without_the_socket_is_one_line() -> None:
    command = f"LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m echoplex serve 3</dev/null"
    with Process(["sh", "-c", command]) as server:
        assert server.wait() == 2
        assert server.stderr.count("\n") == 1
        assert "descriptor 3, which is not a socket" in server.stderr


@pytest.mark.parametrize("mode", ALL_MODES)
def test_tls_echo(mode: str, certificate: tuple[str, str, str]) -> None:
    cert_file, key_file, ca_file = certificate
    context = ssl.create_default_context(cafile=ca_file)
    with Server(
        "--tls-cert", cert_file, "--tls-key", key_file, "--workers", "1", mode=mode
    ) as server:
        with socket.create_connection(server.address, timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                data = os.urandom(300_000)
                tls.sendall(data)
                assert recv_exactly(tls, len(data)) == data
        server.wait_for_stderr(r"in=300000 out=300000 duration=\S+ outcome=closed")
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_tls_client_that_never_handshakes_is_dropped_quietly(
    mode: str, certificate: tuple[str, str, str]
) -> None:
    cert_file, key_file, _ = certificate
    with Server(
        "--tls-cert",
        cert_file,
        "--tls-key",
        key_file,
        "--tls-handshake-timeout",
        "0.3",
        "--workers",
        "1",
        mode=mode,
    ) as server:
        with socket.create_connection(server.address, timeout=10) as silent:
            with contextlib.suppress(ConnectionResetError):
                assert silent.recv(1) == b""
        server.wait_for_stderr("outcome=tls-handshake-timeout")
        with socket.create_connection(server.address, timeout=10) as garbage:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS at all
            with contextlib.suppress(ConnectionResetError):
                garbage.recv(100)
        # The log says why: this client's first byte cannot begin a TLS handshake.
        server.wait_for_stderr("outcome=tls-handshake-failed:NOT_TLS")
        assert server.stop() == 0
        assert "Traceback" not in server.stderr
        assert " ERROR " not in server.stderr


def test_old_tls_versions_are_refused(certificate: tuple[str, str, str]) -> None:
    cert_file, key_file, ca_file = certificate
    context = ssl.create_default_context(cafile=ca_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with Server("--tls-cert", cert_file, "--tls-key", key_file, mode="asyncio") as server:
        with (
            socket.create_connection(server.address, timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
            "no such file: /nonexistent/cert.pem",
        ),
        (
            ["--tls-cert", "/etc/hostname", "--tls-key", "/etc/hostname"],
            "cannot load TLS certificate or key",
        ),
        (["--tls-cert", "only-cert.pem"], "TLS needs both a certificate and a key file"),
        (["--unix-mode", "999"], "not an octal file mode"),
    ],
)
@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_bad_tls_and_unix_options_are_one_line(mode: str, args: list[str], expected: str) -> None:
    result = echoplex("serve", "--mode", mode, "--port", "0", *args)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr


def test_client_over_unix_socket(unix_path: str) -> None:
    with start_unix_server(unix_path, "asyncio"):
        result = echoplex("client", "--unix", unix_path, "-m", "via unix")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Starting client...\nReceived: b'via unix'\n"


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_client_over_tls(mode: str, certificate: tuple[str, str, str]) -> None:
    cert_file, key_file, ca_file = certificate
    with Server("--tls-cert", cert_file, "--tls-key", key_file, mode=mode) as server:
        port = str(server.port)
        one_shot = echoplex("client", "--port", port, "--tls", "--ca", ca_file, "-m", "secret")
        assert one_shot.returncode == 0, one_shot.stderr
        assert one_shot.stdout == "Starting client...\nReceived: b'secret'\n"
        # Interactive: ends once every byte typed has come back (no TLS half-close).
        typed = echoplex(
            "client", "--port", port, "--tls", "--ca", ca_file, input=b"line one\nline two\n"
        )
        assert typed.returncode == 0, typed.stderr
        assert typed.stdout == "line one\nline two\n"
        insecure = echoplex("client", "--port", port, "--tls", "--insecure", "-m", "x")
        assert insecure.returncode == 0, insecure.stderr
        unverified = echoplex("client", "--port", port, "--tls", "-m", "x")
        assert unverified.returncode == 1
        assert unverified.stderr.count("\n") == 1
        assert "TLS with 127.0.0.1:" in unverified.stderr and "CERTIFICATE_VERIFY_FAILED" in (
            unverified.stderr
        )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ca", "ca.pem", "-m", "x"], "--ca and --insecure go with --tls"),
        (["--tls", "--ca", "/nonexistent.pem", "-m", "x"], "no such CA file"),
        (["--udp", "--tls", "-m", "x"], "--udp does not go with"),
    ],
)
def test_bad_client_transport_options_are_one_line(args: list[str], expected: str) -> None:
    result = echoplex("client", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_sends_a_proxy_header(version: str) -> None:
    with Server("--proxy-protocol", "--trusted-proxy", "127.0.0.1/32", mode="asyncio") as server:
        result = echoplex(
            "client", "--port", str(server.port), "--send-proxy", version, "-m", "proxied"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("Received: b'proxied'\n")
        server.wait_for_stderr(r"open 127\.0\.0\.1:(\d+) via 127\.0\.0\.1:\1\b")


@pytest.mark.timeout(60)
def test_the_readme_certificate_command_makes_one_the_server_and_client_accept(
    tmp_path: Path,
) -> None:
    require_tool("openssl")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.endswith("-out cert.pem")]
    made = subprocess.run(
        shlex.split(command), cwd=tmp_path, capture_output=True, timeout=30, check=False
    )
    assert made.returncode == 0, made.stderr
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    with Server("--tls-cert", str(cert), "--tls-key", str(key), mode="asyncio") as server:
        for host in ("localhost", "127.0.0.1"):
            said = echoplex(
                "client", "--tls", "--ca", str(cert), host, str(server.address[1]), "-m", "hi"
            )
            assert said.returncode == 0, said.stderr
            assert "hi" in said.stdout
        assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_client_gone_during_the_handshake_is_told_alike_in_every_model(
    mode: str, certificate: tuple[str, str, str]
) -> None:
    cert_file, key_file, _ = certificate
    with Server("--tls-cert", cert_file, "--tls-key", key_file, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10):
            pass  # connects, closes: no ClientHello
        server.wait_for_stderr("outcome=tls-handshake-failed:closed")
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01")  # the start of a TLS record, then a reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert server.stop() == 0
    # Both the same way, whichever model: the client went away.
    assert server.stderr.count("outcome=tls-handshake-failed:closed") == 2, server.stderr
    assert "Traceback" not in server.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_the_drain_ends_a_stalled_handshake_in_every_model(
    mode: str, certificate: tuple[str, str, str]
) -> None:
    # A handshake deadline far beyond the drain's: the drain must end it, as `drained`.
    cert_file, key_file, _ = certificate
    args = ("--tls-cert", cert_file, "--tls-key", key_file, "--tls-handshake-timeout", "1h")
    with Server(*args, "--drain-timeout", "0.3", "--workers", "1", mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as stalled:
            # The server has taken it off the accept queue before the stop.
            wait_for(lambda: accepted_by_peer(stalled), 10, "the server's accept")
            server.signal(signal.SIGTERM)
            assert server.wait() == 0
    assert "outcome=drained" in server.stderr, server.stderr
