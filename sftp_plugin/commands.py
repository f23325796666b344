"""The storage plugin API verbs, composed from config, paths and the backup host (store.py).

One function per command; each returns a `Result` for the log line. gpbackup
calls ``setup``/``cleanup`` for scope ``segment`` once per segment (hundreds
at once), so those never touch the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from sftp_plugin import catalog, paths, retention, transfer
from sftp_plugin.errors import PluginError, ReaderGone, RemoteError, RemoteNotFound, UsageError
from sftp_plugin.offsets import parse_offsets
from sftp_plugin.store import (
    Remote,
    Sink,
    check_writable,
    delete_backup_dir,
    read_stored,
    remote_errors,
    require_remote_dir,
    upload,
)

log = logging.getLogger(__name__)

SCOPES = ("coordinator", "master", "segment_host", "segment")
@dataclass
class Result:
    """What a command did, for the one summary line cli.py logs."""

    bytes: int = 0
    detail: str = ""


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
                    "check the --timestamp and remote_dir "
                    "(gpbackup_sftp_plugin list-backups <config> shows what is stored)",
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
        for entry in remote.sftp.listdir_attr(target):
            name, path = entry.filename, posixpath.join(target, entry.filename)
            if not paths.is_temp_name(name):
                continue
            gone = transfer.remove_if_present(remote.sftp, path)
            if paths.is_upload_leftover(name, entry.st_size or 0):  # not a worker's spare, opened ahead for nothing
                removed += gone
                log.info("removed upload leftover %s", remote.where(path))
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


def backup_file(remote: Remote, args: list[str]) -> Result:
    target = paths.parse_backup_file(args[0])
    with _local_source(args[0]) as source:
        size = upload(remote, source, target)
    return Result(size, f"{args[0]} -> {remote.where(target.remote(remote.cfg.remote_dir))}")


def backup_data(remote: Remote, args: list[str]) -> Result:
    target = paths.parse_backup_file(args[0])
    size = upload(remote, sys.stdin.buffer, target)
    return Result(size, f"stdin -> {remote.where(target.remote(remote.cfg.remote_dir))}")


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
    target = backup.remote(remote.cfg.remote_dir)
    with remote_errors(remote, "find backup", target):
        present = remote.retrying("find backup", lambda: transfer.is_dir(remote.sftp, target))
    if not present:
        # Success all the same: gpbackup_manager deletes backups that may be gone already. A person who
        # typed the timestamp by hand is told on the terminal; stdout, since any stderr byte is a failure.
        where = remote.where(remote.cfg.remote_dir)
        log.info("no backup %s under %s: nothing to delete", backup.timestamp, where)
        if os.isatty(sys.stdout.fileno()):
            sys.stdout.write(f"no backup {backup.timestamp} under {where}\n")
        return Result(detail=f"no backup {backup.timestamp}: nothing deleted")
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
