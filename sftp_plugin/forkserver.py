"""Fork server: keeps the plugin's code loaded between gpbackup's calls.

gpbackup starts the plugin once per file and, without --single-data-file, once
per table and segment: thousands of short processes per backup. A fresh Python
process spends ~15 ms starting, ~110 ms importing paramiko, cryptography and
PyYAML and ~20 ms tearing all of that down again: more than the SSH handshake,
and most of what separates a plugin call from OpenSSH's C client.

So after a successful call the plugin leaves one fork server per user and
installed copy of the code, detached, which has those modules imported and
exits after IDLE_SECONDS without a call. A later call (the client, `delegate`)
hands it, over a Unix socket in a private directory, its argv, environment,
working directory, umask and its stdin/stdout/stderr themselves (SCM_RIGHTS).
The server forks a monitor per call; the monitor forks the worker, which runs
the command exactly as the fresh process would have (same fds, same
environment, its own SSH connection: nothing but imported code is shared),
waits for it, and reports the exit status, which the client then exits with.
Signals sent to the client are forwarded to the worker; a client that dies
(even by SIGKILL) takes its worker with it.

The client imports nothing heavy, and any trouble before the worker has
started (no server, stale socket, wrong owner, another version) means "run it
in this process", never a failed call. `fork_server: no` stops new servers
from being started; a running one exits after IDLE_SECONDS.

Trust goes both ways. The client uses a socket only in a directory nobody
else can change the way to (runtime_dir), and talks only to a server of its
own uid (SO_PEERCRED). The server serves only callers whose credentials and
namespaces are its own (refusal), since its worker runs with the server's,
not the caller's. Either refusal means: run in this process.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import stat
import struct
import sys
import zlib
from collections.abc import Callable

# A server exits after this long without a call: a backup's calls come in
# bursts seconds apart, and a minute after the last one nothing should linger.
IDLE_SECONDS = 60
# How long the client waits for the worker to start before running the
# command itself: the server forks twice and does no I/O before answering, so
# anything near this means it is stuck, and running in-process costs < 1 s.
START_TIMEOUT = 10.0
# sun_path holds 108 bytes including the terminating NUL; a longer TMPDIR means no fork server.
MAX_SOCKET_PATH = 107
# Signals the client forwards to its worker while it waits (terminal and
# supervisor signals; SIGKILL cannot be caught and is covered by the monitor).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Calls that may wait to be accepted: gpbackup starts one per segment at
# once, and a connection beyond the backlog waits (up to START_TIMEOUT).
LISTEN_BACKLOG = 128
# Request framing version: a client and a server of different code never talk
# anyway (the socket name carries a digest of the code), this guards the rest.
MAGIC = b"GSFP2"

# Monitor -> client replies: the worker started (pid follows), the worker
# ended (raw wait status follows), the request was refused (run it yourself).
STARTED, ENDED, REFUSED = b"P", b"S", b"R"
_INT = struct.Struct("!i")
# struct ucred, as SO_PEERCRED returns it: pid, uid, gid.
_PEERCRED = struct.Struct("3i")

# In a worker: the read end of its client's liveness pipe (see act_on_caller_news).
_caller_pipe: int | None = None

# Modules the server imports once so that no worker has to: the command code
# and what a call still imported lazily (checked by listing sys.modules after
# backup_file, restore_file and cleanup; encodings.idna comes with name lookup,
# ctypes with allocator.keep_freed_memory).
PRELOAD = (
    "sftp_plugin.cli",
    "sftp_plugin.commands",  # with config, connection, transfer, paramiko
    "sftp_plugin.interrupts",
    "yaml",
    "encodings.idna",
    "ctypes",
)
# The installed distributions whose code the server holds loaded besides ours
# (normalized project names): an upgrade of any of them (a security fix of
# paramiko or cryptography above all) must reach the next call, so their
# versions are part of the digest that names the server.
DEPENDENCIES = ("paramiko", "cryptography", "pyyaml", "tenacity", "bcrypt", "pynacl")
# How an installed distribution's metadata is named: <name>-<version>.dist-info
# (pip) or <name>-<version>[-pyX.Y].egg-info (distro packages, setup.py).
_METADATA_SUFFIXES = (".dist-info", ".egg-info")


# ---------------------------------------------------------------- location


@functools.cache  # once per process: a call names its server and its request with it
def code_digest() -> str:
    """Names this interpreter, this copy of the code and its dependencies: an upgrade gets a new server."""
    package = os.path.dirname(os.path.abspath(__file__))
    site = sys.modules.get("site")  # imported at start-up unless -S; not worth importing for this
    site_dirs = site.getsitepackages() if site is not None else []
    return digest_of(package, [os.path.dirname(package), *site_dirs])


def digest_of(package: str, site_dirs: list[str]) -> str:
    """The digest of the code in `package`, the interpreter, and DEPENDENCIES as installed in `site_dirs`.

    Cheap, since every call computes it: a stat per module of ours, and the
    names and times of the dependencies' metadata directories from a listing
    of the site directory, not importlib.metadata (whose import alone costs
    several times all of this). The time counts because a distro's security
    update keeps the upstream version in the name but rewrites the directory.
    """
    parts = [sys.executable, sys.version, package]
    with os.scandir(package) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.endswith(".py"):
                info = entry.stat()
                parts.append(f"{entry.name}:{info.st_size}:{info.st_mtime_ns}")
    parts.extend(_dependency_versions(site_dirs))
    return f"{zlib.crc32(chr(0).join(parts).encode()):08x}"


def _dependency_versions(site_dirs: list[str]) -> list[str]:
    """`<name>=<metadata entry>:<mtime>` for each of DEPENDENCIES, from the first of `site_dirs` holding it."""
    found: dict[str, list[str]] = {}
    for directory in dict.fromkeys(site_dirs):  # in order, each once; mostly the first has them all
        if len(found) == len(DEPENDENCIES):
            break
        here: dict[str, list[str]] = {}
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.name.endswith(_METADATA_SUFFIXES):
                        continue
                    name = entry.name.partition("-")[0].lower()  # DEPENDENCIES need no more normalizing
                    if name in DEPENDENCIES and name not in found:
                        here.setdefault(name, []).append(f"{entry.name}:{entry.stat().st_mtime_ns}")
        except OSError:
            continue  # a site dir that does not exist (or vanished while listed) holds nothing
        found.update(here)
    return [f"{name}={','.join(sorted(found.get(name, ['-'])))}" for name in DEPENDENCIES]


def runtime_dir() -> str | None:
    """The per-user directory for the socket, created 0700; None when it is not safe to use.

    XDG_RUNTIME_DIR when the session has one (private, tmpfs), else the temp
    directory. Whoever can reach the socket can run plugin commands with our
    fds, and whoever can rename or replace a directory on the way to it can
    put their own socket there and receive our calls' input and environment.
    So the directory must be ours and 0700, and every directory above it pass
    _private_chain; else None.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    base = os.path.realpath(base)  # checked as resolved: a symbolic link on the way could be swapped after
    if not _private_chain(base):
        return None
    path = os.path.join(base, f"gpbackup_sftp_plugin-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return path


def _private_chain(directory: str) -> bool:
    """Whether only we and root can change what `directory` (resolved) and every directory above it hold.

    Each must be a directory owned by us or root and not writable by group or
    others, unless it has the sticky bit (as /tmp): there others can add
    entries of their own but not rename or remove ours or root's, and the
    entry below it on our way is checked for its owner in turn.
    """
    uid = os.getuid()
    path = directory
    while True:
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, 0):
            return False
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def socket_path() -> str | None:
    from sftp_plugin import __version__

    directory = runtime_dir()
    if directory is None:
        return None
    path = os.path.join(directory, f"{__version__}-{code_digest()}.sock")
    return path if len(path) <= MAX_SOCKET_PATH else None


# ------------------------------------------------------------------ client


def delegate(argv: list[str]) -> int | None:
    """Run `argv` in the fork server's worker and return its exit code; None to run it here.

    Raises WorkerLost when the worker started but its end could not be learned.
    """
    try:
        path = socket_path()
        if path is None:
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(START_TIMEOUT)
        conn.connect(path)
        if peer_credentials(conn)[1] != os.getuid():
            conn.close()  # not our server: it gets nothing of ours, not even the request
            return None
        payload = _encode_request(argv)
        # The worker's news of us (see act_on_caller_news): the first signal we receive is
        # written here, and the write end closes only when we end.
        alive_read, alive_write = os.pipe()
        try:
            # A closed std fd cannot be passed on: EBADF, and the call runs here.
            socket.send_fds(conn, [_INT.pack(len(payload))], [0, 1, 2, alive_read])
        finally:
            os.close(alive_read)
        conn.sendall(payload)
        reply = _recv_exact(conn, 1 + _INT.size)
    except OSError:
        return None
    if reply[:1] != STARTED:
        conn.close()
        return None  # refused or gone before the worker started: nothing ran
    # From here on the command is running: whatever happens, it is never run twice.
    conn.settimeout(None)
    first_signal: int | None = None

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal first_signal
        if first_signal is None:
            first_signal = signum
            try:
                os.write(alive_write, bytes([signum]))  # before forwarding: see act_on_caller_news
            except OSError:
                pass  # the worker and its monitor are gone: the reply says how it ended
        _forward(conn, signum)

    # A signal ignored here stays ignored, as it would be by the plugin running here.
    caught = [sig for sig in FORWARDED_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, on_signal) for sig in caught}
    try:
        reply = _recv_exact(conn, 1 + _INT.size)
    except OSError:
        reply = b""
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if reply[:1] != ENDED:
        from sftp_plugin.errors import WorkerLost

        raise WorkerLost(
            "lost contact with the fork server worker running this call; its outcome is unknown",
            "see the plugin log, and retry the operation",
        )
    status = _INT.unpack(reply[1:])[0]
    if first_signal is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        # The worker finished before our signal reached it. Run here, the call would
        # have been ended by it, so it is: a signalled call never reports success.
        signal.raise_signal(first_signal)  # SIGINT raises KeyboardInterrupt; the others end us
    return exit_code_of(status)


def act_on_caller_news() -> None:
    """In a worker, just before an upload is committed: act on what became of the client.

    Run in its own process, the plugin commits nothing once a signal has ended
    it or it was killed. A worker learns of either one hop later, through its
    monitor, and could meanwhile read the end of a stream cut short (gpbackup_helper
    closing the pipe as it goes down) and commit it. So the client writes the first
    signal it receives into the liveness pipe before forwarding it, and the pipe
    reads EOF once the client is dead: a signal is acted on here, as if it had just
    arrived; a dead client raises CallerGone. Outside a worker, nothing to do.
    """
    if _caller_pipe is None:
        return
    import select

    if not select.select([_caller_pipe], [], [], 0)[0]:
        return
    news = os.read(_caller_pipe, 1)
    if not news:
        from sftp_plugin.errors import CallerGone

        raise CallerGone("the process that called the plugin is gone", "the input may be cut short: not stored")
    signal.raise_signal(news[0])


def exit_code_of(status: int) -> int:
    """The worker's wait status as our own ending: its exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        sys.stdout.flush()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig  # only reached for a signal whose default is not to terminate
    return os.WEXITSTATUS(status)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a connected Unix socket (SO_PEERCRED).

    The kernel's word, as of connect() for a client and listen() for a server,
    whatever the socket file's owner says.
    """
    return _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def _forward(conn: socket.socket, signum: int) -> None:
    try:
        conn.sendall(bytes([signum]))
    except OSError:
        pass  # the monitor is gone; its worker went with it


def _encode_request(argv: list[str]) -> bytes:
    fields = [
        MAGIC,
        code_digest().encode(),
        os.fsencode(os.getcwd()),
        str(_current_umask()).encode(),
        # Who started this call, for the worker's last check before a commit (caller.py).
        str(os.getpid()).encode(),
        str(os.getppid()).encode(),
        str(len(argv)).encode(),
        *(os.fsencode(arg) for arg in argv),
        *(key + b"=" + value for key, value in os.environb.items()),
    ]
    return b"\0".join(fields)


class Request:
    """One call as the client hands it over (a plain class: the client imports nothing heavy)."""

    def __init__(  # noqa: PLR0913 - the request's fields, as framed
        self,
        magic: bytes,
        digest: str,
        cwd: str,
        umask: int,
        caller: tuple[int, int],  # the client's pid and its parent's pid
        argv: list[str],
        env: dict[bytes, bytes],
    ) -> None:
        self.magic, self.digest, self.cwd, self.umask = magic, digest, cwd, umask
        self.caller, self.argv, self.env = caller, argv, env


def _decode_request(payload: bytes) -> Request:
    magic, digest, cwd, umask, pid, parent, count, *rest = payload.split(b"\0")
    nargs = int(count)
    argv = [os.fsdecode(arg) for arg in rest[:nargs]]
    env = dict(item.split(b"=", 1) for item in rest[nargs:] if b"=" in item)
    return Request(magic, digest.decode(), os.fsdecode(cwd), int(umask), (int(pid), int(parent)), argv, env)


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------ server


def start_server(log_dir: str, entry: tuple[str, str]) -> None:
    """Start a detached fork server for later calls, unless one can't be placed safely.

    ``entry`` names the module and function the server process runs, with the
    socket path and ``log_dir`` as arguments; it is expected to call `serve`
    with what each call runs (this module knows nothing of the commands).

    Called after a successful call that ran in-process. The server inherits
    nothing of ours: no fds (gpbackup waits for EOF on our stdout), a new
    session, and an environment holding only what the interpreter needs to
    start; every call brings its own environment.
    """
    path = socket_path()
    if path is None:
        return
    lock = _take_lock(path)
    if lock is None:
        return  # a server holds it (serving or starting): no interpreter started for nothing
    os.close(lock)  # the server takes it for good
    import subprocess

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # -I: no PYTHON* variables, no user site (Greenplum's PYTHONHOME would break
    # the interpreter), so the package's own location is put on the path by hand.
    module, function = entry
    bootstrap = (
        f"import sys; sys.path.insert(0, {package_parent!r}); from {module} import {function}; "
        f"{function}(sys.argv[1], sys.argv[2])"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for name in ("LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE"):
        if name in os.environ:
            env[name] = os.environ[name]
    subprocess.Popen(
        [sys.executable, "-I", "-c", bootstrap, path, os.path.expanduser(log_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env=env,
        start_new_session=True,
        close_fds=True,
    )


def _take_lock(path: str) -> int | None:
    """The server's lock file for `path`, locked, as an open fd; None when another holds it."""
    import fcntl

    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A lock file removed as stale (see remove_stale) between our open and
        # our flock locks nothing: another process may create and take it anew.
        if os.fstat(lock).st_ino != os.stat(path + ".lock").st_ino:
            raise FileNotFoundError(path + ".lock")
    except OSError:
        os.close(lock)
        return None
    return lock


RunCall = Callable[[list[str], int], int]  # argv, the monitor's pid -> exit code


def serve(path: str, log_dir: str, run_call: RunCall, idle_seconds: float = IDLE_SECONDS) -> None:
    """The server: preload, then accept calls until `idle_seconds` pass without one."""
    import importlib
    import logging
    import select

    from sftp_plugin.log import setup_logging

    lock = _take_lock(path)
    if lock is None:
        return  # another server for this code already runs (or is starting)
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # who holds it, for whoever wants to stop us
    setup_logging(log_dir, "info", "fork-server", [])
    log = logging.getLogger("gpbackup_sftp_plugin.forkserver")
    for module in PRELOAD:  # sftp_plugin.cli first: it keeps paramiko from importing invoke
        importlib.import_module(module)
    code_digest.cache_clear()  # the code as it is now, after the imports above
    digest = code_digest()
    if not path.endswith(f"-{digest}.sock"):
        log.warning("code changed while starting; not serving %s", path)
        return
    try:
        own = process_identity("self")  # the credentials every worker of ours will run with
    except OSError as err:  # no /proc: no caller could be checked, so none is served
        log.warning("fork server cannot read its own credentials (%s); calls run in their own process", err)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)  # a stale socket of a server that died; we hold the lock
        except FileNotFoundError:
            pass
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
    except OSError as err:
        log.warning("fork server cannot listen on %s (%s); calls run in their own process", path, err)
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _stop)
    # Now, not in a call: what other versions left behind costs no call anything to remove.
    try:
        removed = remove_stale(os.path.dirname(path))
    except OSError as err:  # only tidiness is lost; serving goes on
        log.warning("could not remove what fork servers of other code left in %s: %s", os.path.dirname(path), err)
    else:
        if removed:
            log.info("removed what fork servers of other code left: %s", ", ".join(removed))
    log.info("fork server %d serving %s", os.getpid(), path)
    served = 0
    why = f"after {idle_seconds:g} s idle"
    try:
        while select.select([listener], [], [], idle_seconds)[0]:
            conn, _ = listener.accept()
            uid = peer_credentials(conn)[1]
            if uid != os.getuid():
                log.warning("refused a connection from uid %d", uid)
                conn.close()
                continue
            if os.fork() == 0:
                listener.close()
                os.close(lock)  # a flock holds while any copy is open: a long call must not keep it
                _monitor(conn, digest, own, run_call)  # never returns
            conn.close()
            served += 1
    except _Stopped as stop:
        why = f"on signal {stop.signum}"
    # Unlink first, then close: a call that connected in between sees EOF
    # before "started" and runs in its own process. Calls in flight go on.
    os.unlink(path)
    listener.close()
    log.info("fork server %d exiting %s (%d calls served)", os.getpid(), why, served)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def stop_servers() -> list[int]:
    """Stop this user's fork servers (every version) in the current socket directory; their pids.

    For an admin after an upgrade or while troubleshooting, and for the demo
    and the benchmark, which must leave nothing running. Calls in flight are
    not touched; a lock nobody holds is a leftover and is removed.
    """
    directory = runtime_dir()
    if directory is None:
        return []
    stopped = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".sock.lock"):
            continue
        pid = _lock_holder(os.path.join(directory, name))
        if pid:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped


def remove_stale(directory: str) -> list[str]:
    """Remove the lock files and sockets of other code's servers that no server holds; their names.

    Every installed version (every code digest) leaves a lock file, and a
    server that was killed its socket too: one more per upgrade, forever,
    without this. A held lock is a server serving or starting, and stays.
    """
    current = f"-{code_digest()}.sock"
    names = set(os.listdir(directory))
    removed = []
    for name in sorted(names):
        if name.endswith(".sock.lock"):
            sock = name[: -len(".lock")]
        elif name.endswith(".sock") and name + ".lock" not in names:
            sock = name  # a socket whose lock is gone
        else:
            continue  # not a server's, or a socket judged with its lock
        if sock.endswith(current):
            continue  # this code's: held by its server (us), or about to be
        if _lock_holder(os.path.join(directory, sock + ".lock")) is None:
            removed.append(name)
    return removed


def _lock_holder(lock_path: str) -> int | None:
    """The pid a held server lock names (0 if not written yet); None if nobody holds it.

    A lock nobody holds, and its socket, are leftovers and removed (under the
    lock: see _take_lock for a process that opened it meanwhile).
    """
    import fcntl

    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        fd = None  # a socket without a lock: no server can be serving it
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live server, whose pid is in the file
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
        for leftover in (lock_path, lock_path[: -len(".lock")]):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        return None
    finally:
        if fd is not None:
            os.close(fd)


# What of a process's credentials /proc/<pid>/status shows that a worker takes
# from the server and not from its caller: user and group ids (real,
# effective, saved, filesystem), supplementary groups, capabilities,
# no_new_privs and the seccomp mode. A caller differing in any of them could
# reach, through a worker, what it cannot reach itself (or the reverse).
CREDENTIAL_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
# The namespaces (/proc/<pid>/ns/<name>) a worker shares with the server and
# not with its caller; a kernel without one of them has no link for it.
NAMESPACES = ("mnt", "pid", "net", "user", "uts", "ipc", "cgroup")


def process_identity(pid: int | str) -> dict[str, str]:
    """The credentials and namespaces of process `pid` ("self" for this one), as /proc shows them.

    Raises OSError when they cannot be read (a process gone, or one we may not inspect).
    """
    identity: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            field, _, value = line.partition(":")
            if field in CREDENTIAL_FIELDS:
                identity[field] = " ".join(value.split())
    for name in NAMESPACES:
        try:
            identity[f"{name} namespace"] = os.readlink(f"/proc/{pid}/ns/{name}")
        except FileNotFoundError:
            if not os.path.isdir(f"/proc/{pid}"):
                raise  # the process is gone, not the namespace
    return identity


def refusal(caller_pid: int, own: dict[str, str]) -> str | None:
    """Why the caller `caller_pid` must not be served by a worker with identity `own`; None if it may be."""
    try:
        caller = process_identity(caller_pid)
    except OSError as err:
        return f"cannot read its credentials ({err.strerror})"
    differing = [  # ids, capability masks and namespace inodes: nothing secret
        f"{field} {caller.get(field) or '-'} (server's {own.get(field) or '-'})"
        for field in dict.fromkeys([*own, *caller])
        if caller.get(field) != own.get(field)
    ]
    return "not the server's credentials: " + ", ".join(differing) if differing else None


def _monitor(conn: socket.socket, digest: str, own: dict[str, str], run_call: RunCall) -> None:
    """One call: check the caller, receive it, fork the worker, forward signals, report the wait status."""
    import threading

    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # we wait for our worker ourselves
        for sig in FORWARDED_SIGNALS:  # stopping the server does not stop the calls in flight
            signal.signal(sig, signal.SIG_IGN)
        caller_pid = peer_credentials(conn)[0]
        why = refusal(caller_pid, own)
        if why is not None:  # before reading anything of the call: it runs in its own process
            import logging

            logging.getLogger("gpbackup_sftp_plugin.forkserver").warning(
                "refused the call of pid %d, which runs in its own process: %s", caller_pid, why)
            conn.sendall(REFUSED + _INT.pack(0))
            os._exit(0)
        conn.settimeout(START_TIMEOUT)
        head, fds, _flags, _addr = socket.recv_fds(conn, _INT.size, 4)
        if len(head) != _INT.size or len(fds) != 4:
            raise OSError("malformed request")
        payload = _recv_exact(conn, _INT.unpack(head)[0])
        request = _decode_request(payload)
        if request.magic != MAGIC or request.digest != digest:
            conn.sendall(REFUSED + _INT.pack(0))
            os._exit(0)
        worker = os.fork()
        if worker == 0:
            conn.close()
            _run_worker(fds, request, run_call)  # never returns
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        conn.sendall(STARTED + _INT.pack(worker))
        finished = threading.Lock()
        done = False

        def forward() -> None:
            # Each byte from the client is a signal to pass on; EOF means the
            # client died, and its worker must not outlive it.
            while True:
                try:
                    data = conn.recv(16)
                except OSError:
                    data = b""
                with finished:
                    if done:
                        return
                    for sig in data or [signal.SIGKILL]:
                        os.kill(worker, sig)
                if not data:
                    return

        threading.Thread(target=forward, daemon=True).start()
        _pid, status = os.waitpid(worker, 0)
        with finished:
            done = True
        conn.sendall(ENDED + _INT.pack(status))
        code = 0
    except BaseException:  # noqa: BLE001 - a monitor reports by closing; the client says so
        code = 1
    finally:
        os._exit(code)


def _run_worker(fds: list[int], request: Request, run_call: RunCall) -> None:
    """Become the process the client would have been, run the command, exit with its code."""
    global _caller_pipe
    code = 1
    try:
        from sftp_plugin import caller

        caller.remember(*request.caller)
        caller.add_guard(act_on_caller_news)
        *std, _caller_pipe = fds
        for target, fd in enumerate(std):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        os.environb.clear()
        os.environb.update(request.env)
        import time

        time.tzset()  # log timestamps in the caller's TZ
        os.chdir(request.cwd)
        os.umask(request.umask)
        code = run_call(request.argv, os.getppid())
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - the reader may be gone; the exit code still counts
                pass
        import logging

        logging.shutdown()
        os._exit(code)
