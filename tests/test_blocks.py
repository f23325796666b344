"""Per-block digests: the stored format, the reading plan, and delivery only after verification (pure)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from sftp_plugin import blocks, integrity

B = 16  # a small block size keeps the cases readable


def digests_of(data: bytes, block_size: int = B) -> bytes:
    return b"".join(hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size))


def index_of(data: bytes, block_size: int = B) -> blocks.BlockIndex:
    return blocks.BlockIndex(block_size, len(data), [(0, digests_of(data, block_size))])


def read(stored: bytes, ranges: list[tuple[int, int]], index: blocks.BlockIndex) -> tuple[bytes, int]:
    """What VerifiedOutput writes when fed the fetched bytes of ``stored``, and how many bytes were fetched."""
    steps = blocks.plan(ranges, index.block_size)
    written: list[bytes] = []
    output = blocks.VerifiedOutput(index, steps, lambda view: written.append(bytes(view)))
    fetched = 0
    try:
        for start, end in blocks.fetch_ranges(steps, index):
            for at in range(start, end, 7):  # odd pieces, as SFTP replies come
                output.feed(stored[at : min(at + 7, end)])
                fetched += min(at + 7, end) - at
        output.finish()
    finally:
        output.abandon()
    return b"".join(written), fetched


def test_format_round_trips_header_and_digests() -> None:
    data = os.urandom(5 * B + 3)
    stored = blocks.format_blocks(B, len(data), hashlib.sha256(data).digest(), digests_of(data))
    header = blocks.parse_header(stored)
    assert (header.block_size, header.size, header.whole) == (B, len(data), hashlib.sha256(data).digest())
    assert header.count == 6 and header.file_size == len(stored)
    start, end = header.digest_span(2, 3)
    assert stored[start:end] == digests_of(data)[2 * 32 : 4 * 32]


@pytest.mark.parametrize("damage", [b"", b"x" * 64, b"GSFPBLK1" + b"\0" * 56])
def test_a_header_that_is_short_foreign_or_zero_sized_is_refused(damage: bytes) -> None:
    with pytest.raises(blocks.BlocksFormatError):
        blocks.parse_header(damage)


def test_background_hash_gives_the_whole_digest_and_one_digest_per_block() -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    hasher = integrity.BackgroundSha256(block_size=1024 * 1024)
    for at in range(0, len(data), 300_000):  # chunks that straddle block boundaries
        hasher.update(data[at : at + 300_000])
    found = hasher.result()
    assert found.size == len(data) and found.whole == hashlib.sha256(data).digest()
    assert found.blocks == digests_of(data, 1024 * 1024)


def test_a_whole_read_delivers_every_byte() -> None:
    data = os.urandom(4 * B + 5)
    assert read(data, [(0, len(data))], index_of(data)) == (data, len(data))


def test_a_changed_byte_stops_delivery_before_its_block() -> None:
    data = os.urandom(6 * B)
    damaged = bytearray(data)
    damaged[3 * B + 4] ^= 1
    steps = blocks.plan([(0, len(data))], B)
    written: list[bytes] = []
    output = blocks.VerifiedOutput(index_of(data), steps, lambda view: written.append(bytes(view)))
    with pytest.raises(blocks.BlockMismatch) as caught:
        output.feed(bytes(damaged))
        output.finish()
    output.abandon()
    assert caught.value.index == 3 and caught.value.offset == 3 * B
    assert b"".join(written) == data[: 3 * B]  # the three good blocks, nothing of the bad one


def test_ranges_are_served_in_the_order_given_and_empty_ones_give_nothing() -> None:
    data = os.urandom(10 * B)
    ranges = [(5 * B + 3, 7 * B), (0, 4), (40, 40), (2 * B, 2 * B + 1), (5 * B, 5 * B + 10)]
    out, _ = read(data, ranges, index_of(data))
    assert out == b"".join(data[s:e] for s, e in ranges)


def test_a_range_read_fetches_only_the_blocks_it_touches() -> None:
    data = os.urandom(100 * B)
    out, fetched = read(data, [(50 * B + 3, 50 * B + 9)], index_of(data))
    assert out == data[50 * B + 3 : 50 * B + 9] and fetched == B


def test_adjacent_ranges_share_their_boundary_block_without_fetching_it_twice() -> None:
    data = os.urandom(10 * B)
    ranges = [(3, 2 * B + 5), (2 * B + 5, 4 * B), (4 * B, 4 * B + 1)]
    out, fetched = read(data, ranges, index_of(data))
    assert out == data[3 : 4 * B + 1] and fetched == 5 * B


def test_a_range_in_a_damaged_block_delivers_nothing_of_it() -> None:
    data = os.urandom(8 * B)
    damaged = bytearray(data)
    damaged[6 * B] ^= 0x80
    with pytest.raises(blocks.BlockMismatch):
        read(bytes(damaged), [(6 * B + 8, 6 * B + 12)], index_of(data))


def test_the_last_short_block_is_verified_with_its_own_length() -> None:
    data = os.urandom(3 * B + 1)
    assert read(data, [(3 * B, 3 * B + 1)], index_of(data))[0] == data[-1:]


def test_a_single_block_index_checks_a_small_file_against_its_whole_digest() -> None:
    data = os.urandom(1000)
    index = blocks.BlockIndex.single(len(data), hashlib.sha256(data).digest())
    assert read(data, [(10, 20), (0, 5)], index)[0] == data[10:20] + data[:5]
    with pytest.raises(blocks.BlockMismatch):
        read(data[:-1] + bytes([data[-1] ^ 1]), [(0, 5)], index)


def test_digests_load_in_runs_and_each_block_finds_its_own() -> None:
    data = os.urandom(20 * B)
    all_digests = digests_of(data)
    steps = blocks.plan([(15 * B, 16 * B), (2 * B, 4 * B), (3 * B, 3 * B + 1)], B)
    runs = blocks.block_runs(steps)
    assert runs == [range(2, 4), range(15, 16)]
    index = blocks.BlockIndex(B, len(data), [(r.start, all_digests[r.start * 32 : r.stop * 32]) for r in runs])
    assert index.expected(3) == all_digests[3 * 32 : 4 * 32] and index.expected(15) == all_digests[15 * 32 :][:32]
    with pytest.raises(KeyError):
        index.expected(9)


def test_an_error_of_the_output_reaches_the_feeder() -> None:
    data = os.urandom(40 * B)

    def broken(_view: memoryview) -> None:
        raise BrokenPipeError

    output = blocks.VerifiedOutput(index_of(data), blocks.plan([(0, len(data))], B), broken)
    with pytest.raises(BrokenPipeError):
        for at in range(0, len(data), B):
            output.feed(data[at : at + B])
        output.finish()
    output.abandon()


@pytest.mark.parametrize(("size", "own_thread"), [(B, False), (B - 5, False), (B + 1, True), (3 * B, True)])
def test_one_block_is_written_on_the_callers_thread_and_more_on_a_thread_of_their_own(size: int,
                                                                                      own_thread: bool) -> None:
    # One block has nothing to overlap with: checked and written by finish, with no thread started and joined.
    data = os.urandom(size)
    writers: set[int] = set()
    written: list[bytes] = []

    def sink(view: memoryview) -> None:
        writers.add(threading.get_ident())
        written.append(bytes(view))

    output = blocks.VerifiedOutput(index_of(data), blocks.plan([(0, size)], B), sink)
    output.feed(data)
    output.finish()
    assert b"".join(written) == data
    assert (writers != {threading.get_ident()}) is own_thread


def test_one_block_cut_short_fails_on_the_callers_thread_with_nothing_written() -> None:
    data = os.urandom(B)
    written: list[bytes] = []
    output = blocks.VerifiedOutput(index_of(data), blocks.plan([(0, B)], B), lambda view: written.append(bytes(view)))
    output.feed(data[:-1])
    with pytest.raises(ValueError, match="ended before the planned blocks"):
        output.finish()
    assert written == []
