"""A throwaway OpenSSH backup host on 127.0.0.1 for the tests, `make demo` and the bench.

Starts the real ``sshd`` through ``docker/backup-host/entrypoint.sh`` (the
same script and config the docker backup-host uses) on a free port, with
host and user keys generated into a private directory, and writes plugin
configs that point at it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "docker" / "backup-host" / "entrypoint.sh"
# sshd answers within milliseconds; a slow CI machine gets ample margin.
START_TIMEOUT = 20.0
# sshd exits at once on SIGTERM unless wedged.
STOP_TIMEOUT = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_ssh_banner(host: str, port: int, process: subprocess.Popen[bytes] | None, log_path: Path) -> None:
    """Return once ``host:port`` greets with an SSH banner; raise RuntimeError if ``process`` dies or
    START_TIMEOUT passes first (the message carries the sshd log)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {log_path.read_text().strip()}")
        try:
            with socket.create_connection((host, port), timeout=1) as conn:
                # The whole version line: closing with part of it unread would reset the connection,
                # which sshd logs as an error ("Connection reset by peer").
                banner = b""
                while not banner.endswith(b"\n") and len(banner) < 256:
                    chunk = conn.recv(256 - len(banner))
                    if not chunk:
                        break
                    banner += chunk
                if banner.startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not start within {START_TIMEOUT}s: {log_path.read_text().strip()}")


def known_hosts_line(server_dir: Path, host: str, port: int, key_type: str = "ed25519") -> str:
    """The known_hosts line for the host key ``type`` an entrypoint-made sshd in ``server_dir`` presents."""
    kind, body = (server_dir / f"ssh_host_{key_type}_key.pub").read_text().split()[:2]
    return f"[{host}]:{port} {kind} {body}\n"


def start_entrypoint(sshd_dir: Path, port: int, authorized_keys: Path, log_path: Path, listen: str = "127.0.0.1",
                     entrypoint: Path = ENTRYPOINT, prefix: tuple[str, ...] = (),
                     **env: str) -> subprocess.Popen[bytes]:
    """Start the backup host's entrypoint (and so sshd) in a session of its own, logging to ``log_path``; ``env``
    adds to or overrides its settings (BACKUP_USER, REMOTE_DIR, SSHD_MAX_STARTUPS, ...; see the entrypoint), and
    ``prefix`` runs it through another command (``ip netns exec ...``). Does not wait: see wait_for_ssh_banner."""
    environment = dict(os.environ, SSHD_DIR=str(sshd_dir), SSHD_PORT=str(port), SSHD_LISTEN=listen,
                       AUTHORIZED_KEYS=str(authorized_keys), BACKUP_USER="", REMOTE_DIR="")
    environment.update(env)
    with open(log_path, "ab") as log:
        return subprocess.Popen([*prefix, str(entrypoint)], env=environment, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_entrypoint(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """End the entrypoint's session (sshd and all it started in it): SIGTERM, then SIGKILL after `timeout`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def keygen(path: Path, key_type: str = "ed25519", passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-f", str(path)], check=True)
    return path


class SshServer:
    """One sshd process and the client-side files to reach it."""

    def __init__(self, workdir: Path, max_startups: str = "10:30:100", extra_config: str = "") -> None:
        """``extra_config``: sshd_config lines (global keywords, no Match) for this server only, e.g. to offer
        other algorithms; they win over the backup host's template (see `_entrypoint`)."""
        self.workdir = workdir
        self.extra_config = extra_config
        self.server_dir = workdir / "server"
        self.client_dir = workdir / "client"
        self.remote_dir = workdir / "remote"
        for directory in (self.server_dir, self.client_dir, self.remote_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.user_key = keygen(self.client_dir / "id_ed25519")
        self.authorized_keys = self.server_dir / "authorized_keys"
        shutil.copy(self.user_key.with_suffix(".pub"), self.authorized_keys)
        self.port = free_port()
        self.max_startups = max_startups
        self.known_hosts = self.client_dir / "known_hosts"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "sshd.log"

    def start(self) -> SshServer:
        self.process = start_entrypoint(self.server_dir, self.port, self.authorized_keys, self.log_path,
                                        entrypoint=self._entrypoint(), REMOTE_DIR=str(self.remote_dir),
                                        SSHD_MAX_STARTUPS=self.max_startups)
        try:
            wait_for_ssh_banner("127.0.0.1", self.port, self.process, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.known_hosts.write_text(known_hosts_line(self.server_dir, "127.0.0.1", self.port))
        return self

    def _entrypoint(self) -> Path:
        """The backup host's entrypoint; with ``extra_config``, an unchanged copy of it next to a copy of its
        template that starts with those lines (sshd keeps the first value of a keyword, so they win)."""
        if not self.extra_config:
            return ENTRYPOINT
        directory = self.workdir / "backup-host"
        directory.mkdir(exist_ok=True)
        shutil.copy2(ENTRYPOINT, directory / ENTRYPOINT.name)
        template = ENTRYPOINT.with_name("sshd_config.template")
        (directory / template.name).write_text(self.extra_config.rstrip("\n") + "\n" + template.read_text())
        return directory / ENTRYPOINT.name

    def authorize(self, public_key: Path) -> None:
        """Let the holder of another key log in too (sshd reads authorized_keys at each login), e.g. the
        plugin's key of another server's config, when this server is a jump host in front of that one."""
        with open(self.authorized_keys, "a") as keys:
            keys.write(public_key.read_text())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop sshd; if its process handle was lost (a signal while it started), the one its pid file names."""
        if self.process is not None:
            stop_entrypoint(self.process)
        self.process = None
        try:
            pid = int((self.server_dir / "sshd.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.server_dir).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)

    @property
    def host_fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", str(self.server_dir / "ssh_host_ed25519_key.pub")],
                             check=True, capture_output=True, text=True).stdout
        return out.split()[1]

    def options(self, **overrides: object) -> dict[str, object]:
        options: dict[str, object] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "username": os.environ.get("USER") or __import__("getpass").getuser(),
            "remote_dir": str(self.remote_dir),
            "identity_file": str(self.user_key),
            "known_hosts_file": str(self.known_hosts),
            "log_dir": str(self.workdir / "logs"),
            "connect_timeout": 10,
        }
        options.update(overrides)
        return {k: v for k, v in options.items() if v is not None}

    def write_config(self, path: Path, executable: str = "gpbackup_sftp_plugin", **overrides: object) -> Path:
        document = {"executablepath": executable, "options": self.options(**overrides)}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
