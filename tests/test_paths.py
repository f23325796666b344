"""Unit tests of paths.py: gpbackup's local paths -> remote layout, and every path that must be refused."""

from __future__ import annotations

import posixpath

import pytest

from sftp_plugin import paths
from sftp_plugin.errors import UsageError

TS = "20261124093000"
DATE = "20261124"
ROOT = "/srv/gpbackup"


def test_backup_dir_maps_to_remote_backups_date_timestamp() -> None:
    backup = paths.parse_backup_dir(f"/data/gpseg0/backups/{DATE}/{TS}")
    assert backup == paths.BackupDir(DATE, TS)
    assert backup.remote(ROOT) == f"{ROOT}/backups/{DATE}/{TS}"
    assert backup.remote_date_dir(ROOT) == f"{ROOT}/backups/{DATE}"


def test_backup_dir_accepts_trailing_slash() -> None:
    assert paths.parse_backup_dir(f"/data/backups/{DATE}/{TS}/") == paths.BackupDir(DATE, TS)


def test_backup_dir_accepts_relative_prefix() -> None:
    assert paths.parse_backup_dir(f"backups/{DATE}/{TS}") == paths.BackupDir(DATE, TS)


def test_backup_file_maps_last_four_components() -> None:
    name = f"gpbackup_0_{TS}_16384.gz"
    for prefix in ("/data/primary/gpseg0", "/backup/dir/gpseg7", "/tmp/testseg"):
        target = paths.parse_backup_file(f"{prefix}/backups/{DATE}/{TS}/{name}")
        assert target.remote(ROOT) == f"{ROOT}/backups/{DATE}/{TS}/{name}"


@pytest.mark.parametrize("path", [
    f"/data/../backups/{DATE}/{TS}",
    f"/data/backups/{DATE}/{TS}/..",
    f"../backups/{DATE}/{TS}",
    f"/data/backups/../backups/{DATE}/{TS}",
])
def test_backup_dir_refuses_dotdot_anywhere(path: str) -> None:
    with pytest.raises(UsageError, match=r"'\.\.'"):
        paths.parse_backup_dir(path)


@pytest.mark.parametrize("path", [
    f"/data/../backups/{DATE}/{TS}/file",
    f"/data/backups/{DATE}/{TS}/..",
    f"/data/backups/{DATE}/{TS}/../{TS}/file",
    f"/x/../../backups/{DATE}/{TS}/file",
])
def test_backup_file_refuses_dotdot_anywhere(path: str) -> None:
    with pytest.raises(UsageError, match=r"'\.\.'"):
        paths.parse_backup_file(path)


@pytest.mark.parametrize("path", [
    f"/data/backup/{DATE}/{TS}",            # not "backups"
    f"/data/backups/{TS}",                  # no date dir
    f"/data/backups/2026112/{TS}",          # 7-digit date
    f"/data/backups/{DATE}/2026112409300",  # 13-digit timestamp
    f"/data/backups/{DATE}/{TS}0",          # 15-digit timestamp
    f"/data/backups/2026112a/{TS}",
    f"/data/backups/{DATE}/2026112409300x",
    f"{DATE}/{TS}",
    "",
    "/",
])
def test_backup_dir_refuses_wrong_shapes(path: str) -> None:
    with pytest.raises(UsageError):
        paths.parse_backup_dir(path)


@pytest.mark.parametrize("path", [
    f"/data/backups/{DATE}/{TS}",           # a directory, no file name
    f"/data/backups/{DATE}/{TS}/",          # empty file name
    f"/data/backups/{DATE}/{TS}/.",
    f"/data/backups/{DATE}/file",
    f"/data/backup/{DATE}/{TS}/file",
    f"/data/backups/x{DATE}/{TS}/file",
    "file",
])
def test_backup_file_refuses_wrong_shapes(path: str) -> None:
    with pytest.raises(UsageError):
        paths.parse_backup_file(path)


def test_timestamp_must_start_with_its_date() -> None:
    with pytest.raises(UsageError, match="20261125"):
        paths.parse_backup_dir(f"/data/backups/20261125/{TS}")
    with pytest.raises(UsageError, match="20261125"):
        paths.parse_backup_file(f"/data/backups/20261125/{TS}/file")


def test_parse_timestamp_takes_date_from_first_eight_digits() -> None:
    assert paths.parse_timestamp(TS) == paths.BackupDir(DATE, TS)


@pytest.mark.parametrize("text", ["2026112409300", "202611240930001", "2026112409300x", "", f'"{TS}"', f" {TS}"])
def test_parse_timestamp_refuses_anything_but_14_digits(text: str) -> None:
    with pytest.raises(UsageError):
        paths.parse_timestamp(text)


@pytest.mark.parametrize(("sub_path", "expected"), [
    (None, ROOT),
    ("", ROOT),
    ("backups", f"{ROOT}/backups"),
    (f"backups/{DATE}/", f"{ROOT}/backups/{DATE}"),
    (f"{ROOT}/backups", f"{ROOT}/backups"),
    (f"{ROOT}/", ROOT),
    (".", ROOT),
])
def test_under_remote_dir_resolves_inside(sub_path: str | None, expected: str) -> None:
    assert paths.under_remote_dir(ROOT, sub_path) == expected


@pytest.mark.parametrize("sub_path", ["..", "../other", "backups/../..", f"{ROOT}/../etc", "a/../b"])
def test_under_remote_dir_refuses_dotdot(sub_path: str) -> None:
    with pytest.raises(UsageError, match=r"'\.\.'"):
        paths.under_remote_dir(ROOT, sub_path)


@pytest.mark.parametrize("sub_path", ["/", "/etc", "/srv", f"{ROOT}2", f"{ROOT}-old/x"])
def test_under_remote_dir_refuses_absolute_paths_outside(sub_path: str) -> None:
    with pytest.raises(UsageError, match="outside remote_dir"):
        paths.under_remote_dir(ROOT, sub_path)


def test_temp_name_is_hidden_beside_target_and_recognised() -> None:
    final = f"{ROOT}/backups/{DATE}/{TS}/gpbackup_0_{TS}"
    temp = paths.temp_name_for(final)
    assert posixpath.dirname(temp) == posixpath.dirname(final)
    assert paths.is_temp_name(posixpath.basename(temp))
    assert paths.TEMP_RE.match(posixpath.basename(temp))
    assert temp != paths.temp_name_for(final), "two uploads of one file must not share a temp name"


@pytest.mark.parametrize("name", [f"gpbackup_0_{TS}", f"gpbackup_0_{TS}.partial", ".x.partial",
                                  ".x.0123456789abcdeg.partial", "x.0123456789abcdef.partial"])
def test_ordinary_names_are_not_temp_names(name: str) -> None:
    assert not paths.is_temp_name(name)


def test_a_spare_name_is_a_hidden_temp_name_in_its_directory_and_told_from_an_uploads() -> None:
    directory = f"{ROOT}/backups/{DATE}/{TS}"
    spare = paths.spare_temp_name(directory)
    upload = posixpath.basename(paths.temp_name_for(f"{directory}/gpbackup_0_{TS}"))
    assert posixpath.dirname(spare) == directory
    assert paths.is_temp_name(posixpath.basename(spare)) and paths.is_spare_name(posixpath.basename(spare))
    assert not paths.is_spare_name(upload) and not paths.is_spare_name(f".spare.{TS}")
    assert spare != paths.spare_temp_name(directory)


def test_an_empty_spare_is_no_upload_leftover_and_one_written_to_is() -> None:
    spare = posixpath.basename(paths.spare_temp_name(f"{ROOT}/backups/{DATE}/{TS}"))
    upload = posixpath.basename(paths.temp_name_for(f"{ROOT}/backups/{DATE}/{TS}/gpbackup_0_{TS}"))
    assert not paths.is_upload_leftover(spare, 0)
    assert paths.is_upload_leftover(spare, 1)
    assert paths.is_upload_leftover(upload, 0) and paths.is_upload_leftover(upload, 5)
    assert not paths.is_upload_leftover(f"gpbackup_0_{TS}", 5)
