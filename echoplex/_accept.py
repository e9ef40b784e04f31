"""Taking connections off a listener, the same way for every model.

`Acceptor.accept_ready()` drains a non-blocking listener and deals with what can go
wrong there, so the models only see connections they should serve:

- a connection that died in the queue (ECONNABORTED, EPROTO, EPERM) is skipped, as
  trio's `_highlevel_socket.py` and libuv do;
- out of descriptors (EMFILE/ENFILE): a client left in the queue would hang until it
  gave up, and the listener would stay readable, so the loop would spin. We keep one
  spare descriptor; when accept() fails for lack of one, we free it, accept the
  waiting client and close it at once (it sees the connection closed, not a hang),
  then take the spare back (libuv's "EMFILE trick"). If even that fails, the caller
  backs off for a moment instead of spinning;
- over `--max-connections` or `--max-per-ip`: accepted and closed at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ._net import plain_peer, tune_connection
from ._throttle import Throttle
from .events import ServerEvents
from .limits import Admission

log = logging.getLogger("echoplex.server")

_GONE_BEFORE_ACCEPT = {errno.ECONNABORTED, errno.EPERM, errno.EPROTO}
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}
_OUT_OF_MEMORY = {errno.ENOBUFS, errno.ENOMEM}
# How long to stop accepting when nothing can be accepted at all (no spare descriptor).
ACCEPT_BACKOFF_S = 0.1


def client_ip(peer: Any) -> str:
    return peer[0] if isinstance(peer, tuple) else str(peer)


class Acceptor:
    def __init__(
        self,
        admission: Admission,
        events: ServerEvents,
        is_proxy: Callable[[str], bool] = lambda ip: False,
    ) -> None:
        self.admission = admission
        self.is_proxy = is_proxy
        self.events = events
        self.throttle = Throttle()
        self._spare_fd: int | None = self._open_spare()

    @staticmethod
    def _open_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def accept_ready(
        self, listener: socket.socket, max_batch: int = 128
    ) -> tuple[list[tuple[socket.socket, Any]], bool]:
        """Accept what waits on a non-blocking `listener` (up to `max_batch`): the admitted
        connections, tuned, and whether the caller should back off before accepting again.
        Peers are plain: an IPv4 client of a dual-stack listener shows as IPv4."""
        admitted: list[tuple[socket.socket, Any]] = []
        for _ in range(max_batch):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _GONE_BEFORE_ACCEPT:
                    continue
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    return admitted, not self._shed_one(listener, exc)
                if exc.errno in _OUT_OF_MEMORY:
                    self._warn("accept", "accept() failed: %s; backing off", exc.strerror)
                    return admitted, True
                raise
            peer = plain_peer(peer)
            ip = client_ip(peer)
            reason = self.admission.admit(ip, per_ip=not self.is_proxy(ip))
            if reason is not None:
                # Reported before the close, so a client that sees it closed finds it counted.
                self.events.connection_rejected(peer, reason)
                conn.close()
                continue
            tune_connection(conn)
            admitted.append((conn, peer))
        return admitted, False

    def _shed_one(self, listener: socket.socket, exc: OSError) -> bool:
        """Out of descriptors: accept one waiting client with the spare and close it.
        True if one was shed (try again at once), False if the caller must back off."""
        self._warn(
            "descriptors",
            "out of file descriptors (%s): closing new connections until some free up",
            exc.strerror,
        )
        if self._spare_fd is None:
            self._spare_fd = self._open_spare()
            return False
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            conn, _ = listener.accept()
        except OSError:
            return False
        else:
            conn.close()
            return True
        finally:
            self._spare_fd = self._open_spare()

    def _warn(self, key: str, message: str, *args: object) -> None:
        suppressed = self.throttle.allow(key)
        if suppressed is not None:
            if suppressed:
                message += " (%d similar messages suppressed)"
                args = (*args, suppressed)
            log.warning(message, *args)

    def close(self) -> None:
        if self._spare_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._spare_fd)
            self._spare_fd = None
