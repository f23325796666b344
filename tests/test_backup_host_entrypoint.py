"""docker/backup-host/entrypoint.sh, run directly (no Docker): host keys, generated sshd_config, backup user."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.harness import RUN_TIMEOUT, Plugin
from devtools.sshd import free_port, keygen, start_entrypoint, stop_entrypoint, wait_for_ssh_banner

HOST_KEY_FILES = ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_ecdsa_key", "ssh_host_ecdsa_key.pub")


@contextmanager
def entrypoint(sshd_dir: Path, authorized_keys: Path, **env: str) -> Iterator[int]:
    """Run the entrypoint (and so sshd) on a free port on 127.0.0.1 until the block ends; yields the port."""
    port = free_port()
    log = sshd_dir.parent / f"entrypoint-{port}.log"
    process = start_entrypoint(sshd_dir, port, authorized_keys, log, **env)
    try:
        wait_for_ssh_banner("127.0.0.1", port, process, log)
        yield port
    finally:
        stop_entrypoint(process)


def presented_host_key(port: int) -> str:
    """The ed25519 host key sshd presents, as ssh-keyscan sees it: '<type> <base64>'."""
    out = subprocess.run(
        ["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    ).stdout
    lines = [line.split(None, 1)[1] for line in out.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1, out
    return lines[0].strip()


def host_keys(sshd_dir: Path) -> dict[str, bytes]:
    return {name: (sshd_dir / name).read_bytes() for name in HOST_KEY_FILES}


def test_host_keys_are_generated_once_and_kept_across_restarts(tmp_path: Path) -> None:
    sshd_dir = tmp_path / "state"
    authorized_keys = tmp_path / "authorized_keys"
    authorized_keys.write_text("")

    with entrypoint(sshd_dir, authorized_keys) as port:
        first_files = host_keys(sshd_dir)
        first_presented = presented_host_key(port)
    with entrypoint(sshd_dir, authorized_keys) as port:
        assert host_keys(sshd_dir) == first_files
        assert presented_host_key(port) == first_presented

    public = (sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()
    assert first_presented == f"{public[0]} {public[1]}"


def test_generated_sshd_config_passes_sshd_t(tmp_path: Path) -> None:
    sshd_dir = tmp_path / "state"
    authorized_keys = tmp_path / "authorized_keys"
    authorized_keys.write_text("")

    with entrypoint(sshd_dir, authorized_keys, SSHD_MAX_STARTUPS="20:30:60") as port:
        config = sshd_dir / "sshd_config"
        result = subprocess.run(
            ["/usr/sbin/sshd", "-t", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        text = config.read_text()

    assert result.returncode == 0, result.stderr
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if re.search(r"@[A-Z_]+@", line)], "a placeholder was left unfilled"
    assert f"Port {port}" in text and "MaxStartups 20:30:60" in text and f"AuthorizedKeysFile {authorized_keys}" in text


def test_publishes_only_the_public_host_keys_when_asked(tmp_path: Path) -> None:
    sshd_dir = tmp_path / "state"
    published = tmp_path / "published"
    authorized_keys = tmp_path / "authorized_keys"
    authorized_keys.write_text("")

    with entrypoint(sshd_dir, authorized_keys, HOST_KEYS_PUBLISH_DIR=str(published)) as port:
        presented = presented_host_key(port)

    assert sorted(p.name for p in published.iterdir()) == ["ssh_host_ecdsa_key.pub", "ssh_host_ed25519_key.pub"]
    for name in ("ssh_host_ecdsa_key.pub", "ssh_host_ed25519_key.pub"):
        assert (published / name).read_bytes() == (sshd_dir / name).read_bytes()
    assert (published / "ssh_host_ed25519_key.pub").read_text().startswith(presented)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a user needs root")
def test_as_root_creates_the_backup_user_who_can_log_in_and_owns_remote_dir() -> None:
    user = f"gpbt{secrets.token_hex(4)}"
    # Not pytest's tmp_path: the new user must be able to reach authorized_keys and remote_dir (mode 0700 there).
    base = Path(tempfile.mkdtemp(prefix="entrypoint_user.", dir="/tmp"))
    base.chmod(0o755)
    try:
        sshd_dir = base / "state"
        remote_dir = base / "srv" / "gpbackup"
        client_key = keygen(base / "id_ed25519")
        authorized_keys = base / "authorized_keys"
        shutil.copy(client_key.with_suffix(".pub"), authorized_keys)
        authorized_keys.chmod(0o644)
        for start in range(2):  # the second start finds the user and the directory already there
            with entrypoint(sshd_dir, authorized_keys, BACKUP_USER=user, REMOTE_DIR=str(remote_dir)) as port:
                account = pwd.getpwnam(user)
                assert remote_dir.stat().st_uid == account.pw_uid
                assert shadow_password(user) == "*", "the account must be key-only, not locked"
                result = check_as(user, port, remote_dir, client_key, sshd_dir, base / f"home{start}")
                assert result.returncode == 0, result.stdout + result.stderr
    finally:
        subprocess.run(["userdel", "-r", user], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    with pytest.raises(KeyError):
        pwd.getpwnam(user)


def shadow_password(user: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields[1]
    raise AssertionError(f"{user} not in /etc/shadow")


def check_as(
    user: str, port: int, remote_dir: Path, key: Path, sshd_dir: Path, home: Path
) -> subprocess.CompletedProcess[str]:
    """`gpbackup_sftp_plugin check` logging in as the new user: proves login works and remote_dir is writable."""
    home.mkdir()
    known_hosts = home / "known_hosts"
    public = (sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    config = home / "plugin.yaml"
    config.write_text(
        f"options:\n  hostname: 127.0.0.1\n  port: {port}\n  username: {user}\n"
        f"  remote_dir: {remote_dir}\n  identity_file: {key}\n  known_hosts_file: {known_hosts}\n"
        f"  log_dir: {home / 'logs'}\n  connect_timeout: 10\n"
    )
    return Plugin(home).run("check", config, "--probe-mib", "1", text=True)
