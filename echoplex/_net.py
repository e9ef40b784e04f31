"""Socket plumbing every model shares: listeners, per-connection options, address text."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from .config import ServerConfig
from .errors import StartupError


def address_family(host: str) -> socket.AddressFamily:
    # An IPv6 literal has a colon; anything else (names included) is looked up as IPv4,
    # as the tutorial's `socket.socket()` does, so `localhost` means 127.0.0.1.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_listener(
    config: ServerConfig, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """Bind (and by default listen on) host:port; the socket is closed if that fails."""
    family = address_family(config.host)
    try:
        infos = socket.getaddrinfo(
            config.host, config.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve host {config.host!r}: {exc.strerror}") from exc
    sockaddr = infos[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Restart at once after a stop, without waiting out TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(config.backlog)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {format_address(sockaddr)}: {reason}") from exc
    return sock


def tune_connection(sock: socket.socket) -> None:
    # Echo is request/response: Nagle's algorithm would hold back small echoes
    # waiting for an ACK that the client delays in turn.
    # If the peer has already gone, the first read will say so.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def format_address(address: Any) -> str:
    """`127.0.0.1:5555`, `[::1]:5555`, or a Unix path, for logs."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
