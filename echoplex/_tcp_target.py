"""`tcp://HOST:PORT` target addresses, as the Locust load generator takes them from `--host`.

Kept apart from `echoplex.locust` because importing Locust monkey-patches the
standard library with gevent: this module has no such side effect, so the test
suite can check the parser in-process.
"""

from __future__ import annotations

import ipaddress
import re

# Bracketed IPv6 literal (zone id allowed) or a name / IPv4 literal without brackets,
# then a mandatory port; one trailing slash is tolerated because people type it.
_TARGET = re.compile(
    r"tcp://(?:\[(?P<ipv6>[^\[\]/]+)\]|(?P<host>[^\[\]:/@?#\s]+)):(?P<port>[0-9]{1,5})/?"
)
USAGE = "tcp://HOST:PORT (IPv6: tcp://[::1]:PORT)"


class InvalidTarget(ValueError):
    """The target is not a `tcp://HOST:PORT` address."""


def parse_tcp_target(target: str | None) -> tuple[str, int]:
    """(host, port) of `tcp://HOST:PORT`; IPv6 literals in brackets, returned without them."""
    if not target:
        raise InvalidTarget(f"no target given: pass --host {USAGE}")
    match = _TARGET.fullmatch(target)
    if match is None:
        raise InvalidTarget(f"target {target!r} is not {USAGE}")
    host = match.group("host")
    if host is None:
        host = match.group("ipv6")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidTarget(
                f"target {target!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise InvalidTarget(f"target {target!r}: port {port} is not in 1..65535")
    return host, port
