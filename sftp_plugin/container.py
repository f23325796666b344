"""The container: a stored file compressed and/or encrypted in independent chunks, with an index, so that a
range read fetches and decodes only the chunks it needs. Format version 1, described in docs/format.rst.

Layout::

    header   96 bytes: magic, version, flags, chunk size, salt, key digest, SHA-256 of those 64 bytes
    chunk 0  the first CHUNK_SIZE bytes of the original stream, compressed (flag), then sealed
    ...
    chunk n-1  the last bytes (1 to CHUNK_SIZE of them)
    index    original size, chunk count, then (original offset, stored offset, stored length, original
             length) per chunk; sealed like a chunk
    trailer  24 bytes: index offset, index length, tail magic

Sealed: with a key, AES-256-GCM under a key derived for this file alone
(HKDF-SHA256 of the key with the header's random 16-byte salt), the nonce
being the record's kind and number (chunk i, or the index), so a nonce never
repeats for a key; without one, the SHA-256 of the authenticated data and
the body appended (damage is found; a forger is not stopped). The
authenticated data of a chunk is the whole header, the chunk's number, a
last-chunk flag and its original length: a chunk moved, dropped, duplicated
or cut off fails, and so does any change to the header. The index is
authenticated the same way, and every offset it gives is checked against the
others and against the file's size, so the trailer cannot point elsewhere.

Knows bytes only: no SFTP, no gpbackup. `Encoder`/`EncodingReader` write,
`Container.plan` and `ChunkOutput` read; a read delivers nothing of a chunk
before that chunk is authenticated.
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sftp_plugin import blocks

MAGIC = b"\x89GSFPC\r\n"  # binary, with CR LF: a text file or a gpbackup stream never starts so
TAIL_MAGIC = b"GSFPIDX\x01"
VERSION = 1
FLAG_ZSTD = 0x1
FLAG_AES256GCM = 0x2
KNOWN_FLAGS = FLAG_ZSTD | FLAG_AES256GCM
# Original bytes per chunk: what a range read fetches at most beyond each end of a range.
CHUNK_SIZE = 1024 * 1024
# The largest chunk size a reader accepts (a damaged header must not make it plan absurd reads).
MAX_CHUNK_SIZE = 64 * 1024 * 1024
SALT_SIZE = 16
_HEADER = struct.Struct(">8sHHI16s32s")  # magic, version, flags, chunk size, salt, SHA-256 of the key (or zeros)
# The header's fields, then their SHA-256: a damaged header is told from a wrong key (its key digest changed).
HEADER_SIZE = _HEADER.size + 32  # 96
_AAD = struct.Struct(">QBI")  # chunk number, last-chunk flag, original length
_INDEX_HEAD = struct.Struct(">QQ")  # original size, chunk count
_ENTRY = struct.Struct(">QQII")  # original offset, stored offset, stored length, original length
_TRAILER = struct.Struct(">QQ8s")  # index offset, index stored length, tail magic
TRAILER_SIZE = _TRAILER.size  # 24
INDEX_AAD = b"index"
TAG_SIZE = 16  # AES-GCM
DIGEST_SIZE = 32  # SHA-256, without a key
HKDF_INFO = b"gpbackup_sftp_plugin container v1 file key"
_NONCE_CHUNK = b"\0\0\0\0"
_NONCE_INDEX = b"\0\0\0\1"
# Chunks being sealed at once while a stream is stored, and the threads sealing them (zstd and AES-GCM
# release the GIL: two threads keep two cores busy).
SEAL_THREADS = 2
SEALS_IN_FLIGHT = 4


class ContainerFormatError(ValueError):
    """Bytes that are not a container this release reads: damaged, or written by a newer release."""


class ChunkAuthError(Exception):
    """A chunk (or the index) failed authentication: its bytes are not what was stored."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def looks_like(head: bytes, tail: bytes) -> bool | None:
    """True if ``head`` (the first bytes of a file) and ``tail`` (its last TRAILER_SIZE) are a container's, False
    if neither is, None if only one is: a container damaged at one end (or cut short)."""
    starts = head[: len(MAGIC)] == MAGIC
    ends = len(tail) == TRAILER_SIZE and tail[-len(TAIL_MAGIC):] == TAIL_MAGIC
    if starts and ends:
        return True
    if not starts and not ends:
        return False
    return None


@dataclass(frozen=True)
class Header:
    flags: int
    chunk_size: int
    salt: bytes
    key_digest: bytes  # SHA-256 of the key; zeros without encryption

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_AES256GCM)

    def pack(self) -> bytes:
        fields = _HEADER.pack(MAGIC, VERSION, self.flags, self.chunk_size, self.salt, self.key_digest)
        return fields + hashlib.sha256(fields).digest()

    def describe(self) -> str:
        parts = [name for flag, name in ((FLAG_ZSTD, "zstd"), (FLAG_AES256GCM, "AES-256-GCM")) if self.flags & flag]
        return " + ".join(parts) or "chunked"


def parse_header(data: bytes) -> Header:
    if len(data) < HEADER_SIZE:
        raise ContainerFormatError(f"its header is cut short ({len(data)} of {HEADER_SIZE} bytes)")
    magic, version, flags, chunk_size, salt, key_digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ContainerFormatError("it does not start with the container magic")
    if version != VERSION:
        raise ContainerFormatError(f"its format version is {version}; this release reads version {VERSION}")
    if hashlib.sha256(data[: _HEADER.size]).digest() != data[_HEADER.size : HEADER_SIZE]:
        raise ContainerFormatError("its header does not match its checksum")
    if flags & ~KNOWN_FLAGS:
        raise ContainerFormatError(f"its header has unknown flags 0x{flags:04x} (a newer release, or damage)")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ContainerFormatError(f"its chunk size {chunk_size} is out of range")
    if bool(flags & FLAG_AES256GCM) != any(key_digest):
        raise ContainerFormatError("its header's key digest disagrees with its encryption flag")
    return Header(flags, chunk_size, salt, key_digest)


class _Zstd:
    """One-shot zstd per chunk; compressor contexts are not thread-safe, so each thread has its own."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()

    def compress(self, data: bytes) -> bytes:
        import zstandard

        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
        return compressor.compress(data)

    def decompress(self, data: bytes, length: int) -> bytes:
        import zstandard

        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        try:
            return decompressor.decompress(data, max_output_size=length)
        except zstandard.ZstdError as err:
            raise ContainerFormatError(f"an authenticated chunk does not decompress ({err})") from None


class Codec:
    """Seals and opens the records of one container (its header, and its key if encrypted)."""

    def __init__(self, header: Header, key: bytes | None = None, level: int = 1) -> None:
        self.header = header
        self._header_bytes = header.pack()
        self._zstd = _Zstd(level) if header.compressed else None
        self._aead = None
        if header.encrypted:
            if key is None or hashlib.sha256(key).digest() != header.key_digest:
                raise ValueError("the key given is not the key of this container")
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF

            file_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=header.salt, info=HKDF_INFO).derive(key)
            self._aead = AESGCM(file_key)

    @property
    def overhead(self) -> int:
        return TAG_SIZE if self._aead is not None else DIGEST_SIZE

    def _seal(self, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        if self._aead is not None:
            return self._aead.encrypt(nonce, body, aad)
        return body + _digest(aad, body)

    def _open(self, nonce: bytes, record: bytes | memoryview, aad: bytes, what: str) -> bytes:
        if len(record) < self.overhead:
            raise ChunkAuthError(what)
        if self._aead is not None:
            from cryptography.exceptions import InvalidTag

            try:
                return self._aead.decrypt(nonce, bytes(record), aad)
            except InvalidTag:
                raise ChunkAuthError(what) from None
        body = record[: -DIGEST_SIZE]
        if _digest(aad, body) != bytes(record[-DIGEST_SIZE:]):
            raise ChunkAuthError(what)
        return bytes(body)

    def _chunk_aad(self, number: int, last: bool, length: int) -> bytes:
        return self._header_bytes + _AAD.pack(number, 1 if last else 0, length)

    def seal_chunk(self, number: int, last: bool, data: bytes) -> bytes:
        body = self._zstd.compress(data) if self._zstd is not None else data
        return self._seal(_NONCE_CHUNK + number.to_bytes(8, "big"), body, self._chunk_aad(number, last, len(data)))

    def open_chunk(self, number: int, last: bool, length: int, record: bytes | memoryview) -> bytes:
        """The original bytes of chunk ``number``, authenticated; ChunkAuthError if they are not what was sealed."""
        what = f"chunk {number}"
        body = self._open(_NONCE_CHUNK + number.to_bytes(8, "big"), record, self._chunk_aad(number, last, length),
                          what)
        data = self._zstd.decompress(body, length) if self._zstd is not None else body
        if len(data) != length:
            raise ContainerFormatError(f"{what} holds {len(data)} bytes, its index says {length}")
        return data

    def seal_index(self, plain: bytes) -> bytes:
        return self._seal(_NONCE_INDEX + bytes(8), plain, self._header_bytes + INDEX_AAD)

    def open_index(self, record: bytes | memoryview) -> bytes:
        return self._open(_NONCE_INDEX + bytes(8), record, self._header_bytes + INDEX_AAD, "the index")


def _digest(aad: bytes, body: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(len(aad).to_bytes(4, "big"))
    digest.update(aad)
    digest.update(body)
    return digest.digest()


def new_header(key: bytes | None, compress: bool, chunk_size: int = CHUNK_SIZE) -> Header:
    flags = (FLAG_ZSTD if compress else 0) | (FLAG_AES256GCM if key is not None else 0)
    digest = hashlib.sha256(key).digest() if key is not None else bytes(32)
    return Header(flags, chunk_size, os.urandom(SALT_SIZE), digest)


@dataclass(frozen=True)
class Entry:
    original: int  # offset in the original stream
    stored: int  # offset in the stored file
    stored_length: int
    length: int  # original bytes


class Encoder:
    """Writes one container: `start`, then `seal` (any thread) and `record` (in order) per chunk, then `finish`."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.chunk_size = codec.header.chunk_size
        self._entries: list[Entry] = []
        self._stored = HEADER_SIZE
        self._original = 0

    def start(self) -> bytes:
        return self.codec.header.pack()

    def seal(self, number: int, data: bytes, last: bool) -> bytes:
        if not 0 < len(data) <= self.chunk_size or (not last and len(data) != self.chunk_size):
            raise ValueError(f"chunk {number} of {len(data)} bytes in a container of {self.chunk_size}-byte chunks")
        return self.codec.seal_chunk(number, last, data)

    def record(self, length: int, stored_length: int) -> None:
        self._entries.append(Entry(self._original, self._stored, stored_length, length))
        self._original += length
        self._stored += stored_length

    def finish(self) -> bytes:
        """The index and the trailer."""
        plain = _INDEX_HEAD.pack(self._original, len(self._entries)) + b"".join(
            _ENTRY.pack(e.original, e.stored, e.stored_length, e.length) for e in self._entries
        )
        record = self.codec.seal_index(plain)
        return record + _TRAILER.pack(self._stored, len(record), TAIL_MAGIC)

    @property
    def original_size(self) -> int:
        return self._original


def encode(codec: Codec, data: bytes) -> bytes:
    """A whole container of ``data`` at once (tests, small files)."""
    reader = EncodingReader(_BytesSource(data).read, Encoder(codec))
    out = bytearray()
    while chunk := reader.read(1 << 20):
        out += chunk
    return bytes(out)


class _BytesSource:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, size: int) -> bytes:
        piece, self._view = self._view[:size], self._view[size:]
        return bytes(piece)


class EncodingReader:
    """A ``read(size)`` over the stored bytes of the stream ``read`` gives: the container, produced as read.

    Chunks are sealed on SEAL_THREADS threads, at most SEALS_IN_FLIGHT at once,
    and come out in order; one chunk is read ahead to know which is the last.
    ``read`` returns exactly ``size`` bytes but at the end, and b"" after it.
    """

    def __init__(self, read: Callable[[int], bytes], encoder: Encoder) -> None:
        self._read = read
        self._encoder = encoder
        self._out = bytearray(encoder.start())
        self._at = 0  # bytes of _out already returned
        self._ahead: bytes | None = None  # the next chunk of the original stream, read ahead
        self._number = 0
        self._source_done = False
        self._finished = False
        self._in_flight: collections.deque[tuple[Future[bytes], int]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None

    def _read_chunk(self) -> bytes:
        size = self._encoder.chunk_size
        first = self._read(size)
        if len(first) == size or not first:
            return first
        parts = bytearray(first)
        while len(parts) < size and (more := self._read(size - len(parts))):
            parts += more
        return bytes(parts)

    def _submit(self) -> None:
        if self._ahead is None:
            self._ahead = self._read_chunk()
        data = self._ahead
        if not data:
            self._source_done = True
            return
        self._ahead = self._read_chunk()
        last = not self._ahead
        if self._pool is None:
            self._pool = ThreadPoolExecutor(SEAL_THREADS, thread_name_prefix="seal")
        self._in_flight.append((self._pool.submit(self._encoder.seal, self._number, data, last), len(data)))
        self._number += 1
        self._source_done = last

    def _pump(self) -> None:
        while not self._source_done and len(self._in_flight) < SEALS_IN_FLIGHT:
            self._submit()
        if self._in_flight:
            future, length = self._in_flight.popleft()
            sealed = future.result()
            self._encoder.record(length, len(sealed))
            self._out += sealed
        elif not self._finished:
            self._out += self._encoder.finish()
            self._finished = True
            self.close()

    def read(self, size: int) -> bytes:
        while len(self._out) - self._at < size and not (self._finished and not self._in_flight):
            if self._at:
                del self._out[: self._at]
                self._at = 0
            self._pump()
        piece = bytes(self._out[self._at : self._at + size])
        self._at += len(piece)
        return piece

    @property
    def original_size(self) -> int:
        return self._encoder.original_size

    @property
    def description(self) -> str:
        return self._encoder.codec.header.describe()

    def close(self) -> None:
        """Stop sealing (the upload ended or failed); chunks queued are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


@dataclass(frozen=True)
class Trailer:
    index_offset: int
    index_length: int


def parse_trailer(tail: bytes, file_size: int) -> Trailer:
    """Where the index lies, checked against the file's size."""
    if len(tail) != TRAILER_SIZE:
        raise ContainerFormatError("its trailer is missing (the file is cut short)")
    index_offset, index_length, magic = _TRAILER.unpack(tail)
    if magic != TAIL_MAGIC:
        raise ContainerFormatError("it does not end with the container trailer (the file is cut short or grown)")
    if index_offset < HEADER_SIZE or index_offset + index_length + TRAILER_SIZE != file_size:
        raise ContainerFormatError(
            f"its trailer puts the index at {index_offset} ({index_length} bytes), which does not fit a file of "
            f"{file_size} bytes (cut short, grown or damaged)"
        )
    return Trailer(index_offset, index_length)


class Container:
    """A stored container's authenticated index: what a read plans with."""

    def __init__(self, codec: Codec, trailer: Trailer, index_record: bytes | memoryview) -> None:
        self.codec = codec
        self.chunk_size = codec.header.chunk_size
        plain = codec.open_index(index_record)
        if len(plain) < _INDEX_HEAD.size:
            raise ContainerFormatError("its index is too short")
        self.size, count = _INDEX_HEAD.unpack_from(plain)
        if len(plain) != _INDEX_HEAD.size + count * _ENTRY.size:
            raise ContainerFormatError(f"its index lists {count} chunks in {len(plain)} bytes")
        entries = [Entry(*_ENTRY.unpack_from(plain, _INDEX_HEAD.size + i * _ENTRY.size)) for i in range(count)]
        stored, original = HEADER_SIZE, 0
        for number, entry in enumerate(entries):
            last = number == count - 1
            if (entry.original != original or entry.stored != stored or entry.stored_length < codec.overhead
                    or not 0 < entry.length <= self.chunk_size or (not last and entry.length != self.chunk_size)):
                raise ContainerFormatError(f"its index entry for chunk {number} is inconsistent")
            stored += entry.stored_length
            original += entry.length
        if stored != trailer.index_offset or original != self.size:
            raise ContainerFormatError("its index does not account for the file's bytes")
        self.entries = entries

    def plan(self, ranges: list[tuple[int, int]]) -> list[blocks.Step]:
        """The steps of a read of ``ranges`` of the original stream (in the order given), chunk by chunk."""
        return blocks.plan(ranges, self.chunk_size)

    def fetch_ranges(self, steps: list[blocks.Step]) -> list[tuple[int, int]]:
        """The stored byte ranges to read, in order, contiguous ones merged."""
        spans: list[tuple[int, int]] = []
        for step in steps:
            if not step.fetch:
                continue
            start = self.entries[step.fetch.start].stored
            last = self.entries[step.fetch.stop - 1]
            end = last.stored + last.stored_length
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        return spans

    def stored_bytes(self, steps: list[blocks.Step]) -> int:
        return sum(end - start for start, end in self.fetch_ranges(steps))

    def open_chunk(self, number: int, record: bytes | memoryview) -> bytes:
        entry = self.entries[number]
        return self.codec.open_chunk(number, number == len(self.entries) - 1, entry.length, record)


class ChunkOutput:
    """Takes the fetched stored bytes in order, cuts them into chunks, authenticates and decodes each, and
    writes the requested parts of it to ``out``. Nothing of a chunk is written before it is authenticated;
    after a failure nothing more is written."""

    def __init__(self, container: Container, steps: list[blocks.Step], out: Callable[[memoryview], object]) -> None:
        self._container = container
        self._out = out
        self._order: Iterator[int] = blocks.fetched_blocks(steps)
        self._current: int | None = next(self._order, None)
        self._pending = bytearray()
        # What to write, in order: (chunk, from, to) in the chunk's original bytes.
        self._writes: collections.deque[tuple[int, int, int]] = collections.deque()
        for step in steps:
            for number in range(step.first, step.last + 1):
                base = number * container.chunk_size
                end = base + container.entries[number].length
                self._writes.append((number, max(step.start, base) - base, min(step.end, end) - base))
        self._failed = False
        self.delivered = 0

    def feed(self, data: bytes | memoryview) -> None:
        if self._failed:
            raise RuntimeError("a chunk failed before")
        view = memoryview(data)
        while view:
            if self._current is None:
                raise ValueError("more bytes than the planned chunks hold")
            wanted = self._container.entries[self._current].stored_length - len(self._pending)
            if not self._pending and len(view) >= wanted:
                record: bytes | memoryview | bytearray = view[:wanted]
            else:
                self._pending += view[:wanted]
                if len(self._pending) < self._container.entries[self._current].stored_length:
                    return
                record = self._pending
            view = view[wanted:]
            self._chunk(self._current, record)
            self._pending = bytearray()
            self._current = next(self._order, None)

    def _chunk(self, number: int, record: bytes | memoryview | bytearray) -> None:
        try:
            data = self._container.open_chunk(number, record)
        except BaseException:
            self._failed = True
            raise
        view = memoryview(data)
        if not self._writes or self._writes[0][0] != number:
            raise AssertionError(f"fetched chunk {number}, which no write needs next")
        while self._writes and self._writes[0][0] == number:
            _, lo, hi = self._writes.popleft()
            self._out(view[lo:hi])
            self.delivered += hi - lo

    def finish(self) -> None:
        if self._current is not None or self._pending or self._writes:
            raise ValueError("the stored bytes ended before the planned chunks")
