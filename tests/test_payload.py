"""Payload verification without sockets: every kind of damage is caught where it happens."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from echoplex.payload import PERIOD_BYTES, Mismatch, PayloadPattern, Sender, Verifier

PATTERN = PayloadPattern(seed=7)  # 2 MiB to build: once for the module
# No per-example deadline: a loaded CI machine must not turn slowness into failures.
relaxed = settings(deadline=None)


def stream(connection: int, length: int, offset: int = 0) -> bytes:
    return PATTERN.slice(connection, offset, length)


def first_difference(expected: bytes, received: bytes) -> int:
    return next(i for i, (e, r) in enumerate(zip(expected, received, strict=False)) if e != r)


def feed_in_chunks(verifier: Verifier, data: bytes, chunk_sizes: list[int]) -> Mismatch | None:
    """Feed `data` cut at the given sizes (cycled), as a socket might deliver it."""
    position, turn, mismatch = 0, 0, None
    while position < len(data):
        size = chunk_sizes[turn % len(chunk_sizes)]
        mismatch = verifier.feed(memoryview(data)[position : position + size])
        position += size
        turn += 1
    return mismatch


def check(connection: int, expected: bytes, received: bytes, chunks: list[int]) -> Mismatch:
    verifier = Verifier(PATTERN, connection)
    mismatch = feed_in_chunks(verifier, received, chunks)
    assert mismatch is not None
    at = first_difference(expected, received)
    assert mismatch == Mismatch(connection, at, expected[at], received[at])
    return mismatch


connections = st.integers(min_value=0, max_value=10_000)
chunkings = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8)


@relaxed
@given(connection=connections, length=st.integers(0, 20_000), chunks=chunkings)
def test_an_honest_echo_verifies_in_any_chunking(
    connection: int, length: int, chunks: list[int]
) -> None:
    sender = Sender(PATTERN, connection)
    sent = b"".join(sender.next(size) for size in chunks if sender.offset < length)
    verifier = Verifier(PATTERN, connection)
    assert feed_in_chunks(verifier, sent, list(reversed(chunks))) is None
    assert verifier.offset == len(sent)


@relaxed
@given(connection=connections, length=st.integers(1, 20_000), data=st.data(), chunks=chunkings)
def test_a_flipped_byte_is_caught_at_its_offset(
    connection: int, length: int, data: st.DataObject, chunks: list[int]
) -> None:
    expected = stream(connection, length)
    at = data.draw(st.integers(0, length - 1))
    flip = data.draw(st.integers(1, 255))
    received = bytearray(expected)
    received[at] ^= flip
    mismatch = check(connection, expected, bytes(received), chunks)
    assert mismatch.offset == at
    assert mismatch.received == expected[at] ^ flip


@relaxed
@given(connection=connections, data=st.data(), chunks=chunkings)
def test_lost_bytes_are_caught_where_the_stream_goes_wrong(
    connection: int, data: st.DataObject, chunks: list[int]
) -> None:
    expected = stream(connection, 8000)
    at = data.draw(st.integers(0, 6000))
    lost = data.draw(st.integers(1, 1000))
    received = expected[:at] + expected[at + lost :]
    mismatch = check(connection, expected, received, chunks)
    assert mismatch.offset >= at


@relaxed
@given(connection=connections, data=st.data(), chunks=chunkings)
def test_duplicated_bytes_are_caught(
    connection: int, data: st.DataObject, chunks: list[int]
) -> None:
    expected = stream(connection, 8000)
    start = data.draw(st.integers(0, 6000))
    length = data.draw(st.integers(1, 1000))
    received = (expected[: start + length] + expected[start:])[: len(expected)]
    mismatch = check(connection, expected, received, chunks)
    assert mismatch.offset >= start + length


@relaxed
@given(connection=connections, data=st.data(), chunks=chunkings)
def test_reordered_chunks_are_caught(
    connection: int, data: st.DataObject, chunks: list[int]
) -> None:
    expected = stream(connection, 8000)
    a = data.draw(st.integers(0, 6000))
    b = data.draw(st.integers(a + 1, 7000))
    c = data.draw(st.integers(b + 1, 8000))
    received = expected[:a] + expected[b:c] + expected[a:b] + expected[c:]
    assume(received != expected)
    mismatch = check(connection, expected, received, chunks)
    assert mismatch.offset >= a


@relaxed
@given(connection=connections, other=connections, length=st.integers(1, 5000), chunks=chunkings)
def test_bytes_of_another_connection_are_caught(
    connection: int, other: int, length: int, chunks: list[int]
) -> None:
    assume(connection != other)
    expected = stream(connection, length)
    received = stream(other, length)
    assume(received != expected)
    check(connection, expected, received, chunks)


def test_examples_land_exactly_where_the_damage_is() -> None:
    """Concrete cases, with seed 7's block: each damage is seen at its own offset."""
    expected = stream(3, 4096)
    flipped = bytearray(expected)
    flipped[1000] ^= 0x01
    assert check(3, expected, bytes(flipped), [512]).offset == 1000
    dropped = expected[:2000] + expected[2010:]
    assert check(3, expected, dropped, [4096]).offset == first_difference(expected, dropped)
    other = stream(4, 4096)
    assert check(3, expected, other, [100]).offset == first_difference(expected, other)


def test_only_the_first_mismatch_is_kept_and_offsets_keep_counting() -> None:
    verifier = Verifier(PATTERN, 1)
    bad = bytearray(stream(1, 100))
    bad[10] ^= 0xFF
    first = verifier.feed(bytes(bad))
    assert first is not None and first.offset == 10
    assert verifier.feed(stream(1, 50, offset=100)) is first
    assert verifier.offset == 150
    assert str(first).startswith("connection 1 offset 10: expected byte 0x")


def test_take_is_a_view_of_the_same_bytes_as_slice_across_the_wrap() -> None:
    sender = Sender(PATTERN, 5)
    near_end = PERIOD_BYTES - PATTERN.start(5) - 100  # the next take wraps around
    sender.take(near_end)
    view = sender.take(300)
    assert isinstance(view, memoryview)
    assert view.readonly
    assert bytes(view) == stream(5, 300, offset=near_end)
    assert sender.offset == near_end + 300


def test_verifying_across_the_wrap_and_longer_than_a_period() -> None:
    length = PERIOD_BYTES + 4096
    data = stream(2, length)
    assert data[:100] == data[PERIOD_BYTES : PERIOD_BYTES + 100]  # the stream repeats
    verifier = Verifier(PATTERN, 2)
    assert verifier.feed(data) is None
    assert PATTERN.matches(2, 0, data)
    broken = bytearray(data)
    broken[PERIOD_BYTES + 5] ^= 0x40
    assert not PATTERN.matches(2, 0, bytes(broken))
    mismatch = Verifier(PATTERN, 2).feed(bytes(broken))
    assert mismatch is not None and mismatch.offset == PERIOD_BYTES + 5


def test_a_view_longer_than_a_period_is_refused() -> None:
    with pytest.raises(ValueError, match="at most"):
        PATTERN.view(0, PERIOD_BYTES + 1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_the_stream_is_a_function_of_seed_connection_and_offset(seed: int) -> None:
    rng = random.Random(seed)
    connection, offset = rng.randrange(1000), rng.randrange(3 * PERIOD_BYTES)
    assert PATTERN.slice(connection, offset, 64) == PATTERN.slice(connection, offset, 64)
    whole = PATTERN.slice(connection, 0, offset + 64)
    assert whole[offset:] == PATTERN.slice(connection, offset, 64)
