"""Which old backups to prune: a pure decision, separate from the reading (catalog.py) and the deleting.

gpbackup backs up one database per run, and restoring an incremental backup
reads data files of earlier backups of the same database. So the inputs are
per-backup facts: its database, whether it succeeded (its report and its
config.yaml both say Success), and its restore plan: the timestamps of every
backup whose data a restore of it reads, or None when that is unknown
(config.yaml missing or unparsable). The output is a decision per backup,
KEEP or DELETE, with the reasons.

A backup is kept if *any* set rule keeps it, so adding a rule never deletes
more:
- ``keep_last N`` counts per database: in each database it keeps the N
  newest *successful* backups and every backup newer than the oldest of them
  (a newer unfinished one may still be running). A database with fewer than
  N successful backups loses nothing, and a backup whose database is unknown
  (no readable config.yaml or report, as while gpbackup still runs) is never
  deleted by ``keep_last``;
- ``keep_days D`` keeps every backup younger than D days, whatever its
  database; a timestamp that is not a real date is never judged old.
The backup being cleaned up is always kept. Callers prune only after a
successful backup, so a failing backup can never delete the last good one.

Then, whichever rule kept it, a kept backup keeps every backup its restore
plan names, and those keep what theirs name, and so on: an incremental
backup cannot be restored without its full backup and the incrementals
between. When a kept *successful* backup's restore plan cannot be read, what
it needs is unknown, so every older backup of its database is kept, and every
older backup whose database is unknown; if its own database is unknown too,
every older backup at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sftp_plugin.paths import BackupDir

KEEP = "KEEP"
DELETE = "DELETE"


@dataclass(frozen=True)
class BackupFacts:
    """What retention needs to know of one stored backup."""

    backup: BackupDir
    database: str | None = None  # None: unknown
    succeeded: bool = False
    restore_plan: frozenset[str] | None = None  # timestamps a restore reads, its own included; None: unknown

    @property
    def timestamp(self) -> str:
        return self.backup.timestamp


@dataclass
class Decision:
    """KEEP (``keep``) or DELETE for one backup, with why: every reason it is kept, or, when it
    is not, why each set rule let it go."""

    backup: BackupDir
    database: str | None
    keep: bool
    reasons: list[str]

    @property
    def action(self) -> str:
        return KEEP if self.keep else DELETE


def backup_time(backup: BackupDir) -> datetime | None:
    try:
        return datetime.strptime(backup.timestamp, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def decide(
    backups: Iterable[BackupFacts],
    keep_last: int | None,
    keep_days: int | None,
    now: datetime,
    current: BackupDir | None = None,
) -> list[Decision]:
    """A decision for each backup, oldest first. No rule set keeps everything.

    ``current`` is the backup being cleaned up (None for a prune on demand): always kept.
    """
    unique: dict[BackupDir, BackupFacts] = {}
    for facts in backups:
        unique.setdefault(facts.backup, facts)  # a backup listed twice is decided once
    oldest_first = sorted(unique.values(), key=lambda facts: facts.timestamp)
    if keep_last is None and keep_days is None:
        return [Decision(f.backup, f.database, True, ["neither keep_last nor keep_days is set"]) for f in oldest_first]
    kept_because: dict[BackupDir, list[str]] = {f.backup: [] for f in oldest_first}
    let_go_because: dict[BackupDir, list[str]] = {f.backup: [] for f in oldest_first}
    if current in kept_because:
        kept_because[current].append("the backup just taken")
    if keep_last is not None:
        _apply_keep_last(oldest_first, keep_last, kept_because, let_go_because)
    if keep_days is not None:
        _apply_keep_days(oldest_first, keep_days, now, kept_because, let_go_because)
    _keep_what_kept_backups_need(oldest_first, kept_because)
    return [
        Decision(f.backup, f.database, bool(kept_because[f.backup]), kept_because[f.backup] or let_go_because[f.backup])
        for f in oldest_first
    ]


def _apply_keep_last(
    oldest_first: list[BackupFacts],
    keep_last: int,
    kept_because: dict[BackupDir, list[str]],
    let_go_because: dict[BackupDir, list[str]],
) -> None:
    newest_first_by_database: dict[str | None, list[BackupFacts]] = {}
    for facts in reversed(oldest_first):
        newest_first_by_database.setdefault(facts.database, []).append(facts)
    for database, newest_first in newest_first_by_database.items():
        if database is None:
            for facts in newest_first:
                kept_because[facts.backup].append("database unknown")
            continue
        good = [facts for facts in newest_first if facts.succeeded][:keep_last]
        if len(good) < keep_last:
            # Fewer good backups than asked for: deleting any could cost the only restorable one.
            reason = f"only {len(good)} successful backup{'' if len(good) == 1 else 's'} of {database}"
            for facts in newest_first:
                kept_because[facts.backup].append(f"{reason}, keep_last is {keep_last}")
            continue
        oldest_good = good[-1].timestamp
        for facts in newest_first:
            if facts in good:
                kept_because[facts.backup].append(f"newest {keep_last} of {database}")
            elif facts.timestamp >= oldest_good:
                kept_because[facts.backup].append(f"newer than the oldest kept backup of {database}")
            else:
                let_go_because[facts.backup].append(f"older than the newest {keep_last} of {database}")


def _apply_keep_days(
    oldest_first: list[BackupFacts],
    keep_days: int,
    now: datetime,
    kept_because: dict[BackupDir, list[str]],
    let_go_because: dict[BackupDir, list[str]],
) -> None:
    cutoff = now - timedelta(days=keep_days)
    for facts in oldest_first:
        taken = backup_time(facts.backup)
        if taken is None:
            kept_because[facts.backup].append("timestamp is not a date")
        elif taken >= cutoff:
            kept_because[facts.backup].append(f"younger than {keep_days} days")
        else:
            let_go_because[facts.backup].append(f"older than {keep_days} days")


def _keep_what_kept_backups_need(oldest_first: list[BackupFacts], kept_because: dict[BackupDir, list[str]]) -> None:
    """Keep what every kept backup's restore plan names, transitively (see the module docstring)."""
    by_timestamp = {facts.timestamp: facts for facts in oldest_first}
    pending = [facts for facts in oldest_first if kept_because[facts.backup]]
    examined: set[BackupDir] = set()
    while pending:
        needer = pending.pop()
        if needer.backup in examined:
            continue
        examined.add(needer.backup)
        if needer.restore_plan is not None:
            # A plan may name backups no longer stored: nothing to keep for those.
            named = sorted(needer.restore_plan - {needer.timestamp})
            needed = [by_timestamp[timestamp] for timestamp in named if timestamp in by_timestamp]
            reason = f"needed by {needer.timestamp}"
        elif needer.succeeded:
            needed = [
                facts
                for facts in oldest_first
                if facts.timestamp < needer.timestamp
                and (needer.database is None or facts.database in (needer.database, None))
            ]
            reason = f"restore plan unreadable: {needer.timestamp} may need it"
        else:
            continue  # a failed or unfinished backup is no restore to protect
        for facts in needed:
            kept_because[facts.backup].append(reason)
            pending.append(facts)
