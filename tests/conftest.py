from __future__ import annotations

from collections.abc import Iterator

import pytest

from echoplex import MODELS

from .procs import Server


@pytest.fixture(params=list(MODELS))
def mode(request: pytest.FixtureRequest) -> str:
    """Every concurrency model, in turn."""
    name: str = request.param
    return name


@pytest.fixture
def server(mode: str) -> Iterator[Server]:
    """A running `echoplex serve` of each model on a free port (2 workers for `workers`)."""
    with Server("--workers", "2", mode=mode) as running:
        yield running
