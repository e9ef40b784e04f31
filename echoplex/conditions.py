"""Network conditions on purpose (slow, broken, hung) and handler work, as plain logic.

An echo endpoint that misbehaves when asked, as Toxiproxy's toxics make a proxy
misbehave: latency with jitter, a bandwidth cap, sliced writes, a clean close or a reset
after so many bytes, a stall, a slow close, for a share of connections (`toxicity`).
This module holds the rules and no I/O, as `limits` and `proxy_protocol` do; it reads no
clock (every method is given `now`, monotonic seconds), so its tests run on a fake one.

- `Conditions` is the resolved set, validated once: from the config, or from the JSON
  names and text values of the control API (`from_mapping`, `to_mapping`).
- `ConditionDraw`, one per server, draws for each connection whether it gets the
  conditions and the random numbers of its jitter; a seed makes the draws repeatable.
- `Conditions.for_connection` gives a connection its `ConnectionConditions` (None: the
  connection gets none, the default; the driver then skips all of this and echoes as
  it always has), a state machine the TCP driver feeds and obeys:

    received(chunk, now)  every chunk read; then due(now)
    eof(now)              the client half-closed; then due(now)
    due(now)              the actions to take now, in order; call it again at next_at()
    next_at()             when to call due() again (None: only after received/eof)
    may_read(now)         whether to read now (False while stalled or holding enough)

  The actions: `Send(data)` write these bytes; `Close` half-close (FIN after what was
  written), read and discard what follows until `discard_until` or the client's EOF,
  then close (closing with unread input would send RST on Linux); `Reset` abort (RST:
  SO_LINGER 0, `transport.abort()`); `Finish` the client half-closed and has every
  byte back: close as without conditions. After Close, Reset or Finish, nothing more.
- `Conditions.for_datagrams` does the same for UDP, per datagram: when to answer it
  (latency, jitter) or not at all (`drop`).
- `Work` is the handler work of `--work io:D|cpu:D`: done by the handler before each
  chunk's echo, so it holds the model's concurrency, unlike every condition here. It is
  not drawn by `toxicity`: it models the work a real service does for every request.

How the conditions combine, on the echo of one connection:

- A chunk first waits in the delay line: `latency` ± a uniform `jitter` (never below
  0) after it arrived, and never before the chunk ahead of it, so the echo stays in
  order. Reading goes on meanwhile: 10 pipelined chunks come back about `latency` later.
- What leaves the line is then paced (`bandwidth`: at most that many bytes a second;
  pieces of a tenth of a second's worth, each followed by the time it takes at the
  rate, so the rate holds on any scale a client measures) and sliced (pieces of at most
  `slice` bytes, `slice_delay` apart). A delayed chunk is paced and sliced after its
  delay, not during it. A slice is of plaintext: TLS encrypts each piece as written.
- `close_after`, `reset_after` and `stall_after` count bytes of echo, exactly: a piece
  crossing one is cut there, and input beyond `close_after`/`reset_after` is never
  echoed (nor held). A connection ends one way, so those two exclude each other. A
  stall stops the echo and the reading, once, for `stall_for` (None: until a limit such
  as `--idle-timeout` ends it); then both resume. At the same count, the stall comes
  first and the close or reset after it.
- `slow_close` waits that long after the client's EOF once every byte is echoed.
- Held bytes (in the line or waiting for their piece) are bounded: past
  `max_buffer_bytes`, `may_read` is False until the echo catches up.
- `on_held(seconds)`, when set, hears how long each piece handed out in `Send` was
  held: from the arrival of its first byte to `now` (the metrics' histogram of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from ._cli_util import (
    MAX_SECONDS,
    byte_size,
    fraction,
    non_negative_seconds,
    positive_seconds,
    whole_number,
)

__all__ = [
    "CLOSE_AFTER",
    "CLOSE_DISCARD_S",
    "RESET_AFTER",
    "Action",
    "Close",
    "ConditionDraw",
    "ConditionError",
    "Conditions",
    "ConnectionConditions",
    "DatagramConditions",
    "Finish",
    "LiveConditions",
    "Reset",
    "Send",
    "Work",
    "reader",
]

# How a connection the server ended on purpose ended (its outcome's detail, a metric label).
CLOSE_AFTER = "close-after"
RESET_AFTER = "reset-after"

CLOSE_DISCARD_S = 2.0
"""After a close-after FIN, how long the driver reads and discards before it closes
(unless the client's EOF comes first): long enough for a client to see the FIN and
close, bounded so a client that never stops sending cannot keep the connection."""

PACING_QUANTUM_S = 0.1
"""A paced echo leaves in pieces of this much time's worth of bytes (as Toxiproxy's
bandwidth toxic cuts its chunks): smooth at any scale a client measures, and at most
ten timer wakeups a second per connection."""

_MOST_BYTES = 1 << 40  # sizes and counts up to a TiB: a bound, not a use case
_MOST_SHOWN = 60  # characters of a bad value or name an error message repeats
_MOST_MESSAGE = 400  # characters of an error message (the known names take 150)


class ConditionError(ValueError, argparse.ArgumentTypeError):
    """A bad condition or value, in one line naming it. A ValueError, and also the
    error argparse shows as written when `Work.parse` or a reader is an option's type.

    The message is made one short line here, whoever words it: it may quote what a
    client sent (`1s\n` reads as a duration, and the range check repeats it)."""

    def __init__(self, message: str) -> None:
        escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        if len(escaped) > _MOST_MESSAGE:
            escaped = f"{escaped[: _MOST_MESSAGE - 3]}..."
        super().__init__(escaped)


# ---------------------------------------------------------------- values and their words


def _given(value: object) -> str:
    """A bad value as it was given (`2.0` stays `2.0`), in one short line: a huge whole
    number is told by its size (Python will not write one of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a whole number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= _MOST_SHOWN else f"{text[: _MOST_SHOWN - 3]}..."


def _named(key: object) -> str:
    """A name as given, unless it would break the line or run on (then as repr, cut)."""
    text = str(key)
    return text if text.isprintable() and len(text) <= _MOST_SHOWN else _given(text)


def _seconds_written(seconds: float) -> str:
    """Seconds as the duration parser reads them back exactly (`0.2s`, `2s`)."""
    return f"{repr(seconds).removesuffix('.0')}s"


def _number_in(least: float, most: float, *, above_least: bool = False) -> Callable[[Any], Any]:
    def accept(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        in_range = least < value <= most if above_least else least <= value <= most
        return float(value) if in_range else None  # NaN is in no range

    return accept


def _whole_in(least: float, most: float) -> Callable[[Any], Any]:
    def accept(value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value if least <= value <= most else None

    return accept


@dataclass(frozen=True)
class _Kind:
    """What one setting takes: text as the CLI and the API write it (`read`, the
    project's parsers), a value through the API (`accept`: it normalized, or None),
    the words for what it wants, and how it is shown back."""

    read: Callable[[str], Any]
    accept: Callable[[Any], Any]
    wanted: str
    show: Callable[[Any], Any]


_SECONDS = _Kind(
    non_negative_seconds,
    _number_in(0, MAX_SECONDS),
    "0 or more seconds, at most a year",
    _seconds_written,
)
_POSITIVE_SECONDS = _Kind(
    positive_seconds,
    _number_in(0, MAX_SECONDS, above_least=True),
    "more than 0 seconds, at most a year",
    _seconds_written,
)
_RATE = _Kind(
    byte_size(_MOST_BYTES),
    _whole_in(1, _MOST_BYTES),
    "a whole number of bytes a second, 1 or more (64KiB, 1MB)",
    int,
)
_SIZE = _Kind(
    byte_size(_MOST_BYTES),
    _whole_in(1, _MOST_BYTES),
    "a whole number of bytes, 1 or more",
    int,
)
_COUNT = _Kind(
    byte_size(_MOST_BYTES, least=0),
    _whole_in(0, _MOST_BYTES),
    "a whole number of bytes, 0 or more",
    int,
)
_FRACTION = _Kind(fraction("connections"), _number_in(0, 1), "a fraction from 0 to 1", float)
_DROPPED = _Kind(fraction("datagrams"), _number_in(0, 1), "a fraction from 0 to 1", float)
_SEED_MOST = 2**64 - 1
_SEED = _Kind(
    whole_number(0, _SEED_MOST), _whole_in(0, _SEED_MOST), "a whole number, 0 or more", int
)

_SETTING = "echoplex.condition"  # the key of a `_Setting` in a Conditions field's metadata


@dataclass(frozen=True)
class _Setting:
    name: str
    """As the control API and `from_mapping` name it; the CLI flag is it dashed."""
    kind: _Kind
    applies: Literal["tcp", "udp", "both", ""]
    """Which echo it changes ("": it qualifies the others: toxicity, seed)."""


def _setting(
    name: str, kind: _Kind, default: Any, applies: Literal["tcp", "udp", "both", ""]
) -> Any:
    return field(default=default, metadata={_SETTING: _Setting(name, kind, applies)})


# ---------------------------------------------------------------- handler work

WORK_KINDS = ("io", "cpu")


@dataclass(frozen=True, slots=True)
class Work:
    """Work the handler does before each chunk's echo: `io` waits (a blocking call in
    the threaded models, an await in the event-loop ones), `cpu` computes with the GIL
    held, for `seconds`."""

    kind: Literal["io", "cpu"]
    seconds: float

    def __post_init__(self) -> None:
        if self.kind not in WORK_KINDS:
            raise ConditionError(f"`work` must be io:DURATION or cpu:DURATION, not {self.kind!r}")
        if _POSITIVE_SECONDS.accept(self.seconds) is None:
            raise ConditionError(
                f"`work` must last {_POSITIVE_SECONDS.wanted}, not {_given(self.seconds)}"
            )

    @classmethod
    def parse(cls, text: str) -> Work:
        """`io:100ms`, `cpu:20ms` (a duration as every option takes them)."""
        kind, colon, duration = text.partition(":")
        kind = kind.strip().lower()
        if not colon or kind not in WORK_KINDS:
            raise ConditionError(
                f"`work` must be io:DURATION or cpu:DURATION (io:100ms), not {text!r}"
            )
        try:
            seconds = positive_seconds(duration)
        except argparse.ArgumentTypeError as exc:
            raise ConditionError(f"`work` {text!r}: {exc}") from None
        return cls(cast(Literal["io", "cpu"], kind), seconds)

    def __str__(self) -> str:
        return f"{self.kind}:{_seconds_written(self.seconds)}"


_WORK = _Kind(
    Work.parse,
    lambda value: value if isinstance(value, Work) else None,
    "io:DURATION or cpu:DURATION",
    str,
)


# ---------------------------------------------------------------- the set


@dataclass(frozen=True, slots=True)
class Conditions:
    """The conditions a server applies, resolved and checked: None (or 0 for the times)
    is "not set". `Conditions()` is none at all, the default.

    Every value is checked here, whoever built it: a ConditionError names the setting
    as the control API does (`latency`) and the bad value."""

    latency_s: float = _setting("latency", _SECONDS, 0.0, "both")
    jitter_s: float = _setting("jitter", _SECONDS, 0.0, "both")
    bandwidth_bytes_per_s: int | None = _setting("bandwidth", _RATE, None, "tcp")
    slice_bytes: int | None = _setting("slice", _SIZE, None, "tcp")
    slice_delay_s: float = _setting("slice_delay", _SECONDS, 0.0, "tcp")
    close_after_bytes: int | None = _setting("close_after", _COUNT, None, "tcp")
    reset_after_bytes: int | None = _setting("reset_after", _COUNT, None, "tcp")
    stall_after_bytes: int | None = _setting("stall_after", _COUNT, None, "tcp")
    stall_for_s: float | None = _setting("stall_for", _POSITIVE_SECONDS, None, "tcp")
    slow_close_s: float = _setting("slow_close", _SECONDS, 0.0, "tcp")
    toxicity: float = _setting("toxicity", _FRACTION, 1.0, "")
    seed: int | None = _setting("seed", _SEED, None, "")
    work: Work | None = _setting("work", _WORK, None, "")  # noqa: RUF009  (a field(), as above)
    drop: float = _setting("drop", _DROPPED, 0.0, "udp")

    tcp: bool = field(init=False, repr=False, compare=False)
    """Whether any condition changes a stream's echo (else `for_connection` is None)."""
    udp: bool = field(init=False, repr=False, compare=False)
    """Whether any condition changes a datagram's answer (else `for_datagrams` is None)."""

    def __post_init__(self) -> None:
        for config_field, setting in _settings():
            value = getattr(self, config_field.name)
            if value is None and config_field.default is None:
                continue
            accepted = setting.kind.accept(value)
            if accepted is None:
                raise ConditionError(
                    f"`{setting.name}` must be {setting.kind.wanted}, not {_given(value)}"
                )
            object.__setattr__(self, config_field.name, accepted)  # 2 -> 2.0
        self._check_together()
        changed = [setting.applies for setting, _ in self._changed()]
        object.__setattr__(self, "tcp", any(a in ("tcp", "both") for a in changed))
        object.__setattr__(self, "udp", any(a in ("udp", "both") for a in changed))

    def _check_together(self) -> None:
        if self.slice_delay_s and self.slice_bytes is None:
            raise ConditionError("`slice_delay` needs `slice`: it is the time between slices")
        if self.stall_for_s is not None and self.stall_after_bytes is None:
            raise ConditionError("`stall_for` needs `stall_after`: it is how long a stall lasts")
        if self.close_after_bytes is not None and self.reset_after_bytes is not None:
            raise ConditionError(
                "`close_after` and `reset_after` exclude each other: a connection ends one way"
            )

    def check_served(self, *, tcp: bool, udp: bool) -> None:
        """A ConditionError if a condition set changes nothing this server serves (`tcp`,
        `udp`: whether it serves each): accepted, it would be silently without effect.
        The one rule for the config and the control API alike."""
        for setting, _ in self._changed():
            # `work` qualifies nothing over UDP: a datagram is answered with no handler.
            serves = "tcp" if setting.name == "work" else setting.applies
            if serves == "udp" and not udp:
                raise ConditionError(
                    f"`{setting.name}` is a share of UDP datagrams: it needs `udp`"
                    " (this server serves TCP alone)"
                )
            if serves == "tcp" and not tcp:
                raise ConditionError(
                    f"`{setting.name}` changes TCP echo only, and this server serves UDP"
                    " alone (`udp` without `tcp`)"
                )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Conditions:
        """The conditions a JSON object or NAME=VALUE pairs name, with text values as the
        CLI takes them (`{"latency": "200ms", "bandwidth": "64KiB"}`) or numbers (seconds,
        bytes); a name may be dashed (`close-after`); null is "not set"."""
        by_name = {setting.name: config_field.name for config_field, setting in _settings()}
        names = {key: str(key).replace("-", "_") for key in mapping}
        unknown: list[object] = [key for key, name in names.items() if name not in by_name]
        if unknown:
            raise _unknown(unknown)
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            attribute = by_name[names[key]]
            if attribute in values:
                raise ConditionError(f"`{names[key]}` is given twice")
            values[attribute] = _read(names[key], value)
        return cls(**{name: value for name, value in values.items() if value is not None})

    def to_mapping(self) -> dict[str, object]:
        """The conditions set, by name, as `from_mapping` reads them back (durations as
        `0.2s`, sizes in bytes, work as `io:0.1s`); `{}` for none."""
        return {setting.name: setting.kind.show(value) for setting, value in self._changed()}

    @property
    def active(self) -> bool:
        """Whether anything is set that changes how the server answers."""
        return self.tcp or self.udp or self.work is not None

    @property
    def names(self) -> tuple[str, ...]:
        """The stream conditions set, named as their flags (`latency`, `close-after`)."""
        return tuple(name for name, _ in self._stream_settings())

    @property
    def label(self) -> str:
        """The stream conditions set with their values, for a log line:
        `latency=0.2s close-after=100`."""
        return " ".join(f"{name}={value}" for name, value in self._stream_settings())

    def for_connection(
        self, draw: ConditionDraw, now: float, *, max_buffer_bytes: int
    ) -> ConnectionConditions | None:
        """The conditions of a connection opened at `now`, or None when it gets none (no
        stream condition is set, or the draw left it out): the driver then echoes as
        without conditions, at no cost. `max_buffer_bytes` bounds what it holds."""
        if not self.tcp:
            return None
        chosen = draw.draw(self.toxicity)
        if chosen is None:
            return None
        return ConnectionConditions(self, chosen, now, max_buffer_bytes=max_buffer_bytes)

    def for_datagrams(self, draw: ConditionDraw) -> DatagramConditions | None:
        """When to answer each datagram of a UDP socket, or None if nothing changes it."""
        if not self.udp:
            return None
        return DatagramConditions(self, draw.stream())

    def _changed(self) -> list[tuple[_Setting, Any]]:
        return [
            (setting, getattr(self, config_field.name))
            for config_field, setting in _settings()
            if getattr(self, config_field.name) != config_field.default
        ]

    def _stream_settings(self) -> list[tuple[str, str]]:
        return [
            (setting.name.replace("_", "-"), str(setting.kind.show(value)))
            for setting, value in self._changed()
            if setting.applies in ("tcp", "both")
        ]


def _settings() -> list[tuple[dataclasses.Field[Any], _Setting]]:
    return [
        (f, f.metadata[_SETTING]) for f in dataclasses.fields(Conditions) if _SETTING in f.metadata
    ]


def _unknown(unknown: list[object]) -> ConditionError:
    """The error naming unknown names (the first few) and every known one."""
    shown = [_named(key) for key in sorted(unknown, key=str)]
    more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    known = ", ".join(setting.name for _, setting in _settings())
    return ConditionError(
        f"unknown condition{'s' if len(shown) > 1 else ''}: {', '.join(shown[:5])}{more} "
        f"(known: {known})"
    )


def reader(name: str) -> Callable[[str], Any]:
    """How the CLI reads the setting `name` (`latency`, `close_after` or `close-after`)
    from text: the argparse type of its option, so a flag, its `ECHOPLEX_*` variable and
    the control API read values alike. A ConditionError for an unknown name."""
    wanted = name.replace("-", "_")
    for _, setting in _settings():
        if setting.name == wanted:
            return setting.kind.read
    raise _unknown([name])


def _read(name: str, value: object) -> object:
    """A value from a mapping: text read as the CLI reads it; anything else as given (the
    dataclass checks it)."""
    if not isinstance(value, str):
        return value
    kind = next(setting.kind for _, setting in _settings() if setting.name == name)
    try:
        return kind.read(value)
    except ConditionError:
        raise
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConditionError(f"`{name}`: {exc}") from None


class ConditionDraw:
    """A server's random draws, seeded once (`seed` None: from the OS): for each
    connection, whether it gets the conditions and a generator of its own for its
    jitter. The same seed and the same order of connections give the same draws; a
    process of `workers` passes its index as `stream` so the processes differ.

    Thread-safe: blocking models draw in the accept loop or in handler threads."""

    def __init__(self, seed: int | None = None, *, stream: int = 0) -> None:
        self._random = random.Random(None if seed is None else f"{seed}/{stream}")
        self._lock = threading.Lock()

    def draw(self, toxicity: float) -> random.Random | None:
        """A connection's generator if it gets the conditions (a share `toxicity` of
        connections), else None. Each call takes the same draws whatever the answer, so
        one connection's luck does not shift the next one's."""
        with self._lock:
            chosen = self._random.random() < toxicity
            child_seed = self._random.getrandbits(64)
        return random.Random(child_seed) if chosen else None

    def stream(self) -> random.Random:
        """A generator of its own, for what draws per datagram rather than per connection."""
        with self._lock:
            return random.Random(self._random.getrandbits(64))


class LiveConditions:
    """The conditions a server gives the connections it opens from now on: those it
    started with, until the control API replaces them (`set`). A connection keeps the
    conditions it opened with. Safe from any thread: readers take one attribute."""

    def __init__(self, conditions: Conditions, *, stream: int = 0) -> None:
        self._stream = stream
        self.version = 0
        """How many times the conditions were replaced."""
        self._now = (conditions, ConditionDraw(conditions.seed, stream=stream))

    @property
    def current(self) -> Conditions:
        return self._now[0]

    def set(self, conditions: Conditions) -> None:
        """From now on, new connections get `conditions` (drawn afresh from its seed)."""
        self._now = (conditions, ConditionDraw(conditions.seed, stream=self._stream))
        self.version += 1

    def for_connection(self, now: float, *, max_buffer_bytes: int) -> ConnectionConditions | None:
        """The conditions of a connection opened at `now` (None: it gets none)."""
        conditions, draw = self._now
        return conditions.for_connection(draw, now, max_buffer_bytes=max_buffer_bytes)

    def for_datagrams(self) -> DatagramConditions | None:
        conditions, draw = self._now
        return conditions.for_datagrams(draw)


# ---------------------------------------------------------------- what a driver is told


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes, after those of the actions before."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Half-close (a FIN after what was written), then read and discard until the
    client's EOF or `discard_until`, then close; the outcome's detail is `reason`."""

    discard_until: float
    reason: str = CLOSE_AFTER


@dataclass(frozen=True, slots=True)
class Reset:
    """Abort the connection (RST); the outcome's detail is `reason`."""

    reason: str = RESET_AFTER


@dataclass(frozen=True, slots=True)
class Finish:
    """The client half-closed and has every byte back: close as without conditions."""


Action = Send | Close | Reset | Finish


class ConnectionConditions:
    """One connection's conditions: a delay line, a pacer and the byte marks (see the
    module's docstring for the calls and how they combine). Not thread-safe: a
    connection is driven by one thread or one event loop."""

    def __init__(
        self,
        conditions: Conditions,
        rng: random.Random,
        now: float,
        *,
        max_buffer_bytes: int,
    ) -> None:
        if max_buffer_bytes < 1:
            raise ConditionError(f"`max_buffer_bytes` must be 1 or more, not {max_buffer_bytes}")
        self.conditions = conditions
        self.outcome: str | None = None
        """Why the server ended the connection on purpose (CLOSE_AFTER, RESET_AFTER)."""
        self._random = rng
        self._max_buffer_bytes = max_buffer_bytes
        self._opened_at = now
        self.on_held: Callable[[float], None] | None = None
        """Told, for each piece handed out, how long its first byte was held."""
        self._line: deque[tuple[float, bytes]] = deque()  # (due at, chunk), in order
        self._arrivals: deque[tuple[int, float]] = deque()  # (bytes taken in by then, when)
        self._in_line = 0
        self._last_due_at = -math.inf
        self._ready = bytearray()  # out of the line, waiting for its piece
        self._next_piece_at = now
        self._piece_bytes = _piece_bytes(conditions)
        self._accepted = 0  # bytes taken in to echo
        self._sent = 0  # bytes handed out in Send
        self._end_at_bytes = _first_set(conditions.close_after_bytes, conditions.reset_after_bytes)
        self._stall_at_bytes = conditions.stall_after_bytes
        self._stalled_until: float | None = None
        self._eof = False
        self._finish_at: float | None = None
        self._ended = False
        if self._stall_at_bytes == 0:
            self._pass_marks(now)  # a stall at 0 bytes holds from the start

    @property
    def names(self) -> tuple[str, ...]:
        return self.conditions.names

    @property
    def label(self) -> str:
        return self.conditions.label

    @property
    def held(self) -> int:
        """Bytes taken in and not yet handed out."""
        return self._in_line + len(self._ready)

    def stalled(self, now: float) -> bool:
        return self._stalled_until is not None and now < self._stalled_until

    def may_read(self, now: float) -> bool:
        """Whether to read from the client now: not after its EOF or the end, nor during
        a stall, nor while `max_buffer_bytes` or more are held (a chunk delivered anyway,
        as an event loop may, is still taken: the bound is that plus one read)."""
        return not (
            self._ended or self._eof or self.stalled(now) or self.held >= self._max_buffer_bytes
        )

    def received(self, chunk: bytes, now: float) -> None:
        """A chunk arrived: it enters the delay line. Bytes past `close_after` or
        `reset_after`, or after the end, are dropped: they would never be echoed."""
        if self._ended:
            return
        if self._end_at_bytes is not None:
            chunk = chunk[: self._end_at_bytes - self._accepted]
        if not chunk:
            return
        self._accepted += len(chunk)
        self._arrivals.append((self._accepted, now))
        due_at = max(now + self._delay(), self._last_due_at)  # never before the one ahead
        self._last_due_at = due_at
        self._line.append((due_at, chunk))
        self._in_line += len(chunk)

    def eof(self, now: float) -> None:
        """The client half-closed: once every byte is echoed (and `slow_close` passed),
        `due` says Finish."""
        self._eof = True
        self._settle_finish(now)

    def due(self, now: float) -> list[Action]:
        """What to do at `now`, in order."""
        if self._ended:
            return []
        if self._stalled_until is not None:
            if now < self._stalled_until:
                return []
            self._stalled_until = None
        self._release(now)
        actions: list[Action] = []
        while not self._ended and self._stalled_until is None:
            end = self._pass_marks(now)
            if end is not None:
                actions.append(end)
            elif self._stalled_until is not None:
                break  # a stall begins at this mark
            elif (piece := self._take_piece(now)) is not None:
                actions.append(Send(piece))
            else:
                self._settle_finish(now)
                if self._finish_at is not None and now >= self._finish_at:
                    self._end()
                    actions.append(Finish())
                break
        return actions

    def next_at(self) -> float | None:
        """When `due` next has something to say (it may be in the past: at once); None:
        nothing until the next `received` or `eof`, or ever (a stall without end)."""
        if self._ended:
            return None
        if self._stalled_until is not None:
            return None if math.isinf(self._stalled_until) else self._stalled_until
        if self._sent == self._end_at_bytes:  # only before the first `due`: a limit of 0
            return self._opened_at
        if self._ready:
            return self._next_piece_at
        if self._line:
            return max(self._line[0][0], self._next_piece_at)
        return self._finish_at

    def _delay(self) -> float:
        conditions = self.conditions
        if not conditions.jitter_s:
            return conditions.latency_s
        jitter = self._random.uniform(-conditions.jitter_s, conditions.jitter_s)
        return max(0.0, conditions.latency_s + jitter)

    def _release(self, now: float) -> None:
        """Move what the delay line owes by `now` to the bytes ready to go."""
        line = self._line
        while line and line[0][0] <= now:
            _, chunk = line.popleft()
            self._in_line -= len(chunk)
            self._ready += chunk

    def _take_piece(self, now: float) -> bytes | None:
        """The next piece, if one may go at `now`: paced, sliced, cut at the next mark."""
        if not self._ready or now < self._next_piece_at:
            return None
        size = len(self._ready)
        if self._piece_bytes is not None:
            size = min(size, self._piece_bytes)
        for mark in (self._stall_at_bytes, self._end_at_bytes):
            if mark is not None:
                size = min(size, mark - self._sent)
        piece = bytes(self._ready[:size])
        del self._ready[:size]
        self._report_held(now)
        self._sent += size
        conditions = self.conditions
        next_at = now + conditions.slice_delay_s
        if conditions.bandwidth_bytes_per_s is not None:
            next_at = max(next_at, now + size / conditions.bandwidth_bytes_per_s)
        self._next_piece_at = next_at
        return piece

    def _report_held(self, now: float) -> None:
        """Tell `on_held` how long the byte at `_sent` (a piece's first) was held."""
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] <= self._sent:
            arrivals.popleft()  # chunks wholly handed out already
        if self.on_held is not None and arrivals:
            self.on_held(now - arrivals[0][1])

    def _pass_marks(self, now: float) -> Action | None:
        """At a byte mark: start the stall (once), or end the connection."""
        if self._sent == self._stall_at_bytes:
            self._stall_at_bytes = None
            stall_for_s = self.conditions.stall_for_s
            self._stalled_until = math.inf if stall_for_s is None else now + stall_for_s
            return None
        if self._sent != self._end_at_bytes:
            return None
        self._end()
        if self.conditions.close_after_bytes is not None:
            self.outcome = CLOSE_AFTER
            return Close(now + CLOSE_DISCARD_S)
        self.outcome = RESET_AFTER
        return Reset()

    def _settle_finish(self, now: float) -> None:
        """After the EOF, once nothing is held (and no stall holds it), fix when to close."""
        if self._eof and self._finish_at is None and not self.held and self._stalled_until is None:
            self._finish_at = now + self.conditions.slow_close_s

    def handover(self) -> bytes:
        """End these conditions for new ones (the control API changed them): the bytes
        received and not yet sent, for the new conditions to take, in order."""
        held = b"".join(chunk for _, chunk in self._line) + bytes(self._ready)
        self._end()
        return held

    def _end(self) -> None:
        self._ended = True
        self._line.clear()
        self._arrivals.clear()
        self._in_line = 0
        self._ready.clear()


def _piece_bytes(conditions: Conditions) -> int | None:
    """The most one piece may carry: a slice, and a pacing quantum's worth of bytes."""
    sizes = [conditions.slice_bytes] if conditions.slice_bytes is not None else []
    if conditions.bandwidth_bytes_per_s is not None:
        sizes.append(max(1, int(conditions.bandwidth_bytes_per_s * PACING_QUANTUM_S)))
    return min(sizes, default=None)


def _first_set(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


class DatagramConditions:
    """When to answer each datagram of one UDP socket: `latency` ± `jitter` after it
    came, or never (a share `drop`), for a share `toxicity` of datagrams (a datagram is
    its own exchange: UDP has no connection to draw for). Answers may leave out of
    order under jitter, as datagrams do. Not thread-safe: one per socket's loop."""

    def __init__(self, conditions: Conditions, rng: random.Random) -> None:
        self.conditions = conditions
        self._random = rng

    def datagram(self, now: float) -> float | None:
        """When to send the answer to a datagram that came at `now`; None: never."""
        conditions = self.conditions
        draw = self._random.random
        # Three draws each time, whatever is used, so one datagram's luck does not shift
        # the next one's and a seed repeats the whole run.
        chosen, dropped, jitter = draw() < conditions.toxicity, draw(), draw()
        if not chosen:
            return now
        if dropped < conditions.drop:
            return None
        delay = conditions.latency_s + (2 * jitter - 1) * conditions.jitter_s
        return now + max(0.0, delay)
