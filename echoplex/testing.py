"""A conformance kit: the echo contract as code that any concurrency model can be run against.

    from echoplex.testing import check_model
    check_model("pool")                    # a name in echoplex.models.MODELS
    check_model(my_module, threads=4)      # anything with serve(plan, events, shutdown),
                                           # with ServerConfig fields overridden
    check_model("pool", checks=["max-lifetime", "drain"])   # only these (`CHECKS`)

`check_model` starts the server in the calling thread, drives it from a client thread
over real sockets on 127.0.0.1 (port 0, read back from `events.listening`), and returns
normally or raises `AssertionError` naming the check that failed and why
(`"pool: max-lifetime: ..."`). Like trio's `testing/_check_streams.py`, it is public so
that a model someone adds (or writes elsewhere) can prove it keeps the contract every
model here keeps; `tests/test_conformance.py` runs it against every registered model.
The whole kit takes a few seconds per model: every limit it configures is short
(`SHORT_LIMIT_S`) and every wait it makes has a deadline (`timeout_s`, 10 s unless
given) and waits for a condition (an event, a byte, an EOF), never a fixed sleep.
`echo_concurrently`, `recv_exactly` and `recv_until_eof` are the kit's client side,
public for tests that drive a server of their own.

The server runs thirteen times, once per group of settings that can share a server; a run
is skipped when none of its checks is selected (`checks=`, names from `CHECKS`).

1. `drain_timeout_s=1`, `max_connections=20`:
   - `streams`: 20 concurrent clients send seeded random binary (`seed`) in random chunk
     sizes while reading, then half-close: each gets exactly its bytes back, then EOF;
   - `1-mib`: 1 MiB sent and read at once on one connection;
   - `half-close`: a client that shuts down its write side gets every byte back, then EOF;
   - `max-connections`: with 20 clients held open a 21st is closed at once (and reported
     rejected as `max-connections`); once a holder's close is reported, a newcomer is
     served (a model gives a slot back before it reports the close);
   - `reset`: clients that reset (SO_LINGER 0) with echo unread end only their own
     connections (outcome `reset`): a client open throughout, and one that comes after,
     are still served;
   - `drain`: with clients open, SIGTERM is sent with `signal.pthread_kill` to the kit's
     own client thread (not the main thread); the server reports `stopping`, a
     connection in flight still echoes and finishes (`closed`), one left idle is cut off
     when the drain timeout passes (`drained`), and the server returns. A stop signal
     may land on any thread, and the server must still wake, so `echoplex.server.run`
     routes SIGTERM into the `Shutdown` with `signal.set_wakeup_fd` (a model of your own
     runs through `run` too, so it gets the same routing). Called from a thread other
     than the main one, where Python cannot install signal handlers, the kit stops the
     server with `Shutdown.request()` instead and logs so.
2. `idle_timeout_s=0.3`: `idle-timeout`: a silent client is closed (EOF) with outcome
   `idle-timeout`.
3. `send_timeout_s=0.3` (no idle timeout), `max_connections=3`, `drain_timeout_s=60`:
   - `send-timeout`: a client that sends without ever reading is cut off with outcome
     `send-timeout`;
   - `handler-error`: the kit's events raise from `connection_opened` for the client
     from `DOOMED_HOST` (a bug in the handler path of every model). With 2 clients held
     open, that connection is closed and reported `error:handler`; its slot is given
     back (a third client is served within `max_connections=3`); the held clients still
     echo; and once they have closed, a stop is prompt: the server returns within
     `timeout_s`, not after the 60 s drain that a connection left open would cost.
4. TLS (a certificate made by `trustme`), `tls_handshake_timeout_s=0.3`:
   - `tls-echo`: random chunks echoed through TLS, then a close (`closed`);
   - `tls-handshake-timeout`: a client that connects and sends nothing is cut off at
     the handshake deadline (`tls-handshake-timeout`);
   - `tls-handshake-failed`: garbage instead of a ClientHello ends the connection with
     `tls-handshake-failed:WHY`, WHY saying why (`NOT_TLS`, or OpenSSL's reason; not
     `closed`: the client is still there);
   - `tls-plaintext`: a plaintext message shorter than a TLS record header (`hi`) ends
     the handshake at once as `tls-handshake-failed:NOT_TLS`, not at its deadline, so a
     plain client is told at once.
5. PROXY protocol from `127.0.0.1/32` (`proxy_protocol`, `trusted_proxies`),
   `proxy_header_timeout_s=0.3`, `max_per_ip=1`, `max_buffer_bytes=16 KiB`. The kit's
   clients from 127.0.0.1 are the trusted proxy; clients it binds to other loopback
   addresses (127.0.0.2 and up: Linux's loopback answers all of 127.0.0.0/8) are not:
   - `proxy-v1`, `proxy-v2`: a header (built by `echoplex.proxy_protocol.encode_v1`
     and `encode_v2`) naming a client, then an echo: the close is reported with `peer`
     the named client and `via` the proxy;
   - `proxy-limits`: `max_per_ip` counts the named client, not the proxy: two headers
     naming one address, the second is rejected (`connection_rejected` for the named
     client, outcome `rejected:max-per-ip`), while a header naming another is served;
   - `proxy-header-timeout`: a trusted peer that sends nothing is cut off
     (`proxy-header-timeout`);
   - `proxy-untrusted`: an untrusted peer's v1 and v2 headers are echoed back as data;
   - `max-per-ip`: a second connection from one address is rejected (`max-per-ip`)
     while another address is served;
   - `max-buffer`: a client with a small SO_RCVBUF that sends and never reads is soon
     unable to send: the server stopped reading it. What it could send is bounded by
     `max_buffer_bytes` plus the socket buffers on the way (its own, as set and read
     back, and the server's, at most the kernel's `tcp_rmem` and `tcp_wmem` maxima,
     which on Linux autotune to several MiB and so dominate the bound) plus one read;
     a server that buffers without bound passes that bound within a fraction of a
     second. Once the client reads, every byte comes back in order and it still echoes.
6. `max_lifetime_s=0.3`: `max-lifetime`: a busy client (echoing without pause) is cut
   off with outcome `max-lifetime`.
7. Conditions on purpose (`echoplex.conditions`), a run per group that can share a
   server. A figure of time is only ever checked from below (an echo no sooner than
   the latency): a busy machine makes a server late, never early.
   - `latency` (`latency_s=1`, `threads=2`): a delay line, not a stall. Four clients
     (one for a one-at-a-time model) each send three messages, every one read by the
     server (its socket's receive queue in /proc/net/tcp is empty) before the next is
     sent; while the latency has not passed, no echo has come back, so the server read
     them all, on every connection, while holding the first (a pool of 2 threads too);
     then each comes back whole, in order, no sooner than the latency after it was sent;
   - `pacing` (`bandwidth_bytes_per_s=10000`, `slice_bytes=500`, `slice_delay_s=0.05`,
     `work=io:0.3s`): 3000 bytes come back whole and in order, no sooner than the rate,
     the slices' delays and the work allow;
   - `close-after` (`close_after_bytes=1000`): of 3000 bytes sent, exactly the first 1000
     come back, then a clean EOF (never a reset), outcome `close-after`;
   - `reset-after` (`reset_after_bytes=1000`): at most the first 1000 come back, then a
     reset, outcome `reset-after`;
   - `stall` (`stall_after_bytes=100`, `idle_timeout_s=0.3`): exactly 100 bytes come back,
     then nothing, until the idle limit ends the connection (`idle-timeout`): limits win;
   - `stall-at-stop` (`stall_after_bytes=0`, `drain_timeout_s=3600`): a stop cuts a
     stalled connection off as `drained` at once; the server returns without waiting
     for the drain deadline;
   - `stall-for`, `slow-close` (`stall_after_bytes=100`, `stall_for_s=0.3`,
     `slow_close_s=0.3`): a stall that ends lets every byte through; after a half-close
     and the whole echo, the server's EOF comes no sooner than the slow close;
   - `toxicity` (`toxicity=0.5`, `condition_seed=1`, `close_after_bytes=0`): of 20
     clients, some are closed at once unechoed (`close-after`) and some echoed
     (`closed`), each reported as it was treated.

One time limit per run, so that a stall of a busy machine cannot end a connection by
another limit. Every connection the kit makes must be reported closed once with the
outcome named above (compared as strings, so an enum of outcomes whose values are
these works too). The kit's events object (a `QuietEvents`) writes each event as one
line to a pipe that a thread of the kit reads: a write of a few bytes to a pipe is
atomic, takes no lock, and works from any thread and from processes forked from the
caller. So `workers`, whose connections are served in forked worker processes that
hold a copy of the events object, is checked exactly like the in-process models: its
workers' outcomes and rejections reach the kit through the inherited pipe. (A server
that runs its connections in processes that are not forked from the caller, and so
cannot report to that pipe, fails the kit's first wait for an outcome.) For `workers`
the kit configures `workers=2`.

The TLS checks need `trustme` (a dev dependency of echoplex) for their certificate. If
it cannot be imported and a TLS check is selected, `check_model` raises one
`RuntimeError` saying to install it, before it starts anything: a missing tool must not
pass for a model that keeps the contract, nor be skipped in silence.

`simple` serves one client at a time by design: its clients wait in the listen backlog,
so no limit on open connections can turn one away. For it (and for any model passed
with `concurrent=False`) the checks in `CONCURRENT_ONLY` are skipped, the drain check
uses one connection, which echoes during the drain and is then cut off, and the
handler check runs with `max_connections=1` and no clients held.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import selectors
import signal
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .conditions import Work
from .config import ServerConfig
from .events import ConnectionRecord, QuietEvents
from .plan import Model, load_model
from .proxy_protocol import encode_v1, encode_v2
from .server import run
from .shutdown import Shutdown

__all__ = [
    "CHECKS",
    "CONCURRENT_ONLY",
    "check_model",
    "echo_concurrently",
    "peer_tcp_line",
    "recv_exactly",
    "recv_until_eof",
    "unread_by_peer",
]

log = logging.getLogger("echoplex.testing")

_Start = Callable[[ServerConfig, "_Events", Shutdown], None]
Key = tuple[str, int]
"""A client as the server's events name it: (host, port)."""

ONE_AT_A_TIME = frozenset({"simple"})
"""Models that serve one client at a time (see the module docstring)."""

CLIENTS = 20  # concurrent clients of the streams check, and the max-connections limit
TIMEOUT_S = 10.0  # default `timeout_s`: any one thing the server owes the kit
STARTUP_TIMEOUT_S = 30.0  # `workers` forks; a busy machine is slow to start them
DRAIN_TIMEOUT_S = 1.0
LONG_DRAIN_S = 60.0  # the handler check's run: a stop that waits for it is not prompt
SHORT_LIMIT_S = 0.3  # every time limit the kit sets, each in a run of its own
STALLED_DRAIN_TIMEOUT_S = 3600.0  # a stop must not wait this out for a stalled connection
HANDLER_SLOTS = 3  # max_connections of the handler check: 2 held, 1 doomed, then 1 more
BUFFER_BYTES = 16_384  # max_buffer_bytes of the backpressure check
CLIENT_RECEIVE_BUFFER = 4096  # SO_RCVBUF of the clients that never read
QUIET_S = 0.25  # a client unable to send this long: the server has stopped reading it
READ_ALLOWANCE = 1 << 20  # one read in flight in the server (uvloop reads 256 KiB)
KERNEL_FALLBACK_BYTES = 64 << 20  # the server's socket buffers where /proc cannot say

TRUSTED_PROXY = "127.0.0.1"  # the kit's plain clients: in the PROXY run, the proxy
DOOMED_HOST = "127.0.0.66"  # the kit's events raise from connection_opened for it
NAMED_V1, NAMED_V2 = "192.0.2.1", "198.51.100.2"  # clients the PROXY headers name
NAMED_SHARED, NAMED_OTHER = "203.0.113.3", "203.0.113.4"  # the proxy-limits check's
UNTRUSTED, PER_IP, PER_IP_OTHER, NEVER_READS = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"

LATENCY_S = 1.0  # the latency check's: long enough to see every message read meanwhile
STALL_AT = 100  # bytes of echo before the stall checks' stall
END_AT = 1000  # bytes of echo before the close-after and reset-after checks' end
PACED_RATE, PACED_SLICE, SLICE_DELAY_S = 10_000, 500, 0.05  # the pacing check's
PACED_WORK = Work("io", SHORT_LIMIT_S)

CONCURRENT_ONLY = frozenset({"max-connections", "proxy-limits", "max-per-ip"})
"""Checks that need two clients served at once: skipped for one-at-a-time models."""


def check_model(
    model: str | Model,
    *,
    concurrent: bool | None = None,
    seed: int = 0,
    checks: Collection[str] | None = None,
    timeout_s: float = TIMEOUT_S,
    **config_overrides: Any,
) -> None:
    """Run the echo contract against `model` in this process; raise AssertionError if it
    is broken.

    `model`: a name in `echoplex.models.MODELS`, or an object with `serve(plan, events,
    shutdown)` (`echoplex.plan.Model`); either runs through `echoplex.server.run`.
    `concurrent`: whether it serves clients at once (default: all but `simple`).
    `seed`: of the random payloads.
    `checks`: names from `CHECKS` to run (default: all); a ValueError for another name.
    `timeout_s`: the longest the kit waits for any one thing the server owes it (an
    echo, a close, a report) past the limit that causes it.
    `config_overrides`: `ServerConfig` fields, applied over the kit's own settings (a
    machine too busy to finish a client within the drain may pass `drain_timeout_s=5`).
    """
    if isinstance(model, str):
        label, chosen = model, load_model(model)  # an unknown name: a ValueError now
        concurrent = model not in ONE_AT_A_TIME if concurrent is None else concurrent
    else:
        label, chosen = getattr(model, "__name__", type(model).__name__), model
        concurrent = True if concurrent is None else concurrent
    selected = _selected(checks, concurrent)
    by_signal = threading.current_thread() is threading.main_thread()
    if not by_signal:
        log.info("not in the main thread: stopping %s with Shutdown.request(), not SIGTERM", label)
    settings = _Settings(seed, concurrent, by_signal, timeout_s)
    base = ServerConfig(hosts=("127.0.0.1",), port=0, workers=2)
    with contextlib.ExitStack() as stack:
        for run_ in _runs(concurrent):
            chosen_checks = [(name, check) for name, check in run_.checks if name in selected]
            if not chosen_checks:
                continue
            tls: dict[str, Any] = {}
            if run_.tls:
                tls = stack.enter_context(_certificate())
            config = replace(
                replace(base, **run_.settings, **tls.get("files", {})), **config_overrides
            )
            driven = _Driven(label, _runner(chosen), config, settings, tls.get("client"))
            _serve_and_drive(driven, chosen_checks)


def _runner(model: Model) -> _Start:
    def start(config: ServerConfig, events: _Events, shutdown: Shutdown) -> None:
        run(config, events, shutdown, model=model)

    return start


def _selected(checks: Collection[str] | None, concurrent: bool) -> set[str]:
    """The names of the checks to run; a ValueError for a name the kit does not know,
    a RuntimeError for a TLS check without trustme."""
    if isinstance(checks, str):
        raise ValueError("`checks` is a collection of names, not one name")
    selected = set(CHECKS if checks is None else checks)
    unknown = selected - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)} (choose from {', '.join(CHECKS)})")
    if selected & TLS_CHECKS:
        try:
            import trustme  # noqa: F401  (a dev dependency: only its presence is checked here)
        except ImportError:
            raise RuntimeError(
                "the conformance kit's TLS checks need trustme for their certificate: "
                "pip install trustme (or leave them out with checks=)"
            ) from None
    return selected if concurrent else selected - CONCURRENT_ONLY


@contextlib.contextmanager
def _certificate() -> Iterator[dict[str, Any]]:
    """A certificate for 127.0.0.1 from a new trustme CA: the server's files, and a
    client context that trusts that CA."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with tempfile.TemporaryDirectory(prefix="echoplex-kit-") as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        issued.cert_chain_pems[0].write_to_path(str(cert_file))
        issued.private_key_pem.write_to_path(str(key_file))
        files = {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
        yield {"files": files, "client": client}


class _Events(QuietEvents):
    """The server's events as the kit sees them, from any thread or forked process.

    Each event is one short line written to a pipe (atomic, lock-free); a reader thread
    in the kit's process files them under the client's address and wakes whoever waits.
    `connection_opened` raises for a client from `DOOMED_HOST`: the handler check's bug.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._read_fd, self._write_fd = os.pipe()
        self._changed = threading.Condition()
        self.port: int | None = None
        self.stopping_seen = False
        self.returned = False  # the server's start function returned (or raised)
        self.opened: set[Key] = set()  # clients whose connection the server opened
        self.outcomes: dict[Key, list[str]] = {}  # client -> outcomes reported
        self.vias: dict[Key, str] = {}  # client -> the proxy it came through, or "-"
        self.rejected: dict[Key, str] = {}  # client -> reason
        self._reader = threading.Thread(target=self._read, name="echoplex-kit-events")
        self._reader.start()

    # The server's side: any thread, any forked process.

    def listening(self, addresses: list[Any]) -> None:
        ports = [a[1] for a in addresses if isinstance(a, tuple) and a[0] == "127.0.0.1"]
        self._post("listening", ("127.0.0.1", ports[0] if ports else 0))

    def connection_opened(self, record: ConnectionRecord) -> None:
        self._post("opened", record.peer)
        if isinstance(record.peer, tuple) and record.peer[0] == DOOMED_HOST:
            raise RuntimeError("the conformance kit's deliberate bug in connection_opened")

    def connection_closed(self, record: ConnectionRecord) -> None:
        self._post("closed", record.peer, str(record.outcome_label), record.via)

    def connection_rejected(self, peer: Any, reason: str) -> None:
        self._post("rejected", peer, str(reason))

    def stopping(self) -> None:
        self._post("stopping")

    def _post(self, kind: str, peer: Any = None, detail: str = "-", via: Any = None) -> None:
        line = f"{kind} {_name(peer)} {_name(via)} {detail}\n"
        with contextlib.suppress(OSError):  # the kit has finished: nobody listens
            os.write(self._write_fd, line.encode())

    # The kit's side.

    def _read(self) -> None:
        with open(self._read_fd, "rb") as pipe:
            for line in pipe:
                kind, peer, via, detail = line.decode().rstrip("\n").split(" ", 3)
                if kind == "end":
                    return
                with self._changed:
                    self._file(kind, _key(peer), via, detail)
                    self._changed.notify_all()

    def _file(self, kind: str, key: Key, via: str, detail: str) -> None:
        if kind == "listening":
            self.port = key[1]
        elif kind == "opened":
            self.opened.add(key)
        elif kind == "closed":
            self.outcomes.setdefault(key, []).append(detail)
            self.vias[key] = via
        elif kind == "rejected":
            self.rejected[key] = detail
        elif kind == "stopping":
            self.stopping_seen = True
        elif kind == "returned":
            self.returned = True

    def server_returned(self) -> None:
        # Through the pipe, behind every event the server posted before it returned.
        self._post("returned")

    def wait(
        self, condition: Callable[[], bool], what: str, timeout_s: float | None = None
    ) -> None:
        """Wait until `condition()` holds; AssertionError if the time passes first or the
        server returns without it."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._changed:
            if self._changed.wait_for(lambda: condition() or self.returned, timeout_s):
                if condition():
                    return
                raise AssertionError(f"the server returned before {what}")
        raise AssertionError(f"no {what} within {timeout_s:g} s")

    def outcome_of(self, key: Key, what: str = "connection") -> str:
        """The one outcome reported for the connection of this client."""
        self.wait(lambda: key in self.outcomes, f"report of the {what}'s close")
        with self._changed:
            outcomes = self.outcomes[key]
            assert len(outcomes) == 1, f"the {what} was reported closed {len(outcomes)} times"
            return outcomes[0]

    def close(self) -> None:
        self._post("end")
        self._reader.join(self.timeout_s)
        # A server thread that reports late must not write into a descriptor number the
        # next user of this process has been given: from now on it writes to none.
        write_fd, self._write_fd = self._write_fd, -1
        os.close(write_fd)


def _name(peer: Any) -> str:
    """A peer in one word for the pipe: `host:port`, or `-`."""
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"


def _key(name: str) -> Key:
    host, _, port = name.rpartition(":")
    return (host, int(port)) if host else ("-", 0)


_Check = Callable[["_Client"], None]


@dataclass(frozen=True)
class _Settings:
    """What every check of one `check_model` call knows besides the server."""

    seed: int
    concurrent: bool
    by_signal: bool
    timeout_s: float


@dataclass(frozen=True)
class _Driven:
    """One server run: what to start, and how."""

    label: str
    start: _Start
    config: ServerConfig
    settings: _Settings
    tls: ssl.SSLContext | None


@dataclass
class _Client:
    """What a check gets: the server's address and events, and sockets closed for it."""

    address: tuple[str, int]
    config: ServerConfig
    settings: _Settings
    events: _Events
    shutdown: Shutdown
    tls: ssl.SSLContext | None
    sockets: list[socket.socket] = field(default_factory=list)
    keys: dict[socket.socket, Key] = field(default_factory=dict)  # kept past the close

    @property
    def timeout_s(self) -> float:
        return self.settings.timeout_s

    def connect(
        self, source: str = TRUSTED_PROXY, receive_buffer_bytes: int | None = None
    ) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(sock)
        if receive_buffer_bytes is not None:  # before connect: it sets the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.bind((source, 0))
        sock.settimeout(self.timeout_s)
        sock.connect(self.address)
        self.keys[sock] = sock.getsockname()
        return sock

    def connect_tls(self) -> ssl.SSLSocket:
        assert self.tls is not None, "a TLS check in a run without TLS"
        sock = self.connect()
        wrapped = self.tls.wrap_socket(sock, server_hostname="127.0.0.1")  # the handshake
        self.sockets.append(wrapped)
        self.keys[wrapped] = self.keys[sock]
        return wrapped

    def echo(self, sock: socket.socket, data: bytes, who: str = "the client") -> None:
        sock.sendall(data)
        got = bytearray()
        with contextlib.suppress(TimeoutError):  # what came back in time is compared below
            while len(got) < len(data) and (chunk := sock.recv(len(data) - len(got))):
                got += chunk
        _expect_echo(data, bytes(got), who)

    def expect_outcome(self, sock: socket.socket | Key, expected: str, what: str) -> None:
        key = sock if isinstance(sock, tuple) else self.keys[sock]
        outcome = self.events.outcome_of(key, what)
        assert outcome == expected, f"the {what} ended with outcome {outcome!r}, not {expected!r}"

    def expect_cut_off(self, sock: socket.socket, limit_s: float, outcome: str, what: str) -> None:
        """`sock`, which sends nothing more, is closed by the server once `limit_s` has
        passed, and reported as `outcome`."""
        sock.settimeout(limit_s + self.timeout_s)
        try:
            _recv_until_closed(sock)
        except TimeoutError:
            raise AssertionError(
                f"the {what} was not cut off within {limit_s:g} s + {self.timeout_s:g} s"
            ) from None
        self.expect_outcome(sock, outcome, what)

    def expect_rejected(self, sock: socket.socket, key: Key, reason: str, what: str) -> None:
        """`sock` (the connection of the client `key`) is closed at once, unserved, and
        the client reported rejected for `reason`."""
        sock.sendall(b"x")
        with contextlib.suppress(ConnectionResetError):  # a close with our byte unread
            assert not sock.recv(1), f"the {what} was served, over the limit"
        events = self.events
        events.wait(lambda: key in events.rejected, f"report of the {what}'s rejection")
        got = events.rejected[key]
        assert got == reason, f"the {what} was rejected as {got!r}, not {reason!r}"

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self.keys.clear()


def _serve_and_drive(driven: _Driven, checks: Sequence[tuple[str, _Check]]) -> None:
    """Serve in this thread; run `checks` in order from a client thread, then stop the
    server unless a check did. The first failure stops it at once (a forced stop) and
    is raised."""
    events = _Events(driven.settings.timeout_s)
    shutdown = Shutdown()
    failures: list[BaseException] = []
    name = "start"  # the check running

    def drive() -> None:
        nonlocal name
        try:
            events.wait(lambda: events.port is not None, "listening", STARTUP_TIMEOUT_S)
            assert events.port, "the server listens on no 127.0.0.1 address"
            address = ("127.0.0.1", events.port)
            client = _Client(address, driven.config, driven.settings, events, shutdown, driven.tls)
            for check_name, check in [*checks, ("stop", _stop_unless_stopped)]:
                name = check_name
                try:
                    check(client)
                finally:
                    client.close_all()
        except BaseException as exc:
            if isinstance(exc, AssertionError | OSError):  # the contract, broken
                message = f"{driven.label}: {name}: {exc or type(exc).__name__}"
                failures.append(AssertionError(message))
                failures[-1].__cause__ = exc
            else:
                failures.append(exc)  # the kit's own bug: as it is
            shutdown.request()
            shutdown.request()  # a second request: stop now, no drain

    driver = threading.Thread(target=drive, name="echoplex-kit-client")
    driver.start()
    try:
        driven.start(driven.config, events, shutdown)
    except Exception as exc:  # the server died of it: that, not what its clients saw
        failures.insert(0, AssertionError(f"{driven.label}: {name}: the server raised {exc!r}"))
        failures[0].__cause__ = exc
    finally:
        events.server_returned()
        driver.join(STARTUP_TIMEOUT_S + driven.settings.timeout_s)
        events.close()
        shutdown.close()
    if driver.is_alive():
        raise AssertionError(f"{driven.label}: the kit's client thread did not finish")
    if failures:
        raise failures[0]
    if not shutdown.requested:
        raise AssertionError(f"{driven.label}: the server returned before it was asked to stop")


def _stop_unless_stopped(client: _Client) -> None:
    if not client.shutdown.requested:
        client.shutdown.request()
    events = client.events
    events.wait(lambda: events.returned, "the server's return after a stop")


# The checks, run by run.


def _check_streams(client: _Client) -> None:
    seed = client.settings.seed
    rng = random.Random(seed)
    payloads = [b""] + [rng.randbytes(rng.randint(1, 48_000)) for _ in range(CLIENTS - 1)]
    socks = [client.connect() for _ in payloads]
    received = echo_concurrently(socks, payloads, seed=seed, timeout_s=client.timeout_s * 3)
    for index, (sent, got) in enumerate(zip(payloads, received, strict=True)):
        _expect_echo(sent, got, f"client {index} (seed {seed})")
    for sock in socks:
        client.expect_outcome(sock, "closed", "finished client")


def echo_concurrently(
    socks: Sequence[socket.socket],
    payloads: Sequence[bytes],
    *,
    seed: int = 0,
    timeout_s: float = 3 * TIMEOUT_S,
) -> list[bytes]:
    """Send each payload on its connected socket in random chunk sizes (`seed`) while
    reading, then half-close and read to EOF, all at once (one thread, a selector); what
    each got back. AssertionError past `timeout_s`, or at an EOF before all sent came back."""
    rng = random.Random(seed)
    offsets = [0] * len(payloads)
    received = [bytearray() for _ in payloads]
    deadline = time.monotonic() + timeout_s
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
    return [bytes(data) for data in received]


CHUNK_SIZES = (1, 2, 7, 100, 1000, 1460, 4096, 20_000, 65_536)


def _check_mebibyte(client: _Client) -> None:
    data = random.Random(client.settings.seed + 1).randbytes(1 << 20)
    sock = client.connect()
    with _in_thread(lambda: sock.sendall(data), "sending 1 MiB", client.timeout_s):
        _expect_echo(data, recv_exactly(sock, len(data)))
    sock.close()
    client.expect_outcome(sock, "closed", "1 MiB client")


def _check_half_close(client: _Client) -> None:
    data = random.Random(client.settings.seed + 2).randbytes(300_000)
    sock = client.connect()

    def send_then_half_close() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    what = "sending, then shutting down the write side"
    with _in_thread(send_then_half_close, what, client.timeout_s):
        _expect_echo(data, recv_until_eof(sock))
    client.expect_outcome(sock, "closed", "half-closed client")


def _check_max_connections(client: _Client) -> None:
    holders = [client.connect() for _ in range(CLIENTS)]
    for index, holder in enumerate(holders):
        client.echo(holder, b"%d" % index)
    extra = client.connect()
    client.expect_rejected(extra, client.keys[extra], "max-connections", f"client {CLIENTS + 1}")
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


def _check_drain_and_stop(client: _Client) -> None:
    by_signal = client.settings.by_signal
    idler = client.connect()
    client.echo(idler, b"one")
    finisher = client.connect() if client.settings.concurrent else None
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
    events = client.events
    events.wait(lambda: events.stopping_seen, f"stopping after {how}")
    # Both must be done within the drain timeout: a machine too busy for that (it would
    # say `drained` below) needs a longer `drain_timeout_s` passed to `check_model`.
    client.echo(idler, b"echoed while draining")
    if finisher is not None:
        client.echo(finisher, b"two")
        finisher.shutdown(socket.SHUT_WR)
        assert not recv_until_eof(finisher), "bytes after the echo"
        client.expect_outcome(finisher, "closed", "client finishing during the drain")
    drain_s = client.config.drain_timeout_s
    client.expect_cut_off(idler, drain_s, "drained", "client idle past the drain timeout")
    events.wait(lambda: events.returned, f"the server's return after {how}")


def _check_idle_timeout(client: _Client) -> None:
    sock = client.connect()
    client.expect_cut_off(sock, client.config.idle_timeout_s, "idle-timeout", "silent client")


def _check_send_timeout(client: _Client) -> None:
    """Send without reading until the server gives up on us: the bytes in flight are
    bounded by the socket buffers, since the server stops reading a client that does
    not take its echo."""
    sock = client.connect(receive_buffer_bytes=CLIENT_RECEIVE_BUFFER)
    sock.setblocking(False)
    key = client.keys[sock]
    chunk = b"n" * 65_536
    deadline = time.monotonic() + client.config.send_timeout_s + client.timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while key not in client.events.outcomes:
            assert time.monotonic() < deadline, "a client that never reads was not cut off"
            if selector.select(timeout=0.05):
                try:
                    sock.send(chunk)
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    break  # cut off: the report follows
    client.expect_outcome(sock, "send-timeout", "client that never reads")
    sock.settimeout(client.timeout_s)
    _recv_until_closed(sock)


def _check_handler_error(client: _Client) -> None:
    """A bug in the handler path (the kit's `connection_opened` raises for the client
    from DOOMED_HOST) ends that connection alone, gives its slot back, and leaves
    nothing for a stop to wait on."""
    holders = [client.connect() for _ in range(client.config.max_connections - 1)]
    for index, holder in enumerate(holders):
        client.echo(holder, b"held %d" % index)
    doomed = client.connect(DOOMED_HOST)
    doomed.sendall(b"never echoed")
    _recv_until_closed(doomed)
    client.expect_outcome(doomed, "error:handler", "connection whose handler raised")
    newcomer = client.connect()  # in the slot the failed connection held
    client.echo(newcomer, b"served after the failure", "a client after the handler's failure")
    for index, holder in enumerate(holders):
        client.echo(holder, b"still served", f"client {index} held through the failure")
    for sock in [*holders, newcomer]:
        sock.close()
        client.expect_outcome(sock, "closed", "client served beside the failure")
    client.shutdown.request()  # nothing is open: the drain has nothing to wait for
    events = client.events
    drain_s = client.config.drain_timeout_s
    what = f"prompt return after a stop with nothing open (the drain is {drain_s:g} s)"
    events.wait(lambda: events.returned, what)


def _check_tls_echo(client: _Client) -> None:
    rng = random.Random(client.settings.seed + 3)
    sock = client.connect_tls()
    for _ in range(8):
        client.echo(sock, rng.randbytes(rng.choice(CHUNK_SIZES[:-1])), "the TLS client")
    sock.close()
    client.expect_outcome(sock, "closed", "TLS client")


def _check_tls_handshake_timeout(client: _Client) -> None:
    sock = client.connect()  # and no ClientHello
    limit_s = client.config.tls_handshake_timeout_s
    client.expect_cut_off(sock, limit_s, "tls-handshake-timeout", "silent TLS client")


def _check_tls_handshake_failed(client: _Client) -> None:
    sock = client.connect()
    sock.sendall(b"this is not a ClientHello\r\n" * 4)
    _recv_until_closed(sock)  # an alert, maybe, then the close
    outcome = client.events.outcome_of(client.keys[sock], "client that sent garbage")
    why = outcome.removeprefix("tls-handshake-failed:")
    assert why != outcome and why not in ("", "closed"), (
        f"garbage instead of a ClientHello ended with outcome {outcome!r}, "
        "not 'tls-handshake-failed:' with OpenSSL's reason"
    )


def _check_tls_plaintext(client: _Client) -> None:
    sock = client.connect()
    sock.sendall(b"hi")  # under the 5 bytes of a record header OpenSSL would wait for
    _recv_until_closed(sock)
    client.expect_outcome(sock, "tls-handshake-failed:NOT_TLS", "plaintext client")


def _check_proxy_v1(client: _Client) -> None:
    _check_proxied(client, lambda named, server: encode_v1(named, server), NAMED_V1, "v1")


def _check_proxy_v2(client: _Client) -> None:
    _check_proxied(client, lambda named, server: encode_v2(named, server), NAMED_V2, "v2")


def _check_proxied(
    client: _Client, encode: Callable[[Key, Key], bytes], named_host: str, version: str
) -> None:
    """A trusted proxy's header names a client: the server reports that client, via the
    proxy. The named port is the proxy's own, so the kit can tell connections apart."""
    sock = client.connect()
    proxy = client.keys[sock]
    named = (named_host, proxy[1])
    sock.sendall(encode(named, client.address))
    client.echo(sock, b"after a PROXY %s header" % version.encode(), f"the {version} client")
    sock.close()
    what = f"client a PROXY {version} header named"
    client.expect_outcome(named, "closed", what)
    via = client.events.vias[named]
    assert via == _name(proxy), f"the {what} was reported via {via!r}, not {_name(proxy)!r}"


def _named(client: _Client, named_host: str) -> tuple[socket.socket, Key]:
    """A connection from the trusted proxy whose v2 header names a client of `named_host`."""
    sock = client.connect()
    named = (named_host, client.keys[sock][1])
    sock.sendall(encode_v2(named, client.address))
    return sock, named


def _check_proxy_limits(client: _Client) -> None:
    """max_per_ip=1 counts the client a header names, never the proxy itself."""
    first, first_named = _named(client, NAMED_SHARED)
    client.echo(first, b"first of its address", "the first client a header named")
    second, second_named = _named(client, NAMED_SHARED)
    what = "second connection a header names from one address"
    client.expect_rejected(second, second_named, "max-per-ip", what)
    client.expect_outcome(second, "rejected:max-per-ip", what)  # the record is the proxy's
    other, other_named = _named(client, NAMED_OTHER)
    client.echo(other, b"another address", "a client of another address, via the same proxy")
    client.echo(first, b"still served", "the first client a header named")
    for sock, named in ((first, first_named), (other, other_named)):
        sock.close()
        client.expect_outcome(named, "closed", "client a header named")


def _check_proxy_header_timeout(client: _Client) -> None:
    sock = client.connect()  # from the trusted proxy, and no header
    limit_s = client.config.proxy_header_timeout_s
    client.expect_cut_off(sock, limit_s, "proxy-header-timeout", "silent trusted proxy")


def _check_proxy_untrusted(client: _Client) -> None:
    sock = client.connect(UNTRUSTED)
    pretended = (NAMED_V1, 1234), client.address
    data = encode_v1(*pretended) + encode_v2(*pretended) + b"and then some data"
    client.echo(sock, data, "an untrusted client sending PROXY headers")
    sock.close()
    client.expect_outcome(sock, "closed", "untrusted client")


def _check_max_per_ip(client: _Client) -> None:
    first = client.connect(PER_IP)
    client.echo(first, b"first")
    second = client.connect(PER_IP)
    client.expect_rejected(
        second, client.keys[second], "max-per-ip", "second client of one address"
    )
    other = client.connect(PER_IP_OTHER)
    client.echo(other, b"another address", "a client of another address")
    client.echo(first, b"still served")
    for sock in (first, other):
        sock.close()
        client.expect_outcome(sock, "closed", "client within max-per-ip")


def _check_max_buffer(client: _Client) -> None:
    """A client that sends and never reads can send only so much before the server stops
    reading it; once it reads, everything comes back in order, and it still echoes."""
    sock = client.connect(NEVER_READS, receive_buffer_bytes=CLIENT_RECEIVE_BUFFER)
    block = random.Random(client.settings.seed + 4).randbytes(65_536)
    stream = memoryview(block * 2)  # stream byte i is block[i % len(block)]
    own = sum(sock.getsockopt(socket.SOL_SOCKET, o) for o in (socket.SO_SNDBUF, socket.SO_RCVBUF))
    bound = client.config.max_buffer_bytes + READ_ALLOWANCE + own + _kernel_buffer_bytes()
    sock.setblocking(False)
    sent = 0
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while selector.select(QUIET_S):  # until sending stays blocked for QUIET_S
            assert sent <= bound, (
                f"the server took {sent} bytes from a client that reads nothing: more than "
                f"max_buffer_bytes plus the socket buffers ({bound} in all)"
            )
            start = sent % len(block)
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(stream[start : start + len(block)])
    sock.settimeout(client.timeout_s)
    received = 0
    while received < sent:
        chunk = sock.recv(min(sent - received, len(block)))
        assert chunk, f"EOF after {received} of the {sent} bytes held"
        start = received % len(block)
        if chunk != stream[start : start + len(chunk)]:
            raise AssertionError(f"the bytes held came back wrong, from byte {received}")
        received += len(chunk)
    client.echo(sock, b"still echoing", "the client once it reads")
    sock.close()
    client.expect_outcome(sock, "closed", "client that read at last")


def _kernel_buffer_bytes() -> int:
    """The most the server's own socket buffers can hold of one connection: its receive
    buffer autotunes up to tcp_rmem's maximum, its send buffer up to tcp_wmem's (Linux);
    elsewhere a generous KERNEL_FALLBACK_BYTES."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path("/proc/sys/net/ipv4", name).read_text().split()[2])
        except (OSError, ValueError, IndexError):
            return KERNEL_FALLBACK_BYTES
    return total


def _check_max_lifetime(client: _Client) -> None:
    """A client that echoes without pause is still cut off once it is max_lifetime_s old."""
    sock = client.connect()
    limit_s = client.config.max_lifetime_s
    deadline = time.monotonic() + limit_s + client.timeout_s
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while recv_exactly(sock, sock.send(b"busy")):  # until the server closes
            assert time.monotonic() < deadline, (
                f"a busy client was not cut off within {limit_s:g} s + {client.timeout_s:g} s"
            )
    client.expect_outcome(sock, "max-lifetime", "busy client")


# Conditions on purpose.


def _check_latency(client: _Client) -> None:
    """A delay line: every message is read while the first echo is held, then each comes
    back whole, in order, no sooner than the latency after it was sent."""
    socks = [client.connect() for _ in range(4 if client.settings.concurrent else 1)]
    sent = {sock: b"" for sock in socks}
    started = time.monotonic()
    own_s = 0.0  # the kit's own time between the server's read and the next send
    for round_ in range(3):
        for index, sock in enumerate(socks):
            message = f"message {round_} of client {index}\n".encode()
            sock.sendall(message)
            sent[sock] += message
            _until(functools.partial(_all_read, sock), "the server's read", client.timeout_s)
            looked_at = time.monotonic()
            last = round_ == 2 and index == len(socks) - 1
            # An echo back before the server has read every message: it held the reading
            # while it held the echo (a stall per chunk), unless the kit itself was so
            # slow between its sends that the latency passed meanwhile.
            assert last or own_s >= LATENCY_S or not any(map(_ready_to_read, socks)), (
                "an echo came back before the server had read the messages sent after "
                "it: a stall per chunk, not a delay line"
            )
            own_s += time.monotonic() - looked_at
    for index, sock in enumerate(socks):
        first = recv_exactly(sock, 1)
        waited_s = time.monotonic() - started
        assert waited_s >= LATENCY_S, f"an echo came back after {waited_s:.3f} s"
        _expect_echo(sent[sock], first + recv_exactly(sock, len(sent[sock]) - 1), f"client {index}")
        sock.shutdown(socket.SHUT_WR)
        assert not sock.recv(1), "no EOF after the delayed echo"
        client.expect_outcome(sock, "closed", "delayed client")


def _check_pacing(client: _Client) -> None:
    """A paced, sliced echo after each chunk's work: whole, in order, and no sooner than
    the rate, the slices' delays and the work allow."""
    sock = client.connect()
    data = random.Random(client.settings.seed).randbytes(3000)
    started = time.monotonic()
    sock.sendall(data)
    _expect_echo(data, recv_exactly(sock, len(data)), "the paced client")
    took_s = time.monotonic() - started
    slices = len(data) // PACED_SLICE
    least_s = PACED_WORK.seconds + max(
        (len(data) - PACED_SLICE) / PACED_RATE, (slices - 1) * SLICE_DELAY_S
    )
    assert took_s >= least_s, f"3000 bytes paced, sliced and worked on came back in {took_s:.3f} s"
    sock.shutdown(socket.SHUT_WR)
    assert not sock.recv(1), "no EOF after the paced echo"
    client.expect_outcome(sock, "closed", "paced client")


def _check_close_after(client: _Client) -> None:
    sock = client.connect()
    data = random.Random(client.settings.seed).randbytes(3 * END_AT)
    sock.sendall(data)
    try:
        got = recv_until_eof(sock)
    except ConnectionResetError:
        raise AssertionError("close-after reset the connection: it must close with a FIN") from None
    _expect_echo(data[:END_AT], got, "the client closed after 1000 bytes")
    sock.shutdown(socket.SHUT_WR)  # the server's discarding of what follows ends with it
    client.expect_outcome(sock, "close-after", "client closed on purpose")


def _check_reset_after(client: _Client) -> None:
    sock = client.connect()
    data = random.Random(client.settings.seed).randbytes(3 * END_AT)
    sock.sendall(data)
    got, reset = _until_ended(sock)  # (what the kernel kept of the echo before the RST)
    assert reset, "reset-after ended with a clean EOF, not a reset"
    assert data.startswith(got) and len(got) <= END_AT, (
        f"{len(got)} bytes came back before the reset, not the first {END_AT} at most"
    )
    client.expect_outcome(sock, "reset-after", "client reset on purpose")


def _until_ended(sock: socket.socket) -> tuple[bytes, bool]:
    """What comes back until the server ends the connection, and whether by a reset."""
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        return bytes(got), True
    return bytes(got), False


def _check_stall(client: _Client) -> None:
    """A stall with no end: the echo stops at its mark until a limit ends the connection."""
    sock = client.connect()
    data = random.Random(client.settings.seed).randbytes(3 * STALL_AT)
    sock.sendall(data)
    got, _ = _until_ended(sock)
    _expect_echo(data[:STALL_AT], got, "the stalled client")
    client.expect_outcome(sock, "idle-timeout", "stalled client")


def _check_stall_at_stop(client: _Client) -> None:
    """A stall neither reads nor echoes, so the connection could never finish: a stop
    cuts it off as `drained` at once, not at the drain deadline (an hour here)."""
    sock = client.connect()
    sock.sendall(b"stalled from its first byte")
    events, key = client.events, client.keys[sock]
    events.wait(lambda: key in events.opened, "the stalled client's connection opened")
    client.shutdown.request()
    client.expect_cut_off(sock, 0, "drained", "client stalled at the stop")
    events.wait(lambda: events.returned, "the server's return with a stalled client")


def _check_stall_for(client: _Client) -> None:
    sock = client.connect()
    data = random.Random(client.settings.seed).randbytes(3 * STALL_AT)
    started = time.monotonic()
    sock.sendall(data)
    _expect_echo(data, recv_exactly(sock, len(data)), "the client stalled a while")
    took_s = time.monotonic() - started
    assert took_s >= SHORT_LIMIT_S, (
        f"a {SHORT_LIMIT_S} s stall let the echo through in {took_s:.3f} s"
    )
    sock.shutdown(socket.SHUT_WR)
    assert not sock.recv(1), "no EOF after the stalled echo"
    client.expect_outcome(sock, "closed", "client stalled a while")


def _check_slow_close(client: _Client) -> None:
    sock = client.connect()
    sock.sendall(b"slow")  # under the stall's mark
    sock.shutdown(socket.SHUT_WR)
    closed_at = time.monotonic()
    assert recv_exactly(sock, 4) == b"slow", "no echo before the slow close"
    assert not sock.recv(1), "bytes after the echo"
    waited_s = time.monotonic() - closed_at
    assert waited_s >= SHORT_LIMIT_S, f"a {SHORT_LIMIT_S} s slow close came after {waited_s:.3f} s"
    client.expect_outcome(sock, "closed", "slowly closed client")


def _check_toxicity(client: _Client) -> None:
    treated: dict[str, int] = {}
    for _ in range(CLIENTS):  # one after another: a one-at-a-time model too
        sock = client.connect()
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        got = recv_until_eof(sock)
        expected = {b"": "close-after", b"ping": "closed"}.get(got)
        assert expected is not None, f"a client got {got!r}, not its echo nor an empty close"
        client.expect_outcome(sock, expected, "client of a toxicity draw")
        treated[expected] = treated.get(expected, 0) + 1
        sock.close()
    assert len(treated) == 2, f"toxicity 0.5 treated {CLIENTS} clients alike: {treated}"


def unread_by_peer(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the kernel holds for the program at the other end, not
    yet read by it (`rx_queue` of the peer's line in /proc/net/tcp): how a client on
    this machine sees what a server has read."""
    return int(peer_tcp_line(sock)[4].split(":")[1], 16)


def peer_tcp_line(sock: socket.socket) -> list[str]:
    """The fields of the /proc/net/tcp line of the socket at the other end of IPv4 `sock`."""

    def hex_address(address: tuple[str, int]) -> str:
        packed = int.from_bytes(socket.inet_aton(address[0]), "little")
        return f"{packed:08X}:{address[1]:04X}"

    peer = (hex_address(sock.getpeername()), hex_address(sock.getsockname()))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == peer:
            return fields
    raise AssertionError(f"no socket for {sock.getpeername()} -> {sock.getsockname()}")


def _all_read(sock: socket.socket) -> bool:
    return unread_by_peer(sock) == 0


def _until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Wait until `condition()` holds (asked every few ms); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {timeout_s:g} s")
        time.sleep(0.002)


def _ready_to_read(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


# The runs: one per group of settings that can share a server (the module docstring).


@dataclass(frozen=True)
class _Run:
    settings: dict[str, Any]
    checks: tuple[tuple[str, _Check], ...]
    tls: bool = False  # give the server a certificate, the checks a client context


def _runs(concurrent: bool) -> tuple[_Run, ...]:
    streams = {"drain_timeout_s": DRAIN_TIMEOUT_S, "max_connections": CLIENTS}
    handler_slots = HANDLER_SLOTS if concurrent else 1
    proxy = {
        "proxy_protocol": True,
        "trusted_proxies": (f"{TRUSTED_PROXY}/32",),
        "proxy_header_timeout_s": SHORT_LIMIT_S,
        "max_per_ip": 1,
        "max_buffer_bytes": BUFFER_BYTES,
    }
    return (
        _Run(
            streams,
            (
                ("streams", _check_streams),
                ("1-mib", _check_mebibyte),
                ("half-close", _check_half_close),
                ("max-connections", _check_max_connections),
                ("reset", _check_reset),
                ("drain", _check_drain_and_stop),
            ),
        ),
        _Run({"idle_timeout_s": SHORT_LIMIT_S}, (("idle-timeout", _check_idle_timeout),)),
        _Run(
            {
                "idle_timeout_s": 0,
                "send_timeout_s": SHORT_LIMIT_S,
                "max_connections": handler_slots,
                "drain_timeout_s": LONG_DRAIN_S,
            },
            (("send-timeout", _check_send_timeout), ("handler-error", _check_handler_error)),
        ),
        _Run(
            {"tls_handshake_timeout_s": SHORT_LIMIT_S},
            (
                ("tls-echo", _check_tls_echo),
                ("tls-handshake-timeout", _check_tls_handshake_timeout),
                ("tls-handshake-failed", _check_tls_handshake_failed),
                ("tls-plaintext", _check_tls_plaintext),
            ),
            tls=True,
        ),
        _Run(
            proxy,
            (
                ("proxy-v1", _check_proxy_v1),
                ("proxy-v2", _check_proxy_v2),
                ("proxy-limits", _check_proxy_limits),
                ("proxy-header-timeout", _check_proxy_header_timeout),
                ("proxy-untrusted", _check_proxy_untrusted),
                ("max-per-ip", _check_max_per_ip),
                ("max-buffer", _check_max_buffer),
            ),
        ),
        _Run({"max_lifetime_s": SHORT_LIMIT_S}, (("max-lifetime", _check_max_lifetime),)),
        *_condition_runs(),
    )


def _condition_runs() -> tuple[_Run, ...]:
    """The runs of the conditions on purpose (8 in the module docstring)."""
    return (
        _Run({"latency_s": LATENCY_S, "threads": 2}, (("latency", _check_latency),)),
        _Run(
            {
                "bandwidth_bytes_per_s": PACED_RATE,
                "slice_bytes": PACED_SLICE,
                "slice_delay_s": SLICE_DELAY_S,
                "work": PACED_WORK,
            },
            (("pacing", _check_pacing),),
        ),
        _Run({"close_after_bytes": END_AT}, (("close-after", _check_close_after),)),
        _Run({"reset_after_bytes": END_AT}, (("reset-after", _check_reset_after),)),
        _Run(
            {"stall_after_bytes": STALL_AT, "idle_timeout_s": SHORT_LIMIT_S},
            (("stall", _check_stall),),
        ),
        _Run(
            {"stall_after_bytes": 0, "drain_timeout_s": STALLED_DRAIN_TIMEOUT_S},
            (("stall-at-stop", _check_stall_at_stop),),
        ),
        _Run(
            {
                "stall_after_bytes": STALL_AT,
                "stall_for_s": SHORT_LIMIT_S,
                "slow_close_s": SHORT_LIMIT_S,
            },
            (("stall-for", _check_stall_for), ("slow-close", _check_slow_close)),
        ),
        _Run(
            {"toxicity": 0.5, "condition_seed": 1, "close_after_bytes": 0},
            (("toxicity", _check_toxicity),),
        ),
    )


CHECKS: tuple[str, ...] = tuple(name for run_ in _runs(True) for name, _ in run_.checks)
"""Every check's name, in the order they run: what `check_model(checks=...)` takes."""

TLS_CHECKS = frozenset(name for run_ in _runs(True) if run_.tls for name, _ in run_.checks)


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
def _in_thread(work: Callable[[], None], what: str, timeout_s: float) -> Iterator[None]:
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
        thread.join(timeout_s * 2)
    assert not thread.is_alive(), f"{what} did not finish"
    if errors:
        raise AssertionError(f"{what} failed: {errors[0]!r}")
