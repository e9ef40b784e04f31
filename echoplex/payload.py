"""Verifiable payloads for the load generator: protocol logic with no I/O.

Every byte a load connection sends is a pure function of (run seed, connection
number, stream offset): connection `c` sends the bytes of one shared random block
starting at its own offset, wrapping around. The echo of offset `i` must therefore
be exactly `expected(c, i)`, so a lost, duplicated, reordered or corrupted byte, or
a byte that belongs to another connection, shows up as a mismatch at a known
connection and offset. The block's length is a prime a little over 1 MiB, so no
plausible loss or duplication lines the stream back up by accident.

Because the stream is a function of the offset, a sender never has to keep what it
sent: `Sender.take` hands out read-only views of the block (no copy), and what is
owed but not yet written is just a byte count.
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
        self._doubled_bytes = block + block
        self._doubled = memoryview(self._doubled_bytes)

    def start(self, connection: int) -> int:
        return (connection * _START_STRIDE) % PERIOD_BYTES

    def position(self, connection: int, offset: int) -> int:
        """Where in the block connection `connection`'s stream offset `offset` lies."""
        return (self.start(connection) + offset) % PERIOD_BYTES

    def slice(self, connection: int, offset: int, length: int) -> bytes:
        """The `length` bytes connection `connection` sends from stream `offset`."""
        parts = []
        position = self.position(connection, offset)
        while length > 0:
            take = min(length, PERIOD_BYTES)
            parts.append(self._doubled[position : position + take])
            length -= take
            position = (position + take) % PERIOD_BYTES
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def view(self, position: int, length: int) -> memoryview:
        """A read-only view (no copy) of `length` <= PERIOD_BYTES bytes from block `position`."""
        if not 0 <= length <= PERIOD_BYTES:
            raise ValueError(f"a view is at most {PERIOD_BYTES} bytes, not {length}")
        return self._doubled[position : position + length]

    def matches_at(self, position: int, data: bytes | memoryview) -> bool:
        """Whether `data` equals the block from `position` (wrapping)."""
        if len(data) <= PERIOD_BYTES:
            # bytes.startswith is one memcmp; comparing two memoryviews goes item by
            # item through the buffer protocol: measured 0.2 µs against 3.2 µs for
            # 1 KiB, 1.4 µs against 184 µs for 64 KiB (CPython 3.11).
            return self._doubled_bytes.startswith(data, position)
        head = PERIOD_BYTES - position
        return self._doubled_bytes.startswith(data[:head], position) and self.matches_at(
            0, memoryview(data)[head:]
        )

    def matches(self, connection: int, offset: int, data: bytes | memoryview) -> bool:
        return self.matches_at(self.position(connection, offset), data)


class Sender:
    """The outgoing stream of one connection."""

    def __init__(self, pattern: PayloadPattern, connection: int) -> None:
        self.pattern = pattern
        self.connection = connection
        self.offset = 0
        self._position = pattern.start(connection)
        self._block = pattern._doubled
        self._bytes = pattern._doubled_bytes

    def next(self, length: int) -> bytes:
        """The next `length` bytes, as bytes (a copy)."""
        if length > PERIOD_BYTES:
            data = self.pattern.slice(self.connection, self.offset, length)
            self.advance(length)
            return data
        # Inlined: a load generator calls this per message.
        position = self._position
        self._position = (position + length) % PERIOD_BYTES
        self.offset += length
        return self._bytes[position : position + length]

    def take(self, length: int) -> memoryview:
        """The next `length` <= PERIOD_BYTES bytes as a view of the block (no copy)."""
        # Inlined (no call to view/advance): a load generator calls this per message.
        if length > PERIOD_BYTES:
            raise ValueError(f"a view is at most {PERIOD_BYTES} bytes, not {length}")
        position = self._position
        self._position = (position + length) % PERIOD_BYTES
        self.offset += length
        return self._block[position : position + length]

    def advance(self, length: int) -> None:
        self.offset += length
        self._position = (self._position + length) % PERIOD_BYTES


class Verifier:
    """Checks the echoed stream of one connection, chunk by chunk, as it arrives."""

    def __init__(self, pattern: PayloadPattern, connection: int) -> None:
        self.pattern = pattern
        self.connection = connection
        self.offset = 0
        self.mismatch: Mismatch | None = None
        self._position = pattern.start(connection)
        self._block = pattern._doubled_bytes

    def feed(self, data: bytes | memoryview) -> Mismatch | None:
        """Verify the next received bytes; the first mismatch is kept and returned."""
        length = len(data)
        position = self._position
        # The common case inlined (one memcmp, no further call): this runs per chunk.
        if self.mismatch is None and not (
            self._block.startswith(data, position)
            if length <= PERIOD_BYTES
            else self.pattern.matches_at(position, data)
        ):
            self.mismatch = self._locate(data)
        self.offset += length
        self._position = (position + length) % PERIOD_BYTES
        return self.mismatch

    def seek(self, offset: int) -> None:
        """Continue verifying from stream `offset` (bytes before it were checked elsewhere,
        e.g. compared whole against what was sent)."""
        self.offset = offset
        self._position = self.pattern.position(self.connection, offset)

    def _locate(self, data: bytes | memoryview) -> Mismatch:
        expected = self.pattern.slice(self.connection, self.offset, len(data))
        received = bytes(data)
        at = next(i for i, (e, r) in enumerate(zip(expected, received, strict=True)) if e != r)
        return Mismatch(self.connection, self.offset + at, expected[at], received[at])
