"""Warm sessions: a fork-server worker keeps its SSH session for the next call of the same config.

Logins are counted where the backup host sees them ("Accepted publickey" in
the test sshd's log, LogLevel INFO), sessions ending likewise ("Disconnected
from user"). Each test has its own sshd and its own fork server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools.delayproxy import DelayProxy
from devtools.gpbackup import LocalBackup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig, assert_ok, socket_dir_env
from devtools.sshd import SshServer, known_hosts_line
from sftp_plugin import forkserver, paths
from sftp_plugin.blocks import BLOCK_SIZE
from tests.helpers import alive, finish, own_fork_server, sha256, wait_until

NOBODY = 65534
# Where Debian's openssh-sftp-server (a dependency of openssh-server) puts the program.
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


class Warm:
    """The plugin with a fork server of its own, and what its backup host saw."""

    def __init__(self, plugin: Plugin, config: SiteConfig, server: SshServer, tmpdir: Path) -> None:
        self.plugin, self.config, self.server, self.tmpdir = plugin, config, server, tmpdir

    def run(self, command: str, *args: str | Path, stdin: bytes = b"",
            config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.plugin.run(command, config or self.config.path, *args, stdin=stdin,
                               env_extra=socket_dir_env(self.tmpdir))

    def logins(self) -> int:
        return len(re.findall(r"Accepted publickey", self.server.log_text()))

    def disconnects(self) -> int:
        return len(re.findall(r"Disconnected from user", self.server.log_text()))

    def server_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"fork server (\d+) serving", self.config.log_text())]

    def start_server(self, backup: LocalBackup, config: Path | None = None) -> None:
        assert_ok(self.run("setup_plugin_for_backup", backup.path, "segment", "0", config=config))
        assert wait_until(lambda: self.server_pids()), "no fork server came up"

    def store(self, backup: LocalBackup, name: str, data: bytes, config: Path | None = None) -> Path:
        key = backup.file(name)
        assert_ok(self.run("backup_data", key, stdin=data, config=config))
        return key

    def restored(self, key: Path, config: Path | None = None) -> bytes:
        return assert_ok(self.run("restore_data", key, config=config)).stdout

    def storing(self, backup: LocalBackup, name: str, config: Path | None = None) -> subprocess.Popen[bytes]:
        """A backup_data call that keeps its worker busy until its input ends (communicate)."""
        return self.plugin.popen("backup_data", config or self.config.path, backup.file(name),
                                 stdin=subprocess.PIPE, env_extra=socket_dir_env(self.tmpdir))

    def slow_link_config(self, proxy: DelayProxy, name: str, **options: object) -> Path:
        """A config `name` for the backup host through `proxy` (its delay on every packet), its key known there."""
        port = proxy.forward(("127.0.0.1", self.server.port))
        known_hosts = self.tmpdir / "proxy_known_hosts"
        known_hosts.write_text(known_hosts_line(self.server.server_dir, "127.0.0.1", port))
        return self.config.write(name, port=port, known_hosts_file=str(known_hosts), **options)

    @contextlib.contextmanager
    def busy_and_waiting(self, backup: LocalBackup, config: Path,
                         waited: str) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
        """A call that holds its worker (gpbackup_0_busy, its input open) and, once it runs, a second one
        (gpbackup_0_waiting), yielded when the log says `waited`; either still running at the end is killed."""
        with killed_at_the_end() as calls:
            calls.append(self.storing(backup, "gpbackup_0_busy", config=config))
            assert wait_until(lambda: self.worker_of("gpbackup_0_busy")), "the busy call never started"
            calls.append(self.storing(backup, "gpbackup_0_waiting", config=config))
            assert wait_until(lambda: waited in self.config.log_text()), "the call never waited"
            yield calls[0], calls[1]

    def two_runs(self, backup: LocalBackup, max_connections: int) -> tuple[Path, Path]:
        """Two configs to this backup host (two runs' copies of one), the first's call starting the server,
        then one upload through each."""
        first = self.config.write("run_a.yaml", max_connections=max_connections)
        second = self.config.write("run_b.yaml", max_connections=max_connections)
        self.start_server(backup, first)
        self.store(backup, "gpbackup_0_a", b"a" * 1000, config=first)
        self.store(backup, "gpbackup_0_b", b"b" * 1000, config=second)
        return first, second

    def worker_of(self, name: str) -> int | None:
        """The pid of the worker that started the call storing `name` (the log names it), None before."""
        found = re.search(rf"\[(\d+)\] INFO backup_data: start \S*/{name}\b", self.config.log_text())
        return int(found[1]) if found else None

    def session_children(self) -> list[int]:
        """The backup host's per-connection sshd processes (children of the listening sshd)."""
        assert self.server.process is not None
        listener = self.server.process.pid
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_bytes()
                except OSError:
                    continue
                if int(stat[stat.rfind(b")") + 2:].split()[1]) == listener:
                    children.append(int(entry))
        return children


@contextlib.contextmanager
def killed_at_the_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list for the calls a test starts; any still running when the block ends is killed."""
    calls: list[subprocess.Popen[bytes]] = []
    try:
        yield calls
    finally:
        for call in calls:
            if call.poll() is None:
                call.kill()


@pytest.fixture
def warm(plugin: Plugin, fresh_config: SiteConfig, fresh_sshd: SshServer) -> Iterator[Warm]:
    with own_fork_server(fresh_config, "gpsftp-ws.") as tmpdir:
        yield Warm(plugin, fresh_config, fresh_sshd, tmpdir)


@pytest.fixture
def warm_logged(plugin: Plugin, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Warm, Path]]:
    """A Warm whose backup host's sftp-server logs each request it serves (opens, renames) to a file of its
    own (internal-sftp logs only to syslog); that file."""
    if not SFTP_SERVER.exists():
        pytest.skip(f"no {SFTP_SERVER}")
    workdir = tmp_path / "sshd_logged"
    workdir.mkdir()
    log = workdir / "sftp-server.log"
    with SshServer(workdir, extra_config=f"ForceCommand {SFTP_SERVER} -e -l INFO 2>>{log}\n") as server:
        config = SiteConfig.create(server, tmp_path, request.node.name)
        with own_fork_server(config, "gpsftp-wl.") as tmpdir:
            yield Warm(plugin, config, server, tmpdir), log


@pytest.fixture
def warm_client_alive(plugin: Plugin, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Warm]:
    """A Warm whose backup host checks that its clients are alive as hardened sshd configs do, only faster:
    a keepalive request after 1 s of silence, and the connection dropped when one goes unanswered."""
    workdir = tmp_path / "sshd_client_alive"
    workdir.mkdir()
    with SshServer(workdir, extra_config="ClientAliveInterval 1\nClientAliveCountMax 1\n") as server:
        config = SiteConfig.create(server, tmp_path, request.node.name)
        with own_fork_server(config, "gpsftp-ca.") as tmpdir:
            yield Warm(plugin, config, server, tmpdir)


def spare_files(directory: Path) -> list[Path]:
    """The files a warm worker holds open in `directory` for its next upload there."""
    return sorted(p for p in directory.iterdir() if paths.is_spare_name(p.name)) if directory.is_dir() else []


def test_sequential_calls_of_one_config_log_in_once(warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    before = warm.logins()
    stored = {}
    for number in range(6):
        data = os.urandom(1000 + 70_000 * number)
        stored[warm.store(backup, f"gpbackup_0_seq_{number}", data)] = data
    for key, data in stored.items():
        assert sha256(warm.restored(key)) == sha256(data)
    assert warm.logins() - before == 1
    assert len(re.findall(r"fork server worker", warm.config.log_text())) == 12


def test_a_session_whose_sshd_child_was_killed_between_calls_is_replaced_and_no_byte_is_lost(
        warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    first = os.urandom(200_000)
    first_key = warm.store(backup, "gpbackup_0_before_kill", first)
    logins = warm.logins()
    (child,) = warm.session_children()  # the kept session's sshd process on the backup host
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: not alive(child))

    second = os.urandom(3 * 1024 * 1024 + 5)  # more than one block: digests and data both stored
    second_key = warm.store(backup, "gpbackup_0_after_kill", second)
    assert sha256(warm.restored(second_key)) == sha256(second)
    assert sha256(warm.restored(first_key)) == sha256(first)
    assert warm.logins() == logins + 1


def test_a_session_frozen_mid_call_is_replaced_by_the_retry_policy(warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("short_timeout.yaml", io_timeout=2)
    warm.start_server(backup, path)
    warm.store(backup, "gpbackup_0_warm_up", b"x" * 1000, config=path)
    (child,) = warm.session_children()
    os.kill(child, signal.SIGSTOP)  # the kept session looks alive, and never answers again
    try:
        data = os.urandom(100_000)
        key = warm.store(backup, "gpbackup_0_frozen", data, config=path)
        assert sha256(warm.restored(key, config=path)) == sha256(data)
    finally:
        os.kill(child, signal.SIGKILL)
    assert "the kept session to" in warm.config.log_text()


@pytest.mark.parametrize("change", ["the config", "known_hosts", "the identity file"])
def test_a_changed_config_known_hosts_or_key_gets_a_new_session(warm: Warm, backup: LocalBackup,
                                                                change: str) -> None:
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_one", b"1" * 1000)
    warm.store(backup, "gpbackup_0_two", b"2" * 1000)
    logins = warm.logins()
    if change == "the config":
        warm.config.write(retries=5)  # the same file, one option different
    elif change == "known_hosts":
        with open(warm.server.known_hosts, "a") as known:
            known.write("# reviewed\n")
    else:
        key = warm.server.user_key
        key.write_bytes(key.read_bytes())  # same key, rewritten: the content is what counts
        os.utime(key, ns=(0, 0))
        shutil.copy(key, key.with_name("id_copy"))
        warm.config.write(identity_file=str(key.with_name("id_copy")))
    warm.store(backup, "gpbackup_0_three", b"3" * 1000)
    warm.store(backup, "gpbackup_0_four", b"4" * 1000)
    assert warm.logins() == logins + 1
    # The session of before the change does not outlive it: one session is left, the new one.
    assert wait_until(lambda: len(warm.session_children()) == 1), warm.session_children()


def test_an_idle_session_closes_after_session_idle(warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("short_idle.yaml", session_idle=1)
    warm.start_server(backup, path)
    warm.store(backup, "gpbackup_0_idle", b"x" * 1000, config=path)
    assert warm.session_children(), "no session kept"
    assert wait_until(lambda: not warm.session_children(), timeout=10), "the idle session stayed open"
    assert "without a call (session_idle)" in warm.config.log_text()
    before = warm.logins()
    warm.store(backup, "gpbackup_0_after_idle", b"y" * 1000, config=path)
    assert warm.logins() == before + 1


def test_a_kept_session_answers_the_backup_hosts_keepalives_and_is_reused_after_them(
        warm_client_alive: Warm, backup: LocalBackup) -> None:
    warm = warm_client_alive
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_before_keepalives", b"a" * 1000)
    logins = warm.logins()
    time.sleep(4)  # several of the backup host's keepalives, each dropping a session that leaves it unanswered
    data = os.urandom(300_000)
    key = warm.store(backup, "gpbackup_0_after_keepalives", data)
    assert sha256(warm.restored(key)) == sha256(data)
    assert warm.logins() == logins
    assert "not responding" not in warm.server.log_text()


def test_session_idle_0_and_fork_server_no_keep_no_session(warm: Warm, backup: LocalBackup) -> None:
    for name, option in (("no_idle.yaml", {"session_idle": 0}), ("no_server.yaml", {"fork_server": "no"})):
        path = warm.config.write(name, **option)
        warm.start_server(backup)  # a server runs (started by the default config)
        before = warm.logins()
        for number in range(3):
            warm.store(backup, f"gpbackup_0_{name}_{number}", b"z" * 1000, config=path)
        assert warm.logins() == before + 3, name
        assert wait_until(lambda: not warm.session_children()), name


def test_a_call_whose_config_says_fork_server_no_runs_in_its_own_process_while_a_server_runs(
        warm: Warm, backup: LocalBackup) -> None:
    # Under its caller's resource limits and control group, not the server's, whichever config started it.
    path = warm.config.write("no_server.yaml", fork_server="no")
    warm.start_server(backup)  # by the default config
    data = os.urandom(5000)
    for number in range(2):
        key = warm.store(backup, f"gpbackup_0_own_process_{number}", data, config=path)
        assert sha256(warm.restored(key, config=path)) == sha256(data)
    starts = re.findall(r"INFO (?:backup|restore)_data: start \S*own_process.*", warm.config.log_text())
    assert len(starts) == 4 and not [line for line in starts if "fork server worker" in line], starts
    warm.store(backup, "gpbackup_0_served", b"s" * 1000)  # the default config's calls still go to a worker
    assert re.search(r"backup_data: start \S*gpbackup_0_served \(fork server worker", warm.config.log_text())
    # Only the first of those four calls got a slot, whose worker declined it: the server sent the others back.
    assert_ok(warm.plugin.run("stop-fork-server", env_extra=socket_dir_env(warm.tmpdir)))
    assert wait_until(lambda: "fork_server: no)" in warm.config.log_text())
    assert "; 3 sent back at once to run in their own process" in warm.config.log_text()


def test_cleanup_in_segment_host_scope_closes_the_idle_sessions_of_its_config(warm: Warm,
                                                                            backup: LocalBackup) -> None:
    warm.start_server(backup)
    with ThreadPoolExecutor(4) as pool:  # four sessions, idle afterwards
        list(pool.map(lambda n: warm.store(backup, f"gpbackup_0_par_{n}", os.urandom(300_000)), range(4)))
    assert len(warm.session_children()) >= 2
    assert_ok(warm.run("cleanup_plugin_for_backup", backup.path, "segment_host", "0"))
    assert wait_until(lambda: not warm.session_children()), "idle sessions outlived the end of the backup"


def test_stop_fork_server_closes_every_session(warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_before_stop", b"s" * 1000)
    assert warm.session_children()
    assert_ok(warm.plugin.run("stop-fork-server", env_extra=socket_dir_env(warm.tmpdir)))
    assert wait_until(lambda: not warm.session_children())


def test_concurrent_calls_open_at_most_one_session_each_and_reuse_them(warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    before = warm.logins()
    data = {f"gpbackup_0_storm_{n}": os.urandom(1024 * (1 + n % 64)) for n in range(64)}
    with ThreadPoolExecutor(4) as pool:
        keys = dict(zip(pool.map(lambda item: warm.store(backup, *item), data.items()), data.values()))
        restored = dict(zip(keys, pool.map(warm.restored, keys)))
    assert all(sha256(restored[key]) == sha256(value) for key, value in keys.items())
    assert warm.logins() - before <= 4 + 1  # one per call running at once (and one spare, as calls overlap)


def test_a_call_that_finds_every_session_busy_is_served_by_a_spare_that_stays_warm(warm: Warm,
                                                                                 backup: LocalBackup) -> None:
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000)  # the config's first session, kept
    logins = warm.logins()
    busy = warm.storing(backup, "gpbackup_0_busy")
    try:
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy")), "the busy call never started"
        data = os.urandom(50_000)
        key = warm.store(backup, "gpbackup_0_meanwhile", data)  # the only session is busy all along
    finally:
        finish(busy, b"b" * 1000)
    assert "every worker of its config is busy (1); a spare worker logs in for it" in warm.config.log_text()
    assert "opened a spare session" in warm.config.log_text()
    assert warm.worker_of("gpbackup_0_meanwhile") != warm.worker_of("gpbackup_0_busy")
    with ThreadPoolExecutor(2) as pool:  # two sessions now, both warm: two calls at once log in no more
        list(pool.map(lambda n: warm.store(backup, f"gpbackup_0_pair_{n}", b"p" * 1000), range(2)))
    assert sha256(warm.restored(key)) == sha256(data)
    assert warm.restored(backup.file("gpbackup_0_busy")) == b"b" * 1000
    assert warm.logins() == logins + 1


def test_a_call_that_finds_every_session_busy_takes_the_first_to_be_free(warm: Warm, backup: LocalBackup) -> None:
    # Through a link of 0.4 s round trips a login takes several seconds, and the end of a call two round
    # trips: the waiting call gets the busy session as soon as its call ends, long before the spare's login.
    with DelayProxy(0.2) as proxy:
        path = warm.slow_link_config(proxy, "slow_link.yaml")
        warm.start_server(backup, path)
        warm.store(backup, "gpbackup_0_first", b"f" * 1000, config=path)
        logins = warm.logins()
        with warm.busy_and_waiting(backup, path, "a spare worker logs in for it") as (busy, waiting):
            finish(busy, b"b" * 1000)
            finish(waiting, b"w" * 1000)
        assert warm.worker_of("gpbackup_0_waiting") == warm.worker_of("gpbackup_0_busy")
        assert "opened a spare session" not in warm.config.log_text()  # still logging in meanwhile
        assert wait_until(lambda: "opened a spare session" in warm.config.log_text(), timeout=30)
        assert warm.logins() == logins + 1
        assert warm.restored(backup.file("gpbackup_0_waiting"), config=path) == b"w" * 1000


def test_a_call_whose_spare_cannot_log_in_runs_on_a_worker_of_its_own(warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000)
    busy = warm.storing(backup, "gpbackup_0_busy")
    try:
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy")), "the busy call never started"
        warm.server.authorized_keys.write_text("")  # sshd reads it at each login: the kept session stays
        waiting = warm.run("backup_data", backup.file("gpbackup_0_waiting"), stdin=b"w" * 1000)
    finally:
        finish(busy, b"b" * 1000)
    log = warm.config.log_text()
    assert "could not open a spare session" in log
    assert "another worker of its config ended" in log and "it gets one of its own" not in log
    # Not left waiting for the busy session: it ran on its own worker, which reported the failure itself.
    assert waiting.returncode != 0
    (line,) = waiting.stderr.decode().splitlines()
    assert "backup_data" in line and "auth" in line.lower(), line
    assert warm.worker_of("gpbackup_0_waiting") not in (None, warm.worker_of("gpbackup_0_busy"))
    assert not backup.remote(warm.config.remote_dir, "gpbackup_0_waiting").exists()


def test_max_connections_makes_a_call_wait_for_a_busy_session_past_the_client_start_timeout(
        warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("capped.yaml", max_connections=1)
    warm.start_server(backup, path)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000, config=path)  # the one session it may have, kept
    logins = warm.logins()
    with warm.busy_and_waiting(backup, path, "it may have no more (1)") as (busy, waiting):
        # Longer than a client waits for its call to start: told to wait on, it neither gives up (and
        # logs in itself) nor gets a worker (and a login) of its own after PARK_LIMIT.
        time.sleep(forkserver.START_TIMEOUT + 1)
        assert waiting.poll() is None and warm.worker_of("gpbackup_0_waiting") is None
        finish(busy, b"b" * 1000)
        finish(waiting, b"w" * 1000)
    assert warm.worker_of("gpbackup_0_waiting") == warm.worker_of("gpbackup_0_busy")
    assert "spare worker" not in warm.config.log_text()
    assert warm.logins() == logins
    assert warm.restored(backup.file("gpbackup_0_waiting"), config=path) == b"w" * 1000


def test_fork_server_status_shows_a_call_waiting_at_max_connections(warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("capped.yaml", max_connections=1)
    warm.start_server(backup, path)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000, config=path)
    with warm.busy_and_waiting(backup, path, "it may have no more (1)") as (busy, waiting):
        shown = assert_ok(warm.plugin.run("fork-server-status", env_extra=socket_dir_env(warm.tmpdir))).stdout.decode()
        finish(busy, b"b" * 1000)
        finish(waiting, b"w" * 1000)
    host = f"{warm.server.options()['username']}@127.0.0.1:{warm.server.port}"
    assert (f"  config {path} (backup host {host}): 1 worker: 1 busy with a call; 1 call waiting for one "
            "(max_connections 1)\n") in shown, shown
    assert "; 1 call waited at max_connections" in shown.splitlines()[0], shown


def test_max_connections_holds_from_the_fork_servers_start_for_the_config_that_started_it(
        warm: Warm, backup: LocalBackup) -> None:
    # A nightly backup finds no fork server: its first call (a setup, no session kept) starts one, and
    # the data calls come at once, before any call of the config has ended in a worker.
    path = warm.config.write("capped.yaml", max_connections=1)
    warm.start_server(backup, path)
    logins = warm.logins()
    with warm.busy_and_waiting(backup, path, "it may have no more (1)") as (busy, waiting):
        finish(busy, b"b" * 1000)
        finish(waiting, b"w" * 1000)
    assert warm.worker_of("gpbackup_0_waiting") == warm.worker_of("gpbackup_0_busy")
    assert warm.logins() == logins + 1


def test_max_connections_caps_the_calls_at_once_of_a_config_that_keeps_no_session(
        warm: Warm, backup: LocalBackup) -> None:
    # The fork server was started by another config's call, so it learns this config's cap from the end of
    # its first call, here a setup that keeps nothing (session_idle: 0): no IDLE ever carries it.
    warm.start_server(backup)
    path = warm.config.write("capped_no_session.yaml", max_connections=1, session_idle=0)
    assert_ok(warm.run("setup_plugin_for_backup", backup.path, "segment_host", "0", config=path))
    logins = warm.logins()
    with warm.busy_and_waiting(backup, path, "it may have no more (1)") as (busy, waiting):
        # The server parks the second call as soon as the first has its worker, which may still be logging in.
        assert wait_until(lambda: warm.logins() == logins + 1), "the busy call never logged in"
        assert warm.worker_of("gpbackup_0_waiting") is None
        finish(busy, b"b" * 1000)
        finish(waiting, b"w" * 1000)
    assert warm.logins() == logins + 2  # one after the other: each call its own login, never two at once
    assert warm.restored(backup.file("gpbackup_0_waiting"), config=path) == b"w" * 1000


def test_a_call_that_waited_for_a_capped_session_whose_call_ended_the_backup_gets_a_worker_at_once(
        warm: Warm, backup: LocalBackup) -> None:
    # gprestore ends a restore with one cleanup per segment, at once: the first retires the route's only
    # session, and the other must not wait PARK_LIMIT for a session that will never be idle.
    with DelayProxy(0.2) as proxy:  # the coordinator cleanup's round trips keep its session busy for seconds
        path = warm.slow_link_config(proxy, "slow_capped.yaml", max_connections=1)
        warm.start_server(backup, path)
        warm.store(backup, "gpbackup_0_first", b"f" * 1000, config=path)
        with killed_at_the_end() as calls:
            cleanup = warm.plugin.popen("cleanup_plugin_for_backup", path, backup.path, "coordinator", "-1",
                                        env_extra=socket_dir_env(warm.tmpdir))
            calls.append(cleanup)
            assert wait_until(lambda: "cleanup_plugin_for_backup: start" in warm.config.log_text())
            waiting = warm.storing(backup, "gpbackup_0_waiting", config=path)
            calls.append(waiting)
            assert wait_until(lambda: "it may have no more (1)" in warm.config.log_text()), "the call never waited"
            assert cleanup.poll() is None, "the cleanup ended before the call waited for its session"
            _, err = cleanup.communicate(timeout=RUN_TIMEOUT)
            assert cleanup.returncode == 0 and err == b"", err
            finish(waiting, b"w" * 1000)
        log = warm.config.log_text()
        assert "another worker of its config ended" in log and f"waited {forkserver.PARK_LIMIT:g} s" not in log
        assert warm.restored(backup.file("gpbackup_0_waiting"), config=path) == b"w" * 1000


def test_a_call_that_waited_for_a_capped_session_whose_client_died_is_dropped_and_the_session_stays(
        warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("capped.yaml", max_connections=1)
    warm.start_server(backup, path)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000, config=path)
    logins = warm.logins()
    with killed_at_the_end() as calls:
        busy = warm.storing(backup, "gpbackup_0_busy", config=path)
        calls.append(busy)
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy")), "the busy call never started"
        gone = warm.storing(backup, "gpbackup_0_gone", config=path)
        assert wait_until(lambda: "it may have no more (1)" in warm.config.log_text()), "the call never waited"
        gone.kill()  # gpbackup killed while its call waited
        gone.wait()
        finish(busy, b"b" * 1000)
    key = warm.store(backup, "gpbackup_0_after", b"a" * 1000, config=path)
    assert warm.worker_of("gpbackup_0_gone") is None
    assert warm.worker_of("gpbackup_0_after") == warm.worker_of("gpbackup_0_busy")  # the kept session served it
    assert warm.logins() == logins
    assert warm.restored(key, config=path) == b"a" * 1000


def test_max_connections_counts_the_sessions_of_other_configs_to_the_same_backup_host(
        warm: Warm, backup: LocalBackup) -> None:
    # Two runs at once from a host (gpbackup and gprestore each hand the plugin their own copy of the config):
    # with max_connections: 1 the backup host sees one session from this host, not one per run.
    # The second config's first call logs in before the server knows its cap and backup host; once it
    # does, at the call's end, the first config's idle session goes.
    first, second = warm.two_runs(backup, max_connections=1)
    # The server hears the call's end as its client does: its log line may come a moment after.
    assert wait_until(lambda: "ended an idle worker of another config to the same backup host"
                      in warm.config.log_text()), "the first config's idle session stayed"
    assert wait_until(lambda: len(warm.session_children()) == 1), warm.session_children()
    logins = warm.logins()
    with killed_at_the_end() as calls:
        busy = warm.storing(backup, "gpbackup_0_busy", config=first)  # takes the place of the second's idle one
        calls.append(busy)
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy")), "the busy call never started"
        waiting = warm.storing(backup, "gpbackup_0_waiting", config=second)
        calls.append(waiting)
        assert wait_until(lambda: "and of others to the same backup host is busy, and it may have no more (1)"
                          in warm.config.log_text()), "the call never waited"
        shown = assert_ok(warm.plugin.run("fork-server-status", env_extra=socket_dir_env(warm.tmpdir))).stdout.decode()
        assert (f"  config {second} (backup host {warm.server.options()['username']}@127.0.0.1:{warm.server.port}): "
                "no worker; 1 call waiting for one (max_connections 1, counting 1 worker of other configs to the "
                "same backup host)\n") in shown, shown
        # The busy call's worker may still be logging in, and the idle session it replaced still closing.
        assert wait_until(lambda: warm.logins() == logins + 1), "the busy call never logged in"
        assert wait_until(lambda: len(warm.session_children()) == 1), warm.session_children()
        assert warm.worker_of("gpbackup_0_waiting") is None
        finish(busy, b"x" * 1000)
        finish(waiting, b"w" * 1000)
    assert "takes the place of an idle worker of another config" in warm.config.log_text()
    assert warm.logins() == logins + 2  # the busy call's, and the waiting call's once the busy one's had gone
    assert warm.worker_of("gpbackup_0_waiting") not in (None, warm.worker_of("gpbackup_0_busy"))
    assert wait_until(lambda: len(warm.session_children()) == 1), warm.session_children()
    for name, config, data in (("gpbackup_0_busy", first, b"x"), ("gpbackup_0_waiting", second, b"w")):
        assert warm.restored(backup.file(name), config=config) == data * 1000


def test_a_call_at_max_connections_waits_for_its_own_configs_session_rather_than_take_another_configs(
        warm: Warm, backup: LocalBackup) -> None:
    first, second = warm.two_runs(backup, max_connections=2)  # one session each: the two the cap allows
    logins = warm.logins()
    with killed_at_the_end() as calls:
        calls.append(warm.storing(backup, "gpbackup_0_busy_a", config=first))
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy_a")), "the first busy call never started"
        calls.append(warm.storing(backup, "gpbackup_0_busy_b", config=second))
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy_b")), "the second busy call never started"
        calls.append(warm.storing(backup, "gpbackup_0_waiting", config=first))
        assert wait_until(lambda: "it may have no more (2)" in warm.config.log_text()), "the call never waited"
        finish(calls[1], b"y" * 1000)  # the second config's session is idle now, and stays its own
        time.sleep(0.5)
        assert calls[2].poll() is None and warm.worker_of("gpbackup_0_waiting") is None
        finish(calls[0], b"x" * 1000)
        finish(calls[2], b"w" * 1000)
    assert warm.worker_of("gpbackup_0_waiting") == warm.worker_of("gpbackup_0_busy_a")
    assert warm.logins() == logins and "takes the place" not in warm.config.log_text()
    assert warm.restored(backup.file("gpbackup_0_waiting"), config=first) == b"w" * 1000


def test_max_connections_counts_a_config_naming_the_backup_host_by_an_ssh_config_alias_with_one_naming_it(
        warm: Warm, backup: LocalBackup) -> None:
    ssh_dir = warm.plugin.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "config").write_text("Host backup-alias\n  HostName 127.0.0.1\n")
    first = warm.config.write("by_address.yaml", max_connections=1)
    second = warm.config.write("by_alias.yaml", max_connections=1, hostname="backup-alias")
    warm.start_server(backup, first)
    warm.store(backup, "gpbackup_0_by_address", b"a" * 1000, config=first)
    warm.store(backup, "gpbackup_0_by_alias", b"b" * 1000, config=second)
    # The same host once ~/.ssh/config is applied: one session between them, as for two configs naming it alike.
    assert wait_until(lambda: "ended an idle worker of another config to the same backup host"
                      in warm.config.log_text()), "the first config's idle session stayed"
    assert wait_until(lambda: len(warm.session_children()) == 1), warm.session_children()
    assert warm.restored(backup.file("gpbackup_0_by_alias"), config=second) == b"b" * 1000


def test_configs_to_other_backup_hosts_do_not_count_against_max_connections(warm: Warm, backup: LocalBackup) -> None:
    first = warm.config.write("capped.yaml", max_connections=1)
    known_hosts = warm.tmpdir / "localhost_known_hosts"
    known_hosts.write_text(known_hosts_line(warm.server.server_dir, "localhost", warm.server.port))
    # Another name for the host: to the plugin, another backup host.
    other = warm.config.write("other_host.yaml", max_connections=1, hostname="localhost",
                              known_hosts_file=str(known_hosts))
    warm.start_server(backup, first)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000, config=first)
    warm.store(backup, "gpbackup_0_other", b"o" * 1000, config=other)
    with killed_at_the_end() as calls:
        busy = warm.storing(backup, "gpbackup_0_busy", config=first)
        calls.append(busy)
        assert wait_until(lambda: warm.worker_of("gpbackup_0_busy")), "the busy call never started"
        warm.store(backup, "gpbackup_0_beside", b"s" * 1000, config=other)  # at once, on its own session
        finish(busy, b"b" * 1000)
    assert "another config" not in warm.config.log_text() and "it may have no more" not in warm.config.log_text()
    assert wait_until(lambda: len(warm.session_children()) == 2), warm.session_children()
    assert warm.restored(backup.file("gpbackup_0_beside"), config=other) == b"s" * 1000


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root to act as another uid")
def test_another_uid_cannot_reach_a_session(warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_owner", b"o" * 1000)
    (sock,) = (warm.tmpdir / f"gpbackup_sftp_plugin-{os.getuid()}").glob("*.sock")
    # Open the way for the test only: the private directory alone would keep the other uid out.
    for directory in (warm.tmpdir, sock.parent):
        directory.chmod(0o711)
    sock.chmod(0o777)
    route = forkserver.route_of(os.fsencode(warm.config.path) + b"\0" + warm.config.path.read_bytes())
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
             "try:\n    s.sendall(bytes.fromhex(sys.argv[2])); print(repr(s.recv(16)))\n"
             "except (ConnectionResetError, BrokenPipeError):  # closed before or after our route\n"
             "    print(repr(b''))")
    result = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                             "-c", probe, str(sock), route.hex()], capture_output=True, timeout=RUN_TIMEOUT,
                            check=False)
    assert result.stdout.strip() == b"b''", result  # closed unanswered
    assert f"refused a connection from uid {NOBODY}" in warm.config.log_text()
    for directory in (warm.tmpdir, sock.parent):
        directory.chmod(0o700)  # private again, or the owner's calls would not use the server either
    logins = warm.logins()
    warm.store(backup, "gpbackup_0_owner_again", b"a" * 1000)  # the owner's session is still there
    assert warm.logins() == logins


def test_a_signalled_call_ends_its_worker_and_the_next_call_gets_a_new_one(warm: Warm, backup: LocalBackup) -> None:
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_first", b"f" * 1000)
    call = subprocess.Popen([warm.plugin.exe, "backup_data", str(warm.config.path),
                             str(backup.file("gpbackup_0_signalled"))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HOME": str(warm.plugin.home), **socket_dir_env(warm.tmpdir)})
    assert call.stdin is not None
    call.stdin.write(b"partial" * 1000)
    call.stdin.flush()
    time.sleep(0.5)
    call.send_signal(signal.SIGTERM)
    call.communicate(timeout=RUN_TIMEOUT)
    assert call.returncode != 0
    assert not backup.remote(warm.config.remote_dir, "gpbackup_0_signalled").exists()
    workers = set(re.findall(r"\[(\d+)\] INFO backup_data: start", warm.config.log_text()))
    data = os.urandom(5000)
    key = warm.store(backup, "gpbackup_0_after_signal", data)
    assert sha256(warm.restored(key)) == sha256(data)
    after = set(re.findall(r"\[(\d+)\] INFO (?:backup|restore)_data: start", warm.config.log_text()))
    assert after - workers, "the signalled worker served again"


def test_a_session_whose_call_added_the_host_key_is_reused_by_the_next_call(warm: Warm, backup: LocalBackup) -> None:
    known_hosts = warm.tmpdir / "accept_new_known_hosts"
    path = warm.config.write("accept_new.yaml", known_hosts_file=str(known_hosts),
                             strict_host_key_checking="accept-new")
    warm.start_server(backup, path)  # runs in its own process, and records the host key
    known_hosts.write_text("")  # so that a worker's call is the one that records it
    logins = warm.logins()
    warm.store(backup, "gpbackup_0_records_the_key", b"1" * 1000, config=path)
    assert known_hosts.read_text().strip(), "the call did not record the host key"
    warm.store(backup, "gpbackup_0_after_the_key", b"2" * 1000, config=path)
    assert warm.logins() == logins + 1  # the second call used the first one's session


def test_a_warm_upload_to_the_directory_of_the_last_writes_through_files_the_last_one_opened(
        warm_logged: tuple[Warm, Path], backup: LocalBackup) -> None:
    # No OPEN round trip for gpbackup's next table file: an upload opens the next one's files (the stream's and
    # its checksum's) in its directory, with its own fsync and CLOSE requests.
    warm, log = warm_logged
    warm.start_server(backup)
    warm.store(backup, "gpbackup_0_first", os.urandom(5000))
    directory = backup.remote(warm.config.remote_dir)
    assert len(spare_files(directory)) == 2, "no files opened ahead by the first upload"
    spares = spare_files(directory)
    assert all(p.stat().st_size == 0 and p.stat().st_mode & 0o777 == 0o600 for p in spares)
    since = log.stat().st_size
    logins = warm.logins()

    data = os.urandom(70_000)
    key = warm.store(backup, "gpbackup_0_second", data)

    served = log.read_bytes()[since:].decode()
    final = backup.remote(warm.config.remote_dir, "gpbackup_0_second")
    renamed = dict(re.findall(r'posix-rename old "([^"]+)" new "([^"]+)"', served))
    assert sorted(renamed) == [str(p) for p in spares]  # both files came from those opened ahead
    assert sorted(renamed.values()) == sorted([str(final), f"{final}.sha256"])
    assert not re.search(r'open "[^"]*/\.gpbackup_0_second\.', served), "the upload opened files of its own"
    assert sha256(warm.restored(key)) == sha256(data)
    assert final.with_name(final.name + ".sha256").read_text() == f"{sha256(data)}  {final.name}\n"
    assert warm.logins() == logins


def test_a_stream_longer_than_a_block_opens_its_block_digests_file_while_it_streams_and_renames_it_first(
        warm_logged: tuple[Warm, Path], backup: LocalBackup) -> None:
    # The block digests of a stream longer than one block cost no round trip of their own: their file is opened
    # behind the stream's writes once it passes the first block, and written, flushed and closed with the stream.
    warm, log = warm_logged
    warm.start_server(backup)
    since = log.stat().st_size if log.exists() else 0
    data = os.urandom(3 * BLOCK_SIZE + 5)

    key = warm.store(backup, "gpbackup_0_long", data)

    served = log.read_bytes()[since:].decode().splitlines()
    final = backup.remote(warm.config.remote_dir, "gpbackup_0_long")
    renames = [re.search(r'posix-rename old "([^"]+)" new "([^"]+)"', line) for line in served]
    moved = [(found.group(1), found.group(2)) for found in renames if found]
    assert [new for _, new in moved] == [f"{final}.sha256blocks", f"{final}.sha256", str(final)]
    blocks_temp, stream_temp = moved[0][0], moved[2][0]

    def first_line(pattern: str) -> int:
        return next(number for number, line in enumerate(served) if re.search(pattern, line))

    opened = first_line(rf'open "{re.escape(blocks_temp)}"')
    assert opened < first_line(rf'close "{re.escape(stream_temp)}"'), "block digests opened after the stream ended"
    assert re.search(r"bytes read 0 written [1-9]", served[first_line(rf'close "{re.escape(blocks_temp)}"')])
    assert sha256(warm.restored(key)) == sha256(data)  # a restore checks every block against those digests


def test_an_upload_to_another_directory_opens_its_own_files_and_the_spare_ones_move_there(
        warm: Warm, make_backup: Callable[..., LocalBackup]) -> None:
    first, second = make_backup("20240102030405"), make_backup("20240102030406")
    warm.start_server(first)
    warm.store(first, "gpbackup_0_first", b"1" * 3000)
    assert len(spare_files(first.remote(warm.config.remote_dir))) == 2
    data = os.urandom(40_000)
    key = warm.store(second, "gpbackup_0_second", data)
    assert len(spare_files(second.remote(warm.config.remote_dir))) == 2
    assert spare_files(first.remote(warm.config.remote_dir)) == []  # closed and removed as the new ones opened
    assert sha256(warm.restored(key)) == sha256(data)


def test_the_spare_files_of_a_session_lost_mid_call_are_removed_by_name_through_the_next_and_never_closed_there(
        warm: Warm, make_backup: Callable[..., LocalBackup]) -> None:
    # The kept session looks alive when the call takes it, and never answers: the upload to another directory
    # goes through a new one. The old session's handles mean nothing there (the same handle strings may name
    # the new session's own files): its spare files are removed by name, in passing.
    path = warm.config.write("short_timeout.yaml", io_timeout=2)
    first, second = make_backup("20240102030405"), make_backup("20240102030406")
    warm.start_server(first, path)
    warm.store(first, "gpbackup_0_first", b"1" * 3000, config=path)
    assert len(spare_files(first.remote(warm.config.remote_dir))) == 2
    (child,) = warm.session_children()
    os.kill(child, signal.SIGSTOP)
    try:
        data = os.urandom(300_000)
        key = warm.store(second, "gpbackup_0_second", data, config=path)
        assert spare_files(first.remote(warm.config.remote_dir)) == []
        assert len(spare_files(second.remote(warm.config.remote_dir))) == 2
        assert sha256(warm.restored(key, config=path)) == sha256(data)
    finally:
        os.kill(child, signal.SIGKILL)
    assert "the kept session to" in warm.config.log_text()


def test_an_upload_that_fails_in_a_worker_leaves_no_spare_files_behind(warm: Warm, backup: LocalBackup,
                                                                        tmp_path: Path) -> None:
    # The next upload's files go out with this one's fsync and CLOSE: where the fsync is refused, they are
    # removed again, and the backup host holds nothing of the call.
    workdir = tmp_path / "sshd_fsync_refused"
    workdir.mkdir()
    with SshServer(workdir, extra_config="ForceCommand internal-sftp -P fsync\n") as refusing:
        cfg = refusing.write_config(tmp_path / "refusing.yaml", log_dir=str(tmp_path / "refusing_logs"))
        warm.start_server(backup)  # the fork server runs: the call below goes to a worker
        result = warm.run("backup_data", backup.file("gpbackup_0_refused"), stdin=b"rows" * 1000, config=cfg)
        assert result.returncode != 0 and b"refused fsync@openssh.com" in result.stderr, result
        log = "".join(path.read_text() for path in (tmp_path / "refusing_logs").iterdir())
        assert "(fork server worker" in log
        assert [p for p in refusing.remote_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("end", ["stop-fork-server", "segment_host cleanup", "coordinator cleanup", "session_idle"])
def test_spare_files_go_when_their_session_ends(warm: Warm, backup: LocalBackup, end: str) -> None:
    path = warm.config.write("short_idle.yaml", session_idle=1) if end == "session_idle" else warm.config.path
    warm.start_server(backup, path)
    data = os.urandom(20_000)
    key = warm.store(backup, "gpbackup_0_kept", data, config=path)
    directory = backup.remote(warm.config.remote_dir)
    assert spare_files(directory), "no files opened ahead"
    if end == "stop-fork-server":
        assert_ok(warm.plugin.run("stop-fork-server", env_extra=socket_dir_env(warm.tmpdir)))
    elif end == "segment_host cleanup":
        assert_ok(warm.run("cleanup_plugin_for_backup", backup.path, "segment_host", "0", config=path))
    elif end == "coordinator cleanup":
        result = assert_ok(warm.run("cleanup_plugin_for_backup", backup.path, "coordinator", '"-1"', config=path))
        assert "removed 0 leftovers" in warm.config.log_text(), result  # not an interrupted upload's
    assert wait_until(lambda: not spare_files(directory) and not warm.session_children(), timeout=15), \
        spare_files(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["gpbackup_0_kept", "gpbackup_0_kept.sha256"]
    assert sha256(warm.restored(key, config=path)) == sha256(data)


def test_calls_in_their_own_processes_wait_for_a_connection_under_max_connections(
        warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("own_process.yaml", fork_server=False, max_connections=1)
    logins = warm.logins()
    with killed_at_the_end() as calls:
        calls.append(warm.storing(backup, "gpbackup_0_busy", config=path))
        # Its login, not an sshd child: the one sshd's readiness probe left may still be there.
        assert wait_until(lambda: warm.logins() == logins + 1), "the busy call never logged in"
        calls.append(warm.storing(backup, "gpbackup_0_waiting", config=path))
        assert wait_until(lambda: "waiting for a connection to 127.0.0.1:" in warm.config.log_text()), \
            "the call never waited"
        time.sleep(0.3)
        assert len(warm.session_children()) == 1 and calls[1].poll() is None
        status = warm.plugin.run("fork-server-status", "--json", env_extra=socket_dir_env(warm.tmpdir))
        (held,) = json.loads(assert_ok(status).stdout)["own_process_connections"]
        assert held["backup_host"] == f"127.0.0.1:{warm.server.port}" and held["connections"] == 1, held
        shown = assert_ok(warm.plugin.run("fork-server-status", env_extra=socket_dir_env(warm.tmpdir))).stdout.decode()
        assert (f"calls in their own process hold 1 connection to backup host 127.0.0.1:{warm.server.port} under "
                f"max_connections (pid {held['pids'][0]})\n") in shown, shown
        finish(calls[0], b"b" * 1000)
        finish(calls[1], b"w" * 1000)
    assert "took connection slot 0 after" in warm.config.log_text()
    for name, data in (("gpbackup_0_busy", b"b"), ("gpbackup_0_waiting", b"w")):
        assert warm.restored(backup.file(name), config=path) == data * 1000


def test_a_killed_call_in_its_own_process_lets_go_of_its_connection(warm: Warm, backup: LocalBackup) -> None:
    path = warm.config.write("own_process.yaml", fork_server=False, max_connections=1)
    logins = warm.logins()
    with killed_at_the_end() as calls:
        calls.append(warm.storing(backup, "gpbackup_0_killed", config=path))
        assert wait_until(lambda: warm.logins() == logins + 1), "the busy call never logged in"
        calls[0].kill()  # gpbackup gone: no cleanup of its own runs
        calls[0].wait()
    warm.store(backup, "gpbackup_0_after", b"a" * 1000, config=path)  # RUN_TIMEOUT bounds a wait for good
    assert warm.restored(backup.file("gpbackup_0_after"), config=path) == b"a" * 1000
