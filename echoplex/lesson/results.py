"""What one step of the lesson measured, as the text, the JSON and the pictures read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .clients import ClientTimes


@dataclass
class Finding:
    """One thing measured, in words, and whether it is what the textbook says
    (None: nothing to compare, a figure alone)."""

    text: str
    agrees: bool | None = None


@dataclass
class ModelRun:
    """One model's run of a step: its clients (steps 1 to 3) or its figures (step 4)."""

    model: str
    server_args: list[str]
    clients: list[ClientTimes] = field(default_factory=list)
    whole_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def client(self, name: str) -> ClientTimes | None:
        return next((client for client in self.clients if client.name == name), None)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ModelRun:
        """A run read back from lesson.json (`as_json`'s inverse)."""
        known = {"model", "server_args", "whole_s", "clients", "error"}
        return cls(
            entry["model"],
            entry["server_args"],
            [ClientTimes(**client) for client in entry["clients"]],
            entry["whole_s"],
            {key: value for key, value in entry.items() if key not in known},
            entry["error"],
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "server_args": self.server_args,
            "whole_s": None if self.whole_s is None else round(self.whole_s, 6),
            "clients": [client.as_json() for client in self.clients],
            **self.figures,
            "error": self.error,
        }


@dataclass
class StepResult:
    number: int
    title: str
    shows: str
    expected: str
    runs: list[ModelRun] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    skipped: str | None = None
    pictures: list[str] = field(default_factory=list)

    def run_of(self, model: str) -> ModelRun | None:
        return next((run for run in self.runs if run.model == model and run.error is None), None)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> StepResult:
        """A step read back from lesson.json, to draw it again or build on it."""
        return cls(
            entry["step"],
            entry["title"],
            entry["shows"],
            entry["expected"],
            [ModelRun.from_json(run) for run in entry["runs"]],
            [Finding(f["text"], f["agrees"]) for f in entry["findings"]],
            entry["skipped"],
            list(entry["pictures"]),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.number,
            "title": self.title,
            "shows": self.shows,
            "expected": self.expected,
            "skipped": self.skipped,
            "runs": [run.as_json() for run in self.runs],
            "findings": [{"text": f.text, "agrees": f.agrees} for f in self.findings],
            "pictures": self.pictures,
        }
