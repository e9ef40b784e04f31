"""Every benchmark figure the docs quote comes from a committed results file, and says so.

The convention (one rule for README.md, bench/README.md and docs/):

- Figures sit in a block that opens with ``<!-- figures: bench/results/DIR/results.md -->``
  on a line of its own and closes with ``<!-- /figures -->``.
- The block's visible text names its source: a Markdown link to that file, the run's
  date as ``3 December 2026``, the machine as ``Intel Xeon, 2 CPUs`` and the command
  the file was made with, in backticks, less its ``--out`` (the link names where it
  wrote, and no documented command writes into the committed results).
- A figure in its prose (a number with a unit: ``x``, ``k``, ``requests/s``, ``req/s``,
  ``round trips/s``, ``µs``, ``MiB``, ``KiB``, ``MB/s``, ``%``; a range ``0.74-0.90x``
  counts as both ends) is written exactly as the file has it. A ratio the file does not
  print is followed by how to compute it from the results.json beside it:
  ``1.48x<!-- ratio: asyncio/threads requests_per_s -->``, with ``at POINT`` when the
  file has more than one load point; it must be right to the digits written.
- A table's cells are the file's: each column header is a column of one of the file's
  tables (the nth ``agree`` is the nth), and each row is that table's row of the same
  server (and load, when the file has more than one).
- Outside a block, no line of README.md or bench/README.md quotes a throughput, a CPU
  time per request or a ratio: such a figure has no source.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "bench/README.md", "docs/operations.md", "docs/lesson.md"]
# lesson.md's figures are the lesson's own output, quoted from docs/lesson/lesson.json.
GUARDED_DOCS = ["README.md", "bench/README.md", "docs/operations.md"]

BLOCK = re.compile(r"^<!-- figures: (\S+) -->\n(.*?)^<!-- /figures -->", re.S | re.M)
RATIO_NOTE = re.compile(r"(\d+\.\d+)x<!-- ratio: (\S+)/(\S+) (\w+)(?: at (.+?))? -->")
COMMENT = re.compile(r"<!--.*?-->", re.S)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
NUMBER = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(
    rf"(?<![\w.,/-])({NUMBER})(?:-({NUMBER}))?"
    r"(x\b|k\b| ?(?:requests/s|req/s|round trips/s|µs|MiB|KiB|MB/s|%))"
)
FILE_TOKEN = re.compile(rf"{NUMBER}x?")
UNSOURCED = re.compile(
    rf"{NUMBER}(?:-{NUMBER})?(?:k? (?:requests/s|req/s|round trips/s)|\s?µs|x\b)"
)


@dataclass(frozen=True)
class Block:
    doc: str
    source: str
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        found += [Block(doc, m.group(1), m.group(2)) for m in BLOCK.finditer(text)]
    return found


def block_id(block: Block) -> str:
    return f"{block.doc}:{block.source}:{block.text[:40]!r}"


BLOCKS = blocks()


def tables(markdown: str) -> list[Table]:
    found = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(cells(lines[j]))
                j += 1
            found.append(Table(cells(lines[i]), rows))
            i = j
        else:
            i += 1
    return found


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def prose(markdown: str) -> str:
    """The block's text that is neither a table, a fenced command nor a code span."""
    text = FENCE.sub("", markdown)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    return CODE_SPAN.sub("", text)


def results_md(block: Block) -> str:
    return (ROOT / block.source).read_text(encoding="utf-8")


def results_json(block: Block) -> dict:
    return json.loads((ROOT / block.source).with_name("results.json").read_text("utf-8"))


def machine_name(machine: dict) -> str:
    model = re.sub(r"\((R|TM)\)|\bProcessor\b", "", machine["cpu_model"])
    return f"{' '.join(model.split())}, {machine['cpus']} CPUs"


def recorded_command(report: dict) -> str:
    """The command the file records, without its `--out`: the file's place is named by
    the link, and a documented command never writes into the committed results."""
    return re.sub(r" --out[ =]\S+", "", report["command"])


def run_date(started_at: str) -> str:
    day = datetime.fromisoformat(started_at)
    return f"{day.day} {day:%B} {day.year}"


def naming_problems(block: Block) -> list[str]:
    if not (block.source.startswith("bench/results/") and block.source.endswith("/results.md")):
        return [f"{block.source} is not a results.md under bench/results/"]
    if not (ROOT / block.source).is_file():
        return [f"{block.source} is not in the tree"]
    link = Path(block.source).relative_to(Path(block.doc).parent).as_posix()
    report = results_json(block)
    visible = " ".join(COMMENT.sub("", block.text).split())
    wanted = {
        "link": f"]({link})",
        "date": run_date(report["started_at"]),
        "machine": machine_name(report["machine"]),
        "command": f"`{recorded_command(report)}`",
    }
    return [f"no {what}: {text}" for what, text in wanted.items() if text not in visible]


def prose_problems(block: Block) -> list[str]:
    written = set(FILE_TOKEN.findall(results_md(block)))
    text = RATIO_NOTE.sub("", block.text)  # computed ratios are checked on their own
    wrong = []
    for low, high, unit in FIGURE.findall(COMMENT.sub("", prose(text))):
        suffix = unit if unit in ("x", "k") else ""
        wrong += [f"{f}{unit}" for f in (low, high) if f and f + suffix not in written]
    return [f"not in {block.source}: {figure}" for figure in wrong]


def ratio_problems(block: Block) -> list[str]:
    rows = [row for scenario in results_json(block)["scenarios"] for row in scenario["rows"]]

    def value(server: str, field: str, point: str) -> float:
        matches = [r for r in rows if r["server"] == server and point in ("", r["point"])]
        assert len(matches) == 1, f"{server} at {point or 'its one point'}: {len(matches)} rows"
        return float(matches[0][field])

    wrong = []
    for shown, numerator, denominator, field, point in RATIO_NOTE.findall(block.text):
        ratio = value(numerator, field, point) / value(denominator, field, point)
        if f"{ratio:.{len(shown.split('.')[1])}f}" != shown:
            wrong.append(f"{numerator}/{denominator} {field} is {ratio:.4f}, not {shown}x")
    return wrong


def table_problems(block: Block) -> list[str]:
    file_tables = tables(results_md(block))
    wrong = []
    for table in tables(FENCE.sub("", block.text)):
        columns = [file_column(file_tables, table.header, i) for i in range(len(table.header))]
        for row in table.rows:
            for (file_table, index), header, cell in zip(columns, table.header, row, strict=True):
                expected = file_cell(file_table, table.header, row, index)
                if cell != expected:
                    wrong.append(f"{row[:2]} {header}: {cell}, the file has {expected}")
    return wrong


def file_column(file_tables: list[Table], header: list[str], i: int) -> tuple[Table, int]:
    name = header[i]
    nth = header[:i].count(name)
    for table in file_tables:
        positions = [j for j, h in enumerate(table.header) if h == name]
        keys_there = all(k in table.header for k in ("load", "server") if k in header)
        if len(positions) > nth and keys_there:
            return table, positions[nth]
    raise AssertionError(f"column {name!r} (with {header}) is in no table of the file")


def file_cell(file_table: Table, header: list[str], row: list[str], index: int) -> str:
    keys = [h for h in ("load", "server") if h in header]
    assert "server" in keys, f"a table of figures needs a server column: {header}"
    wanted = {key: row[header.index(key)] for key in keys}
    matches = [
        r
        for r in file_table.rows
        if all(r[file_table.header.index(k)] == v for k, v in wanted.items())
    ]
    assert len(matches) == 1, f"{wanted}: {len(matches)} rows of the file (add a load column?)"
    return matches[0][index]


def unsourced_lines(markdown: str) -> list[str]:
    text = BLOCK.sub("", markdown)
    visible = CODE_SPAN.sub("", FENCE.sub("", COMMENT.sub("", text)))
    return [line for line in visible.splitlines() if UNSOURCED.search(line)]


def test_the_docs_have_figure_blocks():
    # Without blocks every other test here would pass on nothing.
    assert {b.doc for b in BLOCKS} >= {"README.md", "bench/README.md"}


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_a_block_names_its_file_date_machine_and_command(block):
    assert naming_problems(block) == []


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_prose_figures_are_the_files(block):
    assert prose_problems(block) == []


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_computed_ratios_are_right(block):
    assert ratio_problems(block) == []


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_table_cells_are_the_files(block):
    assert table_problems(block) == []


@pytest.mark.parametrize("doc", GUARDED_DOCS)
def test_no_figure_outside_a_block(doc):
    assert unsourced_lines((ROOT / doc).read_text(encoding="utf-8")) == []


# What someone editing the docs might do, applied to the real blocks.


def bumped(figure: str, written: set[str]) -> str:
    """The figure with its last digit changed, to a value the file does not have."""
    for step in range(1, 10):
        digits = [i for i, c in enumerate(figure) if c.isdigit()]
        last = digits[-1]
        candidate = figure[:last] + str((int(figure[last]) + step) % 10) + figure[last + 1 :]
        if candidate not in written and candidate + "x" not in written:
            return candidate
    raise AssertionError(f"no edit of {figure} is missing from the file")


def blocks_with(pattern: re.Pattern[str], *, in_tables: bool = False) -> list[Block]:
    def text_of(block: Block) -> str:
        if in_tables:
            return "\n".join(line for line in block.text.splitlines() if line.startswith("| "))
        return COMMENT.sub("", prose(RATIO_NOTE.sub("", block.text)))

    return [b for b in BLOCKS if pattern.search(text_of(b))]


def test_an_edited_prose_figure_fails():
    block = blocks_with(FIGURE)[0]
    written = set(FILE_TOKEN.findall(results_md(block)))
    figure = FIGURE.search(COMMENT.sub("", prose(RATIO_NOTE.sub("", block.text))))
    assert figure is not None
    old = figure.group(0)
    new = old.replace(figure.group(1), bumped(figure.group(1), written), 1)
    assert prose_problems(replace(block, text=block.text.replace(old, new, 1))) != []


def test_an_edited_computed_ratio_fails():
    block = next(b for b in BLOCKS if RATIO_NOTE.search(b.text))
    note = RATIO_NOTE.search(block.text)
    assert note is not None
    shown = note.group(1)
    other = f"{float(shown) + 0.01:.{len(shown.split('.')[1])}f}"
    edited = block.text.replace(note.group(0), note.group(0).replace(shown, other, 1), 1)
    assert ratio_problems(replace(block, text=edited)) != []


def test_an_edited_table_cell_fails():
    block = next(b for b in BLOCKS if tables(FENCE.sub("", b.text)))
    written = set(FILE_TOKEN.findall(results_md(block)))
    line = next(ln for ln in block.text.splitlines() if ln.startswith("| ") and "," in ln)
    figure = next(c for c in cells(line) if re.fullmatch(r"\d{1,3}(,\d{3})+", c))
    edited = block.text.replace(line, line.replace(figure, bumped(figure, written), 1))
    assert table_problems(replace(block, text=edited)) != []


def test_a_rounded_figure_fails():
    block = next(b for b in BLOCKS if b.source == "bench/results/results.md")
    edited = block.text + "It served 42k requests/s.\n"
    assert prose_problems(replace(block, text=edited)) == ["not in bench/results/results.md: 42k"]


def test_another_runs_date_fails():
    block = next(b for b in BLOCKS if b.source == "bench/results/targets/results.md")
    edited = re.sub(r"3\s+December\s+2026", "2 December 2026", block.text)
    assert any(p.startswith("no date") for p in naming_problems(replace(block, text=edited)))


def test_a_figure_with_no_block_fails():
    prose_line = "`asyncio` echoes about 134k requests/s at 7.1 CPU µs each, 1.48x `threads`."
    assert len(unsourced_lines(f"Intro.\n\n{prose_line}\n")) == 1
