"""``check --cluster``: ``check`` on every host of the cluster over ssh, one summary line per host.

Every host of a Greenplum cluster connects to the backup host on its own, with
its own keys, known_hosts, ``~/.ssh/config`` and network path: one host
passing says nothing of the others. The hosts come from a host file (one name
per line, ``#`` comments: the gpssh format) or, without one, from the
coordinator's ``gp_segment_configuration`` through ``psql``. They are reached
as ``scripts/install-cluster.sh`` reaches them: the plain OpenSSH client in
BatchMode (a password prompt would hang a parallel run), plus the words of
``SSH_OPTS``. Each host checks a copy of the config, as gpbackup hands each
host a copy: a private temporary file there, removed afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sftp_plugin.errors import PluginError, UsageError

# Where gpbackup's own list of hosts comes from: the coordinator, standby, primaries and mirrors.
HOSTS_QUERY = "select distinct hostname from gp_segment_configuration"
# The database psql reads it from when PGDATABASE does not say: it exists in every cluster
# (gpadmin's own database, psql's default, need not).
HOSTS_DATABASE = "postgres"
# Seconds psql may take to answer: a coordinator that does not answer in this long is not up.
PSQL_TIMEOUT = 60
# Hosts checked at once, as install-cluster.sh's default: each holds an SSH session to its host
# and one to the backup host, which stays below sshd's default MaxStartups of 10 pending logins.
PARALLEL = 8
# Seconds ssh waits for a host's TCP connection: the plugin's own connect_timeout default.
SSH_CONNECT_TIMEOUT = 30
# Longest a host's whole check may take, probe included, before it is reported as not answering:
# one dead host must not stall the summary; ample for the 8 MiB probe over a slow link.
HOST_TIMEOUT = 600
# ssh's exit status when ssh itself failed (connection, authentication), not the remote command.
SSH_FAILED = 255
# A POSIX shell's exit status for a command it cannot find.
COMMAND_NOT_FOUND = 127


@dataclass(frozen=True)
class HostResult:
    host: str
    ok: bool
    summary: str


def parse_hosts(text: str) -> list[str]:
    """Host names, one per line: the first word, '#' comments and blank lines dropped, each once, in order."""
    found = [words[0] for line in text.splitlines() if (words := line.split("#", 1)[0].split())]
    return list(dict.fromkeys(found))


def read_host_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read host file {path}: {getattr(err, 'strerror', None) or err}",
                         "give --cluster a file with one host name per line") from None
    hosts = parse_hosts(text)
    if not hosts:
        raise UsageError(f"no host names in {path}", "one host name per line; '#' starts a comment")
    return hosts


def hosts_from_catalog() -> list[str]:
    """The cluster's hosts from gp_segment_configuration, through psql on the coordinator."""
    argv = ["psql", "-X", "-w", "-A", "-t", "-c", HOSTS_QUERY]  # no psqlrc, never a password prompt
    if not os.environ.get("PGDATABASE"):
        argv[1:1] = ["-d", HOSTS_DATABASE]
    hint = "run it on the coordinator as gpadmin with the cluster up, or give a host file: --cluster HOSTFILE"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=PSQL_TIMEOUT, check=False)
    except FileNotFoundError:
        raise UsageError("--cluster without a host file asks psql for the hosts, and psql is not on PATH",
                         "give a host file: --cluster HOSTFILE (one host name per line)") from None
    except subprocess.TimeoutExpired:
        raise PluginError(f"psql did not list the cluster's hosts within {PSQL_TIMEOUT} s", hint) from None
    if result.returncode != 0:
        detail = _last_line(result.stderr) or f"exit {result.returncode}"
        raise PluginError(f"psql could not list the cluster's hosts: {detail}", hint)
    hosts = parse_hosts(result.stdout)
    if not hosts:
        raise PluginError("gp_segment_configuration lists no hosts", hint)
    return hosts


def this_executable() -> list[str]:
    """How to run this very plugin on another host: the same absolute path (gpbackup requires
    executablepath to be identical on every host); ``python -m`` when run that way."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == "__main__.py":
        return [sys.executable, "-m", "sftp_plugin"]
    return [script]


def remote_script(executable: Sequence[str], probe_mib: int) -> str:
    """The shell command run on each host: the config from stdin into a private temporary file (mktemp
    makes it 0600), ``check`` on it, the file removed, check's exit status passed on."""
    check = " ".join(shlex.quote(word) for word in [*executable, "check"])
    return (
        'f=$(mktemp "${TMPDIR:-/tmp}/gpbackup_sftp_plugin_check.XXXXXX") || exit 1; '
        f'cat >"$f" && {check} "$f" --probe-mib {int(probe_mib)}; rc=$?; rm -f "$f"; exit $rc'
    )


def ssh_command() -> list[str]:
    """ssh as install-cluster.sh runs it: BatchMode, then the words of SSH_OPTS."""
    if shutil.which("ssh") is None:
        raise UsageError("--cluster runs check on each host over ssh, and ssh is not on PATH",
                         "install the OpenSSH client")
    # Options given first win in ssh, so SSH_OPTS can set its own ConnectTimeout but not undo BatchMode.
    return ["ssh", "-o", "BatchMode=yes", *shlex.split(os.environ.get("SSH_OPTS", "")),
            "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}"]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def judge(host: str, code: int, stdout: str, stderr: str, executable: str) -> HostResult:
    """One host's summary from its check's exit status and output (check prints `STATUS  name  detail` lines)."""
    lines = stdout.splitlines()
    failed = [" ".join(line.split()) for line in lines if line.startswith("FAIL ")]
    if code == 0:
        warned = sum(1 for line in lines if line.startswith("WARN "))
        return HostResult(host, True, f"OK ({warned} warning{'s' if warned != 1 else ''})" if warned else "OK")
    if failed:
        return HostResult(host, False, f"{len(failed)} FAILED, the first: {failed[0]}")
    if code == SSH_FAILED:
        return HostResult(host, False, f"FAILED to reach the host: {_last_line(stderr) or 'ssh failed'}")
    if code == COMMAND_NOT_FOUND:
        return HostResult(host, False, f"FAILED: {executable} is not installed there (the same path on every "
                                       "host: scripts/install-cluster.sh)")
    detail = _last_line(stderr) or _last_line(stdout) or "no output"
    return HostResult(host, False, f"FAILED (exit {code}): {detail}")


def check_host(host: str, ssh: Sequence[str], script: str, config: bytes, executable: str) -> HostResult:
    try:
        result = subprocess.run([*ssh, "--", host, script], input=config, capture_output=True,
                                timeout=HOST_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return HostResult(host, False, f"FAILED: no answer within {HOST_TIMEOUT} s")
    return judge(host, result.returncode, result.stdout.decode(errors="replace"),
                 result.stderr.decode(errors="replace"), executable)


def check_hosts(hosts: Sequence[str], config: bytes, probe_mib: int, parallel: int = PARALLEL) -> Iterator[HostResult]:
    """Run check on every host, ``parallel`` at a time; yield the results in the hosts' order, each as soon
    as it and those before it are in."""
    executable = this_executable()
    ssh = ssh_command()
    script = remote_script(executable, probe_mib)
    shown = " ".join(executable)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        yield from pool.map(lambda host: check_host(host, ssh, script, config, shown), hosts)
