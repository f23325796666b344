"""File logging for every plugin call; nothing is ever logged to stderr.

gpbackup_helper treats any byte on the plugin's stderr as a failure, so the
log goes to ``<log_dir>/gpbackup_sftp_plugin_<YYYYMMDD>.log`` (the same place
and naming gpbackup uses for its own logs). Secrets from the config are
masked in every record, whatever logger emitted it (paramiko's included).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time

LOGGER_NAME = "gpbackup_sftp_plugin"
MASK = "******"
log = logging.getLogger(LOGGER_NAME)


class _MaskingFormatter(logging.Formatter):
    """Masks every configured secret in the whole formatted line, tracebacks included
    (a filter on the message alone let an exception's text through)."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record), self._secrets)


class _LostConnectionIsAWarning(logging.Filter):
    """paramiko's transport thread logs how it ended as ERROR: "Socket exception: Connection reset by peer",
    or "Exception (client): Error reading SSH protocol banner" followed by its traceback, a record per line.
    It hands that exception to the call's thread, where the retry policy takes it and our own lines say what
    came of it. An ERROR, or twenty lines of traceback, in the log of a backup that then succeeded would send
    an admin after a problem already handled: the first line stays, as a WARNING; the traceback is kept only
    at log_level debug (as DEBUG)."""

    def __init__(self, keep_tracebacks: bool) -> None:
        super().__init__()
        self._keep_tracebacks = keep_tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR or not record.name.startswith("paramiko.transport"):
            return True
        text = str(record.msg)
        if text.startswith(_TRANSPORT_ENDINGS):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        elif _is_traceback_line(text):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            return self._keep_tracebacks
        return True


# How paramiko's Transport.run reports the exception that ended it (the call's thread gets it too).
_TRANSPORT_ENDINGS = ("Socket exception", "Exception (client)", "Exception (server)", "Unknown exception")
# The lines of a formatted traceback, as paramiko.util.tb_strings splits it: the header, the frames
# (indented), the blank and chaining lines, and the exception's own line ("ConnectionResetError: ...").
_TRACEBACK_LINE = re.compile(
    r"(Traceback \(most recent call last\):|\s.*|During handling of the above exception.*"
    r"|The above exception was the direct cause.*|[A-Za-z_][\w.]*(: .*)?)?"
)


def _is_traceback_line(text: str) -> bool:
    return _TRACEBACK_LINE.fullmatch(text) is not None


def mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def log_file_path(log_dir: str) -> str:
    return os.path.join(os.path.expanduser(log_dir), f"{LOGGER_NAME}_{time.strftime('%Y%m%d')}.log")


def setup_logging(log_dir: str, level: str, command: str, secrets: list[str]) -> str:
    """Attach the daily log file to the root logger; return its path.

    Raises OSError when the file cannot be opened: cli.py reports it, since a
    plugin whose log cannot be written would fail silently at 2 a.m.
    """
    path = log_file_path(log_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    host = socket.gethostname()
    handler.setFormatter(
        _MaskingFormatter(f"%(asctime)s {host} [%(process)d] %(levelname)s {command}: %(message)s", secrets)
    )
    handler.addFilter(_LostConnectionIsAWarning(keep_tracebacks=level == "debug"))
    root = logging.getLogger()
    for previous in root.handlers:  # a fork-server worker sets up each of its calls anew
        previous.close()
    root.handlers[:] = [handler]
    _set_level(root, getattr(logging, level.upper()))
    # paramiko is chatty at INFO (every connect and auth step); keep its warnings.
    _set_level(logging.getLogger("paramiko"), logging.DEBUG if level == "debug" else logging.WARNING)
    # Python warnings (e.g. a library's deprecation notice) would otherwise go to
    # stderr, which gpbackup_helper counts as a failure.
    logging.captureWarnings(True)
    return path


def _set_level(logger: logging.Logger, level: int) -> None:
    """setLevel, only for a change: each setLevel empties every logger's cache (~45 of them), which a
    fork-server worker would otherwise do twice per call to set what its last call set."""
    if logger.level != level:
        logger.setLevel(level)
