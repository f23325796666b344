"""Streaming SFTP transfers and directory operations. Knows SFTP, not gpbackup.

Reads and writes keep many requests in flight (pipelining) and check the
server's reply to every one of them, through fastpath.sftp's Pipeline (the
request machinery below paramiko's public SFTPClient lives there, not here).

Uploads always go to a temporary name in the target directory, are flushed to
disk (fsync@openssh.com where offered, unless the caller says not to) and
renamed into place only when complete: a partial file never sits under its
final name (after a crash of the backup host, only if it was flushed).

Everything created on the backup host is private to the SSH user: files
0600, directories 0700, the mode sent with the OPEN or MKDIR request itself
(sftp-server otherwise creates 0644 files and 0755 directories, readable by
every account on the host), so there is no moment when it is open to others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import stat
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import paramiko
from paramiko.sftp import (
    CMD_READ,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    int64,
)

from sftp_plugin import paths
from sftp_plugin.connection import WINDOW_SIZE
from sftp_plugin.fastpath.sftp import WRITE_HEADER, EndOfFile, Pipeline, extended
from sftp_plugin.retry import is_connection_lost

log = logging.getLogger(__name__)

# Bytes per SFTP request where the server does not tell us more (its
# limits@openssh.com): 32 KiB is what every server accepts. Writes are sized
# to whole SSH packets below it (write_request_size), reads go up to
# MAX_READ_REQUEST, and long uploads to WRITE_PACKETS_LONG packets.
REQUEST_SIZE = 32 * 1024
# paramiko's Channel keeps 64 bytes of the peer's maximum packet for its own
# framing (Channel._wait_for_send_window), and a WRITE request carries a header
# (length, type, id, handle length, offset, data length) besides the handle. A
# write of 32 KiB of data therefore went out as two SSH packets, the second a
# few dozen bytes, doubling paramiko's per-packet work; writes sized to fill
# exactly one packet took 9% less CPU on a 256 MiB upload (bench/RESULTS.md).
CHANNEL_PACKET_RESERVE = 64
# SSH packets per WRITE request once a stream is known to be long (a full
# LOCAL_CHUNK read) and the server's limits@openssh.com allows it (OpenSSH:
# 255 KiB, so about eight packets). Fewer requests, fewer status replies to
# parse: four packets took 15% less CPU than one on a 256 MiB upload, eight
# another ~5% once packets were sealed in place (packetizer.py).
WRITE_PACKETS_LONG = 8
# Largest read request we make where the server announces larger ones through
# limits@openssh.com (OpenSSH's sftp-server allows 255 KiB). A server that
# returned less than asked would force serial reads, hence the announcement.
MAX_READ_REQUEST = 255 * 1024
# Bytes of write requests in flight per upload: 4 MiB, 200 MB/s on a 20 ms
# link and twice the window OpenSSH grants a session, which then is the limit.
WRITE_IN_FLIGHT_BYTES = 4 * 1024 * 1024
# Reads in flight for read_range's callers that do not size their own.
PIPELINE_DEPTH = WRITE_IN_FLIGHT_BYTES // REQUEST_SIZE
# Bytes of read requests in flight per download: the SSH window we grant, so
# the server can always send and our requests never wait on the window.
READ_AHEAD_BYTES = WINDOW_SIZE
LIMITS_EXTENSION = "limits@openssh.com"
# What a subset restore reads of a file's start (read_head's `limit`): four REQUEST_SIZE reads, a
# container's header and index start, not the MiB a whole restore reads at once.
HEAD_FIRST_READ = 4 * REQUEST_SIZE
# How much we read from a local source at once: few Python calls per MiB.
LOCAL_CHUNK = 1024 * 1024
# Modes of what the plugin creates on the backup host: backups hold a database's
# data, so only the SSH user may read them. The server applies its umask on top,
# which can only take bits away.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
# OPEN flags of a file an upload writes: created, or emptied (a retry rewrites it).
CREATE_FLAGS = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC

Sink = Callable[[bytes], object]


class ShortFileError(Exception):
    """The remote file ended before the bytes we were asked for (not a connection failure)."""


class ClosedEarly(Exception):
    """A server returned less than a READ asked for after the handle's CLOSE had gone out behind the last
    READ (read_ranges): what is left must be read through a new handle."""


class SyncRefusedError(Exception):
    """The server refused fsync@openssh.com (sftp-server -P fsync denies it): the file it wrote cannot be made
    durable. Not a lost connection, and not the permission error paramiko reports it as."""


def write_request_size(max_packet: int, handle: bytes, packets: int = 1, max_write: int = REQUEST_SIZE) -> int:
    """Data per WRITE request so that each request fills exactly `packets` SSH packets of the
    peer's maximum size, and stays within what the server accepts (`max_write`)."""
    fits = packets * (max_packet - CHANNEL_PACKET_RESERVE) - WRITE_HEADER - len(handle)
    return max(1, min(max_write, fits))


class PipelinedWriter:
    """Writes a stream to an open remote handle with many writes in flight.

    ``confirmed`` is the length of the prefix the server has acknowledged; a
    reconnecting caller can truncate to it and resume from there. ``sync``:
    whether sync_and_close asks the server to flush the file to disk.
    """

    def __init__(self, sftp: paramiko.SFTPClient, handle: bytes, offset: int = 0, sync: bool = True) -> None:
        self._pipe = Pipeline(sftp)
        self._handle = handle
        self._sync = sync
        self._set_request_size(write_request_size(sftp.get_channel().out_max_packet_size, handle))
        self.sent = offset
        self.confirmed = offset

    def _set_request_size(self, size: int) -> None:
        self._request_size = size
        self._depth = max(1, WRITE_IN_FLIGHT_BYTES // size)

    def use_long_writes(self) -> None:
        """Switch to WRITE_PACKETS_LONG packets per request where the server takes them (one round trip)."""
        limits = server_limits(self._pipe.sftp)
        if limits is not None:
            max_packet = self._pipe.sftp.get_channel().out_max_packet_size
            self._set_request_size(write_request_size(max_packet, self._handle, WRITE_PACKETS_LONG, limits[1]))

    def write(self, data: bytes | memoryview) -> None:
        for _, piece in self._pieces(data):
            if len(self._pipe.pending) >= self._depth:
                self._confirm_oldest()
            else:
                self._confirm_arrived()
            self._send_piece(piece)

    def _pieces(self, data: bytes | memoryview) -> list[tuple[int, memoryview]]:
        """``data`` cut into requests: (where each starts in ``data``, its bytes)."""
        view = memoryview(data)
        return [(start, view[start : start + self._request_size]) for start in range(0, len(view), self._request_size)]

    def _send_piece(self, piece: memoryview) -> None:
        num = self._pipe.send_write(self._handle, self.sent, piece)
        self._pipe.pending.append((num, self.sent, len(piece)))
        self.sent += len(piece)

    def _confirm_arrived(self) -> None:
        """Take the replies that are here already, without waiting for more: ``confirmed`` then follows the
        server, and a reset costs only what it had not acknowledged. Taken only when the pipeline was full,
        a link that reset every few MiB never got past the first WRITE_IN_FLIGHT_BYTES."""
        while self._pipe.pending and self._pipe.sftp.sock.recv_ready():
            self._confirm_oldest()

    def _confirm_oldest(self) -> None:
        num, offset, length = self._pipe.pending.popleft()
        self._pipe.wait(num)
        self.confirmed = offset + length

    def send_create_private(self, path: str) -> int:
        """OPEN ``path`` as `create_private` does, behind the writes in flight (no round trip of its own);
        its request number, for `created`."""
        return _send_create_private(self._pipe, path)

    def created(self, num: int) -> paramiko.SFTPFile:
        """The file a send_create_private opened (its reply, here already unless it was sent last)."""
        return self._pipe.opened(num, "wb")

    def drain(self) -> None:
        """Wait until every write so far is acknowledged."""
        while self._pipe.pending:
            self._confirm_oldest()

    def sync_and_close(self, remote: paramiko.SFTPFile, companions: Sequence[tuple[paramiko.SFTPFile, bytes]] = (),
                       also: Callable[[Pipeline], Callable[[bool], object]] | None = None,
                       tail: bytes | memoryview = b"") -> None:
        """Make the file durable (unless not ``sync``) and close it: fsync and CLOSE go behind the writes
        in flight and every reply is checked in order, in one round trip where drain, fsync and close took
        three. ``tail``, the file's last bytes not yet written, goes out with them, in the same packets: a
        short file's WRITE sent ahead on its own cost sshd and sftp-server one more wake-up each, and its
        reply, back on its own, one more of our transport thread. A server without fsync@openssh.com is
        tolerated (sync_failed); a failed CLOSE is an error, since a server may report a failed write only
        there. ``companions``, small files opened beside it (a checksum), are written, synced and closed
        behind it, in the same round trip. ``also`` sends more requests behind those (SpareFiles.send_open)
        and gives what takes their replies (never raising), called once the others are checked: with True
        if all are fine, with False if one failed on a working connection (what those requests made is
        undone). Not after a connection lost, where it could wait for a stalled link a second time: what
        they made is left for the cleanup."""
        writes: list[int] = []
        pieces = self._pieces(tail)
        while self._pipe.pending and len(self._pipe.pending) + len(pieces) > self._depth:
            self._confirm_oldest()  # room for the tail first: nothing sent in a batch may be waited for in it
        with self._pipe.batch():
            for _, piece in pieces:
                self._send_piece(piece)
            closing = [self._pipe.send_sync_and_close(remote, self._sync)]
            for file, data in companions:
                writes += [self._pipe.send_write(file.handle, start, piece) for start, piece in self._pieces(data)]
                closing.append(self._pipe.send_sync_and_close(file, self._sync))
            take_also = also(self._pipe) if also is not None else None
        try:
            self.drain()
            for num in writes:  # replies come in order: the companions' writes, then their syncs and closes
                self._pipe.wait(num)
            for sync, close in closing:
                refused: OSError | None = None
                try:
                    if sync is not None:
                        self._pipe.wait(sync)
                except OSError as err:
                    refused = err
                self._pipe.wait(close)  # the handle is closed either way: its reply is read before any raise
                if refused is not None:
                    sync_failed(refused)
        except Exception as err:
            if take_also is not None and not is_connection_lost(err):
                take_also(False)
            raise
        if take_also is not None:
            take_also(True)


def read_range(
    sftp: paramiko.SFTPClient,
    handle: bytes,
    start: int,
    end: int,
    sink: Sink,
    request_size: int = REQUEST_SIZE,
    depth: int = PIPELINE_DEPTH,
) -> int:
    """Send bytes ``[start, end)`` of a remote handle to ``sink``, in order; return bytes sent.

    Raises ShortFileError if the file ends before ``end``.
    """
    return read_ranges(sftp, handle, [(start, end)], sink, request_size, depth)


def read_ranges(  # noqa: PLR0913
    sftp: paramiko.SFTPClient,
    handle: bytes,
    ranges: Iterable[tuple[int, int]],
    sink: Sink,
    request_size: int = REQUEST_SIZE,
    depth: int = PIPELINE_DEPTH,
    close: paramiko.SFTPFile | None = None,
) -> int:
    """`read_range` for several ranges, in the order given, with the requests of later ranges pipelined
    behind those of earlier ones: ten short ranges cost about one round trip, not ten. Returns bytes sent.

    Every request lies within one range, so the sink sees each range's bytes in order, then the next's.
    Raises ShortFileError if the file ends before a range does. With ``close`` (the handle's file), its
    CLOSE goes out behind the last READ instead of taking a round trip of its own after them, and the
    file counts as closed from then (Pipeline.send_close). A short read after that raises ClosedEarly:
    the rest must be read through a new handle.
    """
    # (offset, length, end of its range) of each request still to send
    requests: deque[tuple[int, int, int]] = deque(
        (offset, min(request_size, end - offset), end) for start, end in ranges
        for offset in range(start, end, request_size)
    )
    ends: dict[int, int] = {}  # request number -> end of its range, for the message of a file cut short
    pipe = Pipeline(sftp)
    closing: int | None = None  # the CLOSE's request number, once sent
    sent = 0
    while pipe.pending or requests:
        while requests and len(pipe.pending) < depth:
            offset, length, end = requests.popleft()
            num = pipe.send(CMD_READ, handle, int64(offset), length)
            pipe.pending.append((num, offset, length))
            ends[num] = end
        if close is not None and closing is None and not requests:
            closing = pipe.send_close(close)
        num, offset, length = pipe.pending.popleft()
        end = ends.pop(num)
        try:
            _, msg = pipe.wait(num)
        except EndOfFile:
            _abandon(pipe, closing)
            raise ShortFileError(f"remote file ends at byte {offset}, expected {end}") from None
        data = msg.get_binary()
        sink(data)
        sent += len(data)
        if len(data) < length:
            # A short read is legal mid-file: fetch the rest of this request before going on, and send the
            # requests already in flight again (their replies are dropped to keep the channel in step).
            unsent = [(o, n, ends.pop(k)) for k, o, n in pipe.pending]
            _abandon(pipe, closing)
            if closing is not None:
                raise ClosedEarly(f"the server returned {len(data)} of {length} bytes at {offset + len(data)}")
            sent += _read_serially(sftp, handle, offset + len(data), offset + length, sink) - (offset + len(data))
            requests.extendleft(reversed(unsent))
    if close is not None:
        pipe.wait(closing if closing is not None else pipe.send_close(close))  # no READ was sent: none came first
    return sent


def _read_serially(sftp: paramiko.SFTPClient, handle: bytes, offset: int, end: int, sink: Sink) -> int:
    pipe = Pipeline(sftp)
    while offset < end:
        try:
            _, msg = pipe.wait(pipe.send(CMD_READ, handle, int64(offset), end - offset))
        except EndOfFile:
            raise ShortFileError(f"remote file ends at byte {offset}, expected {end}") from None
        data = msg.get_binary()
        sink(data)
        offset += len(data)
    return offset


def _abandon(pipe: Pipeline, closing: int | None = None) -> None:
    """Collect (and drop) replies to requests we no longer want, keeping the channel in sync, and that
    to the CLOSE ``closing``, sent behind them (if it was)."""
    nums = [num for num, _, _ in pipe.pending] + ([closing] if closing is not None else [])
    pipe.pending.clear()
    _collect_quietly(pipe, nums)


def create_private(sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPFile:
    """``sftp.open(path, "wb")``, but a file it creates gets PRIVATE_FILE_MODE from the start.

    paramiko's ``open`` sends no attributes with the OPEN request, so the server
    uses its default mode (0644 for sftp-server) and a chmod afterwards would
    leave a window; the SFTP OPEN request carries the mode for a new file. An
    existing file keeps its mode: ours were created private.
    """
    return create_private_together(sftp, [path])[0]


def create_private_together(sftp: paramiko.SFTPClient, paths: Sequence[str]) -> list[paramiko.SFTPFile]:
    """`create_private` for each of ``paths``, in one round trip."""
    files = open_together(sftp, paths, CREATE_FLAGS, _private_attributes())
    return [file for file in files if file is not None]


def _send_create_private(pipe: Pipeline, path: str) -> int:
    """An OPEN that creates ``path`` private (or empties it), as `create_private` sends it; its request number."""
    return pipe.send_open(path, CREATE_FLAGS, _private_attributes())


def _private_attributes() -> paramiko.SFTPAttributes:
    """What an OPEN that creates a file sends for it to be created private."""
    attrs = paramiko.SFTPAttributes()
    attrs.st_mode = PRIVATE_FILE_MODE
    return attrs


def open_together(sftp: paramiko.SFTPClient, paths: Sequence[str], flags: int = SFTP_FLAG_READ,
                  attrs: paramiko.SFTPAttributes | None = None, optional: Sequence[str] = ()
                  ) -> list[paramiko.SFTPFile | None]:
    """OPEN each of ``paths`` (with ``flags`` and, for a file it creates, ``attrs``) in one round trip.

    A missing path named in ``optional`` gives None. Any other error is raised as ``open`` raises it
    (the first, in the order of ``paths``), with whatever did open closed again.
    """
    pipe = Pipeline(sftp)
    with pipe.batch():
        sent = [(path, pipe.send_open(path, flags, attrs)) for path in paths]
    return _take_opened(pipe, sent, "rb" if flags == SFTP_FLAG_READ else "wb", optional)


def _take_opened(pipe: Pipeline, sent: Sequence[tuple[str, int]], mode: str, optional: Sequence[str] = ()
                 ) -> list[paramiko.SFTPFile | None]:
    """The files the OPENs `sent` ((path, request number), in order) opened; as `open_together` reports them."""
    found: list[paramiko.SFTPFile | OSError | None] = []
    for path, num in sent:
        try:
            found.append(pipe.opened(num, mode))
        except FileNotFoundError as err:
            found.append(None if path in optional else err)
        except OSError as err:
            found.append(err)
    errors = [item for item in found if isinstance(item, OSError)]
    if errors:
        for item in found:
            if isinstance(item, paramiko.SFTPFile):
                item.close()
        raise errors[0]
    return [item for item in found if not isinstance(item, OSError)]


def sync_failed(err: OSError) -> None:
    """What a failed fsync@openssh.com means: nothing where the server lacks the extension (tolerated, as
    OpenSSH's sftp client does); SyncRefusedError where it refuses it; otherwise ``err`` itself."""
    if extension_unsupported(err):
        return
    if isinstance(err, PermissionError):
        raise SyncRefusedError(f"the server refused fsync@openssh.com ({err.strerror or err})") from None
    raise err


def extension_unsupported(err: OSError) -> bool:
    """Whether an SFTP error is the server's "operation unsupported" status (an extension it lacks)."""
    return "unsupported" in str(err).lower()


class SpareFiles:
    """Temporary files created and opened ahead in one directory, for the next upload there.

    An upload opens the next one's files with its own fsync and CLOSE requests
    (`send_open`: no round trip of their own), so that the next upload to that
    directory through the same session (in a warm worker, gpbackup's next table
    file of the segment) starts with its WRITEs: two round trips for a short
    file, not three. Private and empty until an upload takes them
    (ResumableUpload's `spare`), writes through their handles and renames them
    into place. Those never taken are closed and removed (`release`): in
    passing by the next upload elsewhere, or when their session closes. A
    session that dies first leaves them empty under temporary names, which the
    cleanup of their backup removes with any upload's leftovers.
    """

    def __init__(self, directory: str, files: Sequence[tuple[str, paramiko.SFTPFile]]) -> None:
        self.directory = directory
        self.files = list(files)  # (temporary name, its open handle)

    @classmethod
    def send_open(cls, pipe: Pipeline, directory: str, count: int, replacing: SpareFiles | None = None
                  ) -> Callable[[bool], SpareFiles | None]:
        """Send, through ``pipe`` (in its caller's batch), the release of those ``replacing`` and the OPENs of
        ``count`` new ones in ``directory``; what takes the replies, to call once those to requests sent before
        are taken: with True, the new ones, or None where they could not be opened (the next upload then opens
        its own: no failure of this one's, whose own requests show a connection lost); with False (the upload
        failed), None, those it opened released again. Never raises."""
        names = [paths.spare_temp_name(directory) for _ in range(count)]
        released = replacing._send_release(pipe) if replacing is not None else []
        sent = [(name, _send_create_private(pipe, name)) for name in names]

        def take(keep: bool) -> SpareFiles | None:
            try:
                _collect_quietly(pipe, released)
                files = _take_opened(pipe, sent, "wb")
            except Exception as err:  # noqa: BLE001 - spare files are an optimisation, never a failure
                log.debug("opened no spare files in %s: %s", directory, err)
                return None
            spare = cls(directory, [(name, file) for name, file in zip(names, files) if file is not None])
            if keep:
                return spare
            spare.release(pipe.sftp)
            return None

        return take

    def on(self, sftp: paramiko.SFTPClient) -> bool:
        """Whether they are open through ``sftp`` (handles of another session mean nothing on it)."""
        return all(file.sftp is sftp for _, file in self.files)

    def fit(self, sftp: paramiko.SFTPClient, directory: str, count: int) -> bool:
        """Whether an upload of ``count`` files to ``directory`` through ``sftp`` can take them."""
        return self.directory == directory and len(self.files) == count and self.on(sftp)

    def release(self, sftp: paramiko.SFTPClient) -> None:
        """Close and remove them, in one round trip (waited for: a session closed right after could end its
        sftp-server before it got to them); never raises (the session may be what broke)."""
        try:
            pipe = Pipeline(sftp)
            with pipe.batch():
                sent = self._send_release(pipe)
            _collect_quietly(pipe, sent)
        except Exception as err:  # noqa: BLE001 - releasing on a broken session must not fail anything
            log.debug("could not remove spare files in %s: %s", self.directory, err)

    def _send_release(self, pipe: Pipeline) -> list[int]:
        """Send their CLOSEs, if they are open through ``pipe`` (another session's handles may name this one's
        files), and their REMOVEs; they count as released from here."""
        ours = self.on(pipe.sftp)
        files, self.files = self.files, []
        closes = [pipe.send_close(file) for _, file in files] if ours else []
        return closes + [pipe.send_remove(name) for name, _ in files]


def _collect_quietly(pipe: Pipeline, sent: Sequence[int]) -> None:
    """Take the replies to ``sent`` (requests whose failure changes nothing, such as removing a file that is
    gone already) off the channel, errors and all."""
    for num in sent:
        try:
            pipe.wait(num)
        except (EndOfFile, OSError) as err:
            log.debug("ignored the failure of a request made in passing: %s", err)


@dataclass(frozen=True)
class LateCompanion:
    """A companion stored only with a stream longer than ``after`` bytes (its block digests): its file is
    opened once the stream gets that far, behind the writes (no round trip of its own), and ``data`` gives
    its contents once the stream has ended. Every attempt writes it through the same temporary name."""

    final_path: str
    after: int
    data: Callable[[], bytes]
    temp_path: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "temp_path", paths.temp_name_for(self.final_path))  # frozen: set once, here


class ResumableUpload:
    """Stream a source into ``final_path`` atomically, resuming after a lost connection.

    Bytes the server has not yet acknowledged stay in a bounded buffer; after a
    reconnect, ``attempt`` truncates the temporary file to the acknowledged
    length and resends from the buffer, so a source that cannot be re-read
    (stdin) still arrives whole. Memory stays within ``buffer_limit`` plus one
    read (two after a first read short of a chunk, which looks for the end),
    whatever the stream size.

    ``companions``: small files stored with the stream (its checksum), whose
    contents ``companion_data`` gives once the source has ended. They are opened
    with the stream's temporary file, written behind its last bytes and renamed
    into place just before it: three round trips for a short stream, where
    storing them one by one took six; a stream that comes whole in one short
    read goes out with their last requests (``_send``). ``late``: one more,
    stored only with a long stream, and renamed into place first.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        final_path: str,
        buffer_limit: int,
        on_chunk: Callable[[bytes], object] | None = None,
        companions: Sequence[str] = (),
        companion_data: Callable[[], list[bytes]] | None = None,
        spare: SpareFiles | None = None,
        also: Callable[[Pipeline], Callable[[bool], object]] | None = None,
        sync: bool = True,
        late: LateCompanion | None = None,
    ) -> None:
        self.read = read
        self.final_path = final_path
        self.temp_path = paths.temp_name_for(final_path)
        self.buffer_limit = buffer_limit
        self.on_chunk = on_chunk
        # (final name, temporary name) of each companion; one temporary name serves every attempt
        self.companions = [(path, paths.temp_name_for(path)) for path in companions]
        self.companion_data = companion_data
        # Files opened ahead for this upload (the stream's, then each companion's): the first attempt writes
        # through them, if its session is theirs, and their names serve every attempt.
        self.spare = spare
        self.also = also  # requests sent with the stream's fsync and CLOSE (PipelinedWriter.sync_and_close)
        self.sync = sync  # whether the server flushes the files to disk before they are renamed into place
        self.late = late
        self._late_open: int | None = None  # this attempt's OPEN of the late companion's file, not yet taken
        self._late_bytes: bytes | None = None  # the late companion's contents, once stored
        self.confirmed = 0  # bytes acknowledged by the server
        self._buffer: deque[bytes] = deque()  # unacknowledged bytes, starting at offset self._buffer_start
        self._buffer_start = 0
        self._buffered = 0
        self._started = False
        self._source_done = False
        self._companion_bytes: list[bytes] | None = None

    def attempt(self, sftp: paramiko.SFTPClient) -> int:
        """One try: (re)open the temporary files, resend what is unconfirmed, stream the rest, flush."""
        remote, companions = self._open(sftp)
        with remote, contextlib.ExitStack() as opened:
            for file in companions:
                opened.enter_context(file)  # closed if the attempt fails; closed by sync_and_close if not
            writer = PipelinedWriter(sftp, remote.handle, offset=self.confirmed, sync=self.sync)
            self._late_open = None
            try:
                tail = self._send(writer)
                self._open_late_if_due(writer, writer.sent + len(tail))  # also a retry with nothing to resend
                if self._companion_bytes is None and self.companion_data is not None:
                    self._companion_bytes = self.companion_data()
                stored = list(zip(companions, self._companion_bytes or []))
                if self._late_open is not None and self.late is not None:
                    late_file = opened.enter_context(writer.created(self._late_open))
                    if self._late_bytes is None:
                        self._late_bytes = self.late.data()
                    stored.append((late_file, self._late_bytes))
                writer.sync_and_close(remote, stored, self.also, tail)
            finally:
                # What the server acknowledged counts also when the connection broke: the next attempt
                # resends only the rest, and a link that keeps resetting still gets further each time.
                self._trim(writer.confirmed)
        if self._buffered:
            # Every byte taken from the source is kept until the server acknowledges it, so this
            # means a bug here: fail the call rather than commit a file with bytes missing.
            raise ShortFileError(
                f"the server acknowledged {self.confirmed} bytes of {self.temp_path}, "
                f"but the source gave {self._buffer_start + self._buffered}"
            )
        return self.confirmed

    def _send(self, writer: PipelinedWriter) -> bytes:
        """Resend what the server has not acknowledged, then the rest of the source. Returns the stream's
        last bytes where they are still to be written: a stream that came whole in one short read, sent with
        the fsync and CLOSE (PipelinedWriter.sync_and_close's ``tail``)."""
        for piece in unacknowledged(self._buffer, self._buffer_start, self.confirmed):
            self._open_late_if_due(writer, writer.sent + len(piece))
            writer.write(piece)
        long_writes = False
        while not self._source_done:
            if self._buffered >= self.buffer_limit:
                writer.drain()
                self._trim(writer.confirmed)
            first = self._buffer_start + self._buffered == 0  # nothing taken from the source yet
            chunk = self._take_from_source()
            if not chunk:
                break
            chunks = [chunk]
            if first and len(chunk) < LOCAL_CHUNK:
                # Short of a full chunk: from a BufferedReader (stdin, a local file), the whole stream (a table's
                # file in a per-table backup), whose end the next read returns at once; it then goes out with
                # the fsync and CLOSE. (A source whose reads come short before its end sends one read later.)
                following = self._take_from_source()
                if not following:
                    return chunk
                chunks.append(following)
            if not long_writes and len(chunks[-1]) == LOCAL_CHUNK:
                # A full chunk: a long stream, worth a round trip to the server's limits
                # (a small file is not). Replies to writes in flight go to their _Replies.
                writer.use_long_writes()
                long_writes = True
            for piece in chunks:
                self._open_late_if_due(writer, writer.sent + len(piece))
                writer.write(piece)
            self._trim(writer.confirmed)
        return b""

    def _open_late_if_due(self, writer: PipelinedWriter, end: int) -> None:
        """Open the late companion's file, behind the writes, once the stream is to reach past its ``after``
        (``end``: where the stream is about to get to), before the bytes that take it there: its reply comes
        back while they go out."""
        if self.late is not None and self._late_open is None and end > self.late.after:
            self._late_open = writer.send_create_private(self.late.temp_path)

    def _take_from_source(self) -> bytes:
        """The source's next chunk (b"" at its end), kept for a resend before any request can fail:
        a chunk read and then lost with the connection could never be read again."""
        chunk = self.read(LOCAL_CHUNK)
        if not chunk:
            self._source_done = True
            return chunk
        if self.on_chunk is not None:
            self.on_chunk(chunk)
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        return chunk

    def _open(self, sftp: paramiko.SFTPClient) -> tuple[paramiko.SFTPFile, list[paramiko.SFTPFile]]:
        """The stream's temporary file, and the companions' (created afresh on every attempt)."""
        if not self._started:
            self._started = True
            spare, self.spare = self.spare, None
            if spare is not None and spare.fit(sftp, posixpath.dirname(self.final_path), 1 + len(self.companions)):
                (self.temp_path, first), *companions = spare.files
                self.companions = [(final, temp) for (final, _), (temp, _) in zip(self.companions, companions)]
                return first, [file for _, file in companions]
            temps = [temp for _, temp in self.companions]
            first, *opened = create_private_together(sftp, [self.temp_path, *temps])
            return first, opened
        temps = [temp for _, temp in self.companions]
        try:
            durable = sftp.stat(self.temp_path).st_size or 0
        except FileNotFoundError:
            if self.confirmed == 0:
                # The connection broke before the server created the file: start afresh.
                first, *companions = create_private_together(sftp, [self.temp_path, *temps])
                return first, companions
            raise ShortFileError(
                f"{self.temp_path} vanished after reconnecting, but the server had acknowledged "
                f"{self.confirmed} bytes of it; the stream cannot be resumed"
            ) from None
        if durable < self.confirmed:
            raise ShortFileError(
                f"{self.temp_path} holds {durable} bytes after reconnecting, "
                f"but the server had acknowledged {self.confirmed}; the stream cannot be resumed"
            )
        remote = sftp.open(self.temp_path, "r+b")
        try:
            remote.truncate(self.confirmed)
            companions = create_private_together(sftp, temps)
        except BaseException:
            remote.close()
            raise
        log.info("resuming upload of %s at byte %d", self.final_path, self.confirmed)
        return remote, companions

    def _trim(self, confirmed: int) -> None:
        """Forget buffered chunks the server has acknowledged in full."""
        self.confirmed = confirmed
        for _ in range(acknowledged_chunks(self._buffer, self._buffer_start, confirmed)):
            chunk = self._buffer.popleft()
            self._buffer_start += len(chunk)
            self._buffered -= len(chunk)

    def finish(self, sftp: paramiko.SFTPClient) -> None:
        """Rename the late companion (if it was stored), the companions, then the stream into place
        (rename_together): one round trip for all; a rename whose reply was lost (temporary name gone, final
        name holding all of it) counts as done."""
        sizes = [len(data) for data in self._companion_bytes or []]
        moves = [(temp, final, size) for (final, temp), size in zip(self.companions, sizes)]
        if self.late is not None and self._late_bytes is not None:
            moves.insert(0, (self.late.temp_path, self.late.final_path, len(self._late_bytes)))
        rename_together(sftp, [*moves, (self.temp_path, self.final_path, self.confirmed)])

    def abandon(self, sftp: paramiko.SFTPClient) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:  # failed before its first attempt took them
            spare.release(sftp)
        late = [self.late.temp_path] if self.late is not None else []
        for temp in [self.temp_path, *(temp for _, temp in self.companions), *late]:
            remove_quietly(sftp, temp)


def unacknowledged(chunks: Iterable[bytes], start: int, confirmed: int) -> list[memoryview]:
    """What a resumed upload sends again: the kept ``chunks`` (the first at byte ``start`` of the stream)
    from the first byte after the ``confirmed`` prefix the server has acknowledged."""
    pieces: list[memoryview] = []
    skip = confirmed - start
    for chunk in chunks:
        if skip < len(chunk):
            pieces.append(memoryview(chunk)[max(skip, 0) :])
        skip -= len(chunk)
    return pieces


def acknowledged_chunks(chunks: Iterable[bytes], start: int, confirmed: int) -> int:
    """How many of the kept ``chunks`` (the first at byte ``start`` of the stream) lie wholly within the
    ``confirmed`` prefix, counted from the first: those an upload no longer needs to keep."""
    count = 0
    for chunk in chunks:
        start += len(chunk)
        if start > confirmed:
            break
        count += 1
    return count


def put_bytes(sftp: paramiko.SFTPClient, data: bytes, final_path: str, temp_path: str, sync: bool = True) -> None:
    """Store a small object atomically through ``temp_path`` (created private, or rewritten): write, fsync
    unless not ``sync``, rename.

    Repeating it with the same ``temp_path`` after a lost connection is safe: the
    temporary file is rewritten, so retries leave no leftovers behind.
    """
    with create_private(sftp, temp_path) as remote:
        PipelinedWriter(sftp, remote.handle, sync=sync).sync_and_close(remote, tail=data)
    rename_into_place(sftp, temp_path, final_path)


def rename_together(sftp: paramiko.SFTPClient, moves: Sequence[tuple[str, str, int]]) -> None:
    """Rename each (temporary name, final name, size) into place, in order and in one round trip.

    The server carries the renames out in order, but all of them, so a later one
    succeeds even where an earlier one failed: those are moved back to their
    temporary names before the first failure is raised, and a file given last
    (the one the others vouch for) is never left in place without them. A
    rename whose reply was lost before a retry (temporary name gone, the final
    name holding ``size`` bytes) counts as done. Where the server lacks
    posix-rename, each goes through rename_into_place in turn.
    """
    pipe = Pipeline(sftp)
    with pipe.batch():
        sent = [(source, target, size, pipe.send_posix_rename(source, target)) for source, target, size in moves]
    failure: OSError | None = None
    for source, target, size, num in sent:
        try:
            pipe.wait(num)
        except FileNotFoundError as err:
            if not _moved_already(sftp, source, target, size):
                failure = failure or err
                continue
        except OSError as err:
            if not extension_unsupported(err):
                failure = failure or err
                continue
            if failure is not None:
                continue  # not moved: nothing to undo
            # remove-then-rename cannot be repeated once done: a retry after a lost reply must see that
            if not _moved_already(sftp, source, target, size):
                rename_into_place(sftp, source, target)
        if failure is not None:
            # In place (now, or by an attempt whose reply was lost) after an earlier rename failed: undone.
            _undo_rename(sftp, source, target)
    if failure is not None:
        raise failure


def _undo_rename(sftp: paramiko.SFTPClient, source: str, target: str) -> None:
    """Move ``target`` back to ``source``; where the server refuses, remove it: the call fails either way,
    and a file must not stay in place without the files that vouch for it. A lost connection is raised
    (the retry that follows runs rename_together again, which undoes it then)."""
    try:
        sftp.posix_rename(target, source)
    except OSError as err:
        if is_connection_lost(err):
            raise
        log.warning("could not move %s back to %s (%s); removing it", target, source, err)
        sftp.remove(target)


def _moved_already(sftp: paramiko.SFTPClient, source: str, target: str, size: int) -> bool:
    """Whether a rename that found no ``source`` was done before (its reply lost): ``target`` holds ``size`` bytes."""
    try:
        return not exists(sftp, source) and sftp.stat(target).st_size == size
    except FileNotFoundError:
        return False


def rename_into_place(sftp: paramiko.SFTPClient, source: str, target: str) -> None:
    """Atomic replace where the server offers posix-rename, remove-then-rename elsewhere."""
    try:
        sftp.posix_rename(source, target)
    except OSError as err:
        if not extension_unsupported(err):
            raise
        remove_quietly(sftp, target)
        sftp.rename(source, target)


def read_small(sftp: paramiko.SFTPClient, path: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a small remote file (a report, a checksum); None if it does not exist.

    Two round trips: OPEN, then FSTAT, one READ of ``limit`` and CLOSE together (read_head would ask in
    REQUEST_SIZE pieces, a thousand for a config.yaml's 64 MiB limit). The size tells whether the READ
    returned all there was; a server that returned less (SFTP allows it) is read again the plain way.
    """
    try:
        remote = sftp.open(path, "rb")
    except FileNotFoundError:
        return None
    with remote:
        return _read_opened(sftp, Pipeline(sftp), remote, path, limit)


def _read_plainly(sftp: paramiko.SFTPClient, path: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each span [start, end) (fewer where the file ends sooner), read the plain way: after a
    server returned less than asked (SFTP allows it)."""
    found = []
    with sftp.open(path, "rb") as handle:
        for start, end in spans:
            handle.seek(start)
            found.append(handle.read(end - start))
    return found


@dataclass(frozen=True)
class FileHead:
    """What `read_head` found: a file's size, its first bytes (all of them when ``whole``), its last bytes
    where asked for and the file is longer than the first bytes read (b"" otherwise), the first bytes
    of its companion file (None where that does not exist), and those of its index file where the file
    is longer than ``index_above`` (None where it is not, or the index does not exist)."""

    size: int
    data: bytes
    companion: bytes | None
    last: bytes = b""
    index: bytes | None = None
    # The file's handle, still open, where read_head was asked to keep it (``keep_open``) for a file longer
    # than its first bytes: the caller reads the rest through it (ResumableDownload) or closes it.
    rest: paramiko.SFTPFile | None = None

    @property
    def whole(self) -> bool:
        return len(self.data) == self.size


def read_head(sftp: paramiko.SFTPClient, path: str, limit: int, companion: str | None = None,  # noqa: PLR0913
              companion_limit: int = REQUEST_SIZE, tail: int = 0, index: str | None = None,
              index_above: int = 0, index_limit: int = REQUEST_SIZE, keep_open: bool = False) -> FileHead:
    """``path``'s size and first ``limit`` bytes (the whole file, if no longer), its last ``tail`` bytes if it is
    longer (even where they overlap the first), and, in the same round trips, the first ``companion_limit``
    bytes of ``companion`` (a file kept beside it, such as its checksum); of a file longer than
    ``index_above``, also the first ``index_limit`` bytes of ``index`` (its block digests), in one more.

    Two round trips, whatever the size: both OPENs and a STAT of ``path`` (with the server's
    limits@openssh.com, the first time a session reads); then, knowing the size, the READs of exactly
    what is wanted, an FSTAT that confirms the size through the handle, and both CLOSEs. Before, the
    READs were sent without the size (asking for all of ``limit`` would cost a small file that many
    READs answered with EOF), and a longer file took two more round trips for the rest. The index,
    whose OPEN goes with the second batch (a small file has none: no OPEN that fails), is read in a
    third. With ``keep_open``, a file longer than ``limit`` keeps its handle open for the rest (FileHead.rest):
    no OPEN of its own for it. The READs ask for what the server serves whole (read_request_size); a server
    that returned less than asked anyway, or a file that changed size between STAT and FSTAT, is read again
    the plain way. A missing ``path`` raises FileNotFoundError, as ``open`` does.
    """
    pipe = Pipeline(sftp)
    with pipe.batch():
        sent = [(name, pipe.send_open(name)) for name in [path, *([companion] if companion else [])]]
        stat = pipe.send_stat(path)
        limits = pipe.send_extended(LIMITS_EXTENSION) if limit > REQUEST_SIZE and sftp not in _limits else None
    try:
        opened = _take_opened(pipe, sent, "rb", optional=[companion] if companion else [])
    finally:
        try:  # its reply is read whatever the OPENs found; a missing file's error is theirs
            size = pipe.attributes(stat).st_size or 0
        except OSError:
            size = 0
        if limits is not None:
            _limits[sftp] = _limits_of(lambda: pipe.wait(limits)[1])
    target, other = opened[0], opened[1] if companion else None
    assert target is not None
    wanted = min(size, limit)
    spans = [(0, wanted)]
    if tail and size > limit:  # a longer file: its last bytes, even where they overlap the first
        spans.append((size - tail, size))
    step = read_request_size(sftp) if limit > REQUEST_SIZE else REQUEST_SIZE
    keep = keep_open and size > limit
    with pipe.batch():
        fstat = pipe.send_fstat(target)
        reads = [[pipe.send_read(target, at, min(step, end - at)) for at in range(start, end, step)]
                 for start, end in spans]
        close = None if keep else pipe.send_close(target)
        if other is not None:
            other_stat, other_read, other_close = (
                pipe.send_fstat(other), pipe.send_read(other, 0, companion_limit), pipe.send_close(other))
        index_open = pipe.send_open(index) if index is not None and size > index_above else None
    index_data = None
    try:
        confirmed = pipe.attributes(fstat).st_size or 0
        found = [b"".join([pipe.data(num) for num in nums]) for nums in reads]
        if close is not None:
            pipe.wait(close)
        companion_data = None
        if other is not None:
            other_size = pipe.attributes(other_stat).st_size or 0
            companion_data = pipe.data(other_read)
            pipe.wait(other_close)
            if len(companion_data) != min(other_size, companion_limit):
                companion_data = _read_plainly(sftp, str(companion), [(0, companion_limit)])[0]
        if index_open is not None:
            num, index_open = index_open, None  # its reply is taken once, here, even where that raises
            index_file = _take_opened(pipe, [(str(index), num)], "rb", optional=[str(index)])[0]
            if index_file is not None:
                index_data = _read_opened(sftp, pipe, index_file, str(index), index_limit)
        if confirmed != size or any(len(data) != end - start for data, (start, end) in zip(found, spans)):
            if keep:  # the plain way has its own handle
                keep = False
                target.close()
            if confirmed != size:  # replaced or grown between the two round trips: what the handle saw
                return _head_plainly(sftp, path, limit, tail, companion_data, index_data)
            found = _read_plainly(sftp, path, spans)
    except BaseException:
        # A warm session must not collect handles left open: the index's, if its OPEN's reply was not taken
        # yet, and the file's, if it was to stay open.
        if index_open is not None:
            _close_quietly(pipe, str(index), index_open)
        if keep:
            close_file_quietly(target)
        raise
    return FileHead(size, found[0], companion_data, found[1] if len(found) > 1 else b"", index_data,
                    target if keep else None)


def _close_quietly(pipe: Pipeline, path: str, num: int) -> None:
    """Close what the OPEN ``num`` of ``path`` opened, if it did (while already failing: never raises)."""
    try:
        file = _take_opened(pipe, [(path, num)], "rb", optional=[path])[0]
    except Exception as err:  # noqa: BLE001 - the connection may be the thing that broke
        log.debug("could not open %s to close it: %s", path, err)
        return
    if file is not None:
        close_file_quietly(file)


def close_file_quietly(file: paramiko.SFTPFile) -> None:
    """Close an open remote file while already failing: never raises (the connection may be what broke)."""
    try:
        file.close()
    except Exception as err:  # noqa: BLE001 - the connection may be the thing that broke
        log.debug("could not close a remote file: %s", err)


def _read_opened(sftp: paramiko.SFTPClient, pipe: Pipeline, file: paramiko.SFTPFile, path: str, limit: int) -> bytes:
    """Up to ``limit`` bytes of a file opened through ``pipe``, then closed: FSTAT, READ and CLOSE in one
    round trip; a server that returned less than there was is read again the plain way."""
    with pipe.batch():
        stat, read, close = pipe.send_fstat(file), pipe.send_read(file, 0, limit), pipe.send_close(file)
    size = pipe.attributes(stat).st_size or 0
    data = pipe.data(read)
    pipe.wait(close)
    return data if len(data) == min(size, limit) else _read_plainly(sftp, path, [(0, limit)])[0]


def _head_plainly(sftp: paramiko.SFTPClient, path: str, limit: int, tail: int, companion: bytes | None,
                  index: bytes | None) -> FileHead:
    """read_head's answer read the plain way, through one handle: for a file that changed meanwhile."""
    with sftp.open(path, "rb") as handle:
        size = handle.stat().st_size or 0
        data = handle.read(min(size, limit))
        last = b""
        if tail and size > limit:
            handle.seek(size - tail)
            last = handle.read(tail)
    return FileHead(size, data, companion, last, index)


def read_ends(sftp: paramiko.SFTPClient, path: str, head: int, tail: int) -> tuple[int, bytes, bytes]:
    """A remote file's size, its first ``head`` bytes and its last ``tail`` (b"" if it is shorter than both).

    Three round trips: OPEN; FSTAT and the head's READ together; the tail's READ and CLOSE together.
    """
    with sftp.open(path, "rb") as remote:
        pipe = Pipeline(sftp)
        stat, read = pipe.send_fstat(remote), pipe.send_read(remote, 0, head)
        size = pipe.attributes(stat).st_size or 0
        first = pipe.data(read)
        wanted = tail if size >= head + tail else 0
        tail_read = pipe.send_read(remote, size - tail, tail) if wanted else None
        close = pipe.send_close(remote)
        last = pipe.data(tail_read) if tail_read is not None else b""
        pipe.wait(close)
    if len(first) != min(head, size) or len(last) != wanted:
        first, last = _read_plainly(sftp, path, [(0, head), (size - wanted, size)])
    return size, first, last


# What each SFTP session's server said of its limits: asked once per session, not once per transfer (a warm
# session serves many calls). Weak keys: a closed session's answer goes with it.
_limits: weakref.WeakKeyDictionary[paramiko.SFTPClient, tuple[int, int] | None] = weakref.WeakKeyDictionary()


def server_limits(sftp: paramiko.SFTPClient) -> tuple[int, int] | None:
    """(max-read-length, max-write-length) from limits@openssh.com; None where the server does not say."""
    if sftp not in _limits:
        _limits[sftp] = _ask_limits(sftp)
    return _limits[sftp]


def _ask_limits(sftp: paramiko.SFTPClient) -> tuple[int, int] | None:
    return _limits_of(lambda: extended(sftp, LIMITS_EXTENSION)[1])


def _limits_of(reply: Callable[[], paramiko.Message]) -> tuple[int, int] | None:
    """(max-read-length, max-write-length) from the `reply` to limits@openssh.com; None from a server
    without the extension."""
    try:
        msg = reply()
    except OSError as err:
        if not extension_unsupported(err):  # a lost connection is no answer
            raise
        return None  # the server predates the extension
    msg.get_int64()  # max-packet-length
    return msg.get_int64(), msg.get_int64()


def read_request_size(sftp: paramiko.SFTPClient) -> int:
    """The largest read request this server serves in full: its limits@openssh.com
    max-read-length (capped), or REQUEST_SIZE where it does not say."""
    limits = server_limits(sftp)
    if limits is None or limits[0] < REQUEST_SIZE:
        return REQUEST_SIZE
    return min(limits[0], MAX_READ_REQUEST)


class ResumableDownload:
    """Send a remote file, or byte ranges of it, to ``sink``; after a reconnect, continue at
    the first byte not yet delivered, so no byte is repeated or skipped."""

    def __init__(self, path: str, sink: Sink, ranges: Iterable[tuple[int, int]] | None = None,
                 opened: paramiko.SFTPFile | None = None) -> None:
        self.path = path
        self.sink = sink
        # ``path`` opened already (read_head's handle, FileHead.rest): the first attempt reads through it
        # if its session is still the one in use, and closes it either way.
        self._opened = opened
        self.remaining: list[list[int]] | None = None if ranges is None else [[s, e] for s, e in ranges]
        self.delivered = 0
        # The CLOSE goes behind the last READ until the server returns less than a READ asks: then each
        # short read would cost a new handle, so the rest is read the plain way (read_ranges without it).
        self._close_early = True

    def _deliver(self, data: bytes) -> None:
        assert self.remaining is not None
        self.sink(data)
        self.delivered += len(data)
        first = self.remaining[0]
        first[0] += len(data)
        if first[0] >= first[1]:  # that range is whole: the next bytes are the next range's
            self.remaining.pop(0)

    def attempt(self, sftp: paramiko.SFTPClient) -> int:
        """Read what is left; the handle's CLOSE goes out behind the last READ (read_ranges). Where a
        server returned less than asked after that, what is left is read through a new handle."""
        while True:
            before = self.delivered
            with self._open(sftp) as remote:
                if self.remaining is None:
                    size = remote.stat().st_size or 0
                    self.remaining = [[0, size]] if size else []
                # Ranges that fit one default request need no round trip for the server's limits.
                longest = max((end - start for start, end in self.remaining), default=0)
                request_size = read_request_size(sftp) if longest > REQUEST_SIZE else REQUEST_SIZE
                depth = max(1, READ_AHEAD_BYTES // request_size)
                self.remaining = [[start, end] for start, end in self.remaining if start < end]  # empty: no reads
                try:
                    read_ranges(sftp, remote.handle, [(start, end) for start, end in self.remaining], self._deliver,
                                request_size, depth, close=remote if self._close_early else None)
                except ClosedEarly as short:
                    if self.delivered == before:  # a DATA reply of no bytes: never a way forward
                        raise ShortFileError(f"{self.path}: {short}, and nothing before it") from None
                    log.debug("reading the rest of %s through a new handle: %s", self.path, short)
                    self._close_early = False
                    continue
            return self.delivered

    def _open(self, sftp: paramiko.SFTPClient) -> paramiko.SFTPFile:
        """The handle handed over if it is of this session (a retry's new session cannot use it: it went
        with the old one), else ``path`` opened now."""
        opened, self._opened = self._opened, None
        if opened is not None and opened.sftp is sftp:
            return opened
        return sftp.open(self.path, "rb")

    def close(self) -> None:
        """Close the handle handed over if no attempt used it (while failing: never raises)."""
        opened, self._opened = self._opened, None
        if opened is not None:
            close_file_quietly(opened)


def makedirs(sftp: paramiko.SFTPClient, path: str, stop_at: str) -> list[str]:
    """mkdir -p ``path`` below the existing directory ``stop_at``, each new directory
    PRIVATE_DIR_MODE; safe when many hosts race. Returns the directories this call
    created, outermost first (those another process made meanwhile are not among them)."""
    missing: list[str] = []
    current = path
    while current != stop_at and not is_dir(sftp, current):
        missing.append(current)
        current = posixpath.dirname(current)
    created: list[str] = []
    for directory in reversed(missing):
        try:
            sftp.mkdir(directory, PRIVATE_DIR_MODE)
        except OSError:
            # Another segment may have created it between our stat and mkdir.
            if not is_dir(sftp, directory):
                raise
            continue
        created.append(directory)
    return created


def is_dir(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
    except FileNotFoundError:
        return False


def size_of(sftp: paramiko.SFTPClient, path: str) -> int:
    return sftp.stat(path).st_size or 0


def exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except FileNotFoundError:
        return False


def remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    """Best-effort removal (used while already failing): never masks the original error."""
    try:
        sftp.remove(path)
    except Exception as err:  # noqa: BLE001 - the connection may be the thing that broke
        log.debug("could not remove %s: %s", path, err)


def walk_files(sftp: paramiko.SFTPClient, top: str) -> list[tuple[str, int]]:
    """Every regular file under ``top`` as (path relative to top, size), sorted."""
    found: list[tuple[str, int]] = []
    stack = [""]
    while stack:
        relative = stack.pop()
        for entry in sftp.listdir_attr(posixpath.join(top, relative) if relative else top):
            child = posixpath.join(relative, entry.filename) if relative else entry.filename
            if stat.S_ISDIR(entry.st_mode or 0):
                stack.append(child)
            else:
                found.append((child, entry.st_size or 0))
    return sorted(found)


def rmtree(sftp: paramiko.SFTPClient, path: str) -> int:
    """Remove ``path`` and everything below it (symlinks are removed, not followed); return files removed."""
    try:
        if stat.S_ISLNK(sftp.lstat(path).st_mode or 0):
            # A link named for deletion is unlinked; what it points to may lie outside remote_dir.
            sftp.remove(path)
            return 1
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in sftp.listdir_attr(path):
        child = posixpath.join(path, entry.filename)
        if stat.S_ISDIR(entry.st_mode or 0):
            removed += rmtree(sftp, child)
        else:
            removed += remove_if_present(sftp, child)
    try:
        sftp.rmdir(path)
    except FileNotFoundError:
        pass  # removed by an earlier attempt whose reply was lost
    return removed


def remove_if_present(sftp: paramiko.SFTPClient, path: str) -> int:
    """Remove a file; 0 if it was already gone (e.g. an earlier attempt's reply was lost)."""
    try:
        sftp.remove(path)
        return 1
    except FileNotFoundError:
        return 0


def rmdir_if_empty(sftp: paramiko.SFTPClient, path: str) -> bool:
    """Remove an empty directory; leave a non-empty or missing one alone. True if removed."""
    try:
        if sftp.listdir(path):
            return False
        sftp.rmdir(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as err:
        # Another process may have put a file in it meanwhile: that is fine.
        if getattr(err, "errno", None) in (errno.ENOTEMPTY, errno.EEXIST, None):
            return False
        raise
