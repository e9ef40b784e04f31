"""A one-shot timer with sub-millisecond precision for the open-loop (`rate`) schedule.

Event loop timers have millisecond granularity: uvloop rounds a delay to the
nearest millisecond, and asyncio's epoll wait rounds its timeout up to one. A
schedule that waits on them sends up to a millisecond late, and since latency
is measured from each message's intended time, that lateness would be charged
to the server (at 2000 messages/s it moved the median from 74 µs to 829 µs on
loopback). On Linux a timerfd watched by the loop wakes it at the nanosecond
deadline asked for; elsewhere the loop's own timer is used, rounded up to whole
milliseconds so a short delay cannot round down to zero and spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import math
import os
import sys
import time
from collections.abc import Callable

_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK, TFD_CLOEXEC have these values


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.timerfd_settime.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        )
    except (OSError, AttributeError):
        return None
    return libc


class OneShotTimer:
    """Calls `callback` once, `delay_ns` after each `start(delay_ns)`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.handle: asyncio.Handle | None = None
        self.fd = -1
        self._libc = _libc()
        if self._libc is not None:
            fd = self._libc.timerfd_create(time.CLOCK_MONOTONIC, _TFD_FLAGS)
            if fd >= 0:
                self.fd = fd
                self._spec = _Itimerspec()
                loop.add_reader(fd, self._fired)

    @property
    def precise(self) -> bool:
        return self.fd >= 0

    def start(self, delay_ns: int) -> None:
        if delay_ns <= 0:
            self.handle = self.loop.call_soon(self.callback)
        elif self._libc is not None and self.fd >= 0:
            # A zero it_value would disarm the timer; delay_ns > 0 here.
            self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(
                delay_ns, 1_000_000_000
            )
            if self._libc.timerfd_settime(self.fd, 0, ctypes.byref(self._spec), None) != 0:
                raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        else:
            delay_ms = max(1, math.ceil(delay_ns / 1e6))
            self.handle = self.loop.call_later(delay_ms / 1000, self.callback)

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)  # the expiry count; reading it re-arms readiness
        except BlockingIOError:
            return  # disarmed or already read
        self.callback()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
