"""Verifiable payloads for the load generator: protocol logic with no I/O.

Every byte a load connection sends is a pure function of (run seed, connection
number, stream offset): connection `c` sends the bytes of one shared random block
starting at its own offset, wrapping around. The echo of offset `i` must therefore
be exactly `expected(c, i)`, so a lost, duplicated, reordered or corrupted byte, or
a byte that belongs to another connection, shows up as a mismatch at a known
connection and offset. The block's length is a prime a little over 1 MiB, so no
plausible loss or duplication lines the stream back up by accident.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PERIOD_BYTES = 1_048_583  # prime
# Spreads connections' starting points over the block; coprime with the period.
_START_STRIDE = 2_654_435_761 % PERIOD_BYTES


@dataclass(frozen=True, slots=True)
class Mismatch:
    connection: int
    offset: int
    expected: int
    received: int

    def __str__(self) -> str:
        return (
            f"connection {self.connection} offset {self.offset}: "
            f"expected byte 0x{self.expected:02x}, received 0x{self.received:02x}"
        )


class PayloadPattern:
    """The shared block for one run; cheap to slice at any (connection, offset)."""

    def __init__(self, seed: int = 0) -> None:
        block = random.Random(seed).randbytes(PERIOD_BYTES)
        # Two copies back to back: any slice up to PERIOD_BYTES long is contiguous.
        self._doubled = memoryview(block + block)

    def start(self, connection: int) -> int:
        return (connection * _START_STRIDE) % PERIOD_BYTES

    def slice(self, connection: int, offset: int, length: int) -> bytes:
        """The `length` bytes connection `connection` sends from stream `offset`."""
        parts = []
        position = (self.start(connection) + offset) % PERIOD_BYTES
        while length > 0:
            take = min(length, PERIOD_BYTES)
            parts.append(self._doubled[position : position + take])
            length -= take
            position = (position + take) % PERIOD_BYTES
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def matches(self, connection: int, offset: int, data: bytes | memoryview) -> bool:
        position = (self.start(connection) + offset) % PERIOD_BYTES
        if len(data) <= PERIOD_BYTES:
            return self._doubled[position : position + len(data)] == data
        return self.slice(connection, offset, len(data)) == bytes(data)


class Sender:
    """The outgoing stream of one connection."""

    def __init__(self, pattern: PayloadPattern, connection: int) -> None:
        self.pattern = pattern
        self.connection = connection
        self.offset = 0

    def next(self, length: int) -> bytes:
        data = self.pattern.slice(self.connection, self.offset, length)
        self.offset += length
        return data


class Verifier:
    """Checks the echoed stream of one connection, chunk by chunk, as it arrives."""

    def __init__(self, pattern: PayloadPattern, connection: int) -> None:
        self.pattern = pattern
        self.connection = connection
        self.offset = 0
        self.mismatch: Mismatch | None = None

    def feed(self, data: bytes | memoryview) -> Mismatch | None:
        """Verify the next received bytes; the first mismatch is kept and returned."""
        if self.mismatch is None and not self.pattern.matches(self.connection, self.offset, data):
            expected = self.pattern.slice(self.connection, self.offset, len(data))
            at = next(
                i for i, (e, r) in enumerate(zip(expected, bytes(data), strict=True)) if e != r
            )
            self.mismatch = Mismatch(self.connection, self.offset + at, expected[at], data[at])
        self.offset += len(data)
        return self.mismatch
