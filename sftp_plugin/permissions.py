"""Who else on this host can read the local files that hold the plugin's secrets.

OpenSSH refuses a private key that group or others may access ("UNPROTECTED
PRIVATE KEY FILE"). The plugin only warns, in every call's log and in
``check``: gpbackup copies the config to ``/tmp`` on every host with a mode
of its own choosing, which the plugin cannot fix, and refusing would fail
backups that work today. Each file costs one stat; nothing is read, so no
secret can leak from here: the findings name options, never their values.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from sftp_plugin.config import SECRET_OPTIONS, PluginConfig

# What OpenSSH's sshkey_perm_ok refuses on a private key: any access by group or others.
KEY_OPEN_BITS = 0o077
# A config that holds a password or passphrase is exposed when every user on the host may read it.
CONFIG_OPEN_BITS = stat.S_IROTH


@dataclass(frozen=True)
class Exposure:
    """A local file others can read, and what to do about it."""

    problem: str
    fix: str


def _mode(path: str) -> int | None:
    """The permission bits of ``path``, or None when it cannot be stat'ed (the call reports a missing file)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def exposures(config_path: str, cfg: PluginConfig, key_files: Iterable[str] | None = None) -> list[Exposure]:
    """A config holding a secret that every user can read; private keys open to group or others.

    ``key_files`` defaults to the config's ``identity_file`` (``check`` passes the keys
    ``~/.ssh/config`` names too).
    """
    found: list[Exposure] = []
    held = [name for name in SECRET_OPTIONS if getattr(cfg, name)]
    if held:
        mode = _mode(config_path)
        if mode is not None and mode & CONFIG_OPEN_BITS:
            found.append(Exposure(
                f"config file {config_path} holds {' and '.join(held)} and every user on this host can read it "
                f"(mode {mode:04o})",
                f"chmod 600 {config_path}; gpbackup's copy in /tmp gets gpbackup's own mode: to keep "
                f"{' and '.join(held)} off the cluster's hosts, authenticate with ssh-agent or an unencrypted "
                "identity_file (mode 0600) instead",
            ))
    keys = [cfg.identity_file] if key_files is None and cfg.identity_file else list(key_files or [])
    for key in dict.fromkeys(keys):  # each once, in order
        mode = _mode(key)
        if mode is not None and mode & KEY_OPEN_BITS:
            found.append(Exposure(
                f"private key {key} is open to group or others (mode {mode:04o}); OpenSSH refuses such a key",
                f"chmod 600 {key}",
            ))
    return found
