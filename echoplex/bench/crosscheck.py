"""`echoplex bench --cross-check`: a second load generator that shares no code with
`echoplex load`, to check that the bench's figures are the servers', not its own.

The generator is `crosscheck.c`, a one-thread epoll ping-pong client in C that checks
every echoed byte and prints a JSON object with the fields the bench reads from
`echoplex load --json`. Its source ships in the package (a wheel is pure Python, so
it carries no binary), and it is compiled with the system's `cc` on first use into
the user's cache directory (`$XDG_CACHE_HOME/echoplex`, else `~/.cache/echoplex`;
the package's own directory may be read-only), under a name that holds the hash of
the source, so an updated source is rebuilt and a stale binary never runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .loadgen import LoadRun, LoadSpec

SOURCE = Path(__file__).with_name("crosscheck.c")
COMPILE_FLAGS = ("-O2", "-Wall", "-Wextra")
COMPILE_TIMEOUT_S = 120.0
# The patterns the C client plays: ping-pong only.
PATTERNS = ("pingpong",)
GENERATOR = "C client"


class CrossCheckUnavailable(Exception):
    """The C client cannot be built here; the message says why in one line."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "echoplex"


def build(cache: Path | None = None) -> Path:
    """The compiled client, built with `cc` unless the cache already has this source's."""
    compiler = shutil.which("cc")
    if compiler is None:
        raise CrossCheckUnavailable(
            "--cross-check needs a C compiler and none is installed (no `cc` on PATH: "
            "apt-get install gcc, or dnf install gcc)"
        )
    source = SOURCE.read_bytes()
    cache = cache if cache is not None else cache_dir()
    binary = cache / f"echoplex-crosscheck-{hashlib.sha256(source).hexdigest()[:16]}"
    if os.access(binary, os.X_OK):
        return binary
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name, then renamed: two benches building at once
        # never run a half-written binary.
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            output = Path(scratch) / binary.name
            compiled = subprocess.run(
                [compiler, *COMPILE_FLAGS, "-o", str(output), str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
                check=False,
            )
            if compiled.returncode != 0:
                first = next(iter(compiled.stderr.strip().splitlines()), "no message")
                raise CrossCheckUnavailable(f"cc could not build {SOURCE.name}: {first}")
            os.replace(output, binary)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CrossCheckUnavailable(
            f"cannot build the cross-check client in {cache}: {exc}"
        ) from None
    return binary


class CrossCheckRun(LoadRun):
    """One run of the C client: the same interface and report as `echoplex load`'s."""

    def __init__(
        self, binary: Path, host: str, port: int, spec: LoadSpec, *, cpu: int | None = None
    ) -> None:
        self.binary = binary
        super().__init__(host, port, spec, cpu=cpu)

    def command(self, host: str, port: int, spec: LoadSpec, cpu: int | None) -> list[str]:
        argv = [
            str(self.binary),
            host,
            str(port),
            str(spec.connections),
            str(spec.size_bytes),
            f"{spec.duration_s:g}",
            f"{spec.warmup_s:g}",
        ]
        return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv
