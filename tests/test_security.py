"""Host key verification, authentication, secrets and the remote_dir boundary, against a real sshd."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig
from devtools.sshd import SshServer, keygen, known_hosts_line

PASSPHRASE = "pp-Sekrit-4711-passphrase"
PASSWORD = "pw-Sekrit-0815-password"


def server_key_line(server: SshServer, key_type: str = "ed25519") -> str:
    return known_hosts_line(server.server_dir, "127.0.0.1", server.port, key_type)


def fingerprint_of(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True).stdout.split()[1]


def setup_coordinator(plugin: Plugin, cfg: Path, backup: LocalBackup) -> subprocess.CompletedProcess[bytes]:
    return plugin.run("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')


# ---------------------------------------------------------------- host keys


def test_unknown_host_key_is_refused_by_default_and_nothing_is_written(plugin: Plugin, config: SiteConfig,
                                                                       backup: LocalBackup, tmp_path: Path) -> None:
    known_hosts = tmp_path / "empty_known_hosts"
    known_hosts.write_text("")
    cfg = config.write("unknown_key.yaml", known_hosts_file=str(known_hosts))
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert "host key" in message.lower()
    assert str(known_hosts) in message
    assert list(config.remote_dir.iterdir()) == []
    assert known_hosts.read_text() == "", "strict checking must not add the key"


def test_unknown_host_key_refusal_sends_no_data(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                tmp_path: Path) -> None:
    known_hosts = tmp_path / "empty_known_hosts"
    known_hosts.write_text("")
    cfg = config.write("unknown_key.yaml", known_hosts_file=str(known_hosts))
    plugin.fails("backup_data", cfg, backup.file(f"gpbackup_0_{backup.timestamp}"), stdin=b"confidential")
    assert list(config.remote_dir.iterdir()) == []


@pytest.mark.parametrize("strict", ["yes", "accept-new"])
def test_changed_host_key_is_refused(plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path,
                                     strict: str) -> None:
    impostor = keygen(tmp_path / "impostor_host_key")
    kind, body = impostor.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{config.server.port} {kind} {body}\n")
    cfg = config.write("changed_key.yaml", known_hosts_file=str(known_hosts), strict_host_key_checking=strict)
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert "host key" in message.lower()
    assert list(config.remote_dir.iterdir()) == []
    assert known_hosts.read_text() == f"[127.0.0.1]:{config.server.port} {kind} {body}\n"


def test_accept_new_adds_the_key_to_known_hosts_and_succeeds(plugin: Plugin, config: SiteConfig,
                                                             backup: LocalBackup, tmp_path: Path) -> None:
    known_hosts = tmp_path / "not_yet" / "known_hosts"  # neither file nor directory exists yet
    cfg = config.write("accept_new.yaml", known_hosts_file=str(known_hosts), strict_host_key_checking="accept-new")
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(config.remote_dir).is_dir()
    lines = known_hosts.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[127.0.0.1]:{config.server.port} ")
    # The key now on file is trusted by the default strict checking.
    strict = config.write("strict_after.yaml", known_hosts_file=str(known_hosts))
    plugin.ok("list_directory", strict)
    assert len(known_hosts.read_text().splitlines()) == 1


def test_strict_host_key_checking_no_accepts_an_unknown_key_without_recording_it(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    known_hosts = tmp_path / "empty_known_hosts"
    known_hosts.write_text("")
    cfg = config.write("strict_no.yaml", known_hosts_file=str(known_hosts), strict_host_key_checking="no")
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(config.remote_dir).is_dir()
    assert known_hosts.read_text() == ""


def test_matching_host_key_fingerprint_pin_succeeds_without_known_hosts(plugin: Plugin, config: SiteConfig,
                                                                        backup: LocalBackup,
                                                                        tmp_path: Path) -> None:
    cfg = config.write("pinned.yaml", known_hosts_file=str(tmp_path / "absent_known_hosts"),
                       host_key_fingerprint=config.server.host_fingerprint)
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(config.remote_dir).is_dir()


def test_pin_of_a_host_key_type_not_negotiated_fails_naming_the_type_to_pin(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path
) -> None:
    # The server has ed25519 and ecdsa keys; the plugin negotiates ed25519 first, so only
    # that key's fingerprint can match, and the message must say which key to pin.
    ecdsa = fingerprint_of(config.server.server_dir / "ssh_host_ecdsa_key.pub")
    cfg = config.write("pinned_ecdsa.yaml", known_hosts_file=str(tmp_path / "absent_known_hosts"),
                       host_key_fingerprint=ecdsa)
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert "ssh-ed25519" in message
    assert config.server.host_fingerprint in message
    assert list(config.remote_dir.iterdir()) == []


def test_mismatching_host_key_fingerprint_pin_fails(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                    tmp_path: Path) -> None:
    other = fingerprint_of(keygen(tmp_path / "other_key").with_suffix(".pub"))
    cfg = config.write("mispinned.yaml", host_key_fingerprint=other)
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert other in message
    assert list(config.remote_dir.iterdir()) == []


# ---------------------------------------------------------------- authentication and connection


def test_wrong_user_key_fails_with_an_auth_message_and_is_not_retried(plugin: Plugin, config: SiteConfig,
                                                                      backup: LocalBackup, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger_key")
    cfg = config.write("wrong_key.yaml", identity_file=str(stranger), retries=4)
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert "authentication" in message.lower()
    assert str(config.server.options()["username"]) in message
    assert list(config.remote_dir.iterdir()) == []
    assert "retrying" not in config.log_text().lower(), "a refused key must not be retried (account lockout)"


def test_missing_identity_file_fails_naming_it(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                               tmp_path: Path) -> None:
    missing = tmp_path / "no_such_key"
    cfg = config.write("missing_key.yaml", identity_file=str(missing))
    assert str(missing) in plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')


def configured_port(cfg: Path) -> int:
    return int(yaml.safe_load(cfg.read_text())["options"]["port"])


def test_closed_port_fails_with_a_connection_message(plugin: Plugin, config: SiteConfig,
                                                     backup: LocalBackup) -> None:
    cfg = config.closed_port()  # retries: 1
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert "connect" in message.lower()
    assert f"127.0.0.1:{configured_port(cfg)}" in message


def test_closed_port_failure_after_retries_says_how_many_attempts(plugin: Plugin, config: SiteConfig,
                                                                  backup: LocalBackup) -> None:
    cfg = config.closed_port("closed_two.yaml", retries=2, retry_max_wait=1)
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert f"127.0.0.1:{configured_port(cfg)}" in message
    assert "2 attempts" in message


# ---------------------------------------------------------------- secrets


def authorize(server: SshServer, key: Path) -> str:
    """Add a public key to the server's authorized_keys; return the previous content."""
    original = server.authorized_keys.read_text()
    server.authorized_keys.write_text(original + key.with_suffix(".pub").read_text())
    return original


def test_encrypted_identity_file_with_its_passphrase_authenticates(plugin: Plugin, fresh_config: SiteConfig,
                                                                    backup: LocalBackup, tmp_path: Path) -> None:
    encrypted = keygen(tmp_path / "encrypted_key", passphrase=PASSPHRASE)
    authorize(fresh_config.server, encrypted)
    cfg = fresh_config.write("encrypted.yaml", identity_file=str(encrypted), identity_passphrase=PASSPHRASE)
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(fresh_config.remote_dir).is_dir()


def test_encrypted_identity_file_without_passphrase_fails_naming_it(plugin: Plugin, config: SiteConfig,
                                                                    backup: LocalBackup, tmp_path: Path) -> None:
    encrypted = keygen(tmp_path / "encrypted_key", passphrase=PASSPHRASE)
    cfg = config.write("no_passphrase.yaml", identity_file=str(encrypted))
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert str(encrypted) in message and "passphrase" in message


def test_password_and_passphrase_never_reach_the_log_or_stderr(plugin: Plugin, fresh_config: SiteConfig,
                                                               backup: LocalBackup, tmp_path: Path) -> None:
    server = fresh_config.server
    encrypted = keygen(tmp_path / "encrypted_key", passphrase=PASSPHRASE)
    original_keys = authorize(server, encrypted)
    # session_idle 0: every call logs in anew, so the last one (its key revoked) must try the password.
    secrets = {"identity_file": str(encrypted), "identity_passphrase": PASSPHRASE, "password": PASSWORD,
               "log_level": "debug", "session_idle": 0}
    cfg = fresh_config.write("secrets.yaml", **secrets)
    wrong = fresh_config.write("wrong_passphrase.yaml", **{**secrets, "identity_passphrase": PASSPHRASE + "-wrong"})
    bad = fresh_config.write("bad.yaml", **secrets, port="not-a-port")
    key = backup.file(f"gpbackup_0_{backup.timestamp}")
    # Calls that should succeed, then failing ones: a wrong passphrase, an invalid config holding the
    # secrets, and a key the server no longer accepts (so the password is tried). Whatever their outcome,
    # the secrets must not show.
    calls: list[tuple[list[str | Path], bytes]] = [
        (["setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"'], b""),
        (["backup_data", cfg, key], b"payload"),
        (["restore_data", cfg, key], b""),
        (["list_directory", cfg], b""),
        (["restore_data", wrong, key], b""),
        (["restore_data", bad, key], b""),
    ]
    stderr = b""
    for args, stdin in calls:
        stderr += plugin.run(*args, stdin=stdin).stderr
    server.authorized_keys.write_text(original_keys)
    result = plugin.run("restore_data", cfg, key)
    assert result.returncode != 0
    stderr += result.stderr
    logs = fresh_config.log_text()
    assert logs.count("restore_data") >= 3 and "backup_data" in logs, "the calls above must have been logged"
    for secret in (PASSPHRASE, PASSWORD, PASSPHRASE + "-wrong"):
        assert secret.encode() not in stderr
        assert secret not in logs
    # Not even a fragment long enough to identify one.
    assert "Sekrit" not in logs and b"Sekrit" not in stderr


# ---------------------------------------------------------------- the remote_dir boundary


def test_delete_directory_through_a_symlink_never_deletes_outside_remote_dir(plugin: Plugin, config: SiteConfig,
                                                                             tmp_path: Path) -> None:
    outside = tmp_path / "outside_remote_dir"
    outside.mkdir()
    (outside / "precious").write_bytes(b"not a backup")
    os.symlink(outside, config.remote_dir / "link")
    plugin.run("delete_directory", config.path, "link")
    assert (outside / "precious").read_bytes() == b"not a backup"


def test_delete_backup_through_a_symlinked_backup_dir_never_deletes_outside_remote_dir(
        plugin: Plugin, config: SiteConfig, tmp_path: Path) -> None:
    outside = tmp_path / "outside_remote_dir"
    outside.mkdir()
    (outside / "precious").write_bytes(b"not a backup")
    date_dir = config.remote_dir / "backups" / "20261124"
    date_dir.mkdir(parents=True)
    os.symlink(outside, date_dir / "20261124093000")
    plugin.run("delete_backup", config.path, "20261124093000")
    assert (outside / "precious").read_bytes() == b"not a backup"
