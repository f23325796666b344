"""The background SHA-256 gives exactly hashlib's digest of the stream it was fed."""

from __future__ import annotations

import hashlib
import os

from sftp_plugin import integrity


def test_background_hash_of_many_chunks_equals_hashlib() -> None:
    chunks = [os.urandom(size) for size in (0, 1, 4096, 261120, 1048576)] * 40  # more than the queue holds
    background = integrity.new_hash()
    for chunk in chunks:
        background.update(chunk)
    assert background.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_background_hash_of_nothing_is_the_empty_digest_and_asking_twice_is_the_same() -> None:
    background = integrity.new_hash()
    assert background.hexdigest() == hashlib.sha256(b"").hexdigest()
    assert background.hexdigest() == hashlib.sha256(b"").hexdigest()


def test_sidecar_round_trips_through_sha256sum_format() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert integrity.parse_sidecar(integrity.format_sidecar(digest, "gpbackup_0_t")) == digest


def test_block_digests_are_the_same_hashed_inline_or_on_the_helper_thread() -> None:
    block = 1000  # blocks that straddle the point where the helper thread takes over
    data = os.urandom(integrity.INLINE_BYTES + 5 * block + 17)
    for chunk_size in (4096, len(data)):  # crossing INLINE_BYTES mid-stream; all of it on the thread
        background = integrity.BackgroundSha256(block_size=block)
        for start in range(0, len(data), chunk_size):
            background.update(data[start : start + chunk_size])
        result = background.result()
        expected = b"".join(hashlib.sha256(data[at : at + block]).digest() for at in range(0, len(data), block))
        assert (result.size, result.whole, result.blocks) == (len(data), hashlib.sha256(data).digest(), expected)
