"""Every SSH session the plugin opens ends with a clean SSH disconnect, never a TCP reset.

The backup host's sshd logs a connection the client resets ("Read error from remote
host ...: Connection reset by peer") or drops without a DISCONNECT as an error; a
backup of many calls then leaves a log full of them, and an operator reading the
backup host's log cannot tell them from real failures. Over calls that all succeed,
with the fork server and its warm sessions (closed later by stop-fork-server,
session_idle or the end of the backup) and with fork_server: no, the test sshd's log
(LogLevel VERBOSE) has no error line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig, assert_ok, socket_dir_env
from devtools.sshd import SshServer
from tests.helpers import own_fork_server, sha256, wait_until

# What sshd logs when a client goes away uncleanly (a reset, a cut mid-packet, a stalled peer).
ERROR_LINE = re.compile(r"Connection reset|Read error|error:|Connection corrupted|Broken pipe|"
                        r"Timeout, client not responding", re.IGNORECASE)


def error_lines(server: SshServer) -> list[str]:
    return [line for line in server.log_text().splitlines() if ERROR_LINE.search(line)]


def disconnects(server: SshServer) -> int:
    """Sessions the client ended with SSH_MSG_DISCONNECT (sshd logs one such line for each)."""
    return len(re.findall(r"Received disconnect from .*: ?11:", server.log_text()))


def logins(server: SshServer) -> int:
    return len(re.findall(r"Accepted publickey", server.log_text()))


@pytest.fixture
def socket_dir(fresh_config: SiteConfig) -> Iterator[Path]:
    with own_fork_server(fresh_config, "gpsftp-cd.") as tmpdir:
        yield tmpdir


def round_trip(plugin: Plugin, config: Path, backup: LocalBackup, socket_dir: Path, label: str,
               end_backup: bool = True) -> None:
    """What one segment does in a backup and a restore: setup, two data streams and a file, read back; then,
    with ``end_backup``, the cleanup that closes the segment host's kept sessions."""
    env = socket_dir_env(socket_dir)

    def run(*args: str | Path, stdin: bytes = b"") -> bytes:
        return assert_ok(plugin.run(*args, stdin=stdin, env_extra=env)).stdout

    run("setup_plugin_for_backup", config, backup.path, "segment", "0")
    streams = {backup.file(f"gpbackup_0_{label}_{n}"): os.urandom(50_000 + 300_000 * n) for n in range(2)}
    for key, data in streams.items():
        run("backup_data", config, key, stdin=data)
    toc = backup.file(f"gpbackup_{label}_toc.yaml")
    toc.write_bytes(b"toc: " + label.encode() + b"\n")
    run("backup_file", config, toc)
    toc.unlink()
    for key, data in streams.items():
        assert sha256(run("restore_data", config, key)) == sha256(data)
    run("restore_file", config, toc)
    if end_backup:
        run("cleanup_plugin_for_backup", config, backup.path, "segment_host", "0")


def test_no_error_on_the_backup_host_for_calls_through_the_fork_server_and_warm_sessions(
        plugin: Plugin, fresh_config: SiteConfig, fresh_sshd: SshServer, backup: LocalBackup,
        socket_dir: Path) -> None:
    round_trip(plugin, fresh_config.path, backup, socket_dir, "warm")
    # Kept sessions closed by the end of a backup (above), by stop-fork-server and by session_idle.
    idle = fresh_config.write("idle.yaml", session_idle=1)
    round_trip(plugin, idle, backup, socket_dir, "idle", end_backup=False)
    assert wait_until(lambda: "without a call (session_idle)" in fresh_config.log_text()), "no session idled out"
    round_trip(plugin, fresh_config.path, backup, socket_dir, "stopped", end_backup=False)
    assert_ok(plugin.run("stop-fork-server", env_extra=socket_dir_env(socket_dir)))
    # Every session, a call's own or a kept one, ended with a DISCONNECT.
    assert wait_until(lambda: disconnects(fresh_sshd) == logins(fresh_sshd)), fresh_sshd.log_text()[-3000:]
    assert logins(fresh_sshd) >= 3
    assert error_lines(fresh_sshd) == [], "\n".join(error_lines(fresh_sshd))


def test_no_error_on_the_backup_host_for_calls_without_the_fork_server(
        plugin: Plugin, fresh_config: SiteConfig, fresh_sshd: SshServer, backup: LocalBackup,
        socket_dir: Path) -> None:
    path = fresh_config.write("no_server.yaml", fork_server="no")
    round_trip(plugin, path, backup, socket_dir, "cold")
    # Every session, a call's own or a kept one, ended with a DISCONNECT.
    assert wait_until(lambda: disconnects(fresh_sshd) == logins(fresh_sshd)), fresh_sshd.log_text()[-3000:]
    assert logins(fresh_sshd) >= 6  # a session per call (but setup in segment scope, which needs none)
    assert error_lines(fresh_sshd) == [], "\n".join(error_lines(fresh_sshd))
