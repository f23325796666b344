"""Encryption keys at rest: a key file (32 random bytes), its fingerprint, and the keys a config names.

A key file holds exactly KEY_SIZE bytes and nothing else; it must not be
accessible to group or others (the plugin refuses it otherwise, as ssh
refuses a private key). A key is shown only by its fingerprint, the SHA-256
of its bytes in ssh's style (``SHA256:<base64 without padding>``): the
fingerprint is stored in every container header (container.py), so a
restore can say which key it needs. A key's bytes never reach a log line or
a message.

Pure: local files only, no SSH.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Sequence

from sftp_plugin.errors import ConfigError, KeyNotConfigured

KEY_SIZE = 32
# Permission bits a key file must not have: any access by group or others.
FORBIDDEN_MODE_BITS = 0o077


def fingerprint(key: bytes) -> str:
    """``SHA256:<base64>`` of the key's SHA-256, as ``ssh-keygen -l`` shows a host key's."""
    return fingerprint_of_digest(key_digest(key))


def fingerprint_of_digest(digest: bytes) -> str:
    """The fingerprint shown for a SHA-256 digest (of a key at rest, or of an SSH key's blob)."""
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def load_key(path: str) -> bytes:
    """The key in ``path``; ConfigError (one line: what and what to do) if it is missing, open to others or not
    a key."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist",
                          "copy the key to this path on every host (see README.rst, Encryption)") from None
    except OSError as err:
        raise ConfigError(f"cannot read key file {path}: {err.strerror}", "check its owner and permissions") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"key file {path} is not a regular file", "point the option at the key file itself")
        mode = stat.S_IMODE(info.st_mode)
        if mode & FORBIDDEN_MODE_BITS:
            raise ConfigError(
                f"key file {path} is accessible by group or others (mode {mode:04o})",
                f"run 'chmod 600 {path}' as its owner",
            )
        data = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        held = f"{len(data)} bytes" if len(data) <= KEY_SIZE else f"more than {KEY_SIZE} bytes"
        raise ConfigError(
            f"key file {path} holds {held}, not {KEY_SIZE}: not a key made by 'gpbackup_sftp_plugin keygen'",
            "copy the key file again, unchanged (it is binary: no line ending, no encoding)",
        )
    return data


def write_new_key(path: str) -> bytes:
    """Create ``path`` (mode 0600, never overwriting) holding a new random key; return the key."""
    key = os.urandom(KEY_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(key)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return key


class Keyring:
    """The keys a config names: ``encryption_key_file`` (writes and reads) and ``decryption_key_files`` (reads
    only: keys retired by a rotation). Each file is read when first needed."""

    def __init__(self, encryption_key_file: str | None, decryption_key_files: Sequence[str] = ()) -> None:
        self.encryption_key_file = encryption_key_file
        self.files = [path for path in (encryption_key_file, *decryption_key_files) if path]
        self._loaded: dict[str, bytes] = {}

    def _key(self, path: str) -> bytes:
        if path not in self._loaded:
            self._loaded[path] = load_key(path)
        return self._loaded[path]

    def encryption_key(self) -> bytes | None:
        return None if self.encryption_key_file is None else self._key(self.encryption_key_file)

    def for_digest(self, digest: bytes, what: str) -> bytes:
        """The configured key whose SHA-256 is ``digest``; ConfigError naming the fingerprint needed and those
        configured when there is none. ``what`` names the file that needs it."""
        configured: list[str] = []
        for path in self.files:
            key = self._key(path)
            if key_digest(key) == digest:
                return key
            configured.append(f"{fingerprint(key)} ({path})")
        needed = fingerprint_of_digest(digest)
        have = ", ".join(configured) if configured else "none (encryption_key_file and decryption_key_files unset)"
        raise KeyNotConfigured(
            f"{what} is encrypted with key {needed}; configured keys: {have}",
            f"add the key file with fingerprint {needed} to decryption_key_files",
        )
