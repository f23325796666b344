"""gpbackup's side of the plugin calls: its backup directories, and a simulated cluster whose calls are made exactly
as gpbackup and gprestore make them.

``GpbackupCaller`` runs every call as ``bash -c "<executablepath> <command> <config> <args...>"`` in the order and
with the quoting of docs plugin-api.md: hooks prefixed with ``source $GPHOME/greenplum_path.sh &&``, content ids
passed as ``\\"-1\\"`` so the plugin receives the double quotes, each host reading its own copy of the config with
every option re-serialised as a string (``write_host_configs``). A call succeeds only with exit 0 and nothing on
stderr, as gpbackup_helper demands.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from devtools.harness import PLUGIN_NAME, RUN_TIMEOUT, Plugin, signals_held


def random_timestamp(start: datetime = datetime(2001, 1, 1), end: datetime = datetime(2037, 12, 31)) -> str:
    """A random real backup timestamp YYYYMMDDHHMMSS."""
    span = int((end - start).total_seconds())
    return (start + timedelta(seconds=random.randrange(span))).strftime("%Y%m%d%H%M%S")


@dataclass
class LocalBackup:
    """A local gpbackup-shaped directory ``<root>/<segment>/backups/<YYYYMMDD>/<YYYYMMDDHHMMSS>``."""

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
    """gpbackup's default backup directory of one segment's data directory ``root/segment``."""
    timestamp = timestamp or random_timestamp()
    path = root / segment / "backups" / timestamp[:8] / timestamp
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return LocalBackup(path, timestamp)


# --------------------------------------------------------------------------- a simulated cluster


@dataclass(frozen=True)
class Segment:
    content: int  # -1: the coordinator
    host: str

    def backup_dir(self, cluster_root: Path, timestamp: str) -> Path:
        """Its backup directory in a cluster whose hosts are directories of `cluster_root`."""
        return make_local_backup(cluster_root / self.host, timestamp, f"gpseg{self.content}", create=False).path


class Cluster:
    """A coordinator and segment hosts: host name -> the content ids of the segments on it (-1: the coordinator)."""

    def __init__(self, hosts: dict[str, list[int]]) -> None:
        self.hosts = list(hosts)
        self.segments = [Segment(content, host) for host, contents in hosts.items() for content in contents]
        self.coordinator = next(s for s in self.segments if s.content == -1)
        self.primaries = [s for s in self.segments if s.content >= 0]
        self.segment_hosts = [host for host in hosts if host != self.coordinator.host]


class CallFailed(Exception):
    """A plugin call exited non-zero or wrote to stderr."""


@dataclass
class Call:
    what: str
    seconds: float
    stdout: bytes


def quoted_content(content: int) -> str:
    # gpbackup formats the content id as \"%d\" inside bash -c, so the plugin receives the quotes.
    return f'\\"{content}\\"'


def write_host_configs(work: Path, hosts: Iterable[str], options: dict[str, Any], name: str) -> dict[str, Path]:
    """The user's config (work/name), then gpbackup's copy of it on each host (work/hosts/<host>/tmp/name, for
    /tmp/<basename>): every option re-serialised as a string, plus gpbackup's own pgport and
    backup_plugin_version keys, as the plugin really receives it."""
    import yaml

    user_config = work / name
    user_config.write_text(yaml.safe_dump({"executablepath": "(set below)", "options": options}, sort_keys=False))
    copies: dict[str, Path] = {}
    for index, host in enumerate(hosts):
        host_tmp = work / "hosts" / host / "tmp"
        host_tmp.mkdir(parents=True)
        stringified = {
            key: ("true" if value is True else "false" if value is False else str(value))
            for key, value in options.items()
        }
        stringified.update(pgport=str(6000 + index), backup_plugin_version="")
        copy = host_tmp / name
        copy.write_text(yaml.safe_dump({"executablepath": "", "options": stringified}, sort_keys=False))
        copies[host] = copy
    return copies


def write_greenplum_path(gphome: Path) -> None:
    """A stand-in for $GPHOME/greenplum_path.sh: gpbackup sources it before hooks and version checks."""
    gphome.mkdir(parents=True)
    (gphome / "greenplum_path.sh").write_text(
        f'GPHOME={shlex.quote(str(gphome))}\nexport GPHOME\nPATH="$GPHOME/bin:$PATH"\nexport PATH\n'
        'LD_LIBRARY_PATH="$GPHOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\nexport LD_LIBRARY_PATH\n'
    )


class GpbackupCaller:
    """Runs plugin commands as gpbackup does: through bash -c, per host, with the host's config copy, the hosts and
    segments of a scope at once (on `pool`). Every call runs in a process group of its own, so `kill_all` ends
    bash and the plugin together."""

    def __init__(self, plugin: Plugin, cluster: Cluster, gphome: Path, config_paths: dict[str, Path],
                 pool: ThreadPoolExecutor) -> None:
        self.plugin = plugin
        self.cluster = cluster
        self.gphome = gphome
        self.config_paths = config_paths
        self.pool = pool
        self.calls = 0
        self.stopped = False
        self.running: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()

    def command_line(self, host: str, command: str, *args: str, hook: bool = False) -> str:
        parts = [shlex.quote(self.plugin.exe), command]
        if command not in ("plugin_api_version", "--version"):
            parts.append(shlex.quote(str(self.config_paths[host])))
        parts += args
        line = " ".join(parts)
        if hook:
            line = f"source {shlex.quote(str(self.gphome))}/greenplum_path.sh && {line}"
        return line

    def run(self, what: str, line: str, stdin: bytes | None = None, timeout: float = RUN_TIMEOUT) -> Call:
        """One bash -c call; success is exit 0 with an empty stderr."""
        started = time.monotonic()
        with self.lock, signals_held():  # a call started but not yet in self.running would escape kill_all
            if self.stopped:
                raise CallFailed(f"{what}: not started, the run is stopping")
            # Its own process group, so kill_all can end bash and the plugin together.
            process = subprocess.Popen(
                ["bash", "-c", line],
                env=self.plugin.env(),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self.running.add(process)
            self.calls += 1
        try:
            out, err = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(process)
            raise CallFailed(f"{what}: no answer within {timeout:.0f}s: bash -c {line!r}") from None
        except BaseException:  # interrupted while waiting: the call must not outlive us
            self._kill(process)
            raise
        finally:
            with self.lock:
                self.running.discard(process)
        if process.returncode != 0 or err:
            message = err.decode(errors="replace").strip() or "(nothing on stderr)"
            raise CallFailed(f"{what}: exit {process.returncode}, stderr: {message}\n  command: bash -c {line!r}")
        return Call(what, time.monotonic() - started, out)

    def call(self, host: str, command: str, *args: str, hook: bool = False, stdin: bytes | None = None,
             timeout: float = RUN_TIMEOUT) -> Call:
        what = f"{command} on {host} {' '.join(args)}".strip()
        return self.run(what, self.command_line(host, command, *args, hook=hook), stdin, timeout)

    def in_parallel(self, jobs: Iterable[Callable[[], Any]]) -> list[Any]:
        """Run jobs at once (as gpbackup does per host and per segment); the first failure is raised."""
        futures = [self.pool.submit(job) for job in jobs]
        return [future.result() for future in futures]

    def version_checks(self) -> None:
        """plugin_api_version and --version on every host, as gpbackup and gprestore start with."""

        def check(host: str) -> None:
            api = self.call(host, "plugin_api_version", hook=True).stdout.decode().strip()
            version = self.call(host, "--version", hook=True).stdout.decode().split()
            if len(version) != 3 or version[0] != PLUGIN_NAME or version[1] != "version":
                raise CallFailed(f"--version on {host} printed {version!r}, not '<name> version <version>'")
            parts = api.split(".")
            if len(parts) != 3 or not all(p.isdigit() for p in parts) or tuple(map(int, parts)) < (0, 3, 0):
                raise CallFailed(f"plugin_api_version on {host} printed {api!r}; gpbackup requires X.Y.Z >= 0.3.0")

        self.in_parallel([lambda host=host: check(host) for host in self.cluster.hosts])

    def hooks(self, command: str, backup_dir: Callable[[Segment], Path]) -> None:
        """A setup/cleanup hook in gpbackup's three scopes: coordinator, every segment host, every segment; each
        given the backup directory of its segment (of the first one on its host)."""

        def dir_arg(segment: Segment) -> str:
            return shlex.quote(str(backup_dir(segment)))

        coordinator = self.cluster.coordinator
        self.call(coordinator.host, command, dir_arg(coordinator), "coordinator", quoted_content(-1), hook=True)
        primaries = self.cluster.primaries
        first_on_host = {host: next(s for s in primaries if s.host == host) for host in self.cluster.segment_hosts}
        self.in_parallel([lambda host=host, seg=seg: self.call(host, command, dir_arg(seg), "segment_host", hook=True)
                          for host, seg in first_on_host.items()])
        self.in_parallel([lambda seg=seg: self.call(seg.host, command, dir_arg(seg), "segment",
                                                    quoted_content(seg.content), hook=True)
                          for seg in primaries])

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def kill_all(self) -> None:
        """Stop every call in flight and refuse new ones."""
        with self.lock:
            self.stopped = True
            running = list(self.running)
        for process in running:
            self._kill(process)
