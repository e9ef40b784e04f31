"""A server's configuration resolved once, before anything is served (as uvicorn's
`Config.load()`): the event loop, the TLS context, the limits, the drain, and the bound
sockets. `server.run` resolves the plan, and the model (and the UDP echo beside it) is
handed the plan: nothing is built to be checked and built again, and no model reads a
raw setting to work out what the plan already says.

Binding happens here too, so a port of 0 is picked once. A model whose processes each
bind their own TCP listener (`workers`, on SO_REUSEPORT) gets the port held by a bound,
not listening, socket (`reserved`) for the server's lifetime, so restarted workers bind
the same port; the others get their TCP listeners bound and listening. UDP beside TCP
binds the same port number.
"""

from __future__ import annotations

import errno
import importlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6
from typing import TYPE_CHECKING, Protocol

from . import tls
from ._net import Listeners, open_tcp_listeners, open_udp_sockets
from .conditions import Conditions, LiveConditions
from .config import ServerConfig
from .errors import StartupError
from .limits import Admission, TimeLimits
from .loops import LoopFactory, loop_factory
from .models import MODELS
from .proxy_protocol import Network

if TYPE_CHECKING:
    import socket

    from .events import ServerEvents
    from .shutdown import Shutdown

# With port 0, TCP and UDP: tries at a port free for TCP that is also free for UDP.
SHARED_PORT_ATTEMPTS = 20


class Model(Protocol):
    """A concurrency model: serves the plan's listeners until `shutdown` is requested,
    then drains for `plan.drain_timeout_s`. Optional class or module attributes:
    `RUNS_EVENT_LOOP` (the plan resolves `loop`) and `LISTENER_PER_PROCESS` (each of
    its processes binds its own TCP listener on `plan.port`)."""

    def serve(self, plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None: ...


def load_model(name: str) -> Model:
    """The model registered as `name` in `echoplex.models.MODELS` (imported now)."""
    try:
        module_name = MODELS[name].module
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (choose from {', '.join(MODELS)})") from None
    module: Model = importlib.import_module(module_name)
    return module


@dataclass(eq=False)
class ServerPlan:
    """Everything a model needs, resolved from one `ServerConfig`; close it when done."""

    config: ServerConfig
    """The settings as given, for what needs no resolving (buffer sizes, thread counts)."""
    loop: LoopFactory | None
    """Event loops (models that run one, and the UDP echo); None when nothing does."""
    tls: ssl.SSLContext | None
    tls_handshake_s: float | None
    """How long a TLS handshake may take (None: no TLS)."""
    trusted_proxies: list[Network]
    """The proxies whose connections start with a PROXY header (none: no PROXY protocol)."""
    proxy_header_s: float | None
    """How long a trusted proxy's header may take (None: no PROXY protocol)."""
    limits: TimeLimits
    admission: Admission
    """This process's admission counts (the `workers` model shares its own table)."""
    drain_timeout_s: float
    chunk_bytes: int
    """The most one read takes in (`recv_bytes`, within `max_buffer_bytes`)."""
    per_process_hosts: tuple[str, ...]
    """The hosts each process of a `LISTENER_PER_PROCESS` model binds for itself, on
    `port`; empty for other models (their listeners are bound) and under systemd."""
    port: int
    """The port number: the one asked for, or the one picked for port 0."""
    listeners: Listeners
    """Listening sockets: every one, or for `LISTENER_PER_PROCESS` models the sockets its
    processes share (systemd's and the Unix socket)."""
    conditions: LiveConditions = field(default_factory=lambda: LiveConditions(Conditions()))
    """The conditions on purpose new connections get: `config.conditions` until the
    control API replaces them (a `workers` process keeps its own, kept in step)."""
    udp_sockets: list[socket.socket] = field(default_factory=list)
    reserved: list[socket.socket] = field(default_factory=list)
    """Bound, not listening: they hold `port` for models that bind it per process."""

    def close(self) -> None:
        self.listeners.close()
        for sock in (*self.udp_sockets, *self.reserved):
            sock.close()

    def __enter__(self) -> ServerPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(config: ServerConfig, model: Model) -> ServerPlan:
    """Resolve `config` for `model`: a StartupError if the loop, the certificate or a
    listener cannot be had."""
    runs_loop = bool(getattr(model, "RUNS_EVENT_LOOP", False)) and config.tcp
    loop = loop_factory(config.loop) if runs_loop or config.udp else None
    context = tls.server_context(config) if config.tcp else None
    proxies = list(config.trusted_networks) if config.proxy_protocol else []
    per_process = bool(getattr(model, "LISTENER_PER_PROCESS", False))
    if config.port or not config.tcp:
        # A port given: UDP first (its error comes first, as when serving it alone).
        udp_sockets = open_udp_sockets(config.hosts, config.port) if config.udp else []
        try:
            listeners, reserved, hosts = _bind_tcp(config, per_process)
        except BaseException:
            for sock in udp_sockets:
                sock.close()
            raise
    else:
        listeners, reserved, hosts, udp_sockets = _bind_tcp_then_udp(config, per_process)
    port = _port_of([*reserved, *listeners, *udp_sockets], config.port)
    return ServerPlan(
        config=config,
        loop=loop,
        tls=context,
        tls_handshake_s=config.tls_handshake_timeout_s if context else None,
        trusted_proxies=proxies,
        proxy_header_s=config.proxy_header_timeout_s if proxies else None,
        limits=TimeLimits.from_config(config),
        admission=Admission.from_config(config),
        drain_timeout_s=config.drain_timeout_s,
        chunk_bytes=min(config.recv_bytes, config.max_buffer_bytes),
        per_process_hosts=hosts if per_process else (),
        port=port,
        listeners=listeners,
        conditions=LiveConditions(config.conditions),
        udp_sockets=udp_sockets,
        reserved=reserved,
    )


def _bind_tcp_then_udp(
    config: ServerConfig, per_process: bool
) -> tuple[Listeners, list[socket.socket], tuple[str, ...], list[socket.socket]]:
    """Port 0: TCP picks the port, UDP binds the same number; if UDP finds it taken, TCP
    picks again."""
    for attempt in range(1, SHARED_PORT_ATTEMPTS + 1):
        listeners, reserved, hosts = _bind_tcp(config, per_process)
        port = _port_of([*reserved, *listeners], config.port)
        try:
            udp_sockets = open_udp_sockets(config.hosts, port) if config.udp else []
        except StartupError as exc:
            listeners.close()
            for sock in reserved:
                sock.close()
            in_use = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EADDRINUSE
            # systemd's sockets are read once and cannot be had again: no second try.
            if not (in_use and attempt < SHARED_PORT_ATTEMPTS) or listeners.from_systemd:
                raise
        else:
            return listeners, reserved, hosts, udp_sockets
    raise AssertionError("unreachable: the last attempt returns or raises")


def _bind_tcp(
    config: ServerConfig, per_process: bool
) -> tuple[Listeners, list[socket.socket], tuple[str, ...]]:
    """The listeners, the sockets that hold the port, and the hosts TCP binds itself."""
    if not config.tcp:
        return Listeners([]), [], ()
    unix = None if config.unix_path is None else (config.unix_path, config.unix_mode)
    # A model that binds per process gets only the sockets its processes share here.
    own_hosts = () if per_process else config.hosts
    listeners = Listeners.open(own_hosts, config.port, config.backlog, unix)
    hosts = () if listeners.from_systemd else config.hosts
    reserved: list[socket.socket] = []
    try:
        if per_process:
            reserved = open_tcp_listeners(
                hosts, config.port, config.backlog, reuse_port=True, listen=False
            )
        if not (listeners.sockets or reserved):
            raise StartupError("nothing to listen on: no host, no Unix socket, no systemd socket")
    except BaseException:
        listeners.close()
        raise
    return listeners, reserved, hosts


def _port_of(sockets: Iterable[socket.socket], default: int) -> int:
    """The port of the first IP socket (they all share it), else `default`."""
    for sock in sockets:
        if sock.family in (AF_INET, AF_INET6):
            port: int = sock.getsockname()[1]
            return port
    return default
