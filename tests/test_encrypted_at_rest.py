"""Compression and encryption at rest (container.py through store.py): the installed plugin against a real sshd."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig, assert_failed
from sftp_plugin import container, keys
from sftp_plugin.store import WHOLE_READ_LIMIT
from tests.helpers import flip, write_offsets
from tests.test_container import table_like

MIB = 1024 * 1024
CHUNK = container.CHUNK_SIZE
MODES = {"zstd": {"compression": "zstd"}, "zstd+key": {"compression": "zstd"}, "key": {}}


def make_key(tmp_path: Path, name: str = "backup.key") -> Path:
    path = tmp_path / name
    keys.write_new_key(str(path))
    return path


def mode_config(config: SiteConfig, tmp_path: Path, mode: str) -> Path:
    options: dict[str, object] = dict(MODES[mode])
    if "key" in mode:
        options["encryption_key_file"] = str(make_key(tmp_path))
    return config.write(f"{mode}.yaml", **options)


def chunk_offsets(path: Path, key: Path | None) -> list[int]:
    """The stored offset of each chunk of a stored container."""
    data = path.read_bytes()
    header = container.parse_header(data[: container.HEADER_SIZE])
    trailer = container.parse_trailer(data[-container.TRAILER_SIZE :], len(data))
    codec = container.Codec(header, keys.load_key(str(key)) if key else None)
    record = data[trailer.index_offset : trailer.index_offset + trailer.index_length]
    return [entry.stored for entry in container.Container(codec, trailer, record).entries]


def store(plugin: Plugin, cfg: Path, config: SiteConfig, backup: LocalBackup, data: bytes,
          segment: int = 0) -> tuple[str, Path]:
    """backup_data of `data` as segment `segment`'s stream: its name, and where the backup host keeps it."""
    name = f"gpbackup_{segment}_{backup.timestamp}"
    plugin.ok("backup_data", cfg, backup.file(name), stdin=data)
    return name, backup.remote(config.remote_dir, name)


@pytest.mark.parametrize("mode", list(MODES))
def test_data_streams_round_trip_in_every_mode(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                               tmp_path: Path, mode: str) -> None:
    cfg = mode_config(config, tmp_path, mode)
    data = table_like(3 * CHUNK + 4321)
    name, path = store(plugin, cfg, config, backup, data)

    stored = path.read_bytes()
    assert stored.startswith(container.MAGIC) and stored.endswith(container.TAIL_MAGIC)
    assert not Path(f"{path}.sha256blocks").exists()
    if "zstd" in mode:
        assert len(stored) < len(data) / 2
    if "key" in mode:
        assert data[:200] not in stored and b"Berlin" not in stored
    # The sidecar is the stored file's: sha256sum -c checks it on the backup host.
    checked = subprocess.run(["sha256sum", "-c", path.name + ".sha256"], cwd=path.parent, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    assert plugin.ok("restore_data", cfg, backup.file(name)).stdout == data
    ranges = [(0, 10), (CHUNK - 3, CHUNK + 3), (2 * CHUNK, 2 * CHUNK), (len(data) - 100, len(data))]
    result = plugin.ok("restore_data_subset", cfg, backup.file(name), write_offsets(tmp_path, ranges))
    assert result.stdout == b"".join(data[s:e] for s, e in ranges)


@pytest.mark.parametrize("past", [1, container.TRAILER_SIZE - 1, container.TRAILER_SIZE])
def test_a_container_just_longer_than_the_whole_read_limit_restores(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path, past: int) -> None:
    # Stored `past` bytes beyond what a restore reads whole: its trailer lies partly among the bytes read
    # first, and must still be found at the end of the file.
    cfg = mode_config(config, tmp_path, "key")  # no compression: the stored size follows the stream's
    _, probe = store(plugin, cfg, config, backup, os.urandom(1000), segment=1)
    overhead = probe.stat().st_size - 1000  # one chunk's: a header, a tag, an index and a trailer
    data = os.urandom(WHOLE_READ_LIMIT + past - overhead)
    name, path = store(plugin, cfg, config, backup, data)
    assert path.stat().st_size == WHOLE_READ_LIMIT + past

    assert plugin.ok("restore_data", cfg, backup.file(name)).stdout == data


def test_an_empty_stream_round_trips(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                     tmp_path: Path) -> None:
    cfg = mode_config(config, tmp_path, "zstd+key")
    key = backup.file(f"gpbackup_0_{backup.timestamp}")
    plugin.ok("backup_data", cfg, key, stdin=b"")
    assert plugin.ok("restore_data", cfg, key).stdout == b""


def test_backup_files_metadata_config_report_round_trip_and_are_read_by_list_backups(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    cfg = mode_config(config, tmp_path, "zstd+key")
    ts = backup.timestamp
    files = {
        f"gpbackup_{ts}_metadata.sql": b"CREATE TABLE secret_table (i int);\n" * 50,
        f"gpbackup_{ts}_config.yaml": f"backupdir: \ndatabasename: secretdb\ntimestamp: \"{ts}\"\n".encode(),
        f"gpbackup_{ts}_report": b"database name: secretdb\nbackup status: Success\n",
        f"gpbackup_{ts}_toc.yaml": b"toc: []\n",
    }
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    for name, content in files.items():
        backup.file(name).write_bytes(content)
        plugin.ok("backup_file", cfg, backup.file(name))
        stored = backup.remote(config.remote_dir, name).read_bytes()
        assert stored.startswith(container.MAGIC) and b"secret" not in stored
    for name, content in files.items():
        backup.file(name).unlink()
        plugin.ok("restore_file", cfg, backup.file(name))
        assert backup.file(name).read_bytes() == content
    listing = json.loads(plugin.run("list-backups", cfg, "--json", text=True).stdout)["backups"]
    assert [(b["timestamp"], b["database"], b["state"]) for b in listing] == [(ts, "secretdb", "complete")]
    verified = plugin.run("verify", cfg, ts, text=True)
    assert verified.returncode == 0 and f"backup {ts}: OK; 4 of 4 files verified" in verified.stdout, verified.stdout


def test_a_changed_byte_in_a_chunk_stops_before_that_chunk(plugin: Plugin, config: SiteConfig,
                                                            backup: LocalBackup, tmp_path: Path) -> None:
    cfg = mode_config(config, tmp_path, "zstd+key")
    data = table_like(4 * CHUNK)
    name, path = store(plugin, cfg, config, backup, data)
    offsets = chunk_offsets(path, tmp_path / "backup.key")
    flip(path, offsets[2] + 100)

    result = plugin.run("restore_data", cfg, backup.file(name))
    assert result.stdout == data[: 2 * CHUNK]  # the two good chunks, nothing of the damaged one
    line = assert_failed(result)
    assert name in line and "chunk 2" in line and f"offset {2 * CHUNK}" in line and "authentication" in line, line
    subset = plugin.run("restore_data_subset", cfg, backup.file(name),
                        write_offsets(tmp_path, [(2 * CHUNK + 5, 2 * CHUNK + 10)]))
    assert subset.stdout == b"" and "chunk 2" in assert_failed(subset)
    verified = plugin.run("verify", cfg, backup.timestamp, text=True)
    assert verified.returncode == 1 and "DAMAGED" in verified.stdout and "chunk 2" in verified.stdout


@pytest.mark.parametrize("where", ["header", "index", "trailer", "truncated", "a chunk dropped"])
def test_damage_outside_the_chunks_delivers_nothing(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                     tmp_path: Path, where: str) -> None:
    cfg = mode_config(config, tmp_path, "zstd+key")
    data = table_like(3 * CHUNK)
    name, path = store(plugin, cfg, config, backup, data)
    stored = path.read_bytes()
    offsets = chunk_offsets(path, tmp_path / "backup.key")
    if where == "header":
        flip(path, 40)
    elif where == "index":
        flip(path, len(stored) - container.TRAILER_SIZE - 3)
    elif where == "trailer":
        flip(path, len(stored) - 12)
    elif where == "truncated":
        path.write_bytes(stored[: offsets[2] + 10])
    else:
        path.write_bytes(stored[: offsets[1]] + stored[offsets[2] :])

    result = plugin.run("restore_data", cfg, backup.file(name))
    assert result.stdout == b""
    line = assert_failed(result)
    assert name in line and "damaged" in line, line


def test_wrong_missing_and_old_keys(plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    old = make_key(tmp_path, "old.key")
    new = make_key(tmp_path, "new.key")
    old_cfg = config.write("old.yaml", encryption_key_file=str(old))
    data = table_like(CHUNK + 10)
    name = backup.file(f"gpbackup_0_{backup.timestamp}")
    plugin.ok("backup_data", old_cfg, name, stdin=data)
    old_print, new_print = keys.fingerprint(keys.load_key(str(old))), keys.fingerprint(keys.load_key(str(new)))

    wrong = plugin.run("restore_data", config.write("new.yaml", encryption_key_file=str(new)), name)
    line = assert_failed(wrong)
    assert wrong.stdout == b"" and old_print in line and new_print in line, line
    missing = plugin.run("restore_data", config.write("none.yaml", compression="zstd"), name)
    line = assert_failed(missing)
    assert old_print in line and "configured keys: none" in line, line
    rotated = config.write("rotated.yaml", encryption_key_file=str(new), decryption_key_files=str(old))
    assert plugin.ok("restore_data", rotated, name).stdout == data
    # The key itself never reaches the log.
    key_text = keys.load_key(str(old)).hex()
    assert all(key_text not in log.read_text(errors="replace") for log in config.log_dir.glob("*.log"))


def test_a_key_open_to_others_is_refused_and_nothing_is_stored(plugin: Plugin, config: SiteConfig,
                                                                backup: LocalBackup, tmp_path: Path) -> None:
    key = make_key(tmp_path)
    key.chmod(0o644)
    name = f"gpbackup_0_{backup.timestamp}"
    line = plugin.fails("backup_data", config.write(encryption_key_file=str(key)), backup.file(name), stdin=b"rows\n")
    assert str(key) in line and "chmod 600" in line, line
    assert not backup.remote(config.remote_dir, name).exists()


def test_a_mixed_backup_restores(plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    """Files stored plain (before the options were set) and as containers, in one backup."""
    cfg = mode_config(config, tmp_path, "zstd+key")
    plain, boxed = table_like(2 * CHUNK + 5, seed=1), table_like(2 * CHUNK + 5, seed=2)
    plugin.ok("backup_data", config.path, backup.file(f"gpbackup_0_{backup.timestamp}"), stdin=plain)
    plugin.ok("backup_data", cfg, backup.file(f"gpbackup_1_{backup.timestamp}"), stdin=boxed)
    assert backup.remote(config.remote_dir, f"gpbackup_0_{backup.timestamp}").read_bytes() == plain
    assert plugin.ok("restore_data", cfg, backup.file(f"gpbackup_0_{backup.timestamp}")).stdout == plain
    assert plugin.ok("restore_data", cfg, backup.file(f"gpbackup_1_{backup.timestamp}")).stdout == boxed
    ranges = [(CHUNK - 1, CHUNK + 1)]
    for segment, data in ((0, plain), (1, boxed)):
        result = plugin.ok("restore_data_subset", cfg, backup.file(f"gpbackup_{segment}_{backup.timestamp}"),
                           write_offsets(tmp_path, ranges))
        assert result.stdout == data[CHUNK - 1 : CHUNK + 1]


def test_keygen_writes_a_private_key_and_prints_its_fingerprint(plugin: Plugin, tmp_path: Path) -> None:
    path = tmp_path / "made.key"
    result = plugin.run("keygen", path, text=True)
    assert result.returncode == 0 and not result.stderr, result.stderr
    key = keys.load_key(str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert keys.fingerprint(key) in result.stdout and "keep a copy off the backup host" in result.stdout
    assert key.hex() not in result.stdout
    again = plugin.run("keygen", path, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr and again.stderr.count("\n") == 1
    assert keys.load_key(str(path)) == key


def test_check_loads_each_key_and_shows_its_fingerprint(plugin: Plugin, config: SiteConfig, tmp_path: Path) -> None:
    new, old = make_key(tmp_path, "new.key"), make_key(tmp_path, "old.key")
    result = plugin.run("check", config.write(encryption_key_file=str(new), decryption_key_files=str(old)), text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert keys.fingerprint(keys.load_key(str(new))) in result.stdout
    assert keys.fingerprint(keys.load_key(str(old))) in result.stdout
    old.chmod(0o640)
    failed = plugin.run("check", config.write(encryption_key_file=str(new), decryption_key_files=str(old)), text=True)
    assert failed.returncode != 0 and "accessible by group or others" in failed.stdout, failed.stdout


def test_verify_checks_containers_stored_without_checksum_files(plugin: Plugin, config: SiteConfig,
                                                                backup: LocalBackup) -> None:
    cfg = config.write("no_sums.yaml", compression="zstd", verify_checksums="no")
    (intact, intact_path), (damaged, path) = (store(plugin, cfg, config, backup, table_like(2 * CHUNK), segment)
                                              for segment in (0, 1))
    assert not Path(f"{intact_path}.sha256").exists()
    flip(path, chunk_offsets(path, None)[1] + 10)

    result = plugin.run("verify", cfg, backup.timestamp, text=True)

    lines = result.stdout.splitlines()
    assert result.returncode == 1 and not any(line.startswith("NOCHECK") for line in lines), lines
    assert any(line.startswith("DAMAGED") and damaged in line and "chunk 1" in line for line in lines), lines
    assert not any(intact in line for line in lines), lines


def test_list_backups_lists_a_backup_encrypted_with_a_key_no_longer_configured_as_unreadable(
        plugin: Plugin, config: SiteConfig, make_backup: Callable[..., LocalBackup], tmp_path: Path) -> None:
    old_key, new_key = make_key(tmp_path, "old.key"), make_key(tmp_path, "new.key")
    old = config.write("old.yaml", encryption_key_file=str(old_key))
    new = config.write("new.yaml", encryption_key_file=str(new_key))
    older, newer = make_backup(timestamp="20240101000000"), make_backup(timestamp="20240202000000")
    for cfg, backup in ((old, older), (new, newer)):
        name = f"gpbackup_{backup.timestamp}_report"
        backup.file(name).write_bytes(b"database name: db\nbackup status: Success\n")
        plugin.ok("backup_file", cfg, backup.file(name))

    result = plugin.run("list-backups", new, "--json", text=True)

    assert result.returncode == 0 and result.stderr == "", result.stderr
    listing = {b["timestamp"]: b for b in json.loads(result.stdout)["backups"]}
    assert listing[newer.timestamp]["state"] == "complete"
    assert listing[older.timestamp]["state"] == "unreadable" and listing[older.timestamp]["complete"] is False
    assert keys.fingerprint(keys.load_key(str(old_key))) in listing[older.timestamp]["reasons"][0]
    table = plugin.run("list-backups", new, text=True)
    assert table.returncode == 0, table.stderr
    assert "unreadable: " in next(line for line in table.stdout.splitlines() if line.startswith(older.timestamp))
    assert table.stdout.rstrip().endswith("; 0 incomplete, 1 unreadable"), table.stdout
