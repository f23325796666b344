"""Command line entry point: argv -> command, and the only place that prints errors.

The command table below is the whole API surface, each command with the
number of arguments it accepts after the config path. Success exits 0 with
nothing on stderr (gpbackup_helper treats any stderr byte as a failure);
failure exits non-zero with exactly one line on stderr; tracebacks go only
to the log file. Version commands answer before anything heavy is imported.
"""

from __future__ import annotations

import os
import sys
import time

from sftp_plugin import API_VERSION, PLUGIN_NAME, __version__

# Keep paramiko from importing `invoke`, which it needs only for ssh_config
# "Match exec": that import cost ~180 ms of every call (437 -> 174 ms to import
# the commands), and gpbackup makes thousands. Done here, where every entry
# point (API and admin commands, the fork server) passes, so `check` judges an
# ssh_config exactly as the plugin calls will: Match exec is not supported.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]

# Each command is the function of that name in commands.py, with the number of
# arguments it accepts after the config path (at least, at most).
COMMANDS: dict[str, tuple[int, int]] = {
    "setup_plugin_for_backup": (2, 3),
    "setup_plugin_for_restore": (2, 3),
    "cleanup_plugin_for_backup": (2, 3),
    "cleanup_plugin_for_restore": (2, 3),
    "backup_file": (1, 1),
    "restore_file": (1, 1),
    "backup_data": (1, 1),
    "restore_data": (1, 1),
    "restore_data_subset": (2, 2),
    "delete_backup": (1, 1),
    "list_directory": (0, 1),
    "delete_directory": (1, 1),
}
# Answered without a config; gpbackup may or may not pass one, so one extra argument is ignored.
VERSION_COMMANDS: dict[str, str] = {
    "plugin_api_version": API_VERSION,
    "--version": f"{PLUGIN_NAME} version {__version__}",
}
# Human-facing commands (may print freely); each is admin.<name>(argv after the command) -> exit code.
ADMIN_COMMANDS: dict[str, str] = {
    "check": "check",
    "list-backups": "list_backups",
    "prune": "prune",
    "stop-fork-server": "stop_fork_server",
    "verify": "verify",
}
USAGE = f"usage: {PLUGIN_NAME} <command> <config.yaml> [args...]"


def fail(command: str, message: str, code: int) -> int:
    text = " ".join(message.split())  # exactly one line, whatever the message held
    sys.stderr.write(f"{PLUGIN_NAME} {command}: {text}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None, served_by: int | None = None) -> int:
    """Run one plugin call; `served_by` is the fork server monitor's pid when this is its worker."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return fail("", f"no command given; {USAGE}", 2)
    command, rest = argv[0], argv[1:]
    if command in VERSION_COMMANDS:
        if len(rest) > 1:
            return fail(command, f"takes no arguments, got {len(rest)}", 2)
        sys.stdout.write(VERSION_COMMANDS[command] + "\n")
        return 0
    if command in ADMIN_COMMANDS:
        from sftp_plugin import admin

        return getattr(admin, ADMIN_COMMANDS[command])(rest)
    counts = COMMANDS.get(command)
    if counts is None:
        known = ", ".join([*VERSION_COMMANDS, *COMMANDS, *ADMIN_COMMANDS])
        return fail(command, f"unknown command; expected one of {known}", 2)
    if not rest:
        return fail(command, f"no config file given; {USAGE}", 2)
    config_path, args = rest[0], rest[1:]
    min_args, max_args = counts
    if not min_args <= len(args) <= max_args:
        expected = str(min_args) if min_args == max_args else f"{min_args} to {max_args}"
        return fail(command, f"expected {expected} arguments after the config file, got {len(args)}", 2)
    if served_by is None:
        from sftp_plugin import caller, forkserver

        caller.remember(os.getpid(), os.getppid())
        from sftp_plugin.errors import WorkerLost

        try:
            code = forkserver.delegate(argv)
        except WorkerLost as err:
            return fail(command, str(err), err.exit_code)
        except KeyboardInterrupt:  # SIGINT here, not in a worker: reported as run() does
            return fail(command, "interrupted", 130)
        if code is not None:
            return code
    return run(command, config_path, args, served_by)


def run(command: str, config_path: str, args: list[str], served_by: int | None = None) -> int:
    # Imported here, not at the top: the version commands above must stay fast.
    import logging

    from sftp_plugin.config import load_config
    from sftp_plugin.errors import PluginError, ReaderGone
    from sftp_plugin.log import log_file_path, mask, setup_logging

    try:
        cfg = load_config(config_path)
    except PluginError as err:
        return fail(command, str(err), err.exit_code)
    try:
        log_path = setup_logging(cfg.log_dir, cfg.log_level, command, cfg.secrets())
    except OSError as err:
        return fail(command, f"cannot write log file {log_file_path(cfg.log_dir)}: {err.strerror}; check log_dir", 1)
    log = logging.getLogger("gpbackup_sftp_plugin")
    started = time.monotonic()
    log.info("start %s%s", " ".join(args), "" if served_by is None else f" (fork server worker, monitor {served_by})")
    remote = None
    try:
        from sftp_plugin import commands
        from sftp_plugin.interrupts import interrupt_aborts
        from sftp_plugin.store import Remote

        remote = Remote(cfg)
        with interrupt_aborts(remote.abort):
            result = getattr(commands, command)(remote, args)
            remote.close()
    except ReaderGone as err:
        # Not a failure of ours to report: the reader has what it wanted, or failed on its own.
        log.info("stopped after %.3fs: %s", time.monotonic() - started, err.message)
        # Point stdout at /dev/null so the interpreter's final flush cannot print an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return err.exit_code
    except PluginError as err:
        log.error("failed after %.3fs: %s", time.monotonic() - started, err)
        return fail(command, mask(str(err), cfg.secrets()), err.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        return fail(command, "interrupted", 130)
    except Exception as err:  # a bug or an unforeseen failure: traceback to the log only
        log.exception("unexpected failure")
        detail = mask(f"{type(err).__name__}: {err}", cfg.secrets())
        return fail(command, f"unexpected error ({detail}); details in {log_path}", 1)
    finally:
        if remote is not None:
            remote.close_quietly()
    log.info("ok bytes=%d seconds=%.3f %s", result.bytes, time.monotonic() - started, result.detail)
    if served_by is None and cfg.fork_server:
        from sftp_plugin import forkserver

        try:
            forkserver.start_server(cfg.log_dir)
        except OSError:  # only later calls lose: they run in their own process, as this one did
            log.warning("could not start the fork server", exc_info=True)
    return 0
