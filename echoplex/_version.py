"""The version, in one place: the package, the wheel's metadata and the logs read it."""

__version__ = "0.1.0"
