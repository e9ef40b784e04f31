"""Logs that tell the truth at a stop: every rejection accounted for, even those the
once-a-second throttle held back, and a second signal named as what cut the drain."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
from contextlib import ExitStack

import pytest

from .procs import Server

pytestmark = pytest.mark.timeout(60)


def rejections_logged(log: str) -> int:
    """Rejections the log accounts for: the lines that name one, the counts they say
    were held back since, and the counts flushed at the stop."""
    named = len(re.findall(r"rejected \S+: over max-connections", log))
    held_back = sum(map(int, re.findall(r"\((\d+) more rejected since", log)))
    flushed = sum(map(int, re.findall(r"rejected (\d+) more over max-connections", log)))
    return named + held_back + flushed


@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_every_rejection_is_in_the_log_by_the_time_the_server_has_stopped(mode: str) -> None:
    with (
        Server("--workers", "2", "--max-connections", "5", mode=mode) as server,
        ExitStack() as stack,
    ):
        held = [
            stack.enter_context(socket.create_connection(server.address, timeout=10))
            for _ in range(5)
        ]
        for sock in held:  # each is served: the five slots are taken
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        for _ in range(3):
            with socket.create_connection(server.address, timeout=10) as extra:
                with contextlib.suppress(ConnectionResetError):
                    assert extra.recv(1) == b""  # closed at once, unserved
        server.wait_for_stderr(r"rejected \S+: over max-connections")
        stack.close()
        assert server.stop() == 0
    assert rejections_logged(server.stderr) == 3, server.stderr


def test_a_second_signal_is_named_as_what_skipped_the_drain() -> None:
    with Server("--drain-timeout", "60") as server:
        with socket.create_connection(server.address, timeout=10) as idle:
            idle.sendall(b"x")
            assert idle.recv(1) == b"x"
            server.signal(signal.SIGTERM)
            server.wait_for_stderr("stopping: no new connections")
            server.signal(signal.SIGTERM)
            server.wait_for_stderr(
                r"a second stop request skipped the drain: closing 1 open connection\(s\)"
            )
            assert server.wait() == 0
    assert "drain timeout" not in server.stderr
