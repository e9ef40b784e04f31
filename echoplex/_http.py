"""The project's one small HTTP server, for the endpoints beside the echo: the metrics
and health endpoint (`echoplex.metrics`) and the control API (`echoplex.control`).

Each endpoint faces whoever can reach its port, out of the descriptors the echo
listener needs too, so everything it holds is bounded: one thread reads requests from
at most MAX_PENDING connections at once with a selector (a silent or trickling client
costs a descriptor, not a thread); when that many are waiting, the oldest is closed for
the newcomer, so a scraper gets in unless 64 others connect within its own round trip.
A request (head, and body if the endpoint takes one) not complete within
REQUEST_TIMEOUT_S of the connect is dropped; a head over MAX_HEAD_BYTES too. A body
over the endpoint's `max_body_bytes` is refused (413) as soon as its Content-Length is
read. HTTP_WORKERS threads answer complete requests through a WSGI app, handed over
through a queue of at most MAX_QUEUED, each within SEND_TIMEOUT_S. A reset is the
client's business: a debug line, never a traceback. What the endpoint refuses itself
(not HTTP, a body too large) is answered as the control API answers: `{"error": ...}`.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.handlers import SimpleHandler

from ._net import bind_socket, format_address
from .errors import StartupError

log = logging.getLogger("echoplex.http")

MAX_PENDING = 64
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 8192
HTTP_WORKERS = 2
MAX_QUEUED = 16
_LISTEN_BACKLOG = 128
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_BACKOFF_S = 0.1

WSGIApp = Callable[..., Iterable[bytes]]


def json_answer(status: str, document: object, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.0 answer with a JSON body (one line)."""
    body = json.dumps(document).encode() + b"\n"
    head = [f"HTTP/1.0 {status}", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _Pending:
    """A connection whose request is still arriving: `data` holds the head and the start
    of the body; once the head is whole, `head_end` is where it ends and `body_bytes`
    how much body follows it."""

    __slots__ = ("body_bytes", "data", "deadline", "head_end", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: Any, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.data = b""
        self.deadline = deadline
        self.head_end: int | None = None
        self.body_bytes = 0


def _head_end(data: bytes) -> int | None:
    """Where the head ends (after its blank line), or None if it has not yet."""
    ends = [(at, len(mark)) for mark in (b"\r\n\r\n", b"\n\n") if (at := data.find(mark)) >= 0]
    if not ends:
        return None
    at, length = min(ends)
    return at + length


def _content_length(head: bytes) -> int | None:
    """The head's Content-Length (0 if none); None if it is not a number, or is given
    twice with different values (a smuggling trick): the request is then refused."""
    values = set()
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            values.add(value.strip())
    if not values:
        return 0
    if len(values) > 1 or not all(v.isdigit() for v in values):
        return None
    return int(values.pop())


class HTTPEndpoint:
    """A bounded HTTP/1.0 server for one WSGI app (see the module's docstring); `name`
    names its threads and its log lines. Serves from `start()` until `stop()`."""

    def __init__(
        self, listener: socket.socket, app: WSGIApp, name: str, *, max_body_bytes: int = 0
    ) -> None:
        self.listener = listener
        self.app = app
        self.name = name
        self.max_body_bytes = max_body_bytes
        self.host, self.port = listener.getsockname()[:2]
        self.requests: queue.Queue[tuple[socket.socket, bytes | _Pending] | None] = queue.Queue(
            MAX_QUEUED
        )
        self.pending: dict[socket.socket, _Pending] = {}  # oldest first
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.stopping = False
        self.threads = [threading.Thread(target=self._read_requests, name=f"{name}-http")]
        self.threads += [
            threading.Thread(target=self._answer, name=f"{name}-http-{n}")
            for n in range(HTTP_WORKERS)
        ]
        for thread in self.threads:
            thread.daemon = True

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake_writer.send(b"x")
        if self.threads[0].is_alive():
            self.threads[0].join(timeout=5)
        for thread in self.threads[1:]:
            if thread.is_alive():
                self.requests.put(None)
        for thread in self.threads[1:]:
            if thread.is_alive():
                thread.join(timeout=5)
        self.listener.close()
        self.wake_reader.close()
        self.wake_writer.close()

    def _read_requests(self) -> None:
        self.listener.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self.wake_reader, selectors.EVENT_READ)
            try:
                while not self.stopping:
                    now = time.monotonic()
                    for pending in [p for p in self.pending.values() if p.deadline <= now]:
                        log.debug("%s: no complete request in %gs", self.name, REQUEST_TIMEOUT_S)
                        self._drop(selector, pending.sock)
                    oldest = next(iter(self.pending.values()), None)
                    timeout = None if oldest is None else max(0.0, oldest.deadline - now)
                    for key, _ in selector.select(timeout):
                        if key.fileobj is self.listener:
                            self._accept(selector)
                        elif pending := self.pending.get(key.fileobj):  # type: ignore[call-overload]
                            self._read(selector, pending)  # (not one just made room for)
            finally:
                for sock in list(self.pending):
                    self._drop(selector, sock)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: accept failed: %s", self.name, exc)
                if exc.errno in _OUT_OF_RESOURCES:
                    # The listener stays readable: without a pause this would spin. The
                    # echo server's own descriptors come first; requests wait a moment.
                    time.sleep(_ACCEPT_BACKOFF_S)
                return
            if len(self.pending) >= MAX_PENDING:
                self._drop(selector, next(iter(self.pending)))
            sock.setblocking(False)
            self.pending[sock] = _Pending(sock, peer, time.monotonic() + REQUEST_TIMEOUT_S)
            selector.register(sock, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        try:
            chunk = pending.sock.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # a reset: the client's business, not a server error
            log.debug("%s: connection failed: %s", self.name, exc)
            chunk = b""
        if not chunk:
            self._drop(selector, pending.sock)
            return
        pending.data += chunk
        refusal = None
        if pending.head_end is None:
            pending.head_end = _head_end(pending.data[: MAX_HEAD_BYTES + 4])
            if pending.head_end is None:
                if len(pending.data) >= MAX_HEAD_BYTES:
                    self._drop(selector, pending.sock)
                return
            refusal = self._body_refusal(pending)
        if refusal is None and len(pending.data) < pending.head_end + pending.body_bytes:
            return  # more body to come
        selector.unregister(pending.sock)
        del self.pending[pending.sock]
        # Blocks while the workers are behind: back-pressure, not a refusal, so a burst
        # of requests (answered or reset) does not turn the next one away.
        self.requests.put((pending.sock, refusal or pending))

    def _body_refusal(self, pending: _Pending) -> bytes | None:
        """The answer that refuses this request's body, or None if it is acceptable."""
        assert pending.head_end is not None
        length = _content_length(pending.data[: pending.head_end])
        if length is None:
            return json_answer("400 Bad Request", {"error": "a bad Content-Length"})
        if length > self.max_body_bytes:
            reason = f"the body is {length} bytes, more than the {self.max_body_bytes} taken"
            return json_answer("413 Content Too Large", {"error": reason})
        pending.body_bytes = length
        return None

    def _drop(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        selector.unregister(sock)
        del self.pending[sock]
        sock.close()

    def _answer(self) -> None:
        while (request := self.requests.get()) is not None:
            sock, what = request
            with sock:
                try:
                    sock.settimeout(SEND_TIMEOUT_S)
                    sock.sendall(what if isinstance(what, bytes) else self._respond(what))
                except OSError as exc:  # reset or stalled mid-answer
                    log.debug("%s: answer failed: %s", self.name, exc)

    def _respond(self, request: _Pending) -> bytes:
        # The answer is rendered whole, then sent with one sendall: its timeout bounds the
        # whole send, where writes through a socket file would each get a fresh one.
        assert request.head_end is not None
        body = request.data[request.head_end : request.head_end + request.body_bytes]
        environ = self._environ(request.data[: request.head_end], request.peer)
        if environ is None:
            return json_answer("400 Bad Request", {"error": "not an HTTP request"})
        answer = io.BytesIO()
        handler = _Handler(io.BytesIO(body), answer, _LogWriter(self.name), environ)
        handler.endpoint_name = self.name
        handler.os_environ = {}  # not the process's environment, as under CGI
        handler.http_version = "1.0"
        handler.run(self.app)
        return answer.getvalue()

    def _environ(self, head: bytes, peer: Any) -> dict[str, str] | None:
        """The WSGI environ of a request head; None if it is not HTTP."""
        request_line, *header_lines = head.decode("latin-1").splitlines()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        method, target, protocol = parts
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": protocol,
            "SERVER_NAME": str(self.host),
            "SERVER_PORT": str(self.port),
            "SCRIPT_NAME": "",
            "REMOTE_ADDR": format_address(peer),
        }
        for line in header_lines:
            name, colon, value = line.partition(":")
            if colon and name.strip():
                key = name.strip().upper().replace("-", "_")
                if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                    key = "HTTP_" + key
                environ[key] = value.strip()
        return environ


class _Handler(SimpleHandler):
    endpoint_name = "http"

    def __init__(self, stdin: Any, stdout: Any, stderr: Any, environ: Any) -> None:
        super().__init__(stdin, stdout, stderr, environ, multiprocess=False)

    def log_exception(self, exc_info: Any) -> None:
        if isinstance(exc_info[1], OSError):  # the client reset, or stopped reading
            log.debug("%s: answer failed: %s", self.endpoint_name, exc_info[1])
        else:
            log.error("%s endpoint failed", self.endpoint_name, exc_info=exc_info)


class _LogWriter(io.TextIOBase):
    """wsgiref's error stream: what it would print (an app's traceback) goes to the log."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        if text.strip():
            log.error("%s endpoint: %s", self.name, text.rstrip())
        return len(text)


def listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket for an endpoint; a StartupError naming `what` if there is none."""
    reuse = [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]
    listener = None
    try:
        listener = bind_socket(host, port, socket.SOCK_STREAM, options=reuse)
        listener.listen(_LISTEN_BACKLOG)
    except (StartupError, OSError) as exc:
        if listener is not None:
            listener.close()
        cause = exc.__cause__ if isinstance(exc, StartupError) else exc
        reason = getattr(cause, "strerror", None) or str(exc)
        where = format_address((host, port))
        raise StartupError(f"cannot serve {what} on {where}: {reason}") from exc
    return listener
