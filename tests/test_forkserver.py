"""The fork server: later calls run in a preloaded worker and behave exactly like a fresh process.

Every test gives the plugin its own TMPDIR, so it talks only to a server it
started itself; teardown stops that server (the log names its pid).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftp_plugin import forkserver
from tests.helpers import (
    RUN_TIMEOUT,
    LocalBackup,
    Plugin,
    SiteConfig,
    assert_failed,
    assert_ok,
    isolated_env,
    sha256,
    socket_dir_env,
)

SERVED = "(fork server worker"
# A server signals readiness only by its socket appearing; allow for a loaded 2-core CI machine.
START_WAIT = 20.0


@dataclass
class Served:
    """The plugin run with its own socket directory, and the helpers to look at its fork server."""

    plugin: Plugin
    config: SiteConfig
    tmpdir: Path

    @property
    def env(self) -> dict[str, str]:
        return socket_dir_env(self.tmpdir)

    @property
    def socket_dir(self) -> Path:
        return self.tmpdir / f"gpbackup_sftp_plugin-{os.getuid()}"

    def run(self, *args: str | Path, stdin: bytes = b"", cwd: Path | None = None,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.plugin.run(*args, stdin=stdin, cwd=cwd, env_extra={**self.env, **(env_extra or {})})

    def setup(self, backup: LocalBackup, config: Path | None = None) -> None:
        """A successful in-process call (setup_plugin_for_backup), the kind that starts a server."""
        assert_ok(self.run("setup_plugin_for_backup", config or self.config.path, backup.path, "coordinator", "-1"))

    def start_server(self, backup: LocalBackup) -> Path:
        """Start the fork server with a setup call; its socket."""
        self.setup(backup)
        return self.wait_for_server()

    def popen(self, *args: str | Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.plugin.exe, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=isolated_env(self.plugin.home, self.env))

    def sockets(self) -> list[Path]:
        return sorted(self.socket_dir.glob("*.sock")) if self.socket_dir.is_dir() else []

    def wait_for_server(self) -> Path:
        came_up = wait_until(lambda: self.sockets() and self.server_pids())
        assert came_up, f"no fork server came up; log:\n{self.config.log_text()[-2000:]}"
        return self.sockets()[0]

    def server_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"fork server (\d+) serving", self.config.log_text())]

    def served_lines(self) -> list[str]:
        return [line for line in self.config.log_text().splitlines() if SERVED in line]


@pytest.fixture
def served(plugin: Plugin, config: SiteConfig) -> Iterator[Served]:
    # Short: pytest's tmp_path would push the socket path past the 107 bytes a Unix socket allows.
    tmpdir = Path(tempfile.mkdtemp(prefix="gpsftp-fs."))
    site = Served(plugin, config, tmpdir)
    yield site
    for pid in site.server_pids():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    shutil.rmtree(tmpdir, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent, the monitor, reaps it).
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ")[-1][:1] != "Z"


def wait_until(predicate: object, timeout: float = START_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- serving calls


def test_a_successful_call_starts_a_server_that_serves_the_next_calls_byte_exact(served: Served,
                                                                                backup: LocalBackup) -> None:
    socket_path = served.start_server(backup)
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(served.socket_dir.stat().st_mode) == 0o700

    data = os.urandom(3 * 1024 * 1024 + 17)
    key = backup.file("gpbackup_0_stream")
    assert_ok(served.run("backup_data", served.config.path, key, stdin=data))
    restored = assert_ok(served.run("restore_data", served.config.path, key)).stdout
    assert sha256(restored) == sha256(data)
    lines = served.served_lines()
    assert any("start " + str(key) in line for line in lines), lines
    assert len(lines) == 2, lines


def test_a_failure_through_the_server_is_the_same_one_line_and_exit_code(served: Served,
                                                                         backup: LocalBackup) -> None:
    missing = backup.file("never_stored")
    direct = served.run("restore_data", served.config.path, missing)
    first = assert_failed(direct)
    served.start_server(backup)

    via_server = served.run("restore_data", served.config.path, missing)
    assert assert_failed(via_server) == first
    assert via_server.returncode == direct.returncode
    assert via_server.stdout == direct.stdout == b""
    assert any(str(missing) in line for line in served.served_lines())


def test_a_served_call_uses_the_callers_environment_and_working_directory(served: Served, backup: LocalBackup,
                                                                          tmp_path: Path) -> None:
    served.start_server(backup)
    # A config named relative to the caller's cwd, logging under the caller's HOME.
    other_home = tmp_path / "other_home"
    other_home.mkdir()
    served.config.write("relative.yaml", log_dir="~/plugin_logs")
    data = os.urandom(4096)
    key = backup.file("gpbackup_0_env")
    result = served.run("backup_data", "relative.yaml", key, stdin=data, cwd=served.config.directory,
                        env_extra={"HOME": str(other_home)})
    assert_ok(result)
    log_text = "".join(p.read_text() for p in (other_home / "plugin_logs").glob("*"))
    assert SERVED in log_text
    assert sha256(backup.remote(served.config.remote_dir, "gpbackup_0_env").read_bytes()) == sha256(data)


# ---------------------------------------------------------------- signals and a dying caller


def _start_served_upload(served: Served, backup: LocalBackup, name: str) -> tuple[subprocess.Popen[bytes], int]:
    """A backup_data served by a worker, fed and left mid-stream; returns it and its worker's pid."""
    served.start_server(backup)
    process = served.popen("backup_data", served.config.path, backup.file(name))
    assert process.stdin is not None
    process.stdin.write(os.urandom(1024 * 1024))
    process.stdin.flush()
    pattern = re.compile(r"\[(\d+)\] INFO backup_data: start " + re.escape(str(backup.file(name))) + " " +
                         re.escape(SERVED))
    assert wait_until(lambda: pattern.search(served.config.log_text())), served.config.log_text()[-2000:]
    match = pattern.search(served.config.log_text())
    assert match is not None
    return process, int(match.group(1))


def test_killing_the_caller_kills_its_worker_and_nothing_is_stored(served: Served, backup: LocalBackup) -> None:
    name = "gpbackup_0_killed"
    process, worker = _start_served_upload(served, backup, name)
    assert alive(worker)
    process.kill()
    process.wait(RUN_TIMEOUT)
    assert process.stdin is not None
    process.stdin.close()  # EOF to the worker too, as when gpbackup_helper dies with it
    assert wait_until(lambda: not alive(worker)), "the worker outlived its killed caller"
    assert not backup.remote(served.config.remote_dir, name).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_caller_reaches_its_worker_and_the_caller_ends_the_same_way(
        served: Served, backup: LocalBackup, sig: signal.Signals) -> None:
    name = f"gpbackup_0_{sig.name}"
    process, worker = _start_served_upload(served, backup, name)
    process.send_signal(sig)
    _out, err = process.communicate(timeout=RUN_TIMEOUT)
    if sig == signal.SIGINT:  # the plugin's own handling: exit 130 and one line
        assert process.returncode == 130
        assert err.decode().strip().endswith("interrupted") and err.count(b"\n") == 1
    else:  # the default action, as for a plugin running in-process
        assert process.returncode == -sig
    assert wait_until(lambda: not alive(worker))
    assert not backup.remote(served.config.remote_dir, name).exists()


# ---------------------------------------------------------------- when not to use it


def test_fork_server_no_runs_every_call_in_process(served: Served, backup: LocalBackup) -> None:
    path = served.config.write("no_server.yaml", fork_server="no")
    for _ in range(2):
        served.setup(backup, path)
    time.sleep(1)  # a server, had one been started, would have logged by now
    assert served.server_pids() == [] and served.sockets() == []
    assert served.served_lines() == []


def test_a_socket_directory_open_to_others_is_never_used(served: Served, backup: LocalBackup) -> None:
    served.socket_dir.mkdir()
    served.socket_dir.chmod(0o777)
    for _ in range(2):
        served.setup(backup)
    time.sleep(1)
    assert served.sockets() == [] and served.served_lines() == []


def test_a_stale_socket_is_replaced_and_calls_never_fail_for_it(served: Served, backup: LocalBackup) -> None:
    socket_path = served.start_server(backup)
    (pid,) = served.server_pids()
    os.kill(pid, signal.SIGKILL)  # dies without removing its socket
    assert wait_until(lambda: not alive(pid))
    assert socket_path.exists()

    data = os.urandom(10_000)
    key = backup.file("gpbackup_0_after_stale")
    assert_ok(served.run("backup_data", served.config.path, key, stdin=data))  # runs in-process
    assert wait_until(lambda: len(served.server_pids()) == 2), "no new server replaced the stale socket"
    assert sha256(assert_ok(served.run("restore_data", served.config.path, key)).stdout) == sha256(data)
    assert len(served.served_lines()) == 1


def test_an_idle_server_removes_its_socket_and_exits(served: Served, tmp_path: Path) -> None:
    code = ("import sys; from sftp_plugin import forkserver; path = forkserver.socket_path(); print(path, flush=True); "
            "forkserver.serve(path, sys.argv[1], idle_seconds=1)")
    server = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "server_logs")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=isolated_env(served.plugin.home, served.env))
    try:
        assert server.stdout is not None
        socket_path = Path(server.stdout.readline().decode().strip())
        assert wait_until(socket_path.exists)
        out, err = server.communicate(timeout=RUN_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0 and out == err == b""
    assert not socket_path.exists()
    assert "exiting after 1 s idle (0 calls served)" in "".join(
        p.read_text() for p in (tmp_path / "server_logs").glob("*"))


# ---------------------------------------------------------------- pure parts


def test_a_request_round_trips_argv_cwd_umask_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPSFTP_TEST_VALUE", "a=b c\u00e9")
    argv = ["backup_data", "/cfg/plugin.yaml", "/data/gpseg0/backups/20261124/20261124101010/gpbackup_0_t"]
    magic, digest, cwd, umask, decoded, env = forkserver._decode_request(forkserver._encode_request(argv))
    assert magic == forkserver.MAGIC and digest == forkserver.code_digest()
    assert cwd == os.getcwd() and decoded == argv
    assert umask == forkserver._current_umask()
    assert env[b"GPSFTP_TEST_VALUE"] == "a=b c\u00e9".encode()


def test_exit_code_of_returns_the_workers_exit_code() -> None:
    for code in (0, 1, 2, 130):
        assert forkserver.exit_code_of(code << 8) == code


def test_the_caller_is_alive_outside_a_worker() -> None:
    assert forkserver.caller_gone() is False


def test_a_worker_sees_its_caller_gone_once_the_pipe_writer_closes() -> None:
    read_end, write_end = os.pipe()
    forkserver._caller_pipe = read_end
    try:
        assert forkserver.caller_gone() is False
        os.close(write_end)
        assert forkserver.caller_gone() is True
    finally:
        forkserver._caller_pipe = None
        os.close(read_end)



def test_stop_fork_server_stops_it_and_the_next_call_runs_in_process(served: Served, backup: LocalBackup) -> None:
    socket_path = served.start_server(backup)
    (pid,) = served.server_pids()

    stopped = assert_ok(served.run("stop-fork-server"))
    assert stopped.stdout.decode() == f"stopped fork server pid {pid}\n"
    assert wait_until(lambda: not alive(pid))
    assert not socket_path.exists()
    assert f"fork server {pid} exiting on signal {int(signal.SIGTERM)}" in served.config.log_text()

    served.setup(backup)
    assert served.served_lines() == []
    assert wait_until(lambda: len(served.server_pids()) == 2)  # and it started the next one


def test_stop_fork_server_says_so_when_none_runs(served: Served) -> None:
    assert assert_ok(served.run("stop-fork-server")).stdout == b"no fork server was running\n"


def test_a_call_still_running_does_not_keep_a_stopped_servers_place(served: Served, backup: LocalBackup) -> None:
    # The server's lock must not live on in its workers: a long backup_data would
    # keep any new server from starting, and stop-fork-server would name a dead pid.
    name = "gpbackup_0_long"
    process, worker = _start_served_upload(served, backup, name)
    (first,) = served.server_pids()
    assert_ok(served.run("stop-fork-server"))
    assert wait_until(lambda: not alive(first))
    assert alive(worker)

    served.setup(backup)
    assert wait_until(lambda: len(served.server_pids()) == 2), "no new server while a call of the old one runs"
    second = served.server_pids()[1]
    assert assert_ok(served.run("stop-fork-server")).stdout.decode() == f"stopped fork server pid {second}\n"

    assert process.stdin is not None
    process.stdin.close()
    assert_ok(subprocess.CompletedProcess(process.args, process.wait(RUN_TIMEOUT), b"", process.stderr.read()))
