"""The log file: never a secret, not in a message nor in a traceback; a handled lost connection is no ERROR."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from sftp_plugin.log import MASK, setup_logging

SECRET = "pw-Sekrit-4242"


@contextlib.contextmanager
def logging_to_file(directory: Path, level: str) -> Iterator[Path]:
    """setup_logging as a call does it (SECRET configured), the root logger as it was afterwards; the log file."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield Path(setup_logging(str(directory), level, "backup_file", [SECRET]))
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], previous = saved
        root.setLevel(previous)
        logging.captureWarnings(False)


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    with logging_to_file(tmp_path / "logs", "debug") as path:
        yield path


def test_a_secret_in_a_message_or_its_arguments_is_masked(log_file: Path) -> None:
    logging.getLogger("paramiko.transport").debug("auth with %s", SECRET)
    logging.getLogger("gpbackup_sftp_plugin").info(f"password {SECRET} refused")
    text = log_file.read_text()
    assert SECRET not in text
    assert text.count(MASK) == 2


def test_a_secret_in_a_logged_traceback_is_masked(log_file: Path) -> None:
    try:
        raise ValueError(f"bad password {SECRET}")
    except ValueError:
        logging.getLogger("gpbackup_sftp_plugin").exception("unexpected failure")
    text = log_file.read_text()
    assert "Traceback" in text and "ValueError: bad password " in text
    assert SECRET not in text


@pytest.fixture
def info_log_file(tmp_path: Path) -> Iterator[Path]:
    with logging_to_file(tmp_path / "logs", "info") as path:
        yield path


def _log_as_paramikos_transport_thread_ends() -> None:
    """What paramiko's Transport.run logs when a reset cuts the banner exchange (its _log takes a list a line
    at a time), followed by an error it does not hand to the caller."""
    transport = logging.getLogger("paramiko.transport")
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as err:
            raise paramiko.SSHException(f"Error reading SSH protocol banner{err}") from err
    except paramiko.SSHException as err:
        transport.error(f"Exception (client): {err}")
        for line in paramiko.util.tb_strings():
            transport.error(line)
    transport.error("Channel request for unknown channel 7")


def test_paramikos_report_of_a_lost_connection_is_one_warning_without_its_traceback(info_log_file: Path) -> None:
    _log_as_paramikos_transport_thread_ends()
    lines = info_log_file.read_text().splitlines()
    assert [line.split(" ", 4)[4] for line in lines] == [
        "WARNING backup_file: Exception (client): Error reading SSH protocol banner"
        "[Errno 104] Connection reset by peer",
        "ERROR backup_file: Channel request for unknown channel 7",  # not a lost connection: stays an error
    ]


def test_at_log_level_debug_paramikos_traceback_is_kept_as_debug_lines(log_file: Path) -> None:
    _log_as_paramikos_transport_thread_ends()
    text = log_file.read_text()
    assert "DEBUG backup_file: Traceback (most recent call last):" in text
    assert "DEBUG backup_file: ConnectionResetError: [Errno 104] Connection reset by peer" in text
    assert "DEBUG backup_file: During handling of the above exception" not in text  # chained with "from"
    assert "DEBUG backup_file: The above exception was the direct cause of the following exception:" in text
    assert text.count(" ERROR ") == 1 and "WARNING backup_file: Exception (client)" in text
