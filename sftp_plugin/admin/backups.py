"""The stored backups, for the administrator: ``list-backups`` (what is there, how big and old, whether
complete), ``prune`` (retention on demand) and ``verify`` (every file re-read and checked as a restore
would)."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from sftp_plugin.admin.output import human_age, human_size, print_table
from sftp_plugin.admin.runner import command_parser, parse_args, with_config
from sftp_plugin.errors import KeyNotConfigured, RemoteError, RemoteNotFound
from sftp_plugin.stderr import fail

if TYPE_CHECKING:
    from sftp_plugin.catalog import CatalogEntry
    from sftp_plugin.config import PluginConfig
    from sftp_plugin.paths import BackupDir
    from sftp_plugin.store import Remote

log = logging.getLogger("gpbackup_sftp_plugin")


# --------------------------------------------------------------------------- list-backups


@dataclass
class BackupSummary:
    timestamp: str
    path: str
    files: int
    bytes: int
    age_seconds: int | None  # None: the directory's name is 14 digits, but not a date and time
    temporary_files: list[str]
    has_report: bool
    report_status: str | None = None  # what the report says ("Success", "Failure"); None without one
    config_status: str | None = None  # what gpbackup's config.yaml says; None without one
    database: str | None = None  # the database backed up; None when unknown
    # The other backups a restore of this one reads (an incremental's full backup and the
    # incrementals before it); [] for a full backup, None when unknown (no readable config.yaml).
    needs: list[str] | None = None
    # Stored files whose size differs from what their checksum files record, or that are gone.
    damaged_files: list[str] = field(default_factory=list)
    # Why its report or config.yaml could not be read (encrypted with a key not configured); None if it could.
    unreadable: str | None = None

    @property
    def reasons(self) -> list[str]:
        from sftp_plugin.catalog import SUCCESS

        found: list[str] = []
        if self.temporary_files:
            count = len(self.temporary_files)
            found.append(f"{count} leftover temporary file{'s' if count != 1 else ''} (an interrupted upload)")
        if not self.has_report:
            found.append("no coordinator report (gpbackup did not finish)")
        elif self.report_status != SUCCESS and self.unreadable is None:
            found.append(f"gpbackup reported it as {self.report_status or 'without a status'}")
        if self.config_status not in (None, SUCCESS):
            found.append(f"its config.yaml says {self.config_status}")
        found += self.damaged_files
        return found

    @property
    def complete(self) -> bool:
        return not self.reasons and self.unreadable is None

    @property
    def state(self) -> str:
        if self.unreadable is not None:
            return "unreadable: " + "; ".join([self.unreadable, *self.reasons])
        return "complete" if self.complete else "incomplete: " + "; ".join(self.reasons)

    def as_json(self) -> dict[str, object]:
        return {
            "timestamp": self.timestamp,
            "path": self.path,
            "files": self.files,
            "bytes": self.bytes,
            "age_seconds": self.age_seconds,
            "complete": self.complete,
            "state": self.state.partition(":")[0],
            "reasons": self.reasons if self.unreadable is None else [self.unreadable, *self.reasons],
            "temporary_files": self.temporary_files,
            "has_report": self.has_report,
            "report_status": self.report_status,
            "config_status": self.config_status,
            "database": self.database,
            "needs": self.needs,
            "damaged_files": self.damaged_files,
        }


def summarize(
    timestamp: str, path: str, entries: list[tuple[str, int]], now: datetime, entry: CatalogEntry | None = None
) -> BackupSummary:
    """One backup from its file listing (relative paths and sizes) and its catalog entry (report and config)."""
    from sftp_plugin import paths
    from sftp_plugin.catalog import report_name
    from sftp_plugin.integrity import is_checksum_file
    from sftp_plugin.retention import backup_time

    names = [posixpath.basename(name) for name, _ in entries]
    # Not the empty spare files a warm worker holds open for its next upload (paths.is_upload_leftover)
    temporary = sorted(posixpath.basename(name) for name, size in entries
                       if paths.is_upload_leftover(posixpath.basename(name), size))
    data_files = [name for name in names if not paths.is_temp_name(name) and not is_checksum_file(name)]
    # gpbackup timestamps are the coordinator's local time; a directory of 14 digits that are no time
    # (made by hand, or by a test) is listed all the same, of unknown age
    started = backup_time(paths.BackupDir(timestamp[:8], timestamp))
    return BackupSummary(
        timestamp=timestamp,
        path=path,
        files=len(data_files),
        bytes=sum(size for _, size in entries),
        age_seconds=None if started is None else int((now - started).total_seconds()),
        temporary_files=temporary,
        has_report=report_name(paths.BackupDir(timestamp[:8], timestamp)) in names,
        report_status=entry.report_status if entry is not None else None,
        config_status=entry.config_status if entry is not None else None,
        database=entry.database if entry is not None else None,
        needs=entry.needs if entry is not None else None,
    )


def _needs_column(needs: list[str] | None) -> str:
    if needs is None:
        return "?"
    return ",".join(needs) or "-"


def _print_table(host: str, root: str, backups: list[BackupSummary]) -> None:
    if not backups:
        print(f"No backups under {host}:{posixpath.join(root, 'backups')}")
        return
    rows = [("TIMESTAMP", "DATABASE", "FILES", "SIZE", "AGE", "NEEDS", "STATE")]
    rows += [
        (b.timestamp, b.database or "?", str(b.files), human_size(b.bytes),
         "?" if b.age_seconds is None else human_age(b.age_seconds), _needs_column(b.needs), b.state)
        for b in backups
    ]
    print_table(rows, right_aligned={2, 3, 4})  # files, size, age
    unreadable = sum(1 for b in backups if b.unreadable is not None)
    incomplete = sum(1 for b in backups if not b.complete) - unreadable
    total = sum(b.bytes for b in backups)
    print(
        f"\n{len(backups)} backup{'s' if len(backups) != 1 else ''}, {human_size(total)} on "
        f"{host}:{root}; {incomplete} incomplete" + (f", {unreadable} unreadable" if unreadable else "")
    )


def list_backups(argv: list[str]) -> int:
    """``list-backups <config> [--json]``: the backups on the host, their size, age and completeness."""
    parser = command_parser(
        "list-backups",
        "List the backups stored on the backup host: timestamp, database, files, total size, age, the "
        "backups an incremental one needs, and whether each is complete.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args

    def show(cfg: PluginConfig) -> int:
        summaries = _collect(cfg)
        if args.json:
            document = {
                "host": cfg.hostname,
                "remote_dir": cfg.remote_dir,
                "backups": [summary.as_json() for summary in summaries],
            }
            print(json.dumps(document, indent=2))
        else:
            _print_table(cfg.hostname, cfg.remote_dir, summaries)
        return 0

    return with_config("list-backups", args.config, show)


def _collect(cfg: PluginConfig) -> list[BackupSummary]:
    from sftp_plugin import catalog, transfer
    from sftp_plugin.store import Remote, remote_errors

    # Two attempts at most: enough for a dropped handshake, short enough for a person waiting.
    remote = Remote(replace(cfg, retries=min(cfg.retries, 2)))
    try:
        now = datetime.now()
        summaries: list[BackupSummary] = []
        for backup in catalog.list_backup_dirs(remote):
            path = backup.remote(cfg.remote_dir)
            try:
                with remote_errors(remote, "list backup", path):
                    entries = transfer.walk_files(remote.sftp, path)
            except RemoteNotFound:
                continue  # deleted (delete_backup, retention) since we listed the backups
            # The listing says which of report and config.yaml exist: no read of an absent one.
            unreadable = None
            try:
                entry: CatalogEntry | None = catalog.read_entry(
                    remote, backup, present={name for name, _ in entries})
            except KeyNotConfigured as err:  # listed as unreadable, with the key it needs; the others still are
                entry, unreadable = None, err.message
            summary = summarize(backup.timestamp, path, entries, now, entry)
            summary.unreadable = unreadable
            summary.damaged_files = _size_problems(remote, path, dict(entries))
            summaries.append(summary)
        return summaries
    finally:
        remote.close_quietly()


def _size_problems(remote: Remote, directory: str, sizes: dict[str, int]) -> list[str]:
    """Files that are gone though their checksum is stored, or whose size differs from the size their
    block digests record (files longer than one block); one header read per such file, no data read."""
    from sftp_plugin import blocks, transfer
    from sftp_plugin.integrity import missing_data_files

    found = [f"{name} is missing (its checksum is stored)" for name in missing_data_files(sizes)]
    for name in sorted(n for n in sizes if blocks.is_blocks_file(n)):
        data = name[: -len(blocks.BLOCKS_SUFFIX)]
        if data not in sizes:
            continue  # reported above, through its sidecar
        path = posixpath.join(directory, name)
        head = remote.retrying(
            "read block digests", lambda p=path: transfer.read_small(remote.sftp, p, blocks.HEADER_SIZE)
        )
        try:
            recorded = blocks.parse_header(head or b"").size
        except blocks.BlocksFormatError:
            found.append(f"{name} is damaged")
            continue
        if recorded != sizes[data]:
            found.append(f"{data} holds {sizes[data]} bytes, {recorded} were backed up")
    return found


# --------------------------------------------------------------------------- prune


def prune(argv: list[str]) -> int:
    """``prune <config> [--dry-run]``: retention on demand, the decision cleanup makes after each backup."""
    parser = command_parser(
        "prune",
        "Apply the config's keep_last and keep_days to the backups on the backup host now, as the "
        "cleanup at the end of every backup does: one KEEP or DELETE line per backup with the reasons, then "
        "the deleting.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the decisions only; delete nothing")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args

    def run(cfg: PluginConfig) -> int:
        if cfg.keep_last is None and cfg.keep_days is None:
            print(f"Neither keep_last nor keep_days is set in {args.config}: nothing is pruned.")
            return 0
        return _prune(cfg, args.dry_run)

    return with_config("prune", args.config, run)


def _prune(cfg: PluginConfig, dry_run: bool) -> int:
    from sftp_plugin import catalog, retention
    from sftp_plugin.log import mask
    from sftp_plugin.store import Remote, delete_backup_dir

    remote = Remote(replace(cfg, retries=min(cfg.retries, 2)))
    try:
        where = remote.where(posixpath.join(cfg.remote_dir, "backups"))
        entries = catalog.read_catalog(remote)
        if not entries:
            print(f"No backups under {where}: nothing to prune.")
            return 0
        decisions = retention.decide([e.facts() for e in entries], cfg.keep_last, cfg.keep_days, datetime.now())
        rules = ", ".join(f"{name}: {value}" for name, value in (("keep_last", cfg.keep_last),
                                                                 ("keep_days", cfg.keep_days)) if value is not None)
        print(f"{len(decisions)} backup{'s' if len(decisions) != 1 else ''} under {where}, {rules}:")
        width = max(len(d.database or "?") for d in decisions)
        for decision in decisions:
            print(f"{decision.action:<6}  {decision.backup.timestamp}  {decision.database or '?':<{width}}  "
                  f"{'; '.join(decision.reasons)}")
        doomed = [d for d in decisions if not d.keep]
        if dry_run:
            print(f"\nDry run: {len(doomed)} would be deleted; nothing was deleted.")
            return 0
        if not doomed:
            print("\nNothing to delete.")
            return 0
        print()
        failed = 0
        for decision in doomed:
            try:
                files = delete_backup_dir(remote, decision.backup, reason="prune: " + "; ".join(decision.reasons))
            except RemoteError as err:  # the server refused this one; the others may still go
                failed += 1
                log.error("prune could not delete backup %s: %s", decision.backup.timestamp, err)
                print(mask(f"FAILED to delete {decision.backup.timestamp}: {err}", cfg.secrets()))
                continue
            print(f"deleted {decision.backup.timestamp} ({files} file{'s' if files != 1 else ''})")
        if failed:
            return fail("prune", f"{failed} of {len(doomed)} backups could not be deleted (see above)", 1)
        print(f"\nDeleted {len(doomed)} of {len(decisions)} backups.")
        return 0
    finally:
        remote.close_quietly()


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyTally:
    """What verify found in one backup."""

    files: int = 0
    verified: int = 0
    bytes: int = 0
    problems: int = 0


def verify(argv: list[str]) -> int:
    """``verify <config> <timestamp> | --all``: re-read stored files over SFTP and check them against their digests."""
    parser = command_parser(
        "verify",
        "Re-read every file of a backup from the backup host and check its size and checksums, exactly "
        "as a restore would: one line per damaged, missing or unverifiable file, then a summary per backup. "
        "Exits 1 if anything is wrong.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("timestamp", nargs="?", help="the backup to verify (14 digits, as gprestore --timestamp)")
    which.add_argument("--all", action="store_true", help="verify every backup under remote_dir")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    timestamp = None if args.all else args.timestamp
    return with_config("verify", args.config, lambda cfg: _verify(replace(cfg, verify_checksums=True), timestamp))


def _verify(cfg: PluginConfig, timestamp: str | None) -> int:
    from sftp_plugin import catalog, paths
    from sftp_plugin.store import Remote

    remote = Remote(cfg)
    try:
        if timestamp is not None:
            backups = [paths.parse_timestamp(timestamp.strip("\"'"))]
        else:
            backups = catalog.list_backup_dirs(remote)
            if not backups:
                print(f"No backups under {remote.where(posixpath.join(cfg.remote_dir, paths.BACKUPS))}")
                return 0
        problems = 0
        for backup in backups:
            problems += _verify_backup(remote, backup)
        if len(backups) > 1:
            print(f"\n{len(backups)} backups verified: {'all good' if not problems else f'{problems} problems'}")
        return 1 if problems else 0
    finally:
        remote.close_quietly()


def _verify_backup(remote: Remote, backup: BackupDir) -> int:
    """Check every file of one backup; print a line per problem and a summary; return the problem count."""
    from sftp_plugin import paths, transfer
    from sftp_plugin.catalog import report_name
    from sftp_plugin.errors import IntegrityError, NotChecked, RemoteError
    from sftp_plugin.integrity import SIDECAR_SUFFIX, is_checksum_file, missing_data_files
    from sftp_plugin.store import read_stored, remote_errors

    directory = backup.remote(remote.cfg.remote_dir)
    try:
        with remote_errors(remote, "list backup", directory):
            entries = dict(remote.retrying("list backup", lambda: transfer.walk_files(remote.sftp, directory)))
    except RemoteNotFound:
        print(f"MISSING  backup {backup.timestamp}: {remote.where(directory)} does not exist")
        return 1
    tally = VerifyTally()

    def problem(kind: str, name: str, what: str) -> None:
        tally.problems += 1
        print(f"{kind:<8} {backup.timestamp}/{name}: {what}")

    data = sorted(n for n in entries if not paths.is_temp_name(posixpath.basename(n)) and not is_checksum_file(n))
    for name in missing_data_files(entries):
        problem("MISSING", name, "its checksum is stored, the file is not")
    if report_name(backup) not in entries:
        problem("MISSING", report_name(backup), "no coordinator report: gpbackup did not finish this backup")
    for name in data:
        tally.files += 1
        try:
            # Without a checksum file only a container can be checked: it authenticates its own chunks.
            read_stored(remote, posixpath.join(directory, name), lambda _data: None,
                        must_check=name + SIDECAR_SUFFIX not in entries)
        except NotChecked:
            problem("NOCHECK", name, "no checksum stored (verify_checksums was off, or the sidecar was removed)")
            continue
        except (IntegrityError, RemoteError) as err:
            problem("DAMAGED", name, err.message)
            continue
        tally.verified += 1
        tally.bytes += entries[name]
    for name in sorted(n for n, size in entries.items() if paths.is_upload_leftover(posixpath.basename(n), size)):
        print(f"{'NOTE':<8} {backup.timestamp}/{name}: an interrupted upload's leftover (cleanup removes it)")
    verdict = "OK" if not tally.problems else f"{tally.problems} problem{'s' if tally.problems != 1 else ''}"
    print(f"backup {backup.timestamp}: {verdict}; {tally.verified} of {tally.files} files verified "
          f"({human_size(tally.bytes)}) on {remote.where(directory)}")
    return tally.problems
