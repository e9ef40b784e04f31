"""A conformance kit: the echo contract as code that any concurrency model can be run against.

    from echoplex.testing import check_model
    check_model("pool")                    # a name in echoplex.models.MODELS
    check_model(my_module, threads=4)      # anything with serve(config, events, shutdown),
                                           # with ServerConfig fields overridden

`check_model` starts the server in the calling thread, drives it from client threads
over real sockets on 127.0.0.1 (port 0, read back from `events.listening`), and returns
normally or raises `AssertionError` naming the check that failed and why. Like trio's
`testing/_check_streams.py`, it is public so that a model someone adds (or writes
elsewhere) can prove it keeps the contract every model here keeps. The whole kit takes a
few seconds per model: every timeout it configures is short and every wait it makes has
a deadline and waits for a condition (an event, a byte, an EOF), never a fixed sleep.

The server runs three times. The first run (`drain_timeout_s=1`, `max_connections=20`) checks:

- streams: 20 concurrent clients send seeded random binary (`seed`) in random chunk
  sizes while reading, then half-close: each gets exactly its bytes back, then EOF;
- 1 MiB sent and read at once on one connection;
- half-close: a client that shuts down its write side gets every byte back, then EOF;
- max-connections: with 20 clients held open a 21st is closed at once (and reported
  rejected as `max-connections`); once a holder's close is reported, a newcomer is
  served (a model gives a slot back before it reports the close);
- reset: clients that reset (SO_LINGER 0) with echo unread end only their own
  connections (outcome `reset`): a client open throughout, and one that comes after,
  are still served;
- drain and a stop signal: with clients open, SIGTERM is sent with
  `signal.pthread_kill` to the kit's own client thread (not the main thread); the
  server reports `stopping`, a connection in flight still echoes and finishes (`closed`),
  one left idle is cut off when the drain timeout passes (`drained`), and the server
  returns. A stop signal may land on any thread, and the server must still wake, so
  `echoplex.server.run` routes SIGTERM into the `Shutdown` with `signal.set_wakeup_fd`
  (a model of your own runs through `run` too, so it gets the same routing).
  Called from a thread other than the main one, where Python cannot install signal
  handlers, the kit stops the server with `Shutdown.request()` instead and logs so.

Two short runs, each stopped with `Shutdown.request()`, check the time limits: with
`idle_timeout_s=0.3` a silent client is closed (EOF) with outcome `idle-timeout`; with
`send_timeout_s=0.3` (and no idle timeout) a client that sends without ever reading is
cut off with outcome `send-timeout`. One limit per run, so that a stall of a busy
machine cannot end a connection by the other limit.

Every connection the kit makes must be reported closed once with the outcome named
above (compared as strings, so an enum of outcomes whose values are these works too).
The kit's events object (a `QuietEvents`) writes each event as one line to a pipe that
a thread of the kit reads: a write of a few bytes to a pipe is atomic, takes no lock,
and works from any thread and from processes forked from the caller. So `workers`,
whose connections are served in forked worker processes that hold a copy of the
events object, is checked exactly like the in-process models: its workers' outcomes
and rejections reach the kit through the inherited pipe. (A server that runs its
connections in processes that are not forked from the caller, and so cannot report to
that pipe, fails the kit's first wait for an outcome.) For `workers` the kit configures
`workers=2`.

`simple` serves one client at a time by design: its clients wait in the listen backlog,
so no limit on open connections can turn one away. For it (and for any model passed
with `concurrent=False`) the max-connections check is skipped and the drain check uses
one connection, which echoes during the drain and is then cut off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .config import ServerConfig
from .events import ConnectionRecord, QuietEvents
from .plan import Model, load_model
from .server import run
from .shutdown import Shutdown

__all__ = ["check_model", "recv_exactly", "recv_until_eof"]

log = logging.getLogger("echoplex.testing")

_Start = Callable[[ServerConfig, "_Events", Shutdown], None]

ONE_AT_A_TIME = frozenset({"simple"})
"""Models that serve one client at a time (see the module docstring)."""

CLIENTS = 20  # concurrent clients of the streams check, and the max-connections limit
IO_TIMEOUT_S = 10.0  # every blocking socket call of the kit's clients
STARTUP_TIMEOUT_S = 30.0  # `workers` forks; a busy machine is slow to start them
REPORT_TIMEOUT_S = 10.0  # from a connection's end (or the stop) to its event
DRAIN_TIMEOUT_S = 1.0
SHORT_LIMIT_S = 0.3  # the idle and the send timeout, each in a run of its own

STREAMS_AND_STOP = {"drain_timeout_s": DRAIN_TIMEOUT_S, "max_connections": CLIENTS, "workers": 2}
IDLE_LIMIT = {"idle_timeout_s": SHORT_LIMIT_S, "workers": 2}
SEND_LIMIT = {"idle_timeout_s": 0, "send_timeout_s": SHORT_LIMIT_S, "workers": 2}


def check_model(
    model: str | Model, *, concurrent: bool | None = None, seed: int = 0, **config_overrides: Any
) -> None:
    """Run the echo contract against `model` in this process; raise AssertionError if it
    is broken.

    `model`: a name in `echoplex.models.MODELS`, or an object with `serve(plan, events,
    shutdown)` (`echoplex.plan.Model`); either runs through `echoplex.server.run`.
    `concurrent`: whether it serves clients at once (default: all but `simple`).
    `seed`: of the random payloads.
    `config_overrides`: `ServerConfig` fields, applied over the kit's own settings (a
    machine too busy to finish a client within the drain may pass `drain_timeout_s=5`).
    """
    if isinstance(model, str):
        label, chosen = model, load_model(model)  # an unknown name: a ValueError now
        concurrent = model not in ONE_AT_A_TIME if concurrent is None else concurrent
    else:
        label, chosen = getattr(model, "__name__", type(model).__name__), model
        concurrent = True if concurrent is None else concurrent
    start = _runner(chosen)
    by_signal = threading.current_thread() is threading.main_thread()
    if not by_signal:
        log.info("not in the main thread: stopping %s with Shutdown.request(), not SIGTERM", label)
    base = ServerConfig(hosts=("127.0.0.1",), port=0)

    def config(settings: dict[str, Any]) -> ServerConfig:
        return replace(replace(base, **settings), **config_overrides)

    streams_checks = [
        ("streams", lambda client: _check_streams(client, seed)),
        ("1 MiB both ways", lambda client: _check_mebibyte(client, seed)),
        ("half-close", lambda client: _check_half_close(client, seed)),
        *([("max-connections", _check_max_connections)] if concurrent else []),
        ("reset", _check_reset),
        ("drain", lambda client: _check_drain_and_stop(client, concurrent, by_signal)),
    ]
    _serve_and_drive(label, start, config(STREAMS_AND_STOP), streams_checks)
    idle_checks = [("idle timeout", _check_idle_timeout), ("stop", _stop_by_request)]
    _serve_and_drive(label, start, config(IDLE_LIMIT), idle_checks)
    send_checks = [("send timeout", _check_send_timeout), ("stop", _stop_by_request)]
    _serve_and_drive(label, start, config(SEND_LIMIT), send_checks)


def _runner(model: Model) -> _Start:
    def start(config: ServerConfig, events: _Events, shutdown: Shutdown) -> None:
        run(config, events, shutdown, model=model)

    return start


class _Events(QuietEvents):
    """The server's events as the kit sees them, from any thread or forked process.

    Each event is one short line written to a pipe (atomic, lock-free); a reader thread
    in the kit's process files them under the client's port and wakes whoever waits.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        self._changed = threading.Condition()
        self.port: int | None = None
        self.stopping_seen = False
        self.returned = False  # the server's start function returned (or raised)
        self.outcomes: dict[int, list[str]] = {}  # client port -> outcomes reported
        self.rejected: dict[int, str] = {}  # client port -> reason
        self._reader = threading.Thread(target=self._read, name="echoplex-kit-events")
        self._reader.start()

    # The server's side: any thread, any forked process.

    def listening(self, addresses: list[Any]) -> None:
        ports = [a[1] for a in addresses if isinstance(a, tuple) and a[0] == "127.0.0.1"]
        self._post("listening", ports[0] if ports else 0)

    def connection_closed(self, record: ConnectionRecord) -> None:
        self._post("closed", _port(record.peer), str(record.outcome))

    def connection_rejected(self, peer: Any, reason: str) -> None:
        self._post("rejected", _port(peer), str(reason))

    def stopping(self) -> None:
        self._post("stopping", 0)

    def _post(self, kind: str, port: int, detail: str = "-") -> None:
        with contextlib.suppress(OSError):  # the kit has finished: nobody listens
            os.write(self._write_fd, f"{kind} {port} {detail}\n".encode())

    # The kit's side.

    def _read(self) -> None:
        with open(self._read_fd, "rb") as pipe:
            for line in pipe:
                kind, port_text, detail = line.decode().split(" ", 2)
                port, detail = int(port_text), detail.rstrip("\n")
                if kind == "end":
                    return
                with self._changed:
                    if kind == "listening":
                        self.port = port
                    elif kind == "closed":
                        self.outcomes.setdefault(port, []).append(detail)
                    elif kind == "rejected":
                        self.rejected[port] = detail
                    elif kind == "stopping":
                        self.stopping_seen = True
                    elif kind == "returned":
                        self.returned = True
                    self._changed.notify_all()

    def server_returned(self) -> None:
        # Through the pipe, behind every event the server posted before it returned.
        self._post("returned", 0)

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Wait until `condition()` holds; AssertionError if the time passes first or the
        server returns without it."""
        with self._changed:
            if self._changed.wait_for(lambda: condition() or self.returned, timeout_s):
                if condition():
                    return
                raise AssertionError(f"the server returned before {what}")
        raise AssertionError(f"no {what} within {timeout_s:g} s")

    def outcome_of(self, port: int, what: str = "connection") -> str:
        """The one outcome reported for the connection of the client on this port."""
        self.wait(lambda: port in self.outcomes, f"report of the {what}'s close", REPORT_TIMEOUT_S)
        with self._changed:
            outcomes = self.outcomes[port]
            assert len(outcomes) == 1, f"the {what} was reported closed {len(outcomes)} times"
            return outcomes[0]

    def close(self) -> None:
        self._post("end", 0)
        self._reader.join(REPORT_TIMEOUT_S)
        os.close(self._write_fd)


def _port(peer: Any) -> int:
    return peer[1] if isinstance(peer, tuple) else 0


_Check = Callable[["_Client"], None]


@dataclass
class _Client:
    """What a check gets: the server's address and events, and sockets closed for it."""

    address: tuple[str, int]
    config: ServerConfig
    events: _Events
    shutdown: Shutdown
    sockets: list[socket.socket] = field(default_factory=list)
    ports: dict[socket.socket, int] = field(default_factory=dict)  # kept past the close

    def connect(self, receive_buffer_bytes: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(sock)
        if receive_buffer_bytes is not None:  # before connect: it sets the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.settimeout(IO_TIMEOUT_S)
        sock.connect(self.address)
        self.ports[sock] = sock.getsockname()[1]
        return sock

    def echo(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        _expect_echo(data, recv_exactly(sock, len(data)))

    def expect_outcome(self, sock: socket.socket, expected: str, what: str) -> None:
        outcome = self.events.outcome_of(self.ports[sock], what)
        assert outcome == expected, f"the {what} ended with outcome {outcome!r}, not {expected!r}"

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self.ports.clear()


def _serve_and_drive(
    label: str, start: _Start, config: ServerConfig, checks: Sequence[tuple[str, _Check]]
) -> None:
    """Serve in this thread; run `checks` in order from a client thread; the last check
    stops the server. The first failure stops it at once (a forced stop) and is raised."""
    events = _Events()
    shutdown = Shutdown()
    failures: list[BaseException] = []

    def drive() -> None:
        name = "start"
        try:
            events.wait(lambda: events.port is not None, "listening", STARTUP_TIMEOUT_S)
            assert events.port, "the server listens on no 127.0.0.1 address"
            client = _Client(("127.0.0.1", events.port), config, events, shutdown)
            for check_name, check in checks:
                name = check_name
                try:
                    check(client)
                finally:
                    client.close_all()
        except BaseException as exc:
            if isinstance(exc, AssertionError | OSError):  # the contract, broken
                failures.append(AssertionError(f"{label}: {name}: {exc or type(exc).__name__}"))
                failures[-1].__cause__ = exc
            else:
                failures.append(exc)  # the kit's own bug: as it is
            shutdown.request()
            shutdown.request()  # a second request: stop now, no drain

    driver = threading.Thread(target=drive, name="echoplex-kit-client")
    driver.start()
    try:
        start(config, events, shutdown)
    finally:
        events.server_returned()
        driver.join(STARTUP_TIMEOUT_S + REPORT_TIMEOUT_S)
        events.close()
        shutdown.close()
    if driver.is_alive():
        raise AssertionError(f"{label}: the kit's client thread did not finish")
    if failures:
        raise failures[0]
    if not shutdown.requested:
        raise AssertionError(f"{label}: the server returned before it was asked to stop")


# The checks, in the order they run.


def _check_streams(client: _Client, seed: int) -> None:
    """CLIENTS at once, each sending random chunks while reading, then half-closing:
    one thread and a selector, so every client is sending and receiving together."""
    rng = random.Random(seed)
    payloads = [b""] + [rng.randbytes(rng.randint(1, 48_000)) for _ in range(CLIENTS - 1)]
    socks = [client.connect() for _ in payloads]
    offsets = [0] * len(payloads)
    received = [bytearray() for _ in payloads]
    deadline = time.monotonic() + REPORT_TIMEOUT_S * 3
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, index)
        while selector.get_map():
            assert time.monotonic() < deadline, (
                f"{len(selector.get_map())} of {len(socks)} clients not echoed in time"
            )
            for key, mask in selector.select(timeout=1.0):
                index, sock = key.data, socks[key.data]
                if mask & selectors.EVENT_WRITE:
                    offset = offsets[index]
                    chunk = payloads[index][offset : offset + rng.choice(CHUNK_SIZES)]
                    with contextlib.suppress(BlockingIOError):
                        offsets[index] += sock.send(chunk) if chunk else 0
                    if offsets[index] == len(payloads[index]):
                        sock.shutdown(socket.SHUT_WR)
                        selector.modify(sock, selectors.EVENT_READ, index)
                if mask & selectors.EVENT_READ:
                    with contextlib.suppress(BlockingIOError):
                        data = sock.recv(65536)
                        received[index] += data
                        if not data:
                            selector.unregister(sock)
                            assert len(received[index]) >= offsets[index], (
                                f"client {index} got EOF after {len(received[index])} of "
                                f"{offsets[index]} bytes sent"
                            )
    for index, (sent, got) in enumerate(zip(payloads, received, strict=True)):
        _expect_echo(sent, bytes(got), f"client {index} (seed {seed})")
    for sock in socks:
        client.expect_outcome(sock, "closed", "finished client")


CHUNK_SIZES = (1, 2, 7, 100, 1000, 1460, 4096, 20_000, 65_536)


def _check_mebibyte(client: _Client, seed: int) -> None:
    data = random.Random(seed + 1).randbytes(1 << 20)
    sock = client.connect()
    with _in_thread(lambda: sock.sendall(data), "sending 1 MiB"):
        _expect_echo(data, recv_exactly(sock, len(data)))
    sock.close()
    client.expect_outcome(sock, "closed", "1 MiB client")


def _check_half_close(client: _Client, seed: int) -> None:
    data = random.Random(seed + 2).randbytes(300_000)
    sock = client.connect()

    def send_then_half_close() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    with _in_thread(send_then_half_close, "sending, then shutting down the write side"):
        _expect_echo(data, recv_until_eof(sock))
    client.expect_outcome(sock, "closed", "half-closed client")


def _check_max_connections(client: _Client) -> None:
    holders = [client.connect() for _ in range(CLIENTS)]
    for index, holder in enumerate(holders):
        client.echo(holder, b"%d" % index)
    extra = client.connect()
    extra.sendall(b"x")
    with contextlib.suppress(ConnectionResetError):  # a close with our byte unread
        answer = extra.recv(1)
        assert not answer, f"client {CLIENTS + 1} was served, over max_connections={CLIENTS}"
    port = extra.getsockname()[1]
    events = client.events
    events.wait(lambda: port in events.rejected, "report of the rejection", REPORT_TIMEOUT_S)
    reason = events.rejected[port]
    assert reason == "max-connections", f"rejected as {reason!r}, not 'max-connections'"
    holders[0].close()  # a slot frees once its close is reported (released, then reported)
    client.expect_outcome(holders[0], "closed", "holder")
    newcomer = client.connect()
    client.echo(newcomer, b"admitted again")
    for sock in [*holders[1:], newcomer]:  # every slot free again for the next check
        sock.close()
        client.expect_outcome(sock, "closed", "holder")


def _check_reset(client: _Client) -> None:
    survivor = client.connect()
    client.echo(survivor, b"before")
    victims = []
    for _ in range(3):
        victim = client.connect()
        victims.append(victim)
        victim.setblocking(False)  # one-at-a-time servers have not accepted it yet
        with contextlib.suppress(BlockingIOError):
            victim.send(b"x" * 100_000)  # echo left unread, then a reset
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        victim.close()
    client.echo(survivor, b"after")
    survivor.close()
    client.expect_outcome(survivor, "closed", "client open through the resets")
    newcomer = client.connect()
    client.echo(newcomer, b"newcomer")
    newcomer.close()
    client.expect_outcome(newcomer, "closed", "client after the resets")
    for victim in victims:
        client.expect_outcome(victim, "reset", "client that reset")


def _check_drain_and_stop(client: _Client, concurrent: bool, by_signal: bool) -> None:
    idler = client.connect()
    client.echo(idler, b"one")
    finisher = client.connect() if concurrent else None
    if finisher is not None:
        client.echo(finisher, b"one")
    if by_signal:
        # What `kill -TERM` does when the kernel picks a thread that is not the main one.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), (
            "no SIGTERM handler installed: the signal would end the process"
        )
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    else:
        client.shutdown.request()
    how = "SIGTERM" if by_signal else "Shutdown.request()"
    drain_s = client.config.drain_timeout_s
    events = client.events
    events.wait(lambda: events.stopping_seen, f"stopping after {how}", REPORT_TIMEOUT_S)
    # Both must be done within the drain timeout: a machine too busy for that (it would
    # say `drained` below) needs a longer `drain_timeout_s` passed to `check_model`.
    client.echo(idler, b"echoed while draining")
    if finisher is not None:
        client.echo(finisher, b"two")
        finisher.shutdown(socket.SHUT_WR)
        assert not recv_until_eof(finisher), "bytes after the echo"
        client.expect_outcome(finisher, "closed", "client finishing during the drain")
    idler.settimeout(drain_s + IO_TIMEOUT_S)
    _recv_until_closed(idler)
    client.expect_outcome(idler, "drained", "client idle past the drain timeout")
    events.wait(lambda: events.returned, f"the server's return after {how}", REPORT_TIMEOUT_S)


def _check_idle_timeout(client: _Client) -> None:
    sock = client.connect()
    sock.settimeout(client.config.idle_timeout_s + IO_TIMEOUT_S)
    assert not recv_until_eof(sock), "bytes from a silent client's connection"
    client.expect_outcome(sock, "idle-timeout", "silent client")


def _check_send_timeout(client: _Client) -> None:
    """Send without reading until the server gives up on us: the bytes in flight are
    bounded by the socket buffers, since the server stops reading a client that does
    not take its echo."""
    sock = client.connect(receive_buffer_bytes=4096)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    chunk = b"n" * 65_536
    deadline = time.monotonic() + client.config.send_timeout_s + REPORT_TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while port not in client.events.outcomes:
            assert time.monotonic() < deadline, "a client that never reads was not cut off"
            if selector.select(timeout=0.05):
                try:
                    sock.send(chunk)
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    break  # cut off: the report follows
    client.expect_outcome(sock, "send-timeout", "client that never reads")
    sock.settimeout(IO_TIMEOUT_S)
    _recv_until_closed(sock)


def _stop_by_request(client: _Client) -> None:
    client.shutdown.request()
    events = client.events
    events.wait(lambda: events.returned, "the server's return after a stop", REPORT_TIMEOUT_S)


# Helpers.


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from `sock`, or fewer if the peer closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def recv_until_eof(sock: socket.socket) -> bytes:
    """Everything `sock` receives until the peer closes."""
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    return bytes(data)


def _recv_until_closed(sock: socket.socket) -> None:
    """Read whatever is left until the server's close shows: EOF, or a reset if it
    closed with bytes of ours unread."""
    with contextlib.suppress(ConnectionResetError):
        recv_until_eof(sock)


def _expect_echo(sent: bytes, got: bytes, who: str = "the client") -> None:
    if got == sent:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(sent, got, strict=False)) if a != b),
        min(len(sent), len(got)),
    )
    raise AssertionError(
        f"{who} sent {len(sent)} bytes and got {len(got)} back, different from byte {at} "
        f"(sent {sent[at : at + 8]!r}, got {got[at : at + 8]!r})"
    )


@contextlib.contextmanager
def _in_thread(work: Callable[[], None], what: str) -> Iterator[None]:
    """Run `work` in a thread while the block runs (the other direction); re-raise its error."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="echoplex-kit-sender")
    thread.start()
    try:
        yield
    finally:
        thread.join(IO_TIMEOUT_S * 2)
    assert not thread.is_alive(), f"{what} did not finish"
    if errors:
        raise AssertionError(f"{what} failed: {errors[0]!r}")
