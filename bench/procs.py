"""Start, time and check the child processes the bench compares: the plugin and OpenSSH's ``sftp``.

Every transfer is a fresh process, as gpbackup runs it. A child is timed from
just before it is spawned until ``os.waitpid`` reaps it. Timed ``restore_data``
rounds write to /dev/null, as ``sftp get`` does; one untimed round goes through
a pipe that a thread hashes, so a plugin that writes too little, or the wrong
bytes, cannot look fast. Peak RSS is taken only where asked, untimed, through
peak_rss.py: ``wait4``'s figure for a child of the bench is at least the
bench's own peak.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from devtools.harness import Plugin, signals_held, socket_dir_env

T = TypeVar("T")

# Bytes moved per read when draining a child's stdout: large enough that
# the drain thread costs a few syscalls per MiB, small enough to stay in cache.
DRAIN_CHUNK = 1 << 20
# Pipe capacity for the hashed (untimed) restore_data round. Linux defaults to
# 64 KiB; 1 MiB lets the plugin write many chunks per wake-up of the drain thread.
PIPE_SIZE = 1 << 20
# Chunk size for hashing files: one read per MiB keeps Python overhead negligible.
HASH_CHUNK = 1 << 20
# Runs a child and writes its true peak RSS (see its docstring).
PEAK_RSS = str(Path(__file__).with_name("peak_rss.py"))


class BenchError(Exception):
    """A transfer failed or produced the wrong result; the metric it belongs to is not reported."""


@dataclass(frozen=True)
class Target:
    """One sshd the clients talk to, and the files both clients need to reach it."""

    label: str
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    plugin_config: Path
    remote_dir: Path  # the backup host's remote_dir, also readable locally: both run on this machine


@dataclass
class Outcome:
    """What one child did: wall time, exit code, peak RSS and, if captured, what it wrote."""

    seconds: float
    returncode: int
    maxrss_kib: int | None  # only for a child started with rss_file
    stderr: str
    stdout_bytes: int | None = None
    stdout_sha256: str | None = None

    def check(self, what: str, allow_stderr: bool = False) -> Outcome:
        """Raise BenchError unless the child exited 0 (and, for the plugin, wrote nothing on stderr)."""
        if self.returncode != 0:
            raise BenchError(f"{what} exited {self.returncode}: {self.stderr.strip() or '(no stderr)'}")
        if self.stderr.strip() and not allow_stderr:
            # gpbackup_helper treats any stderr byte from the plugin as a failure.
            raise BenchError(f"{what} exited 0 but wrote to stderr: {self.stderr.strip()}")
        return self


class Child:
    """One child process, started now and reaped (and timed) by finish()."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr_path: Path,  # noqa: PLR0913
                 stdin_path: Path | None = None, hash_stdout: bool = False, rss_file: Path | None = None) -> None:
        """stdout goes to /dev/null, or with ``hash_stdout`` through a pipe that a thread counts and hashes;
        with ``rss_file`` the child runs under peak_rss.py (in its own process group), which writes its
        peak RSS there: not for a timed child (it adds a Python start)."""
        self._stderr = open(stderr_path, "w+b")  # a file, not a pipe: nothing to drain while timing
        self._rss_file = rss_file
        if rss_file is not None:
            argv = [sys.executable, "-S", PEAK_RSS, str(rss_file), *argv]
        self._bytes = 0
        self._hash = hashlib.sha256() if hash_stdout else None
        self._thread: threading.Thread | None = None
        self.on_exit: Callable[[Child], None] | None = None  # told when the child has been reaped
        read_end: int | None = None
        write_end: int | None = None
        stdin: IO[bytes] | int = subprocess.DEVNULL
        if stdin_path is not None:
            stdin = open(stdin_path, "rb")
        try:
            if hash_stdout:
                read_end, write_end = os.pipe()
                with contextlib.suppress(OSError):  # an unprivileged pipe-size limit only costs speed
                    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            self.started = time.perf_counter()
            self.process = subprocess.Popen(argv, stdin=stdin, env=env, stderr=self._stderr,
                                            stdout=subprocess.DEVNULL if write_end is None else write_end,
                                            start_new_session=rss_file is not None)
        finally:
            if write_end is not None:
                os.close(write_end)
            if not isinstance(stdin, int):
                stdin.close()
        if read_end is not None:
            self._thread = threading.Thread(target=self._drain, args=(read_end,), daemon=True)
            self._thread.start()

    def _drain(self, fd: int) -> None:
        try:
            assert self._hash is not None
            while chunk := os.read(fd, DRAIN_CHUNK):
                self._bytes += len(chunk)
                self._hash.update(chunk)
        finally:
            os.close(fd)

    def finish(self) -> Outcome:
        """Wait for the child; its time ends when it exits."""
        _, status = os.waitpid(self.process.pid, 0)
        seconds = time.perf_counter() - self.started
        self.process.returncode = os.waitstatus_to_exitcode(status)
        if self.on_exit is not None:
            self.on_exit(self)
        if self._thread is not None:
            self._thread.join()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        maxrss_kib = None
        if self._rss_file is not None and self.process.returncode == 0:
            maxrss_kib = int(self._rss_file.read_text())
        return Outcome(
            seconds=seconds, returncode=self.process.returncode,
            maxrss_kib=maxrss_kib,
            stderr=stderr,
            stdout_bytes=None if self._hash is None else self._bytes,
            stdout_sha256=None if self._hash is None else self._hash.hexdigest(),
        )

    def kill(self) -> None:
        """Stop a child that will not be finished (an error or Ctrl-C elsewhere)."""
        if self.process.returncode is None:
            with contextlib.suppress(OSError):
                if self._rss_file is not None:  # peak_rss.py and the command it runs
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:
                    self.process.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.process.pid, 0)
            self.process.returncode = -9
        if self.on_exit is not None:
            self.on_exit(self)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._stderr.close()


def run_all(children: list[Child]) -> tuple[float, list[Outcome]]:
    """Finish already-started children; return the wall time from the first start to the last exit."""
    try:
        outcomes = [child.finish() for child in children]
    except BaseException:
        for child in children:
            child.kill()
        raise
    wall = max(o.seconds + c.started for o, c in zip(outcomes, children)) - min(c.started for c in children)
    return wall, outcomes


def run_pool(start: Callable[[T], Child], items: list[T], width: int) -> tuple[float, list[Outcome]]:
    """Start one child per item, `width` running at once (a new one as soon as one ends, as gpbackup's
    jobs do); the wall time from the first start to the last exit, and each child's outcome in order."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(width) as pool:  # each thread waits for its own child (wait4 on its pid)
        outcomes = list(pool.map(lambda item: start(item).finish(), items))
    return time.perf_counter() - started, outcomes


class Runner:
    """Builds the plugin and sftp command lines for a target and runs them."""

    def __init__(self, plugin: Path, workdir: Path) -> None:
        self.scratch = workdir / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        # An empty HOME and no agent: neither client may pick up the user's ~/.ssh/config, keys or agent.
        # The plugin's fork server socket goes in the workdir, and stop_fork_servers() ends it.
        tmp = workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.plugin = Plugin(home, plugin, socket_dir=tmp)
        self.env = self.plugin.env()
        self._no_server_dir = workdir / "no-server"  # see plugin_child
        self._no_server_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._serial = 0
        self._live: set[Child] = set()  # started and not yet finished: killed by kill_all()

    def stop_fork_servers(self) -> None:
        """The bench leaves nothing running: stop the fork server its plugin calls started."""
        self.plugin.stop_fork_server()

    def _scratch(self, suffix: str) -> Path:
        self._serial += 1
        return self.scratch / f"{self._serial:06d}.{suffix}"

    def plugin_child(self, target: Target, command: str, path: Path, *more: Path, stdin_path: Path | None = None,
                     hash_stdout: bool = False, peak_rss: bool = False) -> Child:
        """The plugin running `command` with the target's config, `path` and any `more` arguments
        (`peak_rss`: untimed, its Outcome has the peak RSS)."""
        argv = self.plugin.argv(command, target.plugin_config, path, *more)
        env = self.env
        if peak_rss:
            # Where no fork server listens, so that a target with fork_server: no runs the call in the client's
            # own process: served by a worker, only the compiled client would be measured.
            env = {**env, **socket_dir_env(self._no_server_dir)}
        rss_file = self._scratch("rss") if peak_rss else None
        return self._start(lambda: Child(argv, env, self._scratch("err"), stdin_path=stdin_path,
                                         hash_stdout=hash_stdout, rss_file=rss_file))

    def sftp_batch(self, lines: list[str]) -> Path:
        """Write an sftp batch file (before timing starts)."""
        batch = self._scratch("batch")
        batch.write_text("".join(line + "\n" for line in lines))
        return batch

    def sftp_child(self, target: Target, batch: Path, peak_rss: bool = False) -> Child:
        argv = [
            "sftp", "-q", "-b", str(batch),
            "-F", "none",  # no ssh_config: only the options below apply
            "-o", f"UserKnownHostsFile={target.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-P", str(target.port),
            "-i", str(target.identity_file),
            f"{target.user}@{target.host}",
        ]
        rss_file = self._scratch("rss") if peak_rss else None
        return self._start(lambda: Child(argv, self.env, self._scratch("err"), rss_file=rss_file))

    def _start(self, start: Callable[[], Child]) -> Child:
        """Start a child (`start` runs its Popen) and track it for kill_all, with the driver's signals held:
        started and tracked, or neither (a SIGTERM raised inside Popen would leave it running untracked)."""
        with signals_held():
            child = start()
            self._live.add(child)
        child.on_exit = self._live.discard
        return child

    def kill_all(self) -> None:
        """Kill every child still running (after an error, SIGTERM or Ctrl-C), before the servers go away."""
        while self._live:
            self._live.pop().kill()


def sftp_quote(path: Path | str) -> str:
    """Quote a path for an sftp batch line."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_random_file(path: Path, size: int) -> str:
    """Fill path with size random bytes (incompressible, like a compressed backup); return its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, HASH_CHUNK))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def check_size(path: Path, expected: int, what: str) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise BenchError(f"{what}: {path} was not stored") from None
    if actual != expected:
        raise BenchError(f"{what}: {path} holds {actual} bytes, expected {expected}")
