"""The container format (container.py) and key files (keys.py): pure unit tests."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from sftp_plugin import container, keys
from sftp_plugin.container import ChunkAuthError, Codec, Container, ContainerFormatError
from sftp_plugin.errors import ConfigError

SMALL_CHUNK = 1000
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
MODES = {"zstd": (None, True), "zstd+aes": (KEY, True), "aes": (KEY, False), "chunked": (None, False)}


def table_like(size: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"Berlin", b"Paris", b"2024-01-02", b"true", b"false"]
    out = bytearray()
    row = 0
    while len(out) < size:
        out += b"%d|%d|%s|%.5f|%s\n" % (row, rng.randrange(10**9), rng.choice(words), rng.random(), rng.choice(words))
        row += 1
    return bytes(out[:size])


def seal(data: bytes, mode: str, chunk_size: int = SMALL_CHUNK) -> bytes:
    key, compress = MODES[mode]
    return container.encode(Codec(container.new_header(key, compress, chunk_size), key), data)


def codec_of(stored: bytes, key: bytes | None) -> Codec:
    return Codec(container.parse_header(stored[: container.HEADER_SIZE]), key)


def open_container(stored: bytes, key: bytes | None) -> Container:
    trailer = container.parse_trailer(stored[-container.TRAILER_SIZE :], len(stored))
    record = stored[trailer.index_offset : trailer.index_offset + trailer.index_length]
    return Container(codec_of(stored, key), trailer, record)


def read(stored: bytes, key: bytes | None, ranges: list[tuple[int, int]] | None = None) -> tuple[bytes, int]:
    """What a restore delivers of ``ranges`` (all by default), and how many stored bytes it fetched."""
    assert container.looks_like(stored[: container.HEADER_SIZE], stored[-container.TRAILER_SIZE :]) is True
    box = open_container(stored, key)
    steps = box.plan([(0, box.size)] if ranges is None else ranges)
    out = bytearray()
    output = container.ChunkOutput(box, steps, out.extend)
    fetched = 0
    for start, end in box.fetch_ranges(steps):
        for at in range(start, end, 777):  # in pieces that do not match chunk bounds
            output.feed(stored[at : min(end, at + 777)])
        fetched += end - start
    output.finish()
    return bytes(out), fetched


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 10 * SMALL_CHUNK + 17])
def test_round_trip(mode: str, size: int) -> None:
    data = table_like(size)
    stored = seal(data, mode)
    assert read(stored, MODES[mode][0])[0] == data
    if MODES[mode][0] is not None and size >= 40:
        assert data[:40] not in stored  # encrypted: the rows are not readable in the stored file


def test_compression_shrinks_table_data() -> None:
    data = table_like(200_000)
    assert len(seal(data, "zstd", container.CHUNK_SIZE)) < len(data) / 2
    assert len(seal(data, "zstd+aes", container.CHUNK_SIZE)) < len(data) / 2


@pytest.mark.parametrize("mode", ["zstd+aes", "chunked"])
def test_subset_reads_fetch_only_the_chunks_they_need(mode: str) -> None:
    data = table_like(50 * SMALL_CHUNK + 123)
    stored = seal(data, mode)
    ranges = [
        (0, 10),  # inside the first chunk
        (SMALL_CHUNK - 5, SMALL_CHUNK + 5),  # across a chunk boundary
        (7 * SMALL_CHUNK, 7 * SMALL_CHUNK),  # empty
        (12 * SMALL_CHUNK + 1, 15 * SMALL_CHUNK - 1),  # several chunks
        (len(data) - 50, len(data)),  # the last, short chunk
        (3 * SMALL_CHUNK, 3 * SMALL_CHUNK + 1),  # out of order
    ]
    got, fetched = read(stored, MODES[mode][0], ranges)
    assert got == b"".join(data[start:end] for start, end in ranges)
    box = open_container(stored, MODES[mode][0])
    needed = {0, 1, 12, 13, 14, 50, 3}
    assert fetched == sum(box.entries[n].stored_length for n in needed)
    assert fetched < len(stored) / 5


def test_adjacent_ranges_share_their_boundary_chunk() -> None:
    data = table_like(5 * SMALL_CHUNK)
    stored = seal(data, "zstd")
    box = open_container(stored, None)
    ranges = [(0, 1500), (1500, 2500), (2500, 2600)]
    steps = box.plan(ranges)
    assert box.fetch_ranges(steps) == [(box.entries[0].stored, box.entries[2].stored + box.entries[2].stored_length)]
    assert read(stored, None, ranges)[0] == data[:2600]


def chunk_spans(stored: bytes) -> list[tuple[int, int]]:
    return [(e.stored, e.stored + e.stored_length) for e in open_container(stored, KEY).entries]


@pytest.mark.parametrize("mode", ["zstd+aes", "chunked", "zstd"])
def test_one_flipped_bit_anywhere_fails_before_delivery(mode: str) -> None:
    key = MODES[mode][0]
    data = table_like(4 * SMALL_CHUNK + 10)
    stored = seal(data, mode)
    spans = chunk_spans(stored) if key else [(e.stored, e.stored + e.stored_length)
                                             for e in open_container(stored, None).entries]
    places = {"header": 20, "salt": 30, "key digest": 50, "header checksum": 80, "trailer": len(stored) - 10,
              "index": len(stored) - container.TRAILER_SIZE - 5, "magic": 2, "tail magic": len(stored) - 2}
    for number, (start, end) in enumerate(spans):
        places[f"chunk {number} start"] = start
        places[f"chunk {number} end"] = end - 1
    for where, at in places.items():
        damaged = bytearray(stored)
        damaged[at] ^= 0x10
        delivered = bytearray()
        with pytest.raises((ChunkAuthError, ContainerFormatError, ValueError)):
            shape = container.looks_like(bytes(damaged[: container.HEADER_SIZE]),
                                         bytes(damaged[-container.TRAILER_SIZE :]))
            if shape is not True:
                raise ContainerFormatError(f"damaged {where}")
            box = open_container(bytes(damaged), key)
            steps = box.plan([(0, box.size)])
            output = container.ChunkOutput(box, steps, delivered.extend)
            for start, end in box.fetch_ranges(steps):
                output.feed(bytes(damaged[start:end]))
            output.finish()
        # Nothing of the damaged chunk, nor after it, reached the reader.
        good_prefix = len(data) if at >= len(stored) else 0
        if where.startswith("chunk"):
            good_prefix = int(where.split()[1]) * SMALL_CHUNK
        assert len(delivered) <= good_prefix, where
        assert bytes(delivered) == data[: len(delivered)], where


def rebuild(stored: bytes, order: list[int]) -> bytes:
    """The same container with its chunks laid out in ``order`` (the index kept as it was)."""
    spans = [(e.stored, e.stored + e.stored_length) for e in open_container(stored, KEY).entries]
    body = b"".join(stored[spans[n][0] : spans[n][1]] for n in order)
    rest = stored[spans[-1][1] :]
    return stored[: container.HEADER_SIZE] + body + rest


def test_reordered_dropped_duplicated_chunks_fail() -> None:
    data = table_like(4 * SMALL_CHUNK)  # four chunks of the same length: a swap keeps the offsets
    stored = seal(data, "aes")
    assert read(rebuild(stored, [0, 1, 2, 3]), KEY)[0] == data
    with pytest.raises(ChunkAuthError):
        read(rebuild(stored, [1, 0, 2, 3]), KEY)
    with pytest.raises(ChunkAuthError):
        read(rebuild(stored, [0, 0, 2, 3]), KEY)  # duplicated, in place of chunk 1
    with pytest.raises(ContainerFormatError):
        read(rebuild(stored, [0, 2, 3]), KEY)  # dropped: the index no longer fits the file
    with pytest.raises(ContainerFormatError):
        read(rebuild(stored, [0, 1, 2, 3, 3]), KEY)  # duplicated at the end


def test_a_chunk_moved_into_another_container_fails() -> None:
    """Same key, other file: its own salt, so its own file key; the chunk does not open here."""
    data = table_like(2 * SMALL_CHUNK)
    one, two = seal(data, "aes"), seal(data, "aes")
    assert one[container.HEADER_SIZE : container.HEADER_SIZE + 100] != two[container.HEADER_SIZE :][:100]
    spans = chunk_spans(one)
    mixed = one[: spans[1][0]] + two[spans[1][0] : spans[1][1]] + one[spans[1][1] :]
    with pytest.raises(ChunkAuthError):
        read(mixed, KEY)


def test_the_last_chunk_flag_is_authenticated() -> None:
    """A stream cut at a chunk bound and given an index of its own still fails: its last chunk was sealed as
    not last (checked through the codec, which is what an attacker without the key cannot redo)."""
    data = table_like(3 * SMALL_CHUNK)
    stored = seal(data, "aes")
    box = open_container(stored, KEY)
    start, end = box.entries[1].stored, box.entries[1].stored + box.entries[1].stored_length
    assert box.codec.open_chunk(1, False, SMALL_CHUNK, stored[start:end]) == data[SMALL_CHUNK : 2 * SMALL_CHUNK]
    with pytest.raises(ChunkAuthError):
        box.codec.open_chunk(1, True, SMALL_CHUNK, stored[start:end])


@pytest.mark.parametrize("cut", [1, container.TRAILER_SIZE, container.TRAILER_SIZE + 3, 500])
def test_truncation_fails(cut: int) -> None:
    stored = seal(table_like(3 * SMALL_CHUNK), "zstd+aes")
    short = stored[:-cut]
    shape = container.looks_like(short[: container.HEADER_SIZE], short[-container.TRAILER_SIZE :])
    if shape is True:  # a cut that happened to end on bytes like a trailer: the offsets give it away
        with pytest.raises(ContainerFormatError):
            read(short, KEY)
    else:
        assert shape is None  # starts like a container, does not end like one: damaged, never plain


def test_plain_files_are_not_containers() -> None:
    assert container.looks_like(b"COPY public.t FROM stdin;\n", b"x" * container.TRAILER_SIZE) is False
    assert container.looks_like(b"", b"") is False


def test_wrong_key_fails_to_open() -> None:
    stored = seal(b"secret rows\n" * 300, "aes")
    header = container.parse_header(stored[: container.HEADER_SIZE])
    assert header.key_digest == keys.key_digest(KEY)
    with pytest.raises(ValueError, match="not the key"):
        Codec(header, OTHER_KEY)
    with pytest.raises(ValueError):
        Codec(header, None)


def test_unknown_version_and_flags_are_refused() -> None:
    stored = bytearray(seal(b"x" * 10, "zstd"))
    stored[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(ContainerFormatError, match="format version is 2"):
        container.parse_header(bytes(stored))
    stored[8:10] = (1).to_bytes(2, "big")
    stored[10:12] = (0x80).to_bytes(2, "big")
    with pytest.raises(ContainerFormatError, match="does not match its checksum"):
        container.parse_header(bytes(stored))  # flags changed, checksum not: damage, not a newer release
    stored[64:96] = hashlib.sha256(stored[:64]).digest()
    with pytest.raises(ContainerFormatError, match="unknown flags"):
        container.parse_header(bytes(stored))


def test_nonces_never_repeat_within_a_file_and_salts_differ() -> None:
    headers = {container.new_header(KEY, True).salt for _ in range(100)}
    assert len(headers) == 100
    data = table_like(3 * SMALL_CHUNK)
    stored = seal(data + data[:SMALL_CHUNK], "aes")  # chunks 0 and 3 hold the same bytes
    spans = chunk_spans(stored)
    assert stored[spans[0][0] : spans[0][1]] != stored[spans[3][0] : spans[3][1]]


def test_encoding_reader_returns_full_reads_and_handles_short_source_reads() -> None:
    data = table_like(7 * SMALL_CHUNK + 3)
    rest = memoryview(data)

    def dribble(size: int) -> bytes:  # short reads, as from a pipe
        nonlocal rest
        piece, rest = rest[: min(size, 333)], rest[min(size, 333) :]
        return bytes(piece)

    key, compress = MODES["zstd"]
    reader = container.EncodingReader(dribble, container.Encoder(Codec(container.new_header(key, compress,
                                                                                              SMALL_CHUNK), key)))
    out = []
    while chunk := reader.read(4096):
        out.append(chunk)
    assert all(len(chunk) == 4096 for chunk in out[:-1])
    assert reader.original_size == len(data)
    assert read(b"".join(out), None)[0] == data


# ---------------------------------------------------------------- keys


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    path = str(tmp_path / "backup.key")
    key = keys.write_new_key(path)
    assert len(key) == keys.KEY_SIZE
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert keys.load_key(path) == key
    assert keys.fingerprint(key).startswith("SHA256:") and len(keys.fingerprint(key)) == 7 + 43
    with pytest.raises(FileExistsError):
        keys.write_new_key(path)
    assert keys.load_key(path) == key


def test_a_key_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keys.write_new_key(str(path))
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="accessible by group or others .mode 0640.*chmod 600"):
        keys.load_key(str(path))


@pytest.mark.parametrize("content", [b"", b"\0" * 31, b"\0" * 33, b"\0" * 32 + b"\n"])
def test_a_file_that_is_not_a_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not a key made by"):
        keys.load_key(str(path))


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key file .*nope does not exist"):
        keys.load_key(str(tmp_path / "nope"))


def test_keyring_finds_old_keys_and_names_the_needed_one(tmp_path: Path) -> None:
    new, old = tmp_path / "new.key", tmp_path / "old.key"
    new_key, old_key = keys.write_new_key(str(new)), keys.write_new_key(str(old))
    ring = keys.Keyring(str(new), [str(old)])
    assert ring.encryption_key() == new_key
    assert ring.for_digest(keys.key_digest(old_key), "f") == old_key
    lost = os.urandom(32)
    with pytest.raises(ConfigError) as caught:
        ring.for_digest(keys.key_digest(lost), "host:/x")
    message = str(caught.value)
    assert keys.fingerprint(lost) in message and keys.fingerprint(new_key) in message
    assert keys.fingerprint(old_key) in message and "\n" not in message
    with pytest.raises(ConfigError, match="configured keys: none"):
        keys.Keyring(None).for_digest(keys.key_digest(lost), "host:/x")
