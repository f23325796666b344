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
import struct
import threading
import time

from paramiko.buffered_pipe import BufferedPipe, PipeTimeout

_LENGTH = struct.Struct(">I")
# Longest frame read_frame waits for: paramiko's own check ("Garbage packet received") refuses a length
# with its high byte set, and an SFTP packet is far shorter (OpenSSH's sftp-server: 256 KiB of data).
MAX_FRAME = (1 << 24) - 1


class FrameTooLong(Exception):
    """A frame's length says more than MAX_FRAME: not an SFTP packet, or a stream out of step."""


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
                    timeout = self._wait(timeout)
                    if timeout is not None and timeout <= 0.0:
                        raise PipeTimeout()
                if not self._size:
                    return b""  # closed while we waited
            return self._take_out(nbytes)

    def read_frame(self, timeout: float | None = None) -> bytes:
        """One length-prefixed frame, whole: a 4-byte big-endian length and that many bytes after it (an
        SFTP packet), or b"" once the channel closed before one was complete. Where reading an SFTP packet
        through Channel.recv took two reads (its length, then its body), each with its lock, its wait and
        its window check, and a body that arrived in pieces was joined piece by piece, this waits once for
        the whole frame and copies it once. Raises FrameTooLong before waiting for a length over
        ``MAX_FRAME``, and PipeTimeout after ``timeout`` seconds in which no byte came (as the two reads
        did: the channel's timeout is io_timeout, time without progress, not a packet's whole time)."""
        with self._lock:
            left = timeout
            while True:
                if self._size >= _LENGTH.size:
                    length = _LENGTH.unpack(self._peek(_LENGTH.size))[0]
                    if length > MAX_FRAME:
                        raise FrameTooLong(length)
                    if self._size >= _LENGTH.size + length:
                        break
                if self._closed:
                    return b""
                had = self._size
                left = self._wait(left)
                if self._size > had:
                    left = timeout  # bytes came: the time without progress starts again
                elif left is not None and left <= 0.0:
                    raise PipeTimeout()
            return self._take_out(_LENGTH.size + length)

    def _wait(self, timeout: float | None) -> float | None:
        """Wait for a feed or the close (lock held); what is left of ``timeout`` (<= 0 once it ran out)."""
        then = time.time()
        self._cv.wait(timeout)
        return None if timeout is None else timeout - (time.time() - then)

    def _take_out(self, nbytes: int) -> bytes:
        """`_take`, and the event cleared once nothing is left (lock held, buffer not empty)."""
        out = self._take(nbytes)
        if not self._size and self._event is not None and not self._closed:
            self._event.clear()
        return out

    def _peek(self, nbytes: int) -> bytes:
        """The first ``nbytes`` (lock held, at least that many buffered), left in the buffer."""
        out = b""
        for chunk in self._chunks:  # a length field cut in two by its packets: a few bytes from each
            out += bytes(chunk[: nbytes - len(out)])
            if len(out) == nbytes:
                break
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
