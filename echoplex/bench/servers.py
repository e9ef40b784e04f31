"""The servers the bench compares, and how one is started, watched and stopped.

Three kinds: `echoplex serve --mode M` for the models, the few-line reference servers
(`baseline`, in `baselines/`), and any server a user names with `--server NAME='COMMAND {port}'`
(`custom`). The first two log `listening on HOST:PORT` on stderr once they accept, so
they start on port 0 and the port is read from their log; a custom server is given a
free port in its command and is ready once that port accepts a connection. One
launcher handles them all: start the server in a session of its own (pinned to CPUs
if asked: `taskset` sets the affinity before it execs, and every process the server
starts inherits it, however deep), keep reading its log in a thread (counting the
connections each echoplex process accepted), and stop it with SIGTERM, then SIGKILL
to its whole session if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn, Self

from .._cli_util import argv_of
from ..config import ServerConfig
from ..models import MODELS
from .proctree import group_pids, listening_sockets, tree_sockets

# In the package, so a wheel has them too; run by path, so they import nothing of ours.
BASELINE_DIR = Path(__file__).resolve().parent / "baselines"
LOOPBACK = "127.0.0.1"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
# `echoplex serve --log-level info` logs one `open PEER` line per accepted connection;
# the workers model puts the process name (`worker-N`) before the logger name.
OPENED = re.compile(r" INFO (?:(\S+) )?echoplex\.server: open ")
PORT_PLACEHOLDER = "{port}"
# A custom server's name goes into tables and file names: keep it plain.
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
STARTUP_TIMEOUT_S = 20.0
# How often a custom server's port is looked at while it starts.
LISTEN_POLL_S = 0.02
# Every server is readied the same way before its load: see `warm_up`.
WARM_UP_MESSAGE = bytes(range(64))
WARM_UP_TIMEOUT_S = 5.0
# How long a warm-up connection waits for the server to close after its own half-close.
WARM_UP_CLOSE_S = 1.0
# How long the warm-up's connections may take to show in an echoplex server's log.
FORGET_WAIT_S = 2.0
# Servers drain for this long on SIGTERM; the load has ended by then, so it is short.
DRAIN_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 8.0
STOP_POLL_S = 0.02
STDERR_TAIL_LINES = 40


@dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str
    """`model` (an echoplex concurrency model), `baseline` (a reference server) or
    `custom` (a `--server` command)."""
    description: str
    argv: tuple[str, ...] = ()
    """The program of a model or reference server; it picks its port and logs it."""
    command: str | None = None
    """A custom server's shell command, `{port}` standing for the port the bench picks."""
    requires: tuple[str, ...] = ()
    """Modules the server imports that may be missing (checked before starting it); each
    is also the name of the echoplex extra that installs it."""
    cpus: int = 1
    """CPUs the bench pins it to when it pins: one per process that serves."""
    holds_at_most: int | None = None
    """Connections it serves at once, at most, whatever the machine; None: not known."""
    holds_at_most_why: str = ""

    def cannot_hold(self, connections: int) -> str | None:
        """Why it cannot serve `connections` at once, in a few words; None if it may."""
        if self.holds_at_most is None or connections <= self.holds_at_most:
            return None
        return f"cannot hold {connections:,}: {self.holds_at_most_why}"

    def unavailable_reason(self) -> str | None:
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{self.name} needs {module}: pip install 'echoplex[{module}]'"
        if self.kind == "baseline" and not Path(self.argv[1]).is_file():
            return f"{self.name}: {self.argv[1]} is missing (reinstall echoplex)"
        return None

    def launch_argv(self, port: int) -> list[str]:
        """What to run: a custom server's command through the shell (so it may set
        variables, change directory or chain commands), the others as they are."""
        if self.command is None:
            return list(self.argv)
        return ["/bin/sh", "-c", self.command.replace(PORT_PLACEHOLDER, str(port))]


def custom_server(text: str) -> ServerSpec:
    """The server a `--server NAME='COMMAND {port}'` value describes; a ValueError that
    says what is wrong with it otherwise."""
    name, equals, command = text.partition("=")
    name, command = name.strip(), command.strip()
    if not equals or not name:
        raise ValueError(f"expected NAME='COMMAND {PORT_PLACEHOLDER}', got {text!r}")
    if not SERVER_NAME.fullmatch(name):
        raise ValueError(
            f"server name {name!r}: use up to 40 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in SERVERS:
        raise ValueError(f"server name {name!r} is taken by a built-in server: choose another")
    if not command:
        raise ValueError(f"server {name!r} has an empty command")
    if PORT_PLACEHOLDER not in command:
        raise ValueError(
            f"server {name!r}: the command must say where the port goes with "
            f"{PORT_PLACEHOLDER} (the bench picks a free one): {command!r}"
        )
    return ServerSpec(name=name, kind="custom", description=command, command=command)


def _model_spec(name: str, *, suffix: str = "", cpus: int = 1, **settings: Any) -> ServerSpec:
    """`echoplex serve` of the model `name` on a port it picks, its flags those of the
    ServerConfig (`settings` beside the bench's own) as `argv_of` writes them; named
    `NAME-SUFFIX` with a suffix, to run beside the plain one."""
    config = ServerConfig(
        mode=name, hosts=(LOOPBACK,), port=0, drain_timeout_s=DRAIN_TIMEOUT_S, **settings
    )
    holds_at_most, why = ONE_AT_A_TIME if name == "simple" else (config.max_connections, "")
    return ServerSpec(
        name=f"{name}-{suffix}" if suffix else name,
        kind="model",
        description=shlex.join(
            ["echoplex", "serve", *argv_of(config, leave_out=_RUN_SETTINGS, keep_defaults=["mode"])]
        ),
        # info (the command's own flag, not a setting): the readiness line and one line
        # per connection (counted per worker).
        argv=(
            *(sys.executable, "-m", "echoplex", "serve"),
            *argv_of(config, keep_defaults=["mode", *_RUN_SETTINGS]),
            *("--log-level", "info"),
        ),
        cpus=cpus,
        # --max-connections 0 is no limit.
        holds_at_most=holds_at_most or None,
        holds_at_most_why=why or f"--max-connections is {config.max_connections:,}",
    )


# The simple model accepts the next connection only once the one it serves has closed.
ONE_AT_A_TIME = (1, "serves one connection at a time")


# How the bench runs every model: flagged even where it is the default (the bench relies
# on them), and left out of the descriptions, which say what differs between models. The
# model is always flagged, default or not.
_RUN_SETTINGS = ("hosts", "port", "drain_timeout_s")


def _baseline_spec(
    name: str, description: str, script: str, *args: str, requires: tuple[str, ...] = ()
) -> ServerSpec:
    return ServerSpec(
        name=name,
        kind="baseline",
        description=description,
        argv=(sys.executable, str(BASELINE_DIR / script), "0", *args),
        requires=requires,
    )


def _with_workers(count: int) -> ServerSpec:
    """The workers model with a fixed number of processes, on as many CPUs: plain
    `workers` counts the CPUs it may use, which is one when the bench pins it."""
    return _model_spec("workers", suffix=str(count), cpus=count, workers=count)


SERVERS: dict[str, ServerSpec] = {
    **{name: _model_spec(name) for name in MODELS},
    "pool": _model_spec("pool"),
    # What splice(2) saves: the same model with its zero-copy path off.
    "threads-copy": _model_spec("threads", suffix="copy", zero_copy=False),
    "workers-1": _with_workers(1),
    "workers-2": _with_workers(2),
    "ref-socketserver": _baseline_spec(
        "ref-socketserver", "stdlib socketserver.ThreadingTCPServer", "socketserver_echo.py"
    ),
    "ref-asyncio": _baseline_spec(
        "ref-asyncio", "asyncio Protocol echo, stdlib loop", "protocol_echo.py", "asyncio"
    ),
    "ref-uvloop": _baseline_spec(
        "ref-uvloop",
        "asyncio Protocol echo on uvloop",
        "protocol_echo.py",
        "uvloop",
        requires=("uvloop",),
    ),
}


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now, for a server that cannot pick its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class ServerStartError(Exception):
    pass


class WarmUpError(Exception):
    """A warm-up connection failed; `wrong_echo` if the server sent back other bytes."""

    def __init__(self, detail: str, *, wrong_echo: bool = False) -> None:
        super().__init__(detail)
        self.wrong_echo = wrong_echo


def warm_up(host: str, port: int, connections: int) -> None:
    """Ready a listening server for its load, the same way for every server: open
    `connections` connections one after another, and on each send 64 bytes, check
    that exactly those come back, half-close, and give the server a moment to close
    too. So every server has accepted, echoed and closed a connection before the load:
    the stdlib asyncio server needs that to reach its steady state (bench/README.md,
    "Readying a server")."""
    for index in range(connections):
        what = f"warm-up connection {index + 1} to {host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=WARM_UP_TIMEOUT_S) as conn:
                conn.sendall(WARM_UP_MESSAGE)
                echoed = _receive(conn, len(WARM_UP_MESSAGE))
                if echoed != WARM_UP_MESSAGE[: len(echoed)]:
                    offset = next(i for i, b in enumerate(echoed) if b != WARM_UP_MESSAGE[i])
                    raise WarmUpError(
                        f"{what} offset {offset}: expected byte "
                        f"0x{WARM_UP_MESSAGE[offset]:02x}, received 0x{echoed[offset]:02x}",
                        wrong_echo=True,
                    )
                if len(echoed) < len(WARM_UP_MESSAGE):
                    raise WarmUpError(
                        f"{what}: {len(echoed)} of {len(WARM_UP_MESSAGE)} bytes echoed"
                    )
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(WARM_UP_CLOSE_S)
                if _receive(conn, 1):
                    raise WarmUpError(f"{what}: more bytes echoed than sent", wrong_echo=True)
        except OSError as exc:
            raise WarmUpError(f"{what}: {exc.strerror or exc}") from None


def _receive(conn: socket.socket, size: int) -> bytes:
    """Up to `size` bytes: fewer only if the peer closed (or the timeout struck first)."""
    received = b""
    with contextlib.suppress(TimeoutError):
        while len(received) < size and (chunk := conn.recv(size - len(received))):
            received += chunk
    return received


class RunningServer:
    """A started server: `host`, `port`, `pid`, connection counts; `stop()` it when done."""

    def __init__(self, spec: ServerSpec, *, cpus: Sequence[int] | None = None) -> None:
        self.spec = spec
        self.host, self.port = (LOOPBACK, free_port()) if spec.command is not None else ("", 0)
        argv = spec.launch_argv(self.port)
        if cpus:
            # taskset sets the affinity, then execs: the pid stays ours, and whatever the
            # server starts (a shell's child, workers, threads) inherits the CPUs.
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Its own session and process group: a shell that does not exec its command,
            # or a stuck tree (workers), is signalled as one group.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._opened: Counter[str] = Counter()
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        assert self.proc.stderr is not None
        self._reader = threading.Thread(
            target=self._read_log, args=(self.proc.stderr,), daemon=True
        )
        self._reader.start()
        try:
            self._wait_until_listening()
        except ServerStartError:
            self.stop()
            raise

    def _wait_until_listening(self) -> None:
        within = f"within {STARTUP_TIMEOUT_S:.0f}s"
        if self.spec.command is None:
            if not self._ready.wait(STARTUP_TIMEOUT_S) or not self.port:
                self._not_ready(f"did not report `listening on` {within}")
            return
        # Its listening socket, seen in /proc without connecting to it (a connection
        # would be one more than other servers get), and held by one of its processes.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.exit_status() is not None:
                self._not_ready(f"exited before listening on port {self.port}")
            if listening := listening_sockets(self.port):
                if listening & tree_sockets(self.pid):
                    return
                self._not_ready(f"lost port {self.port} to another program that listens on it")
            time.sleep(LISTEN_POLL_S)
        self._not_ready(f"did not listen on port {self.port} {within}")

    def _not_ready(self, what: str) -> NoReturn:
        self._reader.join(timeout=0.5)  # the server's last words, if it has exited
        raise ServerStartError(
            f"{self.spec.name} {what} (exit status {self.exit_status()}): "
            f"{self.stderr_tail()[-500:]}"
        )

    def _read_log(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                if match := OPENED.search(line):
                    with self._lock:
                        self._opened[match.group(1) or "main"] += 1
                    continue
                self._tail.append(line)
                if not self._ready.is_set() and (match := LISTENING.search(line)):
                    self.host, self.port = match.group(1), int(match.group(2))
                    self._ready.set()
        finally:
            stream.close()
            self._ready.set()  # the server is gone: stop waiting for it

    def connections_opened(self) -> dict[str, int] | None:
        """Connections accepted so far, by process (`main`, or `worker-N` for workers);
        None for servers that do not log them (reference and custom servers)."""
        if self.spec.kind != "model":
            return None
        with self._lock:
            return dict(sorted(self._opened.items()))

    def forget_connections(self, count: int) -> None:
        """Count accepted connections from zero once the `count` made so far (the
        warm-up's) are logged: the table's `accepted` is the load's."""
        deadline = time.monotonic() + FORGET_WAIT_S
        while self.spec.kind == "model" and time.monotonic() < deadline:
            with self._lock:
                if sum(self._opened.values()) >= count:
                    break
            time.sleep(LISTEN_POLL_S)
        with self._lock:
            self._opened.clear()

    def stderr_tail(self) -> str:
        return "\n".join(self._tail)

    def exit_status(self) -> int | None:
        """The server's exit status once it has exited, else None. The root process is
        not reaped here (WNOWAIT), so its process group stays ours to signal."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def alive(self) -> bool:
        return self.exit_status() is None

    def _others_left(self) -> bool:
        """Whether any process of the server's group but its root is still running."""
        return any(pid != self.pid for pid in group_pids(self.pid))

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole group; returns the root's exit status.
        Returns once every process of the group has exited."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                if self.spec.command is not None:
                    # The shell may not pass the signal on to the server it started.
                    os.killpg(self.pid, signal.SIGTERM)
                else:
                    self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.alive() or self._others_left():
            if time.monotonic() >= deadline:
                # The root is not reaped yet, so the group id is still ours: kill the
                # whole group (a workers supervisor and its workers) at once.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                break
            time.sleep(STOP_POLL_S)
        status = self.proc.wait()
        self._reader.join(timeout=5)
        return status

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
