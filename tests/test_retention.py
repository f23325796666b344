"""Unit tests of retention.py: which old backups cleanup and `prune` may delete, and why."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from sftp_plugin.catalog import CatalogEntry, ConfigFacts, ReportFacts
from sftp_plugin.paths import BackupDir
from sftp_plugin.retention import BackupFacts, Decision, decide

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


def full(backup: BackupDir, database: str | None = "prod", succeeded: bool = True) -> BackupFacts:
    """A full backup: its restore plan names only itself."""
    return BackupFacts(backup, database, succeeded, frozenset({backup.timestamp}))


def prune(backups: list[BackupDir], keep_last: int | None, keep_days: int | None,
          succeeded: set[BackupDir] | None = None, current: BackupDir = CURRENT) -> list[BackupDir]:
    """The backups deleted when all are full backups of one database, oldest first."""
    good = ALL_GOOD | {current} | set(backups) if succeeded is None else succeeded
    facts = [full(b, succeeded=b in good) for b in [*backups, current]]
    return [d.backup for d in decide(facts, keep_last, keep_days, NOW, current) if not d.keep]


def decisions(facts: list[BackupFacts], keep_last: int | None, keep_days: int | None,
              current: BackupDir | None = None) -> dict[str, Decision]:
    return {d.backup.timestamp: d for d in decide(facts, keep_last, keep_days, NOW, current)}


def deleted(facts: list[BackupFacts], keep_last: int | None, keep_days: int | None,
            current: BackupDir | None = None) -> set[str]:
    return {ts for ts, d in decisions(facts, keep_last, keep_days, current).items() if not d.keep}


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


# ---------------------------------------------------------------- databases, restore plans, what counts as success


def day(number: int) -> BackupDir:
    """A backup taken on day ``number`` of November 2026 (NOW is the 24th)."""
    return at(datetime(2026, 11, number, 3, 0, 0))


def incremental(backup: BackupDir, database: str, needs: list[BackupDir], succeeded: bool = True) -> BackupFacts:
    """An incremental backup: its restore plan names the backups it reads, and itself."""
    return BackupFacts(backup, database, succeeded, frozenset({backup.timestamp, *(b.timestamp for b in needs)}))


def test_keep_last_counts_per_database_so_hr_never_costs_sales_its_only_backup() -> None:
    sales, hr_old, hr_now = day(1), day(2), day(3)
    facts = [full(sales, "sales"), full(hr_old, "hr"), full(hr_now, "hr")]
    result = decisions(facts, keep_last=1, keep_days=None, current=hr_now)
    assert {ts for ts, d in result.items() if not d.keep} == {hr_old.timestamp}
    assert "newest 1 of sales" in result[sales.timestamp].reasons
    assert result[hr_old.timestamp].reasons == ["older than the newest 1 of hr"]


def test_keep_last_keeps_the_newest_n_of_each_database() -> None:
    sales = [day(1), day(3), day(5)]
    hr = [day(2), day(4)]
    facts = [*(full(b, "sales") for b in sales), *(full(b, "hr") for b in hr)]
    assert deleted(facts, keep_last=2, keep_days=None) == {sales[0].timestamp}
    assert deleted(facts, keep_last=1, keep_days=None) == {sales[0].timestamp, sales[1].timestamp, hr[0].timestamp}


def test_a_database_with_fewer_successful_backups_than_keep_last_loses_nothing() -> None:
    facts = [full(day(1), "hr"), full(day(2), "hr", succeeded=False), full(day(3), "sales"), full(day(4), "sales"),
             full(day(5), "sales")]
    result = decisions(facts, keep_last=2, keep_days=None)
    assert {ts for ts, d in result.items() if not d.keep} == {day(3).timestamp}
    assert "only 1 successful backup of hr, keep_last is 2" in result[day(1).timestamp].reasons


def test_a_backup_newer_than_the_oldest_kept_good_one_of_its_database_is_kept() -> None:
    # day 3 failed (or is still running); other databases' backups do not move the line.
    facts = [full(day(1), "sales"), full(day(2), "sales"), full(day(3), "sales", succeeded=False),
             full(day(4), "sales"), full(day(5), "hr"), full(day(6), "hr")]
    result = decisions(facts, keep_last=2, keep_days=None)
    assert {ts for ts, d in result.items() if not d.keep} == {day(1).timestamp}
    assert result[day(3).timestamp].reasons == ["newer than the oldest kept backup of sales"]


def test_a_backup_of_unknown_database_is_never_deleted_by_keep_last_but_keep_days_may() -> None:
    unknown = BackupFacts(day(1), None, False, None)  # e.g. no report and no config.yaml
    facts = [unknown, full(day(2), "sales"), full(day(3), "sales")]
    result = decisions(facts, keep_last=1, keep_days=None)
    assert result[unknown.timestamp].keep and result[unknown.timestamp].reasons == ["database unknown"]
    assert not result[day(2).timestamp].keep
    young = full(day(23), "sales")
    assert deleted([*facts, young], keep_last=None, keep_days=7) == {b.timestamp for b in (day(1), day(2), day(3))}


def test_keep_days_does_not_look_at_the_database() -> None:
    facts = [full(day(1), "sales"), full(day(2), "hr"), full(day(20), "sales"), full(day(21), "hr")]
    assert deleted(facts, keep_last=None, keep_days=7) == {day(1).timestamp, day(2).timestamp}


def test_the_restore_plan_of_the_newest_incremental_keeps_its_full_backup_and_earlier_incrementals() -> None:
    older_full, base = day(1), day(2)
    first, second = day(3), day(4)
    facts = [full(older_full, "sales"), full(base, "sales"), incremental(first, "sales", [base]),
             incremental(second, "sales", [base, first])]
    result = decisions(facts, keep_last=1, keep_days=None, current=second)
    assert {ts for ts, d in result.items() if not d.keep} == {older_full.timestamp}
    assert f"needed by {second.timestamp}" in result[base.timestamp].reasons
    assert result[first.timestamp].reasons == [f"needed by {second.timestamp}"]


def test_what_a_kept_backup_needs_is_kept_transitively() -> None:
    # gpbackup's plans already list the whole chain; a plan naming only its predecessor must work too.
    a, b, c, d = day(1), day(2), day(3), day(4)
    facts = [full(a, "sales"), incremental(b, "sales", [a]), incremental(c, "sales", [b]), full(day(10), "hr"),
             incremental(d, "sales", [c])]
    result = decisions(facts, keep_last=1, keep_days=None)
    assert all(decision.keep for decision in result.values())
    assert result[a.timestamp].reasons == [f"needed by {b.timestamp}"]


def test_a_restore_plan_outweighs_keep_days_too() -> None:
    base, young = day(1), day(23)
    facts = [full(base, "sales"), incremental(young, "sales", [base])]
    result = decisions(facts, keep_last=None, keep_days=7)
    assert result[base.timestamp].keep
    assert result[base.timestamp].reasons == [f"needed by {young.timestamp}"]


def test_a_deleted_backup_protects_nothing_it_names() -> None:
    base, first, second, newer_full = day(1), day(2), day(3), day(10)
    facts = [full(base, "sales"), incremental(first, "sales", [base]), incremental(second, "sales", [base, first]),
             full(newer_full, "sales")]
    assert deleted(facts, keep_last=1, keep_days=None) == {base.timestamp, first.timestamp, second.timestamp}


def test_a_plan_naming_a_backup_no_longer_stored_is_harmless() -> None:
    gone = day(1)
    facts = [incremental(day(2), "sales", [gone]), full(day(3), "sales")]
    assert deleted(facts, keep_last=1, keep_days=None) == {day(2).timestamp}


def test_an_unreadable_plan_of_a_kept_successful_backup_keeps_every_older_backup_of_its_database() -> None:
    unreadable = BackupFacts(day(5), "sales", True, None)  # e.g. its config.yaml does not parse
    unknown = BackupFacts(day(3), None, False, None)
    facts = [full(day(1), "sales"), full(day(2), "hr"), unknown, full(day(4), "hr"), unreadable]
    result = decisions(facts, keep_last=1, keep_days=None)
    assert {ts for ts, d in result.items() if not d.keep} == {day(2).timestamp}, "hr is pruned as usual"
    assert result[day(1).timestamp].reasons == [f"restore plan unreadable: {day(5).timestamp} may need it"]
    # keep_days alone: the unknown-database backup, which could be part of sales's chain, is kept too.
    result = decisions(facts, keep_last=None, keep_days=1)
    assert not result[day(1).timestamp].keep and not result[day(3).timestamp].keep
    young = BackupFacts(day(24), "sales", True, None)
    result = decisions([*facts, young], keep_last=None, keep_days=1)
    assert {ts for ts, d in result.items() if not d.keep} == {day(2).timestamp, day(4).timestamp}


def test_an_unreadable_plan_of_a_backup_of_unknown_database_keeps_every_older_backup() -> None:
    mystery = BackupFacts(day(23), None, True, None)  # a report that says Success, and nothing else readable
    facts = [full(day(1), "sales"), full(day(2), "hr"), mystery, full(day(24), "sales")]
    assert deleted(facts, keep_last=None, keep_days=7) == set()


def test_an_unreadable_plan_of_a_failed_backup_protects_nothing() -> None:
    failed = BackupFacts(day(5), "sales", False, None)  # failed before gpbackup wrote its config.yaml
    facts = [full(day(1), "sales"), full(day(2), "sales"), failed]
    result = decisions(facts, keep_last=1, keep_days=None)
    assert {ts for ts, d in result.items() if not d.keep} == {day(1).timestamp}
    assert result[failed.timestamp].reasons == ["newer than the oldest kept backup of sales"]


def entry(backup: BackupDir, report_status: str | None, config_status: str | None, database: str = "sales",
          config: bool = True) -> CatalogEntry:
    report = None if report_status is None else ReportFacts(report_status, database)
    config_facts = ConfigFacts(database, config_status, False, frozenset({backup.timestamp})) if config else None
    return CatalogEntry(backup, report, config, config_facts)


@pytest.mark.parametrize(("report_status", "config_status", "succeeded"), [
    ("Success", "Success", True),
    ("Success", None, True),  # a config.yaml without a status (older gpbackup): the report decides
    ("Success", "Failure", False),
    ("Success", "In Progress", False),
    ("Failure", "Success", False),
    (None, "Success", False),
])
def test_a_backup_succeeded_only_if_its_report_and_its_config_say_so(report_status: str | None,
                                                                      config_status: str | None,
                                                                      succeeded: bool) -> None:
    assert entry(day(1), report_status, config_status).succeeded is succeeded


def test_a_config_saying_failure_under_a_success_report_does_not_count_for_keep_last() -> None:
    old, good, contradicted = day(1), day(2), day(3)
    facts = [entry(old, "Success", "Success").facts(), entry(good, "Success", "Success").facts(),
             entry(contradicted, "Success", "Failure").facts()]
    result = decisions(facts, keep_last=1, keep_days=None)
    # Counted as good, the contradicted backup would have cost `good`, the newest restorable one.
    assert {ts for ts, d in result.items() if not d.keep} == {old.timestamp}
    assert result[good.timestamp].reasons == ["newest 1 of sales"]


def test_no_rule_keeps_everything() -> None:
    facts = [full(day(1), "sales"), BackupFacts(day(2))]
    assert all(d.keep and d.reasons for d in decide(facts, None, None, NOW))


def test_every_decision_says_why() -> None:
    facts = [full(day(1), "sales"), full(day(20), "sales"), full(day(22), "sales")]
    result = decisions(facts, keep_last=2, keep_days=3, current=day(22))
    assert result[day(1).timestamp].action == "DELETE"
    assert result[day(1).timestamp].reasons == ["older than the newest 2 of sales", "older than 3 days"]
    assert result[day(20).timestamp].reasons == ["newest 2 of sales"]
    assert result[day(22).timestamp].reasons == ["the backup just taken", "newest 2 of sales", "younger than 3 days"]
    assert result[day(22).timestamp].action == "KEEP"


def random_history(rng: random.Random) -> list[BackupFacts]:
    """Backups of two databases (and some of unknown database) over 30 days, with incremental chains."""
    facts: list[BackupFacts] = []
    chain: dict[str, list[BackupDir]] = {"sales": [], "hr": []}
    for index in range(rng.randrange(1, 14)):
        backup = at(NOW - timedelta(days=30 - 2 * index, hours=rng.randrange(24)))
        database = rng.choice(["sales", "hr", "sales", "hr", None])
        succeeded = rng.random() < 0.8
        if database is None:
            facts.append(BackupFacts(backup, None, succeeded and rng.random() < 0.3, None))
        elif rng.random() < 0.1:
            facts.append(BackupFacts(backup, database, succeeded, None))
        elif chain[database] and rng.random() < 0.6:
            facts.append(incremental(backup, database, chain[database], succeeded))
        else:
            facts.append(full(backup, database, succeeded))
        if succeeded and database is not None:
            chain[database] = [*chain[database], backup] if rng.random() < 0.6 else [backup]
    return facts


@pytest.mark.parametrize("seed", range(200))
def test_invariants_hold_on_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    facts = random_history(rng)
    keep_last, keep_days = rng.randrange(1, 4), rng.randrange(1, 10)
    current = rng.choice(facts).backup
    only_last = deleted(facts, keep_last, None, current)
    only_days = deleted(facts, None, keep_days, current)
    both = decisions(facts, keep_last, keep_days, current)
    doomed = {ts for ts, d in both.items() if not d.keep}
    assert doomed <= only_last and doomed <= only_days, "adding a rule must never delete more"
    assert current.timestamp not in doomed
    by_ts = {f.timestamp: f for f in facts}
    for kept in (f for f in facts if f.timestamp not in doomed):
        assert not (kept.restore_plan or set()) & doomed, f"{kept.timestamp} needs a deleted backup"
        if kept.succeeded and kept.restore_plan is None:
            assert not {ts for ts in doomed if ts < kept.timestamp
                        and (kept.database is None or by_ts[ts].database in (kept.database, None))}
    for database in ("sales", "hr"):
        good = sorted((f.timestamp for f in facts if f.database == database and f.succeeded), reverse=True)
        assert not set(good[:keep_last]) & only_last, f"keep_last must keep the newest {keep_last} of {database}"
        if len(good) < keep_last:
            assert not {f.timestamp for f in facts if f.database == database} & only_last
    assert not {f.timestamp for f in facts if f.database is None} & only_last
