"""scripts/install-cluster.sh: install the plugin over ssh on every host of a Greenplum host file.

The "cluster" is 127.0.0.1 reached through the test sshd, with SSH_OPTS carrying
its port, key and known_hosts, exactly as an admin would pass -p/-i/-o.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

from devtools.harness import RUN_TIMEOUT
from devtools.sshd import SshServer, free_port
from sftp_plugin import PLUGIN_NAME, __version__
from tests.helpers import sshd_fixture

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install-cluster.sh"
REMOTE_SOURCE_GLOB = "/tmp/gpbackup_sftp_plugin_src.*"


# The "cluster": 127.0.0.1, reached through an sshd of the test's own.
server = sshd_fixture("sshd_install")


def ssh_opts(server: SshServer, port: int | None = None) -> str:
    return (
        f"-F /dev/null -p {port or server.port} -i {server.user_key} "
        f"-o UserKnownHostsFile={server.known_hosts} -o StrictHostKeyChecking=yes"
    )


def install(tmp_path: Path, hostfile: Path, *args: str, opts: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), SSH_OPTS=opts)
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.run(
        [str(SCRIPT), str(hostfile), *args], capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, check=False
    )


def test_installs_on_every_host_of_the_hostfile_and_prints_the_executablepath(
    server: SshServer, tmp_path: Path
) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# Greenplum hosts\n\n127.0.0.1   # the coordinator\n   \n127.0.0.1\n")
    prefix = tmp_path / "opt" / "gpbackup_sftp_plugin"
    sources_before = set(glob.glob(REMOTE_SOURCE_GLOB))

    result = install(tmp_path, hostfile, str(prefix), opts=ssh_opts(server))

    assert result.returncode == 0, result.stdout + result.stderr
    executable = prefix / "bin" / PLUGIN_NAME
    assert result.stdout.splitlines()[-1] == f"executablepath: {executable}"
    assert "on 1 host(s)" in result.stdout, "comments, blanks and duplicates must be dropped"
    assert f"127.0.0.1: ok ({PLUGIN_NAME} version {__version__})" in result.stdout
    version = subprocess.run(
        [str(executable), "--version"], capture_output=True, text=True, check=False, timeout=RUN_TIMEOUT
    )
    assert (version.returncode, version.stdout, version.stderr) == (0, f"{PLUGIN_NAME} version {__version__}\n", "")
    assert set(glob.glob(REMOTE_SOURCE_GLOB)) == sources_before, "the copied source must be removed from the host"


def test_reports_the_host_that_failed_and_exits_nonzero(server: SshServer, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1\n")

    result = install(tmp_path, hostfile, str(tmp_path / "opt"), opts=ssh_opts(server, port=free_port()))

    assert result.returncode == 1
    assert "127.0.0.1: FAILED" in result.stderr
    assert "executablepath" not in result.stdout


def test_refuses_a_relative_prefix(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("sdw1\n")

    result = install(tmp_path, hostfile, "relative/prefix", opts="")

    assert result.returncode == 2
    assert "absolute" in result.stderr


def test_refuses_a_hostfile_without_hosts(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# only comments\n\n")

    result = install(tmp_path, hostfile, str(tmp_path / "opt"), opts="")

    assert result.returncode == 2
    assert "no hostnames" in result.stderr
