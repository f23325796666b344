"""What the admin commands print, and how: sizes, ages and rates for people, ``check``'s OK/WARN/FAIL/SKIP
lines (printed as they are made), and aligned tables. No I/O but stdout."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from sftp_plugin.errors import PluginError

log = logging.getLogger("gpbackup_sftp_plugin")

MIB = 1024 * 1024


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    if seconds < 0:
        return "in future"
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def throughput(size: int, seconds: float) -> str:
    return f"{size / MIB / max(seconds, 1e-6):.1f} MiB/s"


def print_table(rows: Sequence[Sequence[str]], right_aligned: Collection[int] = ()) -> None:
    """Rows of cells (the first one the header) in columns two spaces apart: text left-aligned, the columns
    in ``right_aligned`` (numbers) right-aligned; the last column (free text) is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.rjust(width) if i in right_aligned else cell.ljust(width) for i, (cell, width) in
                 enumerate(zip(row, widths))]
        print("  ".join([*cells, row[-1]]))


@dataclass
class CheckLine:
    status: str  # OK, WARN, FAIL or SKIP
    name: str
    detail: str
    advice: str = ""


@dataclass
class Report:
    """The check lines, printed as they are made (a slow step shows where it is)."""

    secrets: list[str] = field(default_factory=list)
    lines: list[CheckLine] = field(default_factory=list)

    def add(self, status: str, name: str, detail: str, advice: str = "") -> None:
        from sftp_plugin.log import mask

        line = CheckLine(status, name, mask(detail, self.secrets), mask(advice, self.secrets))
        self.lines.append(line)
        print(f"{line.status:<4}  {line.name:<11} {line.detail}", flush=True)
        if line.advice:
            print(f"{'':<4}  {'':<11} -> {line.advice}", flush=True)

    def ok(self, name: str, detail: str) -> None:
        self.add("OK", name, detail)

    def warn(self, name: str, detail: str, advice: str = "") -> None:
        self.add("WARN", name, detail, advice)

    def fail(self, name: str, detail: str, advice: str) -> None:
        self.add("FAIL", name, detail, advice)

    def skip(self, name: str, why: str) -> None:
        self.add("SKIP", name, why)

    def fail_from(self, name: str, error: BaseException, log_path: str | None) -> None:
        """A FAIL line for any exception: a PluginError's own advice, or a pointer to the log."""
        if isinstance(error, PluginError):
            self.fail(name, error.message, error.hint or "see the message above")
        elif isinstance(error, OSError):
            self.fail(name, str(error) or type(error).__name__, "check the backup host and the network")
        else:
            log.error("check %s: unexpected failure", name, exc_info=error)
            where = f"details in {log_path}" if log_path else "set log_dir to a writable directory for details"
            self.fail(name, f"unexpected error: {type(error).__name__}: {error}", f"please report this; {where}")

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line.status == "FAIL")
