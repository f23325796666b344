"""Helpers of the behaviour tests alone; the harness they share with the demo and the bench is devtools.harness.

The fixtures that hand these out live in conftest.py (and ``sshd_fixture`` makes
every sshd fixture); test modules import from here for the few plain functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import PLUGIN_EXE, RUN_TIMEOUT, Plugin, SiteConfig, plugin_env
from devtools.sshd import SshServer
from sftp_plugin import paths

# Longest wait for something a test waits on (a server's socket, a process ending,
# a fault firing), allowing for a loaded 2-core CI machine; a deadline, not an assertion.
WAIT_TIMEOUT = 20.0
# The TMPDIR of this session's plugin calls, where their fork server keeps its
# socket: conftest sets it, and stops exactly that server at the end.
SESSION_TMPDIR: str | None = None


def finish(call: subprocess.Popen[bytes], data: bytes) -> None:
    """Feed a started call the rest of its input; it must succeed with nothing on stderr."""
    _, err = call.communicate(data, timeout=RUN_TIMEOUT)
    assert call.returncode == 0 and err == b"", err


def wait_until(predicate: Callable[[], object], timeout: float = WAIT_TIMEOUT) -> bool:
    """Whether `predicate` came true within `timeout` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def isolated_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for one plugin process: its own HOME, no ssh-agent, the session's TMPDIR."""
    return plugin_env(home, SESSION_TMPDIR, extra)


def session_plugin(home: Path, exe: str = PLUGIN_EXE) -> Plugin:
    """The plugin with its own HOME whose calls share the session's fork server (conftest stops it)."""
    return Plugin(home, exe, socket_dir=SESSION_TMPDIR)


def sshd_fixture(name: str, scope: str = "function", **server_options: Any) -> Any:
    """A pytest fixture (named after the attribute it is assigned to): an sshd of its own, in a fresh directory
    called `name`, for the `scope`; `server_options` go to SshServer (max_startups, extra_config)."""

    def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
        with SshServer(tmp_path_factory.mktemp(name), **server_options) as running:
            yield running

    return pytest.fixture(scope=scope)(server)


def fork_server_pids(config: SiteConfig) -> list[int]:
    """The fork servers the calls of `config` started, as its log names them, in order."""
    return [int(pid) for pid in re.findall(r"fork server (\d+) serving", config.log_text())]


@contextlib.contextmanager
def own_fork_server(config: SiteConfig, prefix: str) -> Iterator[Path]:
    """A socket directory of the test's own, for a fork server only its calls use (short: pytest's tmp_path
    would push the socket path past the 107 bytes a Unix socket allows); at the end the fork servers that
    `config`'s log names are stopped and the directory removed."""
    tmpdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmpdir
    finally:
        for pid in fork_server_pids(config):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmpdir, ignore_errors=True)


def flip(path: Path, offset: int) -> None:
    """Flip one bit of a stored file (the lowest of the byte at ``offset``)."""
    damaged = bytearray(path.read_bytes())
    damaged[offset] ^= 0x01
    path.write_bytes(bytes(damaged))


def write_offsets(tmp_path: Path, ranges: list[tuple[int, int]]) -> Path:
    """An offsets file for restore_data_subset, as gprestore writes it: ``N s1 e1 ... sN eN``."""
    offsets = tmp_path / "offsets"
    offsets.write_text(f"{len(ranges)} " + " ".join(f"{s} {e}" for s, e in ranges))
    return offsets


def upload_leftovers(top: Path) -> list[Path]:
    """Temporary upload files anywhere under `top`; not a warm worker's empty spare files, held open for its
    next upload (test_sessions checks those go with their session), which may go while we look."""
    found = []
    for path in top.rglob(".*.partial"):
        try:
            if paths.is_upload_leftover(path.name, path.stat().st_size):
                found.append(path)
        except FileNotFoundError:
            continue
    return sorted(found)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, *plugin.argv(*args)], stdin=read_end,
                              stdout=subprocess.PIPE, env=plugin.env(env_extra))
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
