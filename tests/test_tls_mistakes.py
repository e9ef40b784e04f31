"""TLS mistakes get an error that names the mistake: a plain client at a TLS port, a TLS
client at a plain port, a certificate, key or CA file that cannot be used; and a server
that never answers is a read timeout, not a failed connection. Real servers on free
ports, real certificates (trustme)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import pytest
import trustme

from echoplex.load.config import LoadConfig
from echoplex.load.result import ConnectionFailure, LoadResult
from echoplex.testing import peer_tcp_line
from echoplex.tls import looks_like_tls_record, plaintext_answer

from .procs import Server, echoplex
from .waiting import wait_for


@dataclass(frozen=True)
class Files:
    cert: str
    key: str
    ca: str
    other_key: str  # another certificate's key


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("tls-mistakes")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    other = trustme.CA().issue_cert("other.example")
    paths = {}
    for name, blob in [
        ("cert", issued.cert_chain_pems[0]),
        ("key", issued.private_key_pem),
        ("ca", ca.cert_pem),
        ("other_key", other.private_key_pem),
    ]:
        paths[name] = str(folder / f"{name}.pem")
        blob.write_to_path(paths[name])
    return Files(**paths)


def one_error_line(result: object, command: str) -> str:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"echoplex {command}: error: "), stderr
    assert "Traceback" not in stderr and "_ssl.c" not in stderr
    return lines[0]


def test_the_rule_reads_a_tls_record_or_a_close_before_any_echo() -> None:
    assert looks_like_tls_record(b"\x15\x03\x03\x00\x02\x02\x46")  # a TLS 1.2 alert
    assert looks_like_tls_record(b"\x16\x03\x01\x02\x00")  # a handshake record
    assert not looks_like_tls_record(b"hi")
    assert not looks_like_tls_record(b"\x15\x05\x03")
    assert "speaks TLS (try --tls)" in (plaintext_answer(b"\x15\x03\x03", ended=False) or "")
    assert "seems to speak TLS" in (plaintext_answer(b"", ended=True) or "")
    assert plaintext_answer(b"", ended=False) is None  # no answer yet says nothing
    assert plaintext_answer(b"other", ended=True) is None  # a wrong echo is not TLS


@pytest.mark.timeout(90)
@pytest.mark.parametrize("message", ["hi", "a message longer than a record header"])
def test_a_plain_client_at_a_tls_port_is_told_to_try_tls(
    mode: str, message: str, files: Files
) -> None:
    # A message under 5 bytes waits for the server's handshake timeout (made short here);
    # a longer one is refused at once, with a FIN or a reset depending on the model.
    tls = ("--tls-cert", files.cert, "--tls-key", files.key, "--tls-handshake-timeout", "1")
    with Server(*tls, "--workers", "1", mode=mode) as server:
        result = echoplex("client", "127.0.0.1", str(server.port), "-m", message)
        assert result.returncode == 1, result
        line = one_error_line(result, "client")
        assert "it seems to speak TLS (try --tls)" in line, line
        assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["threads", "asyncio"])  # the one resets, the other closes
def test_a_plain_load_at_a_tls_port_is_told_to_try_tls(mode: str, files: Files) -> None:
    with Server("--tls-cert", files.cert, "--tls-key", files.key, mode=mode) as server:
        run = ("load", "--port", str(server.port), "-c", "2", "-d", "0.5")
        summary = echoplex(*run)
        as_json = echoplex(*run, "--json")
        assert server.stop() == 0
    assert (summary.returncode, as_json.returncode) == (1, 1), (summary, as_json)
    told = plaintext_answer(b"", ended=True)
    assert told is not None and "it seems to speak TLS (try --tls)" in told
    assert f"hint         {told}" in summary.stdout.splitlines(), summary.stdout
    report = json.loads(as_json.stdout)
    assert report["tls_suspected"] == told
    assert report["requests"] == 0 and set(report["errors_by_kind"]) <= {"closed early", "reset"}


def ended_run(*failures: tuple[str, int], tls: bool = False, echoed: int = 0) -> LoadResult:
    """A run whose connections failed as `failures` say: (kind, bytes verified first)."""
    result = LoadResult(LoadConfig(tls=tls), loop="asyncio")
    result.echoed_total = echoed
    for number, (kind, offset) in enumerate(failures):
        result.errors_by_kind[kind] = result.errors_by_kind.get(kind, 0) + 1
        result.error_samples.append(ConnectionFailure(number, kind, offset))
    return result


def test_which_runs_say_the_server_seems_to_speak_tls() -> None:
    told = plaintext_answer(b"", ended=True)
    assert ended_run(("closed early", 0), ("reset", 0)).tls_suspected == told
    assert ended_run(("closed early", 0), ("reset", 0), tls=True).tls_suspected is None
    assert ended_run(("closed early", 1050)).tls_suspected is None  # it echoed first
    assert ended_run(("closed early", 0), echoed=3).tls_suspected is None  # others echoed
    assert ended_run(("closed early", 0), ("timeout", 0)).tls_suspected is None
    assert ended_run().tls_suspected is None  # nothing failed


def established_in_queue(client: socket.socket) -> bool:
    """Whether the listener's end of `client` is established, so it fills the accept
    queue (a handshake still under way would not)."""
    try:
        return peer_tcp_line(client)[3] == "01"  # TCP_ESTABLISHED
    except AssertionError:  # no such socket yet
        return False


@pytest.mark.timeout(30)
def test_a_connect_timeout_of_load_names_its_time_limit() -> None:
    # A listener that never accepts, its queue of 1 full: Linux drops the next SYN, and
    # the next connect waits (for a retransmission a second later) until --timeout ends it.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        wait_for(lambda: established_in_queue(filler), 10, "the filler in the accept queue")
        result = echoplex("load", "--port", str(port), "--timeout", "1", "-d", "0.2")
    assert result.returncode == 1, result
    line = one_error_line(result, "load")
    assert line.endswith(
        f"cannot connect to 127.0.0.1:{port}: no connection within 1s (a connect timeout)"
    ), line


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["threads", "asyncio"])
@pytest.mark.parametrize("command", ["client", "load"])
def test_a_tls_client_at_a_plain_port_is_told_the_server_does_not_speak_tls(
    mode: str, command: str
) -> None:
    run = ("-m", "hi") if command == "client" else ("-d", "1", "-c", "2")
    with Server(mode=mode) as server:
        result = echoplex(command, "--port", str(server.port), "--tls", "--insecure", *run)
        assert result.returncode == 1, result
        line = one_error_line(result, command)
        assert "the server does not speak TLS: it echoed our ClientHello back" in line, line
        assert "UNEXPECTED_MESSAGE" not in line
        assert server.stop() == 0


def bad_files(files: Files, cert_flag: str, key_flag: str) -> list[tuple[list[str], str]]:
    return [
        (
            [cert_flag, files.key, key_flag, files.cert],
            f"{files.key} holds no PEM certificate: it is a private key "
            "(the certificate and the key swapped?)",
        ),
        (
            [cert_flag, "/etc/hostname", key_flag, files.key],
            "/etc/hostname holds no PEM certificate: it is not a PEM file",
        ),
        (
            [cert_flag, files.cert, key_flag, files.cert],
            f"{files.cert} holds no PEM private key: it is a certificate",
        ),
        (
            [cert_flag, files.cert, key_flag, files.other_key],
            f"{files.other_key} is not the private key of {files.cert}",
        ),
        ([cert_flag, "/nonexistent/cert.pem", key_flag, files.key], "no such file"),
    ]


def test_a_server_certificate_or_key_that_cannot_be_used_is_one_line(files: Files) -> None:
    cases = [
        *bad_files(files, "--tls-cert", "--tls-key"),
        (
            ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-client-ca", files.key],
            f"{files.key} holds no PEM certificate: it is a private key",
        ),
        (
            ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-client-ca", "/tmp"],
            "/tmp is a directory, not a file",
        ),
    ]
    for mode in ("threads", "asyncio"):
        for flags, expected in cases:
            result = echoplex("serve", "--mode", mode, "--port", "0", *flags)
            assert result.returncode == 2, (flags, result)
            assert expected in one_error_line(result, "serve"), (flags, result.stderr)


@pytest.mark.parametrize("command", ["client", "load"])
def test_a_client_certificate_key_or_ca_that_cannot_be_used_is_one_line(
    command: str, files: Files
) -> None:
    run = ("-m", "hi") if command == "client" else ("-d", "1")
    cases = [
        *bad_files(files, "--cert", "--key"),
        (["--ca", files.key], f"cannot load CA file {files.key}: it holds no PEM certificate"),
        (["--ca", "/etc/hostname"], "it is not a PEM file"),
        (["--ca", "/tmp"], "CA file /tmp is a directory, not a file"),
    ]
    for flags, expected in cases:
        # Refused before any connection: nothing listens on port 9 here, nor needs to.
        result = echoplex(command, "--port", "9", "--tls", *flags, *run)
        assert result.returncode == 2, (flags, result)
        assert expected in one_error_line(result, command), (flags, result.stderr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_a_server_that_never_answers_is_a_read_timeout(mode: str) -> None:
    with Server("--stall-after", "0", mode=mode) as server:
        port = str(server.port)
        plain = echoplex("client", "127.0.0.1", port, "--timeout", "1", "-m", "hello")
        assert plain.returncode == 1, plain
        line = one_error_line(plain, "client")
        assert f"the server at 127.0.0.1:{port} did not answer within 1s (a read timeout)" in line
        assert "connection failed" not in line and "try --tls" not in line
        over_tls = echoplex(
            "client", "127.0.0.1", port, "--timeout", "1", "--tls", "--insecure", "-m", "hello"
        )
        assert over_tls.returncode == 1, over_tls
        assert "failed: no handshake within 1s" in one_error_line(over_tls, "client")
        assert server.stop() == 0
