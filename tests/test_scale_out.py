"""Scale-out: real HAProxy in front of three echoplex instances, one stopped mid-load.

HAProxy (PROXY v2 to the servers, a health check every 200 ms) balances a
`echoplex load` run round robin over three `asyncio` servers. About a second into
the run one server gets SIGTERM: it stops listening, drains for half a second (the
ping-pong load never finishes on its own, so the drain always runs out), then cuts
its connections. What that must look like, and why the error count is exact:

- `echoplex load` does not reconnect: a connection that fails is counted once (the
  first `connection_lost` or failure moves it out of the `open` state) and never used
  again. HAProxy does not move an established connection to another server either
  (`redispatch` is only about connecting). So each client connection that HAProxy had
  put on the stopped server fails exactly once, and no other one does: the load's
  `errors` equals the connections the stopped server logged as `open ... via`.
- The load opens all its connections before the stop, so none is sent to the stopped
  server's closed listener; HAProxy's health check marks it DOWN anyway.
- A cut can only lose bytes, never change them: every echo that did come back, on
  every connection, is verified, so `mismatches` is 0.
- The other connections go on: each of HAProxy's sessions to the survivors echoes
  more bytes after the stop than before it (`show sess all` running totals), and the
  surviving servers' close lines show the bytes they echoed and a clean close.

The two halves of the count come from different witnesses (the stopped server's log,
and the load's own report), and HAProxy's session table at the moment of the stop is a
third: all three must agree.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time

import pytest

from .haproxy import HAProxy, haproxy
from .procs import Process, Server

CONNECTIONS = 12
SIZE = 1024
DURATION_S = 4
STOP_AFTER_S = 1.0
DRAIN_S = 0.5
SERVER_ARGS = (
    "--proxy-protocol",
    "--trusted-proxy",
    "127.0.0.0/8",
    "--drain-timeout",
    str(DRAIN_S),
)
# A proxied load connection: `open CLIENT via HAPROXY`. HAProxy's health checks carry a
# PROXY v2 LOCAL header, which names no client: they are logged without `via`.
OPEN_VIA = re.compile(r"open (\S+) via (\S+)")
CLOSE = re.compile(r"close (\S+) in=(\d+) out=(\d+) duration=\S+ outcome=(\S+)")
LOAD_ARGV = [
    sys.executable,
    "-m",
    "echoplex",
    "load",
    "--host",
    "127.0.0.1",
    "--pattern",
    "pingpong",
    "-c",
    str(CONNECTIONS),
    "-s",
    str(SIZE),
    "-d",
    str(DURATION_S),
    "--json",
]


def proxied_connections(server: Server) -> dict[str, tuple[int, int, str] | None]:
    """The load's connections to `server`, by client address: (in, out, outcome) once
    closed, None while open."""
    peers: dict[str, tuple[int, int, str] | None] = {}
    for line in server.stderr_seen:
        if match := OPEN_VIA.search(line):
            peers[match.group(1)] = None
        elif (match := CLOSE.search(line)) and match.group(1) in peers:
            peers[match.group(1)] = (int(match.group(2)), int(match.group(3)), match.group(4))
    return peers


def wait_for_connections(servers: list[Server], count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(proxied_connections(s)) for s in servers) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"the load did not open {count} connections through HAProxy")
        time.sleep(0.01)


SESSION = re.compile(r"^0x[0-9a-f]+: ", re.MULTILINE)
SESSION_SERVER = re.compile(r"\bserver=(\S+) ")
SESSION_SOURCE = re.compile(r"\bsource=(\S+)")
ECHOED_TOTAL = re.compile(r"\bres=\S+ \(.*\btotal=(\d+)\)")


def echoed_by_session(proxy: HAProxy) -> dict[str, tuple[str, int]]:
    """HAProxy's open client sessions, by client address: (server, bytes sent back to
    the client so far). `show stat` byte counters only move when a TCP session ends;
    `show sess all` has each session's running totals."""
    text = proxy.command("show sess all")
    sessions = {}
    for block in SESSION.split(text):
        server, source, total = (
            SESSION_SERVER.search(block),
            SESSION_SOURCE.search(block),
            ECHOED_TOTAL.search(block),
        )
        if server and source and total and f"frontend={proxy.frontend} " in block:
            sessions[source.group(1)] = (server.group(1), int(total.group(1)))
    return sessions


def test_the_others_take_over_when_one_instance_stops() -> None:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(*SERVER_ARGS, mode="asyncio")) for _ in range(3)]
        proxy = stack.enter_context(
            haproxy([s.address for s in servers], send_proxy_v2=True, health_check=True)
        )
        proxy.wait_for_status("UP")
        load = stack.enter_context(Process([*LOAD_ARGV, "--port", str(proxy.port)]))
        wait_for_connections(servers, CONNECTIONS)
        measuring_since = time.monotonic()  # traffic starts once every connection is open
        time.sleep(STOP_AFTER_S)

        stopped, survivors = servers[1], [servers[0], servers[2]]
        on_stopped = len(proxied_connections(stopped))
        at_stop = echoed_by_session(proxy)
        assert stopped.stop() == 0
        proxy.wait_for_status({"s1": "UP", "s2": "DOWN", "s3": "UP"})
        time.sleep(max(0.0, measuring_since + DURATION_S - 0.5 - time.monotonic()))
        near_end = echoed_by_session(proxy)

        assert load.wait(timeout_s=DURATION_S + 15) == 1  # errors make the status 1
        result = json.loads(load.stdout)

        # HAProxy had as many sessions on s2 as s2 logged, and those were cut by its
        # drain; every session on the others kept echoing after the stop.
        assert sorted(server for server, _ in at_stop.values()) == sorted(
            ["s1", "s3", "s2"] * (CONNECTIONS // 3)
        )
        assert on_stopped == sum(server == "s2" for server, _ in at_stop.values()) > 0
        assert {server for server, _ in near_end.values()} == {"s1", "s3"}
        assert len(near_end) == CONNECTIONS - on_stopped
        for client, (server, echoed) in near_end.items():
            assert echoed > at_stop[client][1], f"{client} on {server} stalled after the stop"
        cut = proxied_connections(stopped)
        assert len(cut) == on_stopped
        assert [record and record[2] for record in cut.values()] == ["drained"] * on_stopped

        # The load: one error per connection cut, nothing else, every echo right.
        assert result["connections_opened"] == CONNECTIONS
        assert result["errors"] == on_stopped, result["error_samples"]
        assert result["connections_alive"] == CONNECTIONS - on_stopped
        assert result["mismatches"] == 0
        assert result["requests"] > 0

        for survivor in survivors:
            assert survivor.stop() == 0
            served = proxied_connections(survivor)
            assert len(served) == CONNECTIONS // 3
            for record in served.values():
                assert record is not None
                bytes_in, bytes_out, outcome = record
                assert bytes_in == bytes_out > 0
                assert outcome == "closed"

        before = sum(echoed for _, echoed in at_stop.values()) // SIZE
        after = sum(echoed - at_stop[client][1] for client, (_, echoed) in near_end.items())
        print(
            f"\nscale-out: {on_stopped} connections on the stopped instance, "
            f"{result['errors']} load errors {result['errors_by_kind']}, "
            f"{result['mismatches']} mismatches, {result['requests']} requests verified; "
            f"~{before} echoes before SIGTERM, ~{after // SIZE} by the survivors "
            f"from SIGTERM to 0.5 s before the end"
        )
