"""Rewrite committed bench results by rerunning the commands they record:

    python -m echoplex.bench.regenerate bench/results

Every results.json under the directories given holds the `echoplex bench` command that
made it. Each is run again, one after another, with `--out` the directory its
results.json is in, so the committed results are remade by exactly the commands they
say made them. This rewrites tracked files, which is what it is for: every other
documented bench command writes into the ignored `bench/out/` (the bench's default).
`--dry-run` prints the commands without running them.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .._cli_util import Parser, fail

PROG = "python -m echoplex.bench.regenerate"
OUT_FLAG = "--out"


def recorded_runs(top: Path) -> list[tuple[Path, list[str]]]:
    """Each results.json's directory under `top` (in path order) and the `echoplex bench`
    flags that remake it there: its recorded command's, with `--out` that directory."""
    runs = []
    for json_path in sorted(top.rglob("results.json")):
        try:
            argv = shlex.split(json.loads(json_path.read_text())["command"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{json_path} records no bench command ({exc})") from None
        if argv[:2] != ["echoplex", "bench"]:
            raise ValueError(f"{json_path} records {shlex.join(argv)!r}, not an echoplex bench")
        runs.append((json_path.parent, [*_without_out(argv[2:]), OUT_FLAG, str(json_path.parent)]))
    return runs


def _without_out(flags: Sequence[str]) -> list[str]:
    """`flags` without their `--out DIR` (or `--out=DIR`): where it was written then."""
    kept: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
        elif flag == OUT_FLAG:
            skip = True
        elif not flag.startswith(OUT_FLAG + "="):
            kept.append(flag)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(
        prog=PROG,
        description="Rerun the bench command each committed results.json records, into "
        "its own directory: this rewrites those (tracked) files.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="DIR", help="a directory of bench results"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        runs = [run for path in args.paths for run in recorded_runs(path)]
    except (OSError, ValueError) as exc:
        return fail(PROG, str(exc))
    if not runs:
        return fail(PROG, f"no results.json under {', '.join(map(str, args.paths))}")
    for _, flags in runs:
        print(shlex.join(["echoplex", "bench", *flags]), flush=True)
        if args.dry_run:
            continue
        bench = [sys.executable, "-m", "echoplex", "bench", *flags]
        status = subprocess.run(bench, check=False).returncode
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
