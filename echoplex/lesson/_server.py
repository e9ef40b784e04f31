"""The lesson's server: `echoplex serve` as it is, telling the lesson when it accepts.

    python -m echoplex.lesson._server --mode simple --work io:100ms

It takes `echoplex serve`'s options (the same declarations), logs warnings to stderr,
and writes one line to stdout per event the lesson draws: `listening PORT` once, and
`accepted PEER_PORT MONOTONIC_S` per connection, the time read from the same system
clock as the lesson's clients (CLOCK_MONOTONIC is one clock for every process of the
machine), so a client's wait in the listen backlog can be told from its wait for an
echo. The `workers` model reports from each worker process: a line under PIPE_BUF
bytes written with one `os.write` is never interleaved with another's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .. import logs
from .._cli_util import Parser, add_options, config_from_args, fail, flags_for_settings
from ..config import ServerConfig
from ..errors import StartupError
from ..events import ConnectionRecord, LogEvents
from ..server import run

PROG = "echoplex lesson server"


class AcceptReporter(LogEvents):
    """Logs as `echoplex serve` does, and tells the lesson of each accept on stdout."""

    def listening(self, addresses: list[Any]) -> None:
        super().listening(addresses)
        _tell(f"listening {addresses[0][1]}")

    def connection_opened(self, record: ConnectionRecord) -> None:
        super().connection_opened(record)
        peer = record.peer
        if isinstance(peer, tuple) and len(peer) >= 2:
            _tell(f"accepted {peer[1]} {record.opened_at:.6f}")


def _tell(line: str) -> None:
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main() -> int:
    parser = Parser(prog=PROG)
    add_options(parser, ServerConfig)
    args = parser.parse_args()
    try:
        config = config_from_args(ServerConfig, args)
    except ValueError as exc:
        return fail(PROG, flags_for_settings(str(exc), ServerConfig))
    logs.configure("warning", "text", show_process=config.mode == "workers")
    try:
        run(config, AcceptReporter())
    except StartupError as exc:
        return fail(PROG, str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
