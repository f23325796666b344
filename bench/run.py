"""Benchmark gpbackup_sftp_plugin against OpenSSH's ``sftp`` client (``make bench``).

Starts the same throwaway sshd the tests use (tests/sshd_server.py), with its
keys, remote_dir and all test data on tmpfs so disk speed is not measured, and
in one run, alternating plugin and OpenSSH within every round, measures:

* stream up: ``backup_data`` of one long stream vs ``sftp put`` of the same file;
* stream down: ``restore_data`` vs ``sftp get`` of that stream, both to /dev/null;
* per-call cost: many ``backup_file`` calls of a tiny file vs as many ``sftp``
  processes putting one file each (a fresh process and connection every time);
* concurrency: several ``backup_data`` streams at once vs as many ``sftp`` puts;
* high latency: stream up/down again over a veth pair with ``tc netem`` delay
  into a network namespace (bench/latency.py); where that is impossible (no
  root, no netem in the kernel), through a userspace delay proxy on 127.0.0.1
  in front of the loopback sshd instead (bench/delayproxy.py), which both
  clients share; the rows and the JSON say which was used, and the proxy's
  measured RTT;
* ``plugin_api_version`` wall time and the peak RSS of ``backup_data``.

Ratios are OpenSSH time / plugin time: above 1 the plugin is faster. Every
plugin call is checked (exit code, empty stderr), every stored upload's size,
the SHA-256 of each stored stream-up copy and of one stream per concurrency
round, and one untimed ``restore_data`` is hashed through a pipe (timed ones
exit 0 only if the stream matched its stored SHA-256), so a broken plugin
cannot look fast. Prints a table to stdout (progress goes to stderr) and writes the
same figures, with machine details, to a JSON file.

Run: ``.venv/bin/python bench/run.py [--size-mib N] [--rounds N] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import platform
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

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: make `bench` and `tests` importable

from bench.delayproxy import DelayProxy, measure_rtt  # noqa: E402
from bench.latency import DelayedLink, LinkUnavailable  # noqa: E402
from bench.procs import (  # noqa: E402
    BenchError,
    Child,
    Outcome,
    Runner,
    Target,
    check_size,
    run_all,
    sftp_quote,
    sha256_file,
    write_random_file,
)
from tests.sshd_server import SshServer, known_hosts_line  # noqa: E402

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
# The rows the high-latency part always yields, measured or skipped.
LATENCY_METRICS = ("high-latency up", "high-latency down")
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
CONCURRENCY_RATIO_TARGET = 0.9  # parallel segments: aggregate within 10% of OpenSSH
LATENCY_RATIO_TARGET = 0.9  # the pipelining must hide the RTT as well as OpenSSH's does
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
        stamp = time.strftime("%Y%m%d%H%M%S")
        # The plugin maps .../backups/<date>/<timestamp>/<name> to the same tail under remote_dir.
        self.backup_tail = Path("backups", stamp[:8], stamp)
        self.local_dir = workdir / "local" / self.backup_tail
        self.local_dir.mkdir(parents=True)
        self.size = args.size_mib * MIB
        self.stream_size = args.stream_size_mib * MIB if args.stream_size_mib else self.size // args.streams
        self.openssh_rss_kib: list[float] = []  # of every loopback sftp put, for reference
        self.stored: dict[str, Path] = {}  # per target: the verified stream restore_data reads back
        self.skipped: list[str] = []
        self.latency: dict[str, object] = {}  # how the high-latency rows were made, for the JSON
        self.loopback = self.make_target("loopback", "127.0.0.1", server.port, server.known_hosts)
        # Peak RSS is measured in-process: with the fork server the process we wait for is only the client.
        self.in_process = self.make_target("in-process", "127.0.0.1", server.port, server.known_hosts,
                                           fork_server="no")

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
        return self.local_dir / name

    def stored_path(self, target: Target, name: str) -> Path:
        """Where the plugin stores name: remote_dir/backups/<date>/<timestamp>/name."""
        return target.remote_dir / self.backup_tail / name

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
        rows.append(self.guard("per-call", self.per_call))
        rows.append(self.guard("concurrency", self.concurrency))
        rows.extend(self.high_latency())
        rows.append(self.guard("plugin_api_version", self.api_version))
        rows.append(self.guard("peak RSS", lambda: self.rss_row(stream, stream_sha)))
        for row in rows:
            row.key, row.metric = row.metric, self.label(row.metric)
        return rows

    def label(self, metric: str) -> str:
        """Table label with the sizes used, e.g. 'stream up (512 MiB)'."""
        args = self.args
        sizes = {
            "stream up": f"{args.size_mib} MiB",
            "stream down": f"{args.size_mib} MiB",
            "per-call": f"{args.calls} x {args.call_size_kib} KiB backup_file",
            "concurrency": f"{args.streams} x {self.stream_size / MIB:g} MiB",
            "high-latency up": f"{args.latency_size_mib} MiB, {args.latency_rtt_ms:g} ms RTT",
            "high-latency down": f"{args.latency_size_mib} MiB, {args.latency_rtt_ms:g} ms RTT",
            "plugin_api_version": f"median of {args.version_runs}",
            "peak RSS": f"backup_data of {args.size_mib} MiB",
        }
        return f"{metric} ({sizes[metric]})" if metric in sizes else metric

    def guard(self, metric: str, measure: Callable[[], Row]) -> Row:
        """Run one measurement; a failed or wrong transfer makes its row ERROR instead of a number."""
        try:
            return measure()
        except BenchError as err:
            progress(f"{metric}: ERROR: {err}")
            return Row(metric, status="ERROR", note=str(err))

    def store_stream(self, target: Target, source: Path, size: int, sha: str, name: str) -> Outcome:
        """backup_data source under name, then check the stored copy's size and SHA-256."""
        outcome = self.runner.plugin_child(target, "backup_data", self.key(name), stdin_path=source).finish()
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
            if target is self.loopback:
                self.openssh_rss_kib.append(openssh.maxrss_kib)
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

    def per_call(self) -> Row:
        args, target = self.args, self.loopback
        size = args.call_size_kib * KIB
        files = []
        for i in range(args.calls):
            path = self.key(f"gpbackup_-1_{self.backup_tail.name}_small_{i:03d}")
            path.write_bytes(os.urandom(size))
            files.append(path)
        openssh_dests = [self.openssh_dir(target) / path.name for path in files]
        batches = [self.runner.sftp_batch([f"put {sftp_quote(path)} {sftp_quote(dest)}"])
                   for path, dest in zip(files, openssh_dests)]
        plugin_secs: list[float] = []
        openssh_secs: list[float] = []
        for r in range(args.rounds):
            started = time.perf_counter()
            for path in files:
                self.runner.plugin_child(target, "backup_file", path).finish().check(f"plugin backup_file {path.name}")
            plugin_secs.append(time.perf_counter() - started)
            for path in files:
                if not path.exists():
                    raise BenchError(f"plugin backup_file removed the local file {path}; it must stay")
                stored = self.stored_path(target, path.name)
                check_size(stored, size, "plugin backup_file")
                stored.unlink()
            started = time.perf_counter()
            for batch in batches:
                self.runner.sftp_child(target, batch).finish().check("sftp put", allow_stderr=True)
            openssh_secs.append(time.perf_counter() - started)
            for dest in openssh_dests:
                check_size(dest, size, "sftp put")
                dest.unlink()
            progress(f"per-call round {r + 1}/{args.rounds}: plugin {plugin_secs[-1]:.2f} s, "
                     f"OpenSSH {openssh_secs[-1]:.2f} s for {args.calls} calls")
        p, o = median(plugin_secs), median(openssh_secs)
        return Row("per-call", "s", p, o, o / p, f"ratio >= {PER_CALL_RATIO_TARGET:g}",
                   "PASS" if o / p >= PER_CALL_RATIO_TARGET else "FAIL",
                   note=f"per call: plugin {p / args.calls * 1000:.0f} ms, OpenSSH {o / args.calls * 1000:.0f} ms",
                   samples={"plugin_seconds": plugin_secs, "openssh_seconds": openssh_secs})

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
            # Both clients check the host key under the proxy's address, as they would for any host.
            known_hosts = self.workdir / "proxy_known_hosts"
            known_hosts.write_text(known_hosts_line(self.server.server_dir, "127.0.0.1", port))
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
        return [up, down]

    def api_version(self) -> Row:
        seconds: list[float] = []
        argv = [str(self.args.plugin), "plugin_api_version"]
        for _ in range(self.args.version_runs):
            started = time.perf_counter()
            result = subprocess.run(argv, capture_output=True, text=True, env=self.runner.env)
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
        plugin_kib = self.store_stream(self.in_process, stream, self.size, sha, "rss").maxrss_kib
        plugin = plugin_kib / KIB
        openssh = max(self.openssh_rss_kib) / KIB if self.openssh_rss_kib else None
        progress(f"peak RSS: plugin {plugin:.1f} MiB in-process")
        return Row("peak RSS", "MiB", plugin, openssh, None, f"plugin <= {RSS_MIB_TARGET:g} MiB",
                   "PASS" if plugin <= RSS_MIB_TARGET else "FAIL",
                   note="plugin in-process (fork_server: no); OpenSSH: the sftp process and its ssh child",
                   samples={"plugin_maxrss_kib": [plugin_kib], "openssh_maxrss_kib": self.openssh_rss_kib})


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=DEFAULT_ROUNDS,
                        help="rounds per metric; each reports the median")
    parser.add_argument("--size-mib", type=positive_int, default=DEFAULT_SIZE_MIB,
                        help="stream size for stream up/down and peak RSS")
    parser.add_argument("--streams", type=positive_int, default=DEFAULT_STREAMS, help="concurrent streams")
    parser.add_argument("--stream-size-mib", type=positive_int, default=None,
                        help="size of each concurrent stream (default: --size-mib / --streams)")
    parser.add_argument("--calls", type=positive_int, default=DEFAULT_CALLS, help="backup_file calls per round")
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
    parser.add_argument("--plugin", type=Path, default=Path(sys.executable).parent / "gpbackup_sftp_plugin",
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
              + (0 if args.no_latency else 3 * args.latency_size_mib * MIB) + SPACE_MARGIN)
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
        server = SshServer(workdir / "ssh")
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
