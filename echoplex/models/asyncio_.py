"""`asyncio`: one event loop serves every connection (uvloop when installed).

Each connection is an `asyncio.Protocol` whose `data_received` writes the chunk
straight back. When the client stops reading and the transport's write buffer
passes its high-water mark, the protocol pauses reading that connection, so a
client can never make the server hold more than one buffer's worth of its bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from .._net import open_listener, tune_connection
from ..config import ServerConfig
from ..errors import StartupError
from ..events import ConnectionRecord, ServerEvents
from ..shutdown import STOP_SIGNALS, Shutdown

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory:
    """`auto`: uvloop if it imports, else the standard loop (as uvicorn's loops/auto.py)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise StartupError(
                "uvloop is not installed: pip install 'echoplex[uvloop]', or use --loop asyncio"
            ) from None
        return asyncio.new_event_loop
    factory: LoopFactory = uvloop.new_event_loop
    return factory


class _Connections:
    """The protocols of open connections, and a wakeup for whoever waits on them to end."""

    def __init__(self) -> None:
        self.open: set[EchoProtocol] = set()
        self.changed = asyncio.Event()

    def discard(self, protocol: EchoProtocol) -> None:
        self.open.discard(protocol)
        self.changed.set()


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("connections", "events", "record", "transport")

    def __init__(self, connections: _Connections, events: ServerEvents) -> None:
        self.connections = connections
        self.events = events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_connection(sock)  # both loops set TCP_NODELAY already; this makes it explicit
        self.record = ConnectionRecord(transport.get_extra_info("peername"))
        self.connections.open.add(self)
        self.events.connection_opened(self.record)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        # Counted once handed to the transport: it flushes them before closing on EOF.
        self.record.bytes_in += len(data)
        self.record.bytes_out += len(data)

    def eof_received(self) -> bool:
        # Returning False closes our side once every queued echo is written:
        # a half-closing client still gets all its bytes back.
        return False

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.record.finish("closed")
        elif isinstance(exc, ConnectionResetError | BrokenPipeError):
            self.record.finish("reset")
        else:
            code = getattr(exc, "errno", None) or 0
            self.record.finish(f"error:{errno.errorcode.get(code, type(exc).__name__)}")
        self.connections.discard(self)
        self.events.connection_closed(self.record)

    def cut_off(self) -> None:
        self.record.finish("drained")
        self.transport.abort()


class DataLoggingEchoProtocol(EchoProtocol):
    """Also reports every chunk (`--log-data`); a separate class keeps the default path lean."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.record.bytes_in += len(data)
        self.events.data_received(self.record, data)
        self.transport.write(data)
        self.record.bytes_out += len(data)


def serve(
    config: ServerConfig, events: ServerEvents, shutdown: Shutdown, *, reuse_port: bool = False
) -> None:
    factory = loop_factory(config.loop)
    listener = open_listener(config, reuse_port=reuse_port)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(listener, config, events, shutdown))


async def _serve(
    listener: Any, config: ServerConfig, events: ServerEvents, shutdown: Shutdown
) -> None:
    loop = asyncio.get_running_loop()
    connections = _Connections()
    wakeup = asyncio.Event()

    def on_shutdown_wakeup() -> None:
        shutdown.clear_wakeup()
        wakeup.set()

    loop.add_reader(shutdown.fileno(), on_shutdown_wakeup)
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, shutdown.request)
    protocol_class = DataLoggingEchoProtocol if config.log_data else EchoProtocol
    try:
        server = await loop.create_server(
            lambda: protocol_class(connections, events), sock=listener, backlog=config.backlog
        )
        events.listening([listener.getsockname()])
        while not shutdown.requested:
            await wakeup.wait()
            wakeup.clear()
        server.close()  # stop listening: new connects are refused
        events.stopping()
        await _drain(connections, wakeup, config, shutdown)
    finally:
        loop.remove_reader(shutdown.fileno())
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        listener.close()


async def _drain(
    connections: _Connections, wakeup: asyncio.Event, config: ServerConfig, shutdown: Shutdown
) -> None:
    """Wait for open connections to end until the deadline, then abort the rest."""

    async def next_change() -> None:
        # Whichever comes first: a connection ends, or a second stop request.
        connections.changed.clear()
        waiters = [
            asyncio.ensure_future(connections.changed.wait()),
            asyncio.ensure_future(wakeup.wait()),
        ]
        remaining = shutdown.drain_deadline(config.drain_timeout_s) - time.monotonic()
        try:
            await asyncio.wait(
                waiters, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        wakeup.clear()

    while connections.open and time.monotonic() < shutdown.drain_deadline(config.drain_timeout_s):
        await next_change()
    for protocol in list(connections.open):
        protocol.cut_off()
    # connection_lost runs on a later loop iteration; let the aborted ones report.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while connections.open:
                connections.changed.clear()
                await connections.changed.wait()
