"""Source addresses of a load's connections (`--source ADDR[-ADDR]`): pure, no I/O.

A client reaching one server address and port from one source address has, at most,
one connection per ephemeral port (`net.ipv4.ip_local_port_range`: about 28,000 by
default). Past that, connects fail with EADDRNOTAVAIL. Every 127.x.y.z address is this
machine's, so a load on loopback spreads over several source addresses to go further:
connection n binds to address n mod len(addresses) (the run's numbering, which the
processes of a spread run share), so the whole set uses every address evenly, whatever
the number of processes. The transport binds each socket (`echoplex.load.transport`).
"""

from __future__ import annotations

import ipaddress

MAX_SOURCES = 256

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"not an IP address: {text.strip()!r}") from None


def source_addresses(text: str) -> tuple[str, ...]:
    """The addresses `ADDR` or `FIRST-LAST` (a contiguous range, both ends included, at
    most MAX_SOURCES) names; a ValueError in one line for anything else."""
    first_text, dash, last_text = text.partition("-")
    first = _address(first_text)
    if not dash:
        return (str(first),)
    last = _address(last_text)
    if first.version != last.version:
        raise ValueError(f"source range {text!r} mixes IPv4 and IPv6")
    count = int(last) - int(first) + 1
    if count < 1:
        raise ValueError(f"source range {text!r} is reversed: {last} comes before {first}")
    if count > MAX_SOURCES:
        raise ValueError(f"source range {text!r} holds {count:,} addresses, at most {MAX_SOURCES}")
    kind = type(first)
    return tuple(str(kind(int(first) + offset)) for offset in range(count))


def family_mismatch(sources: tuple[str, ...], host: str) -> str | None:
    """Why a connection to `host` cannot come from these sources (IPv4 sources, an IPv6
    server address), or None; a name is resolved later, in the sources' family."""
    try:
        server = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    source = ipaddress.ip_address(sources[0].partition("%")[0])
    if source.version == server.version:
        return None
    return f"source {sources[0]} is IPv{source.version}, server {host} is IPv{server.version}"


def source_for(sources: tuple[str, ...], connection: int) -> str:
    """The source address of connection number `connection` of the run."""
    return sources[connection % len(sources)]


__all__ = ["MAX_SOURCES", "family_mismatch", "source_addresses", "source_for"]
