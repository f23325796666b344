"""Which old backups to prune: a pure decision, separate from the deleting.

A backup is kept if *any* set rule keeps it (``keep_last``: among the N
newest; ``keep_days``: younger than D days), so adding a rule never deletes
more. The backup in progress is always kept, and a timestamp that is not a
real date is never judged old by ``keep_days``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sftp_plugin.paths import BackupDir


def backup_time(backup: BackupDir) -> datetime | None:
    try:
        return datetime.strptime(backup.timestamp, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def select_for_pruning(backups: list[BackupDir], current: BackupDir, keep_last: int | None,
                       keep_days: int | None, now: datetime) -> list[BackupDir]:
    """The backups to delete, oldest first. No rule set means nothing is deleted."""
    if keep_last is None and keep_days is None:
        return []
    newest_first = sorted(set(backups) | {current}, key=lambda b: b.timestamp, reverse=True)
    kept: set[BackupDir] = {current}
    if keep_last is not None:
        kept.update(newest_first[:keep_last])
    if keep_days is not None:
        cutoff = now - timedelta(days=keep_days)
        for backup in newest_first:
            taken = backup_time(backup)
            if taken is None or taken >= cutoff:
                kept.add(backup)
    return [b for b in reversed(newest_first) if b not in kept]
