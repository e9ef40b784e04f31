"""Scale-out: real HAProxy in front of three echoplex instances, one stopped mid-load.

HAProxy (PROXY v2 to the servers, a health check every 200 ms) balances a
`echoplex load` run round robin over three `asyncio` servers. Once every connection
has echoed, one server gets SIGTERM: it stops listening, drains for half a second (the
ping-pong load never finishes on its own, so the drain always runs out), then cuts
its connections. Once every other connection has echoed again, the test stops the
load (SIGINT: it ends early and still reports). Each step waits for what HAProxy's
session table shows, not for a time. What that must look like, and why the error
count is exact:

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
import signal
import sys
from collections.abc import Callable

import pytest

from .haproxy import HAProxy, haproxy
from .procs import Process, Server
from .waiting import wait_for

CONNECTIONS = 12
SIZE = 1024
# Longer than the test runs: the test stops the load once it has seen what it needs.
DURATION_S = 120
DRAIN_S = 0.5
WAIT_S = 15.0
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
    wait_for(
        lambda: sum(len(proxied_connections(s)) for s in servers) >= count,
        timeout_s,
        f"the load's {count} connections through HAProxy",
    )


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


Sessions = dict[str, tuple[str, int]]


def sessions_once(proxy: HAProxy, load: Process, done: Callable[[Sessions], bool]) -> Sessions:
    """HAProxy's sessions (`echoed_by_session`) once `done(sessions)`; fails the test if
    the load ends first."""
    sessions: Sessions = {}

    def seen() -> bool:
        nonlocal sessions
        if load.proc.poll() is not None:
            pytest.fail(f"the load ended early: {load.stdout[-2000:]} {load.stderr[-2000:]}")
        sessions = echoed_by_session(proxy)
        return bool(done(sessions))

    wait_for(seen, WAIT_S, lambda: f"HAProxy's sessions {sessions}")
    return sessions


def every_connection_echoed(sessions: Sessions) -> bool:
    return len(sessions) == CONNECTIONS and all(echoed >= SIZE for _, echoed in sessions.values())


def only_these_echoed_more(before: Sessions) -> Callable[[Sessions], bool]:
    """True of sessions that are exactly those of `before`, each having echoed more."""

    def echoed_more(sessions: Sessions) -> bool:
        grown = (echoed > before[client][1] for client, (_, echoed) in sessions.items())
        return set(sessions) == set(before) and all(grown)

    return echoed_more


def test_the_others_take_over_when_one_instance_stops() -> None:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(*SERVER_ARGS, mode="asyncio")) for _ in range(3)]
        proxy = stack.enter_context(
            haproxy([s.address for s in servers], send_proxy_v2=True, health_check=True)
        )
        proxy.wait_for_status("UP")
        load = stack.enter_context(Process([*LOAD_ARGV, "--port", str(proxy.port)]))
        wait_for_connections(servers, CONNECTIONS)
        # Traffic flows on every connection: each has had an echo back through HAProxy.
        at_stop = sessions_once(proxy, load, every_connection_echoed)

        stopped, survivors = servers[1], [servers[0], servers[2]]
        on_stopped = len(proxied_connections(stopped))
        assert stopped.stop() == 0
        # s2's process has exited: what the others had echoed by then.
        kept = {client: at for client, at in echoed_by_session(proxy).items() if at[0] != "s2"}
        proxy.wait_for_status({"s1": "UP", "s2": "DOWN", "s3": "UP"})
        # The cut sessions are gone, and every other one has echoed more since the stop.
        after_stop = sessions_once(proxy, load, only_these_echoed_more(kept))
        load.signal(signal.SIGINT)
        assert load.wait(timeout_s=WAIT_S) == 1  # errors make the status 1
        result = json.loads(load.stdout)

        # HAProxy had as many sessions on s2 as s2 logged, and those were cut by its
        # drain; every session on the others stayed on its server and kept echoing.
        assert sorted(server for server, _ in at_stop.values()) == sorted(
            ["s1", "s3", "s2"] * (CONNECTIONS // 3)
        )
        assert on_stopped == sum(server == "s2" for server, _ in at_stop.values()) > 0
        assert set(after_stop) == {c for c, (server, _) in at_stop.items() if server != "s2"}
        for client, (server, _) in after_stop.items():
            assert server == at_stop[client][0], f"{client} moved from {at_stop[client][0]}"
        cut = proxied_connections(stopped)
        assert len(cut) == on_stopped
        assert [record and record[2] for record in cut.values()] == ["drained"] * on_stopped

        # The load: one error per connection cut, nothing else, every echo right.
        assert result["interrupted"] is True
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
        print(
            f"\nscale-out: {on_stopped} connections on the stopped instance, "
            f"{result['errors']} load errors {result['errors_by_kind']}, "
            f"{result['mismatches']} mismatches, {result['requests']} requests verified; "
            f"~{before} echoes before SIGTERM"
        )
