"""Pure mapping from gpbackup's local paths to paths on the backup host.

gpbackup hands the plugin paths ending in
``.../backups/<YYYYMMDD>/<YYYYMMDDHHMMSS>/<file name>``; everything before
``backups`` differs per segment, while file names already carry the content id,
so the last four components identify a file across the whole cluster. Remote
layout: ``<remote_dir>/backups/<date>/<timestamp>/<file name>``.

No I/O here: every function is a plain computation, unit-tested without a
network. Anything that could reach outside ``remote_dir`` is refused here,
before a connection is made.
"""

from __future__ import annotations

import posixpath
import re
import secrets
from dataclasses import dataclass

from sftp_plugin.errors import UsageError

BACKUPS = "backups"
DATE_RE = re.compile(r"\d{8}")
TIMESTAMP_RE = re.compile(r"\d{14}")

# Uploads go to a hidden name in the final directory and are renamed into
# place when complete; cleanup recognises leftovers by this exact shape.
TEMP_SUFFIX = ".partial"
TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.partial$")
# A temporary name made before its file is known (transfer.SpareFiles): `.spare.<16 hex digits>.partial`.
SPARE_STEM = "spare"


@dataclass(frozen=True)
class BackupDir:
    """One backup's directory: ``backups/<date>/<timestamp>``."""

    date: str
    timestamp: str

    def remote(self, remote_dir: str) -> str:
        return posixpath.join(remote_dir, BACKUPS, self.date, self.timestamp)

    def remote_date_dir(self, remote_dir: str) -> str:
        return posixpath.join(remote_dir, BACKUPS, self.date)


@dataclass(frozen=True)
class BackupFile:
    """One file of one backup: ``backups/<date>/<timestamp>/<name>``."""

    backup: BackupDir
    name: str

    def remote(self, remote_dir: str) -> str:
        return posixpath.join(self.backup.remote(remote_dir), self.name)


def _refuse_dotdot(path: str) -> None:
    if ".." in path.split("/"):
        raise UsageError(f"path {path!r} contains '..'", "pass the path gpbackup gave, without '..'")


def _check_backup_components(date: str, timestamp: str, path: str) -> BackupDir:
    if not DATE_RE.fullmatch(date) or not TIMESTAMP_RE.fullmatch(timestamp):
        raise UsageError(
            f"path {path!r} does not end in backups/<YYYYMMDD>/<YYYYMMDDHHMMSS>",
            "pass the backup directory or file path gpbackup gave",
        )
    if not timestamp.startswith(date):
        raise UsageError(
            f"path {path!r}: timestamp {timestamp} is not inside date directory {date}",
            "the timestamp directory must start with its date",
        )
    return BackupDir(date, timestamp)


def parse_backup_dir(path: str) -> BackupDir:
    """``.../backups/<date>/<timestamp>`` (a trailing slash allowed) -> BackupDir."""
    _refuse_dotdot(path)
    parts = path.rstrip("/").split("/")
    if len(parts) < 3 or parts[-3] != BACKUPS:
        raise UsageError(
            f"path {path!r} does not end in backups/<YYYYMMDD>/<YYYYMMDDHHMMSS>",
            "pass the backup directory gpbackup gave",
        )
    return _check_backup_components(parts[-2], parts[-1], path)


def parse_backup_file(path: str) -> BackupFile:
    """``.../backups/<date>/<timestamp>/<name>`` -> BackupFile."""
    _refuse_dotdot(path)
    parts = path.split("/")
    if len(parts) < 4 or parts[-4] != BACKUPS or parts[-1] in ("", "."):
        raise UsageError(
            f"path {path!r} does not end in backups/<YYYYMMDD>/<YYYYMMDDHHMMSS>/<file name>",
            "pass the file path gpbackup gave",
        )
    return BackupFile(_check_backup_components(parts[-3], parts[-2], path), parts[-1])


def parse_timestamp(text: str) -> BackupDir:
    """A 14-digit backup timestamp -> its BackupDir (the date is its first 8 digits)."""
    if not TIMESTAMP_RE.fullmatch(text):
        raise UsageError(f"timestamp {text!r} is not 14 digits", "pass a timestamp like 20261124093000")
    return BackupDir(text[:8], text)


def under_remote_dir(remote_dir: str, sub_path: str | None) -> str:
    """Resolve a user-given sub-path inside ``remote_dir``; refuse anything outside it.

    Relative paths are taken from ``remote_dir``; absolute ones must lie under
    it. ``None`` or empty means ``remote_dir`` itself.
    """
    if not sub_path:
        return remote_dir
    _refuse_dotdot(sub_path)
    if sub_path.startswith("/"):
        candidate = posixpath.normpath(sub_path)
    else:
        candidate = posixpath.normpath(posixpath.join(remote_dir, sub_path))
    root = posixpath.normpath(remote_dir)
    if candidate != root and not candidate.startswith(root.rstrip("/") + "/"):
        raise UsageError(
            f"path {sub_path!r} is outside remote_dir {remote_dir}",
            "give a path relative to remote_dir, or an absolute path under it",
        )
    return candidate


def temp_name_for(final_path: str) -> str:
    """A unique hidden temporary name beside ``final_path`` for an upload in progress."""
    directory, name = posixpath.split(final_path)
    return posixpath.join(directory, f".{name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")


def spare_temp_name(directory: str) -> str:
    """A unique temporary name in ``directory`` for an upload to come, whose file is not known yet."""
    return temp_name_for(posixpath.join(directory, SPARE_STEM))


def is_temp_name(name: str) -> bool:
    return bool(TEMP_RE.match(name))


def is_spare_name(name: str) -> bool:
    """Whether a temporary name (is_temp_name) was made by spare_temp_name."""
    return is_temp_name(name) and name.startswith(f".{SPARE_STEM}.")


def is_upload_leftover(name: str, size: int) -> bool:
    """Whether a temporary file of ``size`` bytes is an upload's: not an empty spare, which a worker opened
    ahead and no upload has written to yet (removed when its session ends, or by the cleanup of its backup)."""
    return is_temp_name(name) and (size > 0 or not is_spare_name(name))
