"""SHA-256 sidecars: how a stored file's checksum is named, written and read back.

Each stored file ``<name>`` gets ``<name>.sha256`` beside it, in the format
``sha256sum`` writes (``<64 hex>  <name>``), so an admin can verify a backup on
the backup host itself with ``sha256sum -c *.sha256``. The sidecar is put in
place *before* its data file is renamed into place, so a file under its final
name always has its checksum.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading

SIDECAR_SUFFIX = ".sha256"
_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def is_sidecar(name: str) -> bool:
    return name.endswith(SIDECAR_SUFFIX)


# Chunks waiting to be hashed (of up to 1 MiB each). SHA-256 (~1.6 GB/s here)
# outruns the transfer, but on a busy machine its thread may be scheduled late:
# then the transfer waits rather than holding more than this many chunks. 8, 64
# and 2 measured the same speed (bench/RESULTS.md).
HASH_QUEUE_CHUNKS = 8


class BackgroundSha256:
    """SHA-256 of a stream, computed on a helper thread while the transfer goes on.

    hashlib releases the GIL while it hashes, so on its own thread the hashing
    runs on another core instead of stalling the thread that feeds SSH: -8 to
    -10% wall time on a 256 MiB transfer (bench/RESULTS.md). Chunks must not
    be changed after update(); bytes never are.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def hexdigest(self) -> str:
        """The digest of everything updated so far; no update() may follow."""
        if self._digest is None:
            self._chunks.put(None)
            self._thread.join()
            self._digest = self._hash.hexdigest()
        return self._digest


def new_hash() -> BackgroundSha256:
    return BackgroundSha256()


def format_sidecar(digest: str, name: str) -> bytes:
    return f"{digest}  {name}\n".encode()


def parse_sidecar(text: bytes) -> str | None:
    """The hex digest in a sidecar, or None if it is not in sha256sum format."""
    match = _LINE_RE.match(text.decode("utf-8", "replace").strip())
    return match.group(1) if match else None
