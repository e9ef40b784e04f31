"""Argument types and parser behaviour every echoplex command shares."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def port_number(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {value}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds, 0 or more, not {text}"
        )
    return value


def octal_mode(text: str) -> int:
    """File permissions in octal, like chmod: `600`, `0660`."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r} (e.g. 600)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"not a file mode: {text!r} (000 to 777)")
    return value


_SIZE = re.compile(r"\s*(\d+)\s*([kmg]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3}


def size_bytes(text: str, most: int = 1 << 30) -> int:
    """`1024`, `1K`/`1KiB` (1024), `1KB` (1000), `64KiB`, `2M`, `1MB`... 1 byte to `most`."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a size in bytes: {text!r} (examples: 512, 1K, 64KiB, 1MB)"
        )
    digits, prefix, binary, unit = match.groups()
    power = _POWERS[prefix.lower()]
    if binary and not prefix:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}")
    # K and KiB are binary, as most load tools read them; KB (no i) is decimal.
    base = 1000 if (unit and not binary and prefix) else 1024
    value = int(digits) * base**power
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be 1 byte to {_binary_size(most)}, not {text}")
    return value


def positive_seconds(text: str) -> float:
    value = non_negative_seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number per second: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


def _binary_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size:,} bytes"


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def fail(prog: str, message: str, status: int = 2) -> int:
    """Print `prog: error: message` and return the exit status to use."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def add_stream_transport_arguments(group: argparse._ArgumentGroup) -> None:
    """The client side's transport options, the same for `client` and `load`."""
    group.add_argument("--unix", metavar="PATH", help="connect to a Unix domain socket instead")
    group.add_argument(
        "--tls", action="store_true", help="speak TLS (1.2 or newer), verifying --host"
    )
    group.add_argument(
        "--ca", metavar="FILE", help="verify the server against this CA file (with --tls)"
    )
    group.add_argument(
        "--insecure", action="store_true", help="with --tls, verify nothing (testing only)"
    )
    group.add_argument(
        "--send-proxy",
        choices=("v1", "v2"),
        help="start each connection with a PROXY protocol header naming it (before TLS), "
        "as HAProxy's send-proxy does, to test a server behind one",
    )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def apply_environment(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str], prefix: str
) -> None:
    """Fill in options not given on the command line from `PREFIX_OPTION_NAME` variables
    (`--max-per-ip` from `ECHOPLEX_MAX_PER_IP`): flags win over the environment, the
    environment over defaults. A bad value is the parser's one-line error, naming it."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    known: set[str] = set()
    for action in parser._actions:  # argparse offers no public way to list them
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or action.dest in ("help", "version"):
            continue
        variable = prefix + long_options[0][2:].upper().replace("-", "_")
        known.add(variable)
        text = os.environ.get(variable)
        if text is None or given & set(action.option_strings):
            continue
        try:
            value = _from_environment(action, text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            parser.error(f"{variable}={text!r}: {exc}")
        setattr(args, action.dest, value)
    for variable in sorted(set(os.environ) - known):
        if variable.startswith(prefix):  # a typo would otherwise go unnoticed
            print(f"{parser.prog}: warning: ignoring {variable}: no such option", file=sys.stderr)


def _from_environment(action: argparse.Action, text: str) -> object:
    if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ValueError("expected 1/0, true/false, yes/no or on/off")
    if isinstance(action, argparse._AppendAction):
        return [_one_value(action, item) for item in text.replace(",", " ").split()]
    return _one_value(action, text)


def _one_value(action: argparse.Action, text: str) -> object:
    value = action.type(text) if callable(action.type) else text
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return value
