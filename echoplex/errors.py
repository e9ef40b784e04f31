"""Errors that end a command with one clear line instead of a traceback."""


class StartupError(Exception):
    """The server could not start as configured (busy port, missing extra, bad value)."""
