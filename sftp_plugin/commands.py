"""The storage plugin API verbs, composed from config, paths, connection and transfer.

One function per command; each returns a `Result` for the log line. gpbackup
calls ``setup``/``cleanup`` for scope ``segment`` once per segment (hundreds
at once), so those never touch the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from sftp_plugin import PLUGIN_NAME, allocator, blocks, caller, integrity, paths, retention, transfer
from sftp_plugin.config import PluginConfig
from sftp_plugin.connection import Session, connect
from sftp_plugin.errors import IntegrityError, PluginError, ReaderGone, RemoteError, RemoteNotFound, UsageError
from sftp_plugin.offsets import check_within, parse_offsets
from sftp_plugin.retry import call_with_retries, is_connection_lost

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

SCOPES = ("coordinator", "master", "segment_host", "segment")
PROBE_PREFIX = ".gpbackup_sftp_plugin_probe"
# The admin command that re-reads a whole backup (named in messages about a damaged file).
PLUGIN_VERIFY = f"{PLUGIN_NAME} verify <config> <timestamp>"
T = TypeVar("T")
Sink = Callable[[memoryview], object]  # where a restore's bytes go: stdout, a local file, a hash


@dataclass
class Result:
    """What a command did, for the one summary line cli.py logs."""

    bytes: int = 0
    detail: str = ""


class Remote:
    """The session of one plugin call: opened on first use, dropped and reopened by `retrying`."""

    def __init__(self, cfg: PluginConfig) -> None:
        self.cfg = cfg
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = connect(self.cfg)
        return self._session

    @property
    def sftp(self) -> paramiko.SFTPClient:
        return self.session.sftp

    def open_sftp(self) -> paramiko.SFTPClient | None:
        """The SFTP client of a session already open, or None: never connects (for cleanup on failure,
        where a new connection could be one more failed login)."""
        return self._session.sftp if self._session is not None else None

    def retrying(self, what: str, step: Callable[[], T]) -> T:
        """Run one remote step under the retry policy; a lost connection is dropped and reopened.

        ``step`` must be safe to run again: idempotent, or resuming from its own progress.
        """
        return call_with_retries(what, self.cfg.retries, self.cfg.retry_max_wait, step, on_retry=self.drop)

    def where(self, path: str) -> str:
        return f"{self.cfg.hostname}:{path}"

    def drop(self) -> None:
        """Forget a broken session without waiting on it."""
        session, self._session = self._session, None
        if session is not None:
            session.transport.close()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

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


def parse_scope(args: list[str]) -> str:
    scope = args[1]
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}", f"expected one of {', '.join(SCOPES)}")
    if len(args) > 2:
        # The test bench passes the content id with its double quotes: "-1".
        content = args[2].strip("\"'")
        try:
            int(content)
        except ValueError:
            raise UsageError(f"content id {args[2]!r} is not an integer", "gpbackup passes e.g. -1 or 0") from None
    return "coordinator" if scope == "master" else scope


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
        transfer.put_bytes(remote.sftp, b"probe", probe, temp_path=probe + paths.TEMP_SUFFIX)
        transfer.remove_if_present(remote.sftp, probe)

    try:
        remote.retrying("write a probe file", write_probe)
    except OSError as err:
        raise RemoteError(
            f"remote_dir {remote.where(remote.cfg.remote_dir)} is not writable by "
            f"{remote.session.endpoint.user}: {err.strerror or err}",
            "fix its ownership or permissions on the backup host",
        ) from None


def setup_plugin_for_backup(remote: Remote, args: list[str]) -> Result:
    backup = paths.parse_backup_dir(args[0])
    scope = parse_scope(args)
    if scope == "coordinator":
        require_remote_dir(remote)
        target = backup.remote(remote.cfg.remote_dir)
        with remote_errors(remote, "create backup directory", target):
            remote.retrying(
                "create backup directory", lambda: transfer.makedirs(remote.sftp, target, stop_at=remote.cfg.remote_dir)
            )
        return Result(detail=f"created {remote.where(target)}")
    if scope == "segment_host":
        check_writable(remote)
        return Result(detail=f"{remote.where(remote.cfg.remote_dir)} is writable")
    return Result(detail="nothing to do for scope segment")


def setup_plugin_for_restore(remote: Remote, args: list[str]) -> Result:
    backup = paths.parse_backup_dir(args[0])
    scope = parse_scope(args)
    os.makedirs(args[0], exist_ok=True)
    if scope == "coordinator":
        target = backup.remote(remote.cfg.remote_dir)
        with remote_errors(remote, "find backup", target):
            if not remote.retrying("find backup", lambda: transfer.is_dir(remote.sftp, target)):
                raise RemoteNotFound(
                    f"backup {backup.timestamp} not found: {remote.where(target)} does not exist",
                    "check the --timestamp and remote_dir (list_directory shows what is stored)",
                )
        return Result(detail=f"found {remote.where(target)}")
    if scope == "segment_host":
        require_remote_dir(remote)
        return Result(detail=f"{remote.where(remote.cfg.remote_dir)} reachable")
    return Result(detail="nothing to do for scope segment")


def cleanup_plugin_for_backup(remote: Remote, args: list[str]) -> Result:
    backup = paths.parse_backup_dir(args[0])
    if parse_scope(args) != "coordinator":
        return Result(detail="nothing to do for this scope")
    root = remote.cfg.remote_dir
    target = backup.remote(root)

    def remove_leftovers() -> int:
        if not transfer.is_dir(remote.sftp, target):
            return 0
        removed = 0
        for entry in remote.sftp.listdir(target):
            if paths.is_temp_name(entry):
                removed += transfer.remove_if_present(remote.sftp, posixpath.join(target, entry))
                log.info("removed upload leftover %s", remote.where(posixpath.join(target, entry)))
        if transfer.rmdir_if_empty(remote.sftp, target):
            log.info("removed empty backup directory %s", remote.where(target))
        transfer.rmdir_if_empty(remote.sftp, backup.remote_date_dir(root))
        return removed

    with remote_errors(remote, "clean up backup directory", target):
        removed = remote.retrying("clean up backup directory", remove_leftovers)
    try:
        pruned = prune(remote, current=backup)
    except (PluginError, OSError) as err:
        # gpbackup turns a failed coordinator cleanup into exit code 1 for a backup that succeeded;
        # old backups left in place are no reason for that. The next cleanup tries again.
        log.warning("pruning old backups failed, none or only some were deleted: %s", err)
        return Result(detail=f"removed {removed} leftovers, pruning failed (see the warning above)")
    return Result(detail=f"removed {removed} leftovers, pruned {len(pruned)} old backups")


def cleanup_plugin_for_restore(remote: Remote, args: list[str]) -> Result:
    # Restores leave nothing behind on the backup host; the arguments are still checked.
    paths.parse_backup_dir(args[0])
    parse_scope(args)
    return Result(detail="nothing to clean up after a restore")


def prune(remote: Remote, current: paths.BackupDir) -> list[paths.BackupDir]:
    """Apply retention at the end of the backup ``current``; the backups deleted, oldest first.

    A backup the server refuses to delete is a warning in the log and is skipped: one stuck
    old backup must not block the pruning of the others.
    """
    # Imported here: catalog.py imports Remote and remote_errors from this module.
    from sftp_plugin import catalog

    cfg = remote.cfg
    if cfg.keep_last is None and cfg.keep_days is None:
        return []
    this_backup = catalog.read_entry(remote, current)
    if not this_backup.succeeded:
        log.warning("backup %s did not succeed (report: %s, config.yaml: %s); not pruning old backups",
                    current.timestamp, this_backup.report_status or "none", this_backup.config_status or "no status")
        return []
    # The current backup's files were just read above: not again.
    others = [b for b in catalog.list_backup_dirs(remote) if b != current]
    entries = [this_backup, *catalog.read_catalog(remote, others)]
    decisions = retention.decide([e.facts() for e in entries], cfg.keep_last, cfg.keep_days, datetime.now(), current)
    deleted: list[paths.BackupDir] = []
    for decision in decisions:
        if decision.keep:
            log.debug("retention keeps %s: %s", decision.backup.timestamp, "; ".join(decision.reasons))
            continue
        try:
            delete_backup_dir(remote, decision.backup, reason="retention: " + "; ".join(decision.reasons))
        except RemoteError as err:  # the server refused; a lost connection (ConnectError) ends the pruning
            log.warning("retention could not delete backup %s: %s", decision.backup.timestamp, err)
            continue
        deleted.append(decision.backup)
    return deleted


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


def _local_source(path: str) -> BinaryIO:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"local file {path} does not exist", "check the path gpbackup passed") from None
    except OSError as err:
        raise UsageError(f"cannot read local file {path}: {err.strerror}", "check its permissions") from None
    if not os.path.isfile(path):
        handle.close()
        raise UsageError(f"local path {path} is not a regular file", "backup_file takes a file")
    return handle


def _upload(remote: Remote, source: BinaryIO, target_file: paths.BackupFile) -> int:
    """Store a stream under its final name, with its checksum sidecar, resuming after resets."""
    allocator.keep_freed_memory()
    root = remote.cfg.remote_dir
    target = target_file.remote(root)
    digest = integrity.new_hash() if remote.cfg.verify_checksums else None
    upload = transfer.ResumableUpload(
        source.read, target, remote.cfg.resume_buffer, on_chunk=digest.update if digest else None
    )

    def create_directories() -> None:
        require_remote_dir(remote)  # a missing remote_dir is a configuration error: never created
        remote.retrying(
            "create backup directory", lambda: transfer.makedirs(remote.sftp, posixpath.dirname(target), stop_at=root)
        )

    def stream() -> int:
        return remote.retrying(f"upload {target}", lambda: upload.attempt(remote.sftp))

    with remote_errors(remote, "upload", target):
        # Each checksum file's temporary name serves every attempt: no leftovers.
        checksum_files = [(path, paths.temp_name_for(path)) for path in _checksum_paths(target)]
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
            if digest is not None:
                found = digest.result()
                contents = [integrity.format_sidecar(found.hexdigest, target_file.name)]
                if found.size > blocks.BLOCK_SIZE:
                    contents.append(blocks.format_blocks(blocks.BLOCK_SIZE, found.size, found.whole, found.blocks))
                for (path, temp), data in zip(checksum_files, contents):
                    remote.retrying(
                        "store checksum", lambda p=path, t=temp, d=data: transfer.put_bytes(remote.sftp, d, p, t)
                    )
            remote.retrying(f"rename {target} into place", lambda: upload.finish(remote.sftp))
        except BaseException:
            # Best effort on a session that may be the thing that broke; cleanup catches the rest.
            sftp = remote.open_sftp()
            if sftp is not None:  # the removals are quiet: they never mask the original error
                upload.abandon(sftp)
                for _, temp in checksum_files:
                    transfer.remove_quietly(sftp, temp)
            raise
    return size


def _checksum_paths(path: str) -> tuple[str, str]:
    """The sha256sum sidecar and the per-block digests of a stored file (the latter only for
    streams longer than one block)."""
    return integrity.sidecar_path(path), blocks.blocks_path(path)


def backup_file(remote: Remote, args: list[str]) -> Result:
    target = paths.parse_backup_file(args[0])
    with _local_source(args[0]) as source:
        size = _upload(remote, source, target)
    return Result(size, f"{args[0]} -> {remote.where(target.remote(remote.cfg.remote_dir))}")


def backup_data(remote: Remote, args: list[str]) -> Result:
    target = paths.parse_backup_file(args[0])
    size = _upload(remote, sys.stdin.buffer, target)
    return Result(size, f"stdin -> {remote.where(target.remote(remote.cfg.remote_dir))}")


def _expected_digest(remote: Remote, source: str) -> str | None:
    """The stored checksum of ``source``, or None when verification is off or none was stored."""
    if not remote.cfg.verify_checksums:
        return None
    sidecar = integrity.sidecar_path(source)

    text = remote.retrying("read checksum", lambda: transfer.read_small(remote.sftp, sidecar, 4096))
    if text is None:
        log.warning("no checksum stored for %s; its bytes are not verified", remote.where(source))
        return None
    expected = integrity.parse_sidecar(text)
    if expected is None:
        raise IntegrityError(
            f"checksum file {remote.where(sidecar)} is not in sha256sum format",
            "it may be damaged; compare it with sha256sum on the backup host",
        )
    return expected


def _damaged(remote: Remote, path: str, what: str) -> IntegrityError:
    return IntegrityError(
        f"{remote.where(path)} is damaged ({what}): not what was backed up; nothing of it was delivered",
        f"restore from another backup; '{PLUGIN_VERIFY}' lists every damaged file of a backup",
    )


VerifiedPlan = tuple[blocks.BlockIndex, list[blocks.Step]]


def _verified_plan(
    remote: Remote, source: str, size: int, expected: str, wanted: list[tuple[int, int]]
) -> VerifiedPlan | None:
    """How to read ``wanted`` block by block, with the digests each block is checked against; None
    for a file stored without per-block digests (by an earlier release): checkable only as a whole."""
    if size <= blocks.BLOCK_SIZE:
        if size == 0 and expected != integrity.empty_digest():
            raise _damaged(remote, source, "it is empty, but its checksum is not that of an empty file")
        index = blocks.BlockIndex.single(size, bytes.fromhex(expected))
        return index, blocks.plan(wanted, index.block_size)
    digests_path = blocks.blocks_path(source)
    head = remote.retrying(
        "read block digests", lambda: transfer.read_small(remote.sftp, digests_path, blocks.HEADER_SIZE)
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
    download = transfer.ResumableDownload(digests_path, loaded.extend, spans)
    remote.retrying("read block digests", lambda: download.attempt(remote.sftp))
    found: list[tuple[int, bytes]] = []
    at = 0
    for run in runs:
        found.append((run.start, bytes(loaded[at : at + blocks.DIGEST_SIZE * len(run)])))
        at += blocks.DIGEST_SIZE * len(run)
    return blocks.BlockIndex(header.block_size, size, found), steps


def read_stored(
    remote: Remote, source: str, sink: Sink, ranges: list[tuple[int, int]] | None = None, ranges_from: str = "ranges"
) -> int:
    """Send a stored file, or ranges of it in the order given, to ``sink``; return the bytes sent.

    Where digests are stored, no byte reaches ``sink`` before the block that
    holds it has matched its digest (blocks.py); a mismatch raises
    IntegrityError with nothing of that block sent. Files stored by an earlier
    release (a whole-file checksum only, longer than one block) are checked
    after the last byte, which gpbackup_helper never hears of: the log says so.
    """
    allocator.keep_freed_memory()
    with remote_errors(remote, "download", source):
        expected = _expected_digest(remote, source)
        size = remote.retrying("look up file", lambda: transfer.size_of(remote.sftp, source))
        wanted = [(0, size)] if ranges is None else ranges
        if ranges is not None:
            check_within(ranges, size, source=f"{ranges_from} for {remote.where(source)}")
        verified = None if expected is None else _verified_plan(remote, source, size, expected, wanted)
        if verified is not None:
            return _read_verified(remote, source, *verified, sink)
        if expected is not None:
            log.warning(
                "%s has no block digests (stored by an earlier release): its bytes %s",
                remote.where(source),
                "cannot be verified before delivery" if ranges is None else "are not verified",
            )
        return _read_unverified(remote, source, wanted, sink, expected if ranges is None else None)


def _read_verified(remote: Remote, source: str, index: blocks.BlockIndex, steps: list[blocks.Step], sink: Sink) -> int:
    output = blocks.VerifiedOutput(index, steps, sink)
    download = transfer.ResumableDownload(source, output.feed, blocks.fetch_ranges(steps, index))
    try:
        remote.retrying(f"download {source}", lambda: download.attempt(remote.sftp))
        output.finish()
    except blocks.BlockMismatch as err:
        raise _damaged(remote, source, str(err)) from None
    except BaseException:
        output.abandon()
        raise
    return output.delivered


def _read_unverified(
    remote: Remote, source: str, ranges: list[tuple[int, int]], sink: Sink, expected: str | None
) -> int:
    """Stream without per-block digests; a whole-file checksum, if given, is checked at the end."""
    digest = integrity.new_hash() if expected else None

    def deliver(data: bytes) -> None:
        if digest is not None:
            digest.update(data)
        sink(memoryview(data))

    download = transfer.ResumableDownload(source, deliver, ranges)
    size = remote.retrying(f"download {source}", lambda: download.attempt(remote.sftp))
    if digest is not None and digest.hexdigest() != expected:
        raise IntegrityError(
            f"checksum mismatch for {remote.where(source)}: the stored bytes are not what was backed up",
            "the file on the backup host is damaged; restore from another backup",
        )
    return size


def _stdout_sink() -> Sink:
    """Writes to stdout; a reader that went away ends the call (ReaderGone), never a retry."""
    out = sys.stdout.buffer

    def write(data: memoryview) -> None:
        try:
            out.write(data)
        except BrokenPipeError:
            raise ReaderGone("the reader of stdout closed it (gpbackup_helper has what it needs, or failed)") from None

    return write


def _flush_stdout() -> None:
    try:
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise ReaderGone("the reader of stdout closed it before the last bytes") from None


def restore_file(remote: Remote, args: list[str]) -> Result:
    local = args[0]
    source = paths.parse_backup_file(local).remote(remote.cfg.remote_dir)
    final = os.path.abspath(local)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    temp = paths.temp_name_for(final)
    try:
        with open(temp, "wb") as sink:
            size = read_stored(remote, source, sink.write)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return Result(size, f"{remote.where(source)} -> {local}")


def restore_data(remote: Remote, args: list[str]) -> Result:
    source = paths.parse_backup_file(args[0]).remote(remote.cfg.remote_dir)
    size = read_stored(remote, source, _stdout_sink())
    _flush_stdout()
    return Result(size, f"{remote.where(source)} -> stdout")


def restore_data_subset(remote: Remote, args: list[str]) -> Result:
    source = paths.parse_backup_file(args[0]).remote(remote.cfg.remote_dir)
    try:
        with open(args[1], encoding="ascii") as handle:
            ranges = parse_offsets(handle.read(), source=f"offsets file {args[1]}")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read offsets file {args[1]}: {err}", "check the path gprestore passed") from None
    size = read_stored(remote, source, _stdout_sink(), ranges, ranges_from=f"offsets file {args[1]}")
    _flush_stdout()
    return Result(size, f"{len(ranges)} ranges of {remote.where(source)} -> stdout")


def delete_backup(remote: Remote, args: list[str]) -> Result:
    backup = paths.parse_timestamp(args[0].strip("\"'"))
    files = delete_backup_dir(remote, backup, reason="delete_backup")
    return Result(detail=f"removed {files} files of backup {backup.timestamp}")


def list_directory(remote: Remote, args: list[str]) -> Result:
    root = remote.cfg.remote_dir
    top = paths.under_remote_dir(root, args[0] if args else None)
    with remote_errors(remote, "list directory", top):
        entries = remote.retrying("list directory", lambda: transfer.walk_files(remote.sftp, top))
    prefix = posixpath.relpath(top, root)
    lines = [f"{posixpath.normpath(posixpath.join(prefix, name))}\t{size}" for name, size in entries]
    sys.stdout.write("".join(line + "\n" for line in lines))
    return Result(sum(size for _, size in entries), f"listed {len(entries)} files under {remote.where(top)}")


def delete_directory(remote: Remote, args: list[str]) -> Result:
    root = remote.cfg.remote_dir
    target = paths.under_remote_dir(root, args[0])
    if target == posixpath.normpath(root):
        raise UsageError(f"refusing to delete remote_dir {root} itself", "name a directory below it")

    def delete() -> int | None:
        if not transfer.exists(remote.sftp, target):
            return None
        return transfer.rmtree(remote.sftp, target)

    with remote_errors(remote, "delete directory", target):
        files = remote.retrying("delete directory", delete)
    if files is None:
        log.info("%s does not exist; nothing to delete", remote.where(target))
        return Result(detail="already absent")
    return Result(detail=f"removed {files} files under {remote.where(target)}")
