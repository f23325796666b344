"""Behaviour of every plugin command, run as gpbackup runs it: the installed script against a real sshd."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig, assert_failed
from devtools.sshd import SshServer
from sftp_plugin import paths
from tests.helpers import gpbackup_config, gpbackup_files, gpbackup_report, sshd_fixture, undeletable, upload_leftovers

HOOKS = ("setup_plugin_for_backup", "setup_plugin_for_restore", "cleanup_plugin_for_backup",
         "cleanup_plugin_for_restore")
# Scope arguments exactly as gpbackup and its test bench pass them (the bench keeps the double quotes).
SCOPES: dict[str, tuple[str, ...]] = {
    "coordinator_quoted": ("coordinator", '"-1"'),
    "coordinator": ("coordinator", "-1"),
    "master_quoted": ("master", '"-1"'),
    "segment_host": ("segment_host",),
    "segment_quoted": ("segment", '"0"'),
    "segment": ("segment", "0"),
}
MakeBackup = Callable[..., LocalBackup]


def remote_files(root: Path) -> dict[str, bytes]:
    """Every regular file under a remote directory (the server is local), by relative path; not the spare
    files a warm worker opens for its next upload once a call has ended, at a moment a test cannot know."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not paths.is_spare_name(p.name)}


def temp_leftovers(directory: Path) -> list[str]:
    """An upload's temporary files in `directory` (helpers.upload_leftovers)."""
    return [path.name for path in upload_leftovers(directory)] if directory.is_dir() else []


def store(plugin: Plugin, config: SiteConfig, backup: LocalBackup, name: str, data: bytes) -> Path:
    """Store ``data`` through the plugin as gpbackup_helper would; return the local path used as the key."""
    key = backup.file(name)
    plugin.ok("backup_data", config.path, key, stdin=data)
    return key


def listing(output: bytes) -> dict[str, int]:
    """list_directory output -> {path: size}."""
    entries: dict[str, int] = {}
    for line in output.decode().splitlines():
        path, size = line.rsplit("\t", 1)
        entries[path] = int(size)
    return entries


def make_remote_backup(remote_dir: Path, timestamp: str, files: dict[str, bytes] | None = None) -> Path:
    """Create a backup directly in the remote filesystem, as an earlier run would have left it."""
    directory = remote_dir / "backups" / timestamp[:8] / timestamp
    directory.mkdir(parents=True)
    default = gpbackup_files(timestamp)  # a successful full backup of database prod
    for name, data in (files or default).items():
        (directory / name).write_bytes(data)
    return directory


def report_text(timestamp: str, status: str, database: str = "prod") -> str:
    """The coordinator's report as gpbackup writes it at the end of a backup (abridged)."""
    return gpbackup_report(timestamp, status, database)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


# ---------------------------------------------------------------- version commands


@pytest.mark.parametrize("with_config", [False, True])
def test_plugin_api_version_prints_a_version_gpbackup_accepts(plugin: Plugin, config: SiteConfig,
                                                              with_config: bool) -> None:
    out = plugin.ok("plugin_api_version", *([config.path] if with_config else [])).stdout.decode()
    version = tuple(int(part) for part in out.strip().split("."))
    assert len(version) == 3 and version >= (0, 3, 0)
    assert out.endswith("\n") and out.count("\n") == 1


@pytest.mark.parametrize("with_config", [False, True])
def test_version_prints_exactly_name_version_number(plugin: Plugin, config: SiteConfig, with_config: bool) -> None:
    words = plugin.ok("--version", *([config.path] if with_config else [])).stdout.decode().split()
    assert len(words) == 3
    assert words[0] == "gpbackup_sftp_plugin" and words[1] == "version"
    assert words[2][0].isdigit()


# ---------------------------------------------------------------- setup / cleanup hooks


@pytest.mark.parametrize("scope", SCOPES.keys())
@pytest.mark.parametrize("hook", HOOKS)
def test_hook_succeeds_for_every_scope_with_empty_stderr(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                         hook: str, scope: str) -> None:
    if hook != "setup_plugin_for_backup":
        backup.remote(config.remote_dir).mkdir(parents=True)  # as a finished backup left it
    plugin.ok(hook, config.path, backup.path, *SCOPES[scope])


@pytest.mark.parametrize("scope_args", [("coordinator", '"-1"'), ("coordinator", "-1"), ("master", '"-1"')])
def test_setup_plugin_for_backup_coordinator_creates_the_timestamp_dir(plugin: Plugin, config: SiteConfig,
                                                                       backup: LocalBackup,
                                                                       scope_args: tuple[str, ...]) -> None:
    plugin.ok("setup_plugin_for_backup", config.path, backup.path, *scope_args)
    assert backup.remote(config.remote_dir).is_dir()


def test_setup_plugin_for_backup_segment_host_leaves_no_probe_behind(plugin: Plugin, config: SiteConfig,
                                                                     backup: LocalBackup) -> None:
    plugin.ok("setup_plugin_for_backup", config.path, backup.path, "segment_host")
    assert list(config.remote_dir.iterdir()) == []


@pytest.mark.parametrize(("hook", "scope_args"), [
    ("setup_plugin_for_backup", ("segment_host",)),
    ("setup_plugin_for_backup", ("coordinator", '"-1"')),
    ("setup_plugin_for_restore", ("segment_host",)),
])
def test_setup_fails_naming_host_user_and_dir_when_remote_dir_missing(plugin: Plugin, config: SiteConfig,
                                                                      backup: LocalBackup, hook: str,
                                                                      scope_args: tuple[str, ...]) -> None:
    missing = config.remote_dir / "not_created"
    cfg = config.write("missing_remote.yaml", remote_dir=str(missing))
    user = str(config.server.options()["username"])
    message = plugin.fails(hook, cfg, backup.path, *scope_args)
    assert "127.0.0.1" in message
    assert user in message
    assert str(missing) in message
    assert not missing.exists()


# A backup host whose sftp-server refuses fsync@openssh.com (-P): no file stored there could be made durable.
fsync_refused = sshd_fixture("sshd_fsync_refused", extra_config="ForceCommand internal-sftp -P fsync\n")


@pytest.mark.parametrize(("command", "scope_args"), [
    ("setup_plugin_for_backup", ("segment_host",)),  # its probe proves remote_dir takes a durable file
    ("backup_data", ()),
])
def test_a_backup_host_that_refuses_fsync_fails_naming_the_option_to_change_and_stores_nothing(
    plugin: Plugin, fsync_refused: SshServer, backup: LocalBackup, tmp_path: Path, command: str,
    scope_args: tuple[str, ...]
) -> None:
    cfg = fsync_refused.write_config(tmp_path / "fsync_refused.yaml", log_dir=str(tmp_path / "logs"))
    stream = "gpbackup_0_stream"
    args = (backup.path, *scope_args) if scope_args else (backup.file(stream),)

    message = plugin.fails(command, cfg, *args, stdin=b"rows" * 1000)

    assert "refused fsync@openssh.com" in message and "durable" in message
    assert "take fsync out of its -P option" in message
    assert "may write there" not in message and "ownership" not in message  # not a permissions problem
    stored = [p for p in fsync_refused.remote_dir.rglob("*") if p.is_file()]
    assert stored == []  # neither the stream under its name nor a temporary file or probe


def test_with_fsync_no_a_backup_host_that_refuses_fsync_stores_every_kind_of_file_and_restores_it_exactly(
    plugin: Plugin, fsync_refused: SshServer, backup: LocalBackup, tmp_path: Path
) -> None:
    # fsync: no sends no fsync@openssh.com at all: this server would refuse the first one (the test above).
    cfg = fsync_refused.write_config(tmp_path / "no_fsync.yaml", log_dir=str(tmp_path / "logs"), fsync="no")
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "segment_host")  # its probe file
    streams = {f"gpbackup_0_{backup.timestamp}_{n}": os.urandom(size)
               for n, size in ((1, 3 * 1024 * 1024 + 17), (2, 5000), (3, 70_000))}  # >1 MiB: block digests too
    for name, data in streams.items():  # one after another: a warm worker's next uploads use its spare files
        plugin.ok("backup_data", cfg, backup.file(name), stdin=data)
    toc = backup.file(f"gpbackup_{backup.timestamp}_toc.yaml")
    toc.write_bytes(b"toc: []\n" * 1000)
    plugin.ok("backup_file", cfg, toc)

    stored = backup.remote(fsync_refused.remote_dir)
    assert (stored / f"gpbackup_0_{backup.timestamp}_1.sha256blocks").is_file()
    for name, data in streams.items():
        assert plugin.ok("restore_data", cfg, backup.file(name)).stdout == data
        assert (stored / f"{name}.sha256").read_text().split()[0] == hashlib.sha256(data).hexdigest()
    toc.unlink()
    plugin.ok("restore_file", cfg, toc)
    assert toc.read_bytes() == b"toc: []\n" * 1000
    assert temp_leftovers(stored) == []


@pytest.mark.parametrize("content", ['"0"', "0", '"3"'])
@pytest.mark.parametrize("hook", HOOKS)
def test_hook_for_scope_segment_makes_no_connection(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                    hook: str, content: str) -> None:
    # Hundreds of segments call these at once; they must not touch the backup host. Nobody listens on this port.
    plugin.ok(hook, config.closed_port(), backup.path, "segment", content)


def test_setup_plugin_for_restore_coordinator_fails_naming_the_timestamp_when_backup_absent(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    message = plugin.fails("setup_plugin_for_restore", config.path, backup.path, "coordinator", '"-1"')
    assert backup.timestamp in message


@pytest.mark.parametrize("scope", ["coordinator_quoted", "segment_host", "segment_quoted"])
def test_setup_plugin_for_restore_creates_the_local_backup_dir(plugin: Plugin, config: SiteConfig,
                                                               make_backup: MakeBackup, scope: str) -> None:
    source = make_backup()
    plugin.ok("setup_plugin_for_backup", config.path, source.path, "coordinator", '"-1"')
    store(plugin, config, source, f"gpbackup_0_{source.timestamp}", b"data")
    target = make_backup(source.timestamp, segment="restore_host", create=False)
    assert not target.path.exists()
    plugin.ok("setup_plugin_for_restore", config.path, target.path, *SCOPES[scope])
    assert target.path.is_dir()


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize(("scope_args", "culprit"), [
    (("bogus",), "bogus"), (("coordinator_x", "-1"), "coordinator_x"), (("segment", "abc"), "abc"),
    (("segment", '"'), '"'), (("", "0"), "scope"),
])
def test_hook_refuses_unknown_scope_or_non_integer_content_id(plugin: Plugin, config: SiteConfig,
                                                              backup: LocalBackup, hook: str,
                                                              scope_args: tuple[str, ...], culprit: str) -> None:
    message = plugin.fails(hook, config.path, backup.path, *scope_args)
    assert culprit in message


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("local_dir", ["/tmp/not/a/backup/dir", "/data/backups/20261124/20261125093000",
                                       "/data/backups/20261124"])
def test_hook_refuses_a_local_dir_not_shaped_like_a_backup_dir(plugin: Plugin, config: SiteConfig, hook: str,
                                                               local_dir: str) -> None:
    message = plugin.fails(hook, config.path, local_dir, "coordinator", "-1")
    assert local_dir in message
    assert list(config.remote_dir.iterdir()) == []


# ---------------------------------------------------------------- backup_file / restore_file


def test_backup_file_stores_identical_bytes_and_keeps_the_local_file(plugin: Plugin, config: SiteConfig,
                                                                     backup: LocalBackup) -> None:
    name = f"gpbackup_-1_{backup.timestamp}_metadata.sql"
    local = backup.file(name)
    data = os.urandom(300_000)
    local.write_bytes(data)
    plugin.ok("backup_file", config.path, local)
    assert local.read_bytes() == data
    assert backup.remote(config.remote_dir, name).read_bytes() == data
    assert temp_leftovers(backup.remote(config.remote_dir)) == []


def test_backup_file_of_missing_local_file_fails_naming_it(plugin: Plugin, config: SiteConfig,
                                                           backup: LocalBackup) -> None:
    local = backup.file("gpbackup_-1_missing_toc.yaml")
    message = plugin.fails("backup_file", config.path, local)
    assert str(local) in message


def test_restore_file_round_trips_to_another_segment_prefix(plugin: Plugin, config: SiteConfig,
                                                            make_backup: MakeBackup) -> None:
    source = make_backup()
    name = f"gpbackup_0_{source.timestamp}_toc.yaml"
    data = os.urandom(70_000)
    source.file(name).write_bytes(data)
    plugin.ok("backup_file", config.path, source.file(name))
    # Restore on another host: a different prefix before backups/, same last four components.
    target = make_backup(source.timestamp, segment="other_datadir/gpseg0", create=False)
    plugin.ok("restore_file", config.path, target.file(name))
    assert target.file(name).read_bytes() == data
    assert [p.name for p in target.path.iterdir()] == [name]


def test_restore_file_replaces_an_existing_local_file(plugin: Plugin, config: SiteConfig,
                                                      backup: LocalBackup) -> None:
    local = backup.file(f"gpbackup_{backup.timestamp}_config.yaml")
    local.write_bytes(b"stored version")
    plugin.ok("backup_file", config.path, local)
    local.write_bytes(b"a local edit that the restore must overwrite")
    plugin.ok("restore_file", config.path, local)
    assert local.read_bytes() == b"stored version"


def test_restore_file_of_missing_remote_file_fails_naming_the_path(plugin: Plugin, config: SiteConfig,
                                                                   backup: LocalBackup) -> None:
    name = f"gpbackup_{backup.timestamp}_report"
    message = plugin.fails("restore_file", config.path, backup.file(name))
    assert str(backup.remote(config.remote_dir, name)) in message
    assert list(backup.path.iterdir()) == [], "a failed restore must leave no local file behind"


# ---------------------------------------------------------------- backup_data / restore_data


def test_backup_data_of_empty_stream_stores_empty_file_and_restores_empty(plugin: Plugin, config: SiteConfig,
                                                                          backup: LocalBackup) -> None:
    name = f"gpbackup_0_{backup.timestamp}_16384"
    key = store(plugin, config, backup, name, b"")
    stored = backup.remote(config.remote_dir, name)
    assert stored.is_file() and stored.stat().st_size == 0
    assert plugin.ok("restore_data", config.path, key).stdout == b""


def test_backup_data_round_trips_a_multi_mebibyte_stream(plugin: Plugin, config: SiteConfig,
                                                         backup: LocalBackup) -> None:
    data = os.urandom(24 * 1024 * 1024 + 12345)  # not a multiple of any request or chunk size
    name = f"gpbackup_1_{backup.timestamp}"
    key = store(plugin, config, backup, name, data)
    digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(backup.remote(config.remote_dir, name).read_bytes()).hexdigest() == digest
    restored = plugin.ok("restore_data", config.path, key).stdout
    assert len(restored) == len(data)
    assert hashlib.sha256(restored).hexdigest() == digest


def test_backup_data_of_existing_key_replaces_it_and_leaves_no_temp_files(plugin: Plugin, config: SiteConfig,
                                                                          backup: LocalBackup) -> None:
    name = f"gpbackup_2_{backup.timestamp}_16385"
    store(plugin, config, backup, name, b"first version, longer than the second")
    key = store(plugin, config, backup, name, b"second")
    assert plugin.ok("restore_data", config.path, key).stdout == b"second"
    assert temp_leftovers(backup.remote(config.remote_dir)) == []


def test_restore_data_of_missing_key_fails_naming_the_path_and_prints_nothing(plugin: Plugin, config: SiteConfig,
                                                                              backup: LocalBackup) -> None:
    name = f"gpbackup_0_{backup.timestamp}_99999"
    result = plugin.run("restore_data", config.path, backup.file(name))
    assert result.stdout == b""
    assert str(backup.remote(config.remote_dir, name)) in assert_failed(result)


def test_restore_data_subset_prints_the_documented_example(plugin: Plugin, config: SiteConfig,
                                                           backup: LocalBackup, tmp_path: Path) -> None:
    key = store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", b"ABCDEFGHIJKL")
    offsets = tmp_path / "offsets"
    offsets.write_text("2 0 2 5 7\n")
    assert plugin.ok("restore_data_subset", config.path, key, offsets).stdout == b"ABFG"


def test_restore_data_subset_prints_only_the_listed_ranges(plugin: Plugin, config: SiteConfig,
                                                           backup: LocalBackup, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    key = store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", data)
    ranges = [(0, 1), (32767, 32769), (40000, 1_500_000), (1_500_000, 1_500_010), (2_000_000, len(data))]
    offsets = tmp_path / "offsets"
    offsets.write_text(f"{len(ranges)} " + " ".join(f"{s} {e}" for s, e in ranges))
    out = plugin.ok("restore_data_subset", config.path, key, offsets).stdout
    assert out == b"".join(data[s:e] for s, e in ranges)


@pytest.mark.parametrize("content", ["", "2 0 2 5", "1 7 5", "1 -1 3", "two 0 2", "1 0 13", "2 0 2 12 13"])
def test_restore_data_subset_with_invalid_offsets_prints_nothing_and_fails(plugin: Plugin, config: SiteConfig,
                                                                           backup: LocalBackup, tmp_path: Path,
                                                                           content: str) -> None:
    key = store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", b"ABCDEFGHIJKL")
    offsets = tmp_path / "offsets"
    offsets.write_text(content)
    result = plugin.run("restore_data_subset", config.path, key, offsets)
    assert result.stdout == b""
    assert str(offsets) in assert_failed(result)


def test_restore_data_subset_with_missing_offsets_file_prints_nothing_and_fails(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path) -> None:
    key = store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", b"ABCDEFGHIJKL")
    offsets = tmp_path / "no_such_offsets"
    result = plugin.run("restore_data_subset", config.path, key, offsets)
    assert result.stdout == b""
    assert str(offsets) in assert_failed(result)


def test_restore_data_subset_past_the_end_of_the_stored_data_fails(plugin: Plugin, config: SiteConfig,
                                                                   backup: LocalBackup, tmp_path: Path) -> None:
    key = store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", b"ABCDEFGHIJKL")
    offsets = tmp_path / "offsets"
    offsets.write_text("1 5 100")
    plugin.fails("restore_data_subset", config.path, key, offsets)


# ---------------------------------------------------------------- delete_backup


def test_delete_backup_removes_one_backup_and_keeps_its_sibling(plugin: Plugin, config: SiteConfig,
                                                                make_backup: MakeBackup) -> None:
    first = make_backup("20261124093000")
    sibling = make_backup("20261124101500")  # same date directory
    for backup in (first, sibling):
        plugin.ok("setup_plugin_for_backup", config.path, backup.path, "coordinator", '"-1"')
        store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", backup.timestamp.encode())
    plugin.ok("delete_backup", config.path, first.timestamp)
    assert not first.remote(config.remote_dir).exists()
    assert sibling.remote(config.remote_dir, f"gpbackup_0_{sibling.timestamp}").read_bytes() == b"20261124101500"
    sibling_key = sibling.file(f"gpbackup_0_{sibling.timestamp}")
    assert plugin.ok("restore_data", config.path, sibling_key).stdout == b"20261124101500"


def test_delete_backup_removes_the_emptied_date_dir(plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    plugin.ok("setup_plugin_for_backup", config.path, backup.path, "coordinator", '"-1"')
    store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", b"x")
    date_dir = backup.remote(config.remote_dir).parent
    assert date_dir.is_dir()
    plugin.ok("delete_backup", config.path, backup.timestamp)
    assert not date_dir.exists()


def test_delete_backup_of_absent_backup_succeeds(plugin: Plugin, config: SiteConfig) -> None:
    other = make_remote_backup(config.remote_dir, "20250101000000")
    plugin.ok("delete_backup", config.path, "20250101000001")
    assert other.is_dir()


@pytest.mark.parametrize("text", ["2026112409300", "202611240930001", "2026112409300x", "latest", "",
                                  "../20261124093000", "20261124/20261124093000"])
def test_delete_backup_rejects_anything_but_14_digits(plugin: Plugin, config: SiteConfig, text: str) -> None:
    existing = make_remote_backup(config.remote_dir, "20261124093000")
    plugin.fails("delete_backup", config.path, text)
    assert existing.is_dir()


# ---------------------------------------------------------------- list_directory / delete_directory


@pytest.fixture
def two_backups(plugin: Plugin, config: SiteConfig, make_backup: MakeBackup) -> tuple[LocalBackup, LocalBackup]:
    first = make_backup("20261124093000")
    second = make_backup("20261125080000")
    store(plugin, config, first, "gpbackup_0_20261124093000", b"a" * 1000)
    store(plugin, config, first, "gpbackup_1_20261124093000", b"")
    store(plugin, config, second, "gpbackup_0_20261125080000", b"b" * 4242)
    return first, second


def find(entries: dict[str, int], suffix: str) -> int | None:
    matches = [size for path, size in entries.items() if path.endswith(suffix)]
    assert len(matches) <= 1, f"{suffix} listed more than once: {entries}"
    return matches[0] if matches else None


def test_list_directory_prints_every_file_with_its_size(plugin: Plugin, config: SiteConfig,
                                                        two_backups: tuple[LocalBackup, LocalBackup]) -> None:
    entries = listing(plugin.ok("list_directory", config.path).stdout)
    assert find(entries, "20261124/20261124093000/gpbackup_0_20261124093000") == 1000
    assert find(entries, "20261124/20261124093000/gpbackup_1_20261124093000") == 0
    assert find(entries, "20261125/20261125080000/gpbackup_0_20261125080000") == 4242


@pytest.mark.parametrize("absolute", [False, True])
def test_list_directory_of_a_sub_path_prints_only_files_below_it(plugin: Plugin, config: SiteConfig,
                                                                 two_backups: tuple[LocalBackup, LocalBackup],
                                                                 absolute: bool) -> None:
    sub = "backups/20261124"
    arg = str(config.remote_dir / sub) if absolute else sub
    entries = listing(plugin.ok("list_directory", config.path, arg).stdout)
    assert find(entries, "20261124093000/gpbackup_0_20261124093000") == 1000
    assert find(entries, "20261124093000/gpbackup_1_20261124093000") == 0
    assert not [path for path in entries if "20261125" in path], entries


def test_list_directory_of_missing_sub_path_fails_naming_it(plugin: Plugin, config: SiteConfig) -> None:
    assert "no_such_dir" in plugin.fails("list_directory", config.path, "no_such_dir")


@pytest.mark.parametrize("sub_path", ["..", "backups/../..", "/etc", "/"])
def test_list_directory_refuses_paths_outside_remote_dir(plugin: Plugin, config: SiteConfig, sub_path: str) -> None:
    result = plugin.run("list_directory", config.path, sub_path)
    assert result.stdout == b""
    assert_failed(result)


@pytest.mark.parametrize("absolute", [False, True])
def test_delete_directory_removes_a_sub_path_and_nothing_else(plugin: Plugin, config: SiteConfig,
                                                              two_backups: tuple[LocalBackup, LocalBackup],
                                                              absolute: bool) -> None:
    sub = "backups/20261124"
    plugin.ok("delete_directory", config.path, str(config.remote_dir / sub) if absolute else sub)
    assert not (config.remote_dir / sub).exists()
    remaining = remote_files(config.remote_dir)
    assert remaining["backups/20261125/20261125080000/gpbackup_0_20261125080000"] == b"b" * 4242


def test_delete_directory_of_absent_path_succeeds(plugin: Plugin, config: SiteConfig,
                                                  two_backups: tuple[LocalBackup, LocalBackup]) -> None:
    before = remote_files(config.remote_dir)
    plugin.ok("delete_directory", config.path, "backups/19990101")
    assert remote_files(config.remote_dir) == before


@pytest.mark.parametrize("target", ["..", "../", "backups/../..", "backups/20261124/../../..", "/etc", "/", "/tmp",
                                    "{parent}", "{remote_dir}", "{remote_dir}/", ".", "./", "{remote_dir}2"])
def test_delete_directory_refuses_dotdot_outside_paths_and_remote_dir_itself(plugin: Plugin, config: SiteConfig,
                                                                              target: str) -> None:
    target = target.format(remote_dir=config.remote_dir, parent=config.remote_dir.parent)
    make_remote_backup(config.remote_dir, "20261124093000")
    make_remote_backup(config.remote_dir, "20261125080000")
    before = remote_files(config.remote_dir)
    sibling = config.remote_dir.parent / f"{config.remote_dir.name}2"
    sibling.mkdir()
    (sibling / "keep").write_bytes(b"keep")
    plugin.fails("delete_directory", config.path, target)
    assert config.remote_dir.is_dir()
    assert remote_files(config.remote_dir) == before
    assert (sibling / "keep").read_bytes() == b"keep"


# ---------------------------------------------------------------- cleanup_plugin_for_backup: leftovers and retention


def test_cleanup_plugin_for_backup_coordinator_removes_partial_leftovers(plugin: Plugin, config: SiteConfig,
                                                                         backup: LocalBackup) -> None:
    plugin.ok("setup_plugin_for_backup", config.path, backup.path, "coordinator", '"-1"')
    name = f"gpbackup_0_{backup.timestamp}"
    store(plugin, config, backup, name, b"complete")
    remote = backup.remote(config.remote_dir)
    leftover = remote / f".gpbackup_1_{backup.timestamp}.0123456789abcdef.partial"
    assert paths.TEMP_RE.match(leftover.name)
    leftover.write_bytes(b"half")
    lookalike = remote / "notes.partial"  # not our temp-name shape: not ours to remove
    lookalike.write_bytes(b"keep")
    plugin.ok("cleanup_plugin_for_backup", config.path, backup.path, "coordinator", '"-1"')
    assert not leftover.exists()
    assert lookalike.read_bytes() == b"keep"
    assert (remote / name).read_bytes() == b"complete"


def take_backup(plugin: Plugin, cfg: Path, backup: LocalBackup, status: str | None = "Success",
                database: str = "prod", needs: tuple[str, ...] = ()) -> None:
    """What gpbackup does before cleanup: setup, data, and at the end (if it got there) the coordinator's
    config.yaml (an incremental backup's when ``needs`` names earlier backups) and then its report."""
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    key = backup.file(f"gpbackup_0_{backup.timestamp}")
    plugin.ok("backup_data", cfg, key, stdin=b"table data")
    if status is not None:
        config_file = backup.file(f"gpbackup_{backup.timestamp}_config.yaml")
        config_file.write_text(gpbackup_config(backup.timestamp, database, status, needs))
        plugin.ok("backup_file", cfg, config_file)
        report = backup.file(f"gpbackup_{backup.timestamp}_report")
        report.write_text(report_text(backup.timestamp, status, database))
        plugin.ok("backup_file", cfg, report)


def test_cleanup_plugin_for_backup_without_retention_options_keeps_every_backup(
        plugin: Plugin, config: SiteConfig, make_backup: MakeBackup) -> None:
    old = [make_remote_backup(config.remote_dir, ts) for ts in ("20200101000000", "20200102000000")]
    current = make_backup(stamp(datetime.now()))
    take_backup(plugin, config.path, current)
    plugin.ok("cleanup_plugin_for_backup", config.path, current.path, "coordinator", '"-1"')
    assert all(directory.is_dir() for directory in old)


def test_cleanup_plugin_for_backup_with_keep_last_prunes_older_backups(plugin: Plugin, config: SiteConfig,
                                                                       make_backup: MakeBackup) -> None:
    older = [make_remote_backup(config.remote_dir, ts) for ts in ("20200101000000", "20200102000000")]
    newest_old = make_remote_backup(config.remote_dir, "20200103000000")
    cfg = config.write("keep_last.yaml", keep_last="2")
    current = make_backup(stamp(datetime.now()))
    take_backup(plugin, cfg, current)
    plugin.ok("cleanup_plugin_for_backup", cfg, current.path, "coordinator", '"-1"')
    assert current.remote(config.remote_dir, f"gpbackup_0_{current.timestamp}").read_bytes() == b"table data"
    assert newest_old.is_dir()
    assert not any(directory.exists() for directory in older)
    assert not (config.remote_dir / "backups" / "20200101").exists(), "an emptied date dir must go too"


def test_cleanup_plugin_for_backup_with_keep_days_prunes_backups_older_than_that(
        plugin: Plugin, config: SiteConfig, make_backup: MakeBackup) -> None:
    now = datetime.now()
    old = make_remote_backup(config.remote_dir, stamp(now - timedelta(days=30)))
    young = make_remote_backup(config.remote_dir, stamp(now - timedelta(days=2)))
    not_a_date = make_remote_backup(config.remote_dir, "20001399000000")  # month 13: never judged old
    cfg = config.write("keep_days.yaml", keep_days="7")
    current = make_backup(stamp(now))
    take_backup(plugin, cfg, current)
    plugin.ok("cleanup_plugin_for_backup", cfg, current.path, "coordinator", '"-1"')
    assert not old.exists()
    assert young.is_dir()
    assert not_a_date.is_dir()
    assert current.remote(config.remote_dir).is_dir()


@pytest.mark.parametrize("status", ["Failure", None])
def test_cleanup_after_a_failed_backup_prunes_nothing(plugin: Plugin, config: SiteConfig, make_backup: MakeBackup,
                                                      status: str | None) -> None:
    # gpbackup runs cleanup even when the backup failed; that must never cost the last good backup.
    previous = make_remote_backup(config.remote_dir, stamp(datetime.now() - timedelta(days=30)))
    cfg = config.write("retention.yaml", keep_last="1", keep_days="1")
    failed = make_backup(stamp(datetime.now()))
    take_backup(plugin, cfg, failed, status=status)
    plugin.ok("cleanup_plugin_for_backup", cfg, failed.path, "coordinator", '"-1"')
    assert previous.is_dir()


def test_keep_last_counts_per_database_so_a_backup_of_hr_never_deletes_the_only_backup_of_sales(
        plugin: Plugin, config: SiteConfig, make_backup: MakeBackup) -> None:
    # gpbackup backs up one database per run: keep_last 1 means one of each database, not one in all.
    older_sales = make_remote_backup(config.remote_dir, "20200101000000", gpbackup_files("20200101000000", "sales"))
    sales = make_remote_backup(config.remote_dir, "20200102000000", gpbackup_files("20200102000000", "sales"))
    older_hr = make_remote_backup(config.remote_dir, "20200103000000", gpbackup_files("20200103000000", "hr"))
    cfg = config.write("keep_last.yaml", keep_last="1")
    hr = make_backup(stamp(datetime.now()))
    take_backup(plugin, cfg, hr, database="hr")
    plugin.ok("cleanup_plugin_for_backup", cfg, hr.path, "coordinator", '"-1"')
    assert sales.is_dir(), "the newest (only kept) backup of sales must survive a backup of hr"
    assert not older_sales.exists() and not older_hr.exists()
    assert hr.remote(config.remote_dir).is_dir()


def test_keep_last_keeps_the_full_backup_and_incrementals_the_newest_incremental_needs(
        plugin: Plugin, config: SiteConfig, make_backup: MakeBackup) -> None:
    now = datetime.now()
    previous_full, base, first = (stamp(now - timedelta(days=days)) for days in (9, 8, 7))
    old = make_remote_backup(config.remote_dir, previous_full, gpbackup_files(previous_full, "sales"))
    full = make_remote_backup(config.remote_dir, base, gpbackup_files(base, "sales"))
    incremental = make_remote_backup(config.remote_dir, first, gpbackup_files(first, "sales", needs=(base,)))
    cfg = config.write("keep_last.yaml", keep_last="1")
    newest = make_backup(stamp(now))
    take_backup(plugin, cfg, newest, database="sales", needs=(base, first))
    plugin.ok("cleanup_plugin_for_backup", cfg, newest.path, "coordinator", '"-1"')
    assert full.is_dir() and incremental.is_dir(), "a restore of the newest incremental reads both"
    assert newest.remote(config.remote_dir).is_dir()
    assert not old.exists(), "a full backup no kept backup needs is pruned"


def test_a_failing_prune_is_a_warning_in_the_log_and_cleanup_still_succeeds(
        plugin: Plugin, config: SiteConfig, make_backup: MakeBackup) -> None:
    # gpbackup makes a failed coordinator cleanup exit code 1 for a backup that succeeded.
    stuck = make_remote_backup(config.remote_dir, "20200101000000")
    deletable = make_remote_backup(config.remote_dir, "20200102000000")
    cfg = config.write("keep_last.yaml", keep_last="1")
    current = make_backup(stamp(datetime.now()))
    take_backup(plugin, cfg, current)
    with undeletable(stuck):
        result = plugin.run("cleanup_plugin_for_backup", cfg, current.path, "coordinator", '"-1"')
        assert stuck.is_dir()
    assert result.returncode == 0 and result.stderr == b"", result
    assert not deletable.exists(), "one stuck backup must not stop the pruning of the others"
    warnings = [line for line in config.log_text().splitlines() if " WARNING " in line]
    assert any("20200101000000" in line for line in warnings), config.log_text()
    assert current.remote(config.remote_dir).is_dir()


# ---------------------------------------------------------------- success contract over every command


def _prepare(command: str, plugin: Plugin, config: SiteConfig, backup: LocalBackup,
             tmp_path: Path) -> tuple[list[str | Path], bytes]:
    """Arguments and stdin for one successful call of ``command``, with whatever state it needs."""
    cfg = config.path
    name = f"gpbackup_0_{backup.timestamp}"
    if command in ("plugin_api_version", "--version"):
        return [command], b""
    if command == "backup_data":
        return [command, cfg, backup.file(name)], b"payload"
    if command == "backup_file":
        backup.file(name).write_bytes(b"file payload")
        return [command, cfg, backup.file(name)], b""
    key = store(plugin, config, backup, name, b"stored payload")
    if command in ("restore_file", "restore_data"):
        return [command, cfg, key], b""
    if command == "restore_data_subset":
        offsets = tmp_path / "offsets"
        offsets.write_text("1 0 6")
        return [command, cfg, key, offsets], b""
    if command == "delete_backup":
        return [command, cfg, backup.timestamp], b""
    if command == "list_directory":
        return [command, cfg], b""
    if command == "list_directory_sub_path":
        return ["list_directory", cfg, "backups"], b""
    if command == "delete_directory":
        return [command, cfg, f"backups/{backup.date}"], b""
    raise AssertionError(command)


@pytest.mark.parametrize("command", ["plugin_api_version", "--version", "backup_file", "restore_file", "backup_data",
                                     "restore_data", "restore_data_subset", "delete_backup", "list_directory",
                                     "list_directory_sub_path", "delete_directory"])
def test_successful_command_exits_zero_with_empty_stderr(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                         tmp_path: Path, command: str) -> None:
    args, stdin = _prepare(command, plugin, config, backup, tmp_path)
    plugin.ok(*args, stdin=stdin)


def test_successful_call_is_logged_to_log_dir(plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    store(plugin, config, backup, f"gpbackup_0_{backup.timestamp}", b"x" * 10)
    log = config.log_text()
    assert "backup_data" in log
    assert backup.timestamp in log


# ---------------------------------------------------------------- command line errors


@pytest.mark.parametrize("command", ["bogus_command", "backup", "BACKUP_FILE", "restore_data_sub"])
def test_unknown_command_fails(plugin: Plugin, config: SiteConfig, command: str) -> None:
    assert command in plugin.fails(command, config.path, "/tmp/backups/20261124/20261124093000")


def test_no_command_fails(plugin: Plugin) -> None:
    plugin.fails()


@pytest.mark.parametrize("args", [
    ["setup_plugin_for_backup", "{cfg}"],
    ["setup_plugin_for_backup", "{cfg}", "{dir}"],
    ["setup_plugin_for_backup", "{cfg}", "{dir}", "coordinator", "-1", "extra"],
    ["setup_plugin_for_restore", "{cfg}", "{dir}"],
    ["cleanup_plugin_for_backup", "{cfg}"],
    ["cleanup_plugin_for_restore", "{cfg}", "{dir}", "segment", "0", "extra"],
    ["backup_file", "{cfg}"],
    ["backup_file", "{cfg}", "{file}", "{file}"],
    ["restore_file", "{cfg}"],
    ["restore_file", "{cfg}", "{file}", "{file}"],
    ["backup_data", "{cfg}"],
    ["backup_data", "{cfg}", "{file}", "{file}"],
    ["restore_data", "{cfg}"],
    ["restore_data", "{cfg}", "{file}", "{file}"],
    ["restore_data_subset", "{cfg}", "{file}"],
    ["restore_data_subset", "{cfg}", "{file}", "/tmp/offsets", "extra"],
    ["delete_backup", "{cfg}"],
    ["delete_backup", "{cfg}", "20261124093000", "20261124093001"],
    ["list_directory", "{cfg}", "backups", "extra"],
    ["delete_directory", "{cfg}"],
    ["delete_directory", "{cfg}", "backups", "extra"],
    ["backup_data"],
    ["plugin_api_version", "{cfg}", "extra"],
    ["--version", "{cfg}", "extra"],
], ids=lambda args: "-".join(a.strip("{}") for a in args))
def test_wrong_argument_count_fails(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                    args: list[str]) -> None:
    values = {"cfg": str(config.path), "dir": str(backup.path), "file": str(backup.file("gpbackup_0_x"))}
    result = plugin.run(*(a.format(**values) for a in args), stdin=b"data")
    assert result.stdout == b""
    assert_failed(result)
    assert list(config.remote_dir.iterdir()) == []


def test_missing_config_file_fails_naming_it(plugin: Plugin, backup: LocalBackup, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_config.yaml"
    assert str(missing) in plugin.fails("backup_data", missing, backup.file("gpbackup_0_x"), stdin=b"data")


def test_invalid_config_fails_with_one_line_naming_every_problem(plugin: Plugin, config: SiteConfig,
                                                                backup: LocalBackup) -> None:
    cfg = config.write("invalid.yaml", port="abc", retriez="3")
    message = plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", "-1")
    assert "'port'" in message and "retriez" in message


def test_unwritable_log_dir_fails_with_one_line_naming_it(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                         tmp_path: Path) -> None:
    not_a_dir = tmp_path / "log_dir_is_a_file"
    not_a_dir.write_text("")
    cfg = config.write("bad_log_dir.yaml", log_dir=str(not_a_dir))
    message = plugin.fails("backup_data", cfg, backup.file(f"gpbackup_0_{backup.timestamp}"), stdin=b"data")
    assert str(not_a_dir) in message and "log_dir" in message
    assert list(config.remote_dir.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["setup_plugin_for_backup", "{root}/../backups/{date}/{ts}", "coordinator", "-1"],
    ["setup_plugin_for_restore", "{root}/backups/{date}/{ts}/..", "segment_host"],
    ["cleanup_plugin_for_backup", "{root}/x/../backups/{date}/{ts}", "coordinator", "-1"],
    ["backup_file", "{root}/backups/{date}/{ts}/../../../../etc_passwd"],
    ["restore_file", "{root}/backups/{date}/{ts}/../{ts}/file"],
    ["backup_data", "{root}/../../backups/{date}/{ts}/file"],
    ["restore_data", "{root}/backups/{date}/{ts}/.."],
    ["restore_data_subset", "{root}/backups/../backups/{date}/{ts}/file", "{offsets}"],
    ["list_directory", "../.."],
    ["delete_directory", "backups/../.."],
    ["delete_directory", ".."],
], ids=lambda args: args[0])
def test_path_traversal_is_refused_before_any_connection(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                         tmp_path: Path, args: list[str]) -> None:
    offsets = tmp_path / "offsets"
    offsets.write_text("1 0 1")
    values = {"root": str(tmp_path / "local"), "date": backup.date, "ts": backup.timestamp, "offsets": str(offsets)}
    command, *rest = args
    # Nobody listens on the configured port: a refusal that mentions '..' proves no connection was tried.
    message = plugin.fails(command, config.closed_port(), *(a.format(**values) for a in rest), stdin=b"data")
    assert "'..'" in message
    assert "connect" not in message.lower()
