"""scripts/demo.py (`make demo`): the whole gpbackup/gprestore round trip, and that it leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.harness import RUN_TIMEOUT

REPO = Path(__file__).resolve().parent.parent
# As `make demo` runs it: a module, from the repository root.
DEMO = [sys.executable, "-m", "scripts.demo"]
# Per-connection sshd children exit once their client has; give them this long to do so.
SETTLE_TIMEOUT = 20


def demo_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """HOME and TMPDIR of their own (so leftovers are visible), no ssh-agent."""
    tmpdir = tmp_path / "tmp"
    home = tmp_path / "home"
    tmpdir.mkdir()
    home.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1")
    env.pop("SSH_AUTH_SOCK", None)
    return env, tmpdir


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (e.g. an sshd started with a config under it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(tmpdir: Path) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while processes_mentioning(str(tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(tmpdir)) == [], "processes (sshd?) left running"
    assert list(tmpdir.iterdir()) == [], "temporary files left behind"


def test_demo_round_trips_a_cluster_verifies_every_byte_and_leaves_nothing(tmp_path: Path) -> None:
    env, tmpdir = demo_env(tmp_path)
    result = subprocess.run(
        [*DEMO, "--segment-mib", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=RUN_TIMEOUT,
        check=False,
    )

    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert result.stderr == ""
    assert out.rstrip().endswith("RESULT: OK")
    for step in (
        "setup_plugin_for_backup: coordinator, 2 segment hosts, 4 segments: ok",
        "backup_data: 4 segment streams at once",
        "backup_file: 4 segment TOCs: ok",
        "cleanup_plugin_for_backup",
        "setup_plugin_for_restore",
        "restore_data: 4 segment streams at once",
        "restore_data_subset: content 0",
        "cleanup_plugin_for_restore",
    ):
        assert step in out, f"missing step {step!r} in:\n{out}"
    assert re.search(r"files backed up and restored: 12 \(8\.0 MiB\)", out), out
    assert re.search(r"throughput: backup_data [\d.]+ \w+/s, restore_data [\d.]+ \w+/s", out), out
    assert re.search(r"^  backups/\d{8}/\d{14}/$", out, re.M), "the remote tree is missing"
    assert "verified: every file and data stream restored byte for byte" in out
    assert "cleanup: stopped the throwaway sshd" in out
    assert_nothing_left(tmpdir)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_cleans_up_everything_when_interrupted(tmp_path: Path, signum: signal.Signals) -> None:
    env, tmpdir = demo_env(tmp_path)
    process = subprocess.Popen(
        [*DEMO, "--segment-mib", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert process.stdout is not None
    seen = []
    try:
        for line in process.stdout:  # interrupt while plugin calls are in flight against the running sshd
            seen.append(line)
            if "setup_plugin_for_backup" in line:
                assert processes_mentioning(str(tmpdir)), "sshd should be running at this point"
                process.send_signal(signum)
                break
        rest = process.communicate(timeout=RUN_TIMEOUT)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = "".join(seen) + rest

    assert process.returncode == 128 + signum, out
    assert f"interrupted by signal {int(signum)}" in out
    assert "RESULT: FAILED" in out
    assert_nothing_left(tmpdir)
