"""`echoplex lesson`: the tutorial's experiment, replayed and measured (`echoplex.lesson`).

echoplex lesson                  all four steps, about a minute
echoplex lesson --step 2 --clients 3 --messages 1 --work io:50ms --no-pause --json
"""

from __future__ import annotations

import argparse
import os
import sys

from .._cli_util import add_options, config_from_args, fail, flags_for_settings
from ..lesson import LessonConfig, run_lesson
from ..lesson.servers import stop_every_server

PROG = "echoplex lesson"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, LessonConfig)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(LessonConfig, args)
    except ValueError as exc:
        return fail(PROG, flags_for_settings(str(exc), LessonConfig))
    try:
        return run_lesson(config)
    except KeyboardInterrupt:
        print(f"{PROG}: stopped", file=sys.stderr, flush=True)
        return 130  # each step has stopped its server on the way out
    except BrokenPipeError:
        # Read through `head`, which has stopped reading: nothing more to say, and the
        # interpreter's last flush of stdout must not fail again on its way out.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        stop_every_server()
