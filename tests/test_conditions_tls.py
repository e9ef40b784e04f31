"""`--close-after` over TLS ends the session as TLS says, in every model: exactly the
bytes of echo, then `close_notify`, then the FIN. A strict client (Python's `ssl` with
`suppress_ragged_eofs=False`) reads that as a clean EOF; a FIN without `close_notify`
would be `SSLEOFError` there (a truncation attack, as far as TLS can tell)."""

from __future__ import annotations

import socket
import ssl

import pytest

from echoplex.models import MODELS

from .procs import Server

pytestmark = pytest.mark.timeout(60)

CLOSE_AFTER = 20


def read_strictly(sock: ssl.SSLSocket) -> tuple[bytes, str]:
    """Every byte until the end, and the end as a strict client sees it: `eof` (the
    server's close_notify) or the SSL error's class name (a FIN without close_notify)."""
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ssl.SSLError as exc:
        return bytes(got), type(exc).__name__
    return bytes(got), "eof"


@pytest.mark.parametrize("mode", list(MODELS))
@pytest.mark.parametrize(
    "sent",
    [
        [50],
        [50, 50],  # input past the mark is read and dropped, not echoed
        # Records past the mark already read when the close is due: OpenSSL refuses
        # them once close_notify is written (APPLICATION_DATA_AFTER_CLOSE_NOTIFY).
        [40_000],
    ],
    ids=["one-chunk", "then-more", "records-past-the-mark"],
)
def test_close_after_over_tls_is_a_clean_eof_after_exactly_its_bytes(
    mode: str, sent: list[int], trusted_tls: dict[str, object]
) -> None:
    args = [*trusted_tls["args"], "--close-after", str(CLOSE_AFTER), "--workers", "1"]  # type: ignore[misc]
    context = trusted_tls["client"]
    assert isinstance(context, ssl.SSLContext)
    chunks = [bytes(index % 256 for index in range(size)) for size in sent]
    with Server(*args, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as raw:
            with context.wrap_socket(
                raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False
            ) as sock:
                for chunk in chunks:
                    sock.sendall(chunk)
                got, end = read_strictly(sock)
        assert (got, end) == (chunks[0][:CLOSE_AFTER], "eof")
        server.wait_for_stderr(rf"out={CLOSE_AFTER} .*outcome=close-after")
        assert server.stop() == 0
