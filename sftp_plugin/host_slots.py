"""Host slots: at most N processes of this user on this host hold a slot of one pool at a time.

The fork server counts its own workers against a cap (forkserver: Ending.slots and .pool). A process
that is not its worker has no one to count it, so it counts itself here: it takes one of N lock files
named after the pool, in a directory only its user can change, and holds it until it lets go or ends.
The locks are flock(2) locks: the kernel drops the lock of a process that dies, however it dies, so a
killed holder never leaves its slot taken. A process that finds all N taken waits, as long as it takes.

The module knows nothing of what a slot stands for: the plugin's are SSH sessions to one backup host
(cli.py), for its calls that run in their own process.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable

# How often a waiting process tries the slots again. A slot is held at least for a login (~0.1 s), so a
# waiter polling at half that costs next to nothing and takes a freed slot within that long.
POLL_SECONDS = 0.05


class Slot:
    """One held slot: its lock file's descriptor, closed (the lock let go) by release, and how long `take`
    waited for it (None: it was free at once)."""

    def __init__(self, fd: int, index: int) -> None:
        self._fd: int | None = fd
        self.index = index
        self.waited: float | None = None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _path(directory: str, pool: str, index: int) -> str:
    # A digest: the pool is any text (a host name, a port), the file name must be a plain one.
    return os.path.join(directory, f"slot-{hashlib.sha256(pool.encode()).hexdigest()[:16]}-{index}")


def _try(directory: str, pool: str, index: int) -> Slot | None:
    # O_CLOEXEC: a command this process starts (a ProxyCommand) never holds the slot after it.
    fd = os.open(_path(directory, pool, index), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if os.fstat(fd).st_size == 0:  # its pool, for whoever lists the slots held (held); the name is a digest
        os.write(fd, pool.encode() + b"\n")
    return Slot(fd, index)


def take(directory: str, pool: str, slots: int, on_wait: Callable[[], object] = lambda: None) -> Slot:
    """One of the `slots` slots of `pool` (lock files in `directory`, which must be private to this user);
    when all are held, calls `on_wait` once and waits for one, polling (Slot.waited says how long). A
    signal's exception ends the wait."""
    started: float | None = None
    while True:
        for index in range(slots):
            slot = _try(directory, pool, index)
            if slot is not None:
                slot.waited = None if started is None else time.monotonic() - started
                return slot
        if started is None:
            started = time.monotonic()
            on_wait()
        time.sleep(POLL_SECONDS)


def held(directory: str) -> dict[str, list[int]]:
    """The pools with slots held now in `directory`, each with the pids holding them (0 for one /proc/locks
    gives no pid for, as from another pid namespace). Read from /proc/locks: nothing is taken to ask."""
    holders: dict[tuple[int, int, int], int] = {}
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 2337 fd:01:1311804 0 EOF"; a waiter's line has "->" after the id
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE":
                    major, minor, inode = fields[5].split(":")
                    holders[(int(major, 16), int(minor, 16), int(inode))] = int(fields[4])
    except (OSError, ValueError):
        return {}
    pools: dict[str, list[int]] = {}
    for name in sorted(os.listdir(directory)):
        if not name.startswith("slot-"):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.stat(path, follow_symlinks=False)
            pid = holders.get((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))
            if pid is None:
                continue
            with open(path, "rb") as handle:
                pool = handle.readline().decode(errors="replace").strip() or name
        except OSError:
            continue  # let go and removed meanwhile
        pools.setdefault(pool, []).append(pid)
    return pools
