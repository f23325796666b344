"""Run gpbackup_sftp_plugin end to end exactly as gpbackup and gprestore call it, and verify every byte.

``make demo`` runs this (``python -m scripts.demo`` from the repository root)
against a throwaway OpenSSH sshd it starts on 127.0.0.1 (a free port, keys
generated in a temporary directory). With ``--host`` it uses an existing SSH
host instead (the docker ``segment`` service does that against ``backup-host``).

The simulated cluster is a coordinator (content -1) and two segment hosts
with two segments each, all as local directories. Every plugin call is made
as gpbackup makes it (``devtools.gpbackup``: ``bash -c``, hooks after
``greenplum_path.sh``, each host reading its own copy of the config); a call
succeeds only with exit 0 and nothing on stderr, as gpbackup_helper demands.

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
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.gpbackup import CallFailed, Cluster, GpbackupCaller, Segment, write_greenplum_path, write_host_configs
from devtools.harness import PLUGIN_EXE, RUN_TIMEOUT, Plugin
from devtools.sshd import SshServer

MIB = 1024 * 1024
# The simulated cluster: host name -> content ids of the segments on it (-1 is the coordinator).
CLUSTER = Cluster({"cdw": [-1], "sdw1": [0, 1], "sdw2": [2, 3]})
COORDINATOR = CLUSTER.coordinator
PRIMARIES = CLUSTER.primaries
CONFIG_NAME = "demo_sftp_plugin.yaml"
# Cleanup runs with signals ignored, so its calls get a shorter leash.
CLEANUP_TIMEOUT = 60


class Interrupted(BaseException):
    """A signal asked us to stop; raised in the main thread so every finally block runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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


# --------------------------------------------------------------------------- the demo


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Demo:
    gp: GpbackupCaller
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

    def hooks(self, command: str, root: Path) -> None:
        self.gp.hooks(command, lambda segment: segment.backup_dir(root, self.timestamp))

    def write_local(self, segment: Segment, name: str, content: bytes) -> Path:
        path = self.file(self.backup_root, segment, name)
        path.write_bytes(content)
        self.originals[name] = sha256(content)
        return path

    def backup_file(self, segment: Segment, path: Path, hook: bool = False, chmod: bool = False) -> None:
        args = [shlex.quote(str(path))]
        line = self.gp.command_line(segment.host, "backup_file", *args, hook=hook)
        if chmod:  # gpbackup's segment TOC step: "... backup_file <cfg> <toc> && chmod 0755 <toc>"
            line += f" && chmod 0755 {args[0]}"
        self.gp.run(f"backup_file {path.name} on {segment.host}", line)
        if not path.is_file():
            raise CallFailed(f"backup_file removed the local file {path}; gpbackup chmods it afterwards")
        self.stats.files += 1
        self.stats.bytes += path.stat().st_size

    # -- gpbackup

    def backup(self) -> None:
        ts = self.timestamp
        say("gpbackup side")
        for segment in CLUSTER.segments:
            segment.backup_dir(self.backup_root, ts).mkdir(parents=True)
        self.gp.version_checks()
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
        self.gp.in_parallel(
            [
                lambda seg=seg: self.gp.call(
                    seg.host,
                    "backup_data",
                    shlex.quote(str(self.file(self.backup_root, seg, self.data_name(seg)))),
                    stdin=self.data[seg.content],
                )
                for seg in PRIMARIES
            ]
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
        self.gp.in_parallel(
            [
                lambda seg=seg, toc=toc: self.backup_file(seg, toc, hook=True, chmod=True)
                for seg, toc in zip(PRIMARIES, tocs)
            ]
        )
        say("  backup_file: 4 segment TOCs: ok")

        for name, content in (
            (f"gpbackup_{ts}_toc.yaml", b"globalentries: []\npredataentries: []\npostdataentries: []\n"),
            (
                f"gpbackup_{ts}_config.yaml",
                f'backupdir: ""\ntimestamp: "{ts}"\nsingledatafile: true\nplugin: {self.gp.plugin.exe}\n'.encode(),
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
        self.gp.version_checks()
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
            self.gp.call(COORDINATOR.host, "restore_file", shlex.quote(str(path)))
            self.verify(name, path.read_bytes())
        say("  restore_file: coordinator config, report, toc and metadata: ok, verified")

        def restore_toc(seg: Segment) -> None:
            path = self.file(root, seg, f"gpbackup_{seg.content}_{ts}_toc.yaml")
            line = f"mkdir -p {self.dir_arg(root, seg)} && " + self.gp.command_line(
                seg.host, "restore_file", shlex.quote(str(path)), hook=True
            )
            self.gp.run(f"restore_file {path.name} on {seg.host}", line)
            self.verify(path.name, path.read_bytes())

        self.gp.in_parallel([lambda seg=seg: restore_toc(seg) for seg in PRIMARIES])
        say("  restore_file: 4 segment TOCs: ok, verified")

        started = time.monotonic()
        streams = self.gp.in_parallel(
            [
                lambda seg=seg: (
                    self.gp.call(
                        seg.host, "restore_data", shlex.quote(str(self.file(root, seg, self.data_name(seg))))
                    ).stdout
                )
                for seg in PRIMARIES
            ]
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
        subset = self.gp.call(
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
        out = self.gp.call(COORDINATOR.host, "list_directory", sub).stdout.decode()
        entries = []
        for line in out.splitlines():
            path, _, size = line.rpartition("\t")
            entries.append((path, int(size)))
        return entries

    def delete_backup(self, timeout: float = RUN_TIMEOUT) -> None:
        self.gp.call(COORDINATOR.host, "delete_backup", self.timestamp, timeout=timeout)
        listing = self.gp.call(COORDINATOR.host, "list_directory", timeout=timeout).stdout.decode()
        if self.timestamp in listing:
            self.stats.problems.append(f"delete_backup {self.timestamp} left files behind")


# --------------------------------------------------------------------------- setup


def default_plugin() -> str:
    if Path(PLUGIN_EXE).is_file():
        return PLUGIN_EXE
    found = shutil.which(Path(PLUGIN_EXE).name)
    return str(Path(found).resolve()) if found else ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo",
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
    say(f"  plugin calls: {demo.gp.calls}, every one exit 0 with nothing on stderr")


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
    gp: GpbackupCaller | None = None
    demo: Demo | None = None
    code = 1
    try:
        if args.host:
            options = external_options(args)
            say(f"backup host: {args.user + '@' if args.user else ''}{args.host}:{args.port}:{args.remote_dir}")
        else:
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
        # The caller's HOME and ssh-agent (an external host may need them); the fork server's socket in the work dir.
        plugin = Plugin(None, args.plugin, socket_dir=work / "tmp")
        configs = write_host_configs(work, CLUSTER.hosts, options, CONFIG_NAME)
        gp = GpbackupCaller(plugin, CLUSTER, gphome, configs, pool)
        version = gp.call(COORDINATOR.host, "--version").stdout.decode().strip()
        timestamp = time.strftime("%Y%m%d%H%M%S")
        say(f"plugin: {args.plugin} ({version})")
        say(
            f"cluster: coordinator cdw (content -1), segment hosts sdw1 (0, 1) and sdw2 (2, 3); "
            f"{args.segment_mib} MiB per segment; backup timestamp {timestamp}"
        )
        say()
        demo = Demo(gp, work, timestamp, args.segment_mib * MIB)
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
        code = cleanup(gp, demo, pool, server, work, code)
    say("RESULT: OK" if code == 0 else "RESULT: FAILED")
    return code


def show_log_tail(work: Path, lines: int = 20) -> None:
    logs = sorted((work / "logs").glob("*.log"))
    if logs:
        say(f"last lines of the plugin log {logs[-1].name}:")
        for line in logs[-1].read_text(errors="replace").splitlines()[-lines:]:
            say(f"  {line}")


def cleanup(gp: GpbackupCaller | None, demo: Demo | None, pool: ThreadPoolExecutor, server: SshServer | None,
            work: Path, code: int) -> int:
    """Remove everything the demo made: running plugin calls, the backup on the host, sshd, the work dir."""
    if gp is not None:
        gp.kill_all()
    pool.shutdown(wait=True, cancel_futures=True)
    # A throwaway sshd's remote_dir is inside the work dir; only an external host needs the backup deleted.
    if gp is not None and demo is not None and demo.backup_started and server is None:
        gp.stopped = False
        try:  # best effort: the run failed or was interrupted after the backup began
            demo.delete_backup(timeout=CLEANUP_TIMEOUT)
            say(f"cleanup: deleted the partial backup {demo.timestamp} from the backup host")
        except CallFailed as err:
            say(f"cleanup: could not delete backup {demo.timestamp} from the backup host: {err}")
            code = code or 1
    if server is not None:
        server.stop()
        say("cleanup: stopped the throwaway sshd")
    if gp is not None:
        for line in gp.plugin.stop_fork_server(timeout=CLEANUP_TIMEOUT):
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
