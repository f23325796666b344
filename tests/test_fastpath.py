"""The fast path (sftp_plugin/fastpath) is the only code touching paramiko's private state, it is checked
before use, and the plugin works the same without it (``fast_path: no``, or a paramiko it was not made for)."""

from __future__ import annotations

import os
import re
import struct
import threading
from pathlib import Path

import paramiko
import pytest
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_OPEN,
    CMD_READ,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_WRITE,
    int64,
)

from devtools.gpbackup import LocalBackup
from devtools.harness import Plugin, SiteConfig
from sftp_plugin import fastpath
from sftp_plugin.fastpath import sftp as fastpath_sftp

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


class _Recorder:
    """What SFTPClient._async_request and Pipeline use of an SFTPClient, recording what is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request_number = 7
        self._expecting: dict[int, object] = {}
        self.sock = object()
        self.sent: list[bytes] = []

    def _send_packet(self, kind: int, msg: paramiko.Message) -> None:  # paramiko's framing, recorded
        body = msg.asbytes()
        self.sent.append(struct.pack(">IB", len(body) + 1, kind) + body)


@pytest.mark.unit
def test_a_batch_frames_each_request_as_paramiko_does_and_numbers_them_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    attrs = paramiko.SFTPAttributes()
    attrs.st_mode = 0o600
    requests = [
        (CMD_OPEN, "/r/a file", SFTP_FLAG_WRITE | SFTP_FLAG_CREATE, attrs),
        (CMD_READ, b"\x00\x01handle", int64(5 * 2**32 + 3), 32768),
        (CMD_EXTENDED, "posix-rename@openssh.com", "/r/.a.tmp", "/r/a"),
        (CMD_CLOSE, b"\x00\x01handle"),
    ]
    reference = _Recorder()
    expected_numbers = [paramiko.SFTPClient._async_request(reference, None, *request)
                        for request in [*requests, (CMD_WRITE, b"\x00\x01handle", int64(9), b"data")]]

    batched = _Recorder()
    flushed: list[list[bytes | memoryview]] = []
    monkeypatch.setattr(fastpath_sftp, "send_channel_data", lambda _sock, buffers: flushed.append(list(buffers)))
    pipe = fastpath_sftp.Pipeline(batched)  # type: ignore[arg-type]
    with pipe.batch():
        numbers = [pipe.send(*request) for request in requests]
        assert flushed == []  # nothing leaves before the batch ends
        numbers.append(pipe.send_write(b"\x00\x01handle", 9, memoryview(b"data")))

    assert numbers == expected_numbers
    assert len(flushed) == 1  # sent together, byte for byte what paramiko would have sent one by one
    assert b"".join(bytes(buffer) for buffer in flushed[0]) == b"".join(reference.sent)
    assert set(batched._expecting) == set(numbers)


@pytest.mark.unit
def test_what_a_batch_framed_goes_out_even_when_its_block_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CLOSE framed in it marks its file closed at once: were it dropped, the handle would stay open on the
    # server for as long as a kept session lives.
    flushed: list[list[bytes | memoryview]] = []
    monkeypatch.setattr(fastpath_sftp, "send_channel_data", lambda _sock, buffers: flushed.append(list(buffers)))
    pipe = fastpath_sftp.Pipeline(_Recorder())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="in the block"):
        with pipe.batch():
            pipe.send(CMD_CLOSE, b"\x00\x01handle")
            raise RuntimeError("in the block")

    assert len(flushed) == 1 and bytes(flushed[0][0])[4] == CMD_CLOSE
    with pipe.batch():  # the pipeline is usable again, and an empty batch sends nothing
        pass
    assert len(flushed) == 1
