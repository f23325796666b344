#!/usr/bin/env python3
"""Run gpbackup_sftp_plugin end to end exactly as gpbackup and gprestore call it, and verify every byte.

``make demo`` runs this against a throwaway OpenSSH sshd it starts on
127.0.0.1 (a free port, keys generated in a temporary directory). With
``--host`` it uses an existing SSH host instead (the docker ``segment``
service does that against ``backup-host``).

The simulated cluster is a coordinator (content -1) and two segment hosts
with two segments each, all as local directories. Every plugin call is
``bash -c "<executablepath> <command> <config> <args...>"`` in the order and
with the quoting of docs plugin-api.md: hooks prefixed with
``source $GPHOME/greenplum_path.sh &&``, content ids passed as ``\\"-1\\"`` so
the plugin receives the double quotes, each host reading its own copy of the
config with every option re-serialised as a string. A call succeeds only
with exit 0 and nothing on stderr, as gpbackup_helper demands.

Everything it creates (work directory, sshd, the backup on the host) is
removed at the end, also on failure and on SIGINT/SIGTERM/SIGHUP. Exit 0
only if every byte round-tripped.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "gpbackup_sftp_plugin"
MIB = 1024 * 1024
# The simulated cluster: host name -> content ids of the segments on it (-1 is the coordinator).
CLUSTER: dict[str, list[int]] = {"cdw": [-1], "sdw1": [0, 1], "sdw2": [2, 3]}
COORDINATOR_HOST = "cdw"
CONFIG_NAME = "demo_sftp_plugin.yaml"
# A plugin call that has not finished in this long is hung: fail the demo instead of waiting forever.
CALL_TIMEOUT = 600
# Cleanup runs with signals ignored, so its calls get a shorter leash.
CLEANUP_TIMEOUT = 60


class Interrupted(BaseException):
    """A signal asked us to stop; raised in the main thread so every finally block runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class CallFailed(Exception):
    """A plugin call exited non-zero or wrote to stderr."""


def say(text: str = "") -> None:
    print(text, flush=True)


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the simulated cluster


@dataclass(frozen=True)
class Segment:
    content: int
    host: str

    def data_dir(self, cluster_root: Path) -> Path:
        return cluster_root / self.host / f"gpseg{self.content}"

    def backup_dir(self, cluster_root: Path, timestamp: str) -> Path:
        # gpbackup's default backup directory: <segment data dir>/backups/<YYYYMMDD>/<timestamp>
        return self.data_dir(cluster_root) / "backups" / timestamp[:8] / timestamp


SEGMENTS = [Segment(content, host) for host, contents in CLUSTER.items() for content in contents]
COORDINATOR = next(s for s in SEGMENTS if s.content == -1)
PRIMARIES = [s for s in SEGMENTS if s.content >= 0]
SEGMENT_HOSTS = [host for host in CLUSTER if host != COORDINATOR_HOST]


@dataclass
class Call:
    what: str
    seconds: float
    stdout: bytes


@dataclass
class Plugin:
    """Runs plugin commands as gpbackup does: through bash -c, per host, with the host's config copy."""

    executable: str
    work: Path
    gphome: Path
    config_paths: dict[str, Path]
    calls: int = 0
    stopped: bool = False
    running: set[subprocess.Popen[bytes]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def command_line(self, host: str, command: str, *args: str, hook: bool = False) -> str:
        parts = [shlex.quote(self.executable), command]
        if command not in ("plugin_api_version", "--version"):
            parts.append(shlex.quote(str(self.config_paths[host])))
        parts += args
        line = " ".join(parts)
        if hook:
            line = f"source {shlex.quote(str(self.gphome))}/greenplum_path.sh && {line}"
        return line

    def run(self, what: str, line: str, stdin: bytes | None = None, timeout: float = CALL_TIMEOUT) -> Call:
        """One bash -c call; success is exit 0 with an empty stderr."""
        started = time.monotonic()
        with self.lock:
            if self.stopped:
                raise CallFailed(f"{what}: not started, the demo is stopping")
            # Its own process group, so cleanup can end bash and the plugin together.
            process = subprocess.Popen(
                ["bash", "-c", line],
                env=self.env(),
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

    def call(
        self,
        host: str,
        command: str,
        *args: str,
        hook: bool = False,
        stdin: bytes | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> Call:
        what = f"{command} on {host} {' '.join(args)}".strip()
        return self.run(what, self.command_line(host, command, *args, hook=hook), stdin, timeout)

    def env(self) -> dict[str, str]:
        """Our environment, but with the plugin's fork server socket in the work dir (see stop_fork_servers)."""
        return dict(os.environ, TMPDIR=str(self.work / "tmp"), XDG_RUNTIME_DIR="")

    def stop_fork_servers(self) -> list[str]:
        """Stop the fork servers the demo's calls started (outside the demo they exit after a minute idle)."""
        result = subprocess.run([self.executable, "stop-fork-server"], env=self.env(), capture_output=True,
                                timeout=CLEANUP_TIMEOUT, check=False)
        return [line for line in result.stdout.decode(errors="replace").splitlines() if line.startswith("stopped")]

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


def in_parallel(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], Any]]) -> list[Any]:
    """Run jobs at once (as gpbackup does per host and per segment); the first failure is raised."""
    futures = [pool.submit(job) for job in jobs]
    return [future.result() for future in futures]


def quoted_content(content: int) -> str:
    # gpbackup formats the content id as \"%d\" inside bash -c, so the plugin receives the quotes.
    return f'\\"{content}\\"'


# --------------------------------------------------------------------------- the demo


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Demo:
    plugin: Plugin
    pool: ThreadPoolExecutor
    work: Path
    timestamp: str
    segment_bytes: int
    stats: Stats = field(default_factory=Stats)
    originals: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of what was backed up
    data: dict[int, bytes] = field(default_factory=dict)  # content id -> segment data stream
    backup_started: bool = False
    backup_rate: float = 0.0  # bytes per second, all segments together
    restore_rate: float = 0.0

    @property
    def backup_root(self) -> Path:
        return self.work / "cluster"

    @property
    def restore_root(self) -> Path:
        return self.work / "restore-cluster"

    def file(self, root: Path, segment: Segment, name: str) -> Path:
        return segment.backup_dir(root, self.timestamp) / name

    def dir_arg(self, root: Path, segment: Segment) -> str:
        return shlex.quote(str(segment.backup_dir(root, self.timestamp)))

    # -- helpers shared by backup and restore

    def version_checks(self) -> None:
        """plugin_api_version and --version on every host, as gpbackup and gprestore start with."""

        def check(host: str) -> None:
            api = self.plugin.call(host, "plugin_api_version", hook=True).stdout.decode().strip()
            version = self.plugin.call(host, "--version", hook=True).stdout.decode().split()
            if len(version) != 3 or version[0] != PLUGIN_NAME or version[1] != "version":
                raise CallFailed(f"--version on {host} printed {version!r}, not '<name> version <version>'")
            parts = api.split(".")
            if len(parts) != 3 or not all(p.isdigit() for p in parts) or tuple(map(int, parts)) < (0, 3, 0):
                raise CallFailed(f"plugin_api_version on {host} printed {api!r}; gpbackup requires X.Y.Z >= 0.3.0")

        in_parallel(self.pool, [lambda host=host: check(host) for host in CLUSTER])

    def hooks(self, command: str, root: Path) -> None:
        """A setup/cleanup hook in gpbackup's three scopes: coordinator, every segment host, every segment."""
        self.plugin.call(
            COORDINATOR_HOST, command, self.dir_arg(root, COORDINATOR), "coordinator", quoted_content(-1), hook=True
        )
        first_on_host = {host: next(s for s in PRIMARIES if s.host == host) for host in SEGMENT_HOSTS}
        in_parallel(
            self.pool,
            [
                lambda host=host, seg=seg: self.plugin.call(
                    host, command, self.dir_arg(root, seg), "segment_host", hook=True
                )
                for host, seg in first_on_host.items()
            ],
        )
        in_parallel(
            self.pool,
            [
                lambda seg=seg: self.plugin.call(
                    seg.host, command, self.dir_arg(root, seg), "segment", quoted_content(seg.content), hook=True
                )
                for seg in PRIMARIES
            ],
        )

    def write_local(self, segment: Segment, name: str, content: bytes) -> Path:
        path = self.file(self.backup_root, segment, name)
        path.write_bytes(content)
        self.originals[name] = sha256(content)
        return path

    def backup_file(self, segment: Segment, path: Path, hook: bool = False, chmod: bool = False) -> None:
        args = [shlex.quote(str(path))]
        line = self.plugin.command_line(segment.host, "backup_file", *args, hook=hook)
        if chmod:  # gpbackup's segment TOC step: "... backup_file <cfg> <toc> && chmod 0755 <toc>"
            line += f" && chmod 0755 {args[0]}"
        self.plugin.run(f"backup_file {path.name} on {segment.host}", line)
        if not path.is_file():
            raise CallFailed(f"backup_file removed the local file {path}; gpbackup chmods it afterwards")
        self.stats.files += 1
        self.stats.bytes += path.stat().st_size

    # -- gpbackup

    def backup(self) -> None:
        ts = self.timestamp
        say("gpbackup side")
        for segment in SEGMENTS:
            segment.backup_dir(self.backup_root, ts).mkdir(parents=True)
        self.version_checks()
        say("  plugin_api_version and --version on 3 hosts: ok")
        self.backup_started = True
        self.hooks("setup_plugin_for_backup", self.backup_root)
        say("  setup_plugin_for_backup: coordinator, 2 segment hosts, 4 segments: ok")

        ddl = b"SET client_encoding = 'UTF8';\nCREATE TABLE public.demo (id int, payload bytea);\n"
        metadata = self.write_local(COORDINATOR, f"gpbackup_{ts}_metadata.sql", ddl * 200)
        self.backup_file(COORDINATOR, metadata)
        say("  backup_file: coordinator metadata: ok")

        for segment in PRIMARIES:
            self.data[segment.content] = os.urandom(self.segment_bytes)
            self.originals[self.data_name(segment)] = sha256(self.data[segment.content])
        started = time.monotonic()
        in_parallel(
            self.pool,
            [
                lambda seg=seg: self.plugin.call(
                    seg.host,
                    "backup_data",
                    shlex.quote(str(self.file(self.backup_root, seg, self.data_name(seg)))),
                    stdin=self.data[seg.content],
                )
                for seg in PRIMARIES
            ],
        )
        seconds = time.monotonic() - started
        total = sum(len(d) for d in self.data.values())
        self.stats.files += len(PRIMARIES)
        self.stats.bytes += total
        self.backup_rate = total / max(seconds, 1e-6)
        say(
            f"  backup_data: {len(PRIMARIES)} segment streams at once, {human_size(total)} in {seconds:.2f}s "
            f"({human_size(self.backup_rate)}/s)"
        )

        toc = f"dataentries:\n  16384:\n    startbyte: 0\n    endbyte: {self.segment_bytes}\n".encode()
        tocs = [self.write_local(seg, f"gpbackup_{seg.content}_{ts}_toc.yaml", toc) for seg in PRIMARIES]
        in_parallel(
            self.pool,
            [
                lambda seg=seg, toc=toc: self.backup_file(seg, toc, hook=True, chmod=True)
                for seg, toc in zip(PRIMARIES, tocs)
            ],
        )
        say("  backup_file: 4 segment TOCs: ok")

        for name, content in (
            (f"gpbackup_{ts}_toc.yaml", b"globalentries: []\npredataentries: []\npostdataentries: []\n"),
            (
                f"gpbackup_{ts}_config.yaml",
                f'backupdir: ""\ntimestamp: "{ts}"\nsingledatafile: true\nplugin: {self.plugin.executable}\n'.encode(),
            ),
            (
                f"gpbackup_{ts}_report",
                f"Greenplum Database Backup Report\n\ntimestamp key: {ts}\nbackup status: Success\n".encode(),
            ),
        ):
            self.backup_file(COORDINATOR, self.write_local(COORDINATOR, name, content))
        say("  backup_file: coordinator toc, config and report: ok")
        self.hooks("cleanup_plugin_for_backup", self.backup_root)
        say("  cleanup_plugin_for_backup: coordinator, 2 segment hosts, 4 segments: ok")

    def data_name(self, segment: Segment) -> str:
        # --single-data-file: one stream per segment, keyed by a path in the segment's backup directory.
        return f"gpbackup_{segment.content}_{self.timestamp}"

    # -- gprestore

    def restore(self) -> None:
        ts = self.timestamp
        root = self.restore_root
        say("gprestore side (into a second, empty cluster)")
        self.version_checks()
        say("  plugin_api_version and --version on 3 hosts: ok")
        self.hooks("setup_plugin_for_restore", root)
        say("  setup_plugin_for_restore: coordinator, 2 segment hosts, 4 segments: ok")

        for name in (
            f"gpbackup_{ts}_config.yaml",
            f"gpbackup_{ts}_report",
            f"gpbackup_{ts}_toc.yaml",
            f"gpbackup_{ts}_metadata.sql",
        ):
            path = self.file(root, COORDINATOR, name)
            self.plugin.call(COORDINATOR_HOST, "restore_file", shlex.quote(str(path)))
            self.verify(name, path.read_bytes())
        say("  restore_file: coordinator config, report, toc and metadata: ok, verified")

        def restore_toc(seg: Segment) -> None:
            path = self.file(root, seg, f"gpbackup_{seg.content}_{ts}_toc.yaml")
            line = f"mkdir -p {self.dir_arg(root, seg)} && " + self.plugin.command_line(
                seg.host, "restore_file", shlex.quote(str(path)), hook=True
            )
            self.plugin.run(f"restore_file {path.name} on {seg.host}", line)
            self.verify(path.name, path.read_bytes())

        in_parallel(self.pool, [lambda seg=seg: restore_toc(seg) for seg in PRIMARIES])
        say("  restore_file: 4 segment TOCs: ok, verified")

        started = time.monotonic()
        streams = in_parallel(
            self.pool,
            [
                lambda seg=seg: (
                    self.plugin.call(
                        seg.host, "restore_data", shlex.quote(str(self.file(root, seg, self.data_name(seg))))
                    ).stdout
                )
                for seg in PRIMARIES
            ],
        )
        seconds = time.monotonic() - started
        total = sum(len(s) for s in streams)
        self.restore_rate = total / max(seconds, 1e-6)
        for seg, stream in zip(PRIMARIES, streams):
            self.verify(self.data_name(seg), stream)
        say(
            f"  restore_data: {len(PRIMARIES)} segment streams at once, {human_size(total)} in {seconds:.2f}s "
            f"({human_size(self.restore_rate)}/s), verified"
        )

        # gprestore --include-table on a backup whose config says restore_subset: only some tables' bytes.
        seg = PRIMARIES[0]
        size = self.segment_bytes
        ranges = [(0, min(size, 1000)), (size // 3, size // 3 + 4096), (size - min(size, 777), size)]
        ranges = sorted({r for r in ranges if r[0] < r[1]})
        offsets = self.file(root, seg, f"gpbackup_{seg.content}_{ts}_offsets")
        offsets.write_text(f"{len(ranges)} " + " ".join(f"{s} {e}" for s, e in ranges) + "\n")
        subset = self.plugin.call(
            seg.host,
            "restore_data_subset",
            shlex.quote(str(self.file(root, seg, self.data_name(seg)))),
            shlex.quote(str(offsets)),
        ).stdout
        expected = b"".join(self.data[seg.content][s:e] for s, e in ranges)
        if subset != expected:
            self.stats.problems.append(
                f"restore_data_subset of content {seg.content} returned {len(subset)} bytes "
                f"that differ from the {len(expected)} expected"
            )
        say(
            f"  restore_data_subset: content {seg.content}, {len(ranges)} byte ranges, {len(subset)} bytes: "
            f"{'ok, verified' if subset == expected else 'MISMATCH'}"
        )
        self.hooks("cleanup_plugin_for_restore", root)
        say("  cleanup_plugin_for_restore: coordinator, 2 segment hosts, 4 segments: ok")

    def verify(self, name: str, content: bytes) -> None:
        expected = self.originals.get(name)
        if expected is None:
            self.stats.problems.append(f"{name} was restored but never backed up")
        elif sha256(content) != expected:
            self.stats.problems.append(f"{name}: restored bytes differ from the backed-up bytes (SHA-256)")

    def remote_tree(self) -> list[tuple[str, int]]:
        """What list_directory says is stored for this backup."""
        sub = f"backups/{self.timestamp[:8]}/{self.timestamp}"
        out = self.plugin.call(COORDINATOR_HOST, "list_directory", sub).stdout.decode()
        entries = []
        for line in out.splitlines():
            path, _, size = line.rpartition("\t")
            entries.append((path, int(size)))
        return entries

    def delete_backup(self, timeout: float = CALL_TIMEOUT) -> None:
        self.plugin.call(COORDINATOR_HOST, "delete_backup", self.timestamp, timeout=timeout)
        listing = self.plugin.call(COORDINATOR_HOST, "list_directory", timeout=timeout).stdout.decode()
        if self.timestamp in listing:
            self.stats.problems.append(f"delete_backup {self.timestamp} left files behind")


# --------------------------------------------------------------------------- setup


def write_configs(work: Path, options: dict[str, Any]) -> dict[str, Path]:
    """The user's config, then gpbackup's per-host copy of it (/tmp/<basename> on each host).

    The copy has every option re-serialised as a string and gpbackup's own pgport and
    backup_plugin_version keys, as the plugin really receives it.
    """
    import yaml

    user_config = work / CONFIG_NAME
    user_config.write_text(yaml.safe_dump({"executablepath": "(set below)", "options": options}, sort_keys=False))
    copies: dict[str, Path] = {}
    for index, host in enumerate(CLUSTER):
        host_tmp = work / "hosts" / host / "tmp"
        host_tmp.mkdir(parents=True)
        stringified = {
            key: ("true" if value is True else "false" if value is False else str(value))
            for key, value in options.items()
        }
        stringified.update(pgport=str(6000 + index), backup_plugin_version="")
        copy = host_tmp / CONFIG_NAME
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


def default_plugin() -> str:
    beside = Path(sys.executable).parent / PLUGIN_NAME
    if beside.is_file():
        return str(beside)
    found = shutil.which(PLUGIN_NAME)
    return str(Path(found).resolve()) if found else ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Back up and restore a simulated Greenplum cluster through gpbackup_sftp_plugin, exactly as "
        "gpbackup/gprestore call it, and verify every byte. Without --host it starts a throwaway "
        "sshd on 127.0.0.1."
    )
    parser.add_argument(
        "--plugin",
        default=default_plugin(),
        help="absolute path of the plugin executable (default: the one installed with this Python)",
    )
    parser.add_argument("--segment-mib", type=int, default=4, help="MiB of data per segment (default 4)")
    external = parser.add_argument_group("external backup host (instead of a throwaway sshd)")
    external.add_argument("--host", help="hostname of the SSH backup host")
    external.add_argument("--port", type=int, default=22)
    external.add_argument("--user", help="user on the backup host")
    external.add_argument("--remote-dir", help="existing directory on the backup host, writable by --user")
    external.add_argument("--identity-file", help="private key for --user")
    external.add_argument("--known-hosts", help="known_hosts file that holds the backup host's key")
    external.add_argument("--strict-host-key-checking", choices=("yes", "accept-new"), default="yes")
    args = parser.parse_args(argv)
    if not args.plugin or not os.path.isabs(args.plugin):
        parser.error("--plugin must be an absolute path (gpbackup requires it); install the plugin first")
    if args.host and not args.remote_dir:
        parser.error("--host needs --remote-dir")
    if args.segment_mib < 1:
        parser.error("--segment-mib must be at least 1")
    return args


def external_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "hostname": args.host,
        "port": args.port,
        "remote_dir": args.remote_dir,
        "strict_host_key_checking": args.strict_host_key_checking,
    }
    for key, value in (
        ("username", args.user),
        ("identity_file", args.identity_file),
        ("known_hosts_file", args.known_hosts),
    ):
        if value:
            options[key] = value
    return options


def stop_server(server: Any) -> None:
    """Stop the throwaway sshd; if its process handle was lost, fall back to its pid file."""
    server.stop()
    pid_file = server.server_dir / "sshd.pid"
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if str(server.server_dir).encode() in cmdline:
        os.kill(pid, signal.SIGTERM)


def print_summary(demo: Demo, tree: list[tuple[str, int]]) -> None:
    say()
    say("Remote tree on the backup host, under remote_dir (from list_directory):")
    width = max((len(path.rpartition("/")[2]) for path, _ in tree), default=0)
    directory = None
    for path, size in tree:
        parent, _, name = path.rpartition("/")
        if parent != directory:
            directory = parent
            say(f"  {parent}/")
        say(f"    {name:<{width}}  {human_size(size):>10}")
    say()
    stats = demo.stats
    say("Summary")
    say(
        f"  files backed up and restored: {stats.files} ({human_size(stats.bytes)}); "
        f"{len(tree)} files ({human_size(sum(size for _, size in tree))}) on the backup host"
    )
    say(
        f"  throughput: backup_data {human_size(demo.backup_rate)}/s, restore_data {human_size(demo.restore_rate)}/s "
        f"({len(PRIMARIES)} segments at once)"
    )
    say(f"  plugin calls: {demo.plugin.calls}, every one exit 0 with nothing on stderr")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    work = Path(tempfile.mkdtemp(prefix="gpbackup_sftp_demo."))
    (work / "tmp").mkdir()
    server = None
    pool = ThreadPoolExecutor(max_workers=len(PRIMARIES))
    demo: Demo | None = None
    code = 1
    try:
        if args.host:
            options = external_options(args)
            say(f"backup host: {args.user + '@' if args.user else ''}{args.host}:{args.port}:{args.remote_dir}")
        else:
            sys.path.insert(0, str(REPO))
            from tests.sshd_server import SshServer

            server = SshServer(work / "backup-host")
            server.start()
            options = server.options()
            say(
                f"backup host: throwaway OpenSSH sshd on 127.0.0.1:{server.port} (pid {server.process.pid}), "
                f"keys in {server.workdir}"
            )
        options.update(log_dir=str(work / "logs"), restore_subset="on")
        gphome = work / "gphome"
        write_greenplum_path(gphome)
        plugin = Plugin(args.plugin, work, gphome, write_configs(work, options))
        version = plugin.call(COORDINATOR_HOST, "--version").stdout.decode().strip()
        timestamp = time.strftime("%Y%m%d%H%M%S")
        say(f"plugin: {args.plugin} ({version})")
        say(
            f"cluster: coordinator cdw (content -1), segment hosts sdw1 (0, 1) and sdw2 (2, 3); "
            f"{args.segment_mib} MiB per segment; backup timestamp {timestamp}"
        )
        say()
        demo = Demo(plugin, pool, work, timestamp, args.segment_mib * MIB)
        demo.backup()
        demo.restore()
        tree = demo.remote_tree()
        print_summary(demo, tree)
        demo.delete_backup()
        demo.backup_started = False
        say(f"  delete_backup {timestamp}: removed from the backup host")
        if demo.stats.problems:
            say()
            say("FAILED: not everything round-tripped:")
            for problem in demo.stats.problems:
                say(f"  - {problem}")
            code = 1
        else:
            say("  verified: every file and data stream restored byte for byte (SHA-256), and the byte-range subset")
            code = 0
    except CallFailed as err:
        say()
        say(f"FAILED: {err}")
        show_log_tail(work)
        code = 1
    except Interrupted as err:
        say()
        say(f"interrupted by signal {err.signum}; cleaning up")
        code = 128 + err.signum
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        code = cleanup(demo, pool, server, work, code)
    say("RESULT: OK" if code == 0 else "RESULT: FAILED")
    return code


def show_log_tail(work: Path, lines: int = 20) -> None:
    logs = sorted((work / "logs").glob("*.log"))
    if logs:
        say(f"last lines of the plugin log {logs[-1].name}:")
        for line in logs[-1].read_text(errors="replace").splitlines()[-lines:]:
            say(f"  {line}")


def cleanup(demo: Demo | None, pool: ThreadPoolExecutor, server: Any, work: Path, code: int) -> int:
    """Remove everything the demo made: running plugin calls, the backup on the host, sshd, the work dir."""
    if demo is not None:
        demo.plugin.kill_all()
    pool.shutdown(wait=True, cancel_futures=True)
    # A throwaway sshd's remote_dir is inside the work dir; only an external host needs the backup deleted.
    if demo is not None and demo.backup_started and server is None:
        demo.plugin.stopped = False
        try:  # best effort: the run failed or was interrupted after the backup began
            demo.delete_backup(timeout=CLEANUP_TIMEOUT)
            say(f"cleanup: deleted the partial backup {demo.timestamp} from the backup host")
        except CallFailed as err:
            say(f"cleanup: could not delete backup {demo.timestamp} from the backup host: {err}")
            code = code or 1
    if server is not None:
        stop_server(server)
        say("cleanup: stopped the throwaway sshd")
    if demo is not None:
        for line in demo.plugin.stop_fork_servers():
            say(f"cleanup: {line}")
    shutil.rmtree(work, ignore_errors=True)
    if work.exists():
        say(f"cleanup: could not remove {work}")
        code = code or 1
    else:
        say(f"cleanup: removed {work}")
    return code


if __name__ == "__main__":
    sys.exit(main())
