"""Unit tests of retention.py: which old backups cleanup may prune, and how a report is judged."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from sftp_plugin.paths import BackupDir
from sftp_plugin.retention import report_name, report_succeeded, select_for_pruning

NOW = datetime(2026, 11, 24, 12, 0, 0)


def at(moment: datetime) -> BackupDir:
    ts = moment.strftime("%Y%m%d%H%M%S")
    return BackupDir(ts[:8], ts)


def days_ago(days: float) -> BackupDir:
    return at(NOW - timedelta(days=days))


def raw(ts: str) -> BackupDir:
    return BackupDir(ts[:8], ts)


def timestamps(backups: list[BackupDir]) -> list[str]:
    return [b.timestamp for b in backups]


CURRENT = at(NOW)
OLD = [days_ago(d) for d in (1, 2, 3, 10, 40)]  # newest first
ALL_GOOD = {CURRENT, *OLD}


def prune(backups: list[BackupDir], keep_last: int | None, keep_days: int | None,
          succeeded: set[BackupDir] | None = None, current: BackupDir = CURRENT) -> list[BackupDir]:
    good = ALL_GOOD | {current} | set(backups) if succeeded is None else succeeded
    return select_for_pruning(backups, good, current, keep_last, keep_days, NOW)


def test_no_rule_prunes_nothing() -> None:
    assert prune(OLD, None, None) == []


def test_keep_last_keeps_the_newest_n_including_current() -> None:
    # current + the two newest old ones are kept; the rest go, oldest first.
    assert timestamps(prune(OLD, keep_last=3, keep_days=None)) == timestamps([OLD[4], OLD[3], OLD[2]])


def test_keep_last_one_keeps_only_current() -> None:
    assert set(prune(OLD, keep_last=1, keep_days=None)) == set(OLD)


def test_keep_last_larger_than_count_prunes_nothing() -> None:
    assert prune(OLD, keep_last=50, keep_days=None) == []


def test_keep_last_counts_only_successful_backups() -> None:
    failed = {OLD[0], OLD[2]}
    doomed = prune(OLD, keep_last=3, keep_days=None, succeeded=ALL_GOOD - failed)
    # The three newest good ones are current, OLD[1], OLD[3]; OLD[0] and OLD[2] are newer than OLD[3] and stay.
    assert timestamps(doomed) == timestamps([OLD[4]])


def test_keep_last_with_fewer_successful_backups_than_asked_prunes_nothing() -> None:
    assert prune(OLD, keep_last=3, keep_days=None, succeeded={CURRENT, OLD[4]}) == []


def test_keep_days_prunes_only_backups_older_than_the_cutoff() -> None:
    assert timestamps(prune(OLD, keep_last=None, keep_days=5)) == timestamps([OLD[4], OLD[3]])


def test_keep_days_prunes_failed_backups_too() -> None:
    doomed = prune(OLD, keep_last=None, keep_days=5, succeeded={CURRENT})
    assert timestamps(doomed) == timestamps([OLD[4], OLD[3]])


def test_both_rules_keep_what_either_rule_keeps() -> None:
    # keep_last=4 alone keeps current + 1,2,3 days; keep_days=15 alone keeps up to 10 days.
    assert timestamps(prune(OLD, keep_last=4, keep_days=15)) == timestamps([OLD[4]])
    # keep_last=2 alone would prune 2,3,10,40 days; keep_days=5 keeps 2 and 3 days.
    assert timestamps(prune(OLD, keep_last=2, keep_days=5)) == timestamps([OLD[4], OLD[3]])


def test_adding_a_rule_never_prunes_more() -> None:
    only_last = set(prune(OLD, 2, None))
    only_days = set(prune(OLD, None, 5))
    both = set(prune(OLD, 2, 5))
    assert both <= only_last and both <= only_days


@pytest.mark.parametrize(("keep_last", "keep_days"), [(1, None), (None, 1), (1, 1)])
def test_current_backup_is_never_pruned_even_when_older_than_all(keep_last: int | None,
                                                                 keep_days: int | None) -> None:
    current = days_ago(100)  # a clock far behind, or a re-run of an old timestamp
    newer = [days_ago(d) for d in (0.5, 1.5, 2.5)]
    assert current not in prune(newer, keep_last, keep_days, current=current)


def test_current_backup_listed_among_the_old_ones_is_kept() -> None:
    current = OLD[4]
    doomed = prune(OLD, keep_last=1, keep_days=1, current=current)
    assert current not in doomed
    assert OLD[2] in doomed and OLD[3] in doomed


@pytest.mark.parametrize("ts", ["20261399000000", "20260230120000", "20260101256161", "00000000000000"])
def test_timestamp_that_is_not_a_real_date_is_never_pruned_by_keep_days(ts: str) -> None:
    odd = raw(ts)
    doomed = prune([odd, *OLD], keep_last=None, keep_days=1)
    assert odd not in doomed
    assert OLD[4] in doomed, "the rule must still prune real old backups"


def test_result_is_oldest_first() -> None:
    doomed = prune(list(reversed(OLD)), keep_last=1, keep_days=None)
    assert timestamps(doomed) == sorted(timestamps(doomed))


def test_duplicates_in_the_listing_are_pruned_once() -> None:
    assert prune([OLD[4], OLD[4]], keep_last=1, keep_days=None) == [OLD[4]]


REPORT = """Greenplum Database Backup Report

timestamp key:         20261124093000
gpdb version:          6.26.0 build commit:abc
gpbackup version:      1.30.5

database name:         prod
command line:          gpbackup --dbname prod --plugin-config /home/gpadmin/sftp.yaml
compression:           gzip
plugin executable:     /usr/local/gpbackup_sftp_plugin/bin/gpbackup_sftp_plugin
backup section:        All Sections
object filtering:      None
includes statistics:   No
data file format:      Multiple Data Files Per Segment
incremental:           False

start time:            Tue Nov 24 2026 09:30:00
end time:              Tue Nov 24 2026 09:41:12
duration:              0:11:12

backup status:         {status}
"""


def test_report_with_status_success_counts_as_successful() -> None:
    assert report_succeeded(REPORT.format(status="Success"))


@pytest.mark.parametrize("text", [REPORT.format(status="Failure"), "", "backup status:", "Success",
                                  REPORT.replace("backup status:         {status}\n", "")])
def test_report_without_success_status_does_not_count(text: str) -> None:
    assert not report_succeeded(text)


def test_report_name_is_the_coordinators_report_file() -> None:
    assert report_name(raw("20261124093000")) == "gpbackup_20261124093000_report"
