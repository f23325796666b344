"""Reliability: the installed plugin against a real sshd, through a proxy that breaks connections on purpose.

Every test runs the console script as gpbackup would (a subprocess with its
own HOME and no ssh-agent) and checks the bytes end to end with SHA-256. The
faults come from `tests.faultproxy`: TCP resets at chosen byte offsets in
either direction, stalls, refused connections. The retry policy under test is
sftp_plugin/retry.py (``retries`` attempts, exponential backoff with full
jitter capped at ``retry_max_wait``); small caps keep each test well under a
minute.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.faultproxy import Action, Direction, FaultProxy, Plan
from tests.helpers import PLUGIN_EXE, assert_failed, assert_ok, isolated_env, sha256, wait_until
from tests.sshd_server import SshServer, keygen

# A hung plugin must fail its test, not hang the suite. Not a timing assertion.
RUN_TIMEOUT = 60
KIB = 1024
MIB = 1024 * KIB
# Big enough that the resume buffer (2 MiB below) is filled and trimmed several
# times, and that a reset lands with many writes or reads in flight.
STREAM_SIZE = 8 * MIB
TIMESTAMP = "20261124101010"
CONTENT_ID = '"-1"'  # as the test bench passes it, quotes included
# Options that make failures cheap: short backoff cap, quick timeouts, a small resume buffer.
FAST_RETRY_OPTIONS: dict[str, object] = {
    "retries": 6,
    "retry_max_wait": 1,
    "io_timeout": 3,
    "connect_timeout": 5,
    "resume_buffer": 2,  # MiB
}
C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
# Reset points. Measured by counting forwarded bytes (FaultProxy.forwarded gives
# the same counts): a clean 8 MiB upload sends
# ~8.40 MB client->server and 10.8-13.2 KB server->client over six runs
# (handshake ~3.5 KB, then window adjustments, as many as sshd's timing makes,
# and one SFTP status per write of up to 255 KiB);
# a clean 8 MiB download sends 4 760 bytes
# client->server (handshake, auth and SFTP start up to ~3.3 KB, then 255 KiB
# read requests) and ~8.40 MB back. The bulk direction is cut early, midway and
# within its last writes/reads; the thin direction at three points after the
# handshake, while requests are in flight.
BULK_OFFSETS = (256 * KIB, 4 * MIB, STREAM_SIZE)
UPLOAD_THIN_OFFSETS = (5_000, 7_000, 9_000)
DOWNLOAD_THIN_OFFSETS = (3_400, 4_000, 4_600)
# A reset this early server->client falls inside the SSH banner/key exchange.
HANDSHAKE_OFFSET = 100
CONCURRENT_CALLS = 64
# Longest wait for all concurrent calls to reach the gate (a deadline, not an assertion).
GATE_TIMEOUT = 30
# The request/reply sweeps: a file of two SFTP writes/reads, cut points tried four at a time.
SWEEP_FILE_SIZE = 48 * KIB
SWEEP_WORKERS = 4
PARTIAL_GLOB = ".*.partial"
# How long to wait for the killed upload's temporary file to show up (a deadline, not an assertion).
PARTIAL_APPEAR_TIMEOUT = 30.0
RETRY_LINE_RE = re.compile(
    r"WARNING (?P<command>\S+): (?P<step>.+): attempt (?P<attempt>\d+) failed "
    r"\((?P<cause>.+)\); retrying in (?P<wait>\d+\.\d)s$"
)


def fault_cases(bulk: Direction) -> list[object]:
    """(direction, offset) pairs: three points in the bulk direction, three in the thin one."""
    thin = S2C if bulk is C2S else C2S
    thin_offsets = UPLOAD_THIN_OFFSETS if bulk is C2S else DOWNLOAD_THIN_OFFSETS
    cases = [pytest.param(bulk, offset, id=f"{bulk.value}-after-{offset}") for offset in BULK_OFFSETS]
    cases += [pytest.param(thin, offset, id=f"{thin.value}-after-{offset}") for offset in thin_offsets]
    return cases


@dataclass
class Site:
    """One test's world: a remote_dir of its own on the backup host, a HOME, a log_dir, a gpbackup-style local dir."""

    server: SshServer
    proxy: FaultProxy | None
    root: Path
    remote_dir: Path
    log_dir: Path
    home: Path
    local_dir: Path

    @property
    def remote_backup_dir(self) -> Path:
        return self.remote_dir / "backups" / TIMESTAMP[:8] / TIMESTAMP

    def local(self, name: str) -> Path:
        return self.local_dir / name

    def remote(self, name: str) -> Path:
        return self.remote_backup_dir / name

    def config(self, name: str = "plugin.yaml", via_proxy: bool = True, **overrides: object) -> Path:
        """A plugin config for this site; through the proxy by default, host key pinned (known_hosts is per port)."""
        port = self.proxy.port if via_proxy and self.proxy is not None else self.server.port
        options: dict[str, object] = {
            "hostname": "127.0.0.1",
            "port": port,
            "host_key_fingerprint": self.server.host_fingerprint,
            "remote_dir": str(self.remote_dir),
            "log_dir": str(self.log_dir),
            **FAST_RETRY_OPTIONS,
        }
        options.update(overrides)
        return self.server.write_config(self.root / name, **options)

    def env(self) -> dict[str, str]:
        return isolated_env(self.home)

    def run(self, *args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [PLUGIN_EXE, *map(str, args)],
            input=stdin,
            capture_output=True,
            env=self.env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )

    def popen(self, *args: str | Path, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [PLUGIN_EXE, *map(str, args)], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env()
        )

    def leftovers(self) -> list[Path]:
        """Temporary upload files anywhere under this site's remote_dir."""
        return sorted(self.remote_dir.rglob(PARTIAL_GLOB))

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def store_directly(self, name: str, data: bytes) -> Path:
        """Back ``data`` up under ``name`` without the proxy; return the stored file."""
        assert_ok(self.run("backup_data", self.config("direct.yaml", via_proxy=False), self.local(name), stdin=data))
        stored = self.remote(name)
        assert sha256(stored.read_bytes()) == sha256(data)
        return stored


def assert_stored(site: Site, name: str, data: bytes) -> None:
    """``name`` holds exactly ``data``, its sidecar holds the matching checksum, and no temporary file remains."""
    stored = site.remote(name)
    assert stored.is_file(), f"{stored} was not stored"
    assert sha256(stored.read_bytes()) == sha256(data), f"{stored} differs from what was backed up"
    sidecar = stored.with_name(name + ".sha256")
    assert sidecar.read_text() == f"{sha256(data)}  {name}\n"
    assert site.leftovers() == []


def retry_lines(site: Site) -> list[re.Match[str]]:
    return [m for m in map(RETRY_LINE_RE.search, site.log_text().splitlines()) if m]


@pytest.fixture(scope="module")
def backup_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """One real OpenSSH server for this module; each test keeps to a remote_dir of its own."""
    with SshServer(tmp_path_factory.mktemp("reliability_sshd")) as server:
        yield server


@pytest.fixture
def proxy(backup_host: SshServer) -> Iterator[FaultProxy]:
    with FaultProxy(backup_host.port) as running:
        yield running


def make_site(server: SshServer, proxy: FaultProxy | None, tmp_path: Path, label: str) -> Site:
    remote_dir = server.remote_dir / f"{re.sub(r'[^A-Za-z0-9_-]', '_', label)[:60]}-{secrets.token_hex(4)}"
    remote_dir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    local_dir = tmp_path / "seg" / "backups" / TIMESTAMP[:8] / TIMESTAMP
    local_dir.mkdir(parents=True)
    return Site(server, proxy, tmp_path, remote_dir, tmp_path / "logs", home, local_dir)


@pytest.fixture
def site(backup_host: SshServer, proxy: FaultProxy, tmp_path: Path, request: pytest.FixtureRequest) -> Site:
    return make_site(backup_host, proxy, tmp_path, request.node.name)


# --- resets during streams ---------------------------------------------------------------


@pytest.mark.parametrize(("direction", "offset"), fault_cases(bulk=C2S))
def test_backup_data_survives_a_reset_mid_stream(
    site: Site, proxy: FaultProxy, direction: Direction, offset: int
) -> None:
    data = os.urandom(STREAM_SIZE)
    proxy.push(Plan.reset(offset, direction))

    assert_ok(site.run("backup_data", site.config(), site.local("gpbackup_0_stream"), stdin=data))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert_stored(site, "gpbackup_0_stream", data)


@pytest.mark.parametrize(("direction", "offset"), fault_cases(bulk=S2C))
def test_restore_data_survives_a_reset_mid_stream(
    site: Site, proxy: FaultProxy, direction: Direction, offset: int
) -> None:
    data = os.urandom(STREAM_SIZE)
    site.store_directly("gpbackup_0_stream", data)
    proxy.push(Plan.reset(offset, direction))

    result = assert_ok(site.run("restore_data", site.config(), site.local("gpbackup_0_stream")))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert len(result.stdout) == len(data)
    assert sha256(result.stdout) == sha256(data)


def test_backup_data_succeeds_after_several_failures_in_a_row(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(STREAM_SIZE)
    proxy.push(Plan.reset(1 * MIB, C2S), Plan.reset(HANDSHAKE_OFFSET, S2C), Plan.reset(3 * MIB, C2S))

    assert_ok(site.run("backup_data", site.config(retries=6), site.local("gpbackup_0_stream"), stdin=data))

    assert proxy.triggered == 3
    assert proxy.accepted == 4
    assert_stored(site, "gpbackup_0_stream", data)


def test_restore_data_succeeds_after_several_failures_in_a_row(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(STREAM_SIZE)
    site.store_directly("gpbackup_0_stream", data)
    proxy.push(Plan.reset(1 * MIB, S2C), Plan.reset(HANDSHAKE_OFFSET, S2C), Plan.reset(3 * MIB, S2C))

    result = assert_ok(site.run("restore_data", site.config(retries=6), site.local("gpbackup_0_stream")))

    assert proxy.triggered == 3
    assert proxy.accepted == 4
    assert sha256(result.stdout) == sha256(data)


# --- connection set-up failures ----------------------------------------------------------


def test_reset_inside_the_ssh_handshake_is_retried(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(256 * KIB)
    site.local("gpbackup_-1_metadata.sql").write_bytes(data)
    proxy.push(Plan.reset(HANDSHAKE_OFFSET, S2C))

    assert_ok(site.run("backup_file", site.config(), site.local("gpbackup_-1_metadata.sql")))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert_stored(site, "gpbackup_-1_metadata.sql", data)
    assert sha256(site.local("gpbackup_-1_metadata.sql").read_bytes()) == sha256(data)  # local file left alone


def test_backup_file_succeeds_after_refused_connections(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(256 * KIB)
    site.local("gpbackup_-1_toc.yaml").write_bytes(data)
    proxy.push(Plan.refuse(), Plan.refuse())

    assert_ok(site.run("backup_file", site.config(), site.local("gpbackup_-1_toc.yaml")))

    assert proxy.triggered == 2
    assert proxy.accepted == 3
    assert_stored(site, "gpbackup_-1_toc.yaml", data)


def test_backup_file_gives_up_after_the_configured_attempts_with_one_line(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(64 * KIB)
    site.local("gpbackup_-1_toc.yaml").write_bytes(data)
    proxy.push(*[Plan.refuse()] * 10)

    line = assert_failed(site.run("backup_file", site.config(retries=2), site.local("gpbackup_-1_toc.yaml")))

    assert re.search(r"\b2 attempts\b", line), line
    assert proxy.accepted == 2
    assert not site.remote("gpbackup_-1_toc.yaml").exists()
    assert site.leftovers() == []
    assert sha256(site.local("gpbackup_-1_toc.yaml").read_bytes()) == sha256(data)


def test_authentication_failure_is_not_retried(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(64 * KIB)
    site.local("gpbackup_-1_toc.yaml").write_bytes(data)
    stranger = keygen(site.root / "not_authorized_key")

    line = assert_failed(
        site.run("backup_file", site.config(retries=6, identity_file=str(stranger)), site.local("gpbackup_-1_toc.yaml"))
    )

    assert "authentication" in line.lower(), line
    assert proxy.accepted == 1
    assert not site.remote("gpbackup_-1_toc.yaml").exists()
    assert sha256(site.local("gpbackup_-1_toc.yaml").read_bytes()) == sha256(data)
    assert retry_lines(site) == []


# --- stalls --------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
def test_stalled_upload_times_out_and_resumes_on_a_new_connection(
    site: Site, proxy: FaultProxy, direction: Direction
) -> None:
    data = os.urandom(STREAM_SIZE)
    # Mid-stream: 2 MiB of data client->server, or ~half the acknowledgements server->client.
    proxy.push(Plan.stall(2 * MIB if direction is C2S else UPLOAD_THIN_OFFSETS[1], direction))

    assert_ok(site.run("backup_data", site.config(io_timeout=2), site.local("gpbackup_0_stream"), stdin=data))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert_stored(site, "gpbackup_0_stream", data)


def test_stalled_download_times_out_and_resumes_on_a_new_connection(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(STREAM_SIZE)
    site.store_directly("gpbackup_0_stream", data)
    proxy.push(Plan.stall(2 * MIB, S2C))

    result = assert_ok(site.run("restore_data", site.config(io_timeout=2), site.local("gpbackup_0_stream")))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert sha256(result.stdout) == sha256(data)


# --- an interrupt while the backup host does not answer --------------------------------------

# Long enough that any wait on the stalled connection would outlast RUN_TIMEOUT:
# the call must end because of the interrupt, not because a timeout ran out.
PATIENT_IO_TIMEOUT = 10 * RUN_TIMEOUT


def interrupt(process: subprocess.Popen[bytes]) -> bytes:
    """SIGINT to `process`; its stderr once it has ended (killed, and the test failed, if it hangs)."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=RUN_TIMEOUT)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"still running {RUN_TIMEOUT}s after SIGINT")


def test_sigint_ends_an_upload_to_a_stalled_host_at_once_and_stores_nothing(site: Site, proxy: FaultProxy) -> None:
    # Mid-stream, so the plugin is blocked sending: possibly halfway through an SSH packet.
    proxy.push(Plan.stall(2 * MIB, C2S))
    config = site.config(io_timeout=PATIENT_IO_TIMEOUT, fork_server="no")
    name = "gpbackup_0_stream"
    process = site.popen("backup_data", config, site.local(name), stdin=subprocess.PIPE)
    # The feeder alone writes stdin: communicate() would wait for it, blocked, to let go.
    stdin, process.stdin = process.stdin, None
    feeder = threading.Thread(target=lambda: _feed(stdin, os.urandom(STREAM_SIZE)), daemon=True)
    feeder.start()
    assert wait_until(lambda: proxy.triggered == 1), "the stall never happened"

    err = interrupt(process)
    feeder.join(RUN_TIMEOUT)

    assert process.returncode == 130, err
    assert err.decode().strip().endswith("backup_data: interrupted") and err.count(b"\n") == 1, err
    assert not site.remote(name).exists()
    assert not site.remote(name + ".sha256").exists()


def test_sigint_ends_a_download_from_a_stalled_host_at_once(site: Site, proxy: FaultProxy) -> None:
    site.store_directly("gpbackup_0_stream", os.urandom(STREAM_SIZE))
    proxy.push(Plan.stall(2 * MIB, S2C))
    config = site.config(io_timeout=PATIENT_IO_TIMEOUT, fork_server="no")
    process = site.popen("restore_data", config, site.local("gpbackup_0_stream"))
    assert wait_until(lambda: proxy.triggered == 1), "the stall never happened"

    err = interrupt(process)

    assert process.returncode == 130, err
    assert err.decode().strip().endswith("restore_data: interrupted") and err.count(b"\n") == 1, err


# --- many processes at once ----------------------------------------------------------------


@pytest.fixture
def default_maxstartups_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """An sshd of its own with OpenSSH's default MaxStartups 10:30:100 (drops handshakes beyond 10 pending)."""
    with SshServer(tmp_path_factory.mktemp("maxstartups_sshd"), max_startups="10:30:100") as server:
        yield server


def test_many_concurrent_backup_file_calls_all_store_their_bytes(
    default_maxstartups_host: SshServer, tmp_path: Path
) -> None:
    """64 plugin processes reach an sshd with OpenSSH's default MaxStartups in the same instant.

    Python start-up on a small machine spreads 64 processes over seconds, which
    alone rarely gets past sshd's 10 pending handshakes. So a proxy holds each
    process's first connection until all 64 wait, then lets them through at
    once, as when a whole cluster connects: sshd really drops some (it logs
    each one), and those calls must retry and succeed.
    """
    server = default_maxstartups_host
    files: dict[str, bytes] = {}
    with FaultProxy(server.port, plans=tuple(Plan.hold() for _ in range(CONCURRENT_CALLS))) as gate:
        site = make_site(server, gate, tmp_path, "concurrent")
        # connect_timeout covers the wait at the gate (for the banner); retries cover sshd's drops.
        config = site.config(retries=10, retry_max_wait=2, connect_timeout=GATE_TIMEOUT + 10)
        for number in range(CONCURRENT_CALLS):
            name = f"gpbackup_{number}_{TIMESTAMP}_toc.yaml"
            files[name] = os.urandom(secrets.randbelow(256 * KIB) + 1)
            site.local(name).write_bytes(files[name])

        processes = {name: site.popen("backup_file", config, site.local(name)) for name in files}
        try:
            deadline = time.monotonic() + GATE_TIMEOUT
            while gate.accepted < CONCURRENT_CALLS and time.monotonic() < deadline:
                time.sleep(0.05)
            gate.release()
            with ThreadPoolExecutor(max_workers=CONCURRENT_CALLS) as pool:
                outputs = dict(
                    zip(processes, pool.map(lambda p: p.communicate(timeout=RUN_TIMEOUT), processes.values()))
                )
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()

    failures = {
        name: (processes[name].returncode, err)
        for name, (_, err) in outputs.items()
        if processes[name].returncode != 0 or err
    }
    assert failures == {}
    for name, data in files.items():
        assert_stored(site, name, data)
    assert "past MaxStartups" in server.log_path.read_text(errors="replace"), "sshd never throttled"


# --- a killed upload -----------------------------------------------------------------------


def test_killed_backup_data_leaves_nothing_under_the_final_name_and_cleanup_removes_the_leftover(site: Site) -> None:
    data = os.urandom(STREAM_SIZE)
    config = site.config(via_proxy=False)
    name = "gpbackup_0_stream"
    process = site.popen("backup_data", config, site.local(name), stdin=subprocess.PIPE)
    assert process.stdin is not None
    # Feed half the stream and keep the pipe open, so the plugin is mid-upload when killed.
    feeder = threading.Thread(target=lambda: _feed(process.stdin, data[: STREAM_SIZE // 2]), daemon=True)
    feeder.start()
    try:
        deadline = time.monotonic() + PARTIAL_APPEAR_TIMEOUT
        while not site.leftovers() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert site.leftovers(), f"no temporary file appeared (plugin exit {process.poll()})"
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=RUN_TIMEOUT)
        feeder.join(RUN_TIMEOUT)
    assert process.returncode == -signal.SIGKILL

    assert not site.remote(name).exists()
    assert not site.remote(name + ".sha256").exists()
    (partial,) = site.leftovers()
    kept = partial.read_bytes()
    assert sha256(kept) == sha256(data[: len(kept)])  # what reached the host is a true prefix of the stream

    assert_ok(site.run("cleanup_plugin_for_backup", config, site.local_dir, "coordinator", CONTENT_ID))
    assert site.leftovers() == []
    assert not site.remote(name).exists()

    # The same key can then be backed up whole.
    assert_ok(site.run("backup_data", config, site.local(name), stdin=data))
    assert_stored(site, name, data)


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.flush()
    except (BrokenPipeError, ValueError):
        pass  # the plugin was killed first


# --- damaged stored bytes -------------------------------------------------------------------


def corrupt_one_byte(path: Path) -> bytes:
    """Flip one byte in the middle of ``path`` on the server's filesystem; return the new content."""
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    return bytes(damaged)


def test_corrupted_byte_fails_restore_data_naming_the_file(site: Site) -> None:
    data = os.urandom(1 * MIB)
    name = "gpbackup_0_stream"
    damaged = corrupt_one_byte(site.store_directly(name, data))
    assert sha256(damaged) != sha256(data)

    line = assert_failed(site.run("restore_data", site.config(via_proxy=False), site.local(name)))

    assert name in line and "checksum" in line.lower(), line


def test_corrupted_byte_fails_restore_file_and_leaves_no_local_file(site: Site, tmp_path: Path) -> None:
    data = os.urandom(1 * MIB)
    name = "gpbackup_-1_metadata.sql"
    corrupt_one_byte(site.store_directly(name, data))
    restore_dir = tmp_path / "restore" / "backups" / TIMESTAMP[:8] / TIMESTAMP
    restore_dir.mkdir(parents=True)

    line = assert_failed(site.run("restore_file", site.config(via_proxy=False), restore_dir / name))

    assert name in line and "checksum" in line.lower(), line
    assert list(restore_dir.iterdir()) == []  # neither the final name nor a temporary file


def test_corrupted_file_restores_when_verify_checksums_is_off(site: Site, tmp_path: Path) -> None:
    data = os.urandom(1 * MIB)
    name = "gpbackup_-1_metadata.sql"
    damaged = corrupt_one_byte(site.store_directly(name, data))
    config = site.config(via_proxy=False, verify_checksums=False)
    restore_dir = tmp_path / "restore" / "backups" / TIMESTAMP[:8] / TIMESTAMP
    restore_dir.mkdir(parents=True)

    streamed = assert_ok(site.run("restore_data", config, site.local(name))).stdout
    assert_ok(site.run("restore_file", config, restore_dir / name))

    assert sha256(streamed) == sha256(damaged) != sha256(data)
    assert sha256((restore_dir / name).read_bytes()) == sha256(damaged)


# --- what the log says ------------------------------------------------------------------------


def test_retries_are_logged_with_attempt_cause_and_wait(site: Site, proxy: FaultProxy) -> None:
    data = os.urandom(STREAM_SIZE)
    # The first cut comes after the first 2 MiB (one resume buffer) was acknowledged, so the
    # upload resumes past byte 0; the second cuts the resumed upload before its next drain.
    proxy.push(Plan.reset(3 * MIB, C2S), Plan.reset(512 * KIB, C2S))

    assert_ok(site.run("backup_data", site.config(), site.local("gpbackup_0_stream"), stdin=data))

    assert proxy.triggered == 2
    assert_stored(site, "gpbackup_0_stream", data)
    lines = [m for m in retry_lines(site) if m["step"].startswith("upload ")]
    assert [int(m["attempt"]) for m in lines] == [1, 2], site.log_text()
    for match in lines:
        assert match["command"] == "backup_data"
        assert "gpbackup_0_stream" in match["step"]
        assert match["cause"].strip()
        assert 0.0 <= float(match["wait"]) <= FAST_RETRY_OPTIONS["retry_max_wait"]  # type: ignore[operator]
    assert re.search(r"resuming upload of \S+gpbackup_0_stream at byte [1-9]\d*", site.log_text())


# --- a cut inside every request and every reply ------------------------------------------------


# Cut points a sweep may miss because this run's packets came out shorter than the calibration's.
MAX_MISSED_CUTS = 2


def cut_points(calibration: FaultProxy, direction: Direction) -> list[int]:
    """One byte into each turn ``direction`` took on the calibration run's (only) connection.

    Client->server that loses a request before the server has all of it;
    server->client it loses a reply to a request the server has carried out.
    """
    return [start + 1 for start in calibration.bursts(1, direction)]


@dataclass
class Outcome:
    """One run of a sweep: the proxy it went through and what went wrong (None: nothing)."""

    proxy: FaultProxy
    problem: str | None
    reached: bool = True  # False: the run ended before the cut point (random SSH padding shifts offsets)


def sweep(direction: Direction, run_once: Callable[[int, Plan], Outcome]) -> list[str]:
    """Run once cleanly to learn the turns, then once per cut point (in parallel); return the problems."""
    calibration = run_once(0, Plan.pass_through())
    assert calibration.problem is None, calibration.problem
    points = cut_points(calibration.proxy, direction)
    assert len(points) > 10, points  # handshake, auth, SFTP start and the command's own requests
    with ThreadPoolExecutor(max_workers=SWEEP_WORKERS) as pool:
        outcomes = list(
            pool.map(lambda item: run_once(item[0], Plan.reset(item[1], direction)), enumerate(points, start=1))
        )
    # SSH pads every packet with 4-255 random bytes, so a run can end a little before a
    # cut point learnt from the calibration run; only the last few turns may be missed,
    # so the sweep still fails if resets stop landing.
    missed = [o for o in outcomes if not o.reached]
    problems = [o.problem for o in outcomes if o.problem is not None]
    if len(missed) > MAX_MISSED_CUTS:
        problems.append(f"{len(missed)} of {len(points)} cut points were never reached")
    return problems


def run_through_own_proxy(
    site: Site, plan: Plan, config_for_port: Callable[[int], Path], command: str, *args: str | Path
) -> tuple[FaultProxy, subprocess.CompletedProcess[bytes]]:
    with FaultProxy(site.server.port, plans=(plan,)) as own:
        result = site.run(command, config_for_port(own.port), *args)
    return own, result


def outcome(
    site: Site, proxy: FaultProxy, plan: Plan, result: subprocess.CompletedProcess[bytes], problems: list[str]
) -> Outcome:
    """Add the exit status and whether the fault fired to ``problems``; remote paths shortened for reading."""
    if result.returncode != 0 or result.stderr:
        message = result.stderr.decode(errors="replace").strip().replace(str(site.remote_dir), "<remote_dir>")
        problems.insert(0, f"exit {result.returncode}: {message}")
    reached = True
    if plan.action is not Action.PASS and proxy.triggered != 1:
        if result.returncode == 0:
            # The run ended (its bytes checked above) before the cut point: random SSH padding made
            # it shorter than the calibration run, or the client closed right at the last byte.
            reached = False
        else:
            problems.append("the reset did not happen")
    return Outcome(proxy, f"{plan}: " + "; ".join(problems) if problems else None, reached)


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
def test_backup_file_survives_a_reset_inside_any_request_or_reply(site: Site, direction: Direction) -> None:
    data = os.urandom(SWEEP_FILE_SIZE)
    name = "gpbackup_-1_metadata.sql"
    site.local(name).write_bytes(data)

    def run_once(index: int, plan: Plan) -> Outcome:
        # Every run gets a fresh remote_dir of the same length, so every run sends the same requests.
        remote_dir = site.remote_dir / f"run{index:03d}"
        remote_dir.mkdir()

        def config(port: int) -> Path:
            return site.config(f"run{index:03d}.yaml", port=port, remote_dir=str(remote_dir))

        own, result = run_through_own_proxy(site, plan, config, "backup_file", site.local(name))
        stored = remote_dir / "backups" / TIMESTAMP[:8] / TIMESTAMP / name
        sidecar = stored.with_name(name + ".sha256")
        problems = []
        if not stored.is_file() or sha256(stored.read_bytes()) != sha256(data):
            problems.append("stored bytes differ or are missing")
        elif not sidecar.is_file() or sidecar.read_text() != f"{sha256(data)}  {name}\n":
            problems.append("sidecar missing or wrong")
        leftovers = sorted(p.name for p in remote_dir.rglob(PARTIAL_GLOB))
        if leftovers:
            problems.append(f"leftover temporary files {leftovers}")
        return outcome(site, own, plan, result, problems)

    problems = sweep(direction, run_once)

    assert not problems, "\n".join(problems)
    assert sha256(site.local(name).read_bytes()) == sha256(data)


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
def test_restore_file_survives_a_reset_inside_any_request_or_reply(site: Site, direction: Direction) -> None:
    data = os.urandom(SWEEP_FILE_SIZE)
    name = "gpbackup_-1_metadata.sql"
    site.store_directly(name, data)

    def run_once(index: int, plan: Plan) -> Outcome:
        target_dir = site.root / f"restore{index:03d}" / "backups" / TIMESTAMP[:8] / TIMESTAMP
        target_dir.mkdir(parents=True)

        def config(port: int) -> Path:
            return site.config(f"run{index:03d}.yaml", port=port)

        own, result = run_through_own_proxy(site, plan, config, "restore_file", target_dir / name)
        problems = []
        restored = target_dir / name
        if not restored.is_file() or sha256(restored.read_bytes()) != sha256(data):
            problems.append("restored bytes differ or are missing")
        others = sorted(p.name for p in target_dir.iterdir() if p.name != name)
        if others:
            problems.append(f"leftover local files {others}")
        return outcome(site, own, plan, result, problems)

    problems = sweep(direction, run_once)

    assert not problems, "\n".join(problems)
    assert sha256(site.remote(name).read_bytes()) == sha256(data)
