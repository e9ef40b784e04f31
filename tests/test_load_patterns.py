"""The registry of load patterns: every entry resolves to its connection classes, the
config checks each pattern's own settings from it, and a pattern added to it runs with
no other change, against a real server."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from echoplex.load import engine, report
from echoplex.load.config import LoadConfig
from echoplex.load.connections import LoadConnection
from echoplex.load.datagrams import DatagramConnection
from echoplex.load.patterns import PATTERNS, UDP_PATTERNS, Pattern

from .procs import Server
from .test_load import load_json
from .test_load_source import CountingServer


@pytest.mark.parametrize("name", list(PATTERNS))
def test_each_pattern_names_real_connection_classes(name: str) -> None:
    pattern = PATTERNS[name]
    assert pattern.name == name
    assert issubclass(engine.connection_class(pattern, udp=False), LoadConnection)
    if pattern.datagram_connection is None:
        assert name not in UDP_PATTERNS and pattern.not_over_udp
        with pytest.raises(ValueError, match="does not go with `udp`"):
            LoadConfig(pattern=name, udp=True)
    else:
        assert name in UDP_PATTERNS
        assert issubclass(engine.connection_class(pattern, udp=True), DatagramConnection)
        assert LoadConfig(pattern=name, udp=True, rate_per_s=1.0 if pattern.scheduled else None)


def test_a_setting_of_one_pattern_is_refused_with_another() -> None:
    with pytest.raises(ValueError, match="`rate_per_s` applies only to `pattern` rate"):
        LoadConfig(pattern="stream", rate_per_s=5.0)
    with pytest.raises(ValueError, match="`window_bytes` applies only to `pattern` stream"):
        LoadConfig(pattern="rate", rate_per_s=5.0, window_bytes=1)
    assert LoadConfig(pattern="stream", window_bytes=1).window_bytes == 1


class TwoChecks(Pattern):
    """A pattern someone adds: hold's timeline, announced under its own name."""

    name = "two-checks"
    description = "one round trip on open, one at the end"
    connection = "Hold"
    holds = True

    @classmethod
    def heading(cls, settings: object, measured_s: float) -> list[str]:
        return ["two checks"]


def test_a_pattern_added_to_the_registry_runs_with_no_other_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PATTERNS, TwoChecks.name, TwoChecks)
    with Server(mode="asyncio") as server:
        config = LoadConfig(port=server.port, pattern="two-checks", connections=3, duration_s=0.1)
        result = engine.run(config)
    assert result.ok and result.requests == 6  # two verified round trips per connection
    assert result.connections_alive == 3
    assert result.to_json()["pattern"] == "two-checks"
    heading = report.format_summary(result).splitlines()[0]
    assert heading.startswith("two-checks · 3 connections · 1,024 B messages · two checks · ")


# --- rate: the trickle -----------------------------------------------------------------


def due_per_connection(connections: int, rate: float, duration_s: float) -> dict[int, int]:
    """What the schedule says: message k of the run (k / rate seconds in) goes on
    connection k mod connections, for every k due before the duration ends."""
    due = math.ceil(int(duration_s * 1e9) / (1e9 / rate))
    return dict(Counter(k % connections for k in range(due)))


@pytest.mark.parametrize(
    ("connections", "rate", "processes"),
    [
        (3, 10.0, 1),  # 10 messages: connection 0 sends 4, the others 3
        (10, 40.0, 1),  # one message per connection every 0.25 s
        (10, 40.0, 2),  # the same, over two processes of 5 connections at 20/s each
    ],
)
def test_rate_gives_each_connection_its_share_of_the_messages(
    capsys: pytest.CaptureFixture[str], connections: int, rate: float, processes: int
) -> None:
    with CountingServer() as server:
        status, report = load_json(
            capsys, server.port, "--pattern", "rate", "--rate", f"{rate:g}",
            "-c", str(connections), "-d", "1", "--size", "64", "--processes", str(processes),
        )  # fmt: skip
        seen = server.ended(connections)
    assert status == 0 and report["ok"], report
    messages = {s.number(connections): len(s.received) // 64 for s in seen}
    if processes == 1:
        assert messages == due_per_connection(connections, rate, 1.0)
    else:  # each process keeps the interval: connections / rate seconds
        assert set(messages.values()) == {int(rate * 1.0 / connections)}
    assert report["requests"] == sum(messages.values())  # every one due in the window
    # The connect phase is timed, for a spread run from the first connect to the last.
    assert report["connect_s"] >= max(part["connect_s"] for part in report["per_process"]) > 0
