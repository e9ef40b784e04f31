"""The lesson's clients: real sockets, each client's moments on the system's clock.

Every time is in seconds from the start of a scene (`Scene.started`): when the client
began (`start_s`), when its connect returned (`connected_s`: the kernel completes the
handshake even for a server that has not accepted yet), when the server accepted it
(`accepted_s`, from the server's log, `echoplex.lesson.servers`: to the millisecond,
on the wall clock, which the scene's start is also read on), its first echo
(`first_echo_s`) and when it had every echo and closed (`done_s`). None is a moment
that did not come (a client that failed says why in `error`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from ..testing import recv_exactly

CLIENT_TIMEOUT_S = 60.0


@dataclass
class ClientTimes:
    name: str
    messages: int
    start_s: float | None = None
    connected_s: float | None = None
    accepted_s: float | None = None
    served_by: str | None = None  # the server's process that accepted it (its log's name)
    first_echo_s: float | None = None
    done_s: float | None = None
    local_port: int | None = None
    error: str | None = None

    @property
    def waited_s(self) -> float | None:
        """From its start to its first echo: how long the client waited to be served."""
        if self.first_echo_s is None or self.start_s is None:
            return None
        return self.first_echo_s - self.start_s

    def state(self, now_s: float) -> str:
        """Its state at `now_s`, as the live view and the timeline name them."""
        if self.done_s is not None and now_s >= self.done_s:
            return "done"
        if self.first_echo_s is not None and now_s >= self.first_echo_s:
            return "answered"
        if self.accepted_s is not None and now_s >= self.accepted_s:
            return "connected"
        if self.start_s is not None and now_s >= self.start_s:
            return "waiting"
        return "not started"

    def as_json(self) -> dict[str, object]:
        return {key: _rounded(value) for key, value in asdict(self).items()}


def _rounded(value: object) -> object:
    return round(value, 6) if isinstance(value, float) else value


class Scene:
    """Clients that run at once against one server, their times from one start."""

    def __init__(
        self, address: tuple[str, int], accepted: Callable[[int], tuple[float, str] | None]
    ) -> None:
        self.address = address
        self._accepted = accepted
        self.clients: list[ClientTimes] = []
        self.started = time.monotonic()
        self.started_wall = time.time()  # the server's log tells its accepts on this clock
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def now_s(self) -> float:
        return time.monotonic() - self.started

    def start(
        self, client: ClientTimes, talk: Callable[[socket.socket, ClientTimes], None]
    ) -> None:
        """Run `client` in a thread of its own: connect, then `talk(sock, client)`."""
        self.clients.append(client)
        thread = threading.Thread(target=self._run, args=(client, talk), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, client: ClientTimes, talk: Callable[[socket.socket, ClientTimes], None]) -> None:
        client.start_s = self.now_s()
        try:
            with self._connected() as sock:
                client.connected_s = self.now_s()
                client.local_port = sock.getsockname()[1]
                talk(sock, client)
                client.done_s = self.now_s()
        except OSError as exc:
            client.error = exc.strerror or str(exc) or type(exc).__name__

    @contextlib.contextmanager
    def _connected(self) -> Iterator[socket.socket]:
        sock = socket.create_connection(self.address, timeout=CLIENT_TIMEOUT_S)
        with self._lock:
            self._open.add(sock)
        try:
            yield sock
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def echo(self, sock: socket.socket, client: ClientTimes, message: bytes) -> None:
        """Send `message`, wait for all of its echo; the first echo's time is noted."""
        sock.sendall(message)
        if recv_exactly(sock, len(message)) != message:
            raise OSError("the echo was not what was sent")
        if client.first_echo_s is None:
            client.first_echo_s = self.now_s()

    def join(self) -> None:
        """Wait for every client, then note when the server accepted each."""
        for thread in self._threads:
            thread.join()
        self.note_accepts()

    def note_accepts(self) -> None:
        for client in self.clients:
            if client.local_port is not None:
                told = self._accepted(client.local_port)
                if told is not None:
                    client.accepted_s = max(0.0, told[0] - self.started_wall)
                    client.served_by = told[1]

    def close_all(self) -> None:
        """Close every client's socket now (a Ctrl-C): their threads end at once."""
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def whole_s(self) -> float | None:
        """From the start until the last client was done; None if one never was."""
        ends = [client.done_s for client in self.clients]
        if not ends or any(end is None for end in ends):
            return None
        return max(end for end in ends if end is not None)


def talker(
    scene: Scene, count: int, message: bytes | None = None
) -> Callable[[socket.socket, ClientTimes], None]:
    """A client that sends `count` short messages (`message`, or its name and number),
    each after the last one's echo."""

    def talk(sock: socket.socket, client: ClientTimes) -> None:
        for number in range(1, count + 1):
            text = message or f"{client.name}: message {number}\n".encode()
            scene.echo(sock, client, text)

    return talk


def holder(
    scene: Scene, hold_s: float, held: threading.Event
) -> Callable[[socket.socket, ClientTimes], None]:
    """A client as the tutorial's `nc`: says Hello, then keeps its connection `hold_s`."""

    def talk(sock: socket.socket, client: ClientTimes) -> None:
        scene.echo(sock, client, b"Hello\n")
        held.set()
        time.sleep(hold_s)  # the learner, not typing: nothing to wait for but time

    return talk
