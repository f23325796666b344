"""A backup host seen as backups and files: the session of one call, and what the commands and the
admin commands do with it.

`Remote` holds one call's SSH session under the retry policy; `remote_errors`
turns SFTP errors into messages naming host, path and what to check. Storing
a stream (`upload`: temporary name, checksum files, the caller's last check,
rename) and reading one back (`read_stored`: every block verified before it
reaches the sink) live here, so that gpbackup's commands (commands.py), the
backup catalog (catalog.py) and the admin commands share one way of doing
each. Knows gpbackup's file layout only through paths.py.

With ``compression`` or an ``encryption_key_file`` configured, a file is
stored as a container (container.py: chunks compressed and sealed, an
index); every read recognises one by its magic bytes, whatever the config
says now, so plain files stored before keep restoring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from sftp_plugin import PLUGIN_NAME, allocator, blocks, caller, container, integrity, keys, paths, transfer
from sftp_plugin.config import PluginConfig
from sftp_plugin.connection import Session, connect
from sftp_plugin.errors import IntegrityError, NotChecked, RemoteError, RemoteNotFound
from sftp_plugin.offsets import check_within
from sftp_plugin.retry import call_with_retries, is_connection_lost

if TYPE_CHECKING:
    import paramiko

    from sftp_plugin.fastpath.sftp import Pipeline

log = logging.getLogger(__name__)

PROBE_PREFIX = ".gpbackup_sftp_plugin_probe"
# A stored file up to this size is read whole with its checksum file (transfer.read_head: two round trips): a
# per-table restore, where round trips are most of the time (a file of 128 KiB to 1 MiB took ten when only
# 128 KiB were read so). One block (blocks.BLOCK_SIZE): such a file is checked against its checksum file
# alone. Of a longer file these first bytes, and its last, come in the same two round trips and are
# delivered from memory, not read again; its block digests in a third. Not more: read_head is one request,
# not resumed, and a link that resets every few MiB must still let a restore through (the rest of a longer
# file is read by ResumableDownload, which continues where a reset cut it; 8 MiB whole failed there).
WHOLE_READ_LIMIT = blocks.BLOCK_SIZE
# More than a checksum file (sha256sum's one line) can hold: a longer one is not one of ours.
SIDECAR_LIMIT = 4096
# Session.held's name for the files a warm worker opens ahead for its next upload (transfer.SpareFiles).
SPARE_FILES = "spare files"
# The admin command that re-reads a whole backup (named in messages about a damaged file).
PLUGIN_VERIFY = f"{PLUGIN_NAME} verify <config> <timestamp>"
T = TypeVar("T")
Sink = Callable[[memoryview], object]  # where a restore's bytes go: stdout, a local file, a hash


class Remote:
    """The session of one plugin call: opened on first use, dropped and reopened by `retrying`.

    A call served by a warm fork-server worker starts with the session an
    earlier call kept (`warm`). The backup host may have dropped it meanwhile
    (restarted, a NAT gateway's idle timeout): the first step that finds it
    lost reconnects at once, without spending one of the call's attempts.
    """

    def __init__(self, cfg: PluginConfig, warm: Session | None = None, keeps_session: bool = False,
                 hold: Callable[[], Callable[[], None]] | None = None) -> None:
        self.cfg = cfg
        self._session: Session | None = warm
        self._unproven = warm is not None  # a kept session no step has used yet in this call
        # The session may serve a later call (a fork-server worker keeps it): worth opening files ahead for.
        self.keeps_session = keeps_session
        # What the call takes before its first login and lets go when it closes (cli.py: a connection slot
        # under max_connections), kept across reconnects: `hold` returns how to let go.
        self._hold = hold
        self._let_go: Callable[[], None] | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            if self._hold is not None and self._let_go is None:
                self._let_go = self._hold()
            self._session = connect(self.cfg)
        return self._session

    @property
    def sftp(self) -> paramiko.SFTPClient:
        return self.session.sftp

    def sftp_if_open(self) -> paramiko.SFTPClient | None:
        """The SFTP client of a session already open, or None: never connects (for cleanup on failure,
        where a new connection could be one more failed login)."""
        return self._session.sftp if self._session is not None else None

    def retrying(self, what: str, step: Callable[[], T], progress: Callable[[], int] | None = None) -> T:
        """Run one remote step under the retry policy; a lost connection is dropped and reopened.

        ``step`` must be safe to run again: idempotent, or resuming from its own ``progress``
        (retry.call_with_retries: an attempt that got further counts as a first one).
        """
        if self._unproven:
            self._unproven = False
            try:
                return step()
            except Exception as err:
                if not is_connection_lost(err):
                    raise
                log.info("the kept session to %s was lost (%s); connecting anew", self.cfg.hostname, err)
                self.drop()
        return call_with_retries(what, self.cfg.retries, self.cfg.retry_max_wait, step, on_retry=self.drop,
                                 progress=progress)

    def take_spare_files(self) -> transfer.SpareFiles | None:
        """The files the session holds open ahead for an upload (transfer.SpareFiles), taken from it."""
        spare = self._session.held.pop(SPARE_FILES, None) if self._session is not None else None
        return spare if isinstance(spare, transfer.SpareFiles) else None

    def hold_spare_files(self, spare: transfer.SpareFiles | None) -> None:
        """Keep ``spare`` with the session it is open on, for the next upload; released when it closes."""
        session = self._session
        if spare is not None and session is not None and spare.on(session.sftp):  # else gone with its session
            session.held[SPARE_FILES] = spare  # the upload took what was held: only one attempt gets this far

    def release(self) -> Session | None:
        """Hand the open session over (to be kept for a later call) instead of closing it."""
        session, self._session = self._session, None
        return session

    def where(self, path: str) -> str:
        return f"{self.cfg.hostname}:{path}"

    def drop(self) -> None:
        """Forget a broken session without waiting on it."""
        session, self._session = self._session, None
        if session is not None:
            session.transport.close()

    def close(self) -> None:
        try:
            if self._session is not None:
                self._session.close()
                self._session = None
        finally:
            let_go, self._let_go = self._let_go, None
            if let_go is not None:
                let_go()

    def abort(self) -> None:
        """Shut the open session down at once (see Session.abort); for cli.py's interrupt handler."""
        session = self._session
        if session is not None:
            session.abort()

    def close_quietly(self) -> None:
        """Close at the end of a call, whatever happened: a broken session must not hide the outcome."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - logged; the call's own result stands
            log.debug("closing the session failed", exc_info=True)


@contextlib.contextmanager
def remote_errors(remote: Remote, action: str, path: str) -> Iterator[None]:
    """Turn an SFTP status error into a message naming the operation, host and path."""
    try:
        yield
    except FileNotFoundError:
        raise RemoteNotFound(
            f"{action}: {remote.where(path)} does not exist", "check remote_dir and the backup timestamp"
        ) from None
    except transfer.ShortFileError as err:
        raise RemoteError(
            f"{action}: {remote.where(path)} is shorter than expected ({err})",
            "the stored file may be truncated; check the backup host's disk",
        ) from None
    except transfer.SyncRefusedError as err:
        raise sync_refused(f"{action}: {remote.where(path)}", err) from None
    except PermissionError:
        raise RemoteError(
            f"{action}: permission denied on {remote.where(path)}",
            f"check that {remote.cfg.effective_username()} may write there",
        ) from None
    except OSError as err:
        if err.errno is not None or not str(err) or is_connection_lost(err):
            raise
        # Paramiko maps the generic SFTP "Failure" status to a bare IOError: usually a full disk or quota.
        raise RemoteError(
            f"{action}: {remote.where(path)}: {err}", "check free space, quotas and permissions on the backup host"
        ) from None


def sync_refused(what: str, err: transfer.SyncRefusedError) -> RemoteError:
    """The error for a backup host that refuses to flush files to disk: nothing is stored without it."""
    return RemoteError(
        f"{what}: {err}; a file cannot be made durable there",
        "let the backup host's sftp-server flush files: take fsync out of its -P option"
        " (sshd_config's Subsystem or ForceCommand line), or set fsync: no if stored files need not"
        " survive a crash of the backup host",
    )


def require_remote_dir(remote: Remote) -> None:
    root = remote.cfg.remote_dir
    with remote_errors(remote, "check remote_dir", root):
        if not remote.retrying("check remote_dir", lambda: transfer.is_dir(remote.sftp, root)):
            raise RemoteNotFound(
                f"remote_dir {remote.where(root)} does not exist or is not a directory",
                f"create it on the backup host for user {remote.session.endpoint.user}",
            )


def check_writable(remote: Remote) -> None:
    """Prove remote_dir takes a file: write and remove a small probe."""
    require_remote_dir(remote)
    probe = posixpath.join(remote.cfg.remote_dir, f"{PROBE_PREFIX}.{os.getpid()}.{secrets.token_hex(4)}")

    def write_probe() -> None:
        transfer.put_bytes(remote.sftp, b"probe", probe, temp_path=probe + paths.TEMP_SUFFIX, sync=remote.cfg.fsync)
        transfer.remove_if_present(remote.sftp, probe)

    try:
        remote.retrying("write a probe file", write_probe)
    except BaseException as err:
        sftp = remote.sftp_if_open()
        if sftp is not None:  # a probe written but never synced or renamed is left nowhere
            transfer.remove_quietly(sftp, probe + paths.TEMP_SUFFIX)
        where = f"remote_dir {remote.where(remote.cfg.remote_dir)}"
        if isinstance(err, transfer.SyncRefusedError):
            raise sync_refused(where, err) from None
        if isinstance(err, OSError):
            raise RemoteError(
                f"{where} is not writable by {remote.session.endpoint.user}: {err.strerror or err}",
                "fix its ownership or permissions on the backup host",
            ) from None
        raise


def delete_backup_dir(remote: Remote, backup: paths.BackupDir, reason: str) -> int:
    root = remote.cfg.remote_dir
    target = backup.remote(root)

    def delete() -> int | None:
        if not transfer.is_dir(remote.sftp, target):
            return None
        files = transfer.rmtree(remote.sftp, target)
        transfer.rmdir_if_empty(remote.sftp, backup.remote_date_dir(root))
        return files

    with remote_errors(remote, "delete backup", target):
        files = remote.retrying(f"delete backup {backup.timestamp}", delete)
    if files is None:
        log.info("backup %s is not on the host (%s); nothing to delete", backup.timestamp, remote.where(target))
        return 0
    log.info("deleted backup %s (%d files) at %s: %s", backup.timestamp, files, remote.where(target), reason)
    return files


def upload(remote: Remote, source: BinaryIO, target_file: paths.BackupFile) -> int:
    """Store a stream under its final name, with its checksum sidecar, resuming after resets."""
    allocator.keep_freed_memory()
    root = remote.cfg.remote_dir
    target = target_file.remote(root)
    encoding = _encoding_reader(remote.cfg, source)  # first: a key that cannot be used fails before any transfer
    digest = integrity.new_hash() if remote.cfg.verify_checksums else None

    def sidecar() -> list[bytes]:  # once the stream has ended: the checksum file stored with it
        assert digest is not None
        return [integrity.format_sidecar(digest.result().hexdigest, target_file.name)]

    # The files a warm worker's last upload opened for this one (transfer.SpareFiles), if they fit; this upload
    # opens those of the next with its fsync and CLOSE, and releases those that do not fit in passing.
    directory = posixpath.dirname(target)
    files = 2 if digest else 1  # the stream, and its checksum file
    held = remote.take_spare_files()
    spare = held if held is not None and held.fit(remote.sftp, directory, files) else None
    stale = held if spare is None else None

    def open_next_spare(pipe: Pipeline) -> Callable[[bool], None]:
        take = transfer.SpareFiles.send_open(pipe, directory, files, replacing=stale)
        return lambda keep: remote.hold_spare_files(take(keep))

    def block_digests() -> bytes:  # once a stream longer than one block has ended: its per-block digests
        assert digest is not None
        found = digest.result()
        return blocks.format_blocks(blocks.BLOCK_SIZE, found.size, found.whole, found.blocks)

    # A container authenticates its own chunks: its sidecar is for sha256sum -c on the backup host.
    with_blocks = digest is not None and encoding is None
    upload = transfer.ResumableUpload(
        source.read if encoding is None else encoding.read,
        target,
        remote.cfg.resume_buffer,
        on_chunk=digest.update if digest else None,
        companions=[integrity.sidecar_path(target)] if digest else [],
        companion_data=sidecar if digest else None,
        spare=spare,
        also=open_next_spare if remote.keeps_session else None,
        sync=remote.cfg.fsync,
        late=transfer.LateCompanion(blocks.blocks_path(target), blocks.BLOCK_SIZE, block_digests) if with_blocks
        else None,
    )

    def create_directories() -> None:
        require_remote_dir(remote)  # a missing remote_dir is a configuration error: never created
        remote.retrying(
            "create backup directory", lambda: transfer.makedirs(remote.sftp, posixpath.dirname(target), stop_at=root)
        )

    def stream() -> int:
        return remote.retrying(f"upload {target}", lambda: upload.attempt(remote.sftp), lambda: upload.confirmed)

    with remote_errors(remote, "upload", target):
        try:
            # Setup normally created the directory: open first and create it only when
            # missing, which saves two round trips on every call.
            try:
                size = stream()
            except FileNotFoundError:
                if upload.confirmed:
                    raise
                create_directories()
                size = stream()
            caller.confirm_before_commit()  # a cut-short input (our caller gone) is never committed
            # The block digests (if stored) go into place with the file and its checksum, in one round trip, first.
            remote.retrying(f"rename {target} into place", lambda: upload.finish(remote.sftp))
            if encoding is not None:
                log.info("stored %s as a %s container: %d bytes of %d", remote.where(target),
                         encoding.description, size, encoding.original_size)
        except BaseException:
            # Best effort on a session that may be the thing that broke; cleanup catches the rest.
            sftp = remote.sftp_if_open()
            if sftp is not None:  # the removals are quiet: they never mask the original error
                upload.abandon(sftp)
                if stale is not None:  # failed before its release went out with the stream's CLOSE
                    stale.release(sftp)
            raise
        finally:
            if encoding is not None:
                encoding.close()
    return size


def _keyring(cfg: PluginConfig) -> keys.Keyring:
    return keys.Keyring(cfg.encryption_key_file, cfg.decryption_key_files)


def _encoding_reader(cfg: PluginConfig, source: BinaryIO) -> container.EncodingReader | None:
    """What stores ``source`` as a container, or None to store it as it comes (neither option set)."""
    if not cfg.uses_container:
        return None
    key = _keyring(cfg).encryption_key()
    header = container.new_header(key, compress=cfg.compression == "zstd")
    codec = container.Codec(header, key, cfg.compression_level)
    return container.EncodingReader(source.read, container.Encoder(codec))


def _expected_digest(remote: Remote, source: str, text: bytes | None) -> str | None:
    """The checksum stored for ``source``, from ``text``, its checksum file (None where there is none)."""
    if text is None:
        log.warning("no checksum stored for %s; its bytes are not verified", remote.where(source))
        return None
    expected = integrity.parse_sidecar(text)
    if expected is None:
        raise IntegrityError(
            f"checksum file {remote.where(integrity.sidecar_path(source))} is not in sha256sum format",
            "it may be damaged; compare it with sha256sum on the backup host",
        )
    return expected


def _damaged(remote: Remote, path: str, what: str) -> IntegrityError:
    return IntegrityError(
        f"{remote.where(path)} is damaged ({what}): not what was backed up; nothing of it was delivered",
        f"restore from another backup; '{PLUGIN_VERIFY}' lists every damaged file of a backup",
    )


VerifiedPlan = tuple[blocks.BlockIndex, list[blocks.Step]]


def _verified_plan(  # noqa: PLR0913
    remote: Remote, source: str, size: int, expected: str, wanted: list[tuple[int, int]], known: bytes | None = None
) -> VerifiedPlan | None:
    """How to read ``wanted`` block by block, with the digests each block is checked against; None
    for a file stored without per-block digests (by an earlier release): checkable only as a whole.
    ``known``: the digests file's first bytes, read already (with the file, by read_head)."""
    if size <= blocks.BLOCK_SIZE:
        if size == 0 and expected != integrity.empty_digest():
            raise _damaged(remote, source, "it is empty, but its checksum is not that of an empty file")
        index = blocks.BlockIndex.single(size, bytes.fromhex(expected))
        return index, blocks.plan(wanted, index.block_size)
    digests_path = blocks.blocks_path(source)
    # The header, and in the same read the digests of a file up to ~1 GiB (1,022 blocks).
    head = known if known is not None else remote.retrying(
        "read block digests", lambda: transfer.read_small(remote.sftp, digests_path, transfer.REQUEST_SIZE)
    )
    if head is None:
        return None
    try:
        header = blocks.parse_header(head)
    except blocks.BlocksFormatError as err:
        raise _damaged(remote, digests_path, str(err)) from None
    if header.size != size:
        raise _damaged(remote, source, f"it holds {size} bytes, but {header.size} were backed up")
    if header.whole.hex() != expected:
        raise _damaged(remote, digests_path, f"it disagrees with {integrity.sidecar_path(posixpath.basename(source))}")
    steps = blocks.plan(wanted, header.block_size)
    runs = blocks.block_runs(steps)
    spans = [header.digest_span(run.start, run.stop - 1) for run in runs]
    loaded = bytearray()
    _fetch_known(head, remote, digests_path)("read block digests", spans, loaded.extend)
    found: list[tuple[int, bytes]] = []
    at = 0
    for run in runs:
        found.append((run.start, bytes(loaded[at : at + blocks.DIGEST_SIZE * len(run)])))
        at += blocks.DIGEST_SIZE * len(run)
    return blocks.BlockIndex(header.block_size, size, found), steps


def _stored_ends(remote: Remote, source: str, what: str) -> tuple[int, bytes, bytes]:
    """A stored file's size and the ends that tell a container from a plain file (container.looks_like)."""
    return remote.retrying(
        what, lambda: transfer.read_ends(remote.sftp, source, container.HEADER_SIZE, container.TRAILER_SIZE)
    )


def _ends_of(data: bytes) -> tuple[bytes, bytes]:
    """The head and tail container.looks_like wants, of a whole stored file read into memory."""
    tail = data[-container.TRAILER_SIZE :] if len(data) >= container.HEADER_SIZE + container.TRAILER_SIZE else b""
    return data[: container.HEADER_SIZE], tail


def read_stored(
    remote: Remote,
    source: str,
    sink: Sink,
    ranges: list[tuple[int, int]] | None = None,
    ranges_from: str = "ranges",
    must_check: bool = False,
) -> int:
    """Send a stored file, or ranges of it in the order given, to ``sink``; return the bytes sent.

    Where digests are stored, no byte reaches ``sink`` before the block that
    holds it has matched its digest (blocks.py); a mismatch raises
    IntegrityError with nothing of that block sent. Files stored by an earlier
    release (a whole-file checksum only, longer than one block) are checked
    after the last byte, which gpbackup_helper never hears of: the log says so.
    With `must_check`, a plain file without a checksum raises NotChecked before
    any byte is read (a container always checks itself).
    """
    allocator.keep_freed_memory()
    with remote_errors(remote, "download", source):
        sidecar = integrity.sidecar_path(source) if remote.cfg.verify_checksums else None
        # A subset wants its ranges, not the file's first MiB: only what the first READs bring anyway.
        limit = WHOLE_READ_LIMIT if ranges is None else transfer.HEAD_FIRST_READ
        # A longer file's block digests come with it (a container holds its own: that OPEN fails, in the same
        # round trip as the file's READs). A whole restore reads the rest through the handle kept open.
        digests = blocks.blocks_path(source) if sidecar is not None and ranges is None else None
        first = remote.retrying("look up file", lambda: transfer.read_head(
            remote.sftp, source, limit, sidecar, SIDECAR_LIMIT, tail=container.TRAILER_SIZE,
            index=digests, index_above=blocks.BLOCK_SIZE, keep_open=ranges is None))
        rest = [first.rest] if first.rest is not None else []  # the first download of the rest takes it
        try:
            return _deliver_stored(remote, source, first, sink, ranges, ranges_from, must_check, rest)
        finally:
            for file in rest:  # nothing took it (the restore failed first)
                transfer.close_file_quietly(file)


def _deliver_stored(  # noqa: PLR0913
    remote: Remote,
    source: str,
    first: transfer.FileHead,
    sink: Sink,
    ranges: list[tuple[int, int]] | None,
    ranges_from: str,
    must_check: bool,
    rest: list[paramiko.SFTPFile],
) -> int:
    """read_stored, once the file's first bytes (``first``) are read; ``rest``: its handle kept open, for
    the first download of what is not among them."""
    size, fetch = first.size, _fetch_known(first.data, remote, source, rest)
    # The ends that tell a container from a plain file: a longer file's last bytes came with its first.
    head, tail = _ends_of(first.data) if first.whole else (first.data[: container.HEADER_SIZE], first.last)
    shape = container.looks_like(head, tail)
    if shape is None:
        raise _damaged(remote, source, "it starts or ends like a container, but not both: cut short, or changed")
    if shape:
        return _read_container(remote, source, size, head, tail, sink, ranges, ranges_from, fetch=fetch)
    expected = _expected_digest(remote, source, first.companion) if remote.cfg.verify_checksums else None
    if expected is None and must_check:
        raise NotChecked(f"{remote.where(source)} has no checksum stored", "verify_checksums was off when it was "
                         "stored, or its checksum file was removed")
    wanted = [(0, size)] if ranges is None else ranges
    if ranges is not None:
        check_within(ranges, size, source=f"{ranges_from} for {remote.where(source)}")
    verified = None if expected is None else _verified_plan(remote, source, size, expected, wanted, first.index)
    if verified is not None:
        return _read_verified(remote, source, *verified, sink, fetch)
    if expected is not None:
        log.warning(
            "%s has no block digests (stored by an earlier release): its bytes %s",
            remote.where(source),
            "cannot be verified before delivery" if ranges is None else "are not verified",
        )
    return _read_unverified(remote, source, wanted, sink, expected if ranges is None else None, fetch)


# How _read_container gets byte spans of the stored file: (what, [(start, end), ...], deliver) -> None.
Fetch = Callable[[str, list[tuple[int, int]], Callable[[bytes], object]], None]


def _fetch_remote(remote: Remote, source: str, opened: list[paramiko.SFTPFile] | None = None) -> Fetch:
    """Spans of ``source`` read from the backup host, each read resuming after a reconnect; the first
    through the handle in ``opened`` (taken from it), if one is there."""

    def fetch(what: str, spans: list[tuple[int, int]], deliver: Callable[[bytes], object]) -> None:
        download = transfer.ResumableDownload(source, deliver, spans, opened.pop() if opened else None)
        try:
            remote.retrying(what, lambda: download.attempt(remote.sftp), lambda: download.delivered)
        finally:
            download.close()

    return fetch


def _fetch_known(known: bytes, remote: Remote, source: str, opened: list[paramiko.SFTPFile] | None = None) -> Fetch:
    """Spans of ``source`` whose bytes lie in ``known``, its first bytes read already (all of them, for a
    small file), delivered from memory; the rest read from the backup host (through the handle in
    ``opened`` first, if one is there). Nothing is read twice."""
    read = _fetch_remote(remote, source, opened)

    def fetch(what: str, spans: list[tuple[int, int]], deliver: Callable[[bytes], object]) -> None:
        unknown: list[tuple[int, int]] = []  # spans to read, in order, before the next known bytes
        for start, end in spans:
            cut = min(max(start, len(known)), end)  # [start, cut) is known, [cut, end) is not
            if start < cut:
                if unknown:
                    read(what, unknown, deliver)
                    unknown = []
                deliver(known[start:cut])
            if cut < end:
                unknown.append((cut, end))
        if unknown:
            read(what, unknown, deliver)

    return fetch


def _read_container(
    remote: Remote,
    source: str,
    size: int,
    head: bytes,
    tail: bytes,
    sink: Sink,
    ranges: list[tuple[int, int]] | None,
    ranges_from: str = "ranges",
    limit: int | None = None,
    fetch: Fetch | None = None,
) -> int:
    """Read a container: its header and trailer (given), its index, then only the chunks the ranges need, each
    authenticated and decoded before any of its bytes reaches ``sink``. ``limit``: at most the first so many
    bytes (a whole read only). ``fetch``: where the bytes come from (default: the backup host)."""
    fetch = fetch or _fetch_remote(remote, source)
    try:
        header = container.parse_header(head)
        trailer = container.parse_trailer(tail, size)
    except container.ContainerFormatError as err:
        raise _damaged(remote, source, str(err)) from None
    key = None
    if header.encrypted:
        key = _keyring(remote.cfg).for_digest(header.key_digest, remote.where(source))
    codec = container.Codec(header, key)
    record = bytearray()
    fetch("read the index", [(trailer.index_offset, trailer.index_offset + trailer.index_length)], record.extend)
    try:
        box = container.Container(codec, trailer, record)
    except container.ChunkAuthError:
        raise _damaged(remote, source, "its index or header fails authentication") from None
    except container.ContainerFormatError as err:
        raise _damaged(remote, source, str(err)) from None
    if ranges is None:
        wanted = [(0, box.size if limit is None else min(limit, box.size))]
    else:
        check_within(ranges, box.size, source=f"{ranges_from} for {remote.where(source)}")
        wanted = ranges
    steps = box.plan(wanted)
    output = container.ChunkOutput(box, steps, sink)
    try:
        fetch(f"download {source}", box.fetch_ranges(steps), output.feed)
        output.finish()
    except container.ChunkAuthError as err:
        offset = box.entries[int(err.what.split()[1])].original if err.what.startswith("chunk ") else 0
        raise _damaged(remote, source, f"{err.what}, the bytes from offset {offset}, fails authentication") from None
    except container.ContainerFormatError as err:
        raise _damaged(remote, source, str(err)) from None
    return output.delivered


def read_small_stored(remote: Remote, path: str, limit: int, what: str) -> bytes | None:
    """Up to ``limit`` bytes of a small stored file (a report, a config), a container decoded and
    authenticated; None if it does not exist."""
    with remote_errors(remote, what, path):
        data = remote.retrying(what, lambda: transfer.read_small(remote.sftp, path, limit))
        if data is None or not data.startswith(container.MAGIC):
            return data
        fetch = None
        if len(data) < limit:  # the whole stored file is here already: decode it without reading it again
            size, (head, tail), fetch = len(data), _ends_of(data), _fetch_known(data, remote, path)
        else:
            size, head, tail = _stored_ends(remote, path, what)
        if container.looks_like(head, tail) is not True:
            raise _damaged(remote, path, "it starts like a container but does not end like one: cut short, or changed")
        out = bytearray()
        _read_container(remote, path, size, head, tail, out.extend, None, limit=limit, fetch=fetch)
        return bytes(out)


def _read_verified(
    remote: Remote, source: str, index: blocks.BlockIndex, steps: list[blocks.Step], sink: Sink, fetch: Fetch
) -> int:
    output = blocks.VerifiedOutput(index, steps, sink)
    try:
        fetch(f"download {source}", blocks.fetch_ranges(steps, index), output.feed)
        output.finish()
    except blocks.BlockMismatch as err:
        raise _damaged(remote, source, str(err)) from None
    except BaseException:
        output.abandon()
        raise
    return output.delivered


def _read_unverified(
    remote: Remote, source: str, ranges: list[tuple[int, int]], sink: Sink, expected: str | None, fetch: Fetch
) -> int:
    """Stream without per-block digests; a whole-file checksum, if given, is checked at the end."""
    digest = integrity.new_hash() if expected else None
    delivered = 0

    def deliver(data: bytes) -> None:
        nonlocal delivered
        if digest is not None:
            digest.update(data)
        sink(memoryview(data))
        delivered += len(data)

    fetch(f"download {source}", ranges, deliver)
    if digest is not None and digest.hexdigest() != expected:
        raise IntegrityError(
            f"checksum mismatch for {remote.where(source)}: the stored bytes are not what was backed up",
            "the file on the backup host is damaged; restore from another backup",
        )
    return delivered
