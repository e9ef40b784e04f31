"""Helpers to run echoplex (and other real programs) as subprocesses in tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Self

import pytest

from .waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
STARTUP_TIMEOUT_S = 20.0
_libc = ctypes.CDLL(None, use_errno=True)  # tgkill(2): glibc 2.30 and later


def require_tool(name: str) -> str:
    """The tool's path; skip the test if it is missing, except under CI where it must exist."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install the package that provides it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(message)
    return path


class Process:
    """A subprocess whose stdout and stderr lines are collected as they arrive."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # so kill() reaches its children too
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
        )
        self.stdout_lines: queue.Queue[str] = queue.Queue()
        self.stdout_seen: list[str] = []
        self.stderr_seen: list[str] = []
        self._readers = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, self.stdout_seen, True), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, self.stderr_seen, False), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: IO[bytes], seen: list[str], to_queue: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            seen.append(line)
            if to_queue:
                self.stdout_lines.put(line)
        stream.close()

    def next_line(self, timeout_s: float = 10.0) -> str:
        """The next stdout line; fails the test if none comes in time."""
        try:
            return self.stdout_lines.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(
                f"no output line from {self.argv} within {timeout_s}s; "
                f"stderr: {''.join(self.stderr_seen)[-2000:]}"
            )

    def wait_for_stderr(
        self, pattern: re.Pattern[str] | str, timeout_s: float = STARTUP_TIMEOUT_S, start: int = 0
    ) -> re.Match[str]:
        """The first match of `pattern` in a stderr line from line `start` on; fails the
        test if none comes in time, or at once if the process ended without one."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def seen() -> re.Match[str] | None:
            ended = self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)
            for line in self.stderr_seen[start:]:
                if match := regex.search(line):
                    return match
            if ended:  # every line it wrote has been read: none will match now
                pytest.fail(f"{self.argv} exited without {regex.pattern!r}: {self.stderr[-3000:]}")
            return None

        return wait_for(
            seen,
            timeout_s,
            lambda: f"{regex.pattern!r} on stderr of {self.argv}: {self.stderr[-3000:]}",
        )

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_seen)

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_seen)

    def signal_other_thread(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` to the newest thread that is not the main one (tgkill), as the
        kernel may pick any thread for a process-directed signal; the thread's id."""
        pid = self.proc.pid
        others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
        assert others, f"{self.argv} runs one thread only: nothing to aim at"
        if _libc.tgkill(pid, others[-1], sig) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return others[-1]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 15.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"{self.argv} did not exit within {timeout_s}s; stderr: {self.stderr[-2000:]}"
            )
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """Kill the process and anything it started (it runs in its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        if self.proc.stdin:
            self.proc.stdin.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Server(Process):
    """`python -m echoplex serve --port 0 ...`, started and ready (its port read from its log)."""

    def __init__(self, *args: str, mode: str = "threads") -> None:
        super().__init__(
            [sys.executable, "-m", "echoplex", "serve", "--port", "0", "--mode", mode, *args]
        )
        match = self.wait_for_stderr(LISTENING)
        self.host, self.port = match.group(1), int(match.group(2))
        self.address = (self.host, self.port)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        self.signal(sig)
        return self.wait(timeout_s)


def echoplex(
    *args: str,
    timeout_s: float = 60.0,
    input: bytes | None = None,
    python: str | Path = sys.executable,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m echoplex ARGS` to completion and return its result (text)."""
    return subprocess.run(
        [python, "-m", "echoplex", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        input=input.decode() if input is not None else None,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
