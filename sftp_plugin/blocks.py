"""Per-block digests: their stored format, which blocks a read needs, and delivery only after verification.

gpbackup_helper reads a restore's stdout and never looks at the plugin's exit
status, so a mismatch found after the last byte went out is a mismatch nobody
hears of: the altered rows are restored. Therefore a stream longer than one
block is stored with the SHA-256 of every BLOCK_SIZE bytes of the original
stream (``<name>.sha256blocks`` beside it), and a restore writes no byte of a
block before that whole block has been read and matched against its digest.
A range read fetches every block the range touches, whole.

The blocks file is binary, so that a range read can fetch the digests of just
the blocks it needs: a fixed header (magic, block size, stream size, SHA-256 of
the whole stream), then 32 bytes per block, in order.

Pure, but for `VerifiedOutput`, which hashes and writes on a thread of its own.
"""

from __future__ import annotations

import bisect
import hashlib
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

# Bytes of the original stream per digest. 1 MiB: a restore holds at most
# QUEUED_BLOCKS + 2 blocks in memory; a range read fetches at most 2 MiB more
# than it asked for (a block at each end), nothing next to a table's rows; and
# the digests cost 32 bytes per MiB (32 MiB per TiB). A restore hashes each
# block once either way, so a larger block saves nothing on the transfer.
BLOCK_SIZE = 1024 * 1024
BLOCKS_SUFFIX = ".sha256blocks"
MAGIC = b"GSFPBLK1"
_HEADER = struct.Struct(">8sIIQ32s")  # magic, block size, reserved (0), stream size, whole-stream SHA-256
HEADER_SIZE = 64  # _HEADER padded with zeros, so that digests start at a round offset
DIGEST_SIZE = 32
# Verified blocks waiting for the output thread: enough to keep both threads
# busy, few enough to bound memory (each is at most BLOCK_SIZE).
QUEUED_BLOCKS = 4


class BlocksFormatError(ValueError):
    """A blocks file that is not in the format above (damaged, or not ours)."""


class BlockMismatch(Exception):
    """A block's bytes do not match its stored digest."""

    def __init__(self, index: int, offset: int) -> None:
        super().__init__(f"checksum mismatch in block {index}, the bytes from offset {offset}")
        self.index = index
        self.offset = offset


def blocks_path(path: str) -> str:
    return path + BLOCKS_SUFFIX


def is_blocks_file(name: str) -> bool:
    return name.endswith(BLOCKS_SUFFIX)


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def format_blocks(block_size: int, size: int, whole: bytes, digests: bytes) -> bytes:
    if len(digests) != DIGEST_SIZE * block_count(size, block_size):
        raise ValueError(f"{len(digests) // DIGEST_SIZE} digests for {size} bytes in blocks of {block_size}")
    return _HEADER.pack(MAGIC, block_size, 0, size, whole).ljust(HEADER_SIZE, b"\0") + digests


@dataclass(frozen=True)
class BlocksHeader:
    block_size: int
    size: int  # of the original stream
    whole: bytes  # SHA-256 of the whole stream

    @property
    def count(self) -> int:
        return block_count(self.size, self.block_size)

    @property
    def file_size(self) -> int:
        """What the blocks file must measure."""
        return HEADER_SIZE + DIGEST_SIZE * self.count

    def digest_span(self, first: int, last: int) -> tuple[int, int]:
        """Where the digests of blocks ``first..last`` (inclusive) lie in the blocks file."""
        return HEADER_SIZE + DIGEST_SIZE * first, HEADER_SIZE + DIGEST_SIZE * (last + 1)


def parse_header(data: bytes) -> BlocksHeader:
    if len(data) < HEADER_SIZE:
        raise BlocksFormatError(f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, block_size, _reserved, size, whole = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BlocksFormatError("it does not start with the blocks file magic")
    if block_size == 0:
        raise BlocksFormatError("its block size is 0")
    return BlocksHeader(block_size, size, whole)


class BlockIndex:
    """The digests a read checks blocks against: block ``i`` covers bytes ``[i*block_size, (i+1)*block_size)``.

    Digests come in runs of consecutive blocks, ``(first block, their digests)``:
    a range read loads only the blocks it fetches, a whole read one run of all.
    """

    def __init__(self, block_size: int, size: int, runs: list[tuple[int, bytes]]) -> None:
        self.block_size = block_size
        self.size = size
        self._runs = sorted(runs)
        self._firsts = [first for first, _ in self._runs]

    @classmethod
    def single(cls, size: int, digest: bytes) -> BlockIndex:
        """A stream of at most one block: the whole-file digest is its one block digest."""
        return cls(max(size, 1), size, [(0, digest)])

    def length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def expected(self, index: int) -> bytes:
        first, digests = self._runs[bisect.bisect_right(self._firsts, index) - 1]
        at = (index - first) * DIGEST_SIZE
        if index < first or at + DIGEST_SIZE > len(digests):
            raise KeyError(f"no digest loaded for block {index}")
        return digests[at : at + DIGEST_SIZE]


@dataclass(frozen=True)
class Step:
    """One requested range, ``[start, end)``, and the blocks to fetch for it (``fetch`` empty:
    its one block is the one verified last, kept)."""

    start: int
    end: int
    first: int  # first block the range touches
    last: int  # last block the range touches
    fetch: range  # blocks fetched from the server for this step, in order


def plan(ranges: list[tuple[int, int]], block_size: int) -> list[Step]:
    """The steps of a read of ``ranges`` (served in the order given; empty ones produce nothing).

    A block the previous step verified last is not fetched again: adjacent
    tables in a single-data-file backup share their boundary block.
    """
    steps: list[Step] = []
    kept: int | None = None  # the block verified last, which VerifiedOutput keeps
    for start, end in ranges:
        if start == end:
            continue
        first, last = start // block_size, (end - 1) // block_size
        fetch = range(first + 1 if first == kept else first, last + 1)
        steps.append(Step(start, end, first, last, fetch))
        kept = last
    return steps


def fetch_ranges(steps: list[Step], index: BlockIndex) -> list[tuple[int, int]]:
    """The byte ranges to read from the stored file, in order, contiguous ones merged."""
    spans: list[tuple[int, int]] = []
    for step in steps:
        if not step.fetch:
            continue
        start = step.fetch.start * index.block_size
        end = min(step.fetch.stop * index.block_size, index.size)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def fetched_blocks(steps: list[Step]) -> Iterator[int]:
    for step in steps:
        yield from step.fetch


def block_runs(steps: Iterable[Step]) -> list[range]:
    """Every block the steps fetch, as ascending runs of consecutive blocks, each block once."""
    runs: list[range] = []
    for fetch in sorted((step.fetch for step in steps if step.fetch), key=lambda r: r.start):
        if runs and fetch.start <= runs[-1].stop:
            runs[-1] = range(runs[-1].start, max(runs[-1].stop, fetch.stop))
        else:
            runs.append(fetch)
    return runs


class VerifiedOutput:
    """Takes the fetched bytes in order, cuts them into blocks, and writes to ``out`` the
    requested parts of each block once it has matched its digest.

    Hashing and writing run on a thread of their own (hashlib and the write
    release the GIL), beside the thread that receives from SSH, from the second
    block on: a restore of one block (a table's file of a per-table backup) has
    nothing to overlap, and is checked and written by ``finish`` on the caller's
    thread, without starting, waking and joining one. On a mismatch nothing of
    that block or any later one is written; ``feed`` and ``finish`` raise the
    first error (BlockMismatch, or whatever ``out`` raised).
    """

    def __init__(self, index: BlockIndex, steps: list[Step], out: Callable[[memoryview], object]) -> None:
        self._index = index
        self._steps = steps
        self._out = out
        self._order = fetched_blocks(steps)
        self._current: int | None = next(self._order, None)
        self._pending = bytearray()
        self._blocks: queue.Queue[tuple[int, bytes | bytearray] | None] = queue.Queue(QUEUED_BLOCKS)
        self._error: BaseException | None = None
        self.delivered = 0  # bytes written to out
        self._thread: threading.Thread | None = None  # started when a second block comes

    def feed(self, data: bytes) -> None:
        self._raise_error()
        view = memoryview(data)
        while view:
            if self._current is None:
                raise ValueError("more bytes than the planned blocks hold")
            wanted = self._index.length(self._current) - len(self._pending)
            if not self._pending and len(view) >= wanted:
                self._put(self._current, bytes(view[:wanted]))
            else:
                self._pending += view[:wanted]
                if len(self._pending) < self._index.length(self._current):
                    return
                self._put(self._current, self._pending)  # handed over whole: a new one takes its place
                self._pending = bytearray()
            view = view[wanted:]
            self._current = next(self._order, None)

    def finish(self) -> None:
        """Wait until every verified byte is written; raise the first error."""
        self._blocks.put(None)  # room for it: no thread means at most one block queued
        if self._thread is None:
            self._deliver()
        else:
            self._thread.join()
        self._raise_error()
        if self._current is not None or self._pending:
            raise ValueError("the stored bytes ended before the planned blocks")

    def abandon(self) -> None:
        """Write nothing more (the read failed); the output thread ends after its current block."""
        if self._error is None:
            self._error = RuntimeError("abandoned")
        try:
            self._blocks.put_nowait(None)  # wakes a thread waiting for a block
        except queue.Full:
            pass  # a thread with blocks queued looks at the error before each write

    def _put(self, block: int, data: bytes | bytearray) -> None:
        if self._thread is None and not self._blocks.empty():  # a second block: the first still waits
            self._thread = threading.Thread(target=self._deliver, name="verify", daemon=True)
            self._thread.start()
        while True:
            self._raise_error()
            try:
                self._blocks.put((block, data), timeout=0.5)
                return
            except queue.Full:
                continue  # the output thread may have stopped on an error: look again

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _next_verified(self) -> tuple[int, bytes | bytearray]:
        item = self._blocks.get()
        if item is None:
            raise ValueError("the stored bytes ended before the planned blocks")
        block, data = item
        if hashlib.sha256(data).digest() != self._index.expected(block):
            raise BlockMismatch(block, block * self._index.block_size)
        return block, data

    def _deliver(self) -> None:
        kept: tuple[int, bytes | bytearray] | None = None
        try:
            for step in self._steps:
                for block in range(step.first, step.last + 1):
                    if kept is None or kept[0] != block:
                        kept = self._next_verified()
                        if kept[0] != block:
                            raise AssertionError(f"planned block {block}, got {kept[0]}")
                    base = block * self._index.block_size
                    lo = max(step.start, base) - base
                    hi = min(step.end, base + len(kept[1])) - base
                    if self._error is not None:
                        return
                    self._out(memoryview(kept[1])[lo:hi])
                    self.delivered += hi - lo
        except BaseException as err:  # noqa: BLE001 - handed to the receiving thread, which raises it
            if self._error is None:
                self._error = err
        finally:
            # Let a feeder blocked on a full queue go on (it then sees the error).
            while True:
                try:
                    if self._blocks.get_nowait() is None:
                        break
                except queue.Empty:
                    break
