"""The plugin as installed by scripts/install.sh must run inside Greenplum 6's environment.

On every segment host gpbackup runs ``source $GPHOME/greenplum_path.sh && <plugin> ...``, which points
PYTHONHOME and PYTHONPATH at Greenplum's bundled Python 2.7 and prepends its lib/ to LD_LIBRARY_PATH.
A fake GPHOME reproduces that, with modules that abort loudly if a Python 3 interpreter ever reads them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import RUN_TIMEOUT, SiteConfig, assert_ok
from tests.helpers import isolated_env

REPO = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 900
GREENPLUM_PYTHON = 'raise SystemExit("greenplum python 2.7 loaded")\n'
POISONED_MODULE = 'raise ImportError("greenplum python 2.7 site-packages loaded: {name}")\n'


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The prefix of a fresh scripts/install.sh installation (its own venv, from this checkout)."""
    prefix = tmp_path_factory.mktemp("gp_install") / "gpbackup_sftp_plugin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") or k == "PYTHON"}
    result = subprocess.run([str(REPO / "scripts" / "install.sh"), str(prefix), str(REPO)], env=env,
                            capture_output=True, timeout=INSTALL_TIMEOUT, check=False)
    assert result.returncode == 0, f"install.sh failed: {result.stdout!r} {result.stderr!r}"
    assert f"executablepath: {prefix}/bin/gpbackup_sftp_plugin" in result.stdout.decode()
    if shutil.which("cc"):  # then the calls below go through the compiled client and its -I fallback
        assert "compiled client installed" in result.stdout.decode(), result.stderr
        assert (prefix / "bin" / "gpbackup_sftp_plugin").read_bytes()[:4] == b"\x7fELF"
    yield prefix


@pytest.fixture(scope="module")
def gphome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake $GPHOME whose Python 2.7 tree and python modules abort when loaded."""
    root = tmp_path_factory.mktemp("gphome")
    versions = ["python2.7", f"python{sys.version_info.major}.{sys.version_info.minor}"]
    for version in versions:
        stdlib = root / "ext" / "python" / "lib" / version
        (stdlib / "encodings").mkdir(parents=True)
        (stdlib / "os.py").write_text(GREENPLUM_PYTHON)
        (stdlib / "encodings" / "__init__.py").write_text(GREENPLUM_PYTHON)
    site = root / "lib" / "python"
    site.mkdir(parents=True)
    for name in ("yaml", "paramiko", "tenacity"):
        (site / f"{name}.py").write_text(POISONED_MODULE.format(name=name))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'greenplum python on PATH was used' >&2\nexit 97\n")
        (bin_dir / name).chmod(0o755)
    return root


def greenplum_env(home: Path, gphome: Path) -> dict[str, str]:
    """What `source $GPHOME/greenplum_path.sh` leaves in the environment (the parts that matter here)."""
    base = isolated_env(home)
    return isolated_env(home, {
        "GPHOME": str(gphome),
        "PYTHONHOME": str(gphome / "ext" / "python"),
        "PYTHONPATH": str(gphome / "lib" / "python"),
        "LD_LIBRARY_PATH": ":".join(filter(None, [str(gphome / "lib"), base.get("LD_LIBRARY_PATH", "")])),
        "PATH": f"{gphome / 'bin'}:{base.get('PATH', '/usr/bin:/bin')}",
    })


def bash(command: list[str | Path], env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run as gpbackup does: bash -c "<executablepath> <command> <args...>"."""
    line = " ".join(shlex.quote(str(part)) for part in command)
    return subprocess.run(["bash", "-c", line], input=stdin, capture_output=True, env=env, timeout=RUN_TIMEOUT,
                          check=False)


def test_fake_greenplum_environment_breaks_an_interpreter_that_honours_it(installed: Path, gphome: Path,
                                                                          tmp_path: Path) -> None:
    # Without -I the very interpreter of the installation cannot start or import its dependencies here,
    # so the tests below would fail if the console script did not isolate itself.
    result = bash([installed / "bin" / "python", "-c", "import yaml, paramiko"], greenplum_env(tmp_path, gphome))
    assert result.returncode != 0


def test_version_commands_run_under_greenplum_environment(installed: Path, gphome: Path, tmp_path: Path) -> None:
    exe = installed / "bin" / "gpbackup_sftp_plugin"
    env = greenplum_env(tmp_path, gphome)
    api = assert_ok(bash([exe, "plugin_api_version"], env)).stdout.decode().strip()
    assert tuple(int(p) for p in api.split(".")) >= (0, 3, 0)
    words = assert_ok(bash([exe, "--version"], env)).stdout.decode().split()
    assert len(words) == 3 and words[:2] == ["gpbackup_sftp_plugin", "version"]


def test_backup_data_and_restore_data_run_under_greenplum_environment(installed: Path, gphome: Path,
                                                                      config: SiteConfig, backup: LocalBackup,
                                                                      tmp_path: Path) -> None:
    exe = installed / "bin" / "gpbackup_sftp_plugin"
    env = greenplum_env(tmp_path, gphome)
    key = backup.file(f"gpbackup_0_{backup.timestamp}")
    data = os.urandom(1_000_000) + b"\x00\n\r\xff end"
    assert_ok(bash([exe, "backup_data", config.path, key], env, stdin=data))
    assert backup.remote(config.remote_dir, key.name).read_bytes() == data
    restored = assert_ok(bash([exe, "restore_data", config.path, key], env)).stdout
    assert restored == data
