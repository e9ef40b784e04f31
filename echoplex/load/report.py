"""How a load run is shown: the live progress line, the summary, the JSON object."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from .engine import Progress, ProgressCallback
from .result import LoadResult

SAMPLES_SHOWN = 5
RATE_LIMIT_HINT = (
    "the server may be rate-limiting: see --udp-rate and --udp-rate-total of "
    "`echoplex serve` (0 turns a limit off)"
)


def to_json(result: LoadResult) -> str:
    return json.dumps(result.to_json(), ensure_ascii=False)


def format_summary(result: LoadResult) -> str:
    config = result.config
    lines = [_heading(result)]
    latency = result.latency
    lines.append(
        f"requests     {result.requests:,} verified   "
        f"{result.requests_per_s:,.1f} req/s   {result.mb_per_s:,.2f} MB/s"
    )
    if latency.count:
        lines.append(
            f"latency      p50 {latency.p50:,} µs   p90 {latency.p90:,} µs   "
            f"p99 {latency.p99:,} µs   p99.9 {latency.p999:,} µs   max {latency.max:,} µs"
        )
    else:
        lines.append("latency      no message measured")
    if result.send_lag is not None and result.send_lag.count:
        lag = result.send_lag
        lines.append(
            f"send lag     p50 {lag.p50:,} µs   p99 {lag.p99:,} µs   max {lag.max:,} µs   "
            "(client lateness, included in the latency)"
        )
    lines.append(
        f"connections  {result.connections_opened:,} opened of {config.connections:,} "
        f"in {result.connect_s:.2f} s, "
        f"{result.connections_alive:,} alive at the end"
    )
    if result.shares:
        lines.append("processes    " + _shares(result))
    by_kind = ", ".join(
        f"{kind} {count:,}" for kind, count in sorted(result.errors_by_kind.items())
    )
    lines.append(f"errors       {result.errors:,}" + (f" ({by_kind})" if by_kind else ""))
    lines += _samples([str(failure) for failure in result.error_samples], result.errors)
    lines.append(f"mismatches   {result.mismatches:,}")
    lines += _samples([str(mismatch) for mismatch in result.mismatch_samples], result.mismatches)
    if result.late_datagrams is not None:
        lines.append(
            f"late         {result.late_datagrams:,} datagrams echoed again, or after they "
            "were counted lost"
        )
    if result.high_udp_loss:
        lines.append(
            f"hint         {result.lost_datagrams:,} datagrams lost: {_udp_loss_hint(result)}"
        )
    if result.tls_suspected is not None:
        lines.append(f"hint         {result.tls_suspected}")
    cpu = f"client CPU   {result.client_cpu_s:.2f} s"
    if result.client_cpu_us_per_request is not None:
        cpu += f"   {result.client_cpu_us_per_request:,.1f} µs/request"
    lines.append(cpu)
    if result.interrupted:
        unfinished = (
            f", {result.unfinished:,} messages left unfinished" if result.unfinished else ""
        )
        lines.append(f"stopped      early, on request{unfinished}")
    lines.append("result       " + ("OK" if result.ok else "FAILED"))
    return "\n".join(lines)


def _udp_loss_hint(result: LoadResult) -> str:
    limit = result.udp_limit_met()
    if limit is None:
        return RATE_LIMIT_HINT
    return (
        f"{result.datagrams_answered:,} answered in {result.sending_s:.1f} s is about what "
        f"the server's {limit.what} rate limit lets through at its default ({limit.option} "
        f"{limit.rate_per_s:g}: a burst of {limit.burst:g}, then {limit.rate_per_s:g} a "
        f"second); start `echoplex serve` with {limit.option} 0 (no limit) or above the load"
    )


def _heading(result: LoadResult) -> str:
    config = result.config
    processes = f" over {result.processes} processes" if result.shares else ""
    parts = [
        config.pattern,
        f"{config.connections:,} connections{processes}",
        f"{config.size_bytes:,} B messages",
    ]
    parts += config.pattern_class.heading(config, result.measured_s)
    parts += [config.target, result.loop]
    return " · ".join(parts)


def _shares(result: LoadResult) -> str:
    """Each process's connections and what it verified: `0-4 26,025 verified; 5-9 ...`."""
    parts = []
    for share in result.shares:
        first = share.config.first_connection
        last = first + share.config.connections - 1
        numbers = f"{first}-{last}" if last > first else f"{first}"
        parts.append(f"connections {numbers}: {share.requests:,} verified")
    return f"{len(result.shares)} ({'; '.join(parts)})"


def _samples(texts: list[str], total: int) -> list[str]:
    lines = [f"  {text}" for text in texts[:SAMPLES_SHOWN]]
    if total > len(lines):
        lines.append(f"  … and {total - len(lines):,} more")
    return lines


def progress_line(progress: Progress) -> str:
    line = (
        f"{progress.phase:<10} {progress.elapsed_s:6.1f} s   "
        f"{progress.recent_per_s:,.0f} req/s   {progress.recent_mb_per_s:,.2f} MB/s   "
        f"p99 {progress.p99_us:,} µs   alive {progress.alive:,}/{progress.connections:,}"
    )
    if progress.errors or progress.mismatches:
        line += f"   errors {progress.errors:,}   mismatches {progress.mismatches:,}"
    return line


@contextlib.contextmanager
def live_progress(stream: IO[str] | None = None) -> Iterator[ProgressCallback | None]:
    """A callback that redraws one progress line, when `stream` is a terminal and rich
    is installed; None otherwise. The line is erased when the block ends."""
    stream = stream if stream is not None else sys.stdout
    if not stream.isatty():
        yield None
        return
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text
    except ImportError:
        yield None
        return
    # Redrawn from the run's own ticks: rich's auto-refresh thread would compete with
    # the event loop for the GIL.
    live: Any = Live(
        Text("connecting"),
        console=Console(file=stream),
        auto_refresh=False,
        transient=True,
    )

    def show(progress: Progress) -> None:
        live.update(Text(progress_line(progress)), refresh=True)

    with live:
        yield show
