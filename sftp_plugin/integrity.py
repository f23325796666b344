"""SHA-256 sidecars: how a stored file's checksum is named, written and read back.

Each stored file ``<name>`` gets ``<name>.sha256`` beside it, in the format
``sha256sum`` writes (``<64 hex>  <name>``), so an admin can verify a backup on
the backup host itself with ``sha256sum -c *.sha256``. A stream longer than one
block also gets its per-block digests (blocks.py), computed in the same pass.
Both are put in place *before* their data file is renamed into place, so a
file under its final name always has its checksums.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from sftp_plugin.blocks import BLOCK_SIZE, BLOCKS_SUFFIX

SIDECAR_SUFFIX = ".sha256"
_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def is_sidecar(name: str) -> bool:
    return name.endswith(SIDECAR_SUFFIX)


def missing_data_files(names: Iterable[str]) -> list[str]:
    """The files among ``names`` (a directory's listing) whose sidecar is there but the file itself is not."""
    present = set(names)
    stored = (name[: -len(SIDECAR_SUFFIX)] for name in present if is_sidecar(name))
    return sorted(name for name in stored if name not in present)


def is_checksum_file(name: str) -> bool:
    """A sidecar or a blocks file: ours, beside a stored file, not one of gpbackup's."""
    return is_sidecar(name) or name.endswith(BLOCKS_SUFFIX)


def empty_digest() -> str:
    return hashlib.sha256(b"").hexdigest()


# Chunks waiting to be hashed (of up to 1 MiB each). SHA-256 (~1.6 GB/s here)
# outruns the transfer, but on a busy machine its thread may be scheduled late:
# then the transfer waits rather than holding more than this many chunks. 8, 64
# and 2 measured the same speed (bench/RESULTS.md).
HASH_QUEUE_CHUNKS = 8
# Bytes hashed inline before the helper thread starts (see BackgroundSha256): more than most tables' files,
# and at ~1.6 GB/s under a millisecond of hashing on the caller's thread.
INLINE_BYTES = 1 << 20


@dataclass(frozen=True)
class StreamDigests:
    """What a stream's hashing found: its size, whole-stream SHA-256, and one SHA-256 per block."""

    size: int
    whole: bytes
    blocks: bytes  # DIGEST_SIZE bytes per block of BLOCK_SIZE, in order

    @property
    def hexdigest(self) -> str:
        return self.whole.hex()


class BackgroundSha256:
    """SHA-256 of a stream and of each of its blocks, computed on a helper thread while the transfer goes on.

    hashlib releases the GIL while it hashes, so on its own thread the hashing
    runs on another core instead of stalling the thread that feeds SSH: -8 to
    -10% wall time on a 256 MiB transfer (bench/RESULTS.md). The first
    INLINE_BYTES are hashed on the caller's thread: most calls of a per-table
    backup store less than that, and for them starting and joining a thread
    costs more than the hashing. Chunks must not be changed after update();
    bytes never are.
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self._block_size = block_size
        self._whole = hashlib.sha256()
        self._block = hashlib.sha256()
        self._in_block = 0  # bytes of the current block hashed so far
        self._blocks = bytearray()
        self._size = 0
        self._chunks: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None  # started once the stream outgrows INLINE_BYTES
        self._result: StreamDigests | None = None

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash(chunk)

    def _hash(self, chunk: bytes) -> None:
        self._whole.update(chunk)
        self._size += len(chunk)
        view = memoryview(chunk)
        while view:
            take = min(len(view), self._block_size - self._in_block)
            self._block.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == self._block_size:
                self._end_block()

    def _end_block(self) -> None:
        self._blocks += self._block.digest()
        self._block = hashlib.sha256()
        self._in_block = 0

    def update(self, chunk: bytes) -> None:
        if self._thread is None:
            if self._size + len(chunk) <= INLINE_BYTES:
                self._hash(chunk)
                return
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        self._chunks.put(chunk)

    def result(self) -> StreamDigests:
        """The digests of everything updated so far; no update() may follow."""
        if self._result is None:
            if self._thread is not None:
                self._chunks.put(None)
                self._thread.join()
            if self._in_block:
                self._end_block()
            self._result = StreamDigests(self._size, self._whole.digest(), bytes(self._blocks))
        return self._result

    def hexdigest(self) -> str:
        return self.result().hexdigest


def new_hash() -> BackgroundSha256:
    return BackgroundSha256()


def format_sidecar(digest: str, name: str) -> bytes:
    return f"{digest}  {name}\n".encode()


def parse_sidecar(text: bytes) -> str | None:
    """The hex digest in a sidecar, or None if it is not in sha256sum format."""
    match = _LINE_RE.match(text.decode("utf-8", "replace").strip())
    return match.group(1) if match else None
