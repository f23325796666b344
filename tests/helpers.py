"""Shared helpers for the behaviour tests: running the installed console script and shaping gpbackup paths.

The fixtures that hand these out live in conftest.py; test modules import the
classes from here only for type hints and for the few plain functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.sshd_server import SshServer, free_port

# The console script pip installed next to the interpreter running pytest.
PLUGIN_EXE = os.path.join(os.path.dirname(sys.executable), "gpbackup_sftp_plugin")
# A hung plugin must fail the test instead of hanging the suite; not a timing assertion.
RUN_TIMEOUT = 300
# Longest wait for something a test waits on (a server's socket, a process ending,
# a fault firing), allowing for a loaded 2-core CI machine; a deadline, not an assertion.
WAIT_TIMEOUT = 20.0
# The TMPDIR of this session's plugin calls, where their fork server keeps its
# socket: conftest sets it, and stops exactly that server at the end.
SESSION_TMPDIR: str | None = None


def wait_until(predicate: Callable[[], object], timeout: float = WAIT_TIMEOUT) -> bool:
    """Whether `predicate` came true within `timeout` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def socket_dir_env(tmpdir: str | Path) -> dict[str, str]:
    """Variables that put the fork server's socket under `tmpdir` (XDG_RUNTIME_DIR would come first)."""
    return {"TMPDIR": str(tmpdir), "XDG_RUNTIME_DIR": ""}


def isolated_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for one plugin process: its own HOME, no ssh-agent, the session's TMPDIR."""
    env = dict(os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    env["HOME"] = str(home)
    if SESSION_TMPDIR is not None:
        env.update(socket_dir_env(SESSION_TMPDIR))
    env.update(extra or {})
    return env


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_ok(result: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    """Success per the API: exit 0 and not one byte on stderr."""
    assert result.returncode == 0, f"exit {result.returncode}, stderr: {result.stderr!r}"
    assert result.stderr == b"", f"stderr on success: {result.stderr!r}"
    return result


def assert_failed(result: subprocess.CompletedProcess[bytes]) -> str:
    """Failure per the API: non-zero exit and one human line on stderr (no traceback). Returns that line."""
    assert result.returncode != 0, f"expected failure, got exit 0 (stdout {result.stdout[:200]!r})"
    text = result.stderr.decode("utf-8", errors="replace")
    assert "Traceback" not in text, text
    assert text.endswith("\n") and text.count("\n") == 1, f"expected exactly one line on stderr, got {text!r}"
    assert text.strip(), "failure without a message on stderr"
    return text.strip()


class Plugin:
    """Runs the installed ``gpbackup_sftp_plugin`` as gpbackup would, in an isolated environment."""

    def __init__(self, home: Path, exe: str = PLUGIN_EXE) -> None:
        self.home = home
        self.exe = exe

    def run(self, *args: str | Path, stdin: bytes = b"", cwd: Path | None = None,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.exe, *map(str, args)], input=stdin, capture_output=True,
                              env=isolated_env(self.home, env_extra), cwd=cwd, timeout=RUN_TIMEOUT, check=False)

    def ok(self, *args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return assert_ok(self.run(*args, stdin=stdin))

    def fails(self, *args: str | Path, stdin: bytes = b"") -> str:
        return assert_failed(self.run(*args, stdin=stdin))


@dataclass
class SiteConfig:
    """A plugin config for one test: its own remote_dir below the server's and its own log_dir."""

    server: SshServer
    directory: Path
    remote_dir: Path
    log_dir: Path
    path: Path

    def write(self, name: str = "plugin_config.yaml", **overrides: object) -> Path:
        """Another config for this test's remote_dir and log_dir, with option overrides (None drops one)."""
        options: dict[str, object] = {"remote_dir": str(self.remote_dir), "log_dir": str(self.log_dir)}
        options.update(overrides)
        return self.server.write_config(self.directory / name, **options)

    def closed_port(self, name: str = "closed_port.yaml", **overrides: object) -> Path:
        """A config pointing at a port nobody listens on, failing fast (retries: 1) if it is ever used."""
        options: dict[str, object] = {"port": free_port(), "retries": 1, "connect_timeout": 2}
        options.update(overrides)
        return self.write(name, **options)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*")) if p.is_file())


def random_timestamp(start: datetime = datetime(2001, 1, 1), end: datetime = datetime(2037, 12, 31)) -> str:
    """A random real backup timestamp YYYYMMDDHHMMSS."""
    span = int((end - start).total_seconds())
    return (start + timedelta(seconds=random.randrange(span))).strftime("%Y%m%d%H%M%S")


@dataclass
class LocalBackup:
    """A local gpbackup-shaped directory ``<root>/gpseg0/backups/<YYYYMMDD>/<YYYYMMDDHHMMSS>``."""

    path: Path
    timestamp: str

    @property
    def date(self) -> str:
        return self.timestamp[:8]

    def file(self, name: str) -> Path:
        return self.path / name

    def remote(self, remote_dir: Path, name: str | None = None) -> Path:
        """Where the plugin keeps this backup (or one file of it) under remote_dir."""
        directory = remote_dir / "backups" / self.date / self.timestamp
        return directory / name if name else directory


def make_local_backup(root: Path, timestamp: str | None = None, segment: str = "gpseg0",
                      create: bool = True) -> LocalBackup:
    timestamp = timestamp or random_timestamp()
    path = root / segment / "backups" / timestamp[:8] / timestamp
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return LocalBackup(path, timestamp)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as ended: its parent only has to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    try:
        return status.read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


# Runs the command in argv[1:] as its child, prints the child's pid, waits: a parent a test can kill.
_PARENT = ("import subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(child.pid, flush=True); sys.exit(child.wait())")


def start_under_a_parent(plugin: Plugin, *args: str | Path,
                         env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start the plugin as the child of a parent process (as gpbackup_helper starts it), its stdin a pipe
    the test writes to. Returns the parent, the plugin's pid and the pipe's write end."""
    read_end, write_end = os.pipe()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, plugin.exe, *map(str, args)], stdin=read_end,
                              stdout=subprocess.PIPE, env=isolated_env(plugin.home, env_extra))
    os.close(read_end)
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline()), write_end


def gpbackup_report(timestamp: str, status: str, database: str = "prod") -> str:
    """The coordinator's report as gpbackup writes it at the end of a backup (abridged)."""
    return (f"Greenplum Database Backup Report\n\ntimestamp key:         {timestamp}\n"
            f"gpbackup version:      1.30.5\ndatabase name:         {database}\n\nbackup status:         {status}\n")


def gpbackup_config(timestamp: str, database: str, status: str | None = "Success",
                    needs: tuple[str, ...] = ()) -> str:
    """The coordinator's gpbackup_<ts>_config.yaml as gpbackup (yaml.v2) writes it; an incremental
    backup when ``needs`` names the earlier backups whose data a restore of it reads (abridged)."""
    plan = "".join(f'- timestamp: "{ts}"\n  tablefqns:\n  - public.t_{ts}\n' for ts in (*needs, timestamp))
    return (f"backupdir: \"\"\nbackupversion: 1.30.5\ncompressed: true\ncompressiontype: gzip\n"
            f"databasename: {database}\ndatabaseversion: 6.26.0 build commit:abc\nsegmentcount: 2\n"
            f"excluderelations: []\nincremental: {'true' if needs else 'false'}\n"
            f"metadataonly: false\nplugin: /usr/local/gpbackup_sftp_plugin/bin/gpbackup_sftp_plugin\n"
            f"pluginversion: 0.1.0\nrestoreplan:\n{plan}singledatafile: false\ntimestamp: \"{timestamp}\"\n"
            f"endtime: \"{timestamp}\"\nwithoutglobals: false\nwithstatistics: false\n"
            + (f"status: {status}\n" if status is not None else ""))


def gpbackup_files(timestamp: str, database: str = "prod", status: str = "Success",
                   needs: tuple[str, ...] = ()) -> dict[str, bytes]:
    """What gpbackup leaves in a backup directory that retention reads: config.yaml and report, plus one data file."""
    return {
        f"gpbackup_0_{timestamp}": b"table data",
        f"gpbackup_{timestamp}_config.yaml": gpbackup_config(timestamp, database, status, needs).encode(),
        f"gpbackup_{timestamp}_report": gpbackup_report(timestamp, status, database).encode(),
    }


@contextlib.contextmanager
def undeletable(directory: Path) -> Iterator[None]:
    """Make the files in a remote directory undeletable for the test server (local, running as this user)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    # Root ignores file modes; the immutable attribute stops even root.
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a directory undeletable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
