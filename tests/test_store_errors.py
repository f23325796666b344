"""Tables, no server: which SFTP error becomes which message (store.remote_errors), and where a resumed
transfer takes up again (transfer.ResumableUpload and ResumableDownload, over fakes of the SFTP client).

Which errors are retried at all is retry.is_connection_lost's table, in test_retry.py.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from types import SimpleNamespace

import paramiko
import pytest

from sftp_plugin import store, transfer
from sftp_plugin.config import PluginConfig
from sftp_plugin.errors import RemoteError, RemoteNotFound

# ---------------------------------------------------------------- store.remote_errors

REMOTE = store.Remote(PluginConfig(hostname="backup.example.com", remote_dir="/srv/gpbackup", username="gpbackup"))
PATH = "/srv/gpbackup/backups/20240102/20240102030405"
WHERE = f"backup.example.com:{PATH}"
FREE_SPACE = "check free space, quotas and permissions on the backup host"

# (what happened, the exception raised inside remote_errors("list backup", PATH), then the PluginError class it
# becomes with its message and hint, or None: raised on unchanged, for the retry policy or cli.py to judge).
# paramiko raises an SFTP status as SFTPClient._convert_status does: NO_SUCH_FILE as IOError(ENOENT, text),
# PERMISSION_DENIED as IOError(EACCES, text), every other status (FAILURE, OP_UNSUPPORTED...) as IOError(text).
ERROR_CASES: list[tuple[str, BaseException, type[RemoteError] | None, str, str]] = [
    ("SFTP no such file", OSError(errno.ENOENT, "No such file"),
     RemoteNotFound, f"list backup: {WHERE} does not exist", "check remote_dir and the backup timestamp"),
    ("a FileNotFoundError without an errno", FileNotFoundError("gone"),
     RemoteNotFound, f"list backup: {WHERE} does not exist", "check remote_dir and the backup timestamp"),
    ("SFTP permission denied", OSError(errno.EACCES, "Permission denied"),
     RemoteError, f"list backup: permission denied on {WHERE}", "check that gpbackup may write there"),
    ("EPERM, a PermissionError too", OSError(errno.EPERM, "Operation not permitted"),
     RemoteError, f"list backup: permission denied on {WHERE}", "check that gpbackup may write there"),
    ("SFTP failure (a full disk, a quota)", OSError("Failure"),
     RemoteError, f"list backup: {WHERE}: Failure", FREE_SPACE),
    ("another SFTP status without an errno", OSError("Operation unsupported"),
     RemoteError, f"list backup: {WHERE}: Operation unsupported", FREE_SPACE),
    ("the file ends early", transfer.ShortFileError("remote file ends at byte 5, expected 10"),
     RemoteError, f"list backup: {WHERE} is shorter than expected (remote file ends at byte 5, expected 10)",
     "the stored file may be truncated; check the backup host's disk"),
    ("the server refuses fsync (sftp-server -P)",
     transfer.SyncRefusedError("the server refused fsync@openssh.com (Permission denied)"),
     RemoteError, f"list backup: {WHERE}: the server refused fsync@openssh.com (Permission denied); "
     "a file cannot be made durable there",
     "let the backup host's sftp-server flush files: take fsync out of its -P option (sshd_config's Subsystem "
     "or ForceCommand line), or set fsync: no if stored files need not survive a crash of the backup host"),
    # raised on: an errno is a local or socket error, not the server's answer
    ("an errno of the socket", ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), None, "", ""),
    ("an errno of the local disk", OSError(errno.ENOSPC, "No space left on device"), None, "", ""),
    # raised on: a lost connection, which the retry policy retries
    ("paramiko's closed socket", OSError("Socket is closed"), None, "", ""),
    ("a read timed out", socket.timeout("timed out"), None, "", ""),
    ("an OSError saying nothing", OSError(), None, "", ""),
    # raised on: not an OSError at all
    ("the SSH transport dropped", paramiko.SSHException("SSH session not active"), None, "", ""),
    ("end of file", EOFError(), None, "", ""),
    ("a bug", ValueError("unexpected"), None, "", ""),
]


@pytest.mark.parametrize(("error", "becomes", "message", "hint"), [case[1:] for case in ERROR_CASES],
                         ids=[case[0] for case in ERROR_CASES])
def test_remote_errors_names_action_host_and_path_and_what_to_check(
    error: BaseException, becomes: type[RemoteError] | None, message: str, hint: str
) -> None:
    with pytest.raises(BaseException) as caught:
        with store.remote_errors(REMOTE, "list backup", PATH):
            raise error
    if becomes is None:
        assert caught.value is error
        return
    assert type(caught.value) is becomes
    assert (caught.value.message, caught.value.hint) == (message, hint)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # paramiko's error stays out


def test_remote_errors_lets_a_step_that_succeeds_pass() -> None:
    with store.remote_errors(REMOTE, "list backup", PATH):
        pass


# ---------------------------------------------------------------- an upload's kept bytes

STREAM = bytes(range(256)) * 4


def kept(lengths: list[int], start: int) -> list[bytes]:
    """The chunks an upload keeps: consecutive pieces of STREAM of these lengths, the first at ``start``."""
    chunks, at = [], start
    for length in lengths:
        chunks.append(STREAM[at : at + length])
        at += length
    return chunks


# (what, lengths of the kept chunks, the stream offset of the first, bytes the server acknowledged,
#  the (offset, length) pieces a retry sends again, how many leading chunks may be forgotten)
KEPT_CASES: list[tuple[str, list[int], int, int, list[tuple[int, int]], int]] = [
    ("nothing acknowledged", [4, 4, 4], 0, 0, [(0, 4), (4, 4), (8, 4)], 0),
    ("inside the first chunk", [4, 4, 4], 0, 2, [(2, 2), (4, 4), (8, 4)], 0),
    ("at a chunk's end", [4, 4, 4], 0, 4, [(4, 4), (8, 4)], 1),
    ("inside the last chunk", [4, 4, 4], 0, 10, [(10, 2)], 2),
    ("everything", [4, 4, 4], 0, 12, [], 3),
    ("after earlier trimming", [4, 4], 8, 9, [(9, 3), (12, 4)], 0),
    ("after earlier trimming, at a chunk's end", [4, 4], 8, 12, [(12, 4)], 1),
    ("chunks of different sizes", [1, 7, 3], 5, 13, [(13, 3)], 2),
    ("nothing kept", [], 12, 12, [], 0),
]
KEPT_IDS = [case[0] for case in KEPT_CASES]


@pytest.mark.parametrize(("lengths", "start", "confirmed", "resent", "forgotten"), [case[1:] for case in KEPT_CASES],
                         ids=KEPT_IDS)
def test_a_resumed_upload_sends_again_exactly_the_bytes_after_the_acknowledged_prefix(
    lengths: list[int], start: int, confirmed: int, resent: list[tuple[int, int]], forgotten: int
) -> None:
    pieces = transfer.unacknowledged(kept(lengths, start), start, confirmed)
    assert [bytes(piece) for piece in pieces] == [STREAM[at : at + length] for at, length in resent]


@pytest.mark.parametrize(("lengths", "start", "confirmed", "resent", "forgotten"), [case[1:] for case in KEPT_CASES],
                         ids=KEPT_IDS)
def test_an_upload_forgets_only_the_chunks_acknowledged_whole_and_never_a_byte_a_retry_needs(
    lengths: list[int], start: int, confirmed: int, resent: list[tuple[int, int]], forgotten: int
) -> None:
    chunks = kept(lengths, start)
    assert transfer.acknowledged_chunks(chunks, start, confirmed) == forgotten
    after = start + sum(lengths[:forgotten])
    assert b"".join(transfer.unacknowledged(chunks[forgotten:], after, confirmed)) == b"".join(
        transfer.unacknowledged(chunks, start, confirmed)
    )


# ---------------------------------------------------------------- an upload resumed (fake SFTP)


class FakeHost:
    """The backup host as ResumableUpload sees it through the fakes below: files by path; a write is
    acknowledged once ``lag`` more bytes have been sent after it (or at a drain)."""

    def __init__(self, lag: int) -> None:
        self.files: dict[str, bytearray] = {}
        self.lag = lag
        self.created = 0
        self.truncated_at: list[int] = []

    def stat(self, path: str) -> SimpleNamespace:
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        return SimpleNamespace(st_size=len(self.files[path]))

    def open(self, path: str, mode: str) -> FakeFile:
        assert mode == "r+b"
        return FakeFile(self, path)


class FakeFile:
    def __init__(self, host: FakeHost, path: str) -> None:
        self.host, self.path, self.handle = host, path, path.encode()

    def __enter__(self) -> FakeFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def truncate(self, size: int) -> None:
        self.host.truncated_at.append(size)
        del self.host.files[self.path][size:]


class FakeWriter:
    """Stands for PipelinedWriter: stores each write at once, acknowledges it `lag` bytes later."""

    def __init__(self, host: FakeHost, handle: bytes, offset: int = 0, sync: bool = True) -> None:
        self.host, self.file = host, host.files[handle.decode()]
        self.sent = self.confirmed = offset

    def write(self, data: bytes | memoryview) -> None:
        self.file[self.sent : self.sent + len(data)] = data
        self.sent += len(data)
        self.confirmed = max(self.confirmed, self.sent - self.host.lag)

    def drain(self) -> None:
        self.confirmed = self.sent

    def sync_and_close(self, _remote: FakeFile, companions: object = (), also: object = None,
                       tail: bytes | memoryview = b"") -> None:
        assert not companions and also is None
        self.write(tail)
        self.drain()

    def use_long_writes(self) -> None:
        pass


def create(host: FakeHost, paths: list[str]) -> list[FakeFile]:
    """Stands for transfer.create_private_together."""
    for path in paths:
        host.created += 1
        host.files[path] = bytearray()
    return [FakeFile(host, path) for path in paths]


def source(chunks: list[bytes], breaks_at: int) -> Callable[[int], bytes]:
    """A stream read chunk by chunk whose connection breaks once, at read number ``breaks_at`` (the read
    fails, its chunk is read on the next attempt)."""
    reads = iter([*chunks[:breaks_at], None, *chunks[breaks_at:], b""])

    def read(_size: int) -> bytes:
        chunk = next(reads)
        if chunk is None:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return chunk

    return read


CHUNKS = [STREAM[at : at + 10] for at in range(0, 50, 10)]
# (what, the host's acknowledgement lag, the upload's buffer_limit, the read that breaks the connection,
#  what the temporary file holds after the reset (None: all that was written; -1: it is gone),
#  then the offset the retry truncates to and resends from (-1: starts afresh), or the error it fails with)
RESUME_CASES: list[tuple[str, int, int, int, int | None, int, str]] = [
    ("acknowledged part of what was sent", 15, 1000, 3, None, 15, ""),
    ("acknowledged all that was sent", 0, 1000, 3, None, 30, ""),
    ("acknowledged nothing yet", 100, 1000, 3, None, 0, ""),
    ("a full buffer waited for the acknowledgements", 15, 20, 3, None, 20, ""),
    ("holds just the acknowledged bytes", 15, 1000, 3, 15, 15, ""),
    ("gone before any byte was acknowledged", 100, 1000, 3, -1, -1, ""),
    ("holds less than was acknowledged", 15, 1000, 3, 10, 0,
     "holds 10 bytes after reconnecting, but the server had acknowledged 15; the stream cannot be resumed"),
    ("gone after bytes were acknowledged", 15, 1000, 3, -1, 0,
     "vanished after reconnecting, but the server had acknowledged 15 bytes of it; the stream cannot be resumed"),
]


@pytest.mark.parametrize(("lag", "buffer_limit", "breaks_at", "left", "resumes_at", "error"),
                         [case[1:] for case in RESUME_CASES], ids=[case[0] for case in RESUME_CASES])
def test_a_resumed_upload_takes_up_at_the_acknowledged_byte_or_says_why_it_cannot(
    monkeypatch: pytest.MonkeyPatch, lag: int, buffer_limit: int, breaks_at: int, left: int | None,
    resumes_at: int, error: str
) -> None:
    monkeypatch.setattr(transfer, "PipelinedWriter", FakeWriter)
    monkeypatch.setattr(transfer, "create_private_together", create)
    host = FakeHost(lag)
    upload = transfer.ResumableUpload(source(CHUNKS, breaks_at), "/r/data", buffer_limit)
    temp = upload.temp_path
    with pytest.raises(ConnectionResetError):
        upload.attempt(host)  # type: ignore[arg-type]
    if left == -1:
        del host.files[temp]
    elif left is not None:
        del host.files[temp][left:]
    if error:
        with pytest.raises(transfer.ShortFileError, match=error):
            upload.attempt(host)  # type: ignore[arg-type]
        return
    assert upload.attempt(host) == 50  # type: ignore[arg-type]
    assert host.files[temp] == STREAM[:50]
    if resumes_at == -1:
        assert (host.created, host.truncated_at) == (2, [])
    else:
        assert (host.created, host.truncated_at) == (1, [resumes_at])


# ---------------------------------------------------------------- a download resumed (fake SFTP)

FILE = bytes(range(256)) * 4  # 1 KiB: every range fits one default request, so no limits@openssh.com asked


class Reads:
    """Stands for transfer.read_ranges: FILE's bytes in pieces of 10, the connection breaking once, before
    the piece that would pass ``breaks_after`` bytes delivered in the first attempt; records what each
    attempt asked for."""

    def __init__(self, breaks_after: int) -> None:
        self.breaks_after = breaks_after
        self.delivered = 0
        self.asked: list[list[tuple[int, int]]] = [[]]

    def read_ranges(self, _sftp: object, _handle: bytes, ranges: list[tuple[int, int]], sink: transfer.Sink,  # noqa: PLR0913
                    _request_size: int, _depth: int, close: object = None) -> int:
        self.asked[-1].extend(ranges)
        for start, end in ranges:
            for at in range(start, end, 10):
                piece = FILE[at : min(at + 10, end)]
                if len(self.asked) == 1 and self.delivered + len(piece) > self.breaks_after:
                    raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
                sink(piece)
                self.delivered += len(piece)
        return sum(end - start for start, end in ranges)


class FileForReading:
    """What ResumableDownload uses of an open remote file: its handle and its size."""

    handle = b"handle"

    def __enter__(self) -> FileForReading:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=len(FILE))


class SftpForReading:
    def open(self, path: str, mode: str) -> FileForReading:
        assert mode == "rb"
        return FileForReading()


# (what, the ranges asked for (None: the whole file), bytes delivered before the connection breaks,
#  the ranges the retry reads)
DOWNLOAD_CASES: list[tuple[str, list[tuple[int, int]] | None, int, list[tuple[int, int]]]] = [
    ("whole file, nothing delivered", None, 0, [(0, 1024)]),
    ("whole file, part delivered", None, 300, [(300, 1024)]),
    ("inside the first range", [(0, 100), (500, 600)], 50, [(50, 100), (500, 600)]),
    ("at the end of the first range", [(0, 100), (500, 600)], 100, [(500, 600)]),
    ("inside the second range", [(0, 100), (500, 600)], 150, [(550, 600)]),
    ("ranges in the order asked, not the file's", [(500, 600), (0, 100)], 120, [(20, 100)]),
    ("an empty range is never read", [(0, 0), (10, 40), (40, 40)], 20, [(30, 40)]),
]


@pytest.mark.parametrize(("ranges", "breaks_after", "retry_reads"), [case[1:] for case in DOWNLOAD_CASES],
                         ids=[case[0] for case in DOWNLOAD_CASES])
def test_a_resumed_download_continues_at_the_first_byte_not_delivered(
    monkeypatch: pytest.MonkeyPatch, ranges: list[tuple[int, int]] | None, breaks_after: int,
    retry_reads: list[tuple[int, int]]
) -> None:
    reads = Reads(breaks_after)
    monkeypatch.setattr(transfer, "read_ranges", reads.read_ranges)
    received: list[bytes] = []
    download = transfer.ResumableDownload("/r/data", received.append, ranges)
    sftp = SftpForReading()
    with pytest.raises(ConnectionResetError):
        download.attempt(sftp)  # type: ignore[arg-type]
    assert download.delivered == breaks_after
    reads.asked.append([])
    wanted = [(0, len(FILE))] if ranges is None else ranges
    assert download.attempt(sftp) == sum(end - start for start, end in wanted)  # type: ignore[arg-type]
    assert reads.asked[1] == retry_reads
    assert b"".join(received) == b"".join(FILE[start:end] for start, end in wanted)  # none repeated, none skipped
