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

from sftp_plugin import allocator, forkserver, integrity, paths, retention, transfer
from sftp_plugin.config import PluginConfig
from sftp_plugin.connection import Session, connect
from sftp_plugin.errors import IntegrityError, RemoteError, RemoteNotFound, UsageError
from sftp_plugin.offsets import parse_offsets
from sftp_plugin.retry import call_with_retries, is_connection_lost

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

SCOPES = ("coordinator", "master", "segment_host", "segment")
PROBE_PREFIX = ".gpbackup_sftp_plugin_probe"
T = TypeVar("T")


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
    pruned = prune(remote, current=backup)
    return Result(detail=f"removed {removed} leftovers, pruned {len(pruned)} old backups")


def cleanup_plugin_for_restore(remote: Remote, args: list[str]) -> Result:
    # Restores leave nothing behind on the backup host; the arguments are still checked.
    paths.parse_backup_dir(args[0])
    parse_scope(args)
    return Result(detail="nothing to clean up after a restore")


def list_backups(remote: Remote) -> list[paths.BackupDir]:
    """Every backup directory under remote_dir/backups, by name only."""
    top = posixpath.join(remote.cfg.remote_dir, paths.BACKUPS)

    def scan() -> list[paths.BackupDir]:
        if not transfer.is_dir(remote.sftp, top):
            return []
        found: list[paths.BackupDir] = []
        for date in remote.sftp.listdir(top):
            if not paths.DATE_RE.fullmatch(date):
                continue
            for timestamp in remote.sftp.listdir(posixpath.join(top, date)):
                if paths.TIMESTAMP_RE.fullmatch(timestamp) and timestamp.startswith(date):
                    found.append(paths.BackupDir(date, timestamp))
        return found

    with remote_errors(remote, "list backups", top):
        return remote.retrying("list backups", scan)


def backup_succeeded(remote: Remote, backup: paths.BackupDir) -> bool:
    """Whether gpbackup's report for ``backup`` is stored and says it succeeded."""
    return read_report_status(remote, backup) == retention.SUCCESS


def read_report_status(remote: Remote, backup: paths.BackupDir) -> str | None:
    """What gpbackup's report for ``backup`` says ("Success", "Failure"); None if there is none."""
    report = posixpath.join(backup.remote(remote.cfg.remote_dir), retention.report_name(backup))

    def read_report() -> str:
        return (transfer.read_small(remote.sftp, report, 1024 * 1024) or b"").decode("utf-8", "replace")

    with remote_errors(remote, "read backup report", report):
        return retention.report_status(remote.retrying("read backup report", read_report))


def prune(remote: Remote, current: paths.BackupDir) -> list[paths.BackupDir]:
    cfg = remote.cfg
    if cfg.keep_last is None and cfg.keep_days is None:
        return []
    if not backup_succeeded(remote, current):
        log.warning("backup %s has no successful report; not pruning old backups", current.timestamp)
        return []
    backups = list_backups(remote)
    # The current backup's report was just read above: not again.
    succeeded = {b for b in backups if b == current or backup_succeeded(remote, b)}
    doomed = retention.select_for_pruning(backups, succeeded, current, cfg.keep_last, cfg.keep_days, datetime.now())
    for backup in doomed:
        delete_backup_dir(remote, backup, reason=f"retention (keep_last={cfg.keep_last}, keep_days={cfg.keep_days})")
    return doomed


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
        sidecar_path = integrity.sidecar_path(target)
        sidecar_temp = paths.temp_name_for(sidecar_path)  # one name for every attempt: no leftovers
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
            forkserver.heed_caller()  # in a worker: a signal or death of our caller stops the commit here
            if digest is not None:
                sidecar = integrity.format_sidecar(digest.hexdigest(), target_file.name)
                remote.retrying(
                    "store checksum", lambda: transfer.put_bytes(remote.sftp, sidecar, sidecar_path, sidecar_temp)
                )
            remote.retrying(f"rename {target} into place", lambda: upload.finish(remote.sftp))
        except BaseException:
            # Best effort on a session that may be the thing that broke; cleanup catches the rest.
            sftp = remote.open_sftp()
            if sftp is not None:  # both removals are quiet: they never mask the original error
                upload.abandon(sftp)
                transfer.remove_quietly(sftp, sidecar_temp)
            raise
    return size


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
        return None
    expected = integrity.parse_sidecar(text)
    if expected is None:
        raise IntegrityError(
            f"checksum file {remote.where(sidecar)} is not in sha256sum format",
            "it may be damaged; compare it with sha256sum on the backup host",
        )
    return expected


def _download(
    remote: Remote, source: str, sink: Callable[[bytes], object], ranges: list[tuple[int, int]] | None = None
) -> int:
    """Stream ``source`` (or ranges of it) to ``sink``, resuming after resets; verify whole files."""
    allocator.keep_freed_memory()
    with remote_errors(remote, "download", source):
        expected = _expected_digest(remote, source) if ranges is None else None
        digest = integrity.new_hash() if expected else None

        def deliver(data: bytes) -> None:
            if digest is not None:
                digest.update(data)
            sink(data)

        download = transfer.ResumableDownload(source, deliver, ranges)
        size = remote.retrying(f"download {source}", lambda: download.attempt(remote.sftp))
    if ranges is None and expected is None and remote.cfg.verify_checksums:
        log.warning("no checksum stored for %s; its bytes were not verified", remote.where(source))
    if digest is not None and digest.hexdigest() != expected:
        raise IntegrityError(
            f"checksum mismatch for {remote.where(source)}: the stored bytes are not what was backed up",
            "the file on the backup host is damaged; restore from another backup",
        )
    return size


def restore_file(remote: Remote, args: list[str]) -> Result:
    local = args[0]
    source = paths.parse_backup_file(local).remote(remote.cfg.remote_dir)
    final = os.path.abspath(local)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    temp = paths.temp_name_for(final)
    try:
        with open(temp, "wb") as sink:
            size = _download(remote, source, sink.write)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return Result(size, f"{remote.where(source)} -> {local}")


def restore_data(remote: Remote, args: list[str]) -> Result:
    source = paths.parse_backup_file(args[0]).remote(remote.cfg.remote_dir)
    size = _download(remote, source, sys.stdout.buffer.write)
    sys.stdout.buffer.flush()
    return Result(size, f"{remote.where(source)} -> stdout")


def restore_data_subset(remote: Remote, args: list[str]) -> Result:
    source = paths.parse_backup_file(args[0]).remote(remote.cfg.remote_dir)
    try:
        with open(args[1], encoding="ascii") as handle:
            ranges = parse_offsets(handle.read(), source=f"offsets file {args[1]}")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read offsets file {args[1]}: {err}", "check the path gprestore passed") from None
    size = _download(remote, source, sys.stdout.buffer.write, ranges)
    sys.stdout.buffer.flush()
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
