"""connection.session_key: the same key for the same effective connection, computed once while nothing it was
computed from changes (a fork-server worker asks at every call), and a new one as soon as anything does.

Files in a temporary HOME, no network: the key is a digest of options, files and environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sftp_plugin import connection
from sftp_plugin.config import PluginConfig

pytestmark = pytest.mark.unit


class Site:
    """A HOME with ~/.ssh/config, a known_hosts file and a key; counts how often ~/.ssh/config is resolved."""

    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.home = home
        self.ssh = home / ".ssh"
        self.ssh.mkdir()
        self.ssh_config = self.ssh / "config"
        self.ssh_config.write_text("Host backup\n    HostName 192.0.2.10\n    IdentityFile ~/.ssh/id_backup\n")
        self.known_hosts = home / "known_hosts"
        self.known_hosts.write_text("192.0.2.10 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n")
        (self.ssh / "id_backup").write_text("key one\n")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        monkeypatch.chdir(home)
        monkeypatch.setattr(connection, "_key_memo", {})
        self.resolved = 0
        resolve = connection.resolve_endpoint

        def counting(*args: object, **kwargs: object) -> connection.Endpoint:
            self.resolved += 1
            return resolve(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(connection, "resolve_endpoint", counting)

    def cfg(self, **options: object) -> PluginConfig:
        values: dict[str, object] = {"hostname": "backup", "remote_dir": "/srv/gpbackup",
                                     "known_hosts_file": str(self.known_hosts)}
        values.update(options)
        return PluginConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    return Site(tmp_path, monkeypatch)


def rewrite_keeping_size_and_mtime(path: Path, text: str) -> None:
    info = path.stat()
    assert len(text.encode()) == info.st_size
    path.write_text(text)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_a_key_is_computed_once_while_nothing_it_depends_on_changes(site: Site) -> None:
    first = connection.session_key(site.cfg())
    assert [connection.session_key(site.cfg()) for _ in range(3)] == [first] * 3
    assert site.resolved == 1


def test_a_changed_option_gives_another_key(site: Site) -> None:
    assert connection.session_key(site.cfg()) != connection.session_key(site.cfg(retries=5))


def test_known_hosts_rewritten_with_its_size_and_mtime_kept_gives_another_key(site: Site) -> None:
    before = connection.session_key(site.cfg())
    rewrite_keeping_size_and_mtime(site.known_hosts, "192.0.2.10 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n")
    assert connection.session_key(site.cfg()) != before
    assert site.resolved == 2


def test_a_changed_hostname_in_ssh_config_gives_another_key(site: Site) -> None:
    before = connection.session_key(site.cfg())
    site.ssh_config.write_text(site.ssh_config.read_text().replace("192.0.2.10", "192.0.2.11"))
    assert connection.session_key(site.cfg()) != before


def test_an_identity_file_ssh_config_names_gives_another_key_when_it_appears(site: Site) -> None:
    site.ssh_config.write_text(site.ssh_config.read_text() + "    IdentityFile ~/.ssh/id_later\n")
    before = connection.session_key(site.cfg())
    (site.ssh / "id_later").write_text("key two\n")
    assert connection.session_key(site.cfg()) != before


def test_a_rewritten_identity_file_gives_another_key(site: Site) -> None:
    before = connection.session_key(site.cfg())
    rewrite_keeping_size_and_mtime(site.ssh / "id_backup", "key two\n")
    assert connection.session_key(site.cfg()) != before


def test_another_ssh_agent_gives_another_key(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    before = connection.session_key(site.cfg())
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    assert connection.session_key(site.cfg()) != before


def test_a_relative_known_hosts_file_is_found_from_the_working_directory(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "known_hosts").write_text("192.0.2.10 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC\n")
    here = connection.session_key(site.cfg(known_hosts_file="known_hosts"))
    monkeypatch.chdir(other)
    assert connection.session_key(site.cfg(known_hosts_file="known_hosts")) != here


def test_an_ssh_config_with_match_exec_is_resolved_at_every_call(site: Site) -> None:
    # (for another host: paramiko checks the host first and never runs the command, but the rule stands)
    site.ssh_config.write_text('Match host other exec "true"\n    Port 2222\n' + site.ssh_config.read_text())
    connection.session_key(site.cfg())
    connection.session_key(site.cfg())
    assert site.resolved == 2


def test_the_backup_host_is_the_one_ssh_config_resolves_to_and_is_remembered_with_the_key(site: Site) -> None:
    assert connection.connection_key(site.cfg()).backup_host == "192.0.2.10:22"
    connection.session_key(site.cfg())
    assert connection.connection_key(site.cfg(hostname="192.0.2.10")).backup_host == "192.0.2.10:22"
    assert connection.connection_key(site.cfg(hostname="Other.Example", port=2222)).backup_host == "other.example:2222"
    assert site.resolved == 3  # once per config: the key of the first came with its backup host
