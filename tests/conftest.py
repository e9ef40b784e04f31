from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from echoplex import MODELS

from .procs import Server


@pytest.fixture(params=list(MODELS))
def mode(request: pytest.FixtureRequest) -> str:
    """Every concurrency model, in turn."""
    name: str = request.param
    return name


@pytest.fixture
def server(mode: str) -> Iterator[Server]:
    """A running `echoplex serve` of each model on a free port (2 workers for `workers`)."""
    with Server("--workers", "2", mode=mode) as running:
        yield running


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(cert file, key file, CA file) made for this test run by trustme."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert_file), str(key_file), str(ca_file)


@pytest.fixture
def unix_path(tmp_path: Path) -> Iterator[str]:
    """A path for a Unix socket, removed afterwards (AF_UNIX paths are limited to ~107
    bytes; pytest's tmp paths can be longer)."""
    short = Path(f"/tmp/echoplex-test-{os.getpid()}-{tmp_path.name[-20:]}.sock")
    yield str(short)
    short.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def trusted_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A certificate for 127.0.0.1 from a fresh CA: the server's flags, and a client
    context that trusts it."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    yield {"args": ["--tls-cert", str(cert), "--tls-key", str(key)], "client": client}
