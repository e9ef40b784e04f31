"""Rate limiting for log messages that a flood could repeat thousands of times a second."""

from __future__ import annotations

import time


class Throttle:
    """Lets a message through at most once per interval and counts the ones it held back."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to stay quiet, or the number suppressed since the last message."""
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self.suppressed.pop(key, 0)
