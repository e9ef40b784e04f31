"""The lesson from start to end: each step in turn, the JSON and the pictures after."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._version import __version__
from .config import LessonConfig
from .results import StepResult
from .steps import cpus, run_step
from .view import PlainView, choose_view, has_rich

PICTURES_HINT = (
    "For a live view and a picture per step: pip install 'echoplex[lesson]' (or '[all]')."
)


def machine() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {
        "cpus": cpus(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(one, 2), round(five, 2), round(fifteen, 2)],
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_lesson(config: LessonConfig) -> int:
    """Run the steps asked for; write DIR/lesson.json (and pictures when matplotlib is
    there). A Ctrl-C ends it at once: each step stops its server on the way out."""
    view = choose_view(config.json)
    out = Path(config.out)
    started = datetime.now(UTC)
    begun = time.monotonic()
    drawing = has_matplotlib()
    if not (drawing and has_rich()):
        view.say(PICTURES_HINT)
    steps: list[StepResult] = []
    for index, number in enumerate(config.steps):
        if index and _pausing(config):
            view.pause(f"\nPress Enter for step {number} (Ctrl-C to stop) ")
        step = run_step(number, config, view)
        if step.findings:
            view.findings(step)
        steps.append(step)
    document = {
        "echoplex": __version__,
        "date": started.isoformat(timespec="seconds"),
        "lesson_s": round(time.monotonic() - begun, 3),
        "machine": machine(),
        "settings": settings_of(config),
        "steps": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    if drawing:
        from .pictures import draw_step

        for step in steps:
            step.pictures = [str(path) for path in draw_step(step, out)]
    document["steps"] = [step.as_json() for step in steps]
    text = json.dumps(document, indent=2)
    (out / "lesson.json").write_text(text + "\n")
    if config.json:
        print(text, flush=True)
    else:
        _told_where(view, out, steps)
    return 0


def settings_of(config: LessonConfig) -> dict[str, Any]:
    return {
        "steps": list(config.steps),
        "clients": config.clients,
        "messages": config.messages,
        "work_io": str(config.work_of("io")),
        "work_cpu": str(config.work_of("cpu")),
        "hold_s": config.hold_s,
        "idle": config.idle,
    }


def _pausing(config: LessonConfig) -> bool:
    return not (config.no_pause or config.json) and sys.stdin.isatty() and sys.stdout.isatty()


def _told_where(view: PlainView, out: Path, steps: list[StepResult]) -> None:
    pictures = [picture for step in steps for picture in step.pictures]
    view.say(f"\nEvery figure: {out / 'lesson.json'}")
    if pictures:
        view.say("Pictures: " + ", ".join(pictures))
