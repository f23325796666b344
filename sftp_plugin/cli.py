"""Command line entry point: argv -> command, and the only place that prints errors.

The command table below is the whole API surface, each command with the
number of arguments it accepts after the config path. Success exits 0 with
nothing on stderr (gpbackup_helper treats any stderr byte as a failure);
failure exits non-zero with exactly one line on stderr; tracebacks go only
to the log file. Version commands answer before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from sftp_plugin import API_VERSION, PLUGIN_NAME, __version__
from sftp_plugin.stderr import fail

# typing.TYPE_CHECKING without importing typing, which would cost every call's start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from sftp_plugin import forkserver
    from sftp_plugin.config import PluginConfig
    from sftp_plugin.connection import ConnectionKey
    from sftp_plugin.store import Remote

# Keep paramiko from importing `invoke`, which it needs only for ssh_config
# "Match exec": that import cost ~180 ms of every call (437 -> 174 ms to import
# the commands), and gpbackup makes thousands. Done here, where every entry
# point (API and admin commands, the fork server) passes, so `check` judges an
# ssh_config exactly as the plugin calls will: Match exec is not supported.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]

# Each command is the function of that name in commands.py, with the number of
# arguments it accepts after the config path (at least, at most) and their names.
COMMANDS: dict[str, tuple[int, int, str]] = {
    "setup_plugin_for_backup": (2, 3, "<local_backup_dir> <scope> [<content_id>]"),
    "setup_plugin_for_restore": (2, 3, "<local_backup_dir> <scope> [<content_id>]"),
    "cleanup_plugin_for_backup": (2, 3, "<local_backup_dir> <scope> [<content_id>]"),
    "cleanup_plugin_for_restore": (2, 3, "<local_backup_dir> <scope> [<content_id>]"),
    "backup_file": (1, 1, "<local_file>"),
    "restore_file": (1, 1, "<local_file>"),
    "backup_data": (1, 1, "<data_filekey>"),
    "restore_data": (1, 1, "<data_filekey>"),
    "restore_data_subset": (2, 2, "<data_filekey> <offsets_file>"),
    "delete_backup": (1, 1, "<timestamp>"),
    "list_directory": (0, 1, "[<path>]"),
    "delete_directory": (1, 1, "<path>"),
}
# Answered without a config; gpbackup may or may not pass one, so one extra argument is ignored.
VERSION_COMMANDS: dict[str, str] = {
    "plugin_api_version": API_VERSION,
    "--version": f"{PLUGIN_NAME} version {__version__}",
}
# Human-facing commands (may print freely); each is admin.<name>(argv after the command) -> exit code.
ADMIN_COMMANDS: dict[str, str] = {
    "check": "check",
    "fork-server-status": "fork_server_status",
    "keygen": "keygen",
    "list-backups": "list_backups",
    "prune": "prune",
    "stop-fork-server": "stop_fork_server",
    "verify": "verify",
}
# `help [<command>]` and its synonyms: the usage below, or one command's.
HELP_COMMANDS = ("help", "--help", "-h")
# What each command does, one line for `help`, in the order it lists them: the
# commands gpbackup and gprestore run, then the administrator's.
DESCRIPTIONS: dict[str, str] = {
    "plugin_api_version": "print the storage plugin API version implemented",
    "--version": "print the plugin's name and version",
    "setup_plugin_for_backup": "create the backup's directory (coordinator), prove remote_dir writable (segment_host)",
    "setup_plugin_for_restore": "check that the backup exists on the backup host",
    "cleanup_plugin_for_backup": "remove upload leftovers, then apply keep_last/keep_days (coordinator)",
    "cleanup_plugin_for_restore": "nothing to clean up after a restore (arguments are checked)",
    "backup_file": "upload a local file; the local file stays",
    "restore_file": "download a stored file to that local path",
    "backup_data": "store standard input under the data file key",
    "restore_data": "write a stored stream to standard output, each block verified first",
    "restore_data_subset": "write the byte ranges the offsets file lists to standard output",
    "delete_backup": "delete one backup; a backup that is not there is not an error",
    "list_directory": "list the files under remote_dir (or a path below it) with their sizes",
    "delete_directory": "delete a directory below remote_dir",
    "check": "preflight a config against its backup host (--cluster: on every host over ssh)",
    "list-backups": "list the stored backups: size, age, database, completeness",
    "prune": "apply keep_last and keep_days now (--dry-run: only say what would go)",
    "verify": "re-read a backup (or --all) and check every file against its checksums",
    "stop-fork-server": "stop this user's fork servers on this host",
    "fork-server-status": "show this user's fork servers on this host and the SSH sessions they keep, by config",
    "keygen": "write a new encryption key file (mode 0600) and print its fingerprint",
    "help": "this text, or one command's arguments: help <command>",
}
GPBACKUP_FACING = (*VERSION_COMMANDS, *COMMANDS)
assert set(DESCRIPTIONS) == {*GPBACKUP_FACING, *ADMIN_COMMANDS, HELP_COMMANDS[0]}, "every command needs a description"
USAGE = f"usage: {PLUGIN_NAME} <command> <config.yaml> [args...]"


def unknown_command(command: str) -> str:
    """The message for a command we do not have, with the closest one we do."""
    import difflib  # only here: the commands gpbackup runs must not pay for it

    close = difflib.get_close_matches(command.lower(), list(DESCRIPTIONS), n=1)
    suggestion = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown command; {suggestion}'{PLUGIN_NAME} help' lists the commands"


def _usage_text() -> str:
    width = max(map(len, DESCRIPTIONS)) + 2
    groups = (
        ("Commands gpbackup and gprestore run:", GPBACKUP_FACING),
        ("Commands for the administrator:", (*ADMIN_COMMANDS, HELP_COMMANDS[0])),
    )
    lines = [USAGE]
    for title, names in groups:
        lines += ["", title, *(f"  {name:<{width}}{DESCRIPTIONS[name]}" for name in names)]
    lines += ["", f"'{PLUGIN_NAME} help <command>' shows one command's arguments."]
    return "\n".join(lines) + "\n"


def show_help(command: str, rest: list[str]) -> int:
    """``help``, ``--help``, ``-h``: the usage with every command; ``help <command>``: that command's."""
    if not rest:
        sys.stdout.write(_usage_text())
        return 0
    if len(rest) > 1:
        return fail(command, f"takes at most one command name, got {len(rest)}; {PLUGIN_NAME} help <command>", 2)
    name = rest[0]
    if name in ADMIN_COMMANDS:  # its own argparse help, the one source of its options
        from sftp_plugin import admin

        return getattr(admin, ADMIN_COMMANDS[name])(["--help"])
    if name in VERSION_COMMANDS:
        usage = f"{PLUGIN_NAME} {name}"
    elif name in COMMANDS:
        usage = f"{PLUGIN_NAME} {name} <config.yaml> {COMMANDS[name][2]}".rstrip()
    elif name in HELP_COMMANDS:
        usage, name = f"{PLUGIN_NAME} help [<command>]", HELP_COMMANDS[0]
    else:
        return fail(command, f"{name}: {unknown_command(name)}", 2)
    sys.stdout.write(f"usage: {usage}\n\n{DESCRIPTIONS[name]}\n")
    return 0


# What a detached fork server runs (forkserver.start_server): `serve_calls` below, by name.
ENTRY_POINT = ("sftp_plugin.cli", "serve_calls")


# The scopes in which cleanup_plugin_for_backup/_restore ends a backup or restore on this host: the
# fork server's idle workers for that config close their sessions then (segment scope comes per segment).
ENDING_SCOPES = ("coordinator", "segment_host")


def serve_calls(socket_path: str, log_dir: str, caps: list[str] | None = None) -> None:
    """The fork server's process: serve calls, each in a worker that runs `main` (forkserver.serve);
    `caps`: the max_connections of the config whose call started it (forkserver.start_server)."""
    from sftp_plugin import forkserver

    forkserver.serve(socket_path, log_dir, calls=_WorkerCalls(), caps=forkserver.parse_caps(caps or []))


class _WorkerCalls:
    """What a fork-server worker runs (forkserver.Calls): `main`, with the session a call kept (sessions.py)."""

    def __init__(self) -> None:
        self._admitted: bool | None = None  # admits' answer: the same for every call of a worker (its route)

    def admits(self, argv: list[str], cwd: str) -> bool:
        """Not a call whose config says fork_server: no: it runs in its own process, under its caller's
        resource limits and control group (a worker has the server's), whichever config started the server.
        Decided at a worker's first call: its calls all bring one config file, path and content (the route).
        A config that does not load is admitted: the call fails in the worker, as it would anywhere."""
        if self._admitted is None:
            from sftp_plugin.config import load_config

            try:
                self._admitted = load_config(os.path.join(cwd, argv[1])).fork_server
            except Exception:  # noqa: BLE001 - whatever is wrong with it, the call reports it
                self._admitted = True
        return self._admitted

    def run(self, argv: list[str], server: int) -> forkserver.Ending:
        from sftp_plugin import sessions

        sessions.set_connection_cap(None)
        return _ending(main(argv, served_by=server), retire_route=ends_backup(argv[0], argv[2:]))

    def warm(self, argv: list[str], server: int) -> forkserver.Ending:
        from sftp_plugin import sessions

        sessions.set_connection_cap(None)
        return _ending(open_spare_session(argv, served_by=server))

    def still_warm(self) -> bool:
        from sftp_plugin import sessions

        return sessions.still_warm()

    def close(self) -> None:
        from sftp_plugin import sessions

        sessions.close()


# What a call ended by SIGINT says and exits with (128 + SIGINT, as a shell reports it).
INTERRUPTED, INTERRUPTED_EXIT_CODE = "interrupted", 130
# How much of the config file a route holds: any real config is far smaller.
ROUTE_CONTENT_LIMIT = 1 << 20


def route(config_path: str) -> bytes:
    """What a call shares with the calls a warm worker may serve it after (forkserver.delegate): the
    config file, by path and content. The worker checks the rest (sessions.py) before reusing anything."""
    path = os.path.abspath(config_path)
    try:
        with open(path, "rb") as handle:
            content = handle.read(ROUTE_CONTENT_LIMIT)
    except OSError:
        content = b""
    return os.fsencode(path) + b"\0" + content


def main(argv: list[str] | None = None, served_by: int | None = None, ask_server: bool = True) -> int:
    """Run one plugin call; `served_by` is the fork server's pid when this is its worker;
    `ask_server=False` runs it here at once (the compiled client, launcher/, asked the server already)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return fail("", f"no command given; {USAGE}; '{PLUGIN_NAME} help' lists the commands", 2)
    command, rest = argv[0], argv[1:]
    if command in VERSION_COMMANDS:
        if len(rest) > 1:
            return fail(command, f"takes no arguments, got {len(rest)}", 2)
        sys.stdout.write(VERSION_COMMANDS[command] + "\n")
        return 0
    if command in HELP_COMMANDS:
        return show_help(command, rest)
    if command in ADMIN_COMMANDS:
        from sftp_plugin import admin

        return getattr(admin, ADMIN_COMMANDS[command])(rest)
    counts = COMMANDS.get(command)
    if counts is None:
        return fail(command, unknown_command(command), 2)
    if not rest:
        return fail(command, f"no config file given; {USAGE}", 2)
    config_path, args = rest[0], rest[1:]
    min_args, max_args, _ = counts
    if not min_args <= len(args) <= max_args:
        expected = str(min_args) if min_args == max_args else f"{min_args} to {max_args}"
        return fail(command, f"expected {expected} arguments after the config file, got {len(args)}", 2)
    if served_by is None:
        from sftp_plugin import caller

        caller.remember(os.getpid(), os.getppid())
    if served_by is None and ask_server:
        from sftp_plugin import forkserver
        from sftp_plugin.errors import WorkerLost

        try:
            code = forkserver.delegate(argv, route(config_path))
        except WorkerLost as err:
            return fail(command, str(err), err.exit_code)
        except KeyboardInterrupt:  # SIGINT here, not in a worker: reported as run() does
            return fail(command, INTERRUPTED, INTERRUPTED_EXIT_CODE)
        if code is not None:
            return code
    code = run(command, config_path, args, served_by)
    if code != 0 and served_by is None:
        _end_now(code)
    return code


def _end_now(code: int) -> None:
    """End a call that failed in its own process at once, without the interpreter's finalization: a daemon
    thread (blocks.py's verify thread, delivering to a reader that stopped reading) may be blocked writing
    to stdout while it holds that buffer's lock, and finalization, flushing stdout, would then abort the
    process (a "Fatal Python error" on stderr after our one line, killed by SIGABRT). The log and stderr are
    flushed first; what stdout still buffers goes unwritten: the call failed. (A worker ends its own way.)"""
    import logging

    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def ends_backup(command: str, args: list[str]) -> bool:
    """Whether this call ends a backup or restore on this host (no call of it comes after)."""
    return command.startswith("cleanup_plugin_for_") and args[1:2] != [] and args[1] in ENDING_SCOPES


def _connection_key(cfg: PluginConfig, served_by: int | None) -> ConnectionKey | None:
    """The call's connection key (connection.connection_key: its session key and backup host), computed
    once per call where it is used: by a fork-server worker (its warm session, and the host its cap
    counts against) and by a capped call in its own process (the host whose slots it takes). None for
    any other call, and when ~/.ssh/config cannot be read: the call counts against its config's own
    hostname and port, and fails where it would have used the key (_session_key) or connects, saying why."""
    if served_by is None and not cfg.max_connections:
        return None
    from sftp_plugin.connection import connection_key
    from sftp_plugin.errors import PluginError

    try:
        return connection_key(cfg)
    except (PluginError, OSError):
        return None


def _session_key(cfg: PluginConfig, served_by: int | None, keyed: ConnectionKey | None) -> str | None:
    """The key under which this call may use and keep a warm session (sessions.py); None: neither.

    Only a fork-server worker keeps one, and only when the config allows it. The key is `keyed`'s, the
    call's (_connection_key); without it, computed here, to raise what kept it from being computed.
    """
    if served_by is None or not cfg.fork_server or cfg.session_idle == 0:
        return None
    if keyed is not None:
        return keyed.key
    from sftp_plugin.connection import session_key

    return session_key(cfg)


def _known_hosts_state(cfg: PluginConfig) -> tuple[int, int, int] | None:
    """known_hosts_file's identity, size and time: whether a call changed it."""
    try:
        info = os.stat(os.path.expanduser(cfg.known_hosts_file))
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _keep_session(remote: Remote, cfg: PluginConfig, config_path: str, key: str,
                  known_hosts: tuple[int, int, int] | None) -> None:
    """Keep the call's session for the next call, keyed as that call will compute it: `key`, the one
    computed before the call, unless the call changed known_hosts_file (`known_hosts`: its state then)."""
    from sftp_plugin import sessions
    from sftp_plugin.config import load_config
    from sftp_plugin.connection import session_key

    session = remote.release()
    if session is None:
        return
    path = os.path.abspath(config_path)
    # A call may add the host's key to known_hosts (strict_host_key_checking: accept-new): then the next
    # call's key differs from the one computed before this call. (Anything else changed meanwhile only
    # costs the next call a reconnect: its key will not match.)
    if _known_hosts_state(cfg) != known_hosts:
        key = session_key(cfg)
    sessions.keep(key, session, cfg.session_idle, lambda: session_key(load_config(path)))


def _ending(code: int, retire_route: bool = False) -> forkserver.Ending:
    """How a worker's call ended, for the fork server: whether its worker keeps a session for the next call,
    and what the call's config said of its sessions (_note_connection_cap)."""
    from sftp_plugin import forkserver, sessions

    return forkserver.Ending(code, stay=code == 0 and sessions.is_kept(), retire_route=retire_route,
                             slots=sessions.connection_cap(), pool=sessions.connection_pool())


def _note_connection_cap(cfg: PluginConfig, keyed: ConnectionKey | None) -> str:
    """Tell the fork server, through the call's end (forkserver.Ending.slots and .pool), how many sessions
    the config allows and to which backup host: every call of it does, with or without a session of its
    own. Returns that host. It is the one `connect` reaches, after ~/.ssh/config (`keyed`, remembered with
    the session key, so a warm call resolves nothing again): two configs that name it by an alias and by
    its HostName count together. Names are not looked up in DNS: a name and its address count apart.
    Without `keyed` (_connection_key), the config's own hostname and port."""
    from sftp_plugin import sessions
    from sftp_plugin.config import DEFAULT_PORT

    pool = keyed.backup_host if keyed is not None else f"{cfg.hostname.lower()}:{cfg.port or DEFAULT_PORT}"
    sessions.set_connection_cap(cfg.max_connections, pool)
    return pool


def _slot_taker(cfg: PluginConfig, pool: str) -> Callable[[], Callable[[], None]] | None:
    """For a call that runs in its own process, under max_connections: what takes one of this host's
    connection slots to the backup host `pool` (host_slots, in the fork server's private runtime directory)
    before the call logs in, and returns how to let it go. Such calls count among themselves: the fork
    server's workers count theirs apart. None when uncapped, or with no private directory to count in."""
    cap = cfg.max_connections
    if not cap:
        return None
    import logging

    from sftp_plugin import forkserver, host_slots

    log = logging.getLogger("gpbackup_sftp_plugin")
    directory = forkserver.runtime_dir()
    if directory is None:
        log.warning("max_connections is not applied to this call: no private runtime directory to count "
                    "its connection in (XDG_RUNTIME_DIR, TMPDIR or /tmp, and every directory above it, must "
                    "be writable by this user and root only)")
        return None

    def on_wait() -> None:
        log.info("waiting for a connection to %s: max_connections %d, all held by calls of this host that "
                 "run in their own processes", pool, cap)

    def take() -> Callable[[], None]:
        slot = host_slots.take(directory, pool, cap, on_wait)
        if slot.waited is not None:
            log.info("took connection slot %d after %.3fs", slot.index, slot.waited)
        return slot.release

    return take


def open_spare_session(argv: list[str], served_by: int) -> int:
    """A spare worker's only task (forkserver: a call found every warm worker of its config busy): log in
    as the call `argv` would and keep the session for the next call; 0 when one is kept. Nothing is
    printed (no one is there to read it); a failure is logged and costs the call it was meant for only
    its wait: that call then gets a worker of its own, which reports whatever fails again."""
    import logging

    from sftp_plugin.config import load_config
    from sftp_plugin.errors import PluginError
    from sftp_plugin.log import mask, setup_logging

    if len(argv) < 2 or argv[0] not in COMMANDS:
        return 2
    config_path = argv[1]
    try:
        cfg = load_config(config_path)
        known_hosts = _known_hosts_state(cfg)  # before the key, which reads the file
        keyed = _connection_key(cfg, served_by)
        _note_connection_cap(cfg, keyed)
        setup_logging(cfg.log_dir, cfg.log_level, "spare_session", cfg.secrets())
        key = _session_key(cfg, served_by, keyed)
    except (PluginError, OSError):
        return 1
    if key is None:
        return 0
    from sftp_plugin.store import Remote

    log = logging.getLogger("gpbackup_sftp_plugin")
    started = time.monotonic()
    remote = Remote(cfg)
    try:
        remote.session  # noqa: B018 - opening it is the point
    except Exception as err:  # noqa: BLE001 - any failure: the waiting call gets a worker of its own
        log.warning("could not open a spare session to %s: %s", cfg.hostname,
                    mask(f"{type(err).__name__}: {err}", cfg.secrets()))
        remote.close_quietly()
        return 1
    log.info("opened a spare session to %s in %.3fs: the calls of this config were all busy", cfg.hostname,
             time.monotonic() - started)
    _keep_session(remote, cfg, config_path, key, known_hosts)
    return 0


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
    known_hosts = _known_hosts_state(cfg)  # before the key, which reads the file
    keyed = _connection_key(cfg, served_by)
    pool = _note_connection_cap(cfg, keyed)
    try:
        log_path = setup_logging(cfg.log_dir, cfg.log_level, command, cfg.secrets())
    except OSError as err:
        return fail(command, f"cannot write log file {log_file_path(cfg.log_dir)}: {err.strerror}; check log_dir", 1)
    log = logging.getLogger("gpbackup_sftp_plugin")
    started = time.monotonic()
    log.info("start %s%s", " ".join(args), "" if served_by is None else f" (fork server worker, server {served_by})")
    from sftp_plugin.permissions import exposures

    for exposure in exposures(config_path, cfg):  # a stat per file; names options, never their values
        log.warning("%s: %s", exposure.problem, exposure.fix)
    remote = None
    try:
        from sftp_plugin import commands, sessions
        from sftp_plugin.interrupts import interrupt_aborts
        from sftp_plugin.store import Remote

        warm = _session_key(cfg, served_by, keyed)
        remote = Remote(cfg, sessions.take(warm) if warm else None, keeps_session=bool(warm),
                        hold=_slot_taker(cfg, pool) if served_by is None else None)
        with interrupt_aborts(remote.abort):
            result = getattr(commands, command)(remote, args)
            if warm and not ends_backup(command, args):
                _keep_session(remote, cfg, config_path, warm, known_hosts)
            else:
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
        return fail(command, INTERRUPTED, INTERRUPTED_EXIT_CODE)
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

        # Its cap is known from the start: the calls that follow this one (gpbackup's setup) all at once
        # must not each log in before one of them has ended and told the server.
        caps = {forkserver.route_of(route(config_path)): cfg.max_connections} if cfg.max_connections else {}
        try:
            forkserver.start_server(cfg.log_dir, ENTRY_POINT, caps)
        except OSError:  # only later calls lose: they run in their own process, as this one did
            log.warning("could not start the fork server", exc_info=True)
    return 0
