"""The compiled client (launcher/): it finds the same fork server as the Python code, hands it warm
calls without starting Python, and runs the Python plugin whenever no server takes the call.

`make test` installs it as the venv's gpbackup_sftp_plugin, so the rest of the suite (signals, refusals,
a killed client) runs through it too; `make test-oldest` keeps pip's Python client, and these tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import PLUGIN_EXE, Plugin, SiteConfig, assert_failed, assert_ok, socket_dir_env
from sftp_plugin import __version__, cli
from tests.helpers import finish, own_fork_server, sha256, wait_until

REPO = Path(__file__).resolve().parent.parent
ELF_MAGIC = b"\x7fELF"


def installed_client_is_compiled() -> bool:
    with open(PLUGIN_EXE, "rb") as handle:
        return handle.read(4) == ELF_MAGIC


needs_compiled_client = pytest.mark.skipif(
    not installed_client_is_compiled(), reason="the Python client is installed here (make test-oldest)")
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("launcher_build", REPO / "launcher" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_compiler
def test_the_built_client_agrees_with_the_python_code_on_digest_and_routes(build: ModuleType,
                                                                           tmp_path: Path) -> None:
    output = tmp_path / "gpbackup_sftp_plugin"
    build.build(str(output))  # raises BuildError when the self-test finds any difference
    assert output.read_bytes()[:4] == ELF_MAGIC
    assert os.stat(output).st_mode & 0o777 == 0o755


def _has_loader(binary: Path) -> bool:
    """Whether the ELF file `binary` names a dynamic loader (a PT_INTERP program header)."""
    import struct

    data = binary.read_bytes()
    assert data[:4] == ELF_MAGIC and data[4] == 2  # 64-bit
    endian = "<" if data[5] == 1 else ">"
    offset, = struct.unpack_from(endian + "Q", data, 0x20)
    size, count = struct.unpack_from(endian + "HH", data, 0x36)
    return any(struct.unpack_from(endian + "I", data, offset + i * size)[0] == 3 for i in range(count))  # PT_INTERP


def _static_libraries() -> bool:
    compiler = shutil.which("cc") or "cc"
    return all(os.path.isabs(subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                                            check=False).stdout.strip()) for name in ("libc.a", "libz.a"))


@needs_compiler
@pytest.mark.skipif(not _static_libraries(), reason="no libc.a or libz.a: the client is linked dynamically")
def test_the_client_is_linked_without_the_dynamic_loader_where_static_libraries_are_installed(
        build: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "gpbackup_sftp_plugin"
    build.build(str(output))
    assert not _has_loader(output)


@needs_compiler
def test_a_toolchain_that_cannot_link_statically_still_installs_a_dynamic_client(
        build: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "STATIC", ("-lno-such-library-for-static-linking",))
    output = tmp_path / "gpbackup_sftp_plugin"
    build.build(str(output))
    assert _has_loader(output)
    result = subprocess.run([str(output), "plugin_api_version"], capture_output=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{cli.API_VERSION}\n".encode(), b"")


@needs_compiler
def test_a_client_that_would_route_differently_is_not_installed(build: ModuleType, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    source = (REPO / "launcher" / "gpbackup_sftp_plugin.c").read_text()
    # One deliberate difference: the route without the NUL between path and content.
    broken = source.replace('int rc = absolute_path(config_path, cwd, &b) | put(&b, "", 1);',
                            "int rc = absolute_path(config_path, cwd, &b);")
    assert broken != source
    (tmp_path / "broken.c").write_text(broken)
    monkeypatch.setattr(build, "SOURCE", str(tmp_path / "broken.c"))
    output = tmp_path / "gpbackup_sftp_plugin"
    output.write_text("#!/bin/sh\n")  # what was there stays
    with pytest.raises(build.BuildError, match="disagrees with the Python code"):
        build.build(str(output))
    assert output.read_text() == "#!/bin/sh\n"


def client_executable(pid: int) -> str:
    return os.path.realpath(f"/proc/{pid}/exe")


class Calls:
    def __init__(self, plugin: Plugin, config: SiteConfig, tmpdir: Path) -> None:
        self.plugin, self.config, self.env = plugin, config, socket_dir_env(tmpdir)

    def started(self, backup: LocalBackup, name: str) -> subprocess.Popen[bytes]:
        return self.plugin.popen("backup_data", self.config.path, backup.file(name), stdin=subprocess.PIPE,
                                 env_extra=self.env)

    def served_calls(self) -> int:
        return len(re.findall(r"fork server worker", self.config.log_text()))


@pytest.fixture
def calls(plugin: Plugin, fresh_config: SiteConfig) -> Iterator[Calls]:
    with own_fork_server(fresh_config, "gpsftp-lc.") as tmpdir:
        yield Calls(plugin, fresh_config, tmpdir)


@needs_compiled_client
def test_with_no_server_the_client_runs_the_python_plugin_in_its_own_process(calls: Calls,
                                                                             backup: LocalBackup) -> None:
    process = calls.started(backup, "gpbackup_0_first")
    python = os.path.realpath(sys.executable)
    assert wait_until(lambda: client_executable(process.pid) == python), client_executable(process.pid)
    data = os.urandom(100_000)
    finish(process, data)
    assert calls.served_calls() == 0
    restored = assert_ok(calls.plugin.run("restore_data", calls.config.path, backup.file("gpbackup_0_first"),
                                          env_extra=calls.env))
    assert sha256(restored.stdout) == sha256(data)


@needs_compiled_client
def test_a_call_the_fork_server_takes_never_starts_python(calls: Calls, backup: LocalBackup) -> None:
    finish(calls.started(backup, "gpbackup_0_warm_up"), b"x" * 1000)  # runs here and leaves a server
    assert wait_until(lambda: calls.served_calls() == 0 and "serving" in calls.config.log_text())
    for number in range(3):
        served = calls.served_calls()
        process = calls.started(backup, f"gpbackup_0_served_{number}")
        assert wait_until(lambda s=served: calls.served_calls() == s + 1), "the server did not take the call"
        # The worker runs the call while the client waits for its end: still this program, not Python.
        assert client_executable(process.pid) == os.path.realpath(PLUGIN_EXE)
        data = os.urandom(50_000 + number)
        finish(process, data)
        restored = assert_ok(calls.plugin.run("restore_data", calls.config.path,
                                              backup.file(f"gpbackup_0_served_{number}"), env_extra=calls.env))
        assert sha256(restored.stdout) == sha256(data)


@needs_compiler
def test_version_commands_are_answered_without_python_and_a_python_that_cannot_start_is_one_line(
        build: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client built for an interpreter that is not there: whatever it answers, it answered itself.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    output = tmp_path / "gpbackup_sftp_plugin"
    build.build(str(output))
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}
    for argv, answer in ((["plugin_api_version"], cli.API_VERSION),
                         (["--version", "/ignored/config.yaml"], f"{cli.PLUGIN_NAME} version {__version__}")):
        result = subprocess.run([str(output), *argv], capture_output=True, env=env, check=False)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{answer}\n".encode(), b"")
    config = tmp_path / "plugin.yaml"
    config.write_text("executablepath: x\n")
    result = subprocess.run([str(output), "backup_file", str(config), "/tmp/x"], capture_output=True, env=env,
                            check=False)
    message = assert_failed(result)
    assert f"cannot start {tmp_path / 'no-such-python'}" in message and "scripts/install.sh" in message
