"""What a server process tree costs, read from `/proc`: CPU seconds, peak memory, threads.

The `workers` model is a supervisor plus one process per worker, so every figure is
summed over the whole tree (the root and all its descendants), found by scanning
`/proc/*/stat` for parent pids (`/proc/PID/task/*/children` needs a kernel option
that is not always on). CPU is read at the start and at the end of a measured window,
so the cost of starting the server is left out. Linux only: elsewhere the readers
return None and the bench reports the figures as missing.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of `/proc/PID/stat` the bench needs; times in clock ticks."""

    pid: int
    ppid: int
    pgrp: int
    state: str
    """`R`, `S`, ... or `Z` for a zombie: exited, not reaped yet."""
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def cpu_ticks(self) -> int:
        # cutime/cstime hold children already reaped: a worker that died and was
        # restarted keeps counting, and the tree's total never goes backwards.
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(pid: int, text: str) -> ProcStat:
    """Parse one `/proc/PID/stat` line. The command name (field 2) may hold spaces
    and parentheses, so the fields are counted from the last `)`."""
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); ppid and pgrp are fields 4 and 5; utime..cstime
    # are fields 14..17.
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        state=fields[0],
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def read_stat(pid: int) -> ProcStat | None:
    try:
        return parse_stat(pid, (PROC / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None  # gone already, or not Linux


def _all_stats() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return stats
    for entry in entries:
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            stats[stat.pid] = stat
    return stats


def tree_stats(root_pid: int) -> list[ProcStat]:
    """`root_pid` and every live descendant; empty if the root is gone."""
    stats = _all_stats()
    if root_pid not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(stats[pid])
        pending.extend(children.get(pid, ()))
    return tree


def tree_pids(root_pid: int) -> list[int]:
    return [stat.pid for stat in tree_stats(root_pid)]


def group_pids(pgid: int) -> list[int]:
    """The processes of process group `pgid` that are still running (not zombies)."""
    return [stat.pid for stat in _all_stats().values() if stat.pgrp == pgid and stat.state != "Z"]


def tree_affinity(root_pid: int) -> dict[int, set[int]]:
    """The CPUs every thread of the tree may run on, by thread id (the threads of a
    process can be pinned apart, so each is read)."""
    cpus: dict[int, set[int]] = {}
    for pid in tree_pids(root_pid):
        try:
            tids = [int(tid) for tid in os.listdir(PROC / str(pid) / "task")]
        except OSError:
            continue  # gone
        for tid in tids:
            with contextlib.suppress(OSError):
                cpus[tid] = os.sched_getaffinity(tid)
    return cpus


# TCP states in /proc/net/tcp (include/net/tcp_states.h).
ESTABLISHED, LISTEN = "01", "0A"


def _tcp_sockets(port: int, state: str) -> list[list[str]]:
    """The /proc/net/tcp and tcp6 lines, split, of sockets in `state` whose local port
    is `port`: `sl local_address rem_address st ... inode`, addresses `0100007F:1F90`."""
    port_hex = f":{port:04X}"
    sockets = []
    for table in ("tcp", "tcp6"):
        try:
            text = (PROC / "net" / table).read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and fields[1].endswith(port_hex):
                sockets.append(fields)
    return sockets


def listening_sockets(port: int) -> set[int]:
    """The inodes of the TCP sockets listening on `port`, IPv4 or IPv6, any address."""
    return {int(fields[9]) for fields in _tcp_sockets(port, LISTEN)}


def established_connections(port: int) -> int:
    """TCP connections to local port `port` that have completed their handshake, on the
    accepting side (those still waiting in a listen backlog included)."""
    return len(_tcp_sockets(port, ESTABLISHED))


def tree_sockets(root_pid: int) -> set[int]:
    """The inodes of the sockets the tree's processes hold open."""
    inodes = set()
    for pid in tree_pids(root_pid):
        fd_dir = PROC / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(fd_dir / fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def tree_cpu_s(root_pid: int) -> float | None:
    """User + system CPU seconds used so far by the tree (threads included)."""
    tree = tree_stats(root_pid)
    if not tree:
        return None
    return sum(stat.cpu_ticks for stat in tree) / CLOCK_TICKS_PER_S


def tree_thread_cpu_ns(root_pid: int) -> dict[int, int]:
    """CPU nanoseconds each live thread of the tree has run, by thread id: the first
    field of `/proc/PID/task/TID/schedstat`, exact where `/proc/PID/stat` counts 10 ms
    clock ticks (at a trickle to 100 connections a window holds a few). A thread that
    exits takes its count with it, so only a difference over the same threads means
    anything; empty where the kernel keeps no schedstat."""
    cpu_ns: dict[int, int] = {}
    for pid in tree_pids(root_pid):
        task_dir = PROC / str(pid) / "task"
        try:
            tids = os.listdir(task_dir)
        except OSError:
            continue  # gone
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                cpu_ns[int(tid)] = int((task_dir / tid / "schedstat").read_text().split()[0])
    return cpu_ns


def status_number(pid: int, field: str) -> int | None:
    """The number a line of `/proc/PID/status` starts with (VmRSS: 1234 kB, Threads: 3)."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def status_bytes(pid: int, field: str) -> int | None:
    """A `kB` line of `/proc/PID/status` (VmHWM, VmRSS), in bytes."""
    kib = status_number(pid, field)
    return None if kib is None else kib * 1024


def tree_threads(root_pid: int) -> int | None:
    """Threads of the whole tree now, every process's main thread included."""
    counts = [status_number(pid, "Threads") for pid in tree_pids(root_pid)]
    present = [count for count in counts if count is not None]
    return sum(present) if present else None


def tree_peak_rss_bytes(root_pid: int) -> int | None:
    """The sum over the tree of each process's peak resident set (VmHWM; VmRSS if the
    kernel has no VmHWM). Forked workers share some pages with their parent and each
    peaks at its own moment, so for a multi-process tree this is an upper bound."""
    total, seen = 0, False
    for pid in tree_pids(root_pid):
        value = status_bytes(pid, "VmHWM")
        if value is None:
            value = status_bytes(pid, "VmRSS")
        if value is not None:
            total += value
            seen = True
    return total if seen else None


def tree_rss_bytes(root_pid: int) -> int | None:
    """The tree's resident memory now (sum of VmRSS)."""
    values = [status_bytes(pid, "VmRSS") for pid in tree_pids(root_pid)]
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to its hard limit (children inherit
    it); return the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        # Linux refuses an infinite soft limit for NOFILE; the kernel's ceiling is
        # nr_open, so settle for a large finite value when the hard limit is unlimited.
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        # If refused, keep what we have: the hold scenario checks and says so.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def busy_ticks_of(cpus: Iterable[int]) -> int | None:
    """Clock ticks `cpus` spent on anything but idle and iowait (the hypervisor's steal
    included), summed, from `/proc/stat`; None off Linux."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    busy = 0
    try:
        with open(PROC / "stat") as stat:
            for line in stat:
                fields = line.split()
                if fields and fields[0] in wanted:
                    ticks = [int(value) for value in fields[1:9]]
                    busy += sum(ticks) - ticks[3] - ticks[4]
    except OSError:
        return None
    return busy
