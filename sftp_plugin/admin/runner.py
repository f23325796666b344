"""How every admin command runs: its arguments parsed, its config loaded, its log file, and the one
failure ladder (`with_config`): every failure a line on stderr (stderr.fail), never a traceback, secrets
masked."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sftp_plugin.config import SECRET_OPTIONS
from sftp_plugin.errors import PluginError
from sftp_plugin.stderr import fail

if TYPE_CHECKING:
    from sftp_plugin.config import PluginConfig

log = logging.getLogger("gpbackup_sftp_plugin")


# What `config` means to every admin command that takes one.
CONFIG_HELP = "the plugin config file (YAML)"


def command_parser(command: str, description: str, config_help: str | None = CONFIG_HELP) -> argparse.ArgumentParser:
    """The argument parser of one admin command, with its `config` argument first (None: it takes none)."""
    from sftp_plugin import PLUGIN_NAME

    parser = argparse.ArgumentParser(prog=f"{PLUGIN_NAME} {command}", description=description)
    if config_help is not None:
        parser.add_argument("config", help=config_help)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code when argparse wanted to exit (it has printed why)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2


def quiet_logging(cfg: PluginConfig, command: str) -> str | None:
    """Log to the plugin's log file like every other command; never let a record reach the terminal.

    Returns the log file path, or None when log_dir is not writable (``check`` reports that).
    """
    from sftp_plugin.log import setup_logging

    try:
        return setup_logging(cfg.log_dir, cfg.log_level, command, cfg.secrets())
    except OSError:
        root = logging.getLogger()
        root.handlers[:] = [logging.NullHandler()]
        return None


def raw_secrets(config_path: str) -> list[str]:
    """Secret values as written in the YAML (the text the plugin uses), to mask them even when the config does
    not validate."""
    from sftp_plugin.config import read_options

    try:
        options = read_options(config_path)
    except Exception:  # noqa: BLE001 - unreadable or invalid: load_config reports it properly
        return []
    return [value for name in SECRET_OPTIONS if isinstance(value := options.get(name), str) and value]


def with_config(command: str, config_path: str, action: Callable[[PluginConfig], int]) -> int:
    """Load the config, log to the plugin's log, run ``action``: every failure is one line (stderr.fail), never a
    traceback; secrets masked."""
    from sftp_plugin.config import load_config
    from sftp_plugin.log import mask

    try:
        cfg = load_config(config_path)
    except PluginError as err:
        return fail(command, mask(str(err), raw_secrets(config_path)), err.exit_code)
    quiet_logging(cfg, command)
    try:
        return action(cfg)
    except PluginError as err:
        log.error("%s failed: %s", command, err)
        return fail(command, mask(str(err), cfg.secrets()), err.exit_code)
    except OSError as err:
        log.error("%s failed: %s", command, err)
        return fail(command, mask(f"{err or type(err).__name__}; check the backup host and the network",
                                  cfg.secrets()), 1)
    except KeyboardInterrupt:
        return fail(command, "interrupted", 130)
    except Exception as err:  # noqa: BLE001 - never a traceback
        log.exception("%s: unexpected failure", command)
        return fail(command, mask(f"unexpected error ({type(err).__name__}: {err})", cfg.secrets()), 1)
