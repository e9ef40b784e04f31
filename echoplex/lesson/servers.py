"""A real server for one scene of the lesson: its own process, on a free port.

The server runs as a process of its own (`echoplex.lesson._server`), not in a thread
of the lesson, for two reasons the lesson is about: work that computes holds the GIL,
and a server in the lesson's process would take turns with the lesson's clients; and
memory and threads per connection are read from the server's process alone. It is
started in a session of its own, so that stopping it (or a Ctrl-C) ends the workers
of the `workers` model too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ..bench import proctree

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class ServerFailed(Exception):
    """The server did not start, or stopped before its time: one line, the reason."""


class LessonServer:
    """`python -m echoplex.lesson._server --port 0 ARGS`, its port and accept times."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.port: int | None = None
        self.accepted: dict[int, float] = {}  # the client's port: when it was accepted
        self._changed = threading.Condition()
        self._stderr: list[str] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "echoplex.lesson._server", "--port", "0", *self.args]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            kind, _, rest = raw.decode(errors="replace").strip().partition(" ")
            with self._changed:
                if kind == "listening":
                    self.port = int(rest)
                elif kind == "accepted":
                    peer_port, _, when = rest.partition(" ")
                    self.accepted[int(peer_port)] = float(when)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.decode(errors="replace").rstrip())

    def wait_until(self, ready: object, timeout_s: float, what: str) -> None:
        """Block until `ready()` is true; ServerFailed if the server ends or time runs out."""
        assert callable(ready)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not ready():
                if self.proc.poll() is not None:
                    raise ServerFailed(f"the server stopped before {what}: {self.last_error()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerFailed(f"no {what} within {timeout_s:g} s")
                self._changed.wait(min(left, 0.2))

    def wait_listening(self) -> Self:
        self.wait_until(lambda: self.port is not None, STARTUP_TIMEOUT_S, "listening")
        return self

    def accepted_count(self) -> int:
        return len(self.accepted)

    def last_error(self) -> str:
        return self._stderr[-1] if self._stderr else f"exit status {self.proc.poll()}"

    def threads(self) -> int | None:
        """Threads of every process of the server (a `workers` supervisor's too)."""
        counts = []
        for pid in proctree.tree_pids(self.pid):
            try:
                counts.append(len(os.listdir(f"/proc/{pid}/task")))
            except OSError:
                continue  # gone
        return sum(counts) if counts else None

    def rss_bytes(self) -> int | None:
        return proctree.tree_rss_bytes(self.pid)

    def stop(self) -> None:
        """SIGTERM to the whole session, SIGKILL if it lingers; reaped either way."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        for reader in self._readers:
            reader.join(STOP_TIMEOUT_S)

    def __enter__(self) -> Self:
        try:
            return self.wait_listening()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
