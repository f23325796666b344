"""Reliability: the installed plugin against a real sshd, through a proxy that breaks connections on purpose.

Every test runs the console script as gpbackup would (a subprocess with its
own HOME and no ssh-agent) and checks the bytes end to end with SHA-256. The
faults come from `devtools.faultproxy`: TCP resets at chosen byte offsets in
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

from devtools.faultproxy import Action, Direction, FaultProxy, Plan
from devtools.gpbackup import LocalBackup, make_local_backup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig, assert_failed, assert_ok
from devtools.sshd import SshServer, keygen
from sftp_plugin.transfer import LOCAL_CHUNK
from tests.helpers import sha256, sshd_fixture, upload_leftovers, wait_until

KIB = 1024
MIB = 1024 * KIB
# Big enough that the resume buffer (2 MiB below) is filled and trimmed several
# times, and that a reset lands with many writes or reads in flight.
STREAM_SIZE = 8 * MIB
STREAM = "gpbackup_0_stream"
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
# a clean 8 MiB download sends 5 068 bytes
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
# The stream sweep's: one full chunk read from stdin (which makes the upload ask the server's limits
# before writing it: a request a reset may fall in) and a short one behind it.
SWEEP_STREAM_SIZE = LOCAL_CHUNK + SWEEP_FILE_SIZE
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


# One real OpenSSH server for this module; each test keeps to a remote_dir of its own.
backup_host = sshd_fixture("reliability_sshd", scope="module")


@pytest.fixture
def proxy(backup_host: SshServer) -> Iterator[FaultProxy]:
    with FaultProxy(backup_host.port) as running:
        yield running


def through(server: SshServer, port: int, root: Path, label: str) -> SiteConfig:
    """A test's configs for `server` reached at `port` (a proxy's): the host key pinned by its fingerprint
    (known_hosts is per port), failures cheap."""
    return SiteConfig.create(server, root, label, port=port, host_key_fingerprint=server.host_fingerprint,
                             **FAST_RETRY_OPTIONS)


@pytest.fixture
def config(backup_host: SshServer, proxy: FaultProxy, tmp_path: Path, request: pytest.FixtureRequest) -> SiteConfig:
    """This test's configs, through the proxy unless `direct`; its own remote_dir on the module's server."""
    return through(backup_host, proxy.port, tmp_path, request.node.name)


def direct(config: SiteConfig, **overrides: object) -> Path:
    """A config of this test's site that reaches the server without the proxy."""
    return config.write("direct.yaml", port=config.server.port, **overrides)


def store_directly(plugin: Plugin, config: SiteConfig, backup: LocalBackup, name: str, data: bytes) -> Path:
    """Back ``data`` up under ``name`` without the proxy; return the stored file."""
    assert_ok(plugin.run("backup_data", direct(config), backup.file(name), stdin=data))
    stored = backup.remote(config.remote_dir, name)
    assert sha256(stored.read_bytes()) == sha256(data)
    return stored


def leftovers(config: SiteConfig) -> list[Path]:
    """Temporary upload files anywhere under this test's remote_dir."""
    return upload_leftovers(config.remote_dir)


def assert_stored(config: SiteConfig, backup: LocalBackup, name: str, data: bytes) -> None:
    """``name`` holds exactly ``data``, its sidecar holds the matching checksum, and no temporary file remains."""
    stored = backup.remote(config.remote_dir, name)
    assert stored.is_file(), f"{stored} was not stored"
    assert sha256(stored.read_bytes()) == sha256(data), f"{stored} differs from what was backed up"
    sidecar = stored.with_name(name + ".sha256")
    assert sidecar.read_text() == f"{sha256(data)}  {name}\n"
    assert leftovers(config) == []


def retry_lines(config: SiteConfig) -> list[re.Match[str]]:
    return [m for m in map(RETRY_LINE_RE.search, config.log_text().splitlines()) if m]


# --- resets during streams ---------------------------------------------------------------


@pytest.mark.parametrize(("direction", "offset"), fault_cases(bulk=C2S))
def test_backup_data_survives_a_reset_mid_stream(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy, direction: Direction, offset: int
) -> None:
    data = os.urandom(STREAM_SIZE)
    proxy.push(Plan.reset(offset, direction))

    assert_ok(plugin.run("backup_data", config.path, backup.file(STREAM), stdin=data))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert_stored(config, backup, STREAM, data)


@pytest.mark.parametrize(("direction", "offset"), fault_cases(bulk=S2C))
def test_restore_data_survives_a_reset_mid_stream(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy, direction: Direction, offset: int
) -> None:
    data = os.urandom(STREAM_SIZE)
    store_directly(plugin, config, backup, STREAM, data)
    proxy.push(Plan.reset(offset, direction))

    result = assert_ok(plugin.run("restore_data", config.path, backup.file(STREAM)))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert len(result.stdout) == len(data)
    assert sha256(result.stdout) == sha256(data)


def test_backup_data_succeeds_after_several_failures_in_a_row(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(STREAM_SIZE)
    proxy.push(Plan.reset(1 * MIB, C2S), Plan.reset(HANDSHAKE_OFFSET, S2C), Plan.reset(3 * MIB, C2S))

    assert_ok(plugin.run("backup_data", config.write(retries=6), backup.file(STREAM), stdin=data))

    assert proxy.triggered == 3
    assert proxy.accepted == 4
    assert_stored(config, backup, STREAM, data)


def test_restore_data_succeeds_after_several_failures_in_a_row(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(STREAM_SIZE)
    store_directly(plugin, config, backup, STREAM, data)
    proxy.push(Plan.reset(1 * MIB, S2C), Plan.reset(HANDSHAKE_OFFSET, S2C), Plan.reset(3 * MIB, S2C))

    result = assert_ok(plugin.run("restore_data", config.write(retries=6), backup.file(STREAM)))

    assert proxy.triggered == 3
    assert proxy.accepted == 4
    assert sha256(result.stdout) == sha256(data)


# --- connection set-up failures ----------------------------------------------------------


def test_reset_inside_the_ssh_handshake_is_retried(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(256 * KIB)
    backup.file("gpbackup_-1_metadata.sql").write_bytes(data)
    proxy.push(Plan.reset(HANDSHAKE_OFFSET, S2C))

    assert_ok(plugin.run("backup_file", config.path, backup.file("gpbackup_-1_metadata.sql")))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert_stored(config, backup, "gpbackup_-1_metadata.sql", data)
    assert sha256(backup.file("gpbackup_-1_metadata.sql").read_bytes()) == sha256(data)  # local file left alone
    # Handled: whatever paramiko reports of the reset (a socket exception, an EOF, as it falls), nothing is an
    # ERROR and no traceback is logged; our own line says the attempt failed.
    log = config.log_text()
    assert "WARNING backup_file: upload" in log and "attempt 1 failed" in log
    assert " ERROR " not in log and "Traceback" not in log


def test_backup_file_succeeds_after_refused_connections(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(256 * KIB)
    backup.file("gpbackup_-1_toc.yaml").write_bytes(data)
    proxy.push(Plan.refuse(), Plan.refuse())

    assert_ok(plugin.run("backup_file", config.path, backup.file("gpbackup_-1_toc.yaml")))

    assert proxy.triggered == 2
    assert proxy.accepted == 3
    assert_stored(config, backup, "gpbackup_-1_toc.yaml", data)


def test_backup_file_gives_up_after_the_configured_attempts_with_one_line(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(64 * KIB)
    backup.file("gpbackup_-1_toc.yaml").write_bytes(data)
    proxy.push(*[Plan.refuse()] * 10)

    line = assert_failed(plugin.run("backup_file", config.write(retries=2), backup.file("gpbackup_-1_toc.yaml")))

    assert re.search(r"\b2 attempts\b", line), line
    assert proxy.accepted == 2
    assert not backup.remote(config.remote_dir, "gpbackup_-1_toc.yaml").exists()
    assert leftovers(config) == []
    assert sha256(backup.file("gpbackup_-1_toc.yaml").read_bytes()) == sha256(data)


def test_authentication_failure_is_not_retried(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(64 * KIB)
    backup.file("gpbackup_-1_toc.yaml").write_bytes(data)
    stranger = keygen(tmp_path / "not_authorized_key")

    line = assert_failed(plugin.run("backup_file", config.write(retries=6, identity_file=str(stranger)),
                                    backup.file("gpbackup_-1_toc.yaml")))

    assert "authentication" in line.lower(), line
    assert proxy.accepted == 1
    assert not backup.remote(config.remote_dir, "gpbackup_-1_toc.yaml").exists()
    assert sha256(backup.file("gpbackup_-1_toc.yaml").read_bytes()) == sha256(data)
    assert retry_lines(config) == []


# --- stalls --------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
def test_stalled_upload_times_out_and_resumes_on_a_new_connection(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy, direction: Direction
) -> None:
    data = os.urandom(STREAM_SIZE)
    # Mid-stream: 2 MiB of data client->server, or ~half the acknowledgements server->client.
    proxy.push(Plan.stall(2 * MIB if direction is C2S else UPLOAD_THIN_OFFSETS[1], direction))

    assert_ok(plugin.run("backup_data", config.write(io_timeout=2), backup.file(STREAM), stdin=data))

    assert proxy.triggered == 1
    assert proxy.accepted == 2
    assert_stored(config, backup, STREAM, data)


def test_stalled_download_times_out_and_resumes_on_a_new_connection(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(STREAM_SIZE)
    store_directly(plugin, config, backup, STREAM, data)
    proxy.push(Plan.stall(2 * MIB, S2C))

    result = assert_ok(plugin.run("restore_data", config.write(io_timeout=2), backup.file(STREAM)))

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


def test_sigint_ends_an_upload_to_a_stalled_host_at_once_and_stores_nothing(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    # Mid-stream, so the plugin is blocked sending: possibly halfway through an SSH packet.
    proxy.push(Plan.stall(2 * MIB, C2S))
    cfg = config.write(io_timeout=PATIENT_IO_TIMEOUT, fork_server="no")
    name = STREAM
    process = plugin.popen("backup_data", cfg, backup.file(name), stdin=subprocess.PIPE)
    # The feeder alone writes stdin: communicate() would wait for it, blocked, to let go.
    stdin, process.stdin = process.stdin, None
    feeder = threading.Thread(target=lambda: _feed(stdin, os.urandom(STREAM_SIZE)), daemon=True)
    feeder.start()
    assert wait_until(lambda: proxy.triggered == 1), "the stall never happened"

    err = interrupt(process)
    feeder.join(RUN_TIMEOUT)

    assert process.returncode == 130, err
    assert err.decode().strip().endswith("backup_data: interrupted") and err.count(b"\n") == 1, err
    assert not backup.remote(config.remote_dir, name).exists()
    assert not backup.remote(config.remote_dir, name + ".sha256").exists()


def test_sigint_ends_a_download_from_a_stalled_host_at_once(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    store_directly(plugin, config, backup, STREAM, os.urandom(STREAM_SIZE))
    proxy.push(Plan.stall(2 * MIB, S2C))
    cfg = config.write(io_timeout=PATIENT_IO_TIMEOUT, fork_server="no")
    process = plugin.popen("restore_data", cfg, backup.file(STREAM))
    assert wait_until(lambda: proxy.triggered == 1), "the stall never happened"

    err = interrupt(process)

    assert process.returncode == 130, err
    assert err.decode().strip().endswith("restore_data: interrupted") and err.count(b"\n") == 1, err


# --- many processes at once ----------------------------------------------------------------


# An sshd of its own with OpenSSH's default MaxStartups 10:30:100 (drops handshakes beyond 10 pending).
default_maxstartups_host = sshd_fixture("maxstartups_sshd", max_startups="10:30:100")


def test_many_concurrent_backup_file_calls_all_store_their_bytes(
    plugin: Plugin, backup: LocalBackup, default_maxstartups_host: SshServer, tmp_path: Path
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
        config = through(server, gate.port, tmp_path, "concurrent")
        # connect_timeout covers the wait at the gate (for the banner); retries cover sshd's drops.
        cfg = config.write(retries=10, retry_max_wait=2, connect_timeout=GATE_TIMEOUT + 10)
        for number in range(CONCURRENT_CALLS):
            name = f"gpbackup_{number}_{backup.timestamp}_toc.yaml"
            files[name] = os.urandom(secrets.randbelow(256 * KIB) + 1)
            backup.file(name).write_bytes(files[name])

        processes = {name: plugin.popen("backup_file", cfg, backup.file(name)) for name in files}
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
        assert_stored(config, backup, name, data)
    assert "past MaxStartups" in server.log_path.read_text(errors="replace"), "sshd never throttled"


# --- a killed upload -----------------------------------------------------------------------


def test_killed_backup_data_leaves_nothing_under_the_final_name_and_cleanup_removes_the_leftover(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup
) -> None:
    data = os.urandom(STREAM_SIZE)
    cfg = direct(config)
    name = STREAM
    process = plugin.popen("backup_data", cfg, backup.file(name), stdin=subprocess.PIPE)
    assert process.stdin is not None
    # Feed half the stream and keep the pipe open, so the plugin is mid-upload when killed.
    feeder = threading.Thread(target=lambda: _feed(process.stdin, data[: STREAM_SIZE // 2]), daemon=True)
    feeder.start()
    try:
        deadline = time.monotonic() + PARTIAL_APPEAR_TIMEOUT
        while not leftovers(config) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert leftovers(config), f"no temporary file appeared (plugin exit {process.poll()})"
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=RUN_TIMEOUT)
        feeder.join(RUN_TIMEOUT)
    assert process.returncode == -signal.SIGKILL

    assert not backup.remote(config.remote_dir, name).exists()
    assert not backup.remote(config.remote_dir, name + ".sha256").exists()
    # The checksum files' temporary twins hold nothing before the stream ends: the sidecar's, opened with the
    # stream's, and the block digests', opened once the stream passed its first block (if it got that far).
    sidecar_temps = [path for path in leftovers(config) if path.name.startswith(f".{name}.sha256.")]
    blocks_temps = [path for path in leftovers(config) if path.name.startswith(f".{name}.sha256blocks.")]
    assert [path.stat().st_size for path in sidecar_temps] == [0]
    assert [path.stat().st_size for path in blocks_temps] in ([], [0])
    (partial,) = [path for path in leftovers(config) if path not in sidecar_temps + blocks_temps]
    kept = partial.read_bytes()
    assert sha256(kept) == sha256(data[: len(kept)])  # what reached the host is a true prefix of the stream

    assert_ok(plugin.run("cleanup_plugin_for_backup", cfg, backup.path, "coordinator", CONTENT_ID))
    assert leftovers(config) == []
    assert not backup.remote(config.remote_dir, name).exists()

    # The same key can then be backed up whole.
    assert_ok(plugin.run("backup_data", cfg, backup.file(name), stdin=data))
    assert_stored(config, backup, name, data)


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


def test_corrupted_byte_fails_restore_data_naming_the_file(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup
) -> None:
    data = os.urandom(1 * MIB)
    name = STREAM
    damaged = corrupt_one_byte(store_directly(plugin, config, backup, name, data))
    assert sha256(damaged) != sha256(data)

    line = assert_failed(plugin.run("restore_data", direct(config), backup.file(name)))

    assert name in line and "checksum" in line.lower(), line


def test_corrupted_byte_fails_restore_file_and_leaves_no_local_file(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path
) -> None:
    data = os.urandom(1 * MIB)
    name = "gpbackup_-1_metadata.sql"
    corrupt_one_byte(store_directly(plugin, config, backup, name, data))
    restore_dir = make_local_backup(tmp_path / "restore", backup.timestamp).path

    line = assert_failed(plugin.run("restore_file", direct(config), restore_dir / name))

    assert name in line and "checksum" in line.lower(), line
    assert list(restore_dir.iterdir()) == []  # neither the final name nor a temporary file


def test_corrupted_file_restores_when_verify_checksums_is_off(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path
) -> None:
    data = os.urandom(1 * MIB)
    name = "gpbackup_-1_metadata.sql"
    damaged = corrupt_one_byte(store_directly(plugin, config, backup, name, data))
    cfg = direct(config, verify_checksums=False)
    restore_dir = make_local_backup(tmp_path / "restore", backup.timestamp).path

    streamed = assert_ok(plugin.run("restore_data", cfg, backup.file(name))).stdout
    assert_ok(plugin.run("restore_file", cfg, restore_dir / name))

    assert sha256(streamed) == sha256(damaged) != sha256(data)
    assert sha256((restore_dir / name).read_bytes()) == sha256(damaged)


# A link that resets every connection after this much client->server: less than the writes an upload keeps
# in flight (transfer.WRITE_IN_FLIGHT_BYTES, 4 MiB), so only acknowledgements taken as they arrive make progress.
# Each connection sends again what the last one had sent unacknowledged (up to sshd's 2 MiB window and the
# replies not yet read): 0.6-1.4 MiB of progress per connection measured, 4-6 connections for STREAM_SIZE.
FLAKY_LINK_RESET = 7 * MIB // 2
# Connections the proxy resets: more than STREAM_SIZE needs (the rest are never made).
FLAKY_LINK_RESETS = 20
# Fewer attempts than resets: only attempts in a row that get no further are counted.
FLAKY_LINK_RETRIES = 2


def test_an_upload_gets_through_a_link_that_resets_every_few_mebibytes(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(STREAM_SIZE)
    proxy.push(*(Plan.reset(FLAKY_LINK_RESET, C2S) for _ in range(FLAKY_LINK_RESETS)))
    # A resume buffer larger than the stream: no drain when it fills makes the upload wait for acknowledgements.
    cfg = config.write("flaky.yaml", retries=FLAKY_LINK_RETRIES, resume_buffer=2 * STREAM_SIZE // MIB)

    assert_ok(plugin.run("backup_data", cfg, backup.file(STREAM), stdin=data))

    assert_stored(config, backup, STREAM, data)
    resumed_at = [int(n) for n in re.findall(r"resuming upload of \S+ at byte (\d+)", config.log_text())]
    assert len(resumed_at) == proxy.triggered >= FLAKY_LINK_RETRIES
    assert resumed_at == sorted(set(resumed_at)) and resumed_at[0] > 0  # every connection took it further
    # Every reset was handled: paramiko's "Socket exception" lines for them are warnings, nothing is an ERROR.
    assert " ERROR " not in config.log_text()


def test_a_download_gets_through_a_link_that_resets_every_few_mebibytes(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(STREAM_SIZE)
    store_directly(plugin, config, backup, STREAM, data)
    proxy.push(*(Plan.reset(FLAKY_LINK_RESET, S2C) for _ in range(FLAKY_LINK_RESETS)))

    result = assert_ok(plugin.run("restore_data", config.write("flaky.yaml", retries=FLAKY_LINK_RETRIES),
                                  backup.file(STREAM)))

    assert sha256(result.stdout) == sha256(data)
    # As many resets as attempts allowed, and still through: each connection got further.
    assert proxy.triggered >= FLAKY_LINK_RETRIES


# --- what the log says ------------------------------------------------------------------------


def test_retries_are_logged_with_attempt_cause_and_wait(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, proxy: FaultProxy
) -> None:
    data = os.urandom(STREAM_SIZE)
    # The first cut comes after the first 2 MiB (one resume buffer) was acknowledged, so the upload resumes
    # past byte 0; the second cuts the next connection in its handshake, before it can get any further, so
    # it is the second attempt (one that got further would start the count again).
    proxy.push(Plan.reset(3 * MIB, C2S), Plan.reset(HANDSHAKE_OFFSET, C2S))

    assert_ok(plugin.run("backup_data", config.path, backup.file(STREAM), stdin=data))

    assert proxy.triggered == 2
    assert_stored(config, backup, STREAM, data)
    lines = [m for m in retry_lines(config) if m["step"].startswith("upload ")]
    assert [int(m["attempt"]) for m in lines] == [1, 2], config.log_text()
    for match in lines:
        assert match["command"] == "backup_data"
        assert STREAM in match["step"]
        assert match["cause"].strip()
        assert 0.0 <= float(match["wait"]) <= FAST_RETRY_OPTIONS["retry_max_wait"]  # type: ignore[operator]
    assert re.search(r"resuming upload of \S+gpbackup_0_stream at byte [1-9]\d*", config.log_text())


# --- a cut inside every request and every reply ------------------------------------------------


# Cut points a sweep may miss because this run's packets came out shorter than the calibration's:
# at least this many, and a fifth of them where a stream's window adjustments (sshd's timing) vary.
MAX_MISSED_CUTS = 2
MISSABLE_CUTS_ONE_IN = 5


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
    # Handshake, auth and SFTP start, then the command's own requests: a small restore has only two.
    assert len(points) > 8, points
    with ThreadPoolExecutor(max_workers=SWEEP_WORKERS) as pool:
        outcomes = list(
            pool.map(lambda item: run_once(item[0], Plan.reset(item[1], direction)), enumerate(points, start=1))
        )
    # SSH pads every packet with 4-255 random bytes, so a run can end a little before a
    # cut point learnt from the calibration run; only the last few turns may be missed,
    # so the sweep still fails if resets stop landing.
    missed = [o for o in outcomes if not o.reached]
    problems = [o.problem for o in outcomes if o.problem is not None]
    if len(missed) > max(MAX_MISSED_CUTS, len(points) // MISSABLE_CUTS_ONE_IN):
        problems.append(f"{len(missed)} of {len(points)} cut points were never reached")
    return problems


def run_through_own_proxy(
    plugin: Plugin, server: SshServer, plan: Plan, config_for_port: Callable[[int], Path], command: str,
    *args: str | Path, stdin: bytes = b""
) -> tuple[FaultProxy, subprocess.CompletedProcess[bytes]]:
    with FaultProxy(server.port, plans=(plan,)) as own:
        result = plugin.run(command, config_for_port(own.port), *args, stdin=stdin)
    return own, result


def back_up_in_own_run(
    plugin: Plugin, config: SiteConfig, command: str, local: Path, index: int, plan: Plan,
    prepare: Callable[[Path], None] | None = None, stdin: bytes = b"",
) -> tuple[FaultProxy, subprocess.CompletedProcess[bytes], Path]:
    """``command`` (backup_file, backup_data) of ``local`` through a proxy of its own into a fresh remote_dir
    (``prepare`` may put things there first), as run ``index`` of a sweep: every run's remote_dir has the same
    length, so every run sends the same requests. The proxy, the result and that remote_dir."""
    remote_dir = config.remote_dir / f"run{index:03d}"
    remote_dir.mkdir()
    if prepare is not None:
        prepare(remote_dir)

    def config_for(port: int) -> Path:
        return config.write(f"run{index:03d}.yaml", port=port, remote_dir=str(remote_dir))

    own, result = run_through_own_proxy(plugin, config.server, plan, config_for, command, local, stdin=stdin)
    return own, result, remote_dir


def outcome(
    config: SiteConfig, proxy: FaultProxy, plan: Plan, result: subprocess.CompletedProcess[bytes], problems: list[str]
) -> Outcome:
    """Add the exit status and whether the fault fired to ``problems``; remote paths shortened for reading."""
    if result.returncode != 0 or result.stderr:
        message = result.stderr.decode(errors="replace").strip().replace(str(config.remote_dir), "<remote_dir>")
        problems.insert(0, f"exit {result.returncode}: {message}")
    reached = True
    if plan.action is not Action.PASS and proxy.triggered != 1:
        if result.returncode == 0 and proxy.forwarded(1).get(plan.direction.value, 0) <= plan.after:
            # The run ended (its bytes checked above) before the cut point: random SSH padding, or fewer
            # window adjustments from sshd, made it shorter than the calibration run, or the client
            # closed right at the last byte.
            reached = False
        else:
            problems.append("the reset did not happen")
    return Outcome(proxy, f"{plan}: " + "; ".join(problems) if problems else None, reached)


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
@pytest.mark.parametrize(("command", "name", "size"), [
    ("backup_file", "gpbackup_-1_metadata.sql", SWEEP_FILE_SIZE),
    ("backup_data", STREAM, SWEEP_STREAM_SIZE),
], ids=["backup_file", "backup_data"])
def test_a_backup_survives_a_reset_inside_any_request_or_reply(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, direction: Direction, command: str, name: str, size: int
) -> None:
    data = os.urandom(size)
    stdin = data if command == "backup_data" else b""
    if not stdin:
        backup.file(name).write_bytes(data)

    def run_once(index: int, plan: Plan) -> Outcome:
        own, result, remote_dir = back_up_in_own_run(plugin, config, command, backup.file(name), index, plan,
                                                     stdin=stdin)
        stored = backup.remote(remote_dir, name)
        sidecar = stored.with_name(name + ".sha256")
        problems = []
        if not stored.is_file() or sha256(stored.read_bytes()) != sha256(data):
            problems.append("stored bytes differ or are missing")
        elif not sidecar.is_file() or sidecar.read_text() != f"{sha256(data)}  {name}\n":
            problems.append("sidecar missing or wrong")
        left = [p.name for p in upload_leftovers(remote_dir)]
        if left:
            problems.append(f"leftover temporary files {left}")
        return outcome(config, own, plan, result, problems)

    problems = sweep(direction, run_once)

    assert not problems, "\n".join(problems)
    if not stdin:
        assert sha256(backup.file(name).read_bytes()) == sha256(data)


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
def test_a_file_whose_checksum_cannot_be_put_in_place_is_never_left_under_its_name_wherever_a_reset_falls(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, direction: Direction
) -> None:
    # The checksum file's rename fails on every attempt (a non-empty directory holds its name), the
    # stream's rename behind it succeeds and must be undone: also when a reset loses the reply to the
    # renames or the undo, and the retry finds the stream already in place.
    data = os.urandom(SWEEP_FILE_SIZE)
    name = "gpbackup_-1_metadata.sql"
    backup.file(name).write_bytes(data)

    def hold_the_checksum_name(remote_dir: Path) -> None:
        (backup.remote(remote_dir, name + ".sha256") / "in the way").mkdir(parents=True)

    def run_once(index: int, plan: Plan) -> Outcome:
        own, result, remote_dir = back_up_in_own_run(plugin, config, "backup_file", backup.file(name), index, plan,
                                                         prepare=hold_the_checksum_name)
        stored = backup.remote(remote_dir, name)
        problems = []
        stderr = result.stderr.decode(errors="replace")
        if result.returncode == 0:
            problems.append("the call succeeded")
        elif stderr.count("\n") != 1 or "Traceback" in stderr:
            problems.append(f"not one line on stderr: {stderr!r}")
        if stored.exists():
            problems.append("the file is under its final name without its checksum file")
        # Temporary names may stay where the reset falls in the removal of them (cleanup removes those).
        others = sorted(p.name for p in stored.parent.iterdir()
                        if p.name != stored.name + ".sha256" and not p.match(PARTIAL_GLOB))
        if others:
            problems.append(f"unexpected files {others}")
        reached = plan.action is Action.PASS or own.triggered == 1
        return Outcome(own, f"{plan}: " + "; ".join(problems) if problems else None, reached)

    problems = sweep(direction, run_once)

    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("direction", [C2S, S2C], ids=lambda d: d.value)
def test_restore_file_survives_a_reset_inside_any_request_or_reply(
    plugin: Plugin, config: SiteConfig, backup: LocalBackup, direction: Direction, tmp_path: Path
) -> None:
    data = os.urandom(SWEEP_FILE_SIZE)
    name = "gpbackup_-1_metadata.sql"
    store_directly(plugin, config, backup, name, data)

    def run_once(index: int, plan: Plan) -> Outcome:
        target_dir = make_local_backup(tmp_path / f"restore{index:03d}", backup.timestamp).path

        def config_for(port: int) -> Path:
            return config.write(f"run{index:03d}.yaml", port=port)

        own, result = run_through_own_proxy(plugin, config.server, plan, config_for, "restore_file", target_dir / name)
        problems = []
        restored = target_dir / name
        if not restored.is_file() or sha256(restored.read_bytes()) != sha256(data):
            problems.append("restored bytes differ or are missing")
        others = sorted(p.name for p in target_dir.iterdir() if p.name != name)
        if others:
            problems.append(f"leftover local files {others}")
        return outcome(config, own, plan, result, problems)

    problems = sweep(direction, run_once)

    assert not problems, "\n".join(problems)
    assert sha256(backup.remote(config.remote_dir, name).read_bytes()) == sha256(data)
    # Every reset was handled: paramiko's reports of them (a reset banner: "Exception (client)" and its
    # traceback) are one warning line each; nothing is an ERROR.
    log = config.log_text()
    assert " ERROR " not in log and "Traceback" not in log, log
