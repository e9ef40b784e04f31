"""Driving a server with `echoplex load`, the project's load generator, as a subprocess.

The bench has no load generator of its own: every server gets exactly the same
`python -m echoplex load ... --json` command, its flags written from a `LoadConfig`
(`echoplex._cli_util.argv_of`), and the bench reads back the JSON object it prints.
`load_argv` is the whole interface to it. `LoadRun` runs any
generator that prints such an object (the cross-check's C client too: crosscheck.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from .._cli_util import argv_of
from ..load.config import LoadConfig

LOAD_COMMAND: list[str] = [sys.executable, "-m", "echoplex", "load"]
# Beyond warmup + duration, how long a run may take before it is stopped: connecting
# thousands of clients to a server that accepts one at a time (`simple`) can take
# long, and the bench must stay bounded.
GRACE_S = 25.0
GRACE_PER_CONNECTION_S = 0.003
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class LoadSpec:
    """One run of the load generator, as the bench varies it (the rest is `echoplex
    load`'s defaults): each field is the `LoadConfig` field of that name."""

    pattern: str
    """pingpong (request, wait for the echo, repeat), rate, stream (bulk) or hold."""
    connections: int
    size_bytes: int
    duration_s: float
    warmup_s: float
    rate_per_s: float | None = None
    """Messages due a second over all connections, for the open-loop `rate` pattern."""

    @property
    def timeout_s(self) -> float:
        return self.warmup_s + self.duration_s + GRACE_S + self.connections * GRACE_PER_CONNECTION_S


def load_config(host: str, port: int, spec: LoadSpec) -> LoadConfig:
    """The `echoplex load` run of `spec` against `host`:`port` (each field of a LoadSpec
    is the LoadConfig field of that name)."""
    return LoadConfig(host=host, port=port, **dataclasses.asdict(spec))


def load_argv(host: str, port: int, spec: LoadSpec, *, cpu: int | None = None) -> list[str]:
    """The `echoplex load` command for one run (pinned to `cpu` with taskset if given):
    the flags of its LoadConfig as `argv_of` writes them, each setting the bench makes
    even at its default, and the command's own --json."""
    config = load_config(host, port, spec)
    # A setting the spec leaves out (None: not for its pattern) is load's own default.
    given = [name for name, value in dataclasses.asdict(spec).items() if value is not None]
    flags = argv_of(config, keep_defaults=("host", "port", *given))
    argv = [*LOAD_COMMAND, *flags, "--json"]
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


def parse_report(stdout: str) -> dict[str, Any]:
    """The JSON object `echoplex load --json` printed: the whole output, or else its
    last line that parses as an object (in case anything else was printed first)."""
    with contextlib.suppress(ValueError):
        report = json.loads(stdout)
        if isinstance(report, dict):
            return report
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            report = json.loads(line)
            if isinstance(report, dict):
                return report
    raise ValueError(f"no JSON object in the load generator's output: {stdout[-300:]!r}")


class LoadRun:
    """One `echoplex load` subprocess: start it, `wait()` for it, read its `report`.
    Subclasses run another generator by giving its `command`."""

    def __init__(self, host: str, port: int, spec: LoadSpec, *, cpu: int | None = None) -> None:
        self.spec = spec
        self.argv = self.command(host, port, spec, cpu)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=_drain, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=_drain, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.timed_out = False

    def command(self, host: str, port: int, spec: LoadSpec, cpu: int | None) -> list[str]:
        return load_argv(host, port, spec, cpu=cpu)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` (None: until the run's own deadline); True once it exited."""
        try:
            self.proc.wait(timeout=self.spec.timeout_s if timeout_s is None else timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def finish(self) -> tuple[dict[str, Any] | None, str | None]:
        """Wait for the run to end (stopping it past its deadline); (report, failure)."""
        if not self.wait():
            self.timed_out = True
            self.stop()
        for reader in self._readers:
            reader.join(timeout=5)
        stdout = b"".join(self._out).decode(errors="replace")
        stderr = b"".join(self._err).decode(errors="replace").strip()
        try:
            report = parse_report(stdout)
        except ValueError as exc:
            if self.timed_out:
                return None, f"load did not finish within {self.spec.timeout_s:.0f}s"
            detail = stderr.splitlines()[-1] if stderr else str(exc)
            return None, f"load exited with status {self.proc.returncode}: {detail}"
        if isinstance(report.get("error"), str):  # a failed run still prints its JSON
            return None, f"load failed: {report['error']}"
        failure = f"load stopped after {self.spec.timeout_s:.0f}s" if self.timed_out else None
        return report, failure

    def stop(self) -> None:
        """SIGINT (a load generator may print what it has), then SIGKILL its session."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _drain(stream: Any, chunks: list[bytes]) -> None:
    try:
        for chunk in iter(lambda: stream.read(65536), b""):
            chunks.append(chunk)
    finally:
        stream.close()
