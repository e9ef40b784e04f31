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
from collections.abc import Callable, Collection, Iterator, Sequence
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
    is_subcommand = False
    """A subcommand's parser takes every word after the command's name: one it does not
    know is its error (`echoplex serve: error: ...`), not the top parser's."""

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
        parsed, unknown = self._parse_with_environment(args, namespace)
        if unknown and self.is_subcommand:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown

    def _parse_with_environment(
        self, args: Sequence[str] | None, namespace: argparse.Namespace | None
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


@dataclasses.dataclass(frozen=True)
class Bounded:
    """An argparse type for a number in a range, the range declared once: called with
    the text, it reads the number and checks it; a config's `__post_init__` checks a
    number given through the API with the same `check` (see `check_declared`), so both
    refuse the same values in the same words.

    The words may name `{least}`, `{most}` and `{value}`: the text typed, or for a value
    given through the API, the value as `show` writes it."""

    read: Callable[[str], Any]
    """Text to a number; an ArgumentTypeError if it is not one."""
    least: float
    most: float
    too_low: str = "must be at least {least}, not {value}"
    too_high: str = "must be at most {most}, not {value}"
    least_excluded: str | None = None
    """The words for `least` itself, if it is out of the range (None: it is in)."""
    show: Callable[[Any], str] = lambda value: _shown(value)
    metavar: str | None = None
    """What the help calls such a value (default: by `read`, see `kind_of`)."""

    def __call__(self, text: str) -> Any:
        value = self.read(text)
        self.check(value, text)
        return value

    def check(self, value: Any, text: str | None = None) -> None:
        """An ArgumentTypeError if `value` is out of range (NaN is: it is in no range)."""
        if value == self.least and self.least_excluded is not None:
            words = self.least_excluded
        elif value < self.least:
            words = self.too_low
        elif not value <= self.most:
            words = self.too_high
        else:
            return
        shown = self.show(value) if text is None else text
        raise argparse.ArgumentTypeError(
            words.format(least=_shown(self.least), most=_shown(self.most), value=shown)
        )


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def whole_number(least: int, most: float = math.inf) -> Bounded:
    """A whole number from `least` to `most`."""
    too_low = "must be 0 or more, not {value}" if least == 0 else Bounded.too_low
    return Bounded(_integer, least, most, too_low)


positive_int = whole_number(1)
non_negative_int = whole_number(0)


def at_most(most: int, type_: Bounded) -> Bounded:
    """`type_`, also refusing a value above `most` (one a C int or the OS cannot hold)."""
    return dataclasses.replace(type_, most=most)


_PORT = "port must be {least}..{most}, not {value}"
port_number = Bounded(_integer, 0, 65535, _PORT, _PORT, metavar="PORT")
"""A port to listen on: 0..65535, 0 meaning any free one."""
target_port = Bounded(_integer, 1, 65535, _PORT, _PORT, metavar="PORT")
"""A port to connect to: 1..65535 (0 means "any" only when listening)."""

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """Seconds (`2.5`), or with a unit as wrk and fortio take them: `500ms`, `10s`, `1m`,
    `2h`."""
    match = _DURATION.fullmatch(text)
    try:
        if match is None:
            return float(text)  # a number out of range (-3, inf, nan) is told so by the range
        number, unit = match.groups()
        return float(number) * _SECONDS_PER_UNIT[(unit or "s").lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (seconds, or with a unit: 500ms, 10s, 1m, 2h)"
        ) from None


def seconds_written(seconds: float) -> str:
    """A duration with its unit, as `_duration` reads it back exactly: `300s`, `2.5s`,
    `500ms`, `0s` (help and reproduced command lines then never show a bare number)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        return _shown(seconds)  # out of every range: bare, as `_duration` reads it back
    milliseconds = _shown(round(seconds * 1000, 6))
    if 0 < seconds < 1 and float(milliseconds) * _SECONDS_PER_UNIT["ms"] == seconds:
        return f"{milliseconds}ms"
    return f"{_shown(float(seconds))}s"


_A_YEAR = f"must be 0 or more seconds, at most a year ({MAX_SECONDS:.0f}), not {{value}}"
non_negative_seconds = Bounded(_duration, 0, MAX_SECONDS, _A_YEAR, _A_YEAR, show=seconds_written)
positive_seconds = Bounded(
    _duration,
    0,
    MAX_SECONDS,
    _A_YEAR,
    _A_YEAR,
    least_excluded="must be more than 0 seconds",
    show=seconds_written,
)


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r} (e.g. 600)") from None


_FILE_MODE = "not a file mode: {value} (000 to 777)"
octal_mode = Bounded(
    _octal, 0, 0o777, _FILE_MODE, _FILE_MODE, show=lambda mode: f"{mode:o}", metavar="MODE"
)
"""File permissions in octal, like chmod: `600`, `0660`."""


_SIZE = re.compile(r"\s*(-?[0-9]{1,20})\s*([kmg]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3}


def _size(text: str) -> int:
    """`1024`, `1K`/`1KiB` (1024), `1KB` (1000), `64KiB`, `2M`, `1MB`..."""
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
    return int(digits) * base**power


def byte_size(most: int, least: int = 1) -> Bounded:
    """A size in bytes (see `_size`), `least` (1 byte, or 0) to `most`."""
    words = f"must be {least} byte{'s' if least != 1 else ''} to {binary_size(most)}, not {{value}}"
    return Bounded(_size, least, most, words, words, show=_size_written)


def fraction(what: str) -> Bounded:
    """A share from 0 to 1 (`0.25`) of `what`."""
    words = f"must be a fraction of {what} from 0 to 1, not {{value}}"
    return Bounded(_number("from 0 to 1"), 0, 1, words, words, metavar="FRACTION")


def _size_written(size: int) -> str:
    """A size as `_size` reads it back: `64KiB`, or a number of bytes."""
    return binary_size(size) if size > 0 and size % 1024 == 0 else str(size)


def size_bytes(text: str, most: int = 1 << 30) -> int:
    """`text` as a size in bytes, 1 byte to `most` (see `byte_size`)."""
    value: int = byte_size(most)(text)
    return value


def _number(what: str) -> Callable[[str], float]:
    def read(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number {what}: {text!r}") from None

    return read


# The largest finite float: a rate must be finite (inf and NaN are out of range).
_FINITE = sys.float_info.max
_ABOVE_0 = "must be a finite number above 0, not {value}"
positive_rate = Bounded(
    _number("per second"), 0, _FINITE, _ABOVE_0, _ABOVE_0, _ABOVE_0, metavar="PER_S"
)
_NO_LIMIT = "must be a finite rate, 0 (no limit) or more, not {value}"
datagram_rate = Bounded(
    _number("of datagrams a second"), 0, _FINITE, _NO_LIMIT, _NO_LIMIT, metavar="PER_S"
)
"""Datagrams per second: a finite number, 0 (no limit) or more."""


def binary_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size:,} bytes"


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


def kind_of(parse: Callable[[str], Any] | None) -> str | None:
    """What the help calls a value `parse` reads, the same in every command: a duration is
    `DURATION`, a count `N`, a size `BYTES`, a port `PORT`... (None: no kind of its own)."""
    if isinstance(parse, Bounded):
        return parse.metavar or kind_of(parse.read)
    kinds: dict[Callable[[str], Any], str] = {
        _integer: "N",
        int: "N",
        _duration: "DURATION",
        _size: "BYTES",
        host_name: "HOST",
        file_path: "FILE",
        unix_socket_path: "PATH",
    }
    return kinds.get(parse) if parse is not None else None


def section(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The help section of `parser` with this title, made if it has none yet: options of
    two declarations (a command's own, and another's it shares) can share one section."""
    for group in parser._action_groups:  # argparse offers no public way to list them
        if group.title == title and isinstance(group, argparse._ArgumentGroup):
            return group
    return parser.add_argument_group(title)


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
    """May hold `{default}`: the field's default, as `written` writes it."""
    parse: Callable[[str], Any] | None = None
    """Text to value; a `Bounded` one also checks a value given through the API."""
    group: str | None = None
    """Title of the help section; None: the command's own options."""
    metavar: str | None = None
    choices: Sequence[str] | None = None
    short: str | None = None
    show: Callable[[Any], str] | None = None
    """How a value is written as the flag takes it, for `parse` to read back (default:
    the `Bounded` parse's own `show`, else `str`, floats as short as they read back)."""
    negatable: bool = False

    def written(self, value: Any) -> str:
        """`value` as this option takes it on the command line."""
        show = self.show or (self.parse.show if isinstance(self.parse, Bounded) else _shown)
        return show(value)

    @property
    def value_name(self) -> str:
        """What the help calls its value: `metavar`, else the kind of value `parse`
        reads (`kind_of`), else the flag's name."""
        return self.metavar or kind_of(self.parse) or self.flag[2:].upper()


class FromOtherSettings:
    """The default of a field that follows from other fields; `__post_init__` replaces
    it with the value (a frozen dataclass cannot say "unless" in a plain default)."""

    def __init__(self, rule: str) -> None:
        self.rule = rule

    def __repr__(self) -> str:
        return f"<{self.rule}>"


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
) -> None:
    """An argparse option for each field of `config_class` with an `option()`, its dest
    the field's name and its default the field's, in help sections by `group`.

    With `only`, just those fields, all in `parser` (the caller's section). A section
    the parser already has (by its title) is added to, not made twice."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str | None, Any] = {None: parser}
    for config_field, declared in options_of(config_class):
        if only is not None:
            if config_field.name not in only:
                continue
        elif declared.group is not None and declared.group not in groups:
            assert isinstance(parser, argparse.ArgumentParser)  # sections are a parser's
            groups[declared.group] = section(parser, declared.group)
        default = config_field.default
        help_text = declared.help
        if "{default}" in help_text:  # (a default of None or a tuple is not written)
            help_text = help_text.format(default=declared.written(default))
        kwargs: dict[str, Any] = {"dest": config_field.name, "default": default, "help": help_text}
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
                kwargs["metavar"] = declared.value_name
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
    # A setting named as its flag is written (`close_after` for --close-after), as a
    # config's sub-settings name theirs (`echoplex.conditions`).
    flags |= {flag[2:].replace("-", "_"): flag for flag in flags.values() if flag[2:]}
    return re.sub(r"`(\w+)`", lambda match: flags.get(match[1], match[0]), message)


def check_declared(config: object) -> None:
    """Check each value of `config` against its option's declaration, as the parser does
    (its `choices`; a `Bounded` parse's range), for a config built through the API: a
    ValueError naming the setting as `field_name`, in the parser's words."""
    for config_field, declared in options_of(type(config)):
        value = getattr(config, config_field.name)
        if value is None:
            continue  # not set (where None is the default)
        if declared.choices is not None and value not in declared.choices:
            choices = ", ".join(declared.choices)
            raise ValueError(f"`{config_field.name}` must be one of {choices}, not {value!r}")
        if isinstance(declared.parse, Bounded):
            try:
                declared.parse.check(value)
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"`{config_field.name}`: {exc}") from None


def argv_of(
    config: object, *, leave_out: Collection[str] = (), keep_defaults: Collection[str] = ()
) -> list[str]:
    """The flags that give `config` again when parsed: one for each option whose value is
    not what it would be without its flag (a repeatable option's flag once per item),
    in declaration order; none for the fields in `leave_out`, and a flag even at its
    default for those in `keep_defaults`. A ValueError for a value no flag can give."""
    argv: list[str] = []
    for config_field, declared in options_of(type(config)):
        name = config_field.name
        value = getattr(config, name)
        if name in leave_out or (name not in keep_defaults and value == _unflagged(config, name)):
            continue
        if isinstance(value, bool):
            if not (value or declared.negatable):
                raise ValueError(f"{declared.flag} cannot be turned off by a flag")
            argv.append(declared.flag if value else f"--no-{declared.flag[2:]}")
        elif isinstance(value, tuple) and typing.get_origin(_hint(config, name)) is tuple:
            if not value:
                raise ValueError(f"no {declared.flag} flags give an empty list")
            for item in value:
                argv += [declared.flag, declared.written(item)]
        elif value is None:
            raise ValueError(f"no {declared.flag} flag gives None")
        else:
            argv += [declared.flag, declared.written(value)]
    return argv


def _unflagged(config: object, name: str) -> Any:
    """The value of `config`'s field `name` had its flag not been given: its default, or
    for a default that follows from other settings (`__post_init__` replaces it), what
    it follows to in this config."""
    default = next(
        f.default for f in dataclasses.fields(typing.cast(Any, config)) if f.name == name
    )
    if not isinstance(default, FromOtherSettings):
        return default
    return getattr(dataclasses.replace(typing.cast(Any, config), **{name: default}), name)


def _hint(config: object, name: str) -> Any:
    return typing.get_type_hints(type(config))[name]


def _shown(value: object) -> str:
    """`value` as text; a float as short as reads back the same (`10`, `0.25`, `1e-05`)."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)
