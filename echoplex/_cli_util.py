"""Argument types, option declarations and parser behaviour every echoplex command shares.

A config dataclass declares each of its options once, beside the field, with `option()`:
flag, help, group, argument type and (through the flag) environment variable.
`add_options` generates the argparse options from those declarations, the parser's
environment overlay reads the same options, `config_from_args` maps the parsed values
back onto the fields, and `flags_for_settings` turns the `field` names a config's
errors speak of into the flags the user typed.

Every bad value, on the command line or in an `ECHOPLEX_*` variable, is one line on
stderr and exit status 2: the types below turn what would fail deeper down (an IDNA
encoding error, a C integer overflow, a Unix socket path the kernel cannot hold) into
the parser's own error, naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

from ._net import check_host, check_unix_path

# A timeout of a few hundred years overflows the C time types under the socket calls
# (`settimeout(1e300)` raises OverflowError), and no echo run needs more than a year.
MAX_SECONDS = 365 * 24 * 3600.0


class _ReplacingAppend(argparse._AppendAction):
    """`action="append"` whose first flag replaces the default list (set by the code or
    by an `ECHOPLEX_*` variable) instead of adding to it: flags win over the environment."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2, which takes
    no abbreviated options (`--max-conn` is not `--max-connections`: an abbreviation
    would stop working the day another option shares its prefix), and which, given an
    environment prefix, reads options from the environment (see `read_environment`)."""

    environment_prefix: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("action", "append", _ReplacingAppend)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

    def read_environment(self, prefix: str) -> None:
        """Take every long option also from `PREFIX_OPTION_NAME` (`--max-per-ip` from
        `ECHOPLEX_MAX_PER_IP`), named in its help. Flags win over the environment, the
        environment over defaults: the variables become the defaults of each parse, so
        argparse itself decides what the command line gave, however it was spelt."""
        self.environment_prefix = prefix
        for action, variable in environment_variables(self, prefix):
            if action.help is not None and action.help is not argparse.SUPPRESS:
                action.help = f"{action.help} [env {variable}]"
        self.epilog = (
            f"Every option can also be set by the {prefix}* variable named in its help "
            "(lists comma-separated; booleans 1/0, true/false, yes/no, on/off). A flag "
            "wins over the environment, the environment over the default."
            + (f" {self.epilog}" if self.epilog else "")
        )

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self.environment_prefix is None:
            return super().parse_known_args(args, namespace)
        declared = {action: action.default for action in self._actions}
        try:
            for action, value in self._environment_defaults(self.environment_prefix):
                action.default = value
            return super().parse_known_args(args, namespace)
        finally:
            for action, default in declared.items():
                action.default = default

    def _environment_defaults(self, prefix: str) -> list[tuple[argparse.Action, object]]:
        """Each option's value from its variable; a bad value is the parser's one-line
        error, naming the variable; an empty one counts as unset; a variable no option
        reads is warned about."""
        values = []
        known = set()
        for action, variable in environment_variables(self, prefix):
            known.add(variable)
            text = os.environ.get(variable)
            if text is None or not text.strip():
                continue  # unset, or left empty by a template: the default stands
            try:
                values.append((action, _from_environment(action, text)))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                self.error(f"{variable}={text!r}: {exc}")
        for variable in sorted(set(os.environ) - known):
            if variable.startswith(prefix):  # a typo would otherwise go unnoticed
                print(f"{self.prog}: warning: ignoring {variable}: no such option", file=sys.stderr)
        return values


def environment_variables(
    parser: argparse.ArgumentParser, prefix: str
) -> list[tuple[argparse.Action, str]]:
    """(option, its variable) for every long option but --help and --version: the first
    long spelling, upper-cased, dashes as underscores, after `prefix`."""
    pairs = []
    for action in parser._actions:  # argparse offers no public way to list them
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if long_options and action.dest not in ("help", "version"):
            pairs.append((action, prefix + long_options[0][2:].upper().replace("-", "_")))
    return pairs


def port_number(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {value}")
    return value


def target_port(text: str) -> int:
    """A port to connect to: 1..65535 (0 means "any" only when listening)."""
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, not {value}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def at_most(most: int, type_: Callable[[str], int]) -> Callable[[str], int]:
    """`type_`, also refusing a value above `most` (one a C int or the OS cannot hold)."""

    def bounded(text: str) -> int:
        value = type_(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, not {value}")
        return value

    bounded.__name__ = type_.__name__
    return bounded


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def non_negative_seconds(text: str) -> float:
    """A duration: seconds (`2.5`), or with a unit as wrk and fortio take them: `500ms`,
    `10s`, `1m`, `2h`."""
    match = _DURATION.fullmatch(text)
    try:
        if match is None:
            value = float(text)  # a number out of range (-3, inf, nan) is told so below
        else:
            number, unit = match.groups()
            value = float(number) * _SECONDS_PER_UNIT[(unit or "s").lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (seconds, or with a unit: 500ms, 10s, 1m, 2h)"
        ) from None
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be 0 or more seconds, at most a year ({MAX_SECONDS:.0f}), not {text}"
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


_SIZE = re.compile(r"\s*([0-9]{1,20})\s*([kmg]?)(i?)(b?)\s*", re.IGNORECASE)
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
        raise argparse.ArgumentTypeError(f"must be 1 byte to {binary_size(most)}, not {text}")
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


def binary_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size:,} bytes"


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def datagram_rate(text: str) -> float:
    """Datagrams per second: a finite number, 0 (no limit) or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of datagrams a second: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite rate, 0 (no limit) or more, not {text}")
    return value


def host_name(text: str) -> str:
    """An address or a name that can be looked up (see `echoplex._net.check_host`)."""
    return _checked(check_host, text)


def unix_socket_path(text: str) -> str:
    """A path a Unix socket can have: not empty, no NUL, short enough for the kernel."""
    return _checked(check_unix_path, text)


def file_path(text: str) -> str:
    """A path the OS can be asked about (a NUL makes open() raise ValueError)."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"not a file path: {text!r}")
    return text


def _checked(check: Callable[[str], str], text: str) -> str:
    try:
        return check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def one_line(message: str) -> str:
    """`message` with its line breaks escaped: a value echoed back in an error (a path, a
    name) must not split the error over lines, nor forge a line of its own."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def fail(prog: str, message: str, status: int = 2) -> int:
    """Print `prog: error: message` and return the exit status to use."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return status


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


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


# ---------------------------------------------------------------- options declared once

OPTION = "echoplex.option"  # the key of an `Option` in a dataclass field's metadata


@dataclasses.dataclass(frozen=True)
class Option:
    """How one config field is set from the command line, and so from the environment:
    its `PREFIX_FLAG_NAME` variable is the flag's name (see `environment_variables`).

    The kind of option follows the field's type: a `bool` is a switch (`negatable`
    adds `--no-FLAG`), a tuple a repeatable option, anything else takes one value,
    checked by `parse` (an argparse type, whose error names the flag)."""

    flag: str
    help: str
    """May hold `{default}`: the field's default, as `show` writes it (`:g` for floats)."""
    parse: Callable[[str], Any] | None = None
    group: str | None = None
    """Title of the help section; None: the command's own options."""
    metavar: str | None = None
    choices: Sequence[str] | None = None
    short: str | None = None
    show: Callable[[Any], str] | None = None
    negatable: bool = False


def option(default: Any, flag: str, help: str, **declaration: Any) -> Any:
    """A dataclass field with this default, settable by `flag` (see `Option`)."""
    return dataclasses.field(default=default, metadata={OPTION: Option(flag, help, **declaration)})


def described(choices: dict[str, str]) -> str:
    """Each choice with what it means, for an option's help: `a: this; b: that`."""
    return "; ".join(f"{name}: {text}" for name, text in choices.items())


def options_of(config_class: type) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """(field, its option) for every field of `config_class` that declares one."""
    for config_field in dataclasses.fields(config_class):
        declared = config_field.metadata.get(OPTION)
        if declared is not None:
            yield config_field, declared


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    *,
    only: Sequence[str] | None = None,
    dest_from_flag: bool = False,
) -> None:
    """An argparse option for each field of `config_class` with an `option()`, its dest
    the field's name and its default the field's, in help sections by `group`.

    With `only`, just those fields, all in `parser` (the caller's section); with
    `dest_from_flag`, each value is stored under its flag's name, as argparse would."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str | None, Any] = {None: parser}
    for config_field, declared in options_of(config_class):
        if only is not None:
            if config_field.name not in only:
                continue
        elif declared.group not in groups:
            groups[declared.group] = parser.add_argument_group(declared.group)
        default = config_field.default
        shown = (declared.show or _shown)(default)
        kwargs: dict[str, Any] = {
            "dest": declared.flag[2:].replace("-", "_") if dest_from_flag else config_field.name,
            "default": default,
            "help": declared.help.format(default=shown),
        }
        hint = hints[config_field.name]
        if hint is bool:
            kwargs["action"] = (
                argparse.BooleanOptionalAction if declared.negatable else "store_true"
            )
        else:
            if typing.get_origin(hint) is tuple:
                kwargs["action"] = _ReplacingAppend
            kwargs["type"] = declared.parse
            kwargs["choices"] = declared.choices
            if declared.choices is None:
                kwargs["metavar"] = declared.metavar or declared.flag[2:].upper()
        flags = [declared.short, declared.flag] if declared.short else [declared.flag]
        groups[None if only is not None else declared.group].add_argument(*flags, **kwargs)


Config = TypeVar("Config")


def config_from_args(config_class: Callable[..., Config], args: argparse.Namespace) -> Config:
    """`config_class` built from the options `add_options` gave `args` (a repeated
    option's list becomes the field's tuple); the config resolves its own defaults."""
    settings = {}
    for config_field, _ in options_of(typing.cast(type, config_class)):
        value = getattr(args, config_field.name)
        settings[config_field.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**settings)


def flags_for_settings(message: str, config_class: type) -> str:
    """A config's error, which names settings as `field_name`, naming their flags instead
    (`proxy_protocol` -> --proxy-protocol), as the user of the command typed them."""
    flags = {
        config_field.name: declared.flag for config_field, declared in options_of(config_class)
    }
    return re.sub(r"`(\w+)`", lambda match: flags.get(match[1], match[0]), message)


def _shown(default: object) -> str:
    return f"{default:g}" if isinstance(default, float) else str(default)
