"""Commands for the administrator, not for gpbackup: ``check`` (a preflight),
``list-backups``, ``prune``, ``verify``, ``stop-fork-server``, ``fork-server-status`` and ``keygen``.

They print freely to stdout: they are run by a person (or a script, with
``list-backups --json``), never by gpbackup, so the "nothing on stderr"
contract of the API commands does not bind them. They never show a
traceback: every failure is a line saying what failed and what to do, and
the exit code says whether anything failed. Secrets from the config are
masked in everything printed.

One module per command (``preflight``: check; ``backups``: list-backups,
prune, verify; ``fork_servers``: stop-fork-server and fork-server-status; ``keygen``) over two shared ones:
``runner`` (arguments, config, log and the one failure ladder) and
``output`` (what is printed: sizes, ages, check lines, tables). Here only
the entry points cli.py calls by name (its ADMIN_COMMANDS).
"""

from sftp_plugin.admin.backups import list_backups, prune, verify
from sftp_plugin.admin.fork_servers import fork_server_status, stop_fork_server
from sftp_plugin.admin.keygen import keygen
from sftp_plugin.admin.preflight import check

__all__ = ["check", "fork_server_status", "keygen", "list_backups", "prune", "stop_fork_server", "verify"]
