"""Which old backups to prune: a pure decision, separate from the deleting.

A backup is kept if *any* set rule keeps it, so adding a rule never deletes
more:
- ``keep_last N`` keeps the N newest *successful* backups (gpbackup's report
  says "backup status: Success"), and every backup newer than the oldest of
  them, since a newer unfinished one may still be running;
- ``keep_days D`` keeps every backup younger than D days; a timestamp that is
  not a real date is never judged old.
The backup being cleaned up is always kept. Callers prune only after a
successful backup, so a failing backup can never delete the last good one.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from sftp_plugin.paths import BackupDir

_STATUS_RE = re.compile(r"^backup status:\s*(\S+)", re.IGNORECASE | re.MULTILINE)
SUCCESS = "Success"


def report_name(backup: BackupDir) -> str:
    """The coordinator's report file, uploaded by gpbackup at the end of every backup."""
    return f"gpbackup_{backup.timestamp}_report"


def report_status(text: str) -> str | None:
    """The status a gpbackup report gives ("Success", "Failure"), or None if it names none."""
    match = _STATUS_RE.search(text)
    return match.group(1) if match else None


def report_succeeded(text: str) -> bool:
    """True if a gpbackup report says the backup succeeded."""
    return report_status(text) == SUCCESS


def backup_time(backup: BackupDir) -> datetime | None:
    try:
        return datetime.strptime(backup.timestamp, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def select_for_pruning(
    backups: list[BackupDir],
    succeeded: set[BackupDir],
    current: BackupDir,
    keep_last: int | None,
    keep_days: int | None,
    now: datetime,
) -> list[BackupDir]:
    """The backups to delete, oldest first. No rule set means nothing is deleted."""
    if keep_last is None and keep_days is None:
        return []
    newest_first = sorted(set(backups) | {current}, key=lambda b: b.timestamp, reverse=True)
    kept: set[BackupDir] = {current}
    if keep_last is not None:
        good = [b for b in newest_first if b in succeeded][:keep_last]
        if len(good) < keep_last:
            kept.update(newest_first)  # fewer good backups than asked for: delete nothing
        else:
            kept.update(b for b in newest_first if b.timestamp >= good[-1].timestamp)
    if keep_days is not None:
        cutoff = now - timedelta(days=keep_days)
        for backup in newest_first:
            taken = backup_time(backup)
            if taken is None or taken >= cutoff:
                kept.add(backup)
    return [b for b in reversed(newest_first) if b not in kept]
