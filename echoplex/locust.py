"""Locust users that load an echo server over raw TCP and verify every echoed byte.

Load that outgrows one machine runs on Locust's distributed engine instead of a
home-made one: `locust --master` hands users out to `locust --worker` processes on
as many machines as needed and aggregates their statistics. This module is the
echo-specific part only:

- `EchoUser` keeps one TCP connection to the target and, per task, sends the next
  `message_bytes` of that connection's verifiable stream (`echoplex.payload`),
  reads until as many bytes came back, and checks them as they arrive. Each round
  trip is reported to Locust's `request` event (type `echo`) with its latency and
  size; a corrupted echo, an early close, a refused/reset/timed-out connection is
  reported as a failure, and the next task reconnects.
- `--echo-size` (env `LOCUST_ECHO_SIZE`) overrides `message_bytes` from the command
  line; the master forwards it to its workers, like `--host`.

The target comes from Locust's `--host` as `tcp://HOST:PORT` (`tcp://[::1]:PORT` for
IPv6); `bench/locustfile.py` is a ready locustfile.

Importing this module imports Locust, which monkey-patches the standard library
with gevent (that is what makes the plain `socket` calls below cooperative). Import
it from locustfiles only, never from a process that must keep real threads.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import socket
import time
from functools import cache
from typing import Any

import gevent
from locust import User, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

from ._tcp_target import InvalidTarget, parse_tcp_target
from .payload import PayloadPattern, Sender, Verifier

__all__ = [
    "EchoClosed",
    "EchoError",
    "EchoMismatch",
    "EchoUser",
    "InvalidTarget",
]

log = logging.getLogger("echoplex.locust")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Connection numbers pick a connection's stream in the payload pattern, so they must
# not repeat across the run: each worker numbers its connections from its own base.
# A billion per worker keeps the number readable: 2000000017 is worker 2's 18th.
CONNECTIONS_PER_WORKER = 1_000_000_000
# Up to this size the whole message fits in the loopback socket buffers (Linux starts
# a receive buffer at 128 KiB), so sending it all before reading cannot deadlock.
# Larger messages are sent from a second greenlet while this one reads the echo:
# a server that stops reading while its replies are unread would otherwise wait on
# us as we wait on it.
SEND_THEN_READ_MAX_BYTES = 64 * 1024
# Locust keeps one failure row per distinct message. A mismatch names its connection
# and offset, so a server that corrupts every connection would grow that table
# without bound: after this many per process, the detail is left out.
MAX_DETAILED_FAILURES = 100


class EchoError(Exception):
    """The echo did not come back as sent."""


class EchoMismatch(EchoError):
    """A byte came back that was not the one sent at that offset."""


class EchoClosed(EchoError):
    """The server closed the connection before echoing the whole message."""


_detailed_failures = itertools.count()
_local_connection_numbers = itertools.count()


def _detailed(detail: str, summary: str) -> str:
    if next(_detailed_failures) < MAX_DETAILED_FAILURES:
        return detail
    return f"{summary} (details left out after {MAX_DETAILED_FAILURES} on this process)"


@cache
def _pattern(seed: int) -> PayloadPattern:
    # About 2 MiB per seed, built once per process and shared by all its users.
    return PayloadPattern(seed)


class EchoConnection:
    """One TCP connection and its verifiable stream, one round trip at a time."""

    def __init__(self, sock: socket.socket, pattern: PayloadPattern, number: int) -> None:
        self.sock = sock
        self.number = number
        self.sender = Sender(pattern, number)
        self.verifier = Verifier(pattern, number)

    @classmethod
    def open(
        cls, address: tuple[str, int], pattern: PayloadPattern, number: int, timeout_s: float
    ) -> EchoConnection:
        sock = socket.create_connection(address, timeout=timeout_s)
        try:
            # Request/response: Nagle would hold each message back for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        return cls(sock, pattern, number)

    def round_trip(self, buffer: memoryview) -> None:
        """Send the next len(buffer) bytes of the stream; read and verify their echo."""
        size = len(buffer)
        message = self.sender.next(size)
        if size <= SEND_THEN_READ_MAX_BYTES:
            self.sock.sendall(message)
            self._read_echo(buffer)
            return
        writer = gevent.spawn(self.sock.sendall, message)
        try:
            self._read_echo(buffer)
        except BaseException:  # GreenletExit too: a stopped user must not leave it behind
            writer.kill(block=True)
            raise
        writer.get()  # the whole echo is in, so the send is done (or raises its error)

    def _read_echo(self, buffer: memoryview) -> None:
        size = len(buffer)
        received = 0
        while received < size:
            count = self.sock.recv_into(buffer[received:], size - received)
            if count == 0:
                raise EchoClosed(
                    _detailed(
                        f"connection {self.number} closed by the server at offset "
                        f"{self.verifier.offset}, {received} of {size} echo bytes in",
                        "connection closed by the server in the middle of an echo",
                    )
                )
            mismatch = self.verifier.feed(buffer[received : received + count])
            if mismatch is not None:
                raise EchoMismatch(_detailed(f"echo corrupted: {mismatch}", "echo corrupted"))
            received += count

    def close(self) -> None:
        self.sock.close()


class EchoUser(User):
    """Echo round trips over one raw TCP connection, each verified and reported to Locust.

    Subclass it in a locustfile (this base is abstract) and set `wait_time`; override
    `message_bytes`, `timeout_s` or `seed` as class attributes.
    """

    abstract = True
    message_bytes: int = 1024
    """Bytes per round trip; `--echo-size` overrides it."""
    timeout_s: float = 10.0
    """Per connect and per socket operation: a stalled server is a failure, not a hang."""
    seed: int = 0
    """Payload seed; the same for every user and worker, so any process can check any echo."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._connection: EchoConnection | None = None
        self._address: tuple[str, int] | None = None
        self._buffer = memoryview(b"")
        self._request_name = ""

    def on_start(self) -> None:
        self._address = parse_tcp_target(self.host)
        size = self.message_size(self.environment)
        self._buffer = memoryview(bytearray(size))
        self._request_name = f"{size} bytes"

    @classmethod
    def message_size(cls, environment: Environment) -> int:
        """`--echo-size` if given, else the class's `message_bytes`."""
        size = getattr(environment.parsed_options, "echo_size", None)
        if size is None:
            size = cls.message_bytes
        if not 1 <= size <= MAX_MESSAGE_BYTES:
            raise ValueError(f"message size {size} is not in 1..{MAX_MESSAGE_BYTES} bytes")
        return size

    def on_stop(self) -> None:
        self._disconnect()

    @task
    def echo(self) -> None:
        exception: Exception | None = None
        started = time.perf_counter()
        try:
            if self._connection is None:
                self._connection = self._connect()
                # The handshake is not part of the round trip's latency.
                started = time.perf_counter()
            self._connection.round_trip(self._buffer)
        except (EchoError, OSError) as exc:
            exception = exc
            self._disconnect()  # the stream's state is unknown: the next task reconnects
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.environment.events.request.fire(
            request_type="echo",
            name=self._request_name,
            response_time=elapsed_ms,
            response_length=len(self._buffer) if exception is None else 0,
            exception=exception,
            context=self.context(),
        )

    def _connect(self) -> EchoConnection:
        assert self._address is not None, "on_start sets the address"
        return EchoConnection.open(
            self._address, _pattern(self.seed), self._next_connection_number(), self.timeout_s
        )

    def _next_connection_number(self) -> int:
        # Workers get their index from the master before any user starts; a local run is 0.
        worker_index = max(getattr(self.environment.runner, "worker_index", 0), 0)
        return worker_index * CONNECTIONS_PER_WORKER + next(_local_connection_numbers)

    def _disconnect(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()


def _echo_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if not 1 <= size <= MAX_MESSAGE_BYTES:
        raise argparse.ArgumentTypeError(f"{size} is not in 1..{MAX_MESSAGE_BYTES} bytes")
    return size


def add_arguments(parser: LocustArgumentParser, **_: Any) -> None:
    parser.add_argument(
        "--echo-size",
        type=_echo_size,
        default=None,
        env_var="LOCUST_ECHO_SIZE",
        help="Bytes per echo round trip (default: the user class's message_bytes, 1024)",
    )


def check_targets(environment: Environment, **_: Any) -> None:
    """Refuse a bad `--host` at start-up, on the process that owns it, not once per user."""
    if isinstance(environment.runner, WorkerRunner):
        return  # a worker learns the host from the master when the test starts
    for user_class in environment.user_classes:
        if issubclass(user_class, EchoUser):
            try:
                parse_tcp_target(environment.host or user_class.host)
            except InvalidTarget as exc:
                log.error("%s: %s", user_class.__name__, exc)
                raise SystemExit(1) from None


# Registered on import, as Locust documents for locustfiles: any locustfile that uses
# EchoUser gets `--echo-size` and the start-up check of `--host`.
events.init_command_line_parser.add_listener(add_arguments)
events.init.add_listener(check_targets)
