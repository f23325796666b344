"""The receive buffer of our SFTP channel: paramiko's BufferedPipe without its O(n) reads.

paramiko's transport thread feeds every incoming SSH packet into the channel's
BufferedPipe, and the SFTP client reads it back: 4 bytes of length, then the
message. BufferedPipe keeps one flat array and deletes what is read from its
front, so every read moves everything still buffered. With the megabytes of
window a download needs, that is megabytes moved per 4-byte read; the profile of a
restore showed it as the biggest single cost. This subclass keeps the packets
as they arrived and copies only what a read returns (256 MiB restore: ~1.5 s
-> ~1.1 s of CPU, see bench/RESULTS.md). Locking, waiting, timeouts, events
and close behave exactly as in the parent, whose lock and condition it uses.
"""

from __future__ import annotations

import collections
import threading
import time

from paramiko.buffered_pipe import BufferedPipe, PipeTimeout


class ChunkedPipe(BufferedPipe):  # type: ignore[misc]  # paramiko ships no type hints
    """A drop-in BufferedPipe holding a deque of fed chunks instead of one flat array."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        self._size = 0

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes | bytearray | memoryview | str) -> None:
        # A read-only memoryview (channel data from packetizer.py: a view of its
        # decrypted packet) is kept as it is, copied only when read. Anything that
        # could change under us (a bytearray, a writable view) is copied now.
        if isinstance(data, str):
            chunk: bytes | memoryview = data.encode()
        elif isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly):
            chunk = data
        else:
            chunk = bytes(data)
        with self._lock:
            if self._event is not None:
                self._event.set()
            if chunk:
                self._chunks.append(chunk)
                self._size += len(chunk)
            self._cv.notify_all()

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._lock:
            if not self._size:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                # Loop: woken up, another reader may have taken everything.
                while not self._size and not self._closed:
                    then = time.time()
                    self._cv.wait(timeout)
                    if timeout is not None:
                        timeout -= time.time() - then
                        if timeout <= 0.0:
                            raise PipeTimeout()
                if not self._size:
                    return b""  # closed while we waited
            out = self._take(nbytes)
            if not self._size and self._event is not None and not self._closed:
                self._event.clear()
            return out

    def empty(self) -> bytes:
        with self._lock:
            out = b"".join(self._chunks)  # bytes, even of a single view
            self._chunks.clear()
            self._size = 0
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def __len__(self) -> int:
        with self._lock:
            return self._size

    def _take(self, nbytes: int) -> bytes:
        """Up to `nbytes` from the front (lock held, buffer not empty)."""
        chunks = self._chunks
        first = chunks[0]
        if len(first) > nbytes:
            chunks[0] = first[nbytes:]
            self._size -= nbytes
            return bytes(first[:nbytes])
        parts = [chunks.popleft()]
        taken = len(first)
        while chunks and taken < nbytes:
            chunk = chunks[0]
            if taken + len(chunk) <= nbytes:
                parts.append(chunks.popleft())
                taken += len(chunk)
            else:
                need = nbytes - taken
                parts.append(chunk[:need])
                chunks[0] = chunk[need:]
                taken = nbytes
        self._size -= taken
        if len(parts) == 1:
            return parts[0] if isinstance(parts[0], bytes) else bytes(parts[0])
        return b"".join(parts)
