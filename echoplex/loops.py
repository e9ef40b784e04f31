"""Event loops by name, for whatever runs one: the asyncio server models, the UDP echo
and the load generator (as uvicorn's `loops/auto.py`: uvloop when it imports)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import StartupError

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(name: str) -> LoopFactory:
    """`auto`: uvloop if it imports, else the standard loop; `asyncio`; `uvloop` (a
    StartupError if it is not installed)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise StartupError(
                "uvloop is not installed: pip install 'echoplex[uvloop]', or use --loop asyncio"
            ) from None
        return asyncio.new_event_loop
    factory: LoopFactory = uvloop.new_event_loop
    return factory
