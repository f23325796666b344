"""The log file never holds a secret: not in a message, not in a traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftp_plugin.log import MASK, setup_logging

SECRET = "pw-Sekrit-4242"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield Path(setup_logging(str(tmp_path / "logs"), "debug", "backup_file", [SECRET]))
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.captureWarnings(False)


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
