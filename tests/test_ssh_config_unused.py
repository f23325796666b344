"""Unit tests of ssh_config_unused.py: which ~/.ssh/config options set for the host `check` names, read the way
paramiko's SSHConfig reads them."""

from __future__ import annotations

import sys

import paramiko
import pytest

from sftp_plugin.config import parse_options
from sftp_plugin.ssh_config_unused import unused_options

# As cli.py does for every call: paramiko's "Match exec" needs `invoke`, which the plugin keeps out.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
CFG = parse_options({"hostname": "backup", "remote_dir": "/srv/gpbackup", "known_hosts_file": "/etc/gp/known_hosts"})


def named(text: str, cfg: object = CFG) -> dict[str, str]:
    """Keyword -> what the plugin does instead, for an ssh_config text looked up for host `backup`."""
    found = paramiko.SSHConfig.from_text(text).lookup("backup")
    return {option.keyword: option.instead for option in unused_options(found, cfg)}  # type: ignore[arg-type]


def test_options_that_change_the_connection_are_named_with_what_the_plugin_does_instead() -> None:
    found = named("Host backup\n  Ciphers aes256-ctr\n  UserKnownHostsFile ~/.ssh/other\n"
                  "  StrictHostKeyChecking no\n  ConnectTimeout 5\n  BindAddress 10.0.0.1\n")
    assert set(found) == {"Ciphers", "UserKnownHostsFile", "StrictHostKeyChecking", "ConnectTimeout", "BindAddress"}
    assert "Supported algorithms" in found["Ciphers"]
    assert found["UserKnownHostsFile"] == "use known_hosts_file (now /etc/gp/known_hosts)"
    assert found["StrictHostKeyChecking"] == "use strict_host_key_checking (now yes)"
    assert found["ConnectTimeout"] == "use connect_timeout (now 30 s)"


def test_options_from_a_host_star_block_count_and_other_hosts_blocks_do_not() -> None:
    found = named("Host other\n  Ciphers aes256-ctr\nHost *\n  KexAlgorithms curve25519-sha256\n")
    assert set(found) == {"KexAlgorithms"}


@pytest.mark.parametrize(
    "line",
    [
        "StrictHostKeyChecking yes",
        "UserKnownHostsFile /etc/gp/known_hosts ~/.ssh/known_hosts2",
        "ConnectTimeout 30",
        "PasswordAuthentication no",
        "PubkeyAuthentication yes",
        "GSSAPIAuthentication no",
        "CheckHostIP no",
        "AddressFamily any",
        "Compression no",
        "IdentitiesOnly no",
    ],
)
def test_a_value_meaning_what_the_plugin_does_anyway_is_not_named(line: str) -> None:
    assert named(f"Host backup\n  {line}\n") == {}


def test_options_that_do_not_change_the_connection_or_are_honoured_are_not_named() -> None:
    text = ("Host backup\n  HostName 10.1.1.1\n  Port 2222\n  User gp\n  IdentityFile ~/.ssh/id_gp\n"
            "  ProxyJump bastion\n  HostKeyAlias backup\n  SendEnv LANG\n  HashKnownHosts yes\n  LocalForward 1 h:2\n")
    assert named(text) == {}


def test_include_is_named_because_paramiko_does_not_follow_it() -> None:
    assert set(named("Include ~/.ssh/config.d/*\nHost backup\n  Port 2222\n")) == {"Include"}

