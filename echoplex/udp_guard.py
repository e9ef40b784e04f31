"""Which UDP datagrams the echo may answer: the reflection guard, without I/O.

A UDP source address is whatever the sender wrote in the packet. Anyone can send an
echo server a datagram "from" a victim, and the echo goes to the victim: the server
becomes a reflector that hides the attacker. CERT advisory CA-1996-01 describes the
worst case, a datagram "from" another echo or chargen port, which makes two servers
answer each other for ever. So, before answering, `ReflectionGuard.verdict` checks:

1. the source, a pure function of it (`classify_host`, and the port): not from the ports of the
   classic small UDP services (echo 7, discard 9, daytime 13, qotd 17, chargen 19,
   time 37; and port 0, which means "no reply wanted", RFC 768), and not from an address
   no single host sends from: the limited broadcast 255.255.255.255, multicast, or the
   unspecified address. An IPv4 client of a dual-stack socket (`::ffff:a.b.c.d`) is
   checked as the IPv4 address it is. (A subnet's broadcast address cannot be known
   from here; routers do not forward directed broadcasts by default, RFC 2644.)
2. the size: never more bytes out than came in, and no answer that does not fit in one
   datagram of the source's family (65,507 bytes on IPv4, 65,527 on IPv6).
3. the rate: a token bucket per source address and one for all sources together, so a
   spoofed flood reflects at most `rate_per_source` datagrams a second at one victim and
   `rate_total` at all of them.

IPv6 sources are rate-limited per /64 prefix: one host usually holds a whole /64 (and
rotates privacy addresses within it), so a bucket per address would give it 2**64.

The per-source table is bounded (`max_sources`) without letting a flood of spoofed
sources reset a victim's bucket: a bucket is forgotten only once it has refilled, when
it is the same as a new one. A new source finds no room only if the table is full of
buckets used within the last `BURST_SECONDS`; it is then dropped (`sources-full`). New
buckets are made only while the total bucket has a token, so filling the table takes a
flood that also keeps the total bucket empty, which turns new sources away anyway.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]

# Reasons a datagram is not answered (also the keys of the server's drop counts).
RESERVED_PORT = "reserved-port"
BROADCAST = "broadcast"
MULTICAST = "multicast"
UNSPECIFIED = "unspecified"
BAD_ADDRESS = "bad-address"
OVERSIZE = "oversize"
RATE_SOURCE = "rate-source"
RATE_TOTAL = "rate-total"
SOURCES_FULL = "sources-full"

# Source ports of the services that answer any datagram (RFC 862, 863, 867, 865, 864, 868):
# an echo sent there would be answered back, and so on, for ever. Port 0 is "no port".
RESERVED_SOURCE_PORTS = frozenset({0, 7, 9, 13, 17, 19, 37})

# The largest UDP payload: 65,535 bytes of IP packet less the 20-byte IPv4 header and the
# 8-byte UDP header; IPv6's payload length does not count its own 40-byte header.
MAX_PAYLOAD_IPV4_BYTES = 65_507
MAX_PAYLOAD_IPV6_BYTES = 65_527

LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

# Bursts are this many seconds of the rate: a client may send a short run faster than
# the rate (a test suite, a retry after a pause) but not keep it up.
BURST_SECONDS = 2.0


def burst_for(rate_per_s: float) -> float:
    """The bucket size for a rate: two seconds of it, and at least one datagram."""
    return max(1.0, rate_per_s * BURST_SECONDS)


@dataclass(frozen=True, slots=True)
class SourceClass:
    """What a source host is, as far as the guard cares."""

    reason: str | None
    """Why nothing from it is answered, or None."""

    key: int
    """Its rate-limit bucket: the IPv4 address, or the IPv6 /64 prefix (offset by 2**64
    so the two never collide)."""

    max_payload_bytes: int
    """The largest datagram that can be sent back to it."""


@functools.lru_cache(maxsize=4096)
def classify_host(host: str) -> SourceClass:
    """Classify a source host as the socket reports it (`'10.0.0.1'`, `'fe80::1%eth0'`).

    Pure, so cached: a busy server sees the same few hosts over and over.
    """
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        return SourceClass(BAD_ADDRESS, -1, 0)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 client of a dual-stack socket
    if isinstance(address, ipaddress.IPv4Address):
        key = int(address)
        max_payload = MAX_PAYLOAD_IPV4_BYTES
    else:
        key = (int(address) >> 64) + (1 << 64)
        max_payload = MAX_PAYLOAD_IPV6_BYTES
    reason = None
    if address.is_unspecified:
        reason = UNSPECIFIED
    elif address == LIMITED_BROADCAST:
        reason = BROADCAST
    elif address.is_multicast:
        reason = MULTICAST
    return SourceClass(reason, key, max_payload)


@dataclass(slots=True)
class TokenBucket:
    """`tokens` datagrams may be answered now; it fills at the rate, up to the burst."""

    tokens: float
    updated: float

    def refill(self, now: float, rate_per_s: float, burst: float) -> None:
        # A clock that steps back (only a fake one can) adds nothing and moves nothing.
        if now > self.updated:
            self.tokens = min(burst, self.tokens + (now - self.updated) * rate_per_s)
            self.updated = now

    def is_full(self, now: float, rate_per_s: float, burst: float) -> bool:
        return self.tokens + max(0.0, now - self.updated) * rate_per_s >= burst


class ReflectionGuard:
    """Decides, datagram by datagram, whether the echo may answer. Not thread-safe: one
    guard per event loop.

    `rate_per_source` and `rate_total` are datagrams a second (0: no such limit); each
    bucket holds `burst_for(rate)`. `clock` gives the time when `verdict` is not told it.
    """

    def __init__(
        self,
        rate_per_source: float = 100.0,
        rate_total: float = 10_000.0,
        max_sources: int = 65_536,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        for name, rate in (("rate_per_source", rate_per_source), ("rate_total", rate_total)):
            if not (rate >= 0 and math.isfinite(rate)):
                raise ValueError(f"{name} must be a finite number, 0 (no limit) or more")
        if max_sources < 1:
            raise ValueError(f"max_sources must be at least 1, not {max_sources}")
        self.rate_per_source = rate_per_source
        self.rate_total = rate_total
        self.max_sources = max_sources
        self.burst_per_source = burst_for(rate_per_source)
        self.burst_total = burst_for(rate_total)
        self.clock = clock
        start = clock()
        self._total = TokenBucket(self.burst_total, start) if rate_total else None
        # Least recently used first: dicts keep insertion order, and a used bucket is
        # moved to the end, so refilled (idle) buckets gather at the front.
        self._sources: dict[int, TokenBucket] = {}

    @property
    def tracked_sources(self) -> int:
        return len(self._sources)

    def verdict(self, source: Any, now: float | None = None, size: int = 0) -> str | None:
        """None if a `size`-byte datagram from `source` (a socket address tuple) may be
        answered, and then it is counted against the rates; else why not."""
        host, port = source[0], source[1]
        kind = classify_host(host)
        if kind.reason is not None:
            return kind.reason
        if port in RESERVED_SOURCE_PORTS:
            return RESERVED_PORT
        if size > kind.max_payload_bytes:
            return OVERSIZE
        if now is None:
            now = self.clock()
        total = self._total
        if total is not None:
            total.refill(now, self.rate_total, self.burst_total)
        if self.rate_per_source:
            bucket = self._source_bucket(kind.key, now, total)
            if isinstance(bucket, str):
                return bucket
            if bucket.tokens < 1:
                return RATE_SOURCE
            if total is not None and total.tokens < 1:
                return RATE_TOTAL
            bucket.tokens -= 1
        elif total is not None and total.tokens < 1:
            return RATE_TOTAL
        if total is not None:
            total.tokens -= 1
        return None

    def _source_bucket(self, key: int, now: float, total: TokenBucket | None) -> TokenBucket | str:
        """The source's bucket, refilled and marked most recently used; or why a new
        source gets none."""
        rate, burst = self.rate_per_source, self.burst_per_source
        self._evict_idle(now, limit=2)
        bucket = self._sources.pop(key, None)
        if bucket is None:
            if total is not None and total.tokens < 1:
                return RATE_TOTAL  # no bucket made for what would be dropped anyway
            if len(self._sources) >= self.max_sources:
                self._evict_idle(now, limit=len(self._sources))
                if len(self._sources) >= self.max_sources:
                    return SOURCES_FULL
            bucket = TokenBucket(burst, now)
        else:
            bucket.refill(now, rate, burst)
        self._sources[key] = bucket
        return bucket

    def _evict_idle(self, now: float, limit: int) -> None:
        """Forget up to `limit` buckets from the least recently used end that have
        refilled: a full bucket is the same as none. Stops at the first one still
        refilling, so the cost per datagram stays constant."""
        rate, burst = self.rate_per_source, self.burst_per_source
        for _ in range(limit):
            if not self._sources:
                return
            oldest_key = next(iter(self._sources))
            if not self._sources[oldest_key].is_full(now, rate, burst):
                return
            del self._sources[oldest_key]
