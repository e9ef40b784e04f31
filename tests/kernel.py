"""What the kernel holds for a socket, read from /proc/net/tcp and ioctl: the state a
test waits on to know that a server has read its bytes or taken its connection,
where a sleep would only guess."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
from pathlib import Path

from echoplex.testing import peer_tcp_line, unread_by_peer

__all__ = [
    "accepted_by_peer",
    "asleep",
    "read_by_peer",
    "unacknowledged",
    "unread_by_peer",
    "unread_from_process",
]


def _tcp_lines() -> list[list[str]]:
    return [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]


def _queue(fields: list[str], which: int) -> int:
    """The `tx_queue:rx_queue` column's send (0) or receive (1) queue."""
    return int(fields[4].split(":")[which], 16)


_peer_line = peer_tcp_line


def accepted_by_peer(sock: socket.socket) -> bool:
    """True once the program at the other end has accepted the connection: a socket
    still in a listener's accept queue has no file, so its inode is 0."""
    return _peer_line(sock)[9] != "0"


def unread_from_process(pid: int) -> int:
    """Bytes process `pid` has sent over TCP (IPv4 or IPv6) that the programs at the
    other ends have not read yet: their sockets' receive queues."""
    lines = [
        line.split()
        for table in ("tcp", "tcp6")
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    ]
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while we look
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ends = {(fields[1], fields[2]) for fields in lines if fields[9] in inodes}
    return sum(_queue(fields, 1) for fields in lines if (fields[2], fields[1]) in ends)


def asleep(pid: int) -> bool:
    """True while process `pid` is blocked in a system call (state S in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "S"


def unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on `sock` that the peer's kernel has not acknowledged yet (SIOCOUTQ)."""
    packed = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", packed)[0])


def read_by_peer(sock: socket.socket) -> bool:
    """True once every byte sent on `sock` has reached the other end and the program
    there has read it: nothing in flight, nothing waiting in its receive queue."""
    return unacknowledged(sock) == 0 and unread_by_peer(sock) == 0
