"""How the lesson shows itself: plain text (the standard library only), or with rich a
live view while each scene runs and a table per step; nothing at all under `--json`.

rich is imported only by `RichView`, when it is there: the lesson must run from a
clone with a bare `python3`.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .results import StepResult

WIDTH = 88
AGREES = {True: "as the textbook says", False: "NOT as the textbook says", None: "measured"}


class PlainView:
    """The lesson as plain text on stdout, flushed line by line (a pipe follows it)."""

    def say(self, text: str = "") -> None:
        for paragraph in text.split("\n"):
            wrapped = textwrap.fill(paragraph, WIDTH, subsequent_indent=_indent(paragraph))
            print(wrapped, flush=True)

    def code(self, text: str) -> None:
        print(textwrap.indent(text.rstrip("\n"), "    "), flush=True)

    def begin_step(self, step: StepResult) -> None:
        self.say(f"\n== Step {step.number}. {step.title}\n")
        self.say(f"What it shows: {step.shows}")
        self.say(f"The textbook expects: {step.expected}\n")

    @contextlib.contextmanager
    def watching(self, label: str, status: Callable[[], str]) -> Iterator[None]:
        print(f"  {label} ...", end="", flush=True)
        try:
            yield
        finally:
            print(f" {status()}", flush=True)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [
            max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)
        ]
        print(f"\n{title}", flush=True)
        for line in (headers, ["-" * width for width in widths], *rows):
            print(
                "  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths, strict=True)),
                flush=True,
            )
        print(flush=True)

    def findings(self, step: StepResult) -> None:
        self.say("What was measured:")
        for finding in step.findings:
            self.say(f"  - {finding.text} ({AGREES[finding.agrees]})")

    def pause(self, prompt: str) -> None:
        with contextlib.suppress(EOFError):
            input(prompt)


class QuietView(PlainView):
    """`--json`: the figures go to stdout as JSON, and nothing else does."""

    def say(self, text: str = "") -> None:
        pass

    def code(self, text: str) -> None:
        pass

    @contextlib.contextmanager
    def watching(self, label: str, status: Callable[[], str]) -> Iterator[None]:
        yield

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        pass

    def findings(self, step: StepResult) -> None:
        pass


class RichView(PlainView):
    """With rich on a terminal: a live status line per scene and real tables."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)

    def say(self, text: str = "") -> None:
        self.console.print(text, markup=False, width=min(self.console.width, WIDTH))

    @contextlib.contextmanager
    def watching(self, label: str, status: Callable[[], str]) -> Iterator[None]:
        from rich.live import Live
        from rich.text import Text

        def render() -> Any:
            return Text(f"  {label}: {status()}")

        with Live(get_renderable=render, console=self.console, refresh_per_second=8):
            yield

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    def findings(self, step: StepResult) -> None:
        self.console.print("What was measured:")
        for finding in step.findings:
            colour = {True: "green", False: "bold red", None: "default"}[finding.agrees]
            self.console.print(
                f"  - {finding.text} ([{colour}]{AGREES[finding.agrees]}[/])",
                highlight=False,
                width=min(self.console.width, WIDTH),
            )


def _indent(paragraph: str) -> str:
    """A list item's continuation lines line up under its text."""
    stripped = paragraph.lstrip()
    lead = len(paragraph) - len(stripped)
    return " " * (lead + 2) if stripped.startswith("- ") else " " * lead


def choose_view(json_output: bool) -> PlainView:
    """Quiet under --json; rich on a terminal when it is installed; else plain text."""
    if json_output:
        return QuietView()
    if sys.stdout.isatty():
        try:
            import rich  # noqa: F401
        except ImportError:
            return PlainView()
        return RichView()
    return PlainView()


def has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
