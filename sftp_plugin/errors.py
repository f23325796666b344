"""The plugin's exception types.

Every failure a user can act on is a `PluginError` carrying what failed and
what to check; `cli.py` turns it into one line on stderr and an exit code.
Anything else reaching `cli.py` (but an interrupt, which it names) is a bug
and is reported as such.
"""

from __future__ import annotations


class PluginError(Exception):
    """A failure with a message for the admin: what failed, and what to check."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(PluginError):
    """Wrong command or arguments: nothing was touched."""

    exit_code = 2


class ConfigError(PluginError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 2


class KeyNotConfigured(ConfigError):
    """A stored file is encrypted with a key that is not among those configured."""


class ConnectError(PluginError):
    """The backup host could not be reached or the SSH session broke."""


class HostKeyError(PluginError):
    """The backup host's key is unknown, changed, or does not match the pin."""


class AuthError(PluginError):
    """The backup host refused every authentication method we tried."""


class RemoteError(PluginError):
    """An SFTP operation on the backup host failed."""


class RemoteNotFound(RemoteError):
    """A remote file or directory that must exist does not."""


class IntegrityError(PluginError):
    """Stored bytes do not match what was backed up."""


class NotChecked(PluginError):
    """A plain stored file without a checksum: nothing to check its bytes against (verify's NOCHECK)."""


class ReaderGone(PluginError):
    """Whoever reads our stdout closed it: gpbackup_helper stops reading once it has the tables it
    needs, and a failing COPY stops too. Final, never retried, and not worth a line on stderr."""

    # What a shell reports for a writer ended by SIGPIPE, which is what this is.
    exit_code = 141


class CallerGone(PluginError):
    """A fork server worker's caller died: its input may have ended early, so nothing is committed."""


class WorkerLost(PluginError):
    """The fork server worker running this call could not be followed to its end."""
