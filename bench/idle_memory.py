"""What an idle connection costs a server, measured two ways (issue 22, item 3).

    .venv/bin/python bench/idle_memory.py [-c 10000] [--runs 3] [--servers asyncio,ref-uvloop]

For each run and each server (alternating, so drift hits both alike), it starts the
server as the bench does (`echoplex serve --mode asyncio --log-level info`, or the
bench's reference echo `echoplex/bench/baselines/protocol_echo.py 0 uvloop`), opens
`-c` connections to it from this process, each with one 64-byte round trip (as the
bench's `hold` point: the server has served each one), and then reads:

- rss: the growth of the server's VmRSS (/proc/PID/status) from before the first
  connection to when all are held, per connection;
- traced: the growth of the server's Python allocations by tracemalloc, per
  connection, in a second launch of the same server with tracemalloc started before
  anything is imported (`--top N` prints the allocation sites that grew most).

It prints one line per launch and the medians, and each server's ratio to the first
server's median. Both sides need about `-c` descriptors: the soft limit is raised to the
hard one (20,000 here), so `-c` can go to about 19,000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import runpy
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

BASELINES = Path(__file__).resolve().parent.parent / "echoplex" / "bench" / "baselines"
SERVERS = {
    "asyncio": [
        *("-m", "echoplex", "serve", "--mode", "asyncio"),
        *("--host", "127.0.0.1", "--port", "0", "--log-level", "info"),
    ],
    "ref-uvloop": [str(BASELINES / "protocol_echo.py"), "0", "uvloop"],
}
MESSAGE = bytes(range(64))
LISTENING = re.compile(rb"listening on (?:[\w.]+ )?\[?([\d.:]+?)\]?:(\d+)")
SETTLE_S = 1.0  # after the last round trip: let the server finish logging and freeing


class Server:
    """One launch of a server, its log in a file (a pipe left unread would stall it)."""

    def __init__(self, argv: list[str], traced: bool) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        wrapper = [__file__, "--traced-server", "--"] if traced else []
        self.process = subprocess.Popen(
            [sys.executable, *wrapper, *argv],
            stdin=subprocess.PIPE if traced else subprocess.DEVNULL,
            stdout=subprocess.PIPE if traced else subprocess.DEVNULL,
            stderr=self.log,
        )
        self.port = self._wait_listening()

    def _wait_listening(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.log.seek(0)
            found = LISTENING.search(self.log.read(65536))
            if found:
                return int(found.group(2))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        raise RuntimeError(f"server did not start: {self.log.read()[-500:]!r}")

    def traced_bytes(self, top: int) -> tuple[int, str]:
        """The traced memory now and, against the last call, the sites that grew most."""
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{top}\n".encode())
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["current"], answer["top"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Load:
    """`echoplex load --pattern hold`, as the bench's `hold` point runs it: every
    connection opened at once, one round trip each, then held."""

    def __init__(self, port: int, count: int) -> None:
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "echoplex", "load", "--port", str(port)),
                *("--pattern", "hold", "-c", str(count), "-s", "64", "-d", "3600s"),
                *("--timeout", "120s"),
            ],
            stdout=subprocess.DEVNULL,
        )

    def wait_held(self, server_pid: int, wanted_fds: int, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while _open_fds(server_pid) < wanted_fds:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the server holds {_open_fds(server_pid)} descriptors")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def _warm_up(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(MESSAGE)
        got = b""
        while len(got) < len(MESSAGE):
            chunk = conn.recv(64)
            if not chunk:
                raise RuntimeError("closed before its echo")
            got += chunk


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def measure(name: str, count: int, traced: bool, top: int) -> tuple[dict[str, float], str]:
    """Bytes per held connection: the VmRSS and VmHWM (peak) growth, or the traced
    growth; and the sites that grew most."""
    server = Server(SERVERS[name], traced)
    pid = server.process.pid
    load = None
    try:
        _warm_up(server.port)  # the first connection's code paths, imports, caches
        time.sleep(SETTLE_S)
        before_fds = _open_fds(pid)
        if traced:
            before = {"traced": server.traced_bytes(0)[0]}
        else:
            before = {"rss": _status_kib(pid, "VmRSS") * 1024}
        load = Load(server.port, count)
        load.wait_held(pid, before_fds + count)
        time.sleep(SETTLE_S)
        if traced:
            after, sites = server.traced_bytes(top)
            return {"traced": (after - before["traced"]) / count}, sites
        rss, hwm = (_status_kib(pid, field) * 1024 for field in ("VmRSS", "VmHWM"))
        return {"rss": (rss - before["rss"]) / count, "hwm": (hwm - before["rss"]) / count}, ""
    finally:
        if load is not None:
            load.stop()
        server.stop()


def _traced_server(argv: list[str]) -> None:
    """Run a server with tracemalloc on; each line on stdin asks for the traced
    memory now and the N sites that grew most since the last ask."""
    tracemalloc.start(8)
    last: list[tracemalloc.Snapshot] = []

    def answer() -> None:
        for line in sys.stdin:
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            top = int(line)
            sites = ""
            if last and top:
                stats = snapshot.compare_to(last[-1], "traceback")[:top]
                sites = "\n".join(
                    f"{stat.size_diff:+10,d} B {stat.count_diff:+7,d} blocks\n    "
                    + "\n    ".join(stat.traceback.format()[-6:])
                    for stat in stats
                )
            last[:] = [snapshot]
            current = tracemalloc.get_traced_memory()[0]
            print(json.dumps({"current": current, "top": sites}), flush=True)

    threading.Thread(target=answer, daemon=True).start()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced-server":
        _traced_server(sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--connections", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", default="asyncio,ref-uvloop")
    parser.add_argument("--methods", default="rss,traced")
    parser.add_argument("--top", type=int, default=0, help="print the N sites that grew most")
    args = parser.parse_args()
    names = args.servers.split(",")
    if unknown := set(names) - set(SERVERS):
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
    figures: dict[tuple[str, str], list[float]] = {}
    methods = args.methods.split(",")
    for run in range(args.runs):
        for method in methods:
            for name in names:
                per_conn, sites = measure(name, args.connections, method == "traced", args.top)
                for figure, value in per_conn.items():
                    figures.setdefault((figure, name), []).append(value)
                shown = "  ".join(f"{figure} {value:6.0f} B" for figure, value in per_conn.items())
                print(f"run {run + 1} {name:10} {shown}  per connection", flush=True)
                if sites:
                    print(sites, flush=True)
    print(f"\nmedians of {args.runs} at {args.connections:,} connections:")
    for figure in ("rss", "hwm", "traced"):
        if (figure, names[-1]) not in figures:
            continue
        reference = statistics.median(figures[(figure, names[-1])])
        for name in names:
            median = statistics.median(figures[(figure, name)])
            print(
                f"  {figure:6} {name:10} {median:6.0f} B = {median / 1024:.2f} KiB"
                f"  ({median / reference:.2f}x {names[-1]})"
            )


if __name__ == "__main__":
    main()
