"""The fork server: later calls run in a preloaded worker and behave exactly like a fresh process.

Every test gives the plugin its own TMPDIR, so it talks only to a server it
started itself; teardown stops that server (the log names its pid).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig, assert_failed, assert_ok, socket_dir_env
from sftp_plugin import cli, forkserver
from sftp_plugin.errors import CallerGone
from tests.helpers import alive, fork_server_pids, own_fork_server, sha256, start_under_a_parent, wait_until

SERVED = "(fork server worker"


@dataclass
class Served:
    """The plugin with a socket directory of its own (`tmpdir`), and the helpers to look at its fork server."""

    plugin: Plugin
    config: SiteConfig
    tmpdir: Path

    @classmethod
    def under(cls, tmpdir: Path, home: Path, config: SiteConfig) -> Served:
        return cls(Plugin(home, socket_dir=tmpdir), config, tmpdir)

    @property
    def socket_dir(self) -> Path:
        return self.tmpdir / f"gpbackup_sftp_plugin-{os.getuid()}"

    def setup(self, backup: LocalBackup, config: Path | None = None) -> None:
        """A successful in-process call (setup_plugin_for_backup), the kind that starts a server."""
        assert_ok(self.plugin.run("setup_plugin_for_backup", config or self.config.path, backup.path, "coordinator",
                                  "-1"))

    def start_server(self, backup: LocalBackup) -> Path:
        """Start the fork server with a setup call; its socket."""
        self.setup(backup)
        return self.wait_for_server()

    def sockets(self) -> list[Path]:
        return sorted(self.socket_dir.glob("*.sock")) if self.socket_dir.is_dir() else []

    def wait_for_server(self) -> Path:
        came_up = wait_until(lambda: self.sockets() and self.server_pids())
        assert came_up, f"no fork server came up; log:\n{self.config.log_text()[-2000:]}"
        return self.sockets()[0]

    def server_pids(self) -> list[int]:
        return fork_server_pids(self.config)

    def served_lines(self) -> list[str]:
        return [line for line in self.config.log_text().splitlines() if SERVED in line]


@pytest.fixture
def served(plugin: Plugin, config: SiteConfig) -> Iterator[Served]:
    with own_fork_server(config, "gpsftp-fs.") as tmpdir:
        yield Served.under(tmpdir, plugin.home, config)


# ---------------------------------------------------------------- serving calls


def test_a_successful_call_starts_a_server_that_serves_the_next_calls_byte_exact(served: Served,
                                                                                backup: LocalBackup) -> None:
    socket_path = served.start_server(backup)
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(served.socket_dir.stat().st_mode) == 0o700

    data = os.urandom(3 * 1024 * 1024 + 17)
    key = backup.file("gpbackup_0_stream")
    assert_ok(served.plugin.run("backup_data", served.config.path, key, stdin=data))
    restored = assert_ok(served.plugin.run("restore_data", served.config.path, key)).stdout
    assert sha256(restored) == sha256(data)
    lines = served.served_lines()
    assert any("start " + str(key) in line for line in lines), lines
    assert len(lines) == 2, lines


def test_a_failure_through_the_server_is_the_same_one_line_and_exit_code(served: Served,
                                                                         backup: LocalBackup) -> None:
    missing = backup.file("never_stored")
    direct = served.plugin.run("restore_data", served.config.path, missing)
    first = assert_failed(direct)
    served.start_server(backup)

    via_server = served.plugin.run("restore_data", served.config.path, missing)
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
    result = served.plugin.run("backup_data", "relative.yaml", key, stdin=data, cwd=served.config.directory,
                        env_extra={"HOME": str(other_home)})
    assert_ok(result)
    log_text = "".join(p.read_text() for p in (other_home / "plugin_logs").glob("*"))
    assert SERVED in log_text
    assert sha256(backup.remote(served.config.remote_dir, "gpbackup_0_env").read_bytes()) == sha256(data)


# ---------------------------------------------------------------- signals and a dying caller


@dataclass
class ServedUpload:
    """A backup_data served by a worker, fed and left mid-stream."""

    caller: subprocess.Popen[bytes]
    worker: int
    server: int


# A client that keeps its signals to itself: it tells its worker only through the liveness pipe, as a client
# does in the moment between receiving a signal and forwarding it (forkserver.delegate, act_on_caller_news).
SILENT_CLIENT = ("import sys\nfrom sftp_plugin import cli, forkserver\n"
                 "forkserver._forward = lambda conn, signum: None\nsys.exit(cli.main(sys.argv[1:]))\n")


def _plugin_python(plugin: Plugin) -> str:
    """The interpreter the plugin's calls run on, which names its fork server (forkserver.code_digest): a
    Python client's shebang; for the compiled one, the interpreter it was built for (this one)."""
    with open(plugin.exe, "rb") as handle:
        first = handle.readline()
    return first[2:].decode().split()[0] if first.startswith(b"#!") else sys.executable


def _start_served_upload(served: Served, backup: LocalBackup, name: str, silent: bool = False) -> ServedUpload:
    served.start_server(backup)
    if silent:
        process = subprocess.Popen([_plugin_python(served.plugin), "-I", "-c", SILENT_CLIENT, "backup_data",
                                    str(served.config.path), str(backup.file(name))], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=served.plugin.env())
    else:
        process = served.plugin.popen("backup_data", served.config.path, backup.file(name), stdin=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write(os.urandom(1024 * 1024))
    process.stdin.flush()
    pattern = re.compile(r"\[(\d+)\] INFO backup_data: start " + re.escape(str(backup.file(name))) + " " +
                         re.escape(SERVED) + r", server (\d+)\)")
    assert wait_until(lambda: pattern.search(served.config.log_text())), served.config.log_text()[-2000:]
    match = pattern.search(served.config.log_text())
    assert match is not None
    return ServedUpload(process, int(match.group(1)), int(match.group(2)))


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """`pid` stopped (SIGSTOP) while inside: a caller that handles no signal and reads no reply meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _pipe_inodes(pid: int, fds: list[str] | None = None) -> dict[str, str]:
    """The pipes `pid` holds open: inode link ("pipe:[N]") -> one of its fd numbers."""
    fd_dir = Path(f"/proc/{pid}/fd")
    found = {}
    for fd in fds if fds is not None else os.listdir(fd_dir):
        link = os.readlink(fd_dir / fd)
        if link.startswith("pipe:"):
            found[link] = fd
    return found


def bytes_in_liveness_pipe(upload: ServedUpload) -> int:
    """Bytes waiting in the pipe from the caller to its worker (see forkserver.act_on_caller_news): the
    one pipe both hold besides the caller's stdin, stdout and stderr."""
    stdio = _pipe_inodes(upload.caller.pid, ["0", "1", "2"])
    worker_pipes = _pipe_inodes(upload.worker)
    (link,) = set(_pipe_inodes(upload.caller.pid)) & set(worker_pipes) - set(stdio)
    fd = os.open(f"/proc/{upload.worker}/fd/{worker_pipes[link]}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(fd)


def caller_has_told_its_worker(upload: ServedUpload) -> bool:
    """The caller has handled its signal: the news is in the liveness pipe, or the worker already ended."""
    if not alive(upload.worker):
        return True
    try:
        return bytes_in_liveness_pipe(upload) > 0
    except (OSError, ValueError):  # the worker ended while we looked
        return not alive(upload.worker)


def end_input(caller: subprocess.Popen[bytes]) -> None:
    """End of input, as when gpbackup_helper closes the pipe; communicate() then has none to close."""
    assert caller.stdin is not None
    caller.stdin.close()
    caller.stdin = None


def assert_ended_as_the_signal_ends_a_plugin_in_process(process: subprocess.Popen[bytes], sig: signal.Signals,
                                                        err: bytes) -> None:
    if sig == signal.SIGINT:  # the plugin's own handling: exit 130 and one line
        assert process.returncode == 130, err
        assert err.decode().strip().endswith("interrupted") and err.count(b"\n") == 1, err
    else:  # the default action
        assert process.returncode == -sig, err


def test_killing_the_caller_kills_its_worker_and_nothing_is_stored(served: Served, backup: LocalBackup) -> None:
    name = "gpbackup_0_killed"
    upload = _start_served_upload(served, backup, name)
    assert alive(upload.worker)
    upload.caller.kill()
    upload.caller.wait(RUN_TIMEOUT)
    end_input(upload.caller)  # to the worker too, as when gpbackup_helper dies with it
    assert wait_until(lambda: not alive(upload.worker)), "the worker outlived its killed caller"
    assert not backup.remote(served.config.remote_dir, name).exists()


def test_killing_the_caller_kills_its_worker_even_while_its_input_stays_open(served: Served,
                                                                            backup: LocalBackup) -> None:
    # The worker waits for input that does not come: only its client's end can tell it to stop.
    name = "gpbackup_0_killed_input_open"
    upload = _start_served_upload(served, backup, name)
    upload.caller.kill()
    upload.caller.wait(RUN_TIMEOUT)
    try:
        assert wait_until(lambda: not alive(upload.worker)), "the worker outlived its killed caller"
    finally:
        end_input(upload.caller)
    assert not backup.remote(served.config.remote_dir, name).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_caller_reaches_its_worker_and_the_caller_ends_the_same_way(
        served: Served, backup: LocalBackup, sig: signal.Signals) -> None:
    name = f"gpbackup_0_{sig.name}"
    upload = _start_served_upload(served, backup, name)
    upload.caller.send_signal(sig)
    assert wait_until(lambda: caller_has_told_its_worker(upload)), "the caller never told its worker"
    _out, err = upload.caller.communicate(timeout=RUN_TIMEOUT)  # closes stdin: end of input follows the signal
    assert_ended_as_the_signal_ends_a_plugin_in_process(upload.caller, sig, err)
    assert wait_until(lambda: not alive(upload.worker))
    assert not backup.remote(served.config.remote_dir, name).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_end_of_input_after_a_signal_to_the_caller_commits_nothing_even_before_the_signal_reaches_the_worker(
        served: Served, backup: LocalBackup, sig: signal.Signals) -> None:
    # As when gpbackup_helper is stopped: the plugin is signalled and its input pipe closes. The caller
    # never forwards the signal, so it cannot overtake the end of input: only the liveness pipe tells.
    name = f"gpbackup_0_eof_after_{sig.name}"
    upload = _start_served_upload(served, backup, name, silent=True)
    upload.caller.send_signal(sig)
    assert wait_until(lambda: caller_has_told_its_worker(upload)), "the caller never told its worker"
    end_input(upload.caller)
    assert wait_until(lambda: not alive(upload.worker)), "the worker neither committed nor stopped"
    _out, err = upload.caller.communicate(timeout=RUN_TIMEOUT)
    assert not backup.remote(served.config.remote_dir, name).exists()
    assert_ended_as_the_signal_ends_a_plugin_in_process(upload.caller, sig, err)


def test_end_of_input_after_the_callers_parent_died_commits_nothing_in_a_worker(
        served: Served, backup: LocalBackup) -> None:
    # gpbackup_helper going down on SIGUSR1 closes our stdin and sends us no signal: only the
    # caller's parent changes, and the worker looks at it before committing.
    served.start_server(backup)
    name = f"gpbackup_0_{backup.timestamp}_orphan"
    parent, pid, feed = start_under_a_parent(served.plugin, "backup_data", served.config.path, backup.file(name))
    try:
        os.write(feed, os.urandom(32 * 1024))
        assert wait_until(lambda: any(name in line for line in served.served_lines())), "not served by a worker"
        parent.kill()
        parent.wait(timeout=RUN_TIMEOUT)
    finally:
        os.close(feed)
    assert wait_until(lambda: not alive(pid), timeout=RUN_TIMEOUT)
    assert "is gone" in served.config.log_text()
    assert not backup.remote(served.config.remote_dir, name).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_caller_never_reports_success_even_when_its_worker_finished_first(
        served: Served, backup: LocalBackup, sig: signal.Signals) -> None:
    name = f"gpbackup_0_done_before_{sig.name}"
    upload = _start_served_upload(served, backup, name)
    with stopped(upload.caller.pid):  # the worker's success cannot reach the caller before the signal
        end_input(upload.caller)
        # The worker stays (warm) after a call that succeeded: its log line says it finished.
        assert wait_until(lambda: f"ok bytes={1024 * 1024}" in served.config.log_text()), "the worker never finished"
        upload.caller.send_signal(sig)
    _out, err = upload.caller.communicate(timeout=RUN_TIMEOUT)
    # Stored, as by a plugin in its own process whose signal came just after the rename;
    # but not reported as success.
    assert backup.remote(served.config.remote_dir, name).exists()
    assert_ended_as_the_signal_ends_a_plugin_in_process(upload.caller, sig, err)


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
    assert_ok(served.plugin.run("backup_data", served.config.path, key, stdin=data))  # runs in-process
    assert wait_until(lambda: len(served.server_pids()) == 2), "no new server replaced the stale socket"
    assert sha256(assert_ok(served.plugin.run("restore_data", served.config.path, key)).stdout) == sha256(data)
    assert len(served.served_lines()) == 1


def test_an_idle_server_removes_its_socket_and_exits(served: Served, tmp_path: Path) -> None:
    code = ("import sys; from sftp_plugin import forkserver; path = forkserver.socket_path(); print(path, flush=True); "
            "forkserver.serve(path, sys.argv[1], calls=None, idle_seconds=1)")
    server = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "server_logs")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=served.plugin.env())
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
    assert ("exiting after 1 s idle (0 calls served, 0 of them by a warm worker; 0 spare workers; 0 calls waited "
            "at their config's max_connections; 0 sent back at once to run in their own process, their config "
            "saying fork_server: no)") in "".join(
        p.read_text() for p in (tmp_path / "server_logs").glob("*"))


# ---------------------------------------------------------------- whom to trust

# The unprivileged user and group every Debian/Red Hat host has: "someone else".
NOBODY = 65534


@pytest.mark.parametrize("opening", ["group-writable", "owned by another user"])
def test_a_socket_directory_whose_way_others_can_change_is_never_used(served: Served, backup: LocalBackup,
                                                                      opening: str) -> None:
    # TMPDIR on a shared scratch directory: whoever can rename entries in it could put their
    # own socket where ours was, even though our own 0700 directory below it is intact.
    scratch = served.tmpdir / "scratch"
    scratch.mkdir(mode=0o700)
    site = Served.under(scratch, served.plugin.home, served.config)
    site.start_server(backup)
    if opening == "group-writable":
        scratch.chmod(0o770)  # no sticky bit
    else:
        os.chown(scratch, NOBODY, NOBODY)

    data = os.urandom(10_000)
    key = backup.file("gpbackup_0_shared_tmpdir")
    assert_ok(site.plugin.run("backup_data", site.config.path, key, stdin=data))
    assert site.served_lines() == []
    assert sha256(backup.remote(site.config.remote_dir, "gpbackup_0_shared_tmpdir").read_bytes()) == sha256(data)


# A listener at the server's socket that answers as another user would, and
# prints how many request bytes and fds it received before the caller hung up.
FOREIGN_SERVER = f"""
import os, socket, struct, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
os.setgroups([])
os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
listener.listen(1)  # SO_PEERCRED tells a caller the credentials of this moment
listener.settimeout({RUN_TIMEOUT})
print("listening", flush=True)
conn, _ = listener.accept()
conn.settimeout({RUN_TIMEOUT})
head, fds, _flags, _addr = socket.recv_fds(conn, 4, 4)
try:
    conn.sendall(b"R" + struct.pack("!i", 0))  # "refused": the caller runs the call itself
except OSError:
    pass
print(len(head), len(fds), flush=True)
"""


def test_a_server_socket_of_another_user_gets_nothing_and_the_call_runs_in_its_own_process(
        served: Served, backup: LocalBackup) -> None:
    socket_path = served.start_server(backup)  # where this code's server listens
    assert_ok(served.plugin.run("stop-fork-server"))
    assert wait_until(lambda: not socket_path.exists())
    foreign = subprocess.Popen([sys.executable, "-c", FOREIGN_SERVER, str(socket_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert foreign.stdout is not None
        assert foreign.stdout.readline() == b"listening\n", foreign.stderr.read() if foreign.stderr else b""
        data = os.urandom(10_000)
        key = backup.file("gpbackup_0_foreign_server")
        assert_ok(served.plugin.run("backup_data", served.config.path, key, stdin=data))
        out, err = foreign.communicate(timeout=RUN_TIMEOUT)
    finally:
        if foreign.poll() is None:
            foreign.kill()
    assert out == b"0 0\n", (out, err)  # neither the request nor the caller's stdin, stdout and stderr
    assert served.served_lines() == []
    assert sha256(backup.remote(served.config.remote_dir, "gpbackup_0_foreign_server").read_bytes()) == sha256(data)


def _can_run(*command: str) -> bool:
    try:
        return subprocess.run([*command, "true"], capture_output=True, timeout=RUN_TIMEOUT).returncode == 0
    except OSError:
        return False


# Ways a caller can differ from the server that started before it: (how, the field the
# server's log names, the command prefix and subprocess options that make the caller so).
CALLER_DIFFERENCES = {
    "other supplementary groups": ("Groups", [], {"extra_groups": [NOBODY]}),
    "another uts namespace": ("uts namespace", ["unshare", "--uts"], {}),
    "no_new_privs set": ("NoNewPrivs", ["setpriv", "--no-new-privs"], {}),
}


@pytest.mark.parametrize("difference", CALLER_DIFFERENCES)
def test_a_caller_whose_credentials_differ_from_the_servers_is_refused_and_runs_in_its_own_process(
        served: Served, backup: LocalBackup, difference: str) -> None:
    field, prefix, options = CALLER_DIFFERENCES[difference]
    if prefix and not _can_run(*prefix):
        pytest.skip(f"{' '.join(prefix)} is not permitted here")
    assert NOBODY not in os.getgroups()
    served.start_server(backup)

    data = os.urandom(10_000)
    key = backup.file("gpbackup_0_other_caller")
    result = subprocess.run([*prefix, *served.plugin.argv("backup_data", served.config.path, key)], input=data,
                            capture_output=True, env=served.plugin.env(), timeout=RUN_TIMEOUT, check=False,
                            **options)
    assert_ok(result)
    assert served.served_lines() == []
    assert sha256(backup.remote(served.config.remote_dir, "gpbackup_0_other_caller").read_bytes()) == sha256(data)
    refused = [line for line in served.config.log_text().splitlines() if "refused the call of pid" in line]
    assert len(refused) == 1 and field in refused[0], refused

    assert_ok(served.plugin.run("restore_data", served.config.path, key))  # a caller like the server is still served
    assert len(served.served_lines()) == 1


def test_a_starting_server_removes_what_servers_of_other_code_left_but_not_what_one_holds(
        served: Served, backup: LocalBackup) -> None:
    served.socket_dir.mkdir(mode=0o700)
    killed = served.socket_dir / "0.0.1-0badc0de.sock"  # a server killed: its lock and its socket
    (served.socket_dir / "0.0.1-0badc0de.sock.lock").write_text("4242\n")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(killed))
    leftover.close()
    idled = served.socket_dir / "0.0.2-0badc0de.sock.lock"  # a server that idled out: its lock
    idled.write_text("4243\n")
    held = served.socket_dir / "0.0.3-0badc0de.sock.lock"  # a server of another version, still serving
    held.write_text("4244\n")
    with held.open() as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        socket_path = served.start_server(backup)
        assert sorted(path.name for path in served.socket_dir.iterdir()) == sorted(
            [held.name, socket_path.name, socket_path.name + ".lock"])
    assert "0.0.1-0badc0de.sock.lock" in served.config.log_text()


# ---------------------------------------------------------------- pure parts


def test_a_served_call_takes_exactly_its_callers_environment_whatever_the_last_call_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GONE_AFTER", "CHANGED", "KEPT"):
        monkeypatch.setenv(name, "last call's")
    monkeypatch.delenv("NEW", raising=False)  # restored (absent) after the test
    caller = {key: value for key, value in os.environb.items() if key not in (b"GONE_AFTER", b"CHANGED")}
    caller[b"CHANGED"] = b"this call's"
    caller[b"NEW"] = b"this call's"

    forkserver._take_environment(caller)

    assert dict(os.environb) == caller
    assert {key: os.environ.get(key) for key in ("GONE_AFTER", "CHANGED", "KEPT", "NEW")} == {
        "GONE_AFTER": None, "CHANGED": "this call's", "KEPT": "last call's", "NEW": "this call's"}
    # The process's own environment, not only Python's view of it: what the call's children inherit.
    inherited = set(subprocess.run(["env"], capture_output=True, check=True).stdout.splitlines())
    assert {b"CHANGED=this call's", b"KEPT=last call's", b"NEW=this call's"} <= inherited
    assert not any(line.startswith(b"GONE_AFTER=") for line in inherited)


def test_a_request_round_trips_argv_cwd_umask_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPSFTP_TEST_VALUE", "a=b c\u00e9")
    argv = ["backup_data", "/cfg/plugin.yaml", "/data/gpseg0/backups/20261124/20261124101010/gpbackup_0_t"]
    request = forkserver._decode_request(forkserver._encode_request(argv))
    assert request.magic == forkserver.MAGIC and request.digest == forkserver.code_digest()
    assert request.cwd == os.getcwd() and request.argv == argv
    assert request.umask == forkserver._current_umask()
    assert request.caller == (os.getpid(), os.getppid())
    assert request.env[b"GPSFTP_TEST_VALUE"] == "a=b c\u00e9".encode()


@pytest.fixture
def site_packages(tmp_path: Path) -> tuple[Path, Path]:
    """A fake site-packages holding a copy of the plugin's package and its dependencies' metadata; a
    second site dir after it (a distro's dist-packages) holding cryptography's, as Debian installs it."""
    site, distro = tmp_path / "site-packages", tmp_path / "dist-packages"
    package = site / "sftp_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("paramiko-3.4.0.dist-info", "pyyaml-6.0.1.dist-info", "tenacity-8.2.3.dist-info",
                 "pytest-8.0.0.dist-info"):
        (site / name).mkdir()
    distro.mkdir()
    (distro / "cryptography-38.0.4.egg-info").mkdir()
    return package, distro


def _digest(package: Path, distro: Path) -> str:
    return forkserver.digest_of(str(package), [str(package.parent), str(distro)])


@pytest.mark.parametrize("upgrade", ["paramiko by pip", "cryptography by the distro"])
def test_the_code_digest_changes_when_a_dependency_is_upgraded(site_packages: tuple[Path, Path],
                                                               upgrade: str) -> None:
    package, distro = site_packages
    before = _digest(package, distro)
    assert _digest(package, distro) == before
    if upgrade == "paramiko by pip":
        (package.parent / "paramiko-3.4.0.dist-info").rename(package.parent / "paramiko-3.4.1.dist-info")
    else:  # a security update keeps the upstream version in the name and rewrites the directory
        metadata = distro / "cryptography-38.0.4.egg-info"
        info = metadata.stat()
        os.utime(metadata, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    assert _digest(package, distro) != before


def test_the_code_digest_ignores_distributions_the_plugin_does_not_load(site_packages: tuple[Path, Path]) -> None:
    package, distro = site_packages
    before = _digest(package, distro)
    (package.parent / "pytest-8.0.0.dist-info").rename(package.parent / "pytest-8.1.0.dist-info")
    assert _digest(package, distro) == before


def test_exit_code_of_returns_the_workers_exit_code() -> None:
    for code in (0, 1, 2, 130):
        assert forkserver.exit_code_of(code << 8) == code


def test_heeding_the_caller_outside_a_worker_does_nothing() -> None:
    forkserver.act_on_caller_news()


@pytest.fixture
def caller_pipe() -> Iterator[int]:
    """This process as a worker: the write end of its caller's liveness pipe."""
    read_end, write_end = os.pipe()
    forkserver._caller_pipe = read_end
    try:
        yield write_end
    finally:
        forkserver._caller_pipe = None
        os.close(read_end)


def test_a_worker_stops_before_committing_once_its_caller_is_gone(caller_pipe: int) -> None:
    forkserver.act_on_caller_news()  # the caller alive and quiet: nothing happens
    os.close(caller_pipe)
    with pytest.raises(CallerGone):
        forkserver.act_on_caller_news()


def test_a_worker_acts_on_its_callers_signal_before_committing(caller_pipe: int) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: received.append(signum))
    try:
        os.write(caller_pipe, bytes([signal.SIGUSR1]))
        forkserver.act_on_caller_news()
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(caller_pipe)



def test_stop_fork_server_stops_it_and_the_next_call_runs_in_process(served: Served, backup: LocalBackup) -> None:
    socket_path = served.start_server(backup)
    (pid,) = served.server_pids()

    stopped = assert_ok(served.plugin.run("stop-fork-server"))
    assert stopped.stdout.decode() == f"stopped fork server pid {pid}\n"
    assert wait_until(lambda: not alive(pid))
    assert not socket_path.exists()
    assert f"fork server {pid} exiting on signal {int(signal.SIGTERM)}" in served.config.log_text()

    served.setup(backup)
    assert served.served_lines() == []
    assert wait_until(lambda: len(served.server_pids()) == 2)  # and it started the next one


def test_a_server_stopped_while_it_starts_ends_before_stop_servers_returns_and_never_serves(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in socket_dir_env(served.tmpdir).items():
        monkeypatch.setenv(name, value)
    # As a call that ran in its own process does at its end; it returns once the server's process exists,
    # well before that process has started Python.
    forkserver.start_server(str(served.config.log_dir), cli.ENTRY_POINT)

    stopped, running = forkserver.stop_servers()

    assert running == []
    assert len(stopped) == 1, "the server being started was not seen"
    assert not alive(stopped[0])  # already: stop_servers waited for it
    assert served.sockets() == []
    assert "serving" not in served.config.log_text()


def test_stop_fork_server_says_so_when_none_runs(served: Served) -> None:
    assert assert_ok(served.plugin.run("stop-fork-server")).stdout == b"no fork server was running\n"


def test_stop_fork_server_fails_in_one_line_when_a_server_outlives_its_sigterm(served: Served) -> None:
    # A process holding a server's lock, as a server does, that ignores SIGTERM (as a server stuck in the kernel
    # would not end on it either).
    served.socket_dir.mkdir(mode=0o700)
    lock = served.socket_dir / "0.0.0-stuck.sock.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"%d\\n" % os.getpid())
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"

        line = assert_failed(served.plugin.run("stop-fork-server"))

        assert f"fork server pid {holder.pid} still runs {forkserver.STOP_WAIT:g} s after SIGTERM" in line
        assert f"kill -KILL {holder.pid}" in line
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_the_server_and_its_workers_are_named_for_ps_and_top(served: Served, backup: LocalBackup) -> None:
    upload = _start_served_upload(served, backup, "gpbackup_0_named")
    try:
        (server,) = served.server_pids()
        assert upload.server == server
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in (server, upload.worker)}
        assert names == {server: "gpsftp-server", upload.worker: "gpsftp-worker"}
        # Nothing stands between them: the worker is the server's child.
        assert Path(f"/proc/{upload.worker}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(server)
        # The transport thread the worker started for its session is named as the worker.
        assert {Path(task, "comm").read_text().strip() for task in Path(f"/proc/{upload.worker}/task").iterdir()} == {
            "gpsftp-worker"}
    finally:
        end_input(upload.caller)
        upload.caller.communicate(timeout=RUN_TIMEOUT)
    assert upload.caller.returncode == 0


def _calls_served(status: str) -> int:
    match = re.search(r"^fork server pid \d+, up \S+: (\d+) calls?,", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def test_fork_server_status_shows_a_configs_worker_busy_with_its_first_call_then_idle_keeping_its_session(
        served: Served, backup: LocalBackup) -> None:
    upload = _start_served_upload(served, backup, "gpbackup_0_status")  # the first call of a new worker
    (pid,) = served.server_pids()
    config = (f"  config {served.config.path} (backup host {served.config.server.options()['username']}"
              f"@127.0.0.1:{served.config.server.port}): 1 worker: ")

    busy = assert_ok(served.plugin.run("fork-server-status")).stdout.decode()
    assert busy.startswith(f"fork server pid {pid}, up "), busy
    assert config + "1 busy with a call\n" in busy, busy

    end_input(upload.caller)
    _out, err = upload.caller.communicate(timeout=RUN_TIMEOUT)
    assert upload.caller.returncode == 0, err
    idle = assert_ok(served.plugin.run("fork-server-status")).stdout.decode()
    assert config + "1 idle, keeping its SSH session\n" in idle, idle
    assert _calls_served(idle) == _calls_served(busy)  # asking is not a call
    assert served.server_pids() == [pid]

    (server,) = json.loads(assert_ok(served.plugin.run("fork-server-status", "--json")).stdout)["fork_servers"]
    assert (server["pid"], server["answer"], server["calls"]) == (pid, "answered", _calls_served(idle))
    assert server["configs"] == [{
        "config": str(served.config.path), "problem": None, "fork_server": True, "max_connections": None,
        "backup_host": f"{served.config.server.options()['username']}@127.0.0.1:{served.config.server.port}",
        "workers": 1, "idle": 1, "busy": 0, "starting": 0, "waiting": 0, "other_configs_workers": 0,
    }]


def test_fork_server_status_tells_a_caller_it_would_refuse_nothing(served: Served, backup: LocalBackup) -> None:
    field, prefix, _options = CALLER_DIFFERENCES["no_new_privs set"]
    if not _can_run(*prefix):
        pytest.skip(f"{' '.join(prefix)} is not permitted here")
    served.start_server(backup)
    (pid,) = served.server_pids()
    assert_ok(served.plugin.run("backup_data", served.config.path, backup.file("gpbackup_0_seen"), stdin=b"x"))
    assert f"config {served.config.path}" in assert_ok(served.plugin.run("fork-server-status")).stdout.decode()

    result = subprocess.run([*prefix, *served.plugin.argv("fork-server-status")], capture_output=True,
                            env=served.plugin.env(), timeout=RUN_TIMEOUT, check=False)
    shown = assert_ok(result).stdout.decode()
    assert shown.startswith(f"fork server pid {pid}: tells this process nothing: "), shown
    assert "config" not in shown, shown
    refused = [line for line in served.config.log_text().splitlines() if "refused a status request" in line]
    assert len(refused) == 1 and field in refused[0], refused


def test_fork_server_status_says_so_when_none_runs_and_names_another_installs_server(served: Served) -> None:
    assert assert_ok(served.plugin.run("fork-server-status")).stdout == b"no fork server is running\n"
    assert json.loads(assert_ok(served.plugin.run("fork-server-status", "--json")).stdout) == {
        "fork_servers": [], "own_process_connections": []}

    # A server of other code (an upgrade's predecessor): only its lock, held, with its pid in it. It would not
    # understand the question, so none is asked.
    served.socket_dir.mkdir(mode=0o700, exist_ok=True)
    lock = os.open(served.socket_dir / "0.0.1-0badc0de.sock.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(lock, f"{os.getpid()}\n".encode())
        shown = assert_ok(served.plugin.run("fork-server-status")).stdout.decode()
        listed = json.loads(assert_ok(served.plugin.run("fork-server-status", "--json")).stdout)
    finally:
        os.close(lock)
    assert listed == {"fork_servers": [{"pid": os.getpid(), "version": "0.0.1-0badc0de", "answer": "other code"}],
                      "own_process_connections": []}
    assert shown == (f"fork server pid {os.getpid()}: another installed copy or version of the plugin "
                     "(0.0.1-0badc0de); stop-fork-server stops it\n")


def test_a_call_still_running_does_not_keep_a_stopped_servers_place(served: Served, backup: LocalBackup) -> None:
    # The server's lock must not live on in its workers: a long backup_data would
    # keep any new server from starting, and stop-fork-server would name a dead pid.
    name = "gpbackup_0_long"
    upload = _start_served_upload(served, backup, name)
    (first,) = served.server_pids()
    assert_ok(served.plugin.run("stop-fork-server"))
    assert wait_until(lambda: not alive(first))
    assert alive(upload.worker)

    served.setup(backup)
    assert wait_until(lambda: len(served.server_pids()) == 2), "no new server while a call of the old one runs"
    second = served.server_pids()[1]
    assert assert_ok(served.plugin.run("stop-fork-server")).stdout.decode() == f"stopped fork server pid {second}\n"

    end_input(upload.caller)
    _out, err = upload.caller.communicate(timeout=RUN_TIMEOUT)
    assert_ok(subprocess.CompletedProcess(upload.caller.args, upload.caller.returncode, b"", err))


def test_caps_passed_to_a_new_server_are_read_back_and_bad_ones_left_out() -> None:
    route = forkserver.route_of(b"/etc/plugin.yaml\0options: {}")
    hints = [f"{route.hex()}=4", "zz=3", f"{route.hex()[:-2]}=2", f"{b'x'.hex() * 16}=oops"]
    assert forkserver.parse_caps(hints) == {route: 4}
    assert forkserver.parse_caps([f"{route.hex()}=0"]) == {}

