"""echoplex: a concurrent TCP echo server toolkit.

Five concurrency models behind one contract (`echoplex.models`), one config object
(`ServerConfig`), and `run()` to serve until stopped.
"""

from ._version import __version__
from .config import ServerConfig
from .errors import StartupError
from .events import ConnectionRecord, LogEvents, QuietEvents, ServerEvents
from .models import MODELS
from .server import run
from .shutdown import Shutdown

__all__ = [
    "MODELS",
    "ConnectionRecord",
    "LogEvents",
    "QuietEvents",
    "ServerConfig",
    "ServerEvents",
    "Shutdown",
    "StartupError",
    "__version__",
    "run",
]
