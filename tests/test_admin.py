"""`check`, `list-backups` and `prune`: the administrator's commands, run as the installed console script against a
real sshd."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devtools.gpbackup import make_local_backup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig
from devtools.sshd import SshServer, free_port, keygen
from tests.helpers import gpbackup_files, session_plugin, sshd_fixture, undeletable, upload_leftovers

ALL_CHECKS = (
    "config",
    "secrets",
    "log_dir",
    "connect",
    "host key",
    "auth",
    "cipher",
    "remote_dir",
    "privacy",
    "writable",
    "setup",
    "free space",
    "round trip",
)


# This module's own sshd: some tests add keys to its authorized_keys.
server = sshd_fixture("admin_sshd", scope="module")


def private_site(server: SshServer, root: Path, label: str) -> SiteConfig:
    """A site whose remote_dir is private, as README's setup makes it (check warns otherwise)."""
    return SiteConfig.create(server, root, label, private=True)


@pytest.fixture
def config(server: SshServer, tmp_path: Path, request: pytest.FixtureRequest) -> SiteConfig:
    return private_site(server, tmp_path, request.node.name)


def check_lines(output: str) -> dict[str, str]:
    """Check name -> its status word, from the `STATUS  name  detail` lines."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        for name in ALL_CHECKS:
            match = re.match(rf"^(OK|WARN|FAIL|SKIP)\s+{re.escape(name)}(\s|$)", line)
            if match:
                found[name] = match.group(1)
    return found


def advice_after(output: str, name: str) -> str:
    """The `-> what to do` line printed under a check's FAIL line."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if re.match(rf"^FAIL\s+{re.escape(name)}\s", line):
            follow = lines[index + 1] if index + 1 < len(lines) else ""
            assert follow.strip().startswith("->"), f"no advice under the FAIL line of {name}: {output}"
            return follow
    raise AssertionError(f"no FAIL line for {name} in:\n{output}")


# --------------------------------------------------------------------------- check


def test_check_prints_every_check_ok_and_exits_zero(plugin: Plugin, config: SiteConfig) -> None:
    result = plugin.run("check", config.path, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    statuses = check_lines(result.stdout)
    assert {name: statuses.get(name) for name in ALL_CHECKS} == {name: "OK" for name in ALL_CHECKS}, result.stdout
    assert config.server.host_fingerprint in result.stdout
    assert "verified by known_hosts" in result.stdout
    assert "publickey" in result.stdout
    assert re.search(r"free space\s+\S+ \w?i?B free of", result.stdout), result.stdout
    assert re.search(
        r"round trip\s+8\.0 MiB probe written at [\d.]+ MiB/s, read back at [\d.]+ MiB/s", result.stdout
    ), result.stdout
    assert result.stderr == ""
    assert list(config.remote_dir.iterdir()) == [], "the probe files must be deleted"


def test_check_warns_that_files_are_not_flushed_to_disk_with_fsync_no(plugin: Plugin, config: SiteConfig) -> None:
    result = plugin.run("check", config.write("no_fsync.yaml", fsync="no"), text=True)

    assert result.returncode == 0, result.stdout + result.stderr  # a warning: the config works
    assert check_lines(result.stdout)["writable"] == "WARN", result.stdout
    assert "fsync: no, so stored files are not flushed to disk there" in result.stdout
    assert "set fsync: yes unless" in result.stdout
    assert re.search(r"^\s+fsync\s+no$", result.stdout, re.M), result.stdout
    assert check_lines(plugin.run("check", config.path, text=True).stdout)["writable"] == "OK"


def test_check_shows_the_effective_options_with_defaults(plugin: Plugin, config: SiteConfig) -> None:
    result = plugin.run("check", config.write(port=str(config.server.port)), text=True)  # as gpbackup's copy: a string

    assert result.returncode == 0, result.stdout
    assert re.search(rf"^\s+port\s+{config.server.port}$", result.stdout, re.M)
    assert re.search(r"^\s+strict_host_key_checking\s+yes$", result.stdout, re.M)
    assert re.search(r"^\s+keep_last\s+\(not set\)$", result.stdout, re.M)


def test_check_fails_with_advice_when_remote_dir_is_missing(plugin: Plugin, config: SiteConfig) -> None:
    missing = config.remote_dir / "not-created"
    result = plugin.run("check", config.write(remote_dir=str(missing)), text=True)

    assert result.returncode != 0
    statuses = check_lines(result.stdout)
    assert statuses["auth"] == "OK" and statuses["remote_dir"] == "FAIL", result.stdout
    assert str(missing) in result.stdout
    assert "create it on the backup host" in advice_after(result.stdout, "remote_dir")
    assert statuses["round trip"] == "SKIP"
    assert "Traceback" not in result.stdout + result.stderr


def test_check_fails_with_advice_when_the_host_key_is_unknown(
    plugin: Plugin, config: SiteConfig, tmp_path: Path
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result = plugin.run("check", config.write(known_hosts_file=str(empty)), text=True)

    assert result.returncode != 0
    statuses = check_lines(result.stdout)
    assert statuses["host key"] == "FAIL", result.stdout
    assert statuses.get("auth") != "OK", "no credential may be sent to an unverified host"
    assert config.server.host_fingerprint in result.stdout
    advice = advice_after(result.stdout, "host key")
    assert "ssh-keyscan" in advice and "host_key_fingerprint" in advice
    assert "Traceback" not in result.stdout + result.stderr


def test_check_warns_but_passes_when_host_key_checking_is_off(
    plugin: Plugin, config: SiteConfig, tmp_path: Path
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result = plugin.run("check", config.write(known_hosts_file=str(empty), strict_host_key_checking="no"), text=True)

    assert result.returncode == 0, result.stdout
    assert check_lines(result.stdout)["host key"] == "WARN"
    assert f"host_key_fingerprint: {config.server.host_fingerprint}" in result.stdout


def test_check_fails_without_traceback_when_nothing_listens(plugin: Plugin, config: SiteConfig) -> None:
    result = plugin.run("check", config.write(port=free_port()), text=True)

    assert result.returncode != 0
    assert check_lines(result.stdout)["connect"] == "FAIL", result.stdout
    assert "sshd" in advice_after(result.stdout, "connect")
    assert "Traceback" not in result.stdout + result.stderr


def test_check_fails_with_advice_on_an_invalid_config(plugin: Plugin, config: SiteConfig, tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"options:\n  hostname: 127.0.0.1\n  remote_dir: {config.remote_dir}\n  prot: 22\n")
    result = plugin.run("check", typo, text=True)

    assert result.returncode != 0
    assert check_lines(result.stdout)["config"] == "FAIL", result.stdout
    assert "did you mean 'port'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_masks_secrets_in_its_output(plugin: Plugin, config: SiteConfig, tmp_path: Path) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    passphrase = f"pp-{secrets.token_hex(8)}"
    key = keygen(tmp_path / "id_encrypted", passphrase=passphrase)
    with open(config.server.authorized_keys, "a") as authorized:
        authorized.write(key.with_suffix(".pub").read_text())
    cfg = config.write(password=password, identity_file=str(key), identity_passphrase=passphrase)
    result = plugin.run("check", cfg, text=True)

    assert result.returncode == 0, result.stdout
    assert password not in result.stdout + result.stderr
    assert passphrase not in result.stdout + result.stderr
    assert re.search(r"^\s+password\s+\*{6}$", result.stdout, re.M), result.stdout
    assert re.search(r"^\s+identity_passphrase\s+\*{6}$", result.stdout, re.M), result.stdout
    assert f"publickey ({key})" in result.stdout


def test_check_masks_secrets_when_it_fails(plugin: Plugin, config: SiteConfig, tmp_path: Path) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result = plugin.run("check", config.write(password=password, known_hosts_file=str(empty)), text=True)

    assert result.returncode != 0
    assert password not in result.stdout + result.stderr


def test_check_without_a_config_prints_usage_and_exits_two(plugin: Plugin, config: SiteConfig) -> None:
    result = plugin.run("check", text=True)

    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- list-backups

COMPLETE = "20240105101500"
NO_REPORT = "20240106101500"
LEFTOVER = "20240107101500"
DATA_SIZE = 3 * 1024 * 1024


def store_backup(plugin: Plugin, config: SiteConfig, root: Path, timestamp: str, report: bool) -> None:
    """Files of one backup (local ones below `root`), stored through the plugin as gpbackup does."""
    local = make_local_backup(root, timestamp).path
    plugin.ok("setup_plugin_for_backup", config.path, local, "coordinator", '"-1"')
    metadata = local / f"gpbackup_{timestamp}_metadata.sql"
    metadata.write_text("CREATE TABLE t (i int);\n")
    plugin.ok("backup_file", config.path, metadata)
    plugin.ok("backup_data", config.path, local / f"gpbackup_0_{timestamp}", stdin=os.urandom(DATA_SIZE))
    if report:
        report_file = local / f"gpbackup_{timestamp}_report"
        report_file.write_text("backup status: Success\n")
        plugin.ok("backup_file", config.path, report_file)


def interrupt_upload(plugin: Plugin, config: SiteConfig, root: Path, timestamp: str) -> None:
    """Kill a backup_data mid-stream (as a killed gpbackup_helper would), leaving its temporary file behind."""
    local = make_local_backup(root, timestamp).path
    remote = config.remote_dir / "backups" / timestamp[:8] / timestamp
    process = plugin.popen("backup_data", config.path, local / f"gpbackup_1_{timestamp}", stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert process.stdin is not None
    try:
        process.stdin.write(os.urandom(2 * 1024 * 1024))
        process.stdin.flush()
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any(p.name.endswith(".partial") and p.stat().st_size > 0 for p in remote.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdin.close()


@pytest.fixture(scope="module")
def stored(server: SshServer, tmp_path_factory: pytest.TempPathFactory) -> SiteConfig:
    """Three backups on the host: complete, without a coordinator report, with a leftover temporary file."""
    root = tmp_path_factory.mktemp("list_backups")
    config = private_site(server, root, "list_backups")
    (root / "home").mkdir()
    plugin = session_plugin(root / "home")
    store_backup(plugin, config, root, COMPLETE, report=True)
    store_backup(plugin, config, root, NO_REPORT, report=False)
    store_backup(plugin, config, root, LEFTOVER, report=True)
    interrupt_upload(plugin, config, root, LEFTOVER)
    leftovers = [
        p for p in (config.remote_dir / "backups" / LEFTOVER[:8] / LEFTOVER).iterdir() if p.name.endswith(".partial")
    ]
    assert leftovers, "the interrupted upload left no temporary file"
    return config


def leftover_files(stored: SiteConfig) -> list[str]:
    """The interrupted upload's temporary files in LEFTOVER: the stream's and its checksum file's, opened
    together. Where it wrote through the spare files a warm worker had opened ahead, the checksum file's is an
    empty spare, as any untaken one is, and not counted (paths.is_upload_leftover)."""
    left = [path.name for path in upload_leftovers(stored.remote_dir / "backups" / LEFTOVER[:8] / LEFTOVER)]
    assert len(left) in (1, 2), left
    return left


def table_row(output: str, timestamp: str) -> str:
    rows = [line for line in output.splitlines() if line.startswith(timestamp)]
    assert len(rows) == 1, output
    return rows[0]


def test_list_backups_shows_each_backup_with_files_size_age_and_state(plugin: Plugin, stored: SiteConfig) -> None:
    result = plugin.run("list-backups", stored.path, text=True)

    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["TIMESTAMP", "DATABASE", "FILES", "SIZE", "AGE", "NEEDS", "STATE"]
    complete = table_row(result.stdout, COMPLETE)
    # Its report names no database and it has no config.yaml: both unknown.
    assert re.match(rf"^{COMPLETE}\s+\?\s+3\s+3\.0 MiB\s+\d+d \d+h\s+\?\s+complete$", complete), complete
    no_report = table_row(result.stdout, NO_REPORT)
    assert re.match(rf"^{NO_REPORT}\s+\?\s+2\s+", no_report), no_report
    assert "incomplete" in no_report and "no coordinator report" in no_report
    leftover = table_row(result.stdout, LEFTOVER)
    left = leftover_files(stored)
    assert "incomplete" in leftover and f"{len(left)} leftover temporary file{'s' if len(left) > 1 else ''}" in leftover
    assert "no coordinator report" not in leftover
    assert "3 backups" in result.stdout and "2 incomplete" in result.stdout


def test_list_backups_json_gives_scripts_the_same_facts(plugin: Plugin, stored: SiteConfig) -> None:
    result = plugin.run("list-backups", stored.path, "--json", text=True)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["remote_dir"] == str(stored.remote_dir)
    backups = {b["timestamp"]: b for b in document["backups"]}
    assert list(backups) == [COMPLETE, NO_REPORT, LEFTOVER]
    complete = backups[COMPLETE]
    assert complete["complete"] is True and complete["state"] == "complete" and complete["reasons"] == []
    assert complete["files"] == 3 and complete["bytes"] >= DATA_SIZE and complete["has_report"] is True
    assert complete["age_seconds"] > 0
    assert complete["path"] == str(stored.remote_dir / "backups" / COMPLETE[:8] / COMPLETE)
    no_report = backups[NO_REPORT]
    assert no_report["complete"] is False and no_report["has_report"] is False
    assert any("report" in reason for reason in no_report["reasons"])
    leftover = backups[LEFTOVER]
    assert leftover["complete"] is False and leftover["temporary_files"] == leftover_files(stored)


def test_list_backups_marks_a_backup_gpbackup_reported_as_failed_incomplete(
    plugin: Plugin, config: SiteConfig, tmp_path: Path
) -> None:
    failed = "20240108101500"
    store_backup(plugin, config, tmp_path, failed, report=True)
    report = config.remote_dir / "backups" / failed[:8] / failed / f"gpbackup_{failed}_report"
    report.write_text("backup status:   Failure\n")

    listing = json.loads(plugin.run("list-backups", config.path, "--json", text=True).stdout)["backups"]

    (entry,) = [b for b in listing if b["timestamp"] == failed]
    assert entry["complete"] is False and entry["has_report"] is True and entry["report_status"] == "Failure"
    assert any("Failure" in reason for reason in entry["reasons"])


def test_list_backups_lists_a_directory_whose_14_digits_are_no_time_of_unknown_age(
    plugin: Plugin, config: SiteConfig, tmp_path: Path
) -> None:
    # The plugin stores under any 14-digit timestamp gpbackup's paths carry (a test bench's, a hand-made one):
    # such a directory must not stop the listing of the others.
    good, odd = "20240108101500", "20240108888888"
    store_backup(plugin, config, tmp_path, good, report=True)
    store_backup(plugin, config, tmp_path, odd, report=True)

    table = plugin.run("list-backups", config.path, text=True)
    listing = plugin.run("list-backups", config.path, "--json", text=True)

    assert table.returncode == 0 and table.stderr == "", table.stderr
    assert re.search(rf"^{odd}\s.*\s\?\s", table.stdout, re.MULTILINE), table.stdout
    entries = {b["timestamp"]: b for b in json.loads(listing.stdout)["backups"]}
    assert entries[odd]["age_seconds"] is None and isinstance(entries[good]["age_seconds"], int)


def test_list_backups_says_so_when_there_are_none(plugin: Plugin, config: SiteConfig) -> None:
    table = plugin.run("list-backups", config.path, text=True)
    listing = plugin.run("list-backups", config.path, "--json", text=True)

    assert table.returncode == 0 and "No backups" in table.stdout
    assert listing.returncode == 0 and json.loads(listing.stdout)["backups"] == []


def test_list_backups_fails_with_one_line_when_the_host_is_unreachable(plugin: Plugin, config: SiteConfig) -> None:
    result = plugin.run("list-backups", config.write(port=free_port()), text=True)

    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpbackup_sftp_plugin list-backups: ")



# --------------------------------------------------------------------------- gpbackup's catalog: databases, chains

SALES_OLD = "20200101000000"  # a full backup of sales that nothing needs any more
SALES_FULL = "20200102000000"
SALES_INCREMENTAL = "20200103000000"  # needs SALES_FULL
HR_FULL = "20200104000000"
RUNNING = "20200105000000"  # no config.yaml or report yet: database unknown


def put_backups(config: SiteConfig) -> dict[str, Path]:
    """Backups as gpbackup leaves them (config.yaml, report, data), written straight into the local server's disk."""
    files = {
        SALES_OLD: gpbackup_files(SALES_OLD, "sales"),
        SALES_FULL: gpbackup_files(SALES_FULL, "sales"),
        SALES_INCREMENTAL: gpbackup_files(SALES_INCREMENTAL, "sales", needs=(SALES_FULL,)),
        HR_FULL: gpbackup_files(HR_FULL, "hr"),
        RUNNING: {f"gpbackup_0_{RUNNING}": b"table data"},
    }
    directories: dict[str, Path] = {}
    for timestamp, contents in files.items():
        directory = config.remote_dir / "backups" / timestamp[:8] / timestamp
        directory.mkdir(parents=True)
        for name, data in contents.items():
            (directory / name).write_bytes(data)
        directories[timestamp] = directory
    return directories


def test_list_backups_shows_each_backups_database_and_what_an_incremental_needs(
    plugin: Plugin, config: SiteConfig
) -> None:
    put_backups(config)

    table = plugin.run("list-backups", config.path, text=True)
    listing = plugin.run("list-backups", config.path, "--json", text=True)

    assert table.returncode == 0 and table.stderr == "", table
    assert table.stdout.splitlines()[0].split()[:2] == ["TIMESTAMP", "DATABASE"]
    assert "NEEDS" in table.stdout.splitlines()[0].split()
    assert re.match(rf"^{SALES_INCREMENTAL}\s+sales\s.*\s{SALES_FULL}\s+complete$",
                    table_row(table.stdout, SALES_INCREMENTAL))
    assert re.match(rf"^{HR_FULL}\s+hr\s.*\s-\s+complete$", table_row(table.stdout, HR_FULL))
    assert re.match(rf"^{RUNNING}\s+\?\s.*\s\?\s+incomplete", table_row(table.stdout, RUNNING))
    backups = {b["timestamp"]: b for b in json.loads(listing.stdout)["backups"]}
    assert backups[SALES_INCREMENTAL]["database"] == "sales" and backups[SALES_INCREMENTAL]["needs"] == [SALES_FULL]
    assert backups[HR_FULL]["database"] == "hr" and backups[HR_FULL]["needs"] == []
    assert backups[RUNNING]["database"] is None and backups[RUNNING]["needs"] is None


def test_list_backups_marks_a_backup_whose_config_says_failure_incomplete(plugin: Plugin, config: SiteConfig) -> None:
    directory = put_backups(config)[HR_FULL]
    config_yaml = directory / f"gpbackup_{HR_FULL}_config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("status: Success", "status: Failure"))

    listing = json.loads(plugin.run("list-backups", config.path, "--json", text=True).stdout)
    backups = {b["timestamp"]: b for b in listing["backups"]}

    assert backups[HR_FULL]["complete"] is False and backups[HR_FULL]["config_status"] == "Failure"
    assert backups[HR_FULL]["report_status"] == "Success"


def test_list_backups_flags_a_file_whose_size_differs_from_what_was_backed_up_and_a_missing_one(
    plugin: Plugin, config: SiteConfig, tmp_path: Path
) -> None:
    store_backup(plugin, config, tmp_path, COMPLETE, report=True)
    directory = config.remote_dir / "backups" / COMPLETE[:8] / COMPLETE
    with open(directory / f"gpbackup_0_{COMPLETE}", "r+b") as handle:
        handle.truncate(DATA_SIZE - 1)
    (directory / f"gpbackup_{COMPLETE}_metadata.sql").unlink()

    listing = json.loads(plugin.run("list-backups", config.path, "--json", text=True).stdout)
    (backup,) = listing["backups"]

    assert backup["complete"] is False
    assert backup["damaged_files"] == [f"gpbackup_{COMPLETE}_metadata.sql is missing (its checksum is stored)",
                                       f"gpbackup_0_{COMPLETE} holds {DATA_SIZE - 1} bytes, {DATA_SIZE} were backed up"]


def decision_lines(output: str) -> dict[str, str]:
    """timestamp -> its `KEEP|DELETE  timestamp  database  reasons` line."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        match = re.match(r"^(KEEP|DELETE)\s+(\d{14})\s", line)
        if match:
            found[match.group(2)] = line
    return found


def test_prune_dry_run_says_what_it_would_delete_and_why_and_deletes_nothing(
    plugin: Plugin, config: SiteConfig
) -> None:
    directories = put_backups(config)
    before = sorted(p for p in config.remote_dir.rglob("*"))

    result = plugin.run("prune", config.write(keep_last=1), "--dry-run", text=True)

    assert result.returncode == 0 and result.stderr == "", result
    lines = decision_lines(result.stdout)
    assert set(lines) == set(directories)
    assert re.match(rf"^DELETE\s+{SALES_OLD}\s+sales\s+older than the newest 1 of sales$", lines[SALES_OLD])
    assert re.match(rf"^KEEP\s+{SALES_FULL}\s+sales\s+needed by {SALES_INCREMENTAL}$", lines[SALES_FULL])
    assert re.match(rf"^KEEP\s+{SALES_INCREMENTAL}\s+sales\s+newest 1 of sales$", lines[SALES_INCREMENTAL])
    assert re.match(rf"^KEEP\s+{HR_FULL}\s+hr\s+newest 1 of hr$", lines[HR_FULL])
    assert re.match(rf"^KEEP\s+{RUNNING}\s+\?\s+database unknown$", lines[RUNNING])
    assert "Dry run" in result.stdout
    assert sorted(p for p in config.remote_dir.rglob("*")) == before


def test_prune_deletes_what_retention_lets_go_and_keeps_the_rest(plugin: Plugin, config: SiteConfig) -> None:
    directories = put_backups(config)

    result = plugin.run("prune", config.write(keep_last=1, keep_days=7), text=True)

    assert result.returncode == 0 and result.stderr == "", result
    assert decision_lines(result.stdout)[SALES_OLD].startswith("DELETE")
    assert re.search(rf"^deleted {SALES_OLD} \(3 files\)$", result.stdout, re.MULTILINE), result.stdout
    assert not directories[SALES_OLD].exists()
    assert all(directories[ts].is_dir() for ts in (SALES_FULL, SALES_INCREMENTAL, HR_FULL, RUNNING))
    again = plugin.run("prune", config.write(keep_last=1, keep_days=7), text=True)
    assert again.returncode == 0 and "DELETE" not in again.stdout and "Nothing to delete" in again.stdout


def test_prune_without_retention_options_says_nothing_is_pruned(plugin: Plugin, config: SiteConfig) -> None:
    directories = put_backups(config)

    result = plugin.run("prune", config.path, text=True)

    assert result.returncode == 0 and result.stderr == "", result
    assert "nothing is pruned" in result.stdout
    assert all(directory.is_dir() for directory in directories.values())


def test_prune_that_cannot_delete_a_backup_fails_with_one_line(plugin: Plugin, config: SiteConfig) -> None:
    directories = put_backups(config)

    with undeletable(directories[SALES_OLD]):
        result = plugin.run("prune", config.write(keep_last=1), text=True)
        assert directories[SALES_OLD].is_dir()

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpbackup_sftp_plugin prune: ")
    assert f"FAILED to delete {SALES_OLD}" in result.stdout


def test_prune_fails_with_one_line_when_the_host_is_unreachable(plugin: Plugin, config: SiteConfig) -> None:
    port = free_port()
    result = plugin.run("prune", config.write(port=port, keep_last=1, retries=1, connect_timeout=2), text=True)

    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpbackup_sftp_plugin prune: ") and str(port) in result.stderr, result.stderr
