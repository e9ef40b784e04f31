"""A stop request that signal handlers, threads and event loops can all wait on.

Signal handlers only call `request()`, which sets flags and writes one byte to a
socketpair (uvicorn's `handle_exit` does as little). Models wait on `fileno()` beside
their listeners, so a blocked `select` wakes at once. A second request means
"stop now": the drain is cut short.

Its wakeup socket is also how a stopping server waits for anything to change: a
connection that closes during the drain `nudge()`s it, and the stop sequence
(`echoplex.lifecycle`) looks again each time it wakes.

`stop_on_signals` is the one place that routes SIGINT and SIGTERM to a `Shutdown`.
"""

from __future__ import annotations

import contextlib
import math
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Shutdown:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._clock = clock
        self.requested_at: float | None = None
        self.forced = False

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, *_signal_args: object) -> None:
        """Ask the server to stop; a second call asks it to stop without draining."""
        if self.requested_at is None:
            self.requested_at = self._clock()
        else:
            self.forced = True
        self.nudge()

    def nudge(self) -> None:
        """Wake whoever waits on `fileno()` (from any thread), without asking for a stop."""
        with contextlib.suppress(OSError):  # full buffer or closed: a wakeup is pending anyway
            self._wake_writer.send(b"!")

    def fileno(self) -> int:
        return self._wake_reader.fileno()

    def wakeup_fd(self) -> int:
        """The end a signal's number may be written to (`signal.set_wakeup_fd`)."""
        return self._wake_writer.fileno()

    def clear_wakeup(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_reader.recv(64):
                pass

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a stop is requested or the timeout passes; True if requested."""
        if not self.requested:
            select.select([self._wake_reader], [], [], timeout_s)
        return self.requested

    def sleep(self, timeout_s: float | None) -> None:
        """Wait until woken (a stop request, a `nudge()`) or `timeout_s` passes (None: no
        limit), and take the wakeup: the caller looks at what changed, then sleeps again."""
        select.select([self._wake_reader], [], [], timeout_s)
        self.clear_wakeup()

    def drain_deadline(self, drain_timeout_s: float) -> float:
        """Monotonic time by which open connections must be closed (inf while running)."""
        if self.requested_at is None:
            return math.inf
        if self.forced:
            return self.requested_at
        return self.requested_at + drain_timeout_s

    def close(self) -> None:
        self._wake_reader.close()
        self._wake_writer.close()


@contextlib.contextmanager
def stop_on_signals(
    shutdown: Shutdown, signals: tuple[signal.Signals, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """Route `signals` (SIGINT, SIGTERM) to `shutdown.request` while the block runs (main
    thread only).

    The kernel hands a process-directed signal to any thread that does not block it, and
    CPython runs the Python handler only in the main thread, the next time it runs
    bytecode: a main thread blocked in select() or poll() would sleep through a signal
    that landed on a connection's thread. So the C-level handler also writes the signal's
    number to the shutdown's wakeup socket (`signal.set_wakeup_fd`) from whichever thread
    caught it; everything that waits for a stop waits on that socket, wakes, and runs the
    handler. (asyncio's `add_signal_handler` does the same with its loop's self-pipe.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_wakeup = signal.set_wakeup_fd(shutdown.wakeup_fd(), warn_on_full_buffer=False)
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, shutdown.request)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup)
