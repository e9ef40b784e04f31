"""Socket plumbing every model shares: listeners, per-connection options, address text.

A server listens on any mix of: one TCP socket per `--host` (IPv4, IPv6, or `::` for
both), a Unix domain socket (`--unix`), and sockets handed over by systemd (socket
activation). `Listeners` owns them and cleans up after them (the Unix socket file).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import StartupError

log = logging.getLogger("echoplex.server")

SYSTEMD_FIRST_FD = 3  # sd_listen_fds(3): passed sockets start at descriptor 3


# sun_path holds 108 bytes on Linux, the last a NUL: a longer path fails at bind/connect
# ("AF_UNIX path too long").
MAX_UNIX_PATH_BYTES = 107
# The longest DNS name in text (RFC 1035: 255 octets on the wire).
MAX_HOST_CHARS = 253


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`: only this
    machine can reach it. A name other than localhost is not trusted to be one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def check_host(host: str) -> str:
    """`host` if it can be looked up, else a ValueError saying why not, in one line.

    socket encodes a name with the IDNA codec before any lookup (getaddrinfo, connect,
    and ssl for the server name), so an empty label (`a..b`), a label over 63
    characters, or a character IDNA refuses (argv bytes that are not UTF-8 arrive as
    surrogates) fails there as a UnicodeError, not as the OSError callers expect."""
    if not host:
        raise ValueError("empty host: give an address or a name")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)  # literals, IPv6 with a zone (`fe80::1%eth0`) too
        return host
    if host.startswith("[") and host.endswith("]"):
        raise ValueError(f"write an IPv6 address without brackets: {host[1:-1]}, not {host}")
    if "\0" in host:
        raise ValueError(f"not a host name: {host!r} (a NUL character)")
    if len(host) > MAX_HOST_CHARS:
        raise ValueError(f"not a host name: {host[:40]!r}... is over {MAX_HOST_CHARS} characters")
    try:
        host.encode("idna")
    except UnicodeError as exc:
        reason = exc.__cause__ or exc  # the codec's own words: "label too long"
        raise ValueError(f"not a host name: {host!r} ({reason})") from None
    return host


def check_unix_path(path: str) -> str:
    """`path` if a Unix socket can be bound or reached there, else a ValueError."""
    raw = os.fsencode(path)
    if not raw:
        raise ValueError("empty Unix socket path")
    if b"\0" in raw:
        raise ValueError(f"not a Unix socket path: {path!r} (a NUL character)")
    if len(raw) > MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"Unix socket path too long: {len(raw)} bytes, at most {MAX_UNIX_PATH_BYTES} "
            f"(a shorter directory, or a relative path): {path!r}"
        )
    return path


def address_family(host: str) -> socket.AddressFamily:
    # An IPv6 literal has a colon; anything else (names included) is looked up as IPv4,
    # as the tutorial's `socket.socket()` does, so `localhost` means 127.0.0.1.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_socket(
    host: str,
    port: int,
    kind: socket.SocketKind,
    *,
    v6_only: bool = False,
    options: Sequence[tuple[int, int, int]] = (),
    label: str = "",
) -> socket.socket:
    """A socket of `kind` bound to host:port (after setting `options`); closed, and a
    StartupError raised, if that fails. `label` goes before the address in the error."""
    family = address_family(host)
    try:
        infos = socket.getaddrinfo(host, port, family, kind, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    sockaddr = infos[0][4]
    sock = socket.socket(family, kind)
    try:
        for level, name, value in options:
            sock.setsockopt(level, name, value)
        if family == socket.AF_INET6:
            # `::` alone serves IPv4 clients too; beside IPv4 sockets it must not,
            # or it would take their port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6_only))
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {label}{format_address(sockaddr)}: {reason}") from exc
    return sock


def bind_each_host(
    hosts: Sequence[str], port: int, bind_one: Callable[[str, int, bool], socket.socket]
) -> list[socket.socket]:
    """`bind_one(host, port, v6_only)` for every host, all on one port: the first host's
    when `port` is 0. Several hosts mean IPv6 sockets must leave IPv4 to the others."""
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            sock = bind_one(host, port, len(hosts) > 1)
            sockets.append(sock)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def open_tcp_listener(
    host: str,
    port: int,
    backlog: int,
    *,
    reuse_port: bool = False,
    listen: bool = True,
    v6_only: bool = False,
) -> socket.socket:
    """Bind (and by default listen on) host:port; the socket is closed if that fails."""
    # SO_REUSEADDR: restart at once after a stop, without waiting out TIME_WAIT.
    options = [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]
    if reuse_port:
        options.append((socket.SOL_SOCKET, socket.SO_REUSEPORT, 1))
    sock = bind_socket(host, port, socket.SOCK_STREAM, v6_only=v6_only, options=options)
    if listen:
        try:
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            where = format_address(sock.getsockname()) if sock.fileno() != -1 else host
            raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return sock


def open_unix_listener(path: str, mode: int, backlog: int) -> socket.socket:
    """Listen on a Unix socket at `path`, replacing a stale socket file from a crashed run."""
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a restrictive umask so the file is never, even briefly, more open
        # than asked; then set exactly the mode asked.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a server that did not clean up
            log.info("removed stale socket file %s", path)
            return
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    raise StartupError(f"cannot listen on {path}: another server is listening there")


def systemd_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), or none.

    The variables are removed once read, as sd_listen_fds() does with unset_environment,
    so processes we start do not think the sockets are theirs.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(SYSTEMD_FIRST_FD, SYSTEMD_FIRST_FD + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise StartupError(f"LISTEN_FDS names descriptor {fd}, which is not a socket") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()  # not ours to close
            raise StartupError(f"passed descriptor {fd} is not a listening TCP or Unix socket")
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


class Listeners:
    """The listening sockets of one server process, closed (and unlinked) together."""

    def __init__(self, sockets: list[socket.socket], unix_path: str | None = None) -> None:
        self.sockets = sockets
        self.unix_path = unix_path
        self._unix_inode = os.stat(unix_path).st_ino if unix_path else None
        self.from_systemd = False

    @classmethod
    def open(
        cls,
        hosts: Sequence[str],
        port: int,
        backlog: int,
        unix: tuple[str, int] | None = None,
    ) -> Listeners:
        """Open the sockets systemd passed, which then replace our own TCP listeners (one
        per host: none for the `workers` model, which binds them in each worker), and
        the Unix socket at `unix` (its path and file mode)."""
        sockets: list[socket.socket] = []
        unix_path = None
        try:
            passed = systemd_sockets()
            if passed:
                log.info("serving %d socket(s) passed by systemd", len(passed))
            sockets += passed
            if not passed:
                sockets += open_tcp_listeners(hosts, port, backlog)
            if unix is not None:
                unix_path, mode = unix
                sockets.append(open_unix_listener(unix_path, mode, backlog))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        listeners = cls(sockets, unix_path)
        listeners.from_systemd = bool(passed)
        return listeners

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for sock in self.sockets]

    def __iter__(self) -> Iterator[socket.socket]:
        return iter(self.sockets)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.unix_path:
            # Only our own file: a server started after us may have replaced it.
            with contextlib.suppress(OSError):
                if os.stat(self.unix_path).st_ino == self._unix_inode:
                    os.unlink(self.unix_path)
            self.unix_path = None

    def __enter__(self) -> Listeners:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tcp_listeners(
    hosts: Sequence[str], port: int, backlog: int, *, reuse_port: bool = False, listen: bool = True
) -> list[socket.socket]:
    """One listener per host, all on the same port (the first one picks it if port is 0)."""

    def bind_one(host: str, port: int, v6_only: bool) -> socket.socket:
        return open_tcp_listener(
            host, port, backlog, reuse_port=reuse_port, listen=listen, v6_only=v6_only
        )

    return bind_each_host(hosts, port, bind_one)


def open_udp_sockets(hosts: Sequence[str], port: int) -> list[socket.socket]:
    """One non-blocking UDP socket per host, all on the same port (the first one picks
    it if port is 0)."""

    def bind_one(host: str, port: int, v6_only: bool) -> socket.socket:
        # No SO_REUSEADDR: on Linux it would let a second server bind this UDP port and
        # silently take its datagrams.
        sock = bind_socket(host, port, socket.SOCK_DGRAM, v6_only=v6_only, label="udp ")
        sock.setblocking(False)
        return sock

    return bind_each_host(hosts, port, bind_one)


def tune_connection(sock: socket.socket) -> None:
    # Echo is request/response: Nagle's algorithm would hold back small echoes
    # waiting for an ACK that the client delays in turn. (Not for Unix sockets.)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # the peer may have gone; the first read says so
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def plain_peer(peer: Any) -> Any:
    """An IPv4 client of a dual-stack listener, `('::ffff:10.0.0.1', p, 0, 0)`, as
    `('10.0.0.1', p)`; a Unix socket client (no address) as `'unix'`.

    The address string is interned: every connection from one client shares one copy,
    which the connection keeps for as long as it is open (58 bytes each otherwise)."""
    if isinstance(peer, tuple):
        if len(peer) == 4 and peer[0].startswith("::ffff:"):
            with contextlib.suppress(ValueError):
                mapped = ipaddress.IPv6Address(peer[0]).ipv4_mapped
                if mapped is not None:
                    return (sys.intern(str(mapped)), peer[1])
        return (sys.intern(peer[0]), *peer[1:])
    if peer in ("", None, b""):
        return "unix"
    return peer


def format_address(address: Any) -> str:
    """`127.0.0.1:5555`, `[::1]:5555`, or a Unix path, for logs."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
