"""Admission counts shared by the worker processes of the `workers` model.

Each worker accepts on its own `SO_REUSEPORT` listener, so `--max-connections` and
`--max-per-ip` can only bound the whole server if the workers count in one place. A
fixed split (each worker allowed max/N) would turn clients away early whenever the
kernel's hash spreads connections unevenly. So the supervisor creates, before forking,
one `AdmissionTable` in shared memory, and every worker's `Admission` counts there
through `WorkerCounts`: the same rules (`echoplex.limits.Admission`), other storage.

Design, and why:

- **Memory**: a memfd mapped `MAP_SHARED`, inherited by every fork; no manager
  process, no pickling, a few microseconds per decision.
- **Lock**: a POSIX record lock (`fcntl.lockf`) on that memfd, plus a thread lock
  inside each process (record locks belong to a process, not a thread). The kernel
  drops a record lock when its holder dies, so a worker killed with SIGKILL inside a
  decision cannot leave the others waiting for ever, as a semaphore
  (`multiprocessing.Lock`) would.
- **Columns**: every count is kept per worker, the open total and each address's
  count alike, and a worker only changes its own column. When a worker dies, the
  supervisor zeroes its column under the lock before starting its replacement: the
  dead worker's connections died with it, and so do their slots, total and per address.
  A worker killed in the middle of a change leaves only its own column half-changed,
  and that column is about to be zeroed.
- **Per-address table**: open addressing, linear probing, keyed by the packed 16-byte
  address (IPv4 as IPv4-mapped IPv6) and placed by a keyed hash (BLAKE2b with a random
  key the supervisor picks), so clients cannot choose addresses that collide. A slot is
  held while any worker's count in it is above zero; a slot whose counts are all zero
  is free, whatever key it still shows, so nothing needs deleting (deleting in open
  addressing moves entries, which a killed worker could leave half done). A key is
  looked for only within `PROBE_WINDOW` slots of its home, so a decision costs a bounded
  number of steps, and a slot never used ends the search early.
- **Bounded memory**: `slots * (17 + 4 * workers)` bytes (65,536 slots, 2 MiB for
  4 workers, at the default 20,000 connections). Every held slot is an open connection's
  address, so with `--max-connections N` the table gets 2N slots (rounded up to a power
  of two), so that at most half are ever held, but no more than `MAX_SLOTS`; without it,
  `MAX_SLOTS`. A new address that finds its window full is turned away as over
  `--max-per-ip` (it could not be counted, so it is not served); while at most half the
  slots are held, that takes `PROBE_WINDOW` held neighbours in a row. Without
  `--max-per-ip` there is no table at all: only the totals are shared.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket
import threading
from contextlib import AbstractContextManager
from types import TracebackType

from .config import ServerConfig
from .limits import Admission

# How far from its home slot an address may be kept (and is looked for).
PROBE_WINDOW = 32
MAX_SLOTS = 1 << 18
MIN_SLOTS = 64
KEY_BYTES = 16
COUNT_BYTES = 4  # uint32: one worker's connections from one address, or its total


def address_key(ip: str) -> bytes:
    """The 16 bytes an address is kept under: IPv4 as IPv4-mapped IPv6, so both spellings
    of one client are one key; anything else (a Unix socket's peer) by its digest."""
    try:
        return socket.inet_pton(socket.AF_INET6, "::ffff:" + ip)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        return hashlib.blake2b(ip.encode(errors="surrogateescape"), digest_size=16).digest()


def slots_for(max_connections: int, max_per_ip: int) -> int:
    if not max_per_ip:
        return 0
    if not max_connections:
        return MAX_SLOTS
    return min(MAX_SLOTS, max(MIN_SLOTS, 1 << (2 * max_connections - 1).bit_length()))


class AdmissionTable:
    """The shared counts: created by the supervisor before it forks the workers."""

    def __init__(self, workers: int, max_connections: int, max_per_ip: int, slots: int) -> None:
        assert slots == 0 or slots & (slots - 1) == 0, "slots: a power of two"
        self.workers = workers
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.slots = slots
        self._window = min(PROBE_WINDOW, slots)
        self._hash_key = os.urandom(16)
        counts_bytes = COUNT_BYTES * workers * (1 + slots)
        size = counts_bytes + (KEY_BYTES + 1) * slots
        self._fd = os.memfd_create("echoplex-admission", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        except OSError:
            os.close(self._fd)
            raise
        self._thread_lock = threading.Lock()
        counts = memoryview(self._map)[:counts_bytes].cast("I")
        # open[worker]; by_ip[worker * slots + slot] (a worker's column is contiguous).
        self._open = counts[:workers]
        self._by_ip = counts[workers:]
        self._keys = memoryview(self._map)[counts_bytes : counts_bytes + KEY_BYTES * slots]
        self._used = memoryview(self._map)[counts_bytes + KEY_BYTES * slots :]

    @classmethod
    def from_config(cls, config: ServerConfig) -> AdmissionTable | None:
        """The table for a `workers` server, or None if it has no connection limit."""
        if not (config.max_connections or config.max_per_ip):
            return None
        return cls(
            config.worker_count,
            config.max_connections,
            config.max_per_ip,
            slots_for(config.max_connections, config.max_per_ip),
        )

    def admission_for(self, worker: int) -> Admission:
        """Worker `worker`'s admission: the server's limits, counted in its column."""
        return Admission(self.max_connections, self.max_per_ip, WorkerCounts(self, worker))

    def locked(self) -> AbstractContextManager[object]:
        return _Locked(self._thread_lock, self._fd)

    def forget(self, worker: int) -> None:
        """Give back everything `worker` held (it died; its connections went with it)."""
        with self.locked():
            self._open[worker] = 0
            column = worker * self.slots * COUNT_BYTES
            self._by_ip.cast("B")[column : column + self.slots * COUNT_BYTES] = bytes(
                self.slots * COUNT_BYTES
            )

    def total(self) -> int:
        return sum(self._open)

    def of(self, ip: str) -> int:
        slot, _ = self._find(address_key(ip))
        return 0 if slot is None else self._held(slot)

    def add(self, worker: int, ip: str, connections: int, opened: int) -> bool:
        if self.slots:
            key = address_key(ip)
            slot, free = self._find(key)
            if slot is None:
                if connections <= 0:  # nothing counted under `ip`: nothing to give back
                    return True
                if free is None:
                    return False
                slot = free
                # The slot is free (no counts), so it may show any key meanwhile; it is
                # held once our count below is written.
                self._keys[slot * KEY_BYTES : (slot + 1) * KEY_BYTES] = key
                self._used[slot] = 1
            self._by_ip[worker * self.slots + slot] += connections
        self._open[worker] += opened
        return True

    def _held(self, slot: int) -> int:
        return sum(self._by_ip[slot :: self.slots])

    def _find(self, key: bytes) -> tuple[int | None, int | None]:
        """The slot that holds `key` (None if none does) and else the first free slot of
        its window (None if the window is full)."""
        if not self.slots:
            return None, None
        digest = hashlib.blake2b(key, digest_size=8, key=self._hash_key).digest()
        home = int.from_bytes(digest, "little")
        mask = self.slots - 1
        free = None
        for step in range(self._window):
            slot = (home + step) & mask
            if not self._used[slot]:  # never used: the key is not further on
                return None, slot if free is None else free
            if self._keys[slot * KEY_BYTES : (slot + 1) * KEY_BYTES] == key:
                return slot, None
            if free is None and not self._held(slot):
                free = slot
        return None, free

    def close(self) -> None:
        for view in (self._open, self._by_ip, self._keys, self._used):
            view.release()
        self._map.close()
        os.close(self._fd)


class _Locked:
    """The table's lock: the process's thread lock, then the record lock on the memfd."""

    __slots__ = ("_fd", "_thread_lock")

    def __init__(self, thread_lock: threading.Lock, fd: int) -> None:
        self._thread_lock = thread_lock
        self._fd = fd

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class WorkerCounts:
    """One worker's view of the table (`echoplex.limits.Counts`): it reads everyone's
    counts and changes its own column only."""

    __slots__ = ("table", "worker")

    def __init__(self, table: AdmissionTable, worker: int) -> None:
        self.table = table
        self.worker = worker

    def locked(self) -> AbstractContextManager[object]:
        return self.table.locked()

    def total(self) -> int:
        return self.table.total()

    def of(self, ip: str) -> int:
        return self.table.of(ip)

    def add(self, ip: str, connections: int, *, opened: int = 0) -> bool:
        return self.table.add(self.worker, ip, connections, opened)
