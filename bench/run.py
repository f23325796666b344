"""Benchmark gpbackup_sftp_plugin against OpenSSH's ``sftp`` client (``make bench``).

Starts the same throwaway sshd the tests use (devtools/sshd.py), with its
keys, remote_dir and all test data on tmpfs so disk speed is not measured, and
in one run, alternating plugin and OpenSSH within every round, measures:

* stream up: ``backup_data`` of one long stream vs ``sftp put`` of the same file;
* stream down: ``restore_data`` vs ``sftp get`` of that stream, both to /dev/null;
* per-call cost: sequential ``backup_file`` calls of a tiny file, each timed, warm
  (a fork server worker holds a session) and cold (``session_idle: 0``), vs as
  many ``sftp`` processes putting one file each (a fresh process and connection
  every time);
* a per-table storm: 1,000 small ``backup_data`` calls 16 at a time, then their
  ``restore_data``, vs ``sftp`` putting and getting the same files one process
  each, 16 at a time; and the logins the backup host logged meanwhile; then its
  backups again with ``max_connections: 4`` (after one call, as gpbackup's setup):
  the wall time and the logins (at most 4);
* concurrency: several ``backup_data`` streams at once vs as many ``sftp`` puts;
* high latency: stream up/down again over a veth pair with ``tc netem`` delay
  into a network namespace (bench/latency.py); where that is impossible (no
  root, no netem in the kernel), through a userspace delay proxy on 127.0.0.1
  in front of the loopback sshd instead (devtools/delayproxy.py), which both
  clients share; the rows and the JSON say which was used, and the proxy's
  measured RTT; and over that link a per-table restore, ``restore_data`` of a
  300 KiB table file call after call, each hashed, vs ``sftp get`` of it one
  process each;
* at rest: ``backup_data`` of table-like rows (bench/tabledata.py) stored plain,
  as a zstd container and as a zstd + AES-256-GCM container vs ``sftp put`` of
  the same bytes; the stored size vs gzip -1; ``restore_data_subset`` of 1% of
  a 1 GiB container in 10 ranges vs its whole ``restore_data``, with the bytes
  the backup host sent counted by a zero-delay proxy;
* ``plugin_api_version`` wall time and the peak RSS of ``backup_data``.

Ratios are OpenSSH time / plugin time: above 1 the plugin is faster. Every
plugin call is checked (exit code, empty stderr), every stored upload's size,
the SHA-256 of each stored stream-up copy and of one stream per concurrency
round, and one untimed ``restore_data`` is hashed through a pipe (timed ones
exit 0 only if the stream matched its stored SHA-256), so a broken plugin
cannot look fast. Prints a table to stdout (progress goes to stderr) and writes the
same figures, with machine details, to a JSON file.

Run from the repository root: ``.venv/bin/python -m bench.run [--size-mib N] [--rounds N] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from bench.latency import DelayedLink, LinkUnavailable
from bench.procs import (
    BenchError,
    Child,
    Outcome,
    Runner,
    Target,
    check_size,
    run_all,
    run_pool,
    sftp_quote,
    sha256_file,
    write_random_file,
)
from bench.tabledata import write_table_data
from devtools.delayproxy import DelayProxy, measure_rtt
from devtools.gpbackup import make_local_backup
from devtools.harness import PLUGIN_EXE
from devtools.sshd import SshServer, known_hosts_line

REPO = Path(__file__).resolve().parent.parent

MIB = 1024 * 1024
KIB = 1024

# Defaults (all overridable on the command line).
# The median of five: on the shared 2-core VM of RESULTS.md a single round swings
# by 15% or more from one minute to the next, and three rounds did not settle it.
DEFAULT_ROUNDS = 5
# 512 MiB keeps connection setup (a fraction of a second) under a few percent of a stream's time.
DEFAULT_SIZE_MIB = 512
# gpbackup runs one backup_data per segment at once; 8 is a typical segment count per host.
DEFAULT_STREAMS = 8
# A backup writes dozens of small metadata/TOC files through backup_file; 30 of them is one small backup.
DEFAULT_CALLS = 30
# Metadata and TOC files of a small backup are around a kilobyte.
DEFAULT_CALL_SIZE_KIB = 1
# The per-table storm: a database of ~60 tables on 16 segments; 16 calls at once is --jobs 4 with 4
# segments per host. Table files of 1-64 KiB keep it about per-call cost, not throughput.
DEFAULT_STORM_CALLS = 1000
DEFAULT_STORM_WIDTH = 16
STORM_MIN_KIB, STORM_MAX_KIB = 1, 64
STORM_SEED = 13
# The capped storm's max_connections: a quarter of the width, as an admin would cap a host whose calls at
# once could pass the backup host's MaxStartups (10 by default); the storm's backups then wait for sessions.
STORM_CAP = 4
# The at-rest subset row reads 1% of a stream this large (the 1 GiB).
DEFAULT_SUBSET_SIZE_MIB = 1024
# plugin_api_version takes tens of milliseconds; 20 runs give a stable median in about a second.
DEFAULT_VERSION_RUNS = 20
# 20 ms RTT is a link to another data centre in the same region.
DEFAULT_RTT_MS = 20.0
# A smaller stream over the slow link keeps that part to about a minute per direction even when slow.
DEFAULT_LATENCY_SIZE_MIB = 128
# How the delay is added: netem is exact and costs no CPU in user space, so it comes first; the proxy
# works anywhere (no root, no sch_netem) but uses CPU that the clients' transfers share.
LATENCY_METHODS = ("auto", "netem", "proxy")
# The delay proxy's measured RTT may miss the asked one by this fraction before the rows carry a warning:
# the proxy releases chunks up to ~1 ms late (about 5% at 20 ms); far more means a CPU too busy to keep time.
RTT_TOLERANCE = 0.25
# A per-table restore over the slow link: restore_data of a table file one call after another (a warm
# session), against a fresh sftp per file. 300 KiB: above the 128 KiB a restore reads at first, below the
# 1 MiB it reads whole (store.WHOLE_READ_LIMIT). Ten calls per round keep the part to about half a minute.
RESTORE_CALL_KIB = 300
# The same for a table file longer than what a restore reads whole: its block digests and its rest read
# after its first MiB (2 MiB + 10 KiB: one block and a bit past the first, as a table of ~50,000 rows).
RESTORE_LONG_CALL_KIB = 2 * 1024 + 10
RESTORE_CALLS_PER_ROUND = 10
# A per-table backup over the slow link: backup_data of such a table file (the restore row's size) one call
# after another, each stored in the same backup directory as gpbackup stores a segment's table files.
BACKUP_CALL_KIB = RESTORE_CALL_KIB
# The rows the high-latency part always yields, measured or skipped.
LATENCY_METRICS = ("high-latency up", "high-latency down", "high-latency backup_data", "high-latency backup_data long",
                   "high-latency restore_data", "high-latency restore_data long")
DEFAULT_JSON = REPO / "bench" / "results.json"
# tmpfs: the sshd's remote_dir and the source files live in RAM, so disk speed is not measured.
TMPFS = Path("/dev/shm")
# Room beyond the data itself for keys, logs, batch files and the small files.
SPACE_MARGIN = 64 * MIB

# A 1-minute load average above this before the start means something else is using the CPUs.
BUSY_LOAD = 0.5

# Targets (issue 4). Ratios are OpenSSH time / plugin time.
STREAM_RATIO_TARGET = 0.9  # one long stream: within 10% of OpenSSH's C client
PER_CALL_RATIO_TARGET = 1.0  # start-up + connect per call: no slower than a fresh sftp process
# Issue 13 (warm sessions): a call that finds a session costs a client start-up and the transfer itself.
PER_CALL_WARM_MS_TARGET = 20.0
PER_CALL_WARM_RATIO_TARGET = 8.0
STORM_RATIO_TARGET = 5.0  # a per-table backup's thousands of calls vs one sftp process per file
# Issue 14 (at rest): zstd should more than pay for itself on the wire; sealing costs a little on top.
AT_REST_ZSTD_RATIO_TARGET = 2.0
AT_REST_SEAL_COST_TARGET = 0.15
SUBSET_READ_TARGET = 0.03  # 1% of the stream asked: the chunks around it, not the file
SUBSET_TIME_TARGET = 0.05
# The at-rest uploads again over a 1 Gbit/s link (the delay proxy's bandwidth limit, 0.25 ms each way: one
# data centre): on loopback both clients are CPU-bound and a byte on the wire costs nothing, so compression
# has nothing to save there; between hosts the wire is what it saves.
LINK_RATE = 125_000_000  # bytes per second each way
LINK_ONE_WAY_DELAY = 0.00025
LINK_LABEL = f"{LINK_RATE * 8 / 1e9:g} Gbit/s link"
LINK_MODES = ("zstd", "zstd+AES-GCM")
AT_REST_METRICS = ["at-rest up plain", "at-rest up zstd", "at-rest up zstd+AES-GCM", "stored size zstd+AES-GCM",
                   "peak RSS zstd+AES-GCM", "subset read bytes", "subset read time",
                   *(f"at-rest up {mode} over link" for mode in LINK_MODES)]
CONCURRENCY_RATIO_TARGET = 0.9  # parallel segments: aggregate within 10% of OpenSSH
LATENCY_RATIO_TARGET = 0.9  # the pipelining must hide the RTT as well as OpenSSH's does
# A warm call pays round trips only, a fresh sftp a process, a login and its own round trips: the storm's
# 5x. The ten round trips such a file took before it was read whole (store.WHOLE_READ_LIMIT) gave 3.2x.
RESTORE_CALL_RATIO_TARGET = 5.0
BACKUP_CALL_RATIO_TARGET = 5.0  # the same, for the backup of such a file
VERSION_MS_TARGET = 50.0  # gpbackup calls plugin_api_version on every host before each backup
RSS_MIB_TARGET = 128.0  # one backup_data per segment at once: 8+ per host must fit easily in RAM

PLUGIN_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


@dataclass
class Row:
    """One line of the result table."""

    metric: str
    unit: str = ""
    plugin: float | None = None
    openssh: float | None = None
    ratio: float | None = None
    target: str = ""
    status: str = ""  # PASS, FAIL, SKIP or ERROR
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    key: str = ""  # the metric without sizes ("stream up"), stable across runs for comparisons
    method: str = ""  # high-latency rows: how the delay was made ("netem" or "userspace proxy, ...")


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def throughput_row(metric: str, size: int, plugin_secs: list[float], openssh_secs: list[float],
                   target: float) -> Row:
    """MiB/s from the median time of each side; ratio = OpenSSH time / plugin time."""
    p, o = median(plugin_secs), median(openssh_secs)
    ratio = o / p
    return Row(metric, "MiB/s", size / MIB / p, size / MIB / o, ratio, f"ratio >= {target:g}",
               "PASS" if ratio >= target else "FAIL",
               samples={"plugin_seconds": plugin_secs, "openssh_seconds": openssh_secs})


class Bench:
    """All measurements of one run against the loopback sshd (and the delayed link, if possible)."""

    def __init__(self, args: argparse.Namespace, server: SshServer, workdir: Path, runner: Runner) -> None:
        self.args = args
        self.server = server
        self.workdir = workdir
        self.runner = runner
        self.data = workdir / "data"
        self.data.mkdir()
        # The plugin maps .../backups/<date>/<timestamp>/<name> to the same tail under remote_dir.
        self.backup = make_local_backup(workdir / "local", time.strftime("%Y%m%d%H%M%S"))
        self.size = args.size_mib * MIB
        self.stream_size = args.stream_size_mib * MIB if args.stream_size_mib else self.size // args.streams
        self.stored: dict[str, Path] = {}  # per target: the verified stream restore_data reads back
        self.skipped: list[str] = []
        self.latency: dict[str, object] = {}  # how the high-latency rows were made, for the JSON
        self.loopback = self.make_target("loopback", "127.0.0.1", server.port, server.known_hosts)
        # Peak RSS is measured in-process: with the fork server the process we wait for is only the client.
        self.in_process = self.make_target("in-process", "127.0.0.1", server.port, server.known_hosts,
                                           fork_server="no")
        # A login per call, still through the fork server: the per-call cost without warm sessions.
        self.cold = self.make_target("cold", "127.0.0.1", server.port, server.known_hosts, session_idle=0)
        self.capped = self.make_target("capped", "127.0.0.1", server.port, server.known_hosts,
                                       max_connections=STORM_CAP)
        self.storm_openssh_up: float | None = None  # OpenSSH's puts of the storm, for the capped storm's ratio

    def make_target(self, label: str, host: str, port: int, known_hosts: Path, **options: object) -> Target:
        """Where to measure: the plugin's config for host:port (plugin-<label>.yaml) and OpenSSH's directory."""
        config = self.server.write_config(self.workdir / f"plugin-{label}.yaml", executable=str(self.args.plugin),
                                          hostname=host, port=port, known_hosts_file=str(known_hosts), **options)
        target = Target(label, host, port, str(self.server.options()["username"]), self.server.user_key,
                        known_hosts, config, self.server.remote_dir)
        self.openssh_dir(target).mkdir(parents=True, exist_ok=True)
        return target

    # -- paths -------------------------------------------------------------------------------------

    def key(self, name: str) -> Path:
        """The local path gpbackup would pass for a file called name."""
        return self.backup.file(name)

    def stored_path(self, target: Target, name: str) -> Path:
        """Where the plugin stores name: remote_dir/backups/<date>/<timestamp>/name."""
        return self.backup.remote(target.remote_dir, name)

    def proxy_known_hosts(self, label: str, port: int) -> Path:
        """A known_hosts file naming the sshd's key under a proxy's address: both clients check the host key
        as they would for any host."""
        path = self.workdir / f"{label}_known_hosts"
        path.write_text(known_hosts_line(self.server.server_dir, "127.0.0.1", port))
        return path

    @staticmethod
    def openssh_dir(target: Target) -> Path:
        return target.remote_dir / "openssh" / target.label

    # -- measurements ------------------------------------------------------------------------------

    def run(self) -> list[Row]:
        args = self.args
        stream = self.data / "stream.bin"
        progress(f"writing {args.size_mib} MiB of random data to {stream}")
        stream_sha = write_random_file(stream, self.size)
        up = self.guard("stream up", lambda: self.stream_up(self.loopback, stream, self.size, stream_sha, "up"))
        down = self.guard("stream down", lambda: self.stream_down(self.loopback, stream, self.size, stream_sha,
                                                                  "down"))
        rows = [up, down]
        rows.extend(self.guard_rows(["per-call warm", "per-call cold"], self.per_call))
        rows.extend(self.guard_rows(["storm backup_data", "storm restore_data", "storm logins"], self.storm))
        rows.extend(self.guard_rows(["storm capped backup_data", "storm capped logins"], self.capped_storm))
        rows.append(self.guard("concurrency", self.concurrency))
        rows.extend(self.high_latency())
        rows.append(self.guard("plugin_api_version", self.api_version))
        rows.append(self.guard("peak RSS", lambda: self.rss_row(stream, stream_sha)))
        # Last, as before peak RSS was taken through peak_rss.py (the bench's own peak no longer counts):
        # the subset read's proxy grows the bench.
        if not args.no_at_rest:
            rows.extend(self.guard_rows(AT_REST_METRICS, self.at_rest))
        for row in rows:
            row.key, row.metric = row.metric, self.label(row.metric)
        return rows

    def label(self, metric: str) -> str:
        """Table label with the sizes used, e.g. 'stream up (512 MiB)'."""
        args = self.args
        storm = f"{args.storm_calls} x {STORM_MIN_KIB}-{STORM_MAX_KIB} KiB, {args.storm_width} at once"
        sizes = {
            "stream up": f"{args.size_mib} MiB",
            "stream down": f"{args.size_mib} MiB",
            "per-call warm": f"median of {args.calls * args.rounds} x {args.call_size_kib} KiB backup_file",
            "per-call cold": f"median of {args.calls * args.rounds} x {args.call_size_kib} KiB backup_file",
            "storm backup_data": storm,
            "storm restore_data": storm,
            "storm logins": f"during the plugin's {2 * args.storm_calls} storm calls",
            "storm capped backup_data": f"{storm}, max_connections {STORM_CAP}",
            "storm capped logins": f"during the {args.storm_calls} capped calls and a setup through the fork server",
            "at-rest up plain": f"{args.size_mib} MiB of table rows",
            "at-rest up zstd": f"{args.size_mib} MiB of table rows",
            "at-rest up zstd+AES-GCM": f"{args.size_mib} MiB of table rows",
            "stored size zstd+AES-GCM": f"{args.size_mib} MiB of table rows",
            "at-rest up zstd over link": f"{args.size_mib} MiB of table rows, {LINK_LABEL}",
            "at-rest up zstd+AES-GCM over link": f"{args.size_mib} MiB of table rows, {LINK_LABEL}",
            "peak RSS zstd+AES-GCM": f"backup_data of {args.size_mib} MiB of table rows",
            "subset read bytes": f"1% of {args.subset_size_mib} MiB in 10 ranges",
            "subset read time": f"1% of {args.subset_size_mib} MiB in 10 ranges",
            "concurrency": f"{args.streams} x {self.stream_size / MIB:g} MiB",
            "high-latency up": f"{args.latency_size_mib} MiB, {args.latency_rtt_ms:g} ms RTT",
            "high-latency down": f"{args.latency_size_mib} MiB, {args.latency_rtt_ms:g} ms RTT",
            "high-latency backup_data": f"median of {RESTORE_CALLS_PER_ROUND * args.rounds} x {BACKUP_CALL_KIB} "
                                        f"KiB, {args.latency_rtt_ms:g} ms RTT",
            "high-latency backup_data long": f"median of {RESTORE_CALLS_PER_ROUND * args.rounds} x "
                                             f"{RESTORE_LONG_CALL_KIB} KiB, {args.latency_rtt_ms:g} ms RTT",
            "high-latency restore_data": f"median of {RESTORE_CALLS_PER_ROUND * args.rounds} x {RESTORE_CALL_KIB} "
                                         f"KiB, {args.latency_rtt_ms:g} ms RTT",
            "high-latency restore_data long": f"median of {RESTORE_CALLS_PER_ROUND * args.rounds} x "
                                              f"{RESTORE_LONG_CALL_KIB} KiB, {args.latency_rtt_ms:g} ms RTT",
            "plugin_api_version": f"median of {args.version_runs}",
            "peak RSS": f"backup_data of {args.size_mib} MiB",
        }
        return f"{metric} ({sizes[metric]})" if metric in sizes else metric

    def guard_rows(self, metrics: list[str], measure: Callable[[], list[Row]]) -> list[Row]:
        """`guard` for a measurement that yields several rows: each is ERROR when it fails."""
        try:
            return measure()
        except BenchError as err:
            progress(f"{', '.join(metrics)}: ERROR: {err}")
            return [Row(metric, status="ERROR", note=str(err)) for metric in metrics]

    def guard(self, metric: str, measure: Callable[[], Row]) -> Row:
        """Run one measurement; a failed or wrong transfer makes its row ERROR instead of a number."""
        try:
            return measure()
        except BenchError as err:
            progress(f"{metric}: ERROR: {err}")
            return Row(metric, status="ERROR", note=str(err))

    def store_stream(self, target: Target, source: Path, size: int, sha: str, name: str,  # noqa: PLR0913
                     peak_rss: bool = False) -> Outcome:
        """backup_data source under name, then check the stored copy's size and SHA-256 (`peak_rss`: untimed,
        with the peak RSS)."""
        outcome = self.runner.plugin_child(target, "backup_data", self.key(name), stdin_path=source,
                                           peak_rss=peak_rss).finish()
        outcome.check(f"plugin backup_data {name}")
        stored = self.stored_path(target, name)
        check_size(stored, size, f"plugin backup_data {name}")
        if sha256_file(stored) != sha:
            raise BenchError(f"plugin backup_data {name}: stored bytes differ from the input (SHA-256 mismatch)")
        previous = self.stored.get(target.label)
        if previous is not None and previous != stored:
            previous.unlink(missing_ok=True)
        self.stored[target.label] = stored
        return outcome

    def stream_up(self, target: Target, source: Path, size: int, sha: str, prefix: str) -> Row:
        plugin_secs: list[float] = []
        openssh_secs: list[float] = []
        metric = f"{'high-latency' if target is not self.loopback else 'stream'} up"
        for r in range(self.args.rounds):
            plugin = self.store_stream(target, source, size, sha, f"{prefix}_{r}")
            plugin_secs.append(plugin.seconds)
            dest = self.openssh_dir(target) / f"{prefix}_{r}"
            batch = self.runner.sftp_batch([f"put {sftp_quote(source)} {sftp_quote(dest)}"])
            openssh = self.runner.sftp_child(target, batch).finish().check("sftp put", allow_stderr=True)
            check_size(dest, size, "sftp put")
            dest.unlink()
            openssh_secs.append(openssh.seconds)
            progress(f"{metric} round {r + 1}/{self.args.rounds}: plugin {plugin.seconds:.2f} s, "
                     f"OpenSSH {openssh.seconds:.2f} s")
        target_ratio = STREAM_RATIO_TARGET if target is self.loopback else LATENCY_RATIO_TARGET
        return throughput_row(metric, size, plugin_secs, openssh_secs, target_ratio)

    def stream_down(self, target: Target, source: Path, size: int, sha: str, prefix: str) -> Row:
        metric = f"{'high-latency' if target is not self.loopback else 'stream'} down"
        if target.label not in self.stored:  # stream up failed: store a copy to read back (untimed)
            self.store_stream(target, source, size, sha, f"{prefix}_source")
        stored = self.stored[target.label]
        key = self.key(stored.name)
        # One untimed full read, hashed: proves restore_data returns the stream byte for byte.
        check = self.runner.plugin_child(target, "restore_data", key, hash_stdout=True).finish()
        check.check("plugin restore_data (verification)")
        if check.stdout_bytes != size or check.stdout_sha256 != sha:
            raise BenchError(f"plugin restore_data returned {check.stdout_bytes} bytes "
                             f"{'with' if check.stdout_sha256 == sha else 'whose SHA-256 differs from'} the stream "
                             f"({size} bytes expected)")
        plugin_secs: list[float] = []
        openssh_secs: list[float] = []
        get = self.runner.sftp_batch([f"get {sftp_quote(stored)} /dev/null"])
        for r in range(self.args.rounds):
            # To /dev/null, as sftp's get: exit 0 still proves the stream whole, since
            # restore_data checks what it wrote against the SHA-256 stored beside it.
            plugin = self.runner.plugin_child(target, "restore_data", key).finish()
            plugin.check(f"plugin restore_data round {r + 1}")
            plugin_secs.append(plugin.seconds)
            openssh = self.runner.sftp_child(target, get).finish().check("sftp get", allow_stderr=True)
            openssh_secs.append(openssh.seconds)
            progress(f"{metric} round {r + 1}/{self.args.rounds}: plugin {plugin.seconds:.2f} s, "
                     f"OpenSSH {openssh.seconds:.2f} s")
        target_ratio = STREAM_RATIO_TARGET if target is self.loopback else LATENCY_RATIO_TARGET
        return throughput_row(metric, size, plugin_secs, openssh_secs, target_ratio)

    def per_call(self) -> list[Row]:
        """Sequential ``backup_file`` calls of a small file, each timed: warm (a fork server worker holds a
        session, sftp_plugin/sessions.py), cold (``session_idle: 0``: a login per call) and OpenSSH's
        ``sftp`` putting the same files, one process each. Medians over all calls of all rounds."""
        args = self.args
        size = args.call_size_kib * KIB
        files = []
        for i in range(args.calls):
            path = self.key(f"gpbackup_-1_{self.backup.timestamp}_small_{i:03d}")
            path.write_bytes(os.urandom(size))
            files.append(path)
        openssh_dests = [self.openssh_dir(self.loopback) / path.name for path in files]
        batches = [self.runner.sftp_batch([f"put {sftp_quote(path)} {sftp_quote(dest)}"])
                   for path, dest in zip(files, openssh_dests)]
        seconds: dict[str, list[float]] = {"warm": [], "cold": [], "openssh": []}
        for r in range(args.rounds):
            for kind, target in (("warm", self.loopback), ("cold", self.cold)):
                # Untimed first call: the fork server (and, warm, a session) exists before the timed ones.
                self.runner.plugin_child(target, "backup_file", files[0]).finish().check("plugin backup_file")
                for path in files:
                    outcome = self.runner.plugin_child(target, "backup_file", path).finish()
                    seconds[kind].append(outcome.check(f"plugin backup_file {path.name}").seconds)
                for path in files:
                    if not path.exists():
                        raise BenchError(f"plugin backup_file removed the local file {path}; it must stay")
                    stored = self.stored_path(target, path.name)
                    check_size(stored, size, "plugin backup_file")
                    stored.unlink()
            for batch in batches:
                seconds["openssh"].append(
                    self.runner.sftp_child(self.loopback, batch).finish().check("sftp put", allow_stderr=True).seconds)
            for dest in openssh_dests:
                check_size(dest, size, "sftp put")
                dest.unlink()
            medians = {kind: f"{median(values) * 1000:.1f} ms" for kind, values in seconds.items()}
            progress(f"per-call round {r + 1}/{args.rounds}: median warm {medians['warm']}, cold {medians['cold']}, "
                     f"OpenSSH {medians['openssh']}")
        o = median(seconds["openssh"]) * 1000
        samples = {f"{kind}_seconds": values for kind, values in seconds.items()}
        warm, cold = median(seconds["warm"]) * 1000, median(seconds["cold"]) * 1000
        warm_ok = warm <= PER_CALL_WARM_MS_TARGET and o / warm >= PER_CALL_WARM_RATIO_TARGET
        return [
            Row("per-call warm", "ms", warm, o, o / warm,
                f"<= {PER_CALL_WARM_MS_TARGET:g} ms, ratio >= {PER_CALL_WARM_RATIO_TARGET:g}",
                "PASS" if warm_ok else "FAIL", note=f"min {min(seconds['warm']) * 1000:.1f} ms", samples=samples),
            Row("per-call cold", "ms", cold, o, o / cold, f"ratio >= {PER_CALL_RATIO_TARGET:g}",
                "PASS" if o / cold >= PER_CALL_RATIO_TARGET else "FAIL", samples=samples),
        ]

    def storm(self) -> list[Row]:
        """A per-table backup and restore as gpbackup runs them without --single-data-file: many small
        ``backup_data`` calls, a fixed number at once, then their ``restore_data``; beside OpenSSH's ``sftp``
        doing the same puts and gets, one process per file. Also counts the logins the backup host saw."""
        args = self.args
        files = self.storm_files("storm", "")
        total = sum(path.stat().st_size for path in files)
        dests = [self.openssh_dir(self.loopback) / path.name for path in files]
        width = args.storm_width
        logins_before = self.logins()
        up, up_outcomes = run_pool(lambda path: self.runner.plugin_child(
            self.loopback, "backup_data", self.key(path.name), stdin_path=path), files, width)
        for path, outcome in zip(files, up_outcomes):
            outcome.check(f"plugin backup_data {path.name}")
            check_size(self.stored_path(self.loopback, path.name), path.stat().st_size, "plugin backup_data")
        # To /dev/null: exit 0 means each stream matched the SHA-256 stored beside it.
        down, down_outcomes = run_pool(lambda path: self.runner.plugin_child(
            self.loopback, "restore_data", self.key(path.name)), files, width)
        for path, outcome in zip(files, down_outcomes):
            outcome.check(f"plugin restore_data {path.name}")
        logins = self.logins() - logins_before
        progress(f"storm: plugin up {up:.1f} s, down {down:.1f} s, {logins} logins")
        puts = [self.runner.sftp_batch([f"put {sftp_quote(path)} {sftp_quote(dest)}"])
                for path, dest in zip(files, dests)]
        gets = [self.runner.sftp_batch([f"get {sftp_quote(dest)} /dev/null"]) for dest in dests]
        openssh_up, outcomes = run_pool(lambda batch: self.runner.sftp_child(self.loopback, batch), puts, width)
        for outcome in outcomes:
            outcome.check("sftp put", allow_stderr=True)
        for path, dest in zip(files, dests):
            check_size(dest, path.stat().st_size, "sftp put")
        openssh_down, outcomes = run_pool(lambda batch: self.runner.sftp_child(self.loopback, batch), gets, width)
        for outcome in outcomes:
            outcome.check("sftp get", allow_stderr=True)
        progress(f"storm: OpenSSH up {openssh_up:.1f} s, down {openssh_down:.1f} s")
        self.storm_openssh_up = openssh_up
        for path, dest in zip(files, dests):
            self.stored_path(self.loopback, path.name).unlink()
            dest.unlink()
        note = f"{len(files)} files, {total / MIB:.0f} MiB, {width} at a time"
        return [
            Row("storm backup_data", "s", up, openssh_up, openssh_up / up, f"ratio >= {STORM_RATIO_TARGET:g}",
                "PASS" if openssh_up / up >= STORM_RATIO_TARGET else "FAIL", note=note),
            Row("storm restore_data", "s", down, openssh_down, openssh_down / down, f"ratio >= {STORM_RATIO_TARGET:g}",
                "PASS" if openssh_down / down >= STORM_RATIO_TARGET else "FAIL", note=note),
            Row("storm logins", "logins", logins, 2 * len(files), None, f"plugin <= {width}",
                "PASS" if logins <= width else "FAIL",
                note="SSH logins the backup host logged (OpenSSH: one per file)"),
        ]

    def storm_files(self, directory_name: str, tag: str) -> list[Path]:
        """The storm's table files, written under data/<directory_name>: the same sizes every run (STORM_SEED),
        named as gpbackup names them, with `tag` before the number."""
        rng = random.Random(STORM_SEED)
        directory = self.data / directory_name
        directory.mkdir(exist_ok=True)
        files: list[Path] = []
        for i in range(self.args.storm_calls):
            path = directory / f"gpbackup_0_{self.backup.timestamp}_{tag}{i + 1:05d}"
            path.write_bytes(os.urandom(rng.randint(STORM_MIN_KIB, STORM_MAX_KIB) * KIB))
            files.append(path)
        return files

    def capped_storm(self) -> list[Row]:
        """The storm's backups again with max_connections: the calls beyond the cap wait for a busy session
        instead of logging in. One call first, as gpbackup's setup, from whose end the fork server learns the
        cap."""
        args = self.args
        files = self.storm_files("storm_capped", "capped_")
        # The fork server may have idled out while OpenSSH ran. A call then starts one, and the calls that
        # come before it serves run in their own processes, which the cap does not count (README). Measured
        # as on a host whose server runs when the backup starts: it is started and waited for first.
        self.runner.plugin_child(self.capped, "backup_data", self.key("capped_start"),
                                 stdin_path=files[0]).finish().check("plugin backup_data capped_start")
        self.wait_for_fork_server()
        logins_before = self.logins()
        self.runner.plugin_child(self.capped, "backup_data", self.key("capped_setup"),
                                 stdin_path=files[0]).finish().check("plugin backup_data capped_setup")
        up, outcomes = run_pool(lambda path: self.runner.plugin_child(
            self.capped, "backup_data", self.key(path.name), stdin_path=path), files, args.storm_width)
        for path, outcome in zip(files, outcomes):
            outcome.check(f"plugin backup_data {path.name}")
            check_size(self.stored_path(self.capped, path.name), path.stat().st_size, "plugin backup_data")
        logins = self.logins() - logins_before
        progress(f"capped storm: plugin up {up:.1f} s, {logins} logins")
        for name in [*(path.name for path in files), "capped_start", "capped_setup"]:
            self.stored_path(self.capped, name).unlink()
        openssh = self.storm_openssh_up
        note = f"{len(files)} files, {args.storm_width} at a time, at most {STORM_CAP} sessions"
        return [
            Row("storm capped backup_data", "s", up, openssh, openssh / up if openssh else None,
                f"ratio >= {STORM_RATIO_TARGET:g}",
                "PASS" if openssh and openssh / up >= STORM_RATIO_TARGET else "FAIL", note=note),
            Row("storm capped logins", "logins", logins, None, None, f"plugin <= {STORM_CAP}",
                "PASS" if logins <= STORM_CAP else "FAIL", note="SSH logins the backup host logged"),
        ]

    def wait_for_fork_server(self, timeout: float = 30.0) -> None:
        """Until the plugin's fork server listens (a socket in its runtime directory under the bench's TMPDIR)."""
        deadline = time.monotonic() + timeout
        while not list((self.workdir / "tmp").glob("gpbackup_sftp_plugin-*/*.sock")):
            if time.monotonic() > deadline:
                raise BenchError(f"no fork server came up within {timeout:g} s")
            time.sleep(0.05)

    def at_rest(self) -> list[Row]:
        """Issue 14: backup_data of table-like data stored plain, as a zstd container and as a zstd + AES-256-GCM
        container, beside ``sftp put`` of the same bytes; stored size beside gzip -1; a 1% subset read."""
        args = self.args
        size = args.size_mib * MIB
        data = self.data / "table.tsv"
        progress(f"writing {args.size_mib} MiB of table-like rows to {data}")
        write_table_data(data, size)
        data_sha = sha256_file(data)
        key = self.workdir / "at-rest.key"
        subprocess.run([str(args.plugin), "keygen", str(key)], env=self.runner.env, check=True, capture_output=True)
        modes = {
            "plain": self.loopback,
            "zstd": self.make_target("zstd", "127.0.0.1", self.server.port, self.server.known_hosts,
                                     compression="zstd"),
            "zstd+AES-GCM": self.make_target("sealed", "127.0.0.1", self.server.port, self.server.known_hosts,
                                             compression="zstd", encryption_key_file=str(key)),
        }
        seconds, stored = self.time_uploads(modes, self.loopback, data, data_sha, "at rest")
        gzip_size = gzip_size_of(data)
        # Peak RSS of a sealing backup_data in its own process (the fork server's worker is not the process
        # the bench waits for): chunks compressed and sealed on two threads while the upload runs.
        in_process = self.make_target("sealed-in-process", "127.0.0.1", self.server.port, self.server.known_hosts,
                                      compression="zstd", encryption_key_file=str(key), fork_server="no")
        name = f"gpbackup_0_{self.backup.timestamp}_table_rss"
        rss_kib = self.runner.plugin_child(in_process, "backup_data", self.key(name), stdin_path=data,
                                           peak_rss=True).finish().check(
            "plugin backup_data (zstd+AES-GCM, in-process)").maxrss_kib
        assert rss_kib is not None
        self.stored_path(in_process, name).unlink()
        o = seconds["openssh"]
        rows = [throughput_row(f"at-rest up {mode}", size, seconds[mode], o, target) for mode, target in
                (("plain", STREAM_RATIO_TARGET), ("zstd", AT_REST_ZSTD_RATIO_TARGET),
                 ("zstd+AES-GCM", AT_REST_ZSTD_RATIO_TARGET))]
        cost = median(seconds["zstd+AES-GCM"]) / median(seconds["zstd"]) - 1
        rows[2].target += f", cost <= {AT_REST_SEAL_COST_TARGET:.0%}"
        rows[2].note = f"encryption cost over zstd alone: {cost:+.1%} (median times)"
        if cost > AT_REST_SEAL_COST_TARGET:
            rows[2].status = "FAIL"
        rows.append(Row("stored size zstd+AES-GCM", "MiB", stored["zstd+AES-GCM"] / MIB, gzip_size / MIB,
                        gzip_size / stored["zstd+AES-GCM"], "<= gzip -1 (ratio >= 1)",
                        "PASS" if stored["zstd+AES-GCM"] <= gzip_size else "FAIL",
                        note=f"OpenSSH column: gzip -1 of the same data; zstd alone {stored['zstd'] / MIB:.1f} MiB; "
                             f"{size / stored['zstd+AES-GCM']:.2f}x smaller than the input"))
        rows.append(Row("peak RSS zstd+AES-GCM", "MiB", rss_kib / KIB, None, None, f"plugin <= {RSS_MIB_TARGET:g} MiB",
                        "PASS" if rss_kib / KIB <= RSS_MIB_TARGET else "FAIL",
                        note="backup_data in-process (fork_server: no)"))
        rows.extend(self.subset_read(modes["zstd+AES-GCM"], key))
        rows.extend(self.at_rest_over_link(data, data_sha, key))
        return rows

    def time_uploads(self, modes: dict[str, Target], openssh: Target, data: Path, data_sha: str,
                     what: str) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Each round: backup_data of `data` in every mode, then ``sftp put`` of it through `openssh`'s way;
        their times, and each mode's stored size. Each mode's first copy must restore to exactly `data`."""
        args = self.args
        size = data.stat().st_size
        seconds: dict[str, list[float]] = {mode: [] for mode in [*modes, "openssh"]}
        dest = self.openssh_dir(openssh) / data.name
        put = self.runner.sftp_batch([f"put {sftp_quote(data)} {sftp_quote(dest)}"])
        stored: dict[str, int] = {}
        for r in range(args.rounds):
            for mode, target in modes.items():
                name = f"gpbackup_0_{self.backup.timestamp}_table_{target.label}_{mode.replace('+', '_')}"
                outcome = self.runner.plugin_child(target, "backup_data", self.key(name), stdin_path=data).finish()
                seconds[mode].append(outcome.check(f"plugin backup_data ({mode})").seconds)
                path = self.stored_path(target, name)
                stored[mode] = path.stat().st_size
                if r == 0:  # once per mode, untimed: the stored file restores to exactly the input
                    back = self.runner.plugin_child(target, "restore_data", self.key(name), hash_stdout=True).finish()
                    back.check(f"plugin restore_data ({mode})")
                    if back.stdout_sha256 != data_sha:
                        raise BenchError(f"plugin restore_data ({mode}) did not give back the bytes stored")
                path.unlink()
            seconds["openssh"].append(self.runner.sftp_child(openssh, put).finish()
                                      .check("sftp put", allow_stderr=True).seconds)
            check_size(dest, size, "sftp put")
            dest.unlink()
            progress(f"{what} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{mode} {values[-1]:.2f} s" for mode, values in seconds.items()))
        return seconds, stored

    def at_rest_over_link(self, data: Path, data_sha: str, key: Path) -> list[Row]:
        """The zstd and zstd + AES-GCM uploads and ``sftp put`` through the delay proxy as a LINK_LABEL."""
        size = data.stat().st_size
        with DelayProxy(LINK_ONE_WAY_DELAY, rate=LINK_RATE) as proxy:
            port = proxy.forward(("127.0.0.1", self.server.port))
            known_hosts = self.proxy_known_hosts(label="link", port=port)
            link = self.make_target("link", "127.0.0.1", port, known_hosts)
            options: dict[str, dict[str, object]] = {
                "zstd": {"compression": "zstd"},
                "zstd+AES-GCM": {"compression": "zstd", "encryption_key_file": str(key)},
            }
            modes = {mode: self.make_target(f"link-{mode.replace('+', '-')}", "127.0.0.1", port, known_hosts,
                                            **options[mode]) for mode in LINK_MODES}
            cpu_before = proxy.cpu_seconds()
            try:
                seconds, _ = self.time_uploads(modes, link, data, data_sha, f"at rest over a {LINK_LABEL}")
            finally:
                self.runner.kill_all()  # children first: a transfer in flight through a closed proxy would hang
            cpu = proxy.cpu_seconds() - cpu_before
        o = seconds["openssh"]
        note = (f"the delay proxy as a {LINK_LABEL} ({LINK_RATE / MIB:.0f} MiB/s each way, shared; "
                f"{LINK_ONE_WAY_DELAY * 1000:g} ms each way); sftp put moved {size / MIB / median(o):.0f} MiB/s of "
                f"it; the proxy, a thread of the bench, used {cpu:.1f} s CPU beside both clients")
        rows = []
        for mode in LINK_MODES:
            row = throughput_row(f"at-rest up {mode} over link", size, seconds[mode], o,
                                 AT_REST_ZSTD_RATIO_TARGET)
            row.note = note
            rows.append(row)
        return rows

    def subset_read(self, sealed: Target, key: Path) -> list[Row]:
        """restore_data_subset of 1% of a large zstd + AES-GCM container in 10 ranges vs its whole restore_data,
        through a zero-delay proxy that counts the bytes the backup host sent."""
        args = self.args
        size = args.subset_size_mib * MIB
        data = self.data / "subset.tsv"
        write_table_data(data, size)
        name = f"gpbackup_0_{self.backup.timestamp}_subset"
        self.runner.plugin_child(sealed, "backup_data", self.key(name), stdin_path=data).finish().check(
            "plugin backup_data (subset source)")
        stored_size = self.stored_path(sealed, name).stat().st_size
        # Ten ranges of 0.1% each, spread over the stream, as gprestore asks for the tables it restores.
        span = size // 1000
        ranges = [(k * size // 10 + size // 40, k * size // 10 + size // 40 + span) for k in range(10)]
        offsets = self.data / "subset.offsets"
        offsets.write_text(f"{len(ranges)} " + " ".join(f"{a} {b}" for a, b in ranges) + "\n")
        # Timed on a direct connection: the counting proxy in the path is itself worth tens of milliseconds
        # in some rounds (sshd does not turn Nagle's algorithm off for sftp, and the proxy's own socket
        # acknowledges late), which is the proxy's doing, not the plugin's.
        direct = self.make_target("subset-direct", "127.0.0.1", self.server.port, self.server.known_hosts,
                                  compression="zstd", encryption_key_file=str(key), restore_subset="on")
        with DelayProxy(0) as proxy:
            port = proxy.forward(("127.0.0.1", self.server.port))
            known_hosts = self.proxy_known_hosts(label="counted", port=port)
            counted = self.make_target("counted", "127.0.0.1", port, known_hosts, compression="zstd",
                                       encryption_key_file=str(key), restore_subset="on")

            def subset(target: Target) -> Outcome:
                outcome = self.runner.plugin_child(target, "restore_data_subset", self.key(name), offsets,
                                                   hash_stdout=True).finish()
                outcome.check("plugin restore_data_subset")
                if outcome.stdout_bytes != span * len(ranges):
                    raise BenchError(f"restore_data_subset wrote {outcome.stdout_bytes} bytes, not {span * 10}")
                return outcome

            # One untimed call each first: its session is kept, so the measured calls move data, not handshakes.
            subset(counted)
            subset(direct)
            subset_secs: list[float] = []
            whole_secs: list[float] = []
            subset_bytes: list[int] = []
            for r in range(args.rounds):
                before = proxy.bytes_down()
                subset(counted)
                subset_bytes.append(proxy.bytes_down() - before)
                subset_secs.append(subset(direct).seconds)
                whole_secs.append(self.runner.plugin_child(direct, "restore_data", self.key(name)).finish()
                                  .check("plugin restore_data (whole)").seconds)
                progress(f"subset round {r + 1}/{args.rounds}: {subset_secs[-1]:.2f} s, {subset_bytes[-1]} bytes "
                         f"read; whole {whole_secs[-1]:.2f} s")
        self.stored_path(sealed, name).unlink()
        read_share = median([float(b) for b in subset_bytes]) / stored_size
        time_share = median(subset_secs) / median(whole_secs)
        note = (f"10 ranges of {span / MIB:.2f} MiB of a {args.subset_size_mib} MiB stream stored in "
                f"{stored_size / MIB:.0f} MiB; bytes the backup host sent, counted by a zero-delay proxy")
        return [
            Row("subset read bytes", "%", read_share * 100, None, None, f"<= {SUBSET_READ_TARGET:.0%} of stored",
                "PASS" if read_share <= SUBSET_READ_TARGET else "FAIL", note=note),
            Row("subset read time", "%", time_share * 100, None, None, f"<= {SUBSET_TIME_TARGET:.0%} of whole",
                "PASS" if time_share <= SUBSET_TIME_TARGET else "FAIL",
                note=f"subset {median(subset_secs) * 1000:.0f} ms, whole restore_data {median(whole_secs):.2f} s "
                     f"(both on a direct connection)",
                samples={"subset_seconds": subset_secs, "whole_seconds": whole_secs}),
        ]

    def logins(self) -> int:
        """The logins the loopback sshd has logged so far (LogLevel INFO: one "Accepted" line each)."""
        return self.server.log_text().count("Accepted publickey")

    def concurrency(self) -> Row:
        args, target = self.args, self.loopback
        chunk = self.data / "chunk.bin"
        chunk_sha = write_random_file(chunk, self.stream_size)
        plugin_secs: list[float] = []
        openssh_secs: list[float] = []
        for r in range(args.rounds):
            names = [f"conc_{r}_{k}" for k in range(args.streams)]
            children = self.start_all(lambda name: self.runner.plugin_child(
                target, "backup_data", self.key(name), stdin_path=chunk), names)
            wall, outcomes = run_all(children)
            for name, outcome in zip(names, outcomes):
                outcome.check(f"plugin backup_data {name}")
                stored = self.stored_path(target, name)
                check_size(stored, self.stream_size, f"plugin backup_data {name}")
                if name == names[0] and sha256_file(stored) != chunk_sha:
                    raise BenchError(f"plugin backup_data {name}: stored bytes differ from the input")
                stored.unlink()
            plugin_secs.append(wall)
            dests = [self.openssh_dir(target) / name for name in names]
            batches = [self.runner.sftp_batch([f"put {sftp_quote(chunk)} {sftp_quote(dest)}"]) for dest in dests]
            children = self.start_all(lambda batch: self.runner.sftp_child(target, batch), batches)
            wall, outcomes = run_all(children)
            for outcome in outcomes:
                outcome.check("sftp put", allow_stderr=True)
            for dest in dests:
                check_size(dest, self.stream_size, "sftp put")
                dest.unlink()
            openssh_secs.append(wall)
            progress(f"concurrency round {r + 1}/{args.rounds}: plugin {plugin_secs[-1]:.2f} s, "
                     f"OpenSSH {openssh_secs[-1]:.2f} s for {args.streams} streams")
        return throughput_row("concurrency", self.stream_size * args.streams, plugin_secs, openssh_secs,
                              CONCURRENCY_RATIO_TARGET)

    @staticmethod
    def start_all(start: Callable[[Any], Child], items: list[Any]) -> list[Child]:
        """Start one child per item at once; if one cannot start, stop the others."""
        children: list[Child] = []
        try:
            for item in items:
                children.append(start(item))
        except BaseException:
            for child in children:
                child.kill()
            raise
        return children

    def high_latency(self) -> list[Row]:
        """Stream up/down over a delayed link: netem where it can be set up (and is allowed), else the proxy."""
        args = self.args
        if args.no_latency:
            return [Row(metric, status="SKIP", note="disabled by --no-latency") for metric in LATENCY_METRICS]
        if args.latency_method == "proxy":
            return self.proxied_latency("not tried (--latency-method proxy)")
        half = args.latency_rtt_ms / 2
        if half:
            method, how = "netem", f"netem on a veth pair into a network namespace, {half:g} ms each way"
        else:
            method, how = "veth pair, no delay", "a veth pair into a network namespace, without netem"
        try:
            with DelayedLink(self.server, self.workdir, args.latency_rtt_ms) as link:
                progress(f"delayed link up: sshd at {link.host}:{link.port} in namespace {link.namespace}, "
                         f"{args.latency_rtt_ms:g} ms RTT")
                self.latency = {"method": method, "one_way_delay_ms": half}
                try:
                    rows = self.measure_delayed("latency", link.host, link.port, link.known_hosts)
                finally:
                    # Children first: once the link is gone, a transfer in flight would hang, not fail.
                    self.runner.kill_all()
        except LinkUnavailable as err:
            if args.latency_method == "netem":
                return self.skip_latency(str(err))
            progress(f"no netem link ({err}); using the userspace delay proxy instead")
            return self.proxied_latency(str(err))
        return annotate(rows, method, how)

    def proxied_latency(self, netem_reason: str) -> list[Row]:
        """Both clients reach the loopback sshd through one DelayProxy that adds half the RTT each way."""
        args = self.args
        half = args.latency_rtt_ms / 2
        method = f"userspace proxy, {half:g} ms each way"
        with contextlib.ExitStack() as stack:
            try:
                proxy = stack.enter_context(DelayProxy(half / 1000))
                port = proxy.forward(("127.0.0.1", self.server.port))
                rtt = measure_rtt(proxy)
            except (OSError, RuntimeError) as err:
                return self.skip_latency(f"no netem link ({netem_reason}), and the delay proxy failed: {err}")
            stack.callback(self.runner.kill_all)  # runs first: children end before their proxy connections do
            progress(f"delay proxy up: 127.0.0.1:{port} -> sshd at 127.0.0.1:{self.server.port}, "
                     f"measured RTT {rtt.proxy_ms:.1f} ms ({rtt.direct_ms:.2f} ms without it)")
            known_hosts = self.proxy_known_hosts(label="proxy", port=port)
            cpu_before = proxy.cpu_seconds()
            rows = self.measure_delayed("proxy", "127.0.0.1", port, known_hosts)
            cpu = proxy.cpu_seconds() - cpu_before
            errors = list(proxy.errors)
        asked = args.latency_rtt_ms
        rtt_note = (f"measured RTT through it {rtt.proxy_ms:.1f} ms (median of {len(rtt.through_proxy)} one-byte "
                    f"exchanges; {rtt.direct_ms:.2f} ms without it)")
        if asked and abs(rtt.proxy_ms - asked) > RTT_TOLERANCE * asked:
            rtt_note += f", NOT the {asked:g} ms asked: the machine may be too busy to keep time"
            progress(f"warning: the delay proxy's measured RTT is {rtt.proxy_ms:.1f} ms, not {asked:g} ms")
        self.latency = {
            "method": method,
            "one_way_delay_ms": half,
            "netem_unavailable": netem_reason,
            "measured_rtt_ms": round(rtt.proxy_ms, 3),
            "direct_rtt_ms": round(rtt.direct_ms, 4),
            "rtt_samples_ms": [round(sample * 1000, 3) for sample in rtt.through_proxy],
            "proxy_cpu_seconds": round(cpu, 3),
            "proxy_errors": errors,
        }
        return annotate(rows, method, f"{method} (netem: {netem_reason}); {rtt_note}; the proxy, a thread of "
                                      f"the bench, used {cpu:.2f} s CPU in this part: on this "
                                      f"{os.cpu_count()}-core machine that CPU is shared by both sides' transfers")

    def skip_latency(self, reason: str) -> list[Row]:
        message = f"high-latency part skipped: {reason}"
        progress(message)
        self.skipped.append(message)
        return [Row(metric, status="SKIP", note=reason) for metric in LATENCY_METRICS]

    def measure_delayed(self, label: str, host: str, port: int, known_hosts: Path) -> list[Row]:
        """Stream up and down through host:port, behind which a delayed link leads to the sshd."""
        args = self.args
        target = self.make_target(label, host, port, known_hosts)
        size = args.latency_size_mib * MIB
        source = self.data / "latency.bin"
        sha = write_random_file(source, size)
        up = self.guard("high-latency up", lambda: self.stream_up(target, source, size, sha, "lat_up"))
        down = self.guard("high-latency down", lambda: self.stream_down(target, source, size, sha, "lat_down"))
        backups = self.guard("high-latency backup_data", lambda: self.backup_calls(target))
        long_backups = self.guard("high-latency backup_data long",
                                  lambda: self.backup_calls(target, "high-latency backup_data long",
                                                            RESTORE_LONG_CALL_KIB))
        calls = self.guard("high-latency restore_data", lambda: self.restore_calls(target))
        long_calls = self.guard("high-latency restore_data long",
                                lambda: self.restore_calls(target, "high-latency restore_data long",
                                                           RESTORE_LONG_CALL_KIB))
        return [up, down, backups, long_backups, calls, long_calls]

    def backup_calls(self, target: Target, metric: str = "high-latency backup_data", kib: int = BACKUP_CALL_KIB
                     ) -> Row:
        """A per-table backup over the slow link: ``backup_data`` of one table file of ``kib`` KiB to a new
        name in one backup directory, call after call (the first, untimed, leaves a warm session), each
        stored copy checked; OpenSSH's ``sftp`` puts the same file, one process each. A file longer than a
        block (the long row) is stored with its block digests."""
        size = kib * KIB
        source = self.data / f"table_up_{kib}.bin"
        sha = write_random_file(source, size)
        put = self.runner.sftp_batch([f"put {sftp_quote(source)} {sftp_quote(self.openssh_dir(target) / 'lat_put')}"])
        self.store_stream(target, source, size, sha, f"lat_backup_{kib}_first")
        calls = itertools.count()

        def plugin_call() -> float:
            return self.store_stream(target, source, size, sha, f"lat_backup_{kib}_{next(calls)}").seconds

        def openssh_call() -> float:
            seconds = self.runner.sftp_child(target, put).finish().check("sftp put", allow_stderr=True).seconds
            check_size(self.openssh_dir(target) / "lat_put", size, "sftp put")
            return seconds

        row = self.call_rounds(metric, plugin_call, openssh_call, BACKUP_CALL_RATIO_TARGET)
        (self.openssh_dir(target) / "lat_put").unlink()
        return row

    def call_rounds(self, metric: str, plugin_call: Callable[[], float], openssh_call: Callable[[], float],
                    ratio_target: float) -> Row:
        """RESTORE_CALLS_PER_ROUND timed calls of the plugin, then as many of OpenSSH, per round (each call
        checks its own result and gives its seconds); the row of their medians in ms, against ``ratio_target``."""
        seconds: dict[str, list[float]] = {"plugin": [], "openssh": []}
        for r in range(self.args.rounds):
            seconds["plugin"] += [plugin_call() for _ in range(RESTORE_CALLS_PER_ROUND)]
            seconds["openssh"] += [openssh_call() for _ in range(RESTORE_CALLS_PER_ROUND)]
            progress(f"{metric} round {r + 1}/{self.args.rounds}: median plugin "
                     f"{median(seconds['plugin']) * 1000:.1f} ms, OpenSSH {median(seconds['openssh']) * 1000:.1f} ms")
        p, o = median(seconds["plugin"]) * 1000, median(seconds["openssh"]) * 1000
        return Row(metric, "ms", p, o, o / p, f"ratio >= {ratio_target:g}", "PASS" if o / p >= ratio_target else "FAIL",
                   samples={f"{kind}_seconds": values for kind, values in seconds.items()})

    def restore_calls(self, target: Target, metric: str = "high-latency restore_data",
                      kib: int = RESTORE_CALL_KIB) -> Row:
        """A per-table restore over the slow link: ``restore_data`` of one table file of ``kib`` KiB, call after
        call (the first, untimed, leaves a warm session), each checked byte for byte; OpenSSH's ``sftp`` gets
        the same stored file, one process each."""
        size = kib * KIB
        source = self.data / f"table_{kib}.bin"
        sha = write_random_file(source, size)
        name = f"lat_table_{kib}"
        self.runner.plugin_child(target, "backup_data", self.key(name), stdin_path=source).finish().check(
            "plugin backup_data (table file)")
        stored = self.stored_path(target, name)
        check_size(stored, size, "plugin backup_data (table file)")
        get = self.runner.sftp_batch([f"get {sftp_quote(stored)} /dev/null"])
        self.runner.plugin_child(target, "restore_data", self.key(name)).finish().check("plugin restore_data")

        def plugin_call() -> float:
            plugin = self.runner.plugin_child(target, "restore_data", self.key(name), hash_stdout=True).finish()
            plugin.check("plugin restore_data")
            if plugin.stdout_sha256 != sha:
                raise BenchError(f"plugin restore_data returned {plugin.stdout_bytes} bytes unlike those stored")
            return plugin.seconds

        def openssh_call() -> float:
            return self.runner.sftp_child(target, get).finish().check("sftp get", allow_stderr=True).seconds

        return self.call_rounds(metric, plugin_call, openssh_call, RESTORE_CALL_RATIO_TARGET)

    def api_version(self) -> Row:
        seconds: list[float] = []
        for _ in range(self.args.version_runs):
            started = time.perf_counter()
            result = self.runner.plugin.run("plugin_api_version", text=True)
            seconds.append(time.perf_counter() - started)
            if result.returncode != 0 or result.stderr or not PLUGIN_VERSION_RE.match(result.stdout.strip()):
                raise BenchError(f"plugin_api_version: exit {result.returncode}, stdout {result.stdout!r}, "
                                 f"stderr {result.stderr!r}")
        ms = median(seconds) * 1000
        progress(f"plugin_api_version: median {ms:.1f} ms over {len(seconds)} runs")
        return Row("plugin_api_version", "ms", ms, None, None, f"plugin <= {VERSION_MS_TARGET:g} ms",
                   "PASS" if ms <= VERSION_MS_TARGET else "FAIL", samples={"plugin_seconds": seconds})

    def rss_row(self, stream: Path, sha: str) -> Row:
        """Peak RSS of one backup_data of the whole stream, run in-process (fork_server: no)."""
        plugin_kib = self.store_stream(self.in_process, stream, self.size, sha, "rss", peak_rss=True).maxrss_kib
        dest = self.openssh_dir(self.loopback) / "rss"
        batch = self.runner.sftp_batch([f"put {sftp_quote(stream)} {sftp_quote(dest)}"])
        openssh_kib = self.runner.sftp_child(self.loopback, batch, peak_rss=True).finish().check(
            "sftp put", allow_stderr=True).maxrss_kib
        dest.unlink()
        assert plugin_kib is not None and openssh_kib is not None
        plugin, openssh = plugin_kib / KIB, openssh_kib / KIB
        progress(f"peak RSS: plugin {plugin:.1f} MiB in-process, OpenSSH {openssh:.1f} MiB")
        return Row("peak RSS", "MiB", plugin, openssh, None, f"plugin <= {RSS_MIB_TARGET:g} MiB",
                   "PASS" if plugin <= RSS_MIB_TARGET else "FAIL",
                   note="plugin in-process (fork_server: no); OpenSSH: the sftp process and its ssh child",
                   samples={"plugin_maxrss_kib": [plugin_kib], "openssh_maxrss_kib": [openssh_kib]})


def gzip_size_of(path: Path) -> int:
    """The size of ``gzip -1`` of a file (what gpbackup stores by default), counted as it streams by."""
    with subprocess.Popen(["gzip", "-1", "-c", str(path)], stdout=subprocess.PIPE) as gzip:
        assert gzip.stdout is not None
        size = 0
        while chunk := gzip.stdout.read(MIB):
            size += len(chunk)
    if gzip.returncode != 0:
        raise BenchError(f"gzip -1 of {path} exited {gzip.returncode}")
    return size


def annotate(rows: list[Row], method: str, how: str) -> list[Row]:
    """Record on high-latency rows how their delay was made: method in the JSON, how in the notes."""
    for row in rows:
        row.method = method
        row.note = f"{row.note}; via {how}" if row.note else f"via {how}"
    return rows


# -- output ----------------------------------------------------------------------------------------

def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "logins":  # a count
        return f"{value:.0f}"
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {unit}"


def render_table(rows: list[Row]) -> str:
    header = ("metric", "plugin", "OpenSSH", "ratio", "target", "result")
    lines = [header]
    for row in rows:
        lines.append((row.metric, fmt_value(row.plugin, row.unit), fmt_value(row.openssh, row.unit),
                      "-" if row.ratio is None else f"{row.ratio:.2f}", row.target or "-", row.status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    notes = []
    for previous, row in zip([None, *rows], rows):
        if row.note:
            same = previous is not None and previous.note == row.note
            notes.append(f"  {row.metric}: {row.status}: {'as above' if same else row.note}")
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def command_output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return (result.stdout or result.stderr).strip()


def filesystem_of(path: Path) -> str:
    """The filesystem type of the mount holding path, from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def machine_info(plugin: Path, workdir: Path) -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        paramiko_version = metadata.version("paramiko")
    except metadata.PackageNotFoundError:
        paramiko_version = "not installed"
    dirty = bool(command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", "sftp_plugin"]))
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paramiko": paramiko_version,
        "openssh": command_output(["ssh", "-V"]),
        "plugin": command_output([str(plugin), "--version"]),
        "git_commit": command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "plugin_source_modified": dirty,
        "workdir_filesystem": filesystem_of(workdir),
    }


# -- command line ----------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=DEFAULT_ROUNDS,
                        help="rounds per metric; each reports the median")
    parser.add_argument("--size-mib", type=positive_int, default=DEFAULT_SIZE_MIB,
                        help="stream size for stream up/down and peak RSS")
    parser.add_argument("--streams", type=positive_int, default=DEFAULT_STREAMS, help="concurrent streams")
    parser.add_argument("--stream-size-mib", type=positive_int, default=None,
                        help="size of each concurrent stream (default: --size-mib / --streams)")
    parser.add_argument("--calls", type=positive_int, default=DEFAULT_CALLS, help="backup_file calls per round")
    parser.add_argument("--no-at-rest", action="store_true", help="skip the compression/encryption rows")
    parser.add_argument("--subset-size-mib", type=positive_int, default=DEFAULT_SUBSET_SIZE_MIB,
                        help="size of the stream the at-rest subset read takes 1%% of")
    parser.add_argument("--storm-calls", type=positive_int, default=DEFAULT_STORM_CALLS,
                        help="backup_data calls (then as many restore_data) in the per-table storm")
    parser.add_argument("--storm-width", type=positive_int, default=DEFAULT_STORM_WIDTH,
                        help="storm calls running at once")
    parser.add_argument("--call-size-kib", type=positive_int, default=DEFAULT_CALL_SIZE_KIB,
                        help="size of each backup_file file")
    parser.add_argument("--version-runs", type=positive_int, default=DEFAULT_VERSION_RUNS,
                        help="plugin_api_version runs")
    parser.add_argument("--latency-size-mib", type=positive_int, default=DEFAULT_LATENCY_SIZE_MIB,
                        help="stream size over the delayed link")
    parser.add_argument("--latency-rtt-ms", type=float, default=DEFAULT_RTT_MS,
                        help="added round-trip time of the delayed link (0: namespace and veth only, no netem)")
    parser.add_argument("--no-latency", action="store_true", help="skip the delayed-link part")
    parser.add_argument("--latency-method", choices=LATENCY_METHODS, default="auto",
                        help="how to add the delay: netem (root and sch_netem), the userspace delay proxy, "
                             "or auto: netem where possible, else the proxy")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--plugin", type=Path, default=Path(PLUGIN_EXE),
                        help="plugin executable (default: the console script beside this Python)")
    parser.add_argument("--workdir-parent", type=Path, default=TMPFS, help="where the scratch directory goes")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the scratch directory (for debugging)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target is missed, not only on errors")
    args = parser.parse_args(argv)
    if args.latency_rtt_ms < 0:
        parser.error("--latency-rtt-ms must not be negative")
    if args.stream_size_mib is None and args.size_mib * MIB // args.streams == 0:
        parser.error("--size-mib / --streams is under one byte; give --stream-size-mib")
    args.plugin = args.plugin.absolute()
    if not os.access(args.plugin, os.X_OK):
        parser.error(f"plugin {args.plugin} is not executable; run `make deps` or pass --plugin")
    return args


def make_workdir(args: argparse.Namespace) -> Path:
    parent: Path = args.workdir_parent
    if not parent.is_dir():
        progress(f"{parent} does not exist; using {tempfile.gettempdir()} (disk speed may show in the results)")
        parent = Path(tempfile.gettempdir())
    stream_size = args.stream_size_mib * MIB if args.stream_size_mib else args.size_mib * MIB // args.streams
    # Source + plugin copy + sftp copy of each stream, plus the concurrent streams' sources and copies.
    needed = (3 * args.size_mib * MIB + (1 + 2 * args.streams) * stream_size
              + (0 if args.no_latency else 3 * args.latency_size_mib * MIB)
              # At rest: the table data and its copies, the subset stream and its container.
              + (0 if args.no_at_rest else 3 * args.size_mib * MIB + 2 * args.subset_size_mib * MIB)
              + SPACE_MARGIN)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise SystemExit(f"bench: {parent} has {free // MIB} MiB free, the bench needs {needed // MIB} MiB; "
                         "use smaller --size-mib or another --workdir-parent")
    return Path(tempfile.mkdtemp(prefix="gpbackup-sftp-bench-", dir=parent))


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind through every finally block (sshd, namespace, scratch files) as Ctrl-C does.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = make_workdir(args)
    with contextlib.ExitStack() as cleanup:
        if args.keep_workdir:
            cleanup.callback(progress, f"scratch directory kept: {workdir}")
        else:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        progress(f"scratch directory {workdir} ({filesystem_of(workdir)})")
        # MaxStartups above the storm's width: 16 sftp processes handshaking at once must not be dropped by
        # sshd's default 10:30:100 (the plugin would retry; OpenSSH's sftp just fails).
        server = SshServer(workdir / "ssh", max_startups=f"{args.storm_width * 2}:30:{args.storm_width * 8}")
        cleanup.callback(server.stop)
        server.start()
        progress(f"sshd on 127.0.0.1:{server.port} as {getpass.getuser()}")
        runner = Runner(args.plugin, workdir)
        cleanup.callback(runner.stop_fork_servers)
        cleanup.callback(runner.kill_all)  # runs first: clients go before the fork server and sshd
        load_start = os.getloadavg()
        if load_start[0] > BUSY_LOAD:
            progress(f"warning: load average is {load_start[0]:.2f} before the bench starts; "
                     "other work on this machine will skew the figures")
        bench = Bench(args, server, workdir, runner)
        rows = bench.run()
        info = machine_info(args.plugin, workdir)
        info["loadavg_start"] = load_start
        info["loadavg_end"] = os.getloadavg()
    total = time.monotonic() - started

    print(render_table(rows))
    print(f"\ntotal runtime {total:.0f} s; results in {args.json}")
    document = {
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [asdict(row) for row in rows],
        "skipped": bench.skipped,
        "latency": bench.latency,
        "total_seconds": round(total, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    if any(row.status == "ERROR" for row in rows):
        return 2
    if args.strict and any(row.status == "FAIL" for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; stopped the sshd(s) and clients and removed the scratch files", file=sys.stderr)
        sys.exit(130)
