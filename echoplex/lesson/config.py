"""The lesson's settings, each option declared once beside its field (`option()`)."""

from __future__ import annotations

from dataclasses import dataclass

from .._cli_util import (
    at_most,
    file_path,
    option,
    positive_int,
    positive_seconds,
    whole_number,
)
from ..conditions import Work, reader

STEPS = (1, 2, 3, 4)
DEFAULT_WORK = {"io": Work("io", 0.1), "cpu": Work("cpu", 0.02)}
MAX_CLIENTS = 200  # a thread each in the lesson: a lesson, not a load test
MAX_IDLE = 100_000


@dataclass(frozen=True)
class LessonConfig:
    step: int | None = option(
        None, "--step", "run this step alone, 1 to 4 (default: all four)", parse=whole_number(1, 4)
    )
    clients: int = option(
        10,
        "--clients",
        "clients at once in steps 2 and 3 (default {default})",
        parse=at_most(MAX_CLIENTS, positive_int),
        metavar="N",
    )
    messages: int = option(
        5,
        "--messages",
        "messages each client sends in steps 2 and 3 (default {default})",
        parse=at_most(1000, positive_int),
        metavar="N",
    )
    work: tuple[Work, ...] = option(
        (),
        "--work",
        "the handler's work per message: io:DURATION for step 2 (default io:100ms), "
        "cpu:DURATION for step 3 (default cpu:20ms); give it once per kind",
        parse=reader("work"),
        show=str,
        metavar="KIND:DURATION",
    )
    hold_s: float = option(
        2.0,
        "--hold",
        "how long step 1's nc-like client keeps its connection (default {default})",
        parse=positive_seconds,
        metavar="DURATION",
    )
    idle: int = option(
        2000,
        "--idle",
        "idle connections held against each server in step 4 (default {default})",
        parse=at_most(MAX_IDLE, positive_int),
        metavar="N",
    )
    no_pause: bool = option(False, "--no-pause", "do not wait for Enter between steps")
    json: bool = option(
        False, "--json", "print every figure as JSON on stdout, instead of the lesson's text"
    )
    out: str = option(
        "lesson",
        "--out",
        "folder for lesson.json and the pictures (default {default})",
        parse=file_path,
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        kinds = [work.kind for work in self.work]
        for kind in set(kinds):
            if kinds.count(kind) > 1:
                raise ValueError(f"`work` {kind}: given twice (once per kind: io and cpu)")

    def work_of(self, kind: str) -> Work:
        """The work of the step of this kind: as given, else the default."""
        return next((work for work in self.work if work.kind == kind), DEFAULT_WORK[kind])

    @property
    def steps(self) -> tuple[int, ...]:
        return STEPS if self.step is None else (self.step,)
