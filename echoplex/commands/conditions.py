"""`echoplex conditions`: show or change a running server's conditions on purpose,
through its control API (`echoplex serve --control-port`, `echoplex.control`).

    echoplex conditions --port 9813                        show them
    echoplex conditions --port 9813 set latency=200ms bandwidth=64KiB
    echoplex conditions --port 9813 replace close-after=100
    echoplex conditions --port 9813 clear

`set` changes the names given and keeps the others; `replace` keeps only those given;
each change reaches new connections at once and open ones from their next chunk.
Options are also read from `ECHOPLEX_CONTROL_*` (the server's own names:
`ECHOPLEX_CONTROL_TOKEN`), so a token need not be on the command line.
"""

from __future__ import annotations

import argparse
import http.client
import json
from dataclasses import dataclass

from .._cli_util import add_options, config_from_args, fail, host_name, option, target_port
from ..conditions import ConditionError, Conditions
from ..config import DEFAULT_HOST
from ..control import PATH, described

ENVIRONMENT_PREFIX = "ECHOPLEX_CONTROL_"
PROG = "echoplex conditions"
TIMEOUT_S = 10.0
# Each action as the API's method; set and replace take NAME=VALUE pairs.
METHODS = {"show": "GET", "set": "PATCH", "replace": "PUT", "clear": "DELETE"}
TAKES_PAIRS = ("set", "replace")


@dataclass(frozen=True)
class ConditionsOptions:
    """The command's options, each declared once (`echoplex._cli_util.option`)."""

    host: str = option(
        DEFAULT_HOST, "--host", "the control API's address (default {default})", parse=host_name
    )
    port: int | None = option(
        None, "--port", "the control API's port (the server's --control-port)", parse=target_port
    )
    token: str | None = option(
        None,
        "--token",
        "bearer token, if the server asks for one (better given as ECHOPLEX_CONTROL_TOKEN)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=METHODS,
        default="show",
        help="show them (the default); set NAME=VALUE... (the others stay); replace "
        "NAME=VALUE... (only these); clear them all",
    )
    parser.add_argument(
        "pairs",
        nargs="*",
        metavar="NAME=VALUE",
        help="with set and replace: a condition as `echoplex serve` takes it "
        "(latency=200ms, close-after=100)",
    )
    add_options(parser, ConditionsOptions)


def asked(pairs: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs, checked here as the server checks them (ValueError, one line)."""
    if not pairs:
        raise ValueError("give at least one NAME=VALUE (latency=200ms)")
    named: dict[str, str] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"{pair!r} is not NAME=VALUE (latency=200ms)")
        named[name.strip()] = value.strip()
    try:
        Conditions.from_mapping(named)
    except ConditionError as exc:
        raise ValueError(str(exc)) from None
    return named


def request(options: ConditionsOptions, method: str, body: object) -> dict[str, object]:
    """The server's answer (the conditions now set); RuntimeError naming what failed."""
    assert options.port is not None
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if options.token:
        headers["Authorization"] = f"Bearer {options.token}"
    where = f"{options.host}:{options.port}"
    connection = http.client.HTTPConnection(options.host, options.port, timeout=TIMEOUT_S)
    try:
        connection.request(method, PATH, body=data, headers=headers)
        response = connection.getresponse()
        text = response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise RuntimeError(f"cannot reach the control API at {where}: {reason}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if response.status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise RuntimeError(f"the server refused ({response.status}): {error or response.reason}")
    if not isinstance(answer, dict):
        raise RuntimeError(f"{where} answered something other than a set of conditions")
    return answer


def run(args: argparse.Namespace) -> int:
    options = config_from_args(ConditionsOptions, args)
    if options.port is None:
        return fail(PROG, "give --port (the server's --control-port) or ECHOPLEX_CONTROL_PORT")
    if args.pairs and args.action not in TAKES_PAIRS:
        return fail(PROG, f"NAME=VALUE pairs go with set or replace, not {args.action}")
    body: object = None
    if args.action in TAKES_PAIRS:
        try:
            body = asked(args.pairs)
        except ValueError as exc:
            return fail(PROG, str(exc))
    try:
        answer = request(options, METHODS[args.action], body)
    except RuntimeError as exc:
        return fail(PROG, str(exc), status=1)
    try:
        print(described(Conditions.from_mapping(answer)))
    except ConditionError as exc:  # a server of another version, perhaps
        return fail(PROG, f"the server answered conditions this client cannot read: {exc}", 1)
    return 0
