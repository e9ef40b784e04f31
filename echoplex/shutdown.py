"""A stop request that signal handlers, threads and event loops can all wait on.

Signal handlers only call `request()`, which sets flags and writes one byte to a
socketpair (uvicorn's `handle_exit` does as little). Models wait on `fileno()` beside
their listeners, so a blocked `select` wakes at once. A second request means
"stop now": the drain is cut short.

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
    def __init__(self) -> None:
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.requested_at: float | None = None
        self.forced = False

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, *_signal_args: object) -> None:
        """Ask the server to stop; a second call asks it to stop without draining."""
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        else:
            self.forced = True
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

    def drain_deadline(self, drain_timeout_s: float) -> float:
        """Monotonic time by which open connections must be closed (inf while running)."""
        if self.requested_at is None:
            return math.inf
        if self.forced:
            return self.requested_at
        return self.requested_at + drain_timeout_s

    def wait_drained(self, drain_timeout_s: float, is_drained: Callable[[], bool]) -> bool:
        """Wait until `is_drained()`, the drain deadline or a forced stop; True if drained."""
        return wait_until(is_drained, lambda: self.drain_deadline(drain_timeout_s))

    def close(self) -> None:
        self._wake_reader.close()
        self._wake_writer.close()


def wait_until(
    done: Callable[[], bool], deadline: Callable[[], float], poll_s: float = 0.05
) -> bool:
    """Poll `done()` until it holds (True) or the monotonic `deadline()` passes (False).

    Polling, because what we wait for (threads finishing, a second signal moving the
    deadline) has no single thing to block on; it only runs while stopping.
    """
    while not done():
        remaining = deadline() - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll_s, remaining))
    return True


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
