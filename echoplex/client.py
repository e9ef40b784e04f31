"""Client side of an echo conversation: one round trip, or an interactive session like nc."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import BinaryIO

from ._cli_util import fail

CHUNK_BYTES = 65536


class EchoMismatch(Exception):
    """The server answered with other bytes than were sent, or closed before answering all."""


def connect(host: str, port: int, timeout_s: float | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trip(sock: socket.socket, message: bytes) -> bytes:
    """Send `message` and read until as many bytes came back; raise if they differ."""
    sock.sendall(message)
    received = bytearray()
    while len(received) < len(message):
        chunk = sock.recv(min(CHUNK_BYTES, len(message) - len(received)))
        if not chunk:
            raise EchoMismatch(
                f"server closed after echoing {len(received)} of {len(message)} bytes"
            )
        received += chunk
    if received != message:
        raise EchoMismatch(f"server echoed {bytes(received)!r}, not {message!r}")
    return bytes(received)


def interact(sock: socket.socket, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Copy stdin to the socket and the socket to stdout; on stdin EOF half-close, then
    keep printing until the server closes (nc -N behaviour)."""

    def send_stdin() -> None:
        with contextlib.suppress(OSError):
            while chunk := _read_some(stdin):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=send_stdin, name="stdin-to-server", daemon=True).start()
    while chunk := sock.recv(CHUNK_BYTES):
        stdout.write(chunk)
        stdout.flush()


def _read_some(stream: BinaryIO) -> bytes:
    # read1 returns what is there (a typed line) instead of waiting for a full buffer.
    read1 = getattr(stream, "read1", None)
    return read1(CHUNK_BYTES) if read1 else stream.read(CHUNK_BYTES)


def describe_connect_error(host: str, port: int, exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r}: {reason}"
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    return f"cannot connect to {host}:{port}: {reason}"


def one_shot(
    prog: str,
    host: str,
    port: int,
    messages: list[bytes],
    *,
    raw: bool,
    timeout_s: float | None = None,
) -> int:
    """Send each message in turn on one connection, printing each echo; the exit status."""
    try:
        sock = connect(host, port, timeout_s)
    except OSError as exc:
        return fail(prog, describe_connect_error(host, port, exc), status=1)
    with sock:
        for message in messages:
            try:
                echoed = round_trip(sock, message)
            except EchoMismatch as exc:
                return fail(prog, str(exc), status=1)
            except OSError as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or exc
                return fail(prog, f"connection to {host}:{port} failed: {reason}", status=1)
            if raw:
                sys.stdout.buffer.write(echoed)
                sys.stdout.buffer.flush()
            else:
                print("Received:", echoed, flush=True)
    return 0


class _Stopped(Exception):
    pass


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


@contextlib.contextmanager
def stopped_quietly() -> Iterator[None]:
    """SIGINT/SIGTERM end the block at once, with no traceback: a requested stop."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
