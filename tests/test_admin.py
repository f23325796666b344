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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PLUGIN_EXE as PLUGIN
from tests.helpers import gpbackup_files, isolated_env, undeletable
from tests.sshd_server import SshServer, free_port, keygen

# A hung command must fail the test rather than hang the suite; not a timing assertion.
RUN_TIMEOUT = 120
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


@dataclass
class Site:
    """One test's config against the module's sshd, with its own remote_dir, log_dir and HOME."""

    server: SshServer
    root: Path
    remote_dir: Path
    home: Path

    def config(self, name: str = "plugin.yaml", **overrides: object) -> Path:
        options: dict[str, object] = {"remote_dir": str(self.remote_dir), "log_dir": str(self.root / "logs")}
        options.update(overrides)
        return self.server.write_config(self.root / name, **options)

    def env(self) -> dict[str, str]:
        return isolated_env(self.home)

    def run(self, *args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PLUGIN, *map(str, args)],
            input=stdin,
            capture_output=True,
            env=self.env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )
        return subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )

    def plugin_ok(self, *args: str | Path, stdin: bytes = b"") -> None:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0 and result.stderr == "", result


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("admin_sshd")) as sshd:
        yield sshd


def make_site(server: SshServer, root: Path) -> Site:
    remote_dir = server.remote_dir / f"{root.name}-{secrets.token_hex(4)}"
    remote_dir.mkdir(mode=0o700)  # private, as README's setup makes it (check warns otherwise)
    home = root / "home"
    home.mkdir()
    return Site(server, root, remote_dir, home)


@pytest.fixture
def site(server: SshServer, tmp_path: Path) -> Site:
    return make_site(server, tmp_path)


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


def test_check_prints_every_check_ok_and_exits_zero(site: Site) -> None:
    result = site.run("check", site.config())

    assert result.returncode == 0, result.stdout + result.stderr
    statuses = check_lines(result.stdout)
    assert {name: statuses.get(name) for name in ALL_CHECKS} == {name: "OK" for name in ALL_CHECKS}, result.stdout
    assert site.server.host_fingerprint in result.stdout
    assert "verified by known_hosts" in result.stdout
    assert "publickey" in result.stdout
    assert re.search(r"free space\s+\S+ \w?i?B free of", result.stdout), result.stdout
    assert re.search(
        r"round trip\s+8\.0 MiB probe written at [\d.]+ MiB/s, read back at [\d.]+ MiB/s", result.stdout
    ), result.stdout
    assert result.stderr == ""
    assert list(site.remote_dir.iterdir()) == [], "the probe files must be deleted"


def test_check_shows_the_effective_options_with_defaults(site: Site) -> None:
    result = site.run("check", site.config(port=str(site.server.port)))  # as gpbackup's copy: a string

    assert result.returncode == 0, result.stdout
    assert re.search(rf"^\s+port\s+{site.server.port}$", result.stdout, re.M)
    assert re.search(r"^\s+strict_host_key_checking\s+yes$", result.stdout, re.M)
    assert re.search(r"^\s+keep_last\s+\(not set\)$", result.stdout, re.M)


def test_check_fails_with_advice_when_remote_dir_is_missing(site: Site) -> None:
    missing = site.remote_dir / "not-created"
    result = site.run("check", site.config(remote_dir=str(missing)))

    assert result.returncode != 0
    statuses = check_lines(result.stdout)
    assert statuses["auth"] == "OK" and statuses["remote_dir"] == "FAIL", result.stdout
    assert str(missing) in result.stdout
    assert "create it on the backup host" in advice_after(result.stdout, "remote_dir")
    assert statuses["round trip"] == "SKIP"
    assert "Traceback" not in result.stdout + result.stderr


def test_check_fails_with_advice_when_the_host_key_is_unknown(site: Site) -> None:
    empty = site.root / "empty_known_hosts"
    empty.write_text("")
    result = site.run("check", site.config(known_hosts_file=str(empty)))

    assert result.returncode != 0
    statuses = check_lines(result.stdout)
    assert statuses["host key"] == "FAIL", result.stdout
    assert statuses.get("auth") != "OK", "no credential may be sent to an unverified host"
    assert site.server.host_fingerprint in result.stdout
    advice = advice_after(result.stdout, "host key")
    assert "ssh-keyscan" in advice and "host_key_fingerprint" in advice
    assert "Traceback" not in result.stdout + result.stderr


def test_check_warns_but_passes_when_host_key_checking_is_off(site: Site) -> None:
    empty = site.root / "empty_known_hosts"
    empty.write_text("")
    result = site.run("check", site.config(known_hosts_file=str(empty), strict_host_key_checking="no"))

    assert result.returncode == 0, result.stdout
    assert check_lines(result.stdout)["host key"] == "WARN"
    assert f"host_key_fingerprint: {site.server.host_fingerprint}" in result.stdout


def test_check_fails_without_traceback_when_nothing_listens(site: Site) -> None:
    result = site.run("check", site.config(port=free_port()))

    assert result.returncode != 0
    assert check_lines(result.stdout)["connect"] == "FAIL", result.stdout
    assert "sshd" in advice_after(result.stdout, "connect")
    assert "Traceback" not in result.stdout + result.stderr


def test_check_fails_with_advice_on_an_invalid_config(site: Site) -> None:
    config = site.root / "typo.yaml"
    config.write_text(f"options:\n  hostname: 127.0.0.1\n  remote_dir: {site.remote_dir}\n  prot: 22\n")
    result = site.run("check", config)

    assert result.returncode != 0
    assert check_lines(result.stdout)["config"] == "FAIL", result.stdout
    assert "did you mean 'port'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_masks_secrets_in_its_output(site: Site) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    passphrase = f"pp-{secrets.token_hex(8)}"
    key = keygen(site.root / "id_encrypted", passphrase=passphrase)
    with open(site.server.authorized_keys, "a") as authorized:
        authorized.write(key.with_suffix(".pub").read_text())
    result = site.run("check", site.config(password=password, identity_file=str(key), identity_passphrase=passphrase))

    assert result.returncode == 0, result.stdout
    assert password not in result.stdout + result.stderr
    assert passphrase not in result.stdout + result.stderr
    assert re.search(r"^\s+password\s+\*{6}$", result.stdout, re.M), result.stdout
    assert re.search(r"^\s+identity_passphrase\s+\*{6}$", result.stdout, re.M), result.stdout
    assert f"publickey ({key})" in result.stdout


def test_check_masks_secrets_when_it_fails(site: Site) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    empty = site.root / "empty_known_hosts"
    empty.write_text("")
    result = site.run("check", site.config(password=password, known_hosts_file=str(empty)))

    assert result.returncode != 0
    assert password not in result.stdout + result.stderr


def test_check_without_a_config_prints_usage_and_exits_two(site: Site) -> None:
    result = site.run("check")

    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- list-backups

COMPLETE = "20240105101500"
NO_REPORT = "20240106101500"
LEFTOVER = "20240107101500"
DATA_SIZE = 3 * 1024 * 1024


def backup_dir(site: Site, timestamp: str) -> Path:
    return site.root / "seg" / "backups" / timestamp[:8] / timestamp


def store_backup(site: Site, timestamp: str, report: bool) -> None:
    """Files of one backup, stored through the plugin as gpbackup does."""
    local = backup_dir(site, timestamp)
    local.mkdir(parents=True)
    config = site.config()
    site.plugin_ok("setup_plugin_for_backup", config, local, "coordinator", '"-1"')
    metadata = local / f"gpbackup_{timestamp}_metadata.sql"
    metadata.write_text("CREATE TABLE t (i int);\n")
    site.plugin_ok("backup_file", config, metadata)
    site.plugin_ok("backup_data", config, local / f"gpbackup_0_{timestamp}", stdin=os.urandom(DATA_SIZE))
    if report:
        report_file = local / f"gpbackup_{timestamp}_report"
        report_file.write_text("backup status: Success\n")
        site.plugin_ok("backup_file", config, report_file)


def interrupt_upload(site: Site, timestamp: str) -> None:
    """Kill a backup_data mid-stream (as a killed gpbackup_helper would), leaving its temporary file behind."""
    local = backup_dir(site, timestamp)
    remote = site.remote_dir / "backups" / timestamp[:8] / timestamp
    process = subprocess.Popen(
        [PLUGIN, "backup_data", str(site.config()), str(local / f"gpbackup_1_{timestamp}")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=site.env(),
    )
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
def stored(server: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """Three backups on the host: complete, without a coordinator report, with a leftover temporary file."""
    site = make_site(server, tmp_path_factory.mktemp("list_backups"))
    store_backup(site, COMPLETE, report=True)
    store_backup(site, NO_REPORT, report=False)
    store_backup(site, LEFTOVER, report=True)
    interrupt_upload(site, LEFTOVER)
    leftovers = [
        p for p in (site.remote_dir / "backups" / LEFTOVER[:8] / LEFTOVER).iterdir() if p.name.endswith(".partial")
    ]
    assert leftovers, "the interrupted upload left no temporary file"
    return site


def table_row(output: str, timestamp: str) -> str:
    rows = [line for line in output.splitlines() if line.startswith(timestamp)]
    assert len(rows) == 1, output
    return rows[0]


def test_list_backups_shows_each_backup_with_files_size_age_and_state(stored: Site) -> None:
    result = stored.run("list-backups", stored.config())

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
    assert "incomplete" in leftover and "1 leftover temporary file" in leftover
    assert "no coordinator report" not in leftover
    assert "3 backups" in result.stdout and "2 incomplete" in result.stdout


def test_list_backups_json_gives_scripts_the_same_facts(stored: Site) -> None:
    result = stored.run("list-backups", stored.config(), "--json")

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
    assert leftover["complete"] is False and len(leftover["temporary_files"]) == 1
    assert leftover["temporary_files"][0].endswith(".partial")


def test_list_backups_marks_a_backup_gpbackup_reported_as_failed_incomplete(site: Site) -> None:
    failed = "20240108101500"
    store_backup(site, failed, report=True)
    report = site.remote_dir / "backups" / failed[:8] / failed / f"gpbackup_{failed}_report"
    report.write_text("backup status:   Failure\n")

    listing = json.loads(site.run("list-backups", site.config(), "--json").stdout)["backups"]

    (entry,) = [b for b in listing if b["timestamp"] == failed]
    assert entry["complete"] is False and entry["has_report"] is True and entry["report_status"] == "Failure"
    assert any("Failure" in reason for reason in entry["reasons"])


def test_list_backups_says_so_when_there_are_none(site: Site) -> None:
    table = site.run("list-backups", site.config())
    listing = site.run("list-backups", site.config(), "--json")

    assert table.returncode == 0 and "No backups" in table.stdout
    assert listing.returncode == 0 and json.loads(listing.stdout)["backups"] == []


def test_list_backups_fails_with_one_line_when_the_host_is_unreachable(site: Site) -> None:
    result = site.run("list-backups", site.config(port=free_port()))

    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpbackup_sftp_plugin list-backups: ")



# --------------------------------------------------------------------------- gpbackup's catalog: databases, chains

SALES_OLD = "20200101000000"  # a full backup of sales that nothing needs any more
SALES_FULL = "20200102000000"
SALES_INCREMENTAL = "20200103000000"  # needs SALES_FULL
HR_FULL = "20200104000000"
RUNNING = "20200105000000"  # no config.yaml or report yet: database unknown


def put_backups(site: Site) -> dict[str, Path]:
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
        directory = site.remote_dir / "backups" / timestamp[:8] / timestamp
        directory.mkdir(parents=True)
        for name, data in contents.items():
            (directory / name).write_bytes(data)
        directories[timestamp] = directory
    return directories


def test_list_backups_shows_each_backups_database_and_what_an_incremental_needs(site: Site) -> None:
    put_backups(site)

    table = site.run("list-backups", site.config())
    listing = site.run("list-backups", site.config(), "--json")

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


def test_list_backups_marks_a_backup_whose_config_says_failure_incomplete(site: Site) -> None:
    directory = put_backups(site)[HR_FULL]
    config = directory / f"gpbackup_{HR_FULL}_config.yaml"
    config.write_text(config.read_text().replace("status: Success", "status: Failure"))

    listing = json.loads(site.run("list-backups", site.config(), "--json").stdout)
    backups = {b["timestamp"]: b for b in listing["backups"]}

    assert backups[HR_FULL]["complete"] is False and backups[HR_FULL]["config_status"] == "Failure"
    assert backups[HR_FULL]["report_status"] == "Success"


def test_list_backups_flags_a_file_whose_size_differs_from_what_was_backed_up_and_a_missing_one(site: Site) -> None:
    store_backup(site, COMPLETE, report=True)
    directory = site.remote_dir / "backups" / COMPLETE[:8] / COMPLETE
    with open(directory / f"gpbackup_0_{COMPLETE}", "r+b") as handle:
        handle.truncate(DATA_SIZE - 1)
    (directory / f"gpbackup_{COMPLETE}_metadata.sql").unlink()

    listing = json.loads(site.run("list-backups", site.config(), "--json").stdout)
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


def test_prune_dry_run_says_what_it_would_delete_and_why_and_deletes_nothing(site: Site) -> None:
    directories = put_backups(site)
    before = sorted(p for p in site.remote_dir.rglob("*"))

    result = site.run("prune", site.config(keep_last=1), "--dry-run")

    assert result.returncode == 0 and result.stderr == "", result
    lines = decision_lines(result.stdout)
    assert set(lines) == set(directories)
    assert re.match(rf"^DELETE\s+{SALES_OLD}\s+sales\s+older than the newest 1 of sales$", lines[SALES_OLD])
    assert re.match(rf"^KEEP\s+{SALES_FULL}\s+sales\s+needed by {SALES_INCREMENTAL}$", lines[SALES_FULL])
    assert re.match(rf"^KEEP\s+{SALES_INCREMENTAL}\s+sales\s+newest 1 of sales$", lines[SALES_INCREMENTAL])
    assert re.match(rf"^KEEP\s+{HR_FULL}\s+hr\s+newest 1 of hr$", lines[HR_FULL])
    assert re.match(rf"^KEEP\s+{RUNNING}\s+\?\s+database unknown$", lines[RUNNING])
    assert "Dry run" in result.stdout
    assert sorted(p for p in site.remote_dir.rglob("*")) == before


def test_prune_deletes_what_retention_lets_go_and_keeps_the_rest(site: Site) -> None:
    directories = put_backups(site)

    result = site.run("prune", site.config(keep_last=1, keep_days=7))

    assert result.returncode == 0 and result.stderr == "", result
    assert decision_lines(result.stdout)[SALES_OLD].startswith("DELETE")
    assert re.search(rf"^deleted {SALES_OLD} \(3 files\)$", result.stdout, re.MULTILINE), result.stdout
    assert not directories[SALES_OLD].exists()
    assert all(directories[ts].is_dir() for ts in (SALES_FULL, SALES_INCREMENTAL, HR_FULL, RUNNING))
    again = site.run("prune", site.config(keep_last=1, keep_days=7))
    assert again.returncode == 0 and "DELETE" not in again.stdout and "Nothing to delete" in again.stdout


def test_prune_without_retention_options_says_nothing_is_pruned(site: Site) -> None:
    directories = put_backups(site)

    result = site.run("prune", site.config())

    assert result.returncode == 0 and result.stderr == "", result
    assert "nothing is pruned" in result.stdout
    assert all(directory.is_dir() for directory in directories.values())


def test_prune_that_cannot_delete_a_backup_fails_with_one_line(site: Site) -> None:
    directories = put_backups(site)

    with undeletable(directories[SALES_OLD]):
        result = site.run("prune", site.config(keep_last=1))
        assert directories[SALES_OLD].is_dir()

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpbackup_sftp_plugin prune: ")
    assert f"FAILED to delete {SALES_OLD}" in result.stdout


def test_prune_fails_with_one_line_when_the_host_is_unreachable(site: Site) -> None:
    port = free_port()
    result = site.run("prune", site.config(port=port, keep_last=1, retries=1, connect_timeout=2))

    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gpbackup_sftp_plugin prune: ") and str(port) in result.stderr, result.stderr
