"""Waiting on a condition with a deadline: the one way these tests let time pass.

A test never sleeps to give something time to happen. It names what it waits for,
as a function that is falsy until it has happened, and `wait_for` asks it again
every few milliseconds until it has, or fails the test at the deadline naming what
never came:

    match = wait_for(lambda: LISTENING.search(server.stderr), 10, "a listening line")

The deadline only bounds a failure: a condition that holds returns at once, so a
generous deadline costs nothing on a fast machine and holds on a busy one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")
POLL_INTERVAL_S = 0.01


def wait_for(
    condition: Callable[[], T | None], timeout_s: float, what: str | Callable[[], str]
) -> T:
    """The first truthy value `condition()` returns; fails the test if there is none
    within `timeout_s`. `what` names the condition in the failure (a function: called
    then, to describe the state it was in)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if result := condition():
            return result
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            pytest.fail(f"not within {timeout_s}s: {described}")
        time.sleep(POLL_INTERVAL_S)
