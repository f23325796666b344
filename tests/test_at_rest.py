"""Files and secrets at rest: what the plugin creates on the backup host is private (files 0600, directories
0700), a config or key others can read is warned about in every call's log and in `check`, `check` tries what
setup will do, and a hand-run `delete_backup` of nothing says so on a terminal. The installed script against the
real sshd (sftp-server applies the mode sent with OPEN/MKDIR, its umask on top)."""

from __future__ import annotations

import errno
import os
import pty
import re
import secrets
import stat
import subprocess
from datetime import datetime
from pathlib import Path

from devtools.gpbackup import LocalBackup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig
from devtools.sshd import keygen
from sftp_plugin import paths
from tests.helpers import gpbackup_files

# More than one 1 MiB block, so a .sha256blocks file is stored besides the .sha256 sidecar.
MULTI_BLOCK = 1024 * 1024 + 4096


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_below(root: Path) -> dict[str, int]:
    """Every file and directory under ``root`` with its permission bits, by relative path."""
    return {str(p.relative_to(root)): mode(p) for p in sorted(root.rglob("*"))}


def check_status(output: str, name: str) -> tuple[str, str]:
    """(status word, the rest of the line and its -> advice) of one `check` line."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        match = re.match(rf"^(OK|WARN|FAIL|SKIP)\s+{re.escape(name)}\s+(.*)$", line)
        if match:
            follow = lines[index + 1].strip() if index + 1 < len(lines) else ""
            return match.group(1), match.group(2) + ("\n" + follow if follow.startswith("->") else "")
    raise AssertionError(f"no check line {name!r} in:\n{output}")


def check(plugin: Plugin, config: Path) -> subprocess.CompletedProcess[bytes]:
    return plugin.run("check", config, "--probe-mib", "0")


# ---------------------------------------------------------------- modes on the backup host


def test_setup_creates_the_backup_directories_0700(plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    plugin.ok("setup_plugin_for_backup", config.path, backup.path, "coordinator", "-1")

    created = modes_below(config.remote_dir)
    assert created == {
        "backups": 0o700,
        f"backups/{backup.date}": 0o700,
        f"backups/{backup.date}/{backup.timestamp}": 0o700,
    }


def test_uploads_store_data_and_checksum_files_0600_in_directories_0700(plugin: Plugin, config: SiteConfig,
                                                                         backup: LocalBackup) -> None:
    # No setup first: the upload creates the directories itself.
    data = backup.file(f"gpbackup_0_{backup.timestamp}")
    plugin.ok("backup_data", config.path, data, stdin=os.urandom(MULTI_BLOCK))
    local = backup.file(f"gpbackup_{backup.timestamp}_toc.yaml")
    local.write_text("toc")
    local.chmod(0o644)
    plugin.ok("backup_file", config.path, local)

    directory = f"backups/{backup.date}/{backup.timestamp}"
    # Each file went up under a temporary name and was renamed: its mode is the temporary file's. The spare
    # files a warm worker opened ahead for the next upload there (if this plugin runs one) are private too.
    modes = modes_below(config.remote_dir)
    spares = {path: modes.pop(path) for path in list(modes) if paths.is_spare_name(Path(path).name)}
    assert set(spares.values()) <= {0o600}
    assert modes == {
        "backups": 0o700,
        f"backups/{backup.date}": 0o700,
        directory: 0o700,
        f"{directory}/{data.name}": 0o600,
        f"{directory}/{data.name}.sha256": 0o600,
        f"{directory}/{data.name}.sha256blocks": 0o600,
        f"{directory}/{local.name}": 0o600,
        f"{directory}/{local.name}.sha256": 0o600,
    }


def test_check_warns_when_remote_dir_is_open_to_others_and_says_how_to_close_it(plugin: Plugin,
                                                                                 config: SiteConfig) -> None:
    config.remote_dir.chmod(0o755)
    result = check(plugin, config.path)

    assert result.returncode == 0, result.stdout.decode()
    status, text = check_status(result.stdout.decode(), "privacy")
    assert status == "WARN" and "0755" in text, text
    assert f"chmod 700 {config.remote_dir}" in text

    config.remote_dir.chmod(0o700)
    status, text = check_status(check(plugin, config.path).stdout.decode(), "privacy")
    assert status == "OK", text


# ---------------------------------------------------------------- secrets in local files


def test_every_call_logs_a_warning_for_a_config_with_a_password_that_everyone_can_read(
        plugin: Plugin, config: SiteConfig) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    path = config.write("with_password.yaml", password=password)
    path.chmod(0o600)
    plugin.ok("list_directory", path)
    assert "every user on this host can read it" not in config.log_text()

    path.chmod(0o644)
    plugin.ok("list_directory", path)
    plugin.ok("list_directory", path)

    log = config.log_text()
    warnings = [line for line in log.splitlines() if "every user on this host can read it" in line]
    assert len(warnings) == 2, "once per call"
    assert all("WARNING" in line and str(path) in line and "password" in line and "0644" in line
               for line in warnings), warnings
    assert password not in log


def test_every_call_logs_a_warning_for_a_private_key_open_to_the_group(plugin: Plugin, config: SiteConfig,
                                                                         tmp_path: Path) -> None:
    key = tmp_path / "id_copy"
    key.write_bytes(config.server.user_key.read_bytes())
    key.chmod(0o640)
    path = config.write("group_key.yaml", identity_file=str(key))

    plugin.ok("list_directory", path)

    warnings = [line for line in config.log_text().splitlines() if f"private key {key}" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "0640" in warnings[0], warnings
    assert f"chmod 600 {key}" in warnings[0]


def test_check_warns_about_a_readable_config_with_a_passphrase_and_an_open_key_without_printing_secrets(
        plugin: Plugin, config: SiteConfig, tmp_path: Path) -> None:
    passphrase = f"pp-{secrets.token_hex(8)}"
    key = keygen(tmp_path / "id_encrypted", passphrase=passphrase)
    with open(config.server.authorized_keys, "a") as authorized:
        authorized.write(key.with_suffix(".pub").read_text())
    key.chmod(0o644)
    path = config.write("open.yaml", identity_file=str(key), identity_passphrase=passphrase)
    path.chmod(0o644)

    result = check(plugin, path)
    output = result.stdout.decode()

    assert result.returncode == 0, output
    warned = [line for line in output.splitlines() if re.match(r"^WARN\s+secrets\s", line)]
    assert any(str(path) in line and "identity_passphrase" in line for line in warned), output
    assert any(f"private key {key}" in line and "0644" in line for line in warned), output
    assert passphrase not in output + result.stderr.decode()


# ---------------------------------------------------------------- check tries what setup will do


def test_check_creates_and_removes_a_directory_under_todays_backups(plugin: Plugin, config: SiteConfig) -> None:
    result = check(plugin, config.path)

    assert result.returncode == 0, result.stdout.decode()
    status, text = check_status(result.stdout.decode(), "setup")
    assert status == "OK", text
    assert f"backups/{datetime.now():%Y%m%d}" in text
    assert list(config.remote_dir.iterdir()) == [], "check removes every directory it created"


def test_check_never_touches_an_existing_backup_of_today(plugin: Plugin, config: SiteConfig) -> None:
    timestamp = f"{datetime.now():%Y%m%d}000001"
    existing = config.remote_dir / "backups" / timestamp[:8] / timestamp
    existing.mkdir(parents=True)
    for name, data in gpbackup_files(timestamp).items():
        (existing / name).write_bytes(data)
    before = modes_below(config.remote_dir)

    result = check(plugin, config.path)

    assert check_status(result.stdout.decode(), "setup")[0] == "OK", result.stdout.decode()
    assert modes_below(config.remote_dir) == before


def test_check_fails_when_setup_could_not_create_the_backup_directory(plugin: Plugin, config: SiteConfig) -> None:
    (config.remote_dir / "backups").write_text("not a directory")  # remote_dir itself stays writable

    result = check(plugin, config.path)

    assert result.returncode == 1, result.stdout.decode()
    status, text = check_status(result.stdout.decode(), "setup")
    assert status == "FAIL" and "setup_plugin_for_backup will fail" in text, text
    assert (config.remote_dir / "backups").read_text() == "not a directory"


# ---------------------------------------------------------------- delete_backup by hand


def run_on_a_terminal(plugin: Plugin, *args: str | Path) -> tuple[int, str, bytes]:
    """Run the plugin with its stdout on a pseudo-terminal, as a person at a shell would; return the exit code,
    what reached the terminal and the stderr bytes."""
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(plugin.argv(*args), stdin=subprocess.DEVNULL, stdout=terminal,
                                stderr=subprocess.PIPE, env=plugin.env(), timeout=RUN_TIMEOUT, check=False)
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError as err:  # EIO: the terminal's other end is closed and everything was read
                if err.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    return result.returncode, shown.decode().replace("\r\n", "\n"), result.stderr


def test_delete_backup_of_nothing_by_hand_says_so_on_the_terminal_and_exits_zero(plugin: Plugin, config: SiteConfig,
                                                                                  backup: LocalBackup) -> None:
    plugin.ok("setup_plugin_for_backup", config.path, backup.path, "coordinator", "-1")
    code, shown, stderr = run_on_a_terminal(plugin, "delete_backup", config.path, backup.timestamp)
    assert (code, shown, stderr) == (0, "", b""), "a backup that was there: deleted without a word"
    assert not backup.remote(config.remote_dir).exists()

    code, shown, stderr = run_on_a_terminal(plugin, "delete_backup", config.path, backup.timestamp)
    assert (code, stderr) == (0, b"")
    assert shown == f"no backup {backup.timestamp} under 127.0.0.1:{config.remote_dir}\n"

    piped = plugin.ok("delete_backup", config.path, backup.timestamp)  # as gpbackup_manager runs it
    assert piped.stdout == b""
    assert config.log_text().count(f"no backup {backup.timestamp} under") == 2
