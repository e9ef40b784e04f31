"""HAProxy in front of test servers: a real TCP proxy for integration tests.

`haproxy(backends, ...)` writes a configuration into a fresh temporary directory,
runs `haproxy -f CONFIG -db` (foreground) with its output captured, waits until the
frontend listens, yields a `HAProxy` and stops it on exit:

    with Server(mode="asyncio") as a, Server(mode="asyncio") as b:
        with haproxy([a.address, b.address], send_proxy_v2=True) as proxy:
            with socket.create_connection(proxy.address) as sock: ...

The configuration is one TCP frontend on 127.0.0.1 and one backend, `balance
roundrobin`, servers named `s1`, `s2`, ... in the order given; `timeout connect 2s`,
`timeout client/server 30s`. Options:

- `send_proxy` / `send_proxy_v2`: the servers get a PROXY v1 / v2 header naming the
  client. HAProxy's health checks to such a server carry a header too (v2: a `LOCAL`
  command with no addresses), so a server that requires one from HAProxy's address
  keeps passing them.
- `health_check`: `check inter 200ms fall 1 rise 1`, a TCP connect; with
  `check_payload` the check also sends those bytes and expects them echoed back
  (`tcp-check send-binary` / `expect binary`). Servers start UP; a failed check marks
  one DOWN within about `check_interval_ms`, and `wait_for_status` waits for that.
- `proxy_v2_options`: HAProxy's `proxy-v2-options` (TLVs such as `crc32c`,
  `unique-id`, `authority`) on every server line.

The frontend socket is bound and listening before HAProxy starts: the test binds
port 0 and HAProxy inherits the socket (`bind fd@N`). HAProxy cannot bind port 0 and
report the port, and a port picked and closed for it to bind could be taken first.
Readiness comes from HAProxy's runtime API (a stats socket in the temporary
directory): the frontend reports `OPEN` once HAProxy serves it. Probing the frontend
with a connection instead would be forwarded to a backend and show up in its logs.

Connection logs (`option tcplog`) go to HAProxy's stdout, warnings such as
"Server backend/s2 is DOWN" to its stderr; `output` has both.
"""

from __future__ import annotations

import contextlib
import csv
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .procs import Process, require_tool
from .waiting import wait_for

HOST = "127.0.0.1"
FRONTEND = "echo_in"
BACKEND = "echo_servers"
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass
class HAProxy:
    """A running HAProxy: where its frontend listens, its output, its runtime API."""

    process: Process
    port: int
    config_path: Path
    stats_socket: Path
    server_names: list[str]
    host: str = HOST
    backend: str = BACKEND
    frontend: str = FRONTEND
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def config(self) -> str:
        return self.config_path.read_text()

    @property
    def stdout(self) -> str:
        """Connection log lines (`option tcplog`), one per finished connection."""
        return self.process.stdout

    @property
    def stderr(self) -> str:
        """Alerts and warnings, server state changes among them."""
        return self.process.stderr

    @property
    def output(self) -> str:
        return self.process.stdout + self.process.stderr

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout_s: float = 10.0
    ) -> re.Match[str]:
        """The first match of `pattern` in a line of stdout or stderr; fails the test
        if none appears in time."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def found() -> re.Match[str] | None:
            lines = [*self.process.stdout_seen, *self.process.stderr_seen]
            return next((match for line in lines if (match := regex.search(line))), None)

        return wait_for(
            found,
            timeout_s,
            lambda: f"{regex.pattern!r} in HAProxy's output: {self.output[-3000:]}",
        )

    def command(self, line: str, timeout_s: float = 5.0) -> str:
        """One runtime API command (`show stat`, `disable server echo_servers/s1`...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> list[dict[str, str]]:
        """`show stat` as rows keyed by its CSV columns (pxname, svname, status, stot...)."""
        text = self.command("show stat")
        lines = text.lstrip("# ").splitlines()
        return [row for row in csv.DictReader(lines) if row.get("svname")]

    def server_stats(self) -> dict[str, dict[str, str]]:
        """The backend's servers by name (`s1`...), each its `show stat` row."""
        return {
            row["svname"]: row
            for row in self.stats()
            if row["pxname"] == self.backend and row["svname"] in self.server_names
        }

    def server_status(self) -> dict[str, str]:
        """Each server's status: `UP`, `DOWN`, `no check`, `MAINT`, or a transition
        such as `UP 1/2`."""
        return {name: row["status"] for name, row in self.server_stats().items()}

    def wait_for_status(
        self, expected: Mapping[str, str] | str, timeout_s: float = 10.0
    ) -> dict[str, str]:
        """Wait until servers have the given status (one for all, or by name)."""
        wanted = (
            dict.fromkeys(self.server_names, expected)
            if isinstance(expected, str)
            else dict(expected)
        )
        status: dict[str, str] = {}

        def reached() -> bool:
            nonlocal status
            status = self.server_status()
            return all(status.get(name) == state for name, state in wanted.items())

        wait_for(
            reached,
            timeout_s,
            lambda: f"servers {status}, not {wanted}; HAProxy output: {self.output[-2000:]}",
        )
        return status

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (HAProxy's immediate stop), a bounded wait, then SIGKILL. Returns the
        exit status (negative: the signal that ended it)."""
        if self._stopped:
            return self.process.proc.returncode
        self._stopped = True
        self.process.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.proc.wait(timeout=timeout_s)
        code = self.process.proc.poll()
        self.process.kill()  # SIGKILL if still running; joins the output readers
        return code


def frontend_socket(host: str = HOST) -> socket.socket:
    """A socket listening on a free port, for HAProxy to inherit (`bind fd@N`)."""
    return socket.create_server((host, 0))


def render_config(
    *,
    frontend_fd: int,
    backends: Sequence[tuple[str, int]],
    stats_socket: Path,
    send_proxy: bool = False,
    send_proxy_v2: bool = False,
    health_check: bool = False,
    check_payload: bytes | None = None,
    check_interval_ms: int = 200,
    proxy_v2_options: Sequence[str] = (),
) -> str:
    """The configuration `haproxy()` runs; see the module docstring."""
    if send_proxy and send_proxy_v2:
        raise ValueError("send_proxy (v1) and send_proxy_v2 are exclusive")
    if check_payload is not None and not health_check:
        raise ValueError("check_payload needs health_check=True")
    if check_payload == b"":
        raise ValueError("check_payload must not be empty")
    server_options = ""
    if health_check:
        server_options += f" check inter {check_interval_ms}ms fall 1 rise 1"
    if send_proxy:
        server_options += " send-proxy"
    if send_proxy_v2:
        server_options += " send-proxy-v2"
    if proxy_v2_options:
        if not send_proxy_v2:
            raise ValueError("proxy_v2_options needs send_proxy_v2=True")
        server_options += f" proxy-v2-options {','.join(proxy_v2_options)}"
    check_rules = []
    if check_payload is not None:
        # No explicit `tcp-check connect`: the implicit one uses the server's settings,
        # send-proxy-v2 included; an explicit one would connect without the header.
        check_rules = [
            "    option tcp-check",
            f"    tcp-check send-binary {check_payload.hex()}",
            f"    tcp-check expect binary {check_payload.hex()}",
        ]
    servers = [
        f"    server s{index} {host}:{port}{server_options}"
        for index, (host, port) in enumerate(backends, start=1)
    ]
    return "\n".join(
        [
            "global",
            f"    stats socket {stats_socket} mode 600 level admin",
            "    log stdout format raw local0 info",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    timeout check 2s",
            "",
            f"frontend {FRONTEND}",
            f"    bind fd@{frontend_fd}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            "    balance roundrobin",
            *check_rules,
            *servers,
            "",
        ]
    )


@contextlib.contextmanager
def haproxy(
    backends: Sequence[tuple[str, int]],
    *,
    send_proxy: bool = False,
    send_proxy_v2: bool = False,
    health_check: bool = False,
    check_payload: bytes | None = None,
    check_interval_ms: int = 200,
    proxy_v2_options: Sequence[str] = (),
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[HAProxy]:
    """HAProxy in front of `backends`, ready; stopped on exit. Skips the test when
    haproxy is not installed (fails under CI=true)."""
    if not backends:
        raise ValueError("HAProxy needs at least one backend server")
    binary = require_tool("haproxy")
    # A short directory: the stats socket's path must fit in sun_path (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="echoplex-haproxy-", dir="/tmp"))
    try:
        with frontend_socket() as frontend:
            config_path = directory / "haproxy.cfg"
            stats_socket = directory / "admin.sock"
            config = render_config(
                frontend_fd=frontend.fileno(),
                backends=backends,
                stats_socket=stats_socket,
                send_proxy=send_proxy,
                send_proxy_v2=send_proxy_v2,
                health_check=health_check,
                check_payload=check_payload,
                check_interval_ms=check_interval_ms,
                proxy_v2_options=proxy_v2_options,
            )
            config_path.write_text(config)
            server_names = [f"s{index}" for index in range(1, len(backends) + 1)]
            proxy = start(binary, config_path, frontend, stats_socket, server_names)
        try:
            wait_until_open(proxy, startup_timeout_s)
            yield proxy
        finally:
            proxy.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start(
    binary: str,
    config_path: Path,
    frontend: socket.socket,
    stats_socket: Path,
    server_names: list[str],
    *,
    backend: str = BACKEND,
    frontend_name: str = FRONTEND,
) -> HAProxy:
    """`haproxy -f CONFIG -db` in the foreground, inheriting `frontend` (its config binds
    `fd@N`, N being `frontend.fileno()`). The caller may close its copy once this returns."""
    process = Process(
        [binary, "-f", str(config_path), "-db"],
        cwd=config_path.parent,
        pass_fds=[frontend.fileno()],
    )
    host, port = frontend.getsockname()[:2]
    return HAProxy(
        process=process,
        port=port,
        config_path=config_path,
        stats_socket=stats_socket,
        server_names=server_names,
        host=host,
        backend=backend,
        frontend=frontend_name,
    )


def wait_until_open(proxy: HAProxy, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the runtime API reports the frontend `OPEN`; fails the test at once if
    HAProxy exits (a bad config, say), with its output."""

    def frontend_open() -> bool:
        if proxy.process.proc.poll() is not None:
            pytest.fail(f"HAProxy exited; config:\n{proxy.config}\noutput: {proxy.output}")
        try:
            rows = proxy.stats()
        except OSError:  # the stats socket is not there or not answering yet
            return False
        frontend = (proxy.frontend, "FRONTEND", "OPEN")
        return any((row["pxname"], row["svname"], row["status"]) == frontend for row in rows)

    wait_for(frontend_open, timeout_s, lambda: f"HAProxy listening: {proxy.output[-2000:]}")
