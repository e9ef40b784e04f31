"""Client side of an echo conversation: one round trip, or an interactive session like nc;
over TCP, or over UDP a datagram at a time.

One-shot use (`one_shot`, `one_shot_udp`) prints each echo as `echoplex client -m` and
the tutorial's `ClientPython.py` show it, and returns their exit status: both front
ends call it from here, so the tutorial does not depend on the command above it."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, BinaryIO

from ._cli_util import fail
from .config import DEFAULT_PORT
from .proxy_protocol import encode_v1, encode_v2
from .tls import plaintext_answer, silence_hint

CHUNK_BYTES = 65536


class EchoMismatch(Exception):
    """The server answered with other bytes than were sent, or closed before answering all."""


class HandshakeTimeout(TimeoutError):
    """The TLS handshake did not finish in time (the connection itself was made)."""


class NoAnswer(TimeoutError):
    """The server took the message but echoed none of it in time: a read timeout."""

    def __init__(self, hint: str = "") -> None:
        super().__init__("no answer")
        self.hint = hint
        """More words for the line, from what a silence may mean (`echoplex.tls`)."""


class SendTimeout(TimeoutError):
    """The server did not take the message in time: a write timeout."""


@dataclass(frozen=True)
class Target:
    """Where a stream client connects, and how."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix_path: str | None = None
    """Connect to this Unix domain socket instead of host:port."""
    tls: ssl.SSLContext | None = None
    """Speak TLS over the connection, verifying the server as `host` (see echoplex.tls)."""
    send_proxy: str | None = None
    """`v1` or `v2`: start with a PROXY protocol header naming this connection (before
    TLS), as HAProxy's send-proxy does, to test a server that expects one."""

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


def connect(target: Target, timeout_s: float | None = None) -> socket.socket:
    if target.unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(target.unix_path)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((target.host, target.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if target.send_proxy:
            sock.sendall(proxy_header_for(sock, target.send_proxy))
        if target.tls is not None:
            return _handshake(target.tls, sock, target.host)
    except BaseException:
        sock.close()
        raise
    return sock


def _handshake(context: ssl.SSLContext, sock: socket.socket, host: str) -> ssl.SSLSocket:
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        raise HandshakeTimeout from None


def proxy_header_for(sock: socket.socket, version: str) -> bytes:
    """The PROXY header a proxy would send for this connection: us as the client."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return encode_v1() if version == "v1" else encode_v2()  # UNKNOWN / no addresses
    source, destination = sock.getsockname()[:2], sock.getpeername()[:2]
    return encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)


def round_trip(sock: socket.socket, message: bytes, *, first_plain: bool = False) -> bytes:
    """Send `message` and read until as many bytes came back; raise if they differ.
    `first_plain`: this is the first message of a connection without TLS, so an answer
    that says the server speaks TLS is told as such (`echoplex.tls.plaintext_answer`)."""
    try:
        sock.sendall(message)
    except TimeoutError:
        raise SendTimeout from None
    received = bytearray()
    while len(received) < len(message):
        try:
            chunk = sock.recv(min(CHUNK_BYTES, len(message) - len(received)))
        except TimeoutError:
            hint = silence_hint(len(message)) if first_plain and not received else ""
            raise NoAnswer(hint) from None
        except ConnectionResetError:
            if first_plain and not received:
                raise EchoMismatch(plaintext_answer(b"", ended=True)) from None
            raise
        if not chunk:
            said = plaintext_answer(bytes(received), ended=True) if first_plain else None
            raise EchoMismatch(
                said or f"server closed after echoing {len(received)} of {len(message)} bytes"
            )
        received += chunk
        said = None
        if first_plain and not message.startswith(received):
            said = plaintext_answer(bytes(received), ended=False)
        if said:
            raise EchoMismatch(said)
    if received != message:
        raise EchoMismatch(f"server echoed {bytes(received)!r}, not {message!r}")
    return bytes(received)


def interact(sock: socket.socket, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Copy stdin to the socket and the socket to stdout. On stdin EOF, half-close and
    keep printing until the server closes (nc -N behaviour). Over TLS, where a TCP
    half-close would cut the TLS session, end instead once every byte sent has come back.

    One thread waits on both with select: a TLS session may not be read and written from
    two threads at once (OpenSSL's SSL objects are not thread-safe), and a stop signal
    always finds the thread that acts on it. stdin is read with os.read, so a typed line
    goes out at once, and no more of it is read while the server has not taken the last.
    """
    over_tls = isinstance(sock, ssl.SSLSocket)
    stdin_fd = stdin.fileno()
    sock.setblocking(False)
    unsent = b""  # read from stdin, not yet taken by the socket
    sent = received = 0
    stdin_open, half_closed = True, False
    while True:
        if over_tls and not stdin_open and not unsent and received >= sent:
            return  # every byte typed has come back
        waiting_in: list[Any] = [sock] + ([stdin_fd] if stdin_open and not unsent else [])
        waiting_out = [sock] if unsent else []
        readable: list[Any] = [sock]  # TLS may hold decrypted bytes select cannot see
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            readable, _, _ = select.select(waiting_in, waiting_out, [])
        if sock in readable:
            try:
                chunk = sock.recv(CHUNK_BYTES)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                chunk = None
            except ssl.SSLEOFError:
                chunk = b""
            if chunk == b"":
                return  # the server closed
            if chunk:
                stdout.write(chunk)
                stdout.flush()
                received += len(chunk)
        if stdin_fd in readable:
            unsent = os.read(stdin_fd, CHUNK_BYTES)
            stdin_open = bool(unsent)
        if unsent:
            try:
                taken = sock.send(unsent)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                taken = 0
            unsent = unsent[taken:]
            sent += taken
        if not (stdin_open or unsent or over_tls or half_closed):
            half_closed = True
            with contextlib.suppress(OSError):  # the server is gone: the next recv says so
                sock.shutdown(socket.SHUT_WR)


# A server's alerts about our certificate under mutual TLS, in words. With TLS 1.3 they
# come after the client's side of the handshake is done, at its first read.
_CERTIFICATE_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake refused (does the server require a client "
    "certificate?)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate's CA",
}


# A plain server's answer to our ClientHello, as OpenSSL reads it: an echo server sends
# the ClientHello back (a handshake record, but the server's may not be a ClientHello);
# another plaintext answer is no TLS record at all.
_PLAINTEXT_SERVER = {
    "UNEXPECTED_MESSAGE": "the server does not speak TLS: it echoed our ClientHello back "
    "as plaintext (try without --tls)",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS: it answered the handshake "
    "with plaintext (try without --tls)",
}


def tls_failure(exc: ssl.SSLError) -> str:
    """Why TLS failed, in one line: OpenSSL's reason, in words for a refused client
    certificate or a server that does not speak TLS; never OpenSSL's
    `[SSL: ...] (_ssl.c:NNNN)`."""
    if isinstance(exc, ssl.SSLEOFError):
        return "the server closed the connection"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}"
    reason = exc.reason or ""
    return _CERTIFICATE_ALERTS.get(reason) or _PLAINTEXT_SERVER.get(reason) or reason or str(exc)


def _within(timeout_s: float | None) -> str:
    return "in time" if timeout_s is None else f"within {timeout_s:g}s"


def describe_connection_error(target: Target, exc: OSError, timeout_s: float | None = None) -> str:
    """A connection that could not be opened (connect, then the TLS handshake), in one
    line; `timeout_s`, the time limit it had."""
    reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {target.host!r}: {reason}"
    if isinstance(exc, HandshakeTimeout):
        return f"TLS with {target} failed: no handshake {_within(timeout_s)}"
    if isinstance(exc, TimeoutError):
        reason = f"no connection {_within(timeout_s)} (a connect timeout)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {target} failed: {tls_failure(exc)}"
    return f"cannot connect to {target}: {reason}"


def describe_failure(target: Target, exc: OSError, timeout_s: float | None = None) -> str:
    """A connection that failed once open, in one line; `timeout_s`, the time limit of
    each read and write."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {target} failed: {tls_failure(exc)}"
    if isinstance(exc, NoAnswer):
        return (
            f"the server at {target} did not answer {_within(timeout_s)} (a read timeout){exc.hint}"
        )
    if isinstance(exc, SendTimeout):
        return (
            f"the server at {target} did not take the message {_within(timeout_s)} "
            "(a write timeout)"
        )
    reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or exc
    return f"connection to {target} failed: {reason}"


# UDP (`echoplex client --udp`): each message is one datagram, each echo one datagram back.
UDP_TIMEOUT_S = 2.0
"""How long to wait for a datagram's echo: on UDP a lost datagram is never answered."""
MAX_DATAGRAM_BYTES = 65_507  # the most one IPv4 datagram carries
_RECV_DATAGRAM_BYTES = 65_536  # a byte more than any datagram, so a longer echo shows


def open_udp(host: str, port: int) -> socket.socket:
    """A UDP socket connected to host:port: it hears only from there, and a port with no
    server behind it shows as ConnectionRefusedError (ICMP port unreachable)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.connect(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def datagram_round_trip(sock: socket.socket, message: bytes) -> bytes:
    """Send `message` as one datagram, wait for the echo (the socket's timeout); raise if
    it differs."""
    sock.send(message)
    echoed = sock.recv(_RECV_DATAGRAM_BYTES)
    if echoed != message:
        raise EchoMismatch(f"server echoed {echoed!r}, not {message!r}")
    return echoed


def describe_udp_error(host: str, port: int, exc: OSError, timeout_s: float) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return f"no echo from udp {host}:{port} within {timeout_s:g}s (lost, or not answered)"
    if isinstance(exc, ConnectionRefusedError):
        return f"no udp echo server at {host}:{port}: Connection refused"
    if exc.errno == errno.EMSGSIZE:
        return f"a message is too long for one datagram (at most {MAX_DATAGRAM_BYTES} bytes)"
    return f"udp to {host}:{port} failed: {exc.strerror or exc}"


def interact_udp(sock: socket.socket, stdin_fd: int, stdout: BinaryIO, timeout_s: float) -> int:
    """Send each stdin line as one datagram (a longer line in datagram-sized pieces) and
    write every echo to stdout. After stdin ends, wait up to `timeout_s` after the last
    send for the echoes still due; return how many never came."""
    pending = b""
    unanswered = 0
    last_sent = time.monotonic()
    with selectors.DefaultSelector() as selector:
        selector.register(stdin_fd, selectors.EVENT_READ)
        selector.register(sock, selectors.EVENT_READ)
        stdin_open = True
        while stdin_open or unanswered:
            timeout = None if stdin_open else last_sent + timeout_s - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            for key, _ in selector.select(timeout):
                if key.fileobj is sock:
                    stdout.write(sock.recv(_RECV_DATAGRAM_BYTES))
                    stdout.flush()
                    unanswered = max(0, unanswered - 1)
                    continue
                chunk = os.read(stdin_fd, MAX_DATAGRAM_BYTES)
                if chunk:
                    pending += chunk
                else:
                    stdin_open = False
                    selector.unregister(stdin_fd)
                datagrams, pending = _datagrams(pending, final=not stdin_open)
                for datagram in datagrams:
                    sock.send(datagram)
                    unanswered += 1
                    last_sent = time.monotonic()
    return unanswered


def _datagrams(data: bytes, *, final: bool) -> tuple[list[bytes], bytes]:
    """Whole lines of `data` as datagrams (a longer line cut to the largest datagram), and
    the rest; `final`: the rest too."""
    datagrams = []
    while data:
        newline = data.find(b"\n", 0, MAX_DATAGRAM_BYTES)
        if newline >= 0:
            cut = newline + 1
        elif len(data) >= MAX_DATAGRAM_BYTES or final:
            cut = MAX_DATAGRAM_BYTES
        else:
            break
        datagrams.append(data[:cut])
        data = data[cut:]
    return datagrams, data


# ---------------------------------------------------------------- one-shot use


def one_shot(
    prog: str,
    target: Target,
    messages: Iterable[bytes],
    *,
    raw: bool,
    timeout_s: float | None = None,
) -> int:
    """Send each message in turn on one connection, printing each echo; the exit status."""
    try:
        sock = connect(target, timeout_s)
    except OSError as exc:
        return fail(prog, describe_connection_error(target, exc, timeout_s), status=1)
    exchanged = 0

    def exchange(sock: socket.socket, message: bytes) -> bytes:
        nonlocal exchanged
        exchanged += 1
        return round_trip(sock, message, first_plain=target.tls is None and exchanged == 1)

    return _print_echoes(
        prog,
        sock,
        messages,
        exchange,
        lambda exc: describe_failure(target, exc, timeout_s),
        raw=raw,
    )


def one_shot_udp(
    prog: str,
    host: str,
    port: int,
    messages: Iterable[bytes],
    *,
    raw: bool,
    timeout_s: float = UDP_TIMEOUT_S,
) -> int:
    """Send each message as a datagram in turn, printing each echo; the exit status."""
    try:
        sock = open_udp(host, port)
    except OSError as exc:
        return fail(prog, describe_udp_error(host, port, exc, timeout_s), status=1)
    sock.settimeout(timeout_s)
    return _print_echoes(
        prog,
        sock,
        messages,
        datagram_round_trip,
        lambda exc: describe_udp_error(host, port, exc, timeout_s),
        raw=raw,
    )


def _print_echoes(
    prog: str,
    sock: socket.socket,
    messages: Iterable[bytes],
    exchange: Callable[[socket.socket, bytes], bytes],
    failed: Callable[[OSError], str],
    *,
    raw: bool,
) -> int:
    """One-shot use over TCP or UDP: `exchange` each message, print each echo as it comes
    back (the tutorial's `Received: b'...'`, or the bytes with `raw`), close; the exit
    status. A wrong echo or a failure (worded by `failed`) ends it with status 1."""
    with sock:
        for message in messages:
            try:
                echoed = exchange(sock, message)
            except EchoMismatch as exc:
                return fail(prog, str(exc), status=1)
            except OSError as exc:
                return fail(prog, failed(exc), status=1)
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
