"""The servers the bench compares, and how one is started, watched and stopped.

Every server is a separate program that logs `listening on HOST:PORT` on stderr once
it accepts: `echoplex serve --mode M` for the five models, and the three few-line
reference servers in the repository's `bench/` directory. So one launcher handles
them all: start it (pinned to CPUs if asked), read the port from its log, keep
reading its log in a thread (counting the connections each process accepted), and
stop it with SIGTERM, then SIGKILL to its whole session if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Self

from ..models import MODELS

BASELINE_DIR = Path(__file__).resolve().parents[2] / "bench"
LISTENING = re.compile(r"listening on (\S+):(\d+)")
# `echoplex serve --log-level info` logs one `open PEER` line per accepted connection;
# the workers model puts the process name (`worker-N`) before the logger name.
OPENED = re.compile(r" INFO (?:(\S+) )?echoplex\.server: open ")
STARTUP_TIMEOUT_S = 20.0
# Servers drain for this long on SIGTERM; the load has ended by then, so it is short.
DRAIN_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 8.0
STDERR_TAIL_LINES = 40


@dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str
    """`model` (an echoplex concurrency model) or `baseline` (a reference server)."""
    description: str
    argv: tuple[str, ...]
    requires: tuple[str, ...] = ()
    """Modules the server imports that may be missing (checked before starting it)."""
    cpus: int = 1
    """CPUs the bench pins it to when it pins: one per process that serves."""

    def unavailable_reason(self) -> str | None:
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{self.name} needs {module} (pip install 'echoplex[uvloop]')"
        if self.kind == "baseline" and not Path(self.argv[1]).is_file():
            return f"{self.name}: {self.argv[1]} not found (run from a source checkout)"
        return None


def _model_spec(name: str) -> ServerSpec:
    return ServerSpec(
        name=name,
        kind="model",
        description=f"echoplex serve --mode {name}",
        argv=(
            sys.executable,
            "-m",
            "echoplex",
            "serve",
            "--mode",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--drain-timeout",
            str(DRAIN_TIMEOUT_S),
            # info: the readiness line and one line per connection (counted per worker).
            "--log-level",
            "info",
        ),
    )


def _baseline_spec(name: str, script: str, description: str, *requires: str) -> ServerSpec:
    return ServerSpec(
        name=name,
        kind="baseline",
        description=description,
        argv=(sys.executable, str(BASELINE_DIR / script), "0"),
        requires=requires,
    )


def _variant(spec: ServerSpec, suffix: str, *args: str, cpus: int = 1) -> ServerSpec:
    """The same server with more arguments, named `NAME-SUFFIX`, to run side by side."""
    return replace(
        spec,
        name=f"{spec.name}-{suffix}",
        description=f"{spec.description} {' '.join(args)}",
        argv=(*spec.argv, *args),
        cpus=cpus,
    )


def _with_workers(count: int) -> ServerSpec:
    """The workers model with a fixed number of processes, on as many CPUs: plain
    `workers` counts the CPUs it may use, which is one when the bench pins it."""
    return _variant(_model_spec("workers"), str(count), "--workers", str(count), cpus=count)


SERVERS: dict[str, ServerSpec] = {
    **{name: _model_spec(name) for name in MODELS},
    "pool": _model_spec("pool"),
    # What splice(2) saves: the same model with its zero-copy path off.
    "threads-copy": _variant(_model_spec("threads"), "copy", "--no-zero-copy"),
    "workers-1": _with_workers(1),
    "workers-2": _with_workers(2),
    "ref-socketserver": _baseline_spec(
        "ref-socketserver",
        "baseline_socketserver.py",
        "stdlib socketserver.ThreadingTCPServer",
    ),
    "ref-asyncio": _baseline_spec(
        "ref-asyncio", "baseline_asyncio.py", "asyncio Protocol echo, stdlib loop"
    ),
    "ref-uvloop": _baseline_spec(
        "ref-uvloop", "baseline_uvloop.py", "asyncio Protocol echo on uvloop", "uvloop"
    ),
}


class ServerStartError(Exception):
    pass


class RunningServer:
    """A started server: `host`, `port`, `pid`, connection counts; `stop()` it when done."""

    def __init__(self, spec: ServerSpec, *, cpus: Sequence[int] | None = None) -> None:
        self.spec = spec
        argv = list(spec.argv)
        if cpus:
            # taskset execs: the pid stays ours.
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Its own session, so a stuck tree (workers) can be killed as one group.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.host = ""
        self.port = 0
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._opened: Counter[str] = Counter()
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        assert self.proc.stderr is not None
        self._reader = threading.Thread(
            target=self._read_log, args=(self.proc.stderr,), daemon=True
        )
        self._reader.start()
        if not self._ready.wait(STARTUP_TIMEOUT_S) or not self.port:
            self.stop()
            raise ServerStartError(
                f"{spec.name} did not report `listening on` within {STARTUP_TIMEOUT_S:.0f}s"
                f" (exit status {self.proc.poll()}): {self.stderr_tail()[-500:]}"
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
        None for servers that do not log them (the reference servers)."""
        if self.spec.kind != "model":
            return None
        with self._lock:
            return dict(sorted(self._opened.items()))

    def stderr_tail(self) -> str:
        return "\n".join(self._tail)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole session; returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Not reaped yet, so the group id is still ours: kill the whole session
            # (a workers supervisor and its workers) at once.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            status = self.proc.wait()
        self._reader.join(timeout=5)
        return status

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
