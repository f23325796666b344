"""What a restore delivers when the stored bytes are damaged, when its reader stops early, and what a
backup commits when the process that started it is gone: the installed plugin against a real sshd."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig, assert_failed, assert_ok, socket_dir_env
from devtools.sshd import SshServer
from sftp_plugin import blocks, container
from sftp_plugin.store import WHOLE_READ_LIMIT as WHOLE
from sftp_plugin.transfer import HEAD_FIRST_READ
from tests.helpers import alive, flip, start_under_a_parent, wait_until, write_offsets

MIB = 1024 * 1024
BLOCK = blocks.BLOCK_SIZE


def stored(plugin: Plugin, config: SiteConfig, backup: LocalBackup, data: bytes,
           name: str | None = None) -> tuple[Path, Path]:
    """Back ``data`` up as gpbackup_helper would; the key and the stored file on the (local) server."""
    name = name or f"gpbackup_0_{backup.timestamp}"
    key = backup.file(name)
    plugin.ok("backup_data", config.path, key, stdin=data)
    return key, backup.remote(config.remote_dir, name)


# ---------------------------------------------------------------- verified before delivered


def test_a_stream_longer_than_a_block_is_stored_with_its_block_digests(plugin: Plugin, config: SiteConfig,
                                                                       backup: LocalBackup) -> None:
    data = os.urandom(2 * BLOCK + 10)
    _, path = stored(plugin, config, backup, data)
    header = blocks.parse_header(Path(blocks.blocks_path(str(path))).read_bytes())
    assert (header.size, header.whole) == (len(data), hashlib.sha256(data).digest())
    assert Path(blocks.blocks_path(str(path))).stat().st_size == header.file_size == 64 + 3 * 32
    # The sidecar stays what sha256sum -c checks on the backup host.
    checked = subprocess.run(["sha256sum", "-c", path.name + ".sha256"], cwd=path.parent, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_stream_of_one_block_has_only_its_sidecar(plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    _, path = stored(plugin, config, backup, os.urandom(BLOCK))
    assert Path(str(path) + ".sha256").exists() and not Path(blocks.blocks_path(str(path))).exists()


def test_a_changed_byte_stops_restore_data_before_the_block_that_holds_it(plugin: Plugin, config: SiteConfig,
                                                                          backup: LocalBackup) -> None:
    data = os.urandom(3 * BLOCK + BLOCK // 2)
    key, path = stored(plugin, config, backup, data)
    flip(path, 2 * BLOCK + 12345)

    result = plugin.run("restore_data", config.path, key)

    assert result.stdout == data[: 2 * BLOCK]  # the two good blocks, not one byte of the damaged one
    line = assert_failed(result)
    assert path.name in line and f"offset {2 * BLOCK}" in line and "checksum" in line, line


def test_a_changed_byte_in_a_small_file_delivers_nothing(plugin: Plugin, config: SiteConfig,
                                                         backup: LocalBackup) -> None:
    data = os.urandom(200_000)
    key, path = stored(plugin, config, backup, data)
    flip(path, 199_999)

    result = plugin.run("restore_data", config.path, key)

    assert result.stdout == b""
    assert path.name in assert_failed(result)


@pytest.mark.parametrize("size", [0, 1, WHOLE - 1, WHOLE, WHOLE + 1])
def test_files_around_the_whole_read_limit_restore_byte_exact_and_damaged_deliver_nothing(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    key, path = stored(plugin, config, backup, data)
    assert plugin.ok("restore_data", config.path, key).stdout == data
    ranges = [(size // 2, size), (0, size // 3)]
    assert plugin.ok("restore_data_subset", config.path, key, write_offsets(tmp_path, ranges)).stdout == (
        data[size // 2 :] + data[: size // 3])
    if size:
        flip(path, min(size, BLOCK) - 1)  # the last byte of the first block: nothing is delivered before it
        result = plugin.run("restore_data", config.path, key)
        assert result.stdout == b""
        assert path.name in assert_failed(result)


# Where Debian's openssh-sftp-server (a dependency of openssh-server) puts the program.
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


@dataclass
class LoggedServer:
    """An sshd whose sftp-server logs every CLOSE with the bytes read through that handle."""

    server: SshServer
    log: Path

    def store(self, plugin: Plugin, backup: LocalBackup, tmp_path: Path, data: bytes) -> tuple[Path, Path, Path]:
        """backup_data of ``data`` through this server: the config, the key gpbackup passes, the stored file."""
        cfg = self.server.write_config(tmp_path / "logged.yaml", log_dir=str(tmp_path / "logs"))
        name = f"gpbackup_0_{backup.timestamp}"
        plugin.ok("backup_data", cfg, backup.file(name), stdin=data)
        return cfg, backup.file(name), backup.remote(self.server.remote_dir, name)

    def logged_since(self, since: int) -> str:
        """What the log gained after it held ``since`` bytes (sliced as bytes: its lines end with \r\n)."""
        return self.log.read_bytes()[since:].decode()

    def opens_of(self, path: Path, since: int) -> int:
        """How many times ``path`` was opened for reading after the log held ``since`` bytes."""
        return len(re.findall(rf'open "{re.escape(str(path))}" flags READ', self.logged_since(since)))

    def reads_of(self, path: Path, since: int) -> list[int]:
        """The bytes read through each handle of ``path`` closed after the log held ``since`` bytes."""
        closes = re.findall(rf'close "{re.escape(str(path))}" bytes read (\d+)', self.logged_since(since))
        return [int(n) for n in closes]


@pytest.fixture
def sftp_logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    """A LoggedServer: its sftp-server logs to a file of its own (internal-sftp logs only to syslog), every
    CLOSE as "close "<path>" bytes read N written M" (at INFO)."""
    if not SFTP_SERVER.exists():
        pytest.skip(f"no {SFTP_SERVER}")
    workdir = tmp_path_factory.mktemp("sshd_sftp_logged")
    log = workdir / "sftp-server.log"
    with SshServer(workdir, extra_config=f"ForceCommand {SFTP_SERVER} -e -l INFO 2>>{log}\n") as server:
        yield LoggedServer(server, log)


# An LD_PRELOAD shim for sftp-server: a read() of a regular file returns at most SHORT_READ_BYTES, as SFTP
# allows a server to (OpenSSH's never does), so every READ of more gets a short DATA reply.
SHORT_READ_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real_read)(int, void *, size_t);
    struct stat st;
    const char *cap = getenv("SHORT_READ_BYTES");
    if (!real_read) real_read = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    if (cap && count > (size_t)atol(cap) && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) count = (size_t)atol(cap);
    return real_read(fd, buf, count);
}
"""
SHORT_READ_BYTES = 100_000


@pytest.fixture
def sftp_short_reads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    """A LoggedServer whose sftp-server returns at most SHORT_READ_BYTES per READ."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not SFTP_SERVER.exists() or compiler is None:
        pytest.skip(f"no {SFTP_SERVER} or no C compiler")
    workdir = tmp_path_factory.mktemp("sshd_short_reads")
    (workdir / "shim.c").write_text(SHORT_READ_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(workdir / "shim.so"), str(workdir / "shim.c"), "-ldl"],
                   check=True, capture_output=True)
    log = workdir / "sftp-server.log"
    command = f"env LD_PRELOAD={workdir / 'shim.so'} SHORT_READ_BYTES={SHORT_READ_BYTES} {SFTP_SERVER} -e -l INFO"
    with SshServer(workdir, extra_config=f"ForceCommand {command} 2>>{log}\n") as server:
        yield LoggedServer(server, log)


def test_a_restore_from_a_server_that_returns_less_than_each_read_asks_delivers_every_byte(
        plugin: Plugin, sftp_short_reads: LoggedServer, backup: LocalBackup, tmp_path: Path) -> None:
    # The first MiB read again the plain way, then the rest, whose CLOSE went out behind its READs: the first
    # short reply means a new handle for what is left, read request by request.
    data = os.urandom(2 * BLOCK + 10)
    cfg, key, path = sftp_short_reads.store(plugin, backup, tmp_path, data)
    since = sftp_short_reads.log.stat().st_size

    assert plugin.ok("restore_data", cfg, key).stdout == data

    assert sftp_short_reads.opens_of(path, since) == 4  # read_head, its plain reread, the rest, and again


@pytest.mark.parametrize("size", [1000, 300 * 1024, BLOCK, 2 * BLOCK + 10, WHOLE + 10])
def test_a_restore_reads_each_stored_byte_once(plugin: Plugin, sftp_logged: LoggedServer,
                                               backup: LocalBackup, tmp_path: Path, size: int) -> None:
    # Up to WHOLE: the file whole with its checksum, in two round trips. A longer one's first WHOLE bytes come
    # from that same read; only its last bytes are read twice (to tell a container from a plain file).
    data = os.urandom(size)
    cfg, key, path = sftp_logged.store(plugin, backup, tmp_path, data)
    since = sftp_logged.log.stat().st_size

    assert plugin.ok("restore_data", cfg, key).stdout == data

    closes = sftp_logged.reads_of(path, since)
    assert closes, "sftp-server logged no CLOSE of the stored file"
    assert sum(closes) == size + (container.TRAILER_SIZE if size > WHOLE else 0)


@pytest.mark.parametrize(("size", "digest_opens"), [(1000, 0), (300 * 1024, 0), (BLOCK, 0), (2 * BLOCK + 10, 1)])
def test_a_restore_opens_a_file_once_and_the_digests_file_of_a_longer_one_once(
        plugin: Plugin, sftp_logged: LoggedServer, backup: LocalBackup, tmp_path: Path, size: int,
        digest_opens: int) -> None:
    # Its size (STAT), start, end and checksum in two round trips, one OPEN (a file of one block has no
    # digests file: none is opened); a longer file's digests file is opened with those READs, and its rest,
    # verified block by block, read through the handle kept open.
    data = os.urandom(size)
    cfg, key, path = sftp_logged.store(plugin, backup, tmp_path, data)
    since = sftp_logged.log.stat().st_size

    assert plugin.ok("restore_data", cfg, key).stdout == data

    assert sftp_logged.opens_of(path, since) == 1
    assert sftp_logged.opens_of(Path(blocks.blocks_path(str(path))), since) == digest_opens


def test_a_subset_restore_reads_the_blocks_of_its_ranges_not_the_files_first_mib(
        plugin: Plugin, sftp_logged: LoggedServer, backup: LocalBackup, tmp_path: Path) -> None:
    # What any restore reads first (HEAD_FIRST_READ) and last (the container check), then the one block
    # the range lies in, checked against its digest: not the whole first block a whole restore reads.
    data = os.urandom(3 * BLOCK)
    cfg, key, path = sftp_logged.store(plugin, backup, tmp_path, data)
    since = sftp_logged.log.stat().st_size

    ranges = [(2 * BLOCK + 100, 2 * BLOCK + 5000)]
    assert plugin.ok("restore_data_subset", cfg, key, write_offsets(tmp_path, ranges)).stdout == data[
        2 * BLOCK + 100 : 2 * BLOCK + 5000]

    assert sum(sftp_logged.reads_of(path, since)) == HEAD_FIRST_READ + container.TRAILER_SIZE + BLOCK


def test_a_small_file_without_its_checksum_file_restores_and_the_log_says_so(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    data = os.urandom(5000)
    key, path = stored(plugin, config, backup, data)
    Path(str(path) + ".sha256").unlink()

    assert plugin.ok("restore_data", config.path, key).stdout == data
    assert f"no checksum stored for 127.0.0.1:{path}" in config.log_text()


def test_a_small_file_whose_checksum_file_is_not_sha256sum_output_delivers_nothing(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    key, path = stored(plugin, config, backup, os.urandom(5000))
    Path(str(path) + ".sha256").write_text("not a checksum\n")

    result = plugin.run("restore_data", config.path, key)

    assert result.stdout == b""
    assert "not in sha256sum format" in assert_failed(result)


def test_restore_data_subset_delivers_nothing_of_a_damaged_block_a_range_touches(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    data = os.urandom(4 * BLOCK)
    key, path = stored(plugin, config, backup, data)
    flip(path, 3 * BLOCK + 5)  # outside the second range's bytes, inside its block
    ranges = [(100, 200), (3 * BLOCK + 1000, 3 * BLOCK + 2000)]

    result = plugin.run("restore_data_subset", config.path, key, write_offsets(tmp_path, ranges))

    assert result.stdout == data[100:200]
    assert "checksum" in assert_failed(result)


def test_restore_data_subset_serves_ranges_in_the_order_given_empty_and_overlapping_ones_too(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    data = os.urandom(5 * BLOCK + 77)
    key, _ = stored(plugin, config, backup, data)
    # As gpbackup_helper writes them: in OID order, an empty table as s == e.
    ranges = [(4 * BLOCK - 10, 5 * BLOCK + 77), (0, 10), (BLOCK, BLOCK), (5, 2 * BLOCK + 1), (2 * BLOCK, 2 * BLOCK + 1)]

    out = plugin.ok("restore_data_subset", config.path, key, write_offsets(tmp_path, ranges)).stdout

    assert out == b"".join(data[s:e] for s, e in ranges)


def test_a_truncated_stored_stream_fails_before_any_byte(plugin: Plugin, config: SiteConfig,
                                                          backup: LocalBackup) -> None:
    data = os.urandom(3 * BLOCK)
    key, path = stored(plugin, config, backup, data)
    with open(path, "r+b") as handle:
        handle.truncate(2 * BLOCK + 1)

    result = plugin.run("restore_data", config.path, key)

    assert result.stdout == b""
    line = assert_failed(result)
    assert f"holds {2 * BLOCK + 1} bytes, but {3 * BLOCK} were backed up" in line, line


def test_a_stream_stored_by_an_earlier_release_still_restores_and_the_log_says_it_was_unverified(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    data = os.urandom(2 * BLOCK + 3)
    key, path = stored(plugin, config, backup, data)
    Path(blocks.blocks_path(str(path))).unlink()  # what the previous release stored: the sidecar only

    assert plugin.ok("restore_data", config.path, key).stdout == data
    assert "cannot be verified before delivery" in config.log_text()


def test_restore_file_of_a_damaged_multi_block_file_leaves_no_local_file(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    name = f"gpbackup_{backup.timestamp}_metadata.sql"
    data = os.urandom(2 * BLOCK + 1)
    source = backup.file(name)
    source.write_bytes(data)
    plugin.ok("backup_file", config.path, source)
    flip(backup.remote(config.remote_dir, name), 2 * BLOCK)
    source.unlink()

    assert "checksum" in assert_failed(plugin.run("restore_file", config.path, source))
    assert list(backup.path.iterdir()) == []


# ---------------------------------------------------------------- the reader that stops early


@pytest.mark.parametrize("verify", ["yes", "no"])
def test_a_reader_that_stops_early_ends_restore_data_at_once_without_a_retry_or_a_line(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, verify: str) -> None:
    cfg = config.write("reader.yaml", verify_checksums=verify)
    data = os.urandom(40 * MIB)  # far more than a pipe and the read-ahead hold
    key = backup.file(f"gpbackup_0_{backup.timestamp}")
    plugin.ok("backup_data", cfg, key, stdin=data)

    reader = plugin.popen("restore_data", cfg, key)
    assert reader.stdout is not None and reader.stderr is not None
    assert reader.stdout.read(65536) == data[:65536]
    reader.stdout.close()  # as gpbackup_helper does once it has the last table it needs
    stderr = reader.stderr.read()
    code = reader.wait(timeout=RUN_TIMEOUT)

    assert (code, stderr) == (141, b"")
    log = config.log_text()
    assert "retrying" not in log and "attempt 1 failed" not in log, log[-2000:]
    assert "stopped after" in log and "closed it" in log


# ---------------------------------------------------------------- the writer that dies


def test_end_of_input_after_the_caller_died_commits_nothing(plugin: Plugin, config: SiteConfig,
                                                            backup: LocalBackup, tmp_path: Path) -> None:
    # In a process of its own: no fork server where it looks, and none started (the worker's case is
    # in test_forkserver).
    cfg = config.write("in_process.yaml", fork_server="no")
    name = f"gpbackup_0_{backup.timestamp}"
    parent, pid, feed = start_under_a_parent(plugin, "backup_data", cfg, backup.file(name),
                                             env_extra=socket_dir_env(tmp_path))
    try:
        os.write(feed, os.urandom(32 * 1024))  # a stream under way (within what a pipe holds)
        # The call has started (and noted its parent) once it logs; a parent gone before that is not seen.
        assert wait_until(lambda: "start" in config.log_text())
        parent.kill()  # gpbackup_helper going down on SIGUSR1 ...
        parent.wait(timeout=RUN_TIMEOUT)
    finally:
        os.close(feed)  # ... which closes our stdin: an end of input like any other

    assert wait_until(lambda: not alive(pid), timeout=RUN_TIMEOUT)
    assert "is gone" in config.log_text() and "fork server worker" not in config.log_text()
    directory = backup.remote(config.remote_dir)
    assert not (directory / name).exists() and not (directory / f"{name}.sha256").exists()
    assert [p.name for p in directory.iterdir()] == [] if directory.is_dir() else True


def test_a_call_whose_parent_stays_commits_as_before(plugin: Plugin, config: SiteConfig,
                                                     backup: LocalBackup) -> None:
    cfg = config.write("in_process.yaml", fork_server="no")
    name = f"gpbackup_0_{backup.timestamp}"
    data = os.urandom(300_000)
    parent, pid, feed = start_under_a_parent(plugin, "backup_data", cfg, backup.file(name))
    os.write(feed, data)
    os.close(feed)
    assert parent.wait(timeout=RUN_TIMEOUT) == 0
    assert (backup.remote(config.remote_dir) / name).read_bytes() == data
    assert_ok(plugin.run("restore_data", cfg, backup.file(name)))


# ---------------------------------------------------------------- verify


def report(plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    """The coordinator's report, stored as gpbackup stores it at the end of a backup."""
    path = backup.file(f"gpbackup_{backup.timestamp}_report")
    path.write_text(f"timestamp key: {backup.timestamp}\ndatabase name: prod\nbackup status: Success\n")
    plugin.ok("backup_file", config.path, path)


def test_verify_of_an_intact_backup_exits_0_with_one_summary_line(plugin: Plugin, config: SiteConfig,
                                                                  backup: LocalBackup) -> None:
    stored(plugin, config, backup, os.urandom(2 * BLOCK + 1))
    stored(plugin, config, backup, b"", name=f"gpbackup_1_{backup.timestamp}")
    report(plugin, config, backup)

    out = plugin.ok("verify", config.path, backup.timestamp).stdout.decode()

    assert out.splitlines() == [out.strip()] and f"backup {backup.timestamp}: OK; 3 of 3 files verified" in out


def test_verify_names_each_damaged_missing_and_unchecked_file_and_exits_1(plugin: Plugin, config: SiteConfig,
                                                                          backup: LocalBackup) -> None:
    _, damaged = stored(plugin, config, backup, os.urandom(2 * BLOCK + 1), name=f"gpbackup_0_{backup.timestamp}")
    _, missing = stored(plugin, config, backup, b"gone", name=f"gpbackup_1_{backup.timestamp}")
    _, unchecked = stored(plugin, config, backup, b"no sidecar", name=f"gpbackup_2_{backup.timestamp}")
    _, truncated = stored(plugin, config, backup, os.urandom(2 * BLOCK), name=f"gpbackup_3_{backup.timestamp}")
    _, intact = stored(plugin, config, backup, os.urandom(1000), name=f"gpbackup_4_{backup.timestamp}")
    report(plugin, config, backup)
    flip(damaged, BLOCK + 1)
    missing.unlink()
    Path(f"{unchecked}.sha256").unlink()
    with open(truncated, "r+b") as handle:
        handle.truncate(BLOCK + 1)

    result = plugin.run("verify", config.path, backup.timestamp)

    assert result.returncode == 1 and result.stderr == b""
    lines = result.stdout.decode().splitlines()
    assert any(line.startswith("DAMAGED") and damaged.name in line and f"offset {BLOCK}" in line for line in lines)
    assert any(line.startswith("MISSING") and missing.name in line for line in lines)
    assert any(line.startswith("NOCHECK") and unchecked.name in line for line in lines)
    assert any(line.startswith("DAMAGED") and truncated.name in line and "holds" in line for line in lines)
    assert not any(intact.name in line for line in lines)
    assert lines[-1].startswith(f"backup {backup.timestamp}: 4 problems; 2 of 5 files verified")


def test_verify_all_checks_every_backup_and_fails_if_one_is_bad(plugin: Plugin, config: SiteConfig,
                                                                make_backup: Callable[..., LocalBackup]) -> None:
    good, bad = make_backup("20260101010101"), make_backup("20260202020202")
    for backup in (good, bad):
        stored(plugin, config, backup, os.urandom(5000))
        report(plugin, config, backup)
    flip(bad.remote(config.remote_dir, f"gpbackup_0_{bad.timestamp}"), 4999)

    result = plugin.run("verify", config.path, "--all")

    out = result.stdout.decode()
    assert result.returncode == 1
    assert f"backup {good.timestamp}: OK" in out and f"backup {bad.timestamp}: 1 problem" in out


def test_a_checksum_file_that_cannot_be_put_in_place_keeps_the_stream_out_of_its_final_name(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    name = f"gpbackup_0_{backup.timestamp}_4242"
    plugin.ok("backup_data", config.path, backup.file(name), stdin=b"first")
    final = backup.remote(config.remote_dir, name)
    final.unlink()
    blocker = Path(str(final) + ".sha256")  # a directory where the checksum file goes: its rename fails
    blocker.unlink()
    (blocker / "in the way").mkdir(parents=True)

    result = plugin.run("backup_data", config.path, backup.file(name), stdin=os.urandom(5000))

    assert_failed(result)
    # Both renames went out together; the stream's, carried out after the checksum's failed, was undone.
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir()] == [blocker.name]
