"""The installed plugin, run as gpbackup runs it, and the configs it reads: the one harness of the tests, the bench
and ``make demo``.

``Plugin`` runs the console script (``run``: stdin bytes in, exit code, stdout and stderr out, within a timeout;
``popen``: a call the caller drives), in an environment of its own: a HOME without the user's ``~/.ssh`` and no
ssh-agent, and the fork server's socket in a directory the caller picks (and stops: ``stop_fork_server``).
``SiteConfig`` writes the configs of one site: a remote_dir of its own on a throwaway sshd, a log_dir, and any
options every config of the site carries (e.g. a proxy's port).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.sshd import SshServer, free_port

PLUGIN_NAME = "gpbackup_sftp_plugin"
# The console script pip installed next to the interpreter running this code.
PLUGIN_EXE = os.path.join(os.path.dirname(sys.executable), PLUGIN_NAME)
# A hung plugin call must fail instead of hanging the suite, the demo or the bench; not a timing assertion.
RUN_TIMEOUT = 300
DEFAULT_CONFIG = "plugin_config.yaml"


def socket_dir_env(tmpdir: str | Path) -> dict[str, str]:
    """Variables that put the fork server's socket under `tmpdir` (XDG_RUNTIME_DIR would come first)."""
    return {"TMPDIR": str(tmpdir), "XDG_RUNTIME_DIR": ""}


def plugin_env(home: Path | None = None, socket_dir: str | Path | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a plugin call: with `home`, that HOME and no ssh-agent (nothing of the user's
    keys or ~/.ssh/config); with `socket_dir`, the fork server's socket under it; then `extra`."""
    env = dict(os.environ)
    if home is not None:
        env.pop("SSH_AUTH_SOCK", None)
        env["HOME"] = str(home)
    if socket_dir is not None:
        env.update(socket_dir_env(socket_dir))
    env.update(extra or {})
    return env


# The signals a driver of plugin calls may turn into an exception (the demo's Ctrl-C, the bench's SIGTERM).
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_held() -> Iterator[None]:
    """In the main thread (where Python runs signal handlers), a HELD_SIGNALS signal that comes during the block is
    handled after it, as it would have been. For starting a child and recording it for a later kill_all: a
    handler that raised inside subprocess.Popen, after the child existed and before anyone had its pid, would
    leave it running. Elsewhere nothing changes: no handler runs in other threads."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: came.append(signum)) for sig in HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in came:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def assert_ok(result: subprocess.CompletedProcess[Any]) -> subprocess.CompletedProcess[Any]:
    """Success per the API: exit 0 and not one byte on stderr."""
    assert result.returncode == 0, f"exit {result.returncode}, stderr: {result.stderr!r}"
    assert not result.stderr, f"stderr on success: {result.stderr!r}"
    return result


def assert_failed(result: subprocess.CompletedProcess[bytes]) -> str:
    """Failure per the API: non-zero exit and one human line on stderr (no traceback). Returns that line."""
    assert result.returncode != 0, f"expected failure, got exit 0 (stdout {result.stdout[:200]!r})"
    text = result.stderr.decode("utf-8", errors="replace")
    assert "Traceback" not in text, text
    assert text.endswith("\n") and text.count("\n") == 1, f"expected exactly one line on stderr, got {text!r}"
    assert text.strip(), "failure without a message on stderr"
    return text.strip()


class Plugin:
    """Runs the installed ``gpbackup_sftp_plugin`` as gpbackup would, in an environment of its own.

    ``home``: the HOME of every call, without ssh-agent (None: the caller's own HOME and agent, as for a real
    backup host in ``make demo --host``); ``socket_dir``: where the calls' fork server keeps its socket (None:
    wherever the caller's TMPDIR says).
    """

    def __init__(self, home: Path | None, exe: str | Path = PLUGIN_EXE, socket_dir: str | Path | None = None) -> None:
        self.home = home
        self.exe = str(exe)
        self.socket_dir = socket_dir

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return plugin_env(self.home, self.socket_dir, extra)

    def argv(self, *args: str | Path) -> list[str]:
        return [self.exe, *map(str, args)]

    def run(self, *args: str | Path, stdin: bytes = b"", cwd: Path | None = None,
            env_extra: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT,
            text: bool = False) -> subprocess.CompletedProcess[Any]:
        """One call to its end: exit code, stdout and stderr (bytes; with `text`, decoded, bad bytes replaced)."""
        result = subprocess.run(self.argv(*args), input=stdin, capture_output=True, env=self.env(env_extra),
                                cwd=cwd, timeout=timeout, check=False)
        if text:
            return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                               result.stderr.decode(errors="replace"))
        return result

    def popen(self, *args: str | Path, stdin: int | None = subprocess.DEVNULL, stdout: int | None = subprocess.PIPE,
              stderr: int | None = subprocess.PIPE, env_extra: dict[str, str] | None = None,
              **options: Any) -> subprocess.Popen[bytes]:
        """A call started and left to the caller (to feed, signal or kill); `options` go to Popen."""
        return subprocess.Popen(self.argv(*args), stdin=stdin, stdout=stdout, stderr=stderr,
                                env=self.env(env_extra), **options)

    def ok(self, *args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return assert_ok(self.run(*args, stdin=stdin))

    def fails(self, *args: str | Path, stdin: bytes = b"") -> str:
        return assert_failed(self.run(*args, stdin=stdin))

    def stop_fork_server(self, timeout: float = RUN_TIMEOUT) -> list[str]:
        """Stop the fork server of this plugin's socket directory (it would idle out in a minute); what it said."""
        result = self.run("stop-fork-server", timeout=timeout, text=True)
        return [line for line in result.stdout.splitlines() if line.startswith("stopped")]


@dataclass
class SiteConfig:
    """The plugin configs of one site: its own remote_dir below the server's, its own log_dir, and `options`
    that every config of the site carries (a proxy's port, say); `path` is the site's first config."""

    server: SshServer
    directory: Path
    remote_dir: Path
    log_dir: Path
    path: Path
    options: dict[str, object] = field(default_factory=dict)

    @classmethod
    def create(cls, server: SshServer, root: Path, label: str, private: bool = False,
               **options: object) -> SiteConfig:
        """A site below `root` (configs in root/config, logs in root/logs) whose remote_dir is named after `label`
        (plus a random suffix: labels may repeat on one server), 0700 if `private`; its first config written."""
        remote_dir = server.remote_dir / f"{re.sub(r'[^A-Za-z0-9_-]', '_', label)[:60]}-{secrets.token_hex(4)}"
        remote_dir.mkdir(mode=0o700 if private else 0o777)
        directory = root / "config"
        directory.mkdir(parents=True, exist_ok=True)
        site = cls(server, directory, remote_dir, root / "logs", directory / DEFAULT_CONFIG, dict(options))
        site.write()
        return site

    def write(self, name: str = DEFAULT_CONFIG, **overrides: object) -> Path:
        """A config for this site's remote_dir and log_dir, with option overrides (None drops one)."""
        options: dict[str, object] = {"remote_dir": str(self.remote_dir), "log_dir": str(self.log_dir),
                                      **self.options}
        options.update(overrides)
        return self.server.write_config(self.directory / name, **options)

    def closed_port(self, name: str = "closed_port.yaml", **overrides: object) -> Path:
        """A config pointing at a port nobody listens on, failing fast (retries: 1) if it is ever used."""
        options: dict[str, object] = {"port": free_port(), "retries": 1, "connect_timeout": 2}
        options.update(overrides)
        return self.write(name, **options)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*")) if p.is_file())
