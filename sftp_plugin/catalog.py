"""The backup catalog: what gpbackup itself recorded about each stored backup.

At the end of every run gpbackup uploads two small files into the backup's
directory, ``gpbackup_<ts>_config.yaml`` and then ``gpbackup_<ts>_report``.
They say which database the run backed up, whether it succeeded, and (the
config's ``restoreplan``) which backups a restore of it reads data from: an
incremental backup names the full backup and every incremental before it.
Retention (cleanup's pruning and the ``prune`` command) and ``list-backups``
read them here, one small read each, and nowhere else.

Parsing is pure and defensive: the files are gpbackup's, of any version, and
may be missing (a backup still running or that failed early) or damaged. A
config that does not parse counts as unreadable, never as an error, and
retention treats an unreadable restore plan conservatively.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sftp_plugin import paths, retention, transfer
from sftp_plugin.store import Remote, read_small_stored, remote_errors

log = logging.getLogger(__name__)

SUCCESS = "Success"
# A report is a page of text; a config.yaml lists every table in its restore plan, so a
# cluster with a few hundred thousand tables makes one of tens of MiB. A file cut off at
# the limit does not parse and so counts as unreadable (the safe side).
REPORT_LIMIT = 1024 * 1024
CONFIG_LIMIT = 64 * 1024 * 1024

_REPORT_STATUS_RE = re.compile(r"^backup status:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
_REPORT_DATABASE_RE = re.compile(r"^database name:[ \t]*(\S.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


def report_name(backup: paths.BackupDir) -> str:
    """The coordinator's report file, uploaded by gpbackup at the end of every backup."""
    return f"gpbackup_{backup.timestamp}_report"


def config_name(backup: paths.BackupDir) -> str:
    """The coordinator's config.yaml, uploaded by gpbackup just before the report."""
    return f"gpbackup_{backup.timestamp}_config.yaml"


@dataclass(frozen=True)
class ReportFacts:
    """What a gpbackup report says: ``backup status:`` and ``database name:`` (None where absent)."""

    status: str | None
    database: str | None


def parse_report(text: str) -> ReportFacts:
    status = _REPORT_STATUS_RE.search(text)
    database = _REPORT_DATABASE_RE.search(text)
    return ReportFacts(status.group(1) if status else None, database.group(1) if database else None)


def report_status(text: str) -> str | None:
    """The status a gpbackup report gives ("Success", "Failure"), or None if it names none."""
    return parse_report(text).status


def report_succeeded(text: str) -> bool:
    """True if a gpbackup report says the backup succeeded."""
    return report_status(text) == SUCCESS


@dataclass(frozen=True)
class ConfigFacts:
    """What a gpbackup config.yaml says (yaml.v2 of gpbackup's BackupConfig: lowercase keys).

    ``restore_plan`` is the set of timestamps whose data files a restore of this
    backup reads (its own included), or None when the config gives none that can
    be trusted.
    """

    database: str | None
    status: str | None
    incremental: bool
    restore_plan: frozenset[str] | None


def parse_config(data: bytes, timestamp: str) -> ConfigFacts | None:
    """The facts of the config.yaml of the backup ``timestamp``; None if it does not parse as one."""
    import yaml

    # The C loader, where PyYAML has it, is the same safe loader, several times faster on a big plan.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        document = yaml.load(data, Loader=loader)
    except Exception:  # noqa: BLE001 - a damaged file of any kind (YAML, encoding, nesting) is unreadable
        return None
    if not isinstance(document, dict):
        return None
    incremental = document.get("incremental") is True
    return ConfigFacts(
        database=_text(document.get("databasename")),
        status=_text(document.get("status")),
        incremental=incremental,
        restore_plan=_restore_plan(document, timestamp, incremental),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _restore_plan(document: dict[Any, Any], timestamp: str, incremental: bool) -> frozenset[str] | None:
    plan = document.get("restoreplan")
    if plan is None:
        # gpbackup before incremental backups wrote no plan; a full backup reads only its own files.
        return None if incremental else frozenset({timestamp})
    if not isinstance(plan, list):
        return None
    needed: set[str] = set()
    for entry in plan:
        if not isinstance(entry, dict):
            return None
        value = entry.get("timestamp")
        if value is None or value == "":
            continue  # an empty entry names no backup (some gpbackup versions write zero-valued ones)
        named = str(value)
        if not paths.TIMESTAMP_RE.fullmatch(named):
            return None
        needed.add(named)
    # gpbackup ends every plan with the backup's own entry: a plan without it was cut short
    # (a damaged file that still parses) and may lack earlier backups too.
    return frozenset(needed) if timestamp in needed else None


@dataclass(frozen=True)
class CatalogEntry:
    """One stored backup as gpbackup recorded it.

    ``report`` is None when no report is stored; ``config`` is None when the
    config.yaml is missing (``has_config`` False) or does not parse.
    """

    backup: paths.BackupDir
    report: ReportFacts | None
    has_config: bool
    config: ConfigFacts | None

    @property
    def database(self) -> str | None:
        """The database backed up: config.yaml's ``databasename``, else the report's ``database name``."""
        if self.config is not None and self.config.database:
            return self.config.database
        return self.report.database if self.report is not None else None

    @property
    def report_status(self) -> str | None:
        return self.report.status if self.report is not None else None

    @property
    def config_status(self) -> str | None:
        return self.config.status if self.config is not None else None

    @property
    def succeeded(self) -> bool:
        """The report says Success and so does config.yaml, where it states a status at all."""
        return self.report_status == SUCCESS and self.config_status in (None, SUCCESS)

    @property
    def restore_plan(self) -> frozenset[str] | None:
        return self.config.restore_plan if self.config is not None else None

    @property
    def needs(self) -> list[str] | None:
        """The other backups a restore of this one reads, oldest first; None when unknown."""
        plan = self.restore_plan
        return None if plan is None else sorted(plan - {self.backup.timestamp})

    def facts(self) -> retention.BackupFacts:
        return retention.BackupFacts(self.backup, self.database, self.succeeded, self.restore_plan)


def list_backup_dirs(remote: Remote) -> list[paths.BackupDir]:
    """Every backup directory under remote_dir/backups, by name only, oldest first."""
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
        return sorted(found, key=lambda backup: backup.timestamp)

    with remote_errors(remote, "list backups", top):
        return remote.retrying("list backups", scan)


def _read(remote: Remote, path: str, limit: int, what: str) -> bytes | None:
    """A report or config.yaml as stored, plain or a container (decoded and authenticated)."""
    return read_small_stored(remote, path, limit, what)


def read_entry(remote: Remote, backup: paths.BackupDir, present: Collection[str] | None = None) -> CatalogEntry:
    """Read one backup's report and config.yaml. ``present``, the names already listed in its
    directory, saves the reads of files known to be absent."""
    directory = backup.remote(remote.cfg.remote_dir)
    report: ReportFacts | None = None
    if present is None or report_name(backup) in present:
        text = _read(remote, posixpath.join(directory, report_name(backup)), REPORT_LIMIT, "read backup report")
        report = None if text is None else parse_report(text.decode("utf-8", "replace"))
    data = None
    if present is None or config_name(backup) in present:
        data = _read(remote, posixpath.join(directory, config_name(backup)), CONFIG_LIMIT, "read backup config")
    config = None
    if data is not None and len(data) >= CONFIG_LIMIT:
        log.warning("backup %s: %s is larger than %d bytes; its restore plan is taken as unknown",
                    backup.timestamp, config_name(backup), CONFIG_LIMIT - 1)
    elif data is not None:
        config = parse_config(data, backup.timestamp)
        if config is None:
            log.warning("backup %s: %s does not parse; its restore plan is unknown", backup.timestamp,
                        config_name(backup))
    return CatalogEntry(backup, report, data is not None, config)


def read_catalog(remote: Remote, backups: list[paths.BackupDir] | None = None) -> list[CatalogEntry]:
    """The catalog entry of each backup (of every stored backup by default), oldest first."""
    listed = list_backup_dirs(remote) if backups is None else sorted(backups, key=lambda b: b.timestamp)
    return [read_entry(remote, backup) for backup in listed]
