"""How each load connection reaches the server: one `Connector` per transport, chosen
once per run, so the patterns and their hot paths never ask which transport they are on.

    tcp    a TCP socket (TCP_NODELAY), connected within `timeout_s`
    unix   a Unix domain stream socket (`unix_path`)
    tls    either of those, then a TLS handshake within `timeout_s`: the event loop's own
           SSL transport (asyncio's or uvloop's), verifying the server as `host`
    udp    a connected UDP socket, as a datagram endpoint: it hears only from the
           server, and an ICMP "port unreachable" shows as ConnectionRefusedError

With `send_proxy`, a stream connection's first bytes are a PROXY header naming the
connection itself (`echoplex.client.proxy_header_for`: its own address as the client,
the server's as the destination; UNKNOWN over a Unix socket). It is written on the bare
socket right after connect, before TLS and before the first payload byte, which is what
HAProxy's send-proxy does; so the socket is always opened here and only then handed to
the loop's `create_connection(sock=...)`.

With `source`, each socket is bound to its connection's source address (port 0)
before it connects (`echoplex.load.sources`). A TCP socket is bound with
IP_BIND_ADDRESS_NO_PORT, so the port is picked at connect, for the whole four-tuple:
without it bind() reserves a port for the address alone, and all the connections from
one source share its one range of ports whatever server they reach. Each source is
bound once in `prepare`, so that an address this machine does not have is one line
before the run rather than one failure per connection.

Failures come out as `OpenFailed`: a countable kind for the run's tally (`connect
refused`, `tls`...) and a one-line summary for when the very first connection fails
and the run stops before it starts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ..client import (
    Target,
    describe_connection_error,
    describe_udp_error,
    proxy_header_for,
    tls_failure,
)
from .config import LoadConfig
from .connections import error_kind
from .sources import source_for

# Before a UDP run: datagrams sent to see that something answers at all (the first may
# be lost, or dropped by a server that drops every other one), over `timeout_s`.
PROBE_ATTEMPTS = 3
PROBE_DATAGRAM = b"echoplex load: is anyone there?"


class OpenFailed(Exception):
    """A connection could not be opened."""

    def __init__(self, kind: str, detail: str, summary: str) -> None:
        super().__init__(summary)
        self.kind = kind
        """Countable: `connect refused`, `connect timeout`, `tls`..."""
        self.detail = detail
        """One line: why this connection failed."""
        self.summary = summary
        """One line naming the server, for when the run cannot start at all."""


def _plain(exc: OSError) -> OSError:
    """The error with the system's own wording: uvloop says "Connect call failed
    ('127.0.0.1', 9)" where asyncio says "Connection refused"."""
    if exc.errno and not isinstance(exc, socket.gaierror | TimeoutError | ssl.SSLError):
        return OSError(exc.errno, os.strerror(exc.errno))
    return exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def tls_reason(exc: BaseException, timeout_s: float) -> str:
    """Why a TLS handshake failed, in one line: as `echoplex client` words it (OpenSSL's
    reason; for a certificate the verifier's own words, `CERTIFICATE_VERIFY_FAILED:
    self-signed certificate`), or the time limit, or the server gone."""
    if isinstance(exc, ssl.SSLError):
        return _one_line(tls_failure(exc))
    if isinstance(exc, TimeoutError):
        return f"no handshake within {timeout_s:g}s"
    if isinstance(exc, ConnectionError):
        return "the server closed the connection during the handshake"
    return _one_line(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)


class Connector:
    """Opens the run's connections on one transport: `await prepare()` once, then
    `await open(protocol)` per connection."""

    kind = socket.SOCK_STREAM

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.timeout_s = config.timeout_s
        self.target = Target(config.host, config.port, config.unix_path)
        self.sources = config.sources

    async def prepare(self) -> None:
        """Before the first connection: resolve the server's name, load certificates."""

    async def open(self, protocol: asyncio.BaseProtocol, number: int) -> None:
        """Connect `protocol`, connection `number` of the run, to the server; OpenFailed
        if that cannot be done."""
        raise NotImplementedError

    async def _resolve(self) -> tuple[int, Any]:
        """The server's address (in the sources' family, if any), once per run; each
        source address checked by binding to it."""
        family, address = await _resolve(self.config, self.kind, self._source_family())
        for source in self.sources:
            with socket.socket(family, self.kind) as sock:
                try:
                    self._bind(sock, source)
                except OSError as exc:
                    message = f"cannot use source address {source}: {_plain(exc).strerror}"
                    raise OpenFailed(f"bind {error_kind(exc)}", message, message) from None
        return family, address

    def _source_family(self) -> int:
        if not self.sources:
            return socket.AF_UNSPEC
        return socket.AF_INET6 if ":" in self.sources[0] else socket.AF_INET

    def _bind_source(self, sock: socket.socket, number: int) -> None:
        if self.sources:
            self._bind(sock, source_for(self.sources, number))

    def _bind(self, sock: socket.socket, source: str) -> None:
        if self.kind == socket.SOCK_STREAM and hasattr(socket, "IP_BIND_ADDRESS_NO_PORT"):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))

    def _connect_failed(self, exc: OSError) -> OpenFailed:
        plain = _plain(exc)
        return OpenFailed(
            f"connect {error_kind(exc)}",
            plain.strerror or "",
            describe_connection_error(self.target, plain, self.timeout_s),
        )


class StreamConnector(Connector):
    """TCP or Unix socket, each optionally with a PROXY header and then TLS."""

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.family: int = socket.AF_UNIX if config.unix_path else socket.AF_INET
        self.address: Any = config.unix_path
        self.proxy_version = config.send_proxy
        self._create: Callable[..., Awaitable[Any]] | None = None
        self._tls_arguments: dict[str, Any] = {}

    async def prepare(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        if config.unix_path is None:
            self.family, self.address = await self._resolve()
        self._create = loop.create_unix_connection if config.unix_path else loop.create_connection
        if config.tls:
            try:
                context = config.tls_context  # built once (by the command, if it ran us)
            except ValueError as exc:
                raise OpenFailed("tls", str(exc), str(exc)) from None
            # The handshake's time limit is the asyncio.timeout around it in open():
            # the loops' own ssl_handshake_timeout reports expiry as a lost connection.
            self._tls_arguments = {"ssl": context, "server_hostname": config.host}

    async def open(self, protocol: asyncio.BaseProtocol, number: int) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._bind_source(sock, number)
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_connect(sock, self.address)
                if self.proxy_version is not None:
                    await loop.sock_sendall(sock, proxy_header_for(sock, self.proxy_version))
        except OSError as exc:
            sock.close()
            raise self._connect_failed(exc) from None
        except BaseException:
            sock.close()
            raise
        # From here the loop owns the socket, and closes it if this fails: uvloop closes
        # the descriptor itself (and detaches the socket object), so closing it here too
        # could close another connection's socket that reused the number.
        assert self._create is not None
        if not self._tls_arguments:
            try:
                await self._create(lambda: protocol, sock=sock)
            except OSError as exc:
                raise self._connect_failed(exc) from None
            return
        try:
            # A handshake cancelled by the timeout is cleaned up by the loop, as a failed one.
            async with asyncio.timeout(self.timeout_s):
                await self._create(lambda: protocol, sock=sock, **self._tls_arguments)
        except OSError as exc:  # ssl.SSLError, a reset or an EOF mid-handshake, a timeout
            reason = tls_reason(exc, self.timeout_s)
            raise OpenFailed("tls", reason, f"TLS with {self.target} failed: {reason}") from None


class DatagramConnector(Connector):
    """A connected UDP socket per connection."""

    kind = socket.SOCK_DGRAM

    def __init__(self, config: LoadConfig) -> None:
        super().__init__(config)
        self.family: int = socket.AF_INET
        self.address: Any = None

    async def prepare(self) -> None:
        self.family, self.address = await self._resolve()
        await self._probe()

    async def open(self, protocol: asyncio.BaseProtocol, number: int) -> None:
        try:
            await self._endpoint(protocol, number)
        except OSError as exc:
            raise self._connect_failed(exc) from None

    async def _endpoint(
        self, protocol: asyncio.BaseProtocol, number: int
    ) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            self._bind_source(sock, number)
            sock.connect(self.address)  # no packet: it only fixes the peer
        except BaseException:
            sock.close()
            raise
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        return cast(asyncio.DatagramTransport, transport)  # uvloop's: not a subclass

    async def _probe(self) -> None:
        """Datagrams there and back before the run, so that no server at all is one line
        and exit 1, as a refused TCP connect is, not every datagram counted lost."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        host, port, timeout_s = self.config.host, self.config.port, self.timeout_s
        try:
            # From the first connection's source: the one the run's first datagram uses.
            transport = await self._endpoint(_Probe(answered), self.config.first_connection)
        except OSError as exc:
            message = describe_udp_error(host, port, exc, timeout_s)
            raise OpenFailed(f"connect {error_kind(exc)}", message, message) from None
        try:
            for _ in range(PROBE_ATTEMPTS):
                transport.sendto(PROBE_DATAGRAM)
                await asyncio.wait([answered], timeout=timeout_s / PROBE_ATTEMPTS)
                if answered.done():
                    answered.result()
                    return
            raise TimeoutError
        except OSError as exc:
            message = describe_udp_error(host, port, exc, timeout_s)
            raise OpenFailed(f"connect {error_kind(exc)}", message, message) from None
        finally:
            transport.close()
            if not answered.done():
                answered.cancel()


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, answered: asyncio.Future[None]) -> None:
        self.answered = answered

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answered.done():
            self.answered.set_result(None)

    def error_received(self, exc: Exception) -> None:
        if not self.answered.done():
            self.answered.set_exception(exc)


async def _resolve(config: LoadConfig, kind: socket.SocketKind, family: int) -> tuple[int, Any]:
    """The server's address, resolved once before the first connect."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(config.host, config.port, family=family, type=kind)
    except OSError as exc:
        message = describe_connection_error(Target(config.host, config.port), exc)
        raise OpenFailed("resolve", message, message) from None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr


def connector_for(config: LoadConfig) -> Connector:
    return DatagramConnector(config) if config.udp else StreamConnector(config)


__all__ = ["Connector", "DatagramConnector", "OpenFailed", "StreamConnector", "connector_for"]
