"""The one line a failing command writes on stderr: for gpbackup's calls (cli.py) and the admin commands alike.

gpbackup_helper treats any byte on a plugin's stderr as a failure, so this is
the only writer of stderr, and it writes exactly one line.
"""

from __future__ import annotations

import sys

from sftp_plugin import PLUGIN_NAME


def fail(command: str, message: str, code: int) -> int:
    """Write ``<plugin> <command>: <message>`` as one line on stderr; return ``code``, the exit code."""
    text = " ".join(message.split())  # exactly one line, whatever the message held
    sys.stderr.write(f"{PLUGIN_NAME} {command}: {text}\n")
    sys.stderr.flush()
    return code
