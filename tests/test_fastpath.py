"""The fast path (sftp_plugin/fastpath) is the only code touching paramiko's private state, it is checked
before use, and the plugin works the same without it (``fast_path: no``, or a paramiko it was not made for)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import paramiko
import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig
from sftp_plugin import fastpath

PACKAGE = Path(__file__).resolve().parent.parent / "sftp_plugin"
# Private names of paramiko's classes the plugin has used: none of them may appear outside fastpath/.
PRIVATE_NAMES = re.compile(
    r"_Packetizer__|_async_request|_read_response|_expecting\b|_convert_status|\bin_buffer\b|\._request\(|"
    r"request_number|_wait_for_send_window|_send_user_message|_parse_kex_init|_adjust_cwd|_preferred_\w+|"
    r"\._lock\b|_inc_iv_counter|_trigger_rekey"
)
MIB = 1024 * 1024


def test_no_module_outside_fastpath_touches_paramikos_private_state() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "fastpath" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE_NAMES.search(code):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []


def test_this_paramiko_has_everything_the_fast_path_needs() -> None:
    if paramiko.__version__ != fastpath.TESTED_PARAMIKO[1]:
        pytest.skip(f"paramiko {paramiko.__version__}: the fast path is checked with {fastpath.TESTED_PARAMIKO[1]}")
    assert fastpath.packet_code_missing() == () and fastpath.sftp_code_missing() == ()


@pytest.mark.parametrize("size", [0, 1000, 3 * MIB + 5])
def test_without_the_fast_path_streams_round_trip_byte_exact(plugin: Plugin, config: SiteConfig, backup: LocalBackup,
                                                             tmp_path: Path, size: int) -> None:
    cfg = config.write("plain.yaml", fast_path="no")
    data = os.urandom(size)
    key = backup.file(f"gpbackup_0_{backup.timestamp}")
    plugin.ok("backup_data", cfg, key, stdin=data)
    assert plugin.ok("restore_data", cfg, key).stdout == data
    offsets = tmp_path / "offsets"
    ranges = [(0, min(size, 10)), (size // 2, size)]
    offsets.write_text(f"2 {ranges[0][0]} {ranges[0][1]} {ranges[1][0]} {ranges[1][1]}")
    assert plugin.ok("restore_data_subset", cfg, key, offsets).stdout == b"".join(data[s:e] for s, e in ranges)
    assert "paramiko's own packet code" not in config.log_text()  # chosen, not fallen back to


def test_without_the_fast_path_files_round_trip_and_check_passes(plugin: Plugin, config: SiteConfig,
                                                                 backup: LocalBackup) -> None:
    cfg = config.write("plain_files.yaml", fast_path="no")
    name = f"gpbackup_{backup.timestamp}_metadata.sql"
    source = backup.file(name)
    data = os.urandom(2 * MIB + 1)
    source.write_bytes(data)
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", "-1")
    plugin.ok("backup_file", cfg, source)
    source.unlink()
    plugin.ok("restore_file", cfg, source)
    assert source.read_bytes() == data
    result = plugin.run("check", cfg, "--probe-mib", "1")
    assert result.returncode == 0, result.stdout.decode()
