"""`check --cluster`: check run on every host over ssh, one summary line per host.

The "cluster" is host aliases in an ssh_config that map to the test sshd on 127.0.0.1 (or to a port where
nothing listens, for a host that is down). OpenSSH reads ~/.ssh/config from the passwd entry's home, not
$HOME, so the isolated HOME's file is handed to ssh with SSH_OPTS="-F ...", as an admin passes options to
scripts/install-cluster.sh. Each host's check runs as this user on this machine, with a copy of the config.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from devtools.harness import Plugin, SiteConfig, assert_failed
from devtools.sshd import SshServer, free_port

# Where each host's check keeps its copy of the config while it runs (removed afterwards).
REMOTE_COPIES = "/tmp/gpbackup_sftp_plugin_check.*"


def ssh_config(plugin: Plugin, server: SshServer, up: list[str], down: list[str]) -> dict[str, str]:
    """Write ~/.ssh/config with aliases for the test sshd (``up``) and for a closed port (``down``); return
    the SSH_OPTS that hand it to ssh."""
    ssh_dir = plugin.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    closed = free_port()
    blocks = [
        f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {server.options()['username']}\n"
        f"  IdentityFile {server.user_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {server.known_hosts}\n"
        "  StrictHostKeyChecking yes\n"
        for aliases, port in ((up, server.port), (down, closed)) for alias in aliases
    ]
    path = ssh_dir / "config"
    path.write_text("".join(blocks))
    path.chmod(0o600)
    return {"SSH_OPTS": f"-F {path}"}


def summary(output: str, host: str) -> str:
    match = re.search(rf"^  {re.escape(host)}\s+(.*)$", output, re.M)
    assert match, f"no summary line for {host}:\n{output}"
    return match.group(1)


def test_check_cluster_reports_each_host_and_fails_for_the_one_that_is_down(plugin: Plugin,
                                                                            config: SiteConfig) -> None:
    env = ssh_config(plugin, config.server, up=["sdw1", "sdw2"], down=["sdw3"])
    hosts = plugin.home / "hostfile"
    hosts.write_text("# the cluster\nsdw1\n\nsdw2   # second\nsdw3\nsdw1\n")
    copies_before = set(glob.glob(REMOTE_COPIES))

    result = plugin.run("check", config.path, "--cluster", hosts, "--probe-mib", "1", env_extra=env)
    output = result.stdout.decode()

    assert result.returncode == 1, output + result.stderr.decode()
    assert result.stderr == b""
    assert "on 3 hosts" in output, "comments, blanks and duplicates are dropped"
    assert summary(output, "sdw1").startswith("OK"), output
    assert summary(output, "sdw2").startswith("OK"), output
    down = summary(output, "sdw3")
    assert down.startswith("FAILED") and "Connection refused" in down, output
    assert "1 of 3 hosts FAILED" in output
    assert set(glob.glob(REMOTE_COPIES)) == copies_before, "each host's copy of the config is removed"


def test_check_cluster_names_how_many_checks_failed_on_a_host_and_the_first(plugin: Plugin,
                                                                            config: SiteConfig) -> None:
    env = ssh_config(plugin, config.server, up=["sdw1"], down=[])
    hosts = plugin.home / "hostfile"
    hosts.write_text("sdw1\n")
    missing = config.remote_dir / "not-created"

    result = plugin.run("check", config.write("missing.yaml", remote_dir=str(missing)), "--cluster", hosts,
                        "--probe-mib", "0", env_extra=env)
    output = result.stdout.decode()

    assert result.returncode == 1, output
    line = summary(output, "sdw1")
    assert line.startswith("1 FAILED"), output
    assert re.search(rf"FAIL remote_dir .*{re.escape(str(missing))}", line), line


def test_check_cluster_without_a_host_file_asks_psql_for_the_hosts(plugin: Plugin, config: SiteConfig,
                                                                   tmp_path: Path) -> None:
    env = ssh_config(plugin, config.server, up=["sdw1", "mdw"], down=[])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    psql = bin_dir / "psql"  # stands in for the coordinator's psql: the query's answer, as -At prints it
    psql.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/psql_args\nprintf "mdw\\nsdw1\\n"\n')
    psql.chmod(0o755)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"

    result = plugin.run("check", config.path, "--cluster", "--probe-mib", "0", env_extra=env)
    output = result.stdout.decode()

    assert result.returncode == 0, output + result.stderr.decode()
    assert summary(output, "mdw").startswith("OK") and summary(output, "sdw1").startswith("OK"), output
    assert "select distinct hostname from gp_segment_configuration" in (tmp_path / "psql_args").read_text()


def test_check_cluster_fails_with_one_line_when_psql_cannot_list_the_hosts(plugin: Plugin, config: SiteConfig,
                                                                           tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    psql = bin_dir / "psql"
    psql.write_text('#!/bin/sh\necho "psql: error: connection to server on socket failed" >&2\nexit 2\n')
    psql.chmod(0o755)

    result = plugin.run("check", config.path, "--cluster", env_extra={"PATH": f"{bin_dir}:/usr/bin:/bin"})

    line = assert_failed(result)
    assert "psql" in line and "connection to server" in line and "--cluster HOSTFILE" in line


# ---------------------------------------------------------------- the pure parts


def test_host_files_keep_the_first_word_of_each_line_once_without_comments() -> None:
    from sftp_plugin.cluster import parse_hosts

    assert parse_hosts("# hosts\nmdw\n  sdw1 extra words\n\nsdw2#inline\nmdw\n   # indented comment\n") == [
        "mdw", "sdw1", "sdw2"]


def test_a_host_without_the_plugin_is_reported_as_not_installed() -> None:
    from sftp_plugin.cluster import COMMAND_NOT_FOUND, judge

    result = judge("sdw1", COMMAND_NOT_FOUND, "", "sh: 1: /opt/p/bin/gpbackup_sftp_plugin: not found\n",
                   "/opt/p/bin/gpbackup_sftp_plugin")
    assert not result.ok
    assert result.summary.startswith("FAILED: /opt/p/bin/gpbackup_sftp_plugin is not installed there")
