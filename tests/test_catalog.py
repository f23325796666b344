"""Unit tests of catalog.py's parsing: what gpbackup's report and config.yaml say about a backup."""

from __future__ import annotations

import pytest

from sftp_plugin.catalog import (
    CatalogEntry,
    ReportFacts,
    config_name,
    parse_config,
    parse_report,
    report_name,
    report_succeeded,
)
from sftp_plugin.paths import BackupDir
from tests.helpers import gpbackup_config

FULL = "20260101010101"
FIRST = "20260102010101"
SECOND = "20260103010101"

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


def test_report_gives_its_database_and_status() -> None:
    assert parse_report(REPORT.format(status="Failure")) == ReportFacts("Failure", "prod")
    assert parse_report("database name:   my db  \nbackup status: Success\n") == ReportFacts("Success", "my db")
    assert parse_report("database name:\nbackup status:\n") == ReportFacts(None, None)


def test_file_names_are_the_coordinators() -> None:
    backup = BackupDir(FULL[:8], FULL)
    assert report_name(backup) == f"gpbackup_{FULL}_report"
    assert config_name(backup) == f"gpbackup_{FULL}_config.yaml"


def test_config_of_an_incremental_backup_gives_database_status_and_restore_plan() -> None:
    config = parse_config(gpbackup_config(SECOND, "sales", needs=(FULL, FIRST)).encode(), SECOND)
    assert config is not None
    assert (config.database, config.status, config.incremental) == ("sales", "Success", True)
    assert config.restore_plan == {FULL, FIRST, SECOND}


def test_config_of_a_full_backup_plans_only_itself() -> None:
    config = parse_config(gpbackup_config(FULL, "sales", status="Failure").encode(), FULL)
    assert config is not None and config.restore_plan == {FULL} and config.status == "Failure"
    assert not config.incremental


def test_config_without_a_plan_is_a_full_backup_of_older_gpbackup_unless_incremental() -> None:
    assert parse_config(b"databasename: sales\nincremental: false\n", FULL).restore_plan == {FULL}
    assert parse_config(b"databasename: sales\n", FULL).restore_plan == {FULL}
    incremental = parse_config(b"databasename: sales\nincremental: true\n", FIRST)
    assert incremental is not None and incremental.restore_plan is None


@pytest.mark.parametrize("data", [
    b"",
    b"databasename: [unclosed\n",
    b"- a list\n- not a map\n",
    b"\xff\xfe\x00garbage",
    b"databasename: sales\nrestoreplan: [\n",
])
def test_config_that_does_not_parse_as_one_is_unreadable(data: bytes) -> None:
    parsed = parse_config(data, SECOND)
    assert parsed is None or parsed.restore_plan is None


@pytest.mark.parametrize("plan", [
    "restoreplan: 7\n",
    "restoreplan:\n- just text\n",
    "restoreplan:\n- timestamp: yesterday\n",
    "restoreplan:\n- timestamp: \"2026010101\"\n",
])
def test_a_malformed_restore_plan_is_unknown_not_empty(plan: str) -> None:
    config = parse_config(f"databasename: sales\nincremental: true\n{plan}".encode(), SECOND)
    assert config is not None and config.database == "sales" and config.restore_plan is None


def test_empty_plan_entries_and_unquoted_timestamps_are_understood() -> None:
    text = (f'databasename: sales\nrestoreplan:\n- timestamp: ""\n  tablefqns: []\n- timestamp: {FULL}\n'
            f'- timestamp: "{SECOND}"\n  tablefqns: []\n')
    config = parse_config(text.encode(), SECOND)
    assert config is not None and config.restore_plan == {FULL, SECOND}


def test_a_plan_that_does_not_end_with_the_backup_itself_is_cut_short_so_unknown() -> None:
    whole = gpbackup_config(SECOND, "sales", needs=(FULL, FIRST))
    cut = whole[:whole.index(f'- timestamp: "{FIRST}"')]  # a damaged file that still parses
    config = parse_config(cut.encode(), SECOND)
    assert config is not None and config.database == "sales" and config.restore_plan is None


def entry(report: ReportFacts | None, config_text: str | None, timestamp: str = SECOND) -> CatalogEntry:
    config = None if config_text is None else parse_config(config_text.encode(), timestamp)
    return CatalogEntry(BackupDir(timestamp[:8], timestamp), report, config_text is not None, config)


def test_entry_takes_the_database_from_config_then_from_the_report() -> None:
    assert entry(ReportFacts("Success", "from_report"), gpbackup_config(SECOND, "sales")).database == "sales"
    assert entry(ReportFacts("Success", "from_report"), "not: [yaml").database == "from_report"
    assert entry(ReportFacts("Success", "from_report"), None).database == "from_report"
    assert entry(None, None).database is None


def test_entry_says_what_an_incremental_backup_needs() -> None:
    incremental = entry(ReportFacts("Success", "sales"), gpbackup_config(SECOND, "sales", needs=(FULL, FIRST)))
    assert incremental.needs == [FULL, FIRST]
    assert entry(ReportFacts("Success", "sales"), gpbackup_config(SECOND, "sales")).needs == []
    assert entry(ReportFacts("Success", "sales"), None).needs is None


def test_entry_facts_carry_what_retention_needs() -> None:
    facts = entry(ReportFacts("Success", "sales"), gpbackup_config(SECOND, "sales", needs=(FULL,))).facts()
    assert (facts.database, facts.succeeded, facts.restore_plan) == ("sales", True, {FULL, SECOND})
    unreadable = entry(ReportFacts("Success", "sales"), "{{{").facts()
    assert unreadable.succeeded and unreadable.restore_plan is None
