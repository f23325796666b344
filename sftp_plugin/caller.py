"""The process that called the plugin, and the last look at it before an upload is committed.

On a cancelled or failed backup gpbackup sends SIGUSR1 to every
gpbackup_helper, and a helper that exits closes the plugin's stdin without
any signal to the plugin: the end of input looks exactly like the end of a
complete stream. What does change is the plugin's parent: gpbackup_helper
starts it as ``bash -c "<plugin> backup_data ..."``, bash execs the plugin in
its own place, and the plugin is re-parented once the helper is gone. So the
call remembers, as it starts, which process started it, and before an upload
is committed `confirm_before_commit` checks that this is still so (and runs
any other check a mechanism registered, such as the fork server's liveness
pipe). A changed parent abandons the upload.

What stays possible: a helper that dies after this check (one round trip
before the rename); a caller whose parent is a shell that outlives the process
feeding the stream; a parent that closes the stream early and stays alive.
"""

from __future__ import annotations

import os

# typing.TYPE_CHECKING without importing typing: every call's client imports this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# (pid of the process gpbackup started, that process's parent then): set as a call starts.
_origin: tuple[int, int] | None = None
# Further checks registered by the mechanism running the call (see add_guard).
_guards: list[Callable[[], None]] = []


def remember(pid: int, parent: int) -> None:
    """Record the process gpbackup started (us, or a fork server's client) and its parent now."""
    global _origin
    _origin = (pid, parent)


def add_guard(check: Callable[[], None]) -> None:
    """Run ``check`` too before every commit; it raises to stop the commit. Registering it again
    (each call of a fork-server worker does) changes nothing."""
    if check not in _guards:
        _guards.append(check)


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...); None when it cannot be read
    (no /proc, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    return stat[stat.rfind(b")") + 2 :].split()


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` now; None when it cannot be read (no /proc, or gone)."""
    if pid == os.getpid():
        return os.getppid()
    fields = stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def confirm_before_commit() -> None:
    """Raise CallerGone if the process that started the call is no longer the one that started it."""
    for check in _guards:
        check()
    if _origin is None:
        return
    pid, parent = _origin
    now = parent_of(pid)
    if now is not None and now != parent:
        from sftp_plugin.errors import CallerGone

        raise CallerGone(
            f"the process that started the plugin (pid {parent}) is gone, so the input may be cut short; "
            "nothing was stored",
            "gpbackup_helper was stopped or died: see the gpbackup log for why the backup was cancelled",
        )
