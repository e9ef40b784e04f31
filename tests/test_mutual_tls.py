"""Mutual TLS: `serve --tls-client-ca` requires a client certificate that CA signed, in
every model; `client` and `load` present one with `--cert`/`--key`; a file that cannot be
used is one line naming it, exit 2, on every command. Real servers on free ports, real
certificates (trustme, and the README's openssl recipe)."""

from __future__ import annotations

import json
import shlex
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from echoplex.testing import recv_exactly

from .procs import ROOT, Server, echoplex, require_tool


@dataclass(frozen=True)
class Pki:
    """The server's certificate, the CA its clients must come from, and client
    certificates from that CA and from another one, as files."""

    server_cert: str
    server_key: str
    server_ca: str
    client_ca: str
    client_cert: str
    client_key: str
    client_combined: str  # key and certificate in one file
    stranger_cert: str  # signed by another CA
    stranger_key: str
    encrypted_key: str  # client_cert's key, behind a passphrase

    def server_args(self) -> tuple[str, ...]:
        return (
            "--tls-cert",
            self.server_cert,
            "--tls-key",
            self.server_key,
            "--tls-client-ca",
            self.client_ca,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("mtls")
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    client = client_ca.issue_cert("client.example", common_name="client.example")
    stranger = other_ca.issue_cert("stranger.example")

    def written(name: str, blob: trustme.Blob) -> str:
        blob.write_to_path(str(folder / name))
        return str(folder / name)

    encrypted = folder / "encrypted-key.pem"
    from cryptography.hazmat.primitives import serialization  # trustme's own dependency

    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return Pki(
        server_cert=written("server.pem", server.private_key_and_cert_chain_pem),
        server_key=written("server-key.pem", server.private_key_pem),
        server_ca=written("server-ca.pem", server_ca.cert_pem),
        client_ca=written("client-ca.pem", client_ca.cert_pem),
        client_cert=written("client.pem", client.cert_chain_pems[0]),
        client_key=written("client-key.pem", client.private_key_pem),
        client_combined=written("client-combined.pem", client.private_key_and_cert_chain_pem),
        stranger_cert=written("stranger.pem", stranger.cert_chain_pems[0]),
        stranger_key=written("stranger-key.pem", stranger.private_key_pem),
        encrypted_key=str(encrypted),
    )


def client_context(
    pki: Pki, cert: str | None, key: str | None, version: ssl.TLSVersion
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.server_ca)
    context.minimum_version = context.maximum_version = version
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def echoes(server: Server, context: ssl.SSLContext) -> bool:
    """Whether a TLS client with `context` gets its bytes back. Refused shows at once in
    TLS 1.2 (the handshake fails), and at the first read in TLS 1.3, where the client has
    finished its side before the server checks its certificate: an alert, or a close."""
    data = b"who goes there"
    with socket.create_connection(server.address, timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(data)
                return recv_exactly(tls, len(data)) == data
        except (ssl.SSLError, ConnectionError):
            return False


@pytest.mark.timeout(90)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_only_clients_the_ca_signed_get_an_echo_in_every_model(
    mode: str, version: ssl.TLSVersion, pki: Pki
) -> None:
    trusted = client_context(pki, pki.client_cert, pki.client_key, version)
    anonymous = client_context(pki, None, None, version)
    stranger = client_context(pki, pki.stranger_cert, pki.stranger_key, version)
    with Server(*pki.server_args(), "--workers", "1", mode=mode) as server:
        assert echoes(server, trusted)
        server.wait_for_stderr(r"in=14 out=14 .*outcome=closed")
        # The open line names whom the certificate was issued to.
        server.wait_for_stderr(r"open \S+ client-cert='[^']*CN=client\.example")
        assert not echoes(server, anonymous)
        server.wait_for_stderr("outcome=tls-client-cert:missing")
        assert not echoes(server, stranger)
        server.wait_for_stderr("outcome=tls-client-cert:untrusted")
        assert echoes(server, trusted)  # the refusals cost the server nothing
        assert server.stop() == 0
    assert server.stderr.count("outcome=closed") == 2, server.stderr
    assert "Traceback" not in server.stderr
    assert " ERROR " not in server.stderr


def test_the_client_command_presents_a_certificate(pki: Pki) -> None:
    with Server(*pki.server_args(), mode="threads") as server:
        port = str(server.port)
        base = ("client", "--port", port, "--tls", "--ca", pki.server_ca, "-m", "hi")
        with_key = echoplex(*base, "--cert", pki.client_cert, "--key", pki.client_key)
        assert (with_key.returncode, with_key.stdout) == (
            0,
            "Starting client...\nReceived: b'hi'\n",
        )
        combined = echoplex(*base, "--cert", pki.client_combined)  # the key in the same file
        assert combined.returncode == 0, combined.stderr
        interactive = echoplex(
            *base[:-2], "--cert", pki.client_cert, "--key", pki.client_key, input=b"typed\n"
        )
        assert (interactive.returncode, interactive.stdout) == (0, "typed\n")
        for refused in (
            echoplex(*base),
            echoplex(*base, "--cert", pki.stranger_cert, "--key", pki.stranger_key),
        ):
            assert refused.returncode == 1, refused
            assert refused.stderr.count("\n") == 1, refused.stderr
            assert refused.stderr.startswith("echoplex client: error: "), refused.stderr
            assert "_ssl.c" not in refused.stderr and "Traceback" not in refused.stderr
        assert server.stop() == 0


@pytest.mark.timeout(90)
def test_the_load_command_presents_a_certificate_in_every_process(pki: Pki) -> None:
    with Server(*pki.server_args(), mode="asyncio") as server:
        flags = ("load", "--port", str(server.port), "--tls", "--ca", pki.server_ca, "-d", "0.3")
        for processes in ("1", "2"):  # a share in another process builds its own context
            result = echoplex(
                *flags,
                "-c",
                "2",
                "--processes",
                processes,
                "--cert",
                pki.client_cert,
                "--key",
                pki.client_key,
                "--json",
            )
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["ok"] and report["requests"] > 0, report
        refused = echoplex(*flags, "-c", "1", "--json")
        assert refused.returncode == 1
        assert not json.loads(refused.stdout)["ok"]
        server.wait_for_stderr("outcome=tls-client-cert:missing")
        assert server.stop() == 0


def bad_identities(pki: Pki) -> list[tuple[list[str], str]]:
    """(flags, what the one line must say) for certificates and keys that cannot be used."""
    return [
        (["--cert", "/nonexistent/client.pem"], "no such file: /nonexistent/client.pem"),
        (["--cert", pki.client_key, "--key", pki.client_cert], f"{pki.client_key} holds no PEM"),
        (
            ["--cert", pki.client_cert, "--key", pki.stranger_key],
            f"{pki.stranger_key} is not the private key of {pki.client_cert}",
        ),
        (["--cert", pki.client_cert, "--key", "/etc/hostname"], "/etc/hostname holds no PEM"),
        (["--cert", pki.client_cert], f"{pki.client_cert} holds no PEM private key"),
        (["--cert", pki.client_cert, "--key", pki.encrypted_key], "is an encrypted key"),
        (["--key", pki.client_key], "--key goes with --cert"),
    ]


@pytest.mark.parametrize("command", ["client", "load"])
def test_a_bad_client_certificate_or_key_is_one_line(command: str, pki: Pki) -> None:
    # Refused before any connection: nothing listens on port 9 here, nor needs to.
    run = ("-m", "hi") if command == "client" else ("-d", "1")
    for flags, expected in bad_identities(pki):
        result = echoplex(command, "--port", "9", "--tls", *flags, *run)
        assert result.returncode == 2, (flags, result)
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"echoplex {command}: error: "), result.stderr
        assert expected in result.stderr, (flags, result.stderr)
        assert "PEM lib" not in result.stderr and "_ssl.c" not in result.stderr
    without_tls = echoplex(command, "--port", "9", "--cert", pki.client_cert, *run)
    assert without_tls.returncode == 2
    assert "--cert and --key go with --tls" in without_tls.stderr


def test_a_bad_client_ca_is_one_line(pki: Pki) -> None:
    server_identity = ("--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
    for ca_file, expected in [
        ("/nonexistent/ca.pem", "no such file: /nonexistent/ca.pem"),
        ("/etc/hostname", "/etc/hostname holds no PEM certificate"),
        (pki.client_key, f"{pki.client_key} holds no PEM certificate"),
        (pki.client_cert, f"{pki.client_cert} holds no CA certificate"),  # a leaf, not a CA
    ]:
        for mode in ("threads", "workers"):
            result = echoplex(
                "serve", "--mode", mode, "--port", "0", *server_identity, "--tls-client-ca", ca_file
            )
            assert result.returncode == 2, result
            assert result.stderr.count("\n") == 1, result.stderr
            assert expected in result.stderr, result.stderr
            assert "_ssl.c" not in result.stderr


@pytest.mark.timeout(60)
def test_the_readme_mutual_tls_recipe_makes_a_ca_and_a_client_certificate(
    tmp_path: Path,
) -> None:
    require_tool("openssl")
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("openssl ")]
    assert len(commands) == 4, commands  # the server's certificate, then the CA and client's
    for command in commands:
        made = subprocess.run(
            shlex.split(command), cwd=tmp_path, capture_output=True, timeout=30, check=False
        )
        assert made.returncode == 0, (command, made.stderr)
    cert, key, ca = (str(tmp_path / name) for name in ("cert.pem", "key.pem", "ca.pem"))
    client_cert, client_key = str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem")
    with Server(
        "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca, mode="asyncio"
    ) as server:
        client = ("client", "--tls", "--ca", cert, "localhost", str(server.port))
        said = echoplex(*client, "--cert", client_cert, "--key", client_key, "-m", "hi")
        assert said.returncode == 0, said.stderr
        assert "hi" in said.stdout
        refused = echoplex(*client, "-m", "hi")
        assert refused.returncode == 1
        server.wait_for_stderr("outcome=tls-client-cert:missing")
        assert server.stop() == 0
