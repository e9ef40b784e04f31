"""The traffic patterns of `echoplex load`: one class each, and the registry of them.

A pattern carries what the rest of the load generator asks of it: its name and what it
does (the `--pattern` choices and help), whether it runs over UDP and why not, its
connection classes, the settings that belong to it alone and the checks on them, how
it is timed (`scheduled`, `holds`), and its part of the summary's heading. The config
checks a run against it, the engine builds its connections and picks its timeline from
it, the report and the JSON describe it from it. A new pattern is one class here, its
connection class (`connections`, and `datagrams` for UDP) and one line in PATTERNS.

Connection classes are named, not imported (as uvicorn names its loop and protocol
classes by import string): the config needs this registry to build the command line,
which `echoplex client` and `--help` do without importing asyncio; the engine, which
imports the connection modules anyway, resolves the names (`engine.connection_class`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

DEFAULT_WINDOW_BYTES = 256 * 1024


class Settings(Protocol):
    """The settings a pattern reads (`LoadConfig` has them all)."""

    @property
    def rate_per_s(self) -> float | None: ...
    @property
    def window_bytes(self) -> int: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def warmup_s(self) -> float: ...


class Pattern:
    """What one traffic pattern is. Subclasses set the class attributes; never instantiated."""

    name: ClassVar[str]
    description: ClassVar[str]
    """What it does, for `--help`."""

    connection: ClassVar[str]
    """Its stream connection: a class of `echoplex.load.connections`."""

    datagram_connection: ClassVar[str | None] = None
    """Its UDP connection, a class of `echoplex.load.datagrams`; None: not over UDP."""

    not_over_udp: ClassVar[str] = ""
    """Why not over UDP, when there is no datagram connection."""

    own_settings: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    """Settings that apply to this pattern alone, each with its value when unused."""

    scheduled: ClassVar[bool] = False
    """Open loop: the run sends each message when its schedule says (`rate_per_s`)."""

    holds: ClassVar[bool] = False
    """The hold timeline: a round trip as each connection opens, idle for the duration,
    one more round trip; figures cover the whole run."""

    @classmethod
    def problems(cls, settings: Settings) -> list[str]:
        """What is wrong with the settings it owns (as `LoadConfig` words its errors)."""
        return []

    @classmethod
    def uses(cls, setting: str) -> bool:
        return setting in cls.own_settings

    @classmethod
    def connection_arguments(cls, settings: Settings) -> dict[str, Any]:
        """Keyword arguments its connections take beyond (tally, payload, index)."""
        return {}

    @classmethod
    def heading(cls, settings: Settings, measured_s: float) -> list[str]:
        """Its part of the summary's first line, after connections and message size."""
        warmup = f" after {settings.warmup_s:g} s warmup" if settings.warmup_s else ""
        return [f"{measured_s:.2f} s measured{warmup}"]


class PingPongPattern(Pattern):
    name = "pingpong"
    description = (
        "closed loop: each connection sends --size bytes, waits for all of them back, repeats"
    )
    connection = "PingPong"
    datagram_connection = "DatagramPingPong"


class RatePattern(Pattern):
    name = "rate"
    description = (
        "open loop at --rate messages/s in all, sent on schedule whatever comes back, "
        "each connection once every connections/rate seconds (a trickle, with many); "
        "latency from each message's intended send time"
    )
    connection = "Rate"
    datagram_connection = "DatagramRate"
    own_settings = MappingProxyType({"rate_per_s": None})
    scheduled = True

    @classmethod
    def problems(cls, settings: Settings) -> list[str]:
        rate = settings.rate_per_s
        if rate is None:
            return ["`pattern` rate needs `rate_per_s` MESSAGES_PER_S"]
        if not 0 < rate < math.inf:
            return [f"`rate_per_s` must be more than 0 messages/s, not {rate}"]
        return []

    @classmethod
    def heading(cls, settings: Settings, measured_s: float) -> list[str]:
        return [f"{settings.rate_per_s:,g} messages/s due", *super().heading(settings, measured_s)]


class StreamPattern(Pattern):
    name = "stream"
    description = "each connection keeps --window bytes in flight: bulk throughput"
    connection = "Stream"
    not_over_udp = "UDP has no byte stream to keep a window of bytes in flight on"
    own_settings = MappingProxyType({"window_bytes": DEFAULT_WINDOW_BYTES})

    @classmethod
    def problems(cls, settings: Settings) -> list[str]:
        if settings.window_bytes < 1:
            return [f"`window_bytes` must be at least 1 byte, not {settings.window_bytes}"]
        return []

    @classmethod
    def connection_arguments(cls, settings: Settings) -> dict[str, Any]:
        return {"window": settings.window_bytes}

    @classmethod
    def heading(cls, settings: Settings, measured_s: float) -> list[str]:
        return [f"{settings.window_bytes:,} B window", *super().heading(settings, measured_s)]


class HoldPattern(Pattern):
    name = "hold"
    description = (
        "open -c connections, one round trip each, hold them idle for --duration, "
        "one more round trip: how many stay alive"
    )
    connection = "Hold"
    not_over_udp = "UDP has no connections to hold open"
    holds = True

    @classmethod
    def heading(cls, settings: Settings, measured_s: float) -> list[str]:
        return [f"held {settings.duration_s:g} s"]


PATTERNS: dict[str, type[Pattern]] = {
    pattern.name: pattern for pattern in (PingPongPattern, RatePattern, StreamPattern, HoldPattern)
}
UDP_PATTERNS = tuple(name for name, pattern in PATTERNS.items() if pattern.datagram_connection)

__all__ = ["DEFAULT_WINDOW_BYTES", "PATTERNS", "UDP_PATTERNS", "Pattern", "Settings"]
