"""Option values reach the plugin as the text the admin wrote, as gpbackup reads them: the installed plugin
against a real sshd, with a config file written by hand (unquoted values, not a YAML dump)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig, assert_failed


def hand_written(config: SiteConfig, name: str, **extra: str) -> Path:
    """The test's config as an admin types it: every value unquoted, `extra` lines included."""
    options = {**config.server.options(remote_dir=str(config.remote_dir), log_dir=str(config.log_dir)), **extra}
    path = config.directory / name
    path.write_text("executablepath: gpbackup_sftp_plugin\noptions:\n"
                    + "".join(f"  {key}: {value}\n" for key, value in options.items()))
    return path


def test_a_passphrase_of_digits_with_a_leading_zero_unlocks_its_key(plugin: Plugin, config: SiteConfig,
                                                                    backup: LocalBackup) -> None:
    # YAML 1.1 reads 012345 as the octal number 5349; gpbackup reads the text "012345".
    key = config.directory / "id_ed25519_pass"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "012345", "-f", str(key)], check=True)
    with open(config.server.authorized_keys, "a") as authorized:
        authorized.write(key.with_suffix(".pub").read_text())
    path = hand_written(config, "passphrase.yaml", identity_file=str(key), identity_passphrase="012345")

    plugin.ok("backup_data", path, backup.file(f"gpbackup_0_{backup.timestamp}"), stdin=b"rows")

    assert plugin.ok("restore_data", path, backup.file(f"gpbackup_0_{backup.timestamp}")).stdout == b"rows"


def test_restore_subset_takes_only_the_words_gprestore_reads(plugin: Plugin, config: SiteConfig,
                                                              backup: LocalBackup) -> None:
    refused = plugin.run("setup_plugin_for_restore", hand_written(config, "subset.yaml", restore_subset="yes"),
                         backup.path, "segment", "0")
    assert refused.returncode == 2 and "restore_subset" in assert_failed(refused)
    plugin.ok("setup_plugin_for_restore", hand_written(config, "subset_on.yaml", restore_subset="on"),
              backup.path, "segment", "0")
