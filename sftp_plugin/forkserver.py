"""Fork server: keeps the plugin's code loaded between gpbackup's calls.

gpbackup starts the plugin once per file and, without --single-data-file, once
per table and segment: thousands of short processes per backup. A fresh Python
process spends ~15 ms starting, ~110 ms importing paramiko, cryptography and
PyYAML and ~20 ms tearing all of that down again: more than the SSH handshake,
and most of what separates a plugin call from OpenSSH's C client.

So after a successful call the plugin leaves one fork server per user and
installed copy of the code, detached, which has those modules imported and
exits after IDLE_SECONDS without a call once no worker is left. A later call
(the client, `delegate`) hands it, over a Unix socket in a private directory,
a route, then its argv, environment, working directory, umask and its
stdin/stdout/stderr themselves (SCM_RIGHTS). The server hands the call to a
*slot*: a worker process it forked, which runs the command exactly as the
fresh process would have (same fds, same environment), then releases the
caller's fds and reports the exit code, which the client exits with. Signals
sent to the client are forwarded to the worker; a client that dies (even by
SIGKILL) takes its worker's call with it.

A worker may stay for the next call (warm): when the code it runs says so
(`Ending.stay`: the call succeeded, and in the plugin it keeps an SSH session,
sessions.py), the slot tells the server it is idle, and the next call with
the same route (the caller's choice: for the plugin, its config file) goes to
it instead of a new slot. So a host runs as many slots as calls run at once,
or fewer where the code caps a route (`Ending.slots`): then a call beyond
waits for a slot of its route, however long (QUEUED).
A worker ends when `Calls.still_warm` says so, when its call failed or was
signalled, or when the server goes; the server ends the idle slots of a
route when a call's end asks it to (`Ending.retire_route`).

The client imports nothing heavy, and any trouble before the worker has
started (no server, stale socket, wrong owner, another version) means "run it
in this process", never a failed call. launcher/ holds the same client in C
(what gpbackup runs where it could be built): this module is its reference,
and launcher/build.py takes the protocol's constants from here. `fork_server: no` stops new servers
from being started; a running one exits after IDLE_SECONDS.

Trust goes both ways. The client uses a socket only in a directory nobody
else can change the way to (runtime_dir), and talks only to a server of its
own uid (SO_PEERCRED). The server serves only callers whose credentials and
namespaces are its own (refusal), since its worker runs with the server's,
not the caller's. Either refusal means: run in this process.
"""

from __future__ import annotations

# The client (every plugin call) imports this module, so it takes the C modules under `socket` and
# `signal` (and no functools): those two wrappers alone cost ~15 ms, more than the rest of the
# client. The server's functions import `socket` where they need it.
import _signal
import _socket
import os
import stat
import struct
import sys
import zlib

# typing.TYPE_CHECKING without importing typing, which costs the client ~7 ms of every call.
TYPE_CHECKING = False

# A server exits after this long without a call: a backup's calls come in
# bursts seconds apart, and a minute after the last one nothing should linger.
IDLE_SECONDS = 60
# How long the client waits for the worker to start before running the
# command itself: the server forks once and does no I/O before answering, so
# anything near this means it is stuck, and running in-process costs < 1 s.
START_TIMEOUT = 10.0
# sun_path holds 108 bytes including the terminating NUL; a longer TMPDIR means no fork server.
MAX_SOCKET_PATH = 107
# Signals the client forwards to its worker while it waits (terminal and
# supervisor signals; SIGKILL cannot be caught: the worker reads its client's end, _CallerWatch).
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
# Calls that may wait to be accepted: gpbackup starts one per segment at
# once, and a connection beyond the backlog waits (up to START_TIMEOUT).
LISTEN_BACKLOG = 128
# The environment variable by which start_server tells the server which of its fds is its lock, held already.
LOCK_FD_VARIABLE = "GPBACKUP_SFTP_PLUGIN_SERVER_LOCK_FD"
# How long stop-fork-server waits for a server it stopped to exit (it ends at once, between calls; calls in
# flight go on in their workers), and for a server that holds its lock but has not written its pid yet.
STOP_WAIT = 5.0
# Request framing version: a client and a server of different code never talk
# anyway (the socket name carries a digest of the code), this guards the rest.
MAGIC = b"GSFP2"

# Worker -> client replies: the worker started (its pid follows), the call
# ended (raw wait status follows), the request was refused (run it yourself).
STARTED, ENDED, REFUSED = b"P", b"S", b"R"
# Server -> client, before STARTED: the call waits for a slot of its route to be free (its route has as
# many as it may: Ending.slots), however long that takes; the client stops timing the start (0 follows).
QUEUED = b"Q"
_INT = struct.Struct("!i")
# What routes a call to a warm worker (see route_of): the client sends it first.
_ROUTE = struct.Struct("!IIQ")
# Server <-> slot messages: a call for the slot (its connection's fd comes with it), the slot is idle
# (with the most slots its route may have, when its worker said: Ending.slots),
# the slot ends and the idle slots of its route go with it, and (once per slot, after a call that left
# its worker warm) that call's request, from which the server starts spare slots of the route.
CALL, IDLE, RETIRE, TEMPLATE = b"C", b"I", b"X", b"T"
# Slot -> server, before it ends after a call that did not stay: the cap that call's worker reported.
CAP = b"L"
# Slot -> server, before it ends: its worker declined the call (Calls.admits), so every call of the route runs in
# its own process; the server refuses them at once from then on, without a slot of their own.
DECLINES = b"N"
# Client -> server, in place of a call's route: how it stands (server_status, for stop-fork-server's sibling
# fork-server-status). No call sends it, since a route's adler32 is never 0. The answer: a JSON report, then EOF.
STATUS = _ROUTE.pack(0, 0, 0)
# Slot -> server, as the slot's first call starts: what its route is, that call's working directory and argv (never its
# environment), for the status report (STATUS). A longer one than TEMPLATE_LIMIT is not sent.
ABOUT = b"M"
# A request larger than this (an environment of that size) is not offered: its route gets no spare slots.
TEMPLATE_LIMIT = 64 * 1024
# How long a call that found every slot of its route busy waits for one of them or a spare to be idle before
# it gets a new slot of its own: longer than a login normally takes, well within the client's START_TIMEOUT.
PARK_LIMIT = START_TIMEOUT / 2
# The longest pool a worker may report (Ending.pool): a host name and port, with room to spare.
POOL_LIMIT = 1024
# What the server and its workers are called in ps -e, top and pgrep (/proc/<pid>/comm, at most 15
# characters): both are otherwise "python3", like any other Python program on the host.
PROCESS_NAMES = {"server": "gpsftp-server", "worker": "gpsftp-worker"}
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
    "zstandard",  # container.py imports it only when a call compresses or decompresses
)
# The installed distributions whose code the server holds loaded besides ours
# (normalized project names): an upgrade of any of them (a security fix of
# paramiko or cryptography above all) must reach the next call, so their
# versions are part of the digest that names the server.
DEPENDENCIES = ("paramiko", "cryptography", "pyyaml", "tenacity", "bcrypt", "pynacl", "zstandard")
# How an installed distribution's metadata is named: <name>-<version>.dist-info
# (pip) or <name>-<version>[-pyX.Y].egg-info (distro packages, setup.py).
_METADATA_SUFFIXES = (".dist-info", ".egg-info")


# ---------------------------------------------------------------- location


_code_digest: str | None = None  # once per process: a call names its server and its request with it


def code_digest(fresh: bool = False) -> str:
    """Names this interpreter, this copy of the code and its dependencies: an upgrade gets a new server."""
    global _code_digest
    if _code_digest is None or fresh:
        _code_digest = digest_of(*digest_sources())
    return _code_digest


def digest_sources() -> tuple[str, list[str]]:
    """Where code_digest looks: our package's directory, and the site directories for DEPENDENCIES
    (the compiled client, launcher/, is built with these)."""
    package = os.path.dirname(os.path.abspath(__file__))
    site = sys.modules.get("site")  # imported at start-up unless -S; not worth importing for this
    site_dirs = site.getsitepackages() if site is not None else []
    return package, [os.path.dirname(package), *site_dirs]


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


def delegate(argv: list[str], route: bytes = b"") -> int | None:
    """Run `argv` in the fork server's worker and return its exit code; None to run it here.

    ``route`` names what a warm worker must share with this call to serve it
    (the caller's choice: the server only compares it; the worker re-checks
    whatever it keeps before using it). Raises WorkerLost when the worker
    started but its end could not be learned.
    """
    try:
        path = socket_path()
        if path is None:
            return None
        conn = _connect_to_own(path)
        if conn is None:
            return None
        conn.sendall(route_of(route))
        payload = _encode_request(argv)
        # The worker's news of us (see act_on_caller_news): the first signal we receive is
        # written here, and the write end closes only when we end.
        alive_read, alive_write = os.pipe()
        try:
            # A closed std fd cannot be passed on: EBADF, and the call runs here.
            _send_request(conn, payload, [0, 1, 2, alive_read])
        finally:
            os.close(alive_read)
        reply = _recv_exact(conn, 1 + _INT.size)
        while reply[:1] == QUEUED:  # the server keeps the call until a worker of its route is free
            conn.settimeout(None)
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
                pass  # the worker is gone: we end the way the signal ends us
        _forward(conn, signum)

    # A signal ignored here stays ignored, as it would be by the plugin running here.
    caught = [sig for sig in FORWARDED_SIGNALS if _signal.getsignal(sig) != _signal.SIG_IGN]
    previous = {sig: _signal.signal(sig, on_signal) for sig in caught}
    try:
        reply = _recv_exact(conn, 1 + _INT.size)
    except OSError:
        reply = b""
    finally:
        for sig, handler in previous.items():
            _signal.signal(sig, handler)
    if reply[:1] != ENDED:
        if first_signal is not None:  # our signal ended the worker (SIGINT raises KeyboardInterrupt here)
            _signal.raise_signal(first_signal)
        raise worker_lost()
    status = _INT.unpack(reply[1:])[0]
    if first_signal is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        # The worker finished before our signal reached it. Run here, the call would
        # have been ended by it, so it is: a signalled call never reports success.
        _signal.raise_signal(first_signal)  # SIGINT raises KeyboardInterrupt; the others end us
    return exit_code_of(status)


def _connect_to_own(path: str) -> socket.socket | None:
    """A connection to the server listening on `path`, if it runs as our uid (SO_PEERCRED); None, closed, if
    not: a server of another user gets nothing of ours, not even a request. OSError if none answers."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.settimeout(START_TIMEOUT)
        conn.connect(path)
        if peer_credentials(conn)[1] == os.getuid():
            return conn
    except OSError:
        conn.close()
        raise
    conn.close()
    return None


def worker_lost() -> WorkerLost:
    """The error of a call whose worker started but whose end could not be learned."""
    from sftp_plugin.errors import WorkerLost

    return WorkerLost(
        "lost contact with the fork server worker running this call; its outcome is unknown",
        "see the plugin log, and retry the operation",
    )


def act_on_caller_news() -> None:
    """In a worker, just before an upload is committed: act on what became of the client.

    Run in its own process, the plugin commits nothing once a signal has ended
    it or it was killed. A worker learns of either a moment later, through its
    connection (_CallerWatch), and could meanwhile read the end of a stream cut short (gpbackup_helper
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
    _signal.raise_signal(news[0])


def exit_code_of(status: int) -> int:
    """The worker's wait status as our own ending: its exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        sys.stdout.flush()
        _signal.signal(sig, _signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig  # only reached for a signal whose default is not to terminate
    return os.WEXITSTATUS(status)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a connected Unix socket (SO_PEERCRED).

    The kernel's word, as of connect() for a client and listen() for a server,
    whatever the socket file's owner says.
    """
    return _PEERCRED.unpack(conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size))


def _forward(conn: socket.socket, signum: int) -> None:
    try:
        conn.sendall(bytes([signum]))
    except OSError:
        pass  # the worker is gone: the end of the call says how


def _send_request(conn: socket.socket, payload: bytes, fds: list[int]) -> None:
    """A request as a worker reads it: its length with the call's stdin, stdout, stderr and liveness
    pipe (SCM_RIGHTS), then the request itself (_encode_request)."""
    conn.sendmsg([_INT.pack(len(payload))],
                 [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    conn.sendall(payload)


def _recv_ready(conn: socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes of a non-blocking socket: None if none has come yet, b"" at its end (or an error)."""
    try:
        return conn.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


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


def start_server(log_dir: str, entry: tuple[str, str], caps: dict[bytes, int] | None = None) -> None:
    """Start a detached fork server for later calls, unless one can't be placed safely.

    ``entry`` names the module and function the server process runs, with the
    socket path and ``log_dir`` as arguments, then ``caps`` (route_of(route) ->
    the most slots it may have, as Ending.slots will report it) as text
    arguments; it is expected to call `serve` with what each call runs and
    `parse_caps` of those (this module knows nothing of the commands). A cap
    known from the start holds for the calls that come at once before any of
    them has ended: the data calls that follow gpbackup's setup.

    Called after a successful call that ran in-process. The server inherits
    nothing of ours but its lock (_spawn_server): no other fd (gpbackup waits
    for EOF on our stdout), a new session, and an environment holding only
    what the interpreter needs to start; every call brings its own environment.
    """
    path = socket_path()
    if path is None:
        return
    lock = _take_lock(path)
    if lock is None:
        return  # a server holds it (serving or starting): no interpreter started for nothing
    try:
        _spawn_server(path, log_dir, entry, caps, lock)
    finally:
        os.close(lock)  # the server's copy holds it from here on


def _spawn_server(path: str, log_dir: str, entry: tuple[str, str], caps: dict[bytes, int] | None, lock: int) -> None:
    """Start the server process of start_server, handing it `lock` (held) and writing its pid there.

    The lock is never free between our check and the server's start: were it,
    stop-fork-server would take it for a leftover, and a server still starting
    would run on past the stop (and recreate its log directory after whoever
    stopped it had removed it).
    """
    import subprocess

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # -I: no PYTHON* variables, no user site (Greenplum's PYTHONHOME would break
    # the interpreter), so the package's own location is put on the path by hand.
    module, function = entry
    bootstrap = (
        f"import sys; sys.path.insert(0, {package_parent!r}); from {module} import {function}; "
        f"{function}(sys.argv[1], sys.argv[2], sys.argv[3:])"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), LOCK_FD_VARIABLE: str(lock)}
    for name in ("LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE"):
        if name in os.environ:
            env[name] = os.environ[name]
    hints = [f"{route.hex()}={cap}" for route, cap in (caps or {}).items()]
    server = subprocess.Popen(
        [sys.executable, "-I", "-c", bootstrap, path, os.path.expanduser(log_dir), *hints],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env=env,
        start_new_session=True,
        close_fds=True,
        pass_fds=(lock,),
    )
    _write_holder(lock, server.pid)  # the server writes the same once it runs (serve)


def parse_caps(hints: list[str]) -> dict[bytes, int]:
    """The caps start_server passed (``<route_of hex>=<slots>``); what does not parse is left out."""
    caps = {}
    for hint in hints:
        route, _, cap = hint.partition("=")
        try:
            caps[bytes.fromhex(route)] = int(cap)
        except ValueError:
            continue
    return {route: cap for route, cap in caps.items() if len(route) == _ROUTE.size and cap > 0}


def _write_holder(lock: int, pid: int) -> None:
    """Write `pid` into the lock file `lock` (held): the holder _lock_holder reads."""
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{pid}\n".encode(), 0)


def _inherited_lock(path: str) -> int | None:
    """The lock of `path` that start_server took and passed on to this process (LOCK_FD_VARIABLE), held and
    still the lock file's; None if none was passed or it is no longer that (removed meanwhile)."""
    text = os.environ.pop(LOCK_FD_VARIABLE, "")
    if not text.isdigit():
        return None
    lock = int(text)
    try:
        os.set_inheritable(lock, False)  # nothing the server or its workers start gets it
    except OSError:
        return None  # not an open fd after all
    return _locked_if_current(lock, path)  # ours already: the flock only checks that it still is


def _take_lock(path: str) -> int | None:
    """The server's lock file for `path`, locked, as an open fd; None when another holds it."""
    try:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    return _locked_if_current(lock, path)


def _locked_if_current(lock: int, path: str) -> int | None:
    """`lock`, an open lock file of `path`, flocked and still the file named `path`.lock; else None, closed."""
    import fcntl

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A lock file removed as stale (see remove_stale) between its open and
        # our flock locks nothing: another process may create and take it anew.
        if os.fstat(lock).st_ino != os.stat(path + ".lock").st_ino:
            raise FileNotFoundError(path + ".lock")
    except OSError:
        os.close(lock)
        return None
    return lock


class Ending:
    """How a call ended, as the code the server runs reports it (a plain class: the client imports nothing heavy)."""

    __slots__ = ("code", "pool", "retire_route", "slots", "stay")

    def __init__(self, code: int, stay: bool = False, retire_route: bool = False, slots: int | None = None,
                 pool: bytes | None = None) -> None:
        self.code = code  # the exit code
        # The worker keeps what it holds (a warm SSH session) and may serve the next call of the
        # same route: only after a call that succeeded and was not signalled.
        self.stay = stay
        # The end of a backup on this host: the idle workers of this route go too.
        self.retire_route = retire_route
        # The most slots (each with what its worker keeps) the route may have at once, 0 for no cap,
        # None when the call did not learn it: beyond it, a call waits for one of them to be free (QUEUED).
        self.slots = slots
        # What the route's slots share that cap with (the code's choice, at most POOL_LIMIT bytes; the plugin:
        # its backup host): routes reporting the same pool count each other's slots against their own cap,
        # and a call at its cap may take the place of another route's idle slot. None: the route alone.
        self.pool = pool


if TYPE_CHECKING:
    import logging
    import socket
    from collections.abc import Callable
    from typing import Protocol

    from sftp_plugin.errors import WorkerLost

    class Calls(Protocol):
        """What the server runs, handed to `serve`: this module knows nothing of the commands."""

        def run(self, argv: list[str], server: int) -> Ending:
            """Run one call in this (worker) process, whose fds, environment and cwd are the caller's."""

        def warm(self, argv: list[str], server: int) -> Ending:
            """Open, and keep for the next call, what a call of `argv` would use, without running it (a spare
            worker: its std fds are /dev/null, its environment and cwd those of an earlier call of the route)."""

        def admits(self, argv: list[str], cwd: str) -> bool:
            """Whether the call of `argv` (from a caller in `cwd`) may run in this worker, before anything of it
            runs; False: its client runs it in its own process."""

        def still_warm(self) -> bool:
            """Between calls, about once a second: False ends this worker (idle too long, config changed)."""

        def close(self) -> None:
            """The worker ends: release what it kept."""


def route_of(route: bytes) -> bytes:
    """The fixed-size form of a route, as the client sends it: a checksum, not a digest (hashlib
    costs the client ~3 ms to import); two routes that collide only cost a warm worker's re-check."""
    return _ROUTE.pack(zlib.crc32(route), zlib.adler32(route), len(route))


def serve(path: str, log_dir: str, calls: Calls, idle_seconds: float = IDLE_SECONDS,
          caps: dict[bytes, int] | None = None) -> None:
    """The server: preload, then accept calls until `idle_seconds` pass without one and no worker is left."""
    import importlib
    import logging
    import socket

    from sftp_plugin.log import setup_logging

    lock = _inherited_lock(path)
    if lock is None:
        lock = _take_lock(path)
    if lock is None:
        return  # another server for this code already runs (or is starting)
    _write_holder(lock, os.getpid())  # who holds it, for whoever wants to stop us
    setup_logging(log_dir, "info", "fork-server", [])
    _name_process("server")
    log = logging.getLogger("gpbackup_sftp_plugin.forkserver")
    for module in PRELOAD:  # sftp_plugin.cli first: it keeps paramiko from importing invoke
        importlib.import_module(module)
    digest = code_digest(fresh=True)  # the code as it is now, after the imports above
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
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)  # slots are reaped by the kernel
    for sig in FORWARDED_SIGNALS:
        _signal.signal(sig, _stop)
    # Now, not in a call: what other versions left behind costs no call anything to remove.
    try:
        removed = remove_stale(os.path.dirname(path))
    except OSError as err:  # only tidiness is lost; serving goes on
        log.warning("could not remove what fork servers of other code left in %s: %s", os.path.dirname(path), err)
    else:
        if removed:
            log.info("removed what fork servers of other code left: %s", ", ".join(removed))
    log.info("fork server %d serving %s", os.getpid(), path)
    dispatcher = _Dispatcher(listener, lock, digest, own, calls, log)
    dispatcher.caps.update(caps or {})
    why = f"after {idle_seconds:g} s idle"
    try:
        dispatcher.run(idle_seconds)
    except _Stopped as stop:
        why = f"on signal {stop.signum}"
    # Unlink first, then close: a call that connected in between sees EOF
    # before "started" and runs in its own process. Calls in flight go on;
    # idle workers read EOF from their slots and end.
    os.unlink(path)
    listener.close()
    dispatcher.close()
    log.info("fork server %d exiting %s (%d calls served, %d of them by a warm worker; %d spare workers; "
             "%d calls waited at their config's max_connections; %d sent back at once to run in their own "
             "process, their config saying fork_server: no)",
             os.getpid(), why, dispatcher.calls - dispatcher.refused, dispatcher.warm_calls, dispatcher.spares,
             dispatcher.capped_waits, dispatcher.refused)


class _Dispatcher:
    """The server's loop: accept a call, read its route, hand it to an idle slot of that route or a new one.

    A slot is a worker process (a child of the server). It tells the server
    over its control socket when it is idle (IDLE) or retires its route
    (RETIRE); the server hands an idle slot a call by passing the connection's
    fd (CALL). One process only ever decides, so no call is lost between
    them: a slot that leaves shuts its control socket for reading first, so a
    call passed to it fails to send and goes to another slot.

    A call that finds every slot of its route busy is parked, and a spare slot
    starts for it: a worker that logs in for the route (Calls.warm) with the
    request an earlier call of the route left (TEMPLATE). The call takes
    whichever slot is idle first, the spare or one that finishes its call; the
    other stays warm. So a call waits for no login when a busy session frees
    up sooner, and the slots of a route never outnumber its calls at once: a
    spare starts only for a parked call that no other spare is starting for.

    A route may also be capped (Ending.slots, as its idle slots last reported
    it): once it has that many slots, a call beyond waits, told QUEUED so that
    its client stops timing the start, until one of them is idle or ends.
    Routes that reported the same pool (Ending.pool) count each other's slots
    against their caps, and a call at its cap whose route has no slot takes
    the place of another route's idle slot of the pool (which ends).
    """

    def __init__(self, listener: socket.socket, lock: int, digest: str, own: dict[str, str], calls: Calls,
                 log: logging.Logger) -> None:
        import time

        self.listener, self.lock, self.digest, self.own, self.handler, self.log = (
            listener, lock, digest, own, calls, log)
        self.slots: dict[socket.socket, bytes] = {}  # every live slot's control socket -> its route
        self.idle: dict[bytes, list[socket.socket]] = {}  # route -> idle slots, most recently used last
        self.pending: dict[socket.socket, tuple[bytes, float]] = {}  # accepted, route not read yet
        self.templates: dict[bytes, bytes] = {}  # route -> the request of a call that left its worker warm
        self.parked: dict[bytes, list[tuple[socket.socket, float]]] = {}  # route -> calls waiting, oldest first
        self.caps: dict[bytes, int] = {}  # route -> the most slots it may have (absent: no cap)
        self.pools: dict[bytes, bytes] = {}  # route -> the pool whose slots count against its cap (absent: alone)
        self.queued: set[socket.socket] = set()  # parked calls told QUEUED
        self.capped_waits = 0  # calls that waited at their route's cap
        self.warming: set[socket.socket] = set()  # spare slots not idle yet
        self.retiring: set[socket.socket] = set()  # spare slots whose route retired meanwhile: they end once idle
        self.spare_calls: dict[socket.socket, int] = {}  # our end of each spare's request -> its liveness pipe
        self.declined: set[bytes] = set()  # routes whose calls run in their own process (DECLINES)
        self.about: dict[bytes, dict[str, object]] = {}  # route -> a call's cwd and argv (ABOUT), till it retires
        self.started = time.time()  # for the status report (STATUS)
        self.calls = 0
        self.refused = 0  # calls of a declined route, refused at once
        self.warm_calls = 0
        self.spares = 0

    def run(self, idle_seconds: float) -> None:
        import select
        import time

        last_call = time.monotonic()
        while True:
            now = time.monotonic()
            deadlines = [due - now for _, due in self.pending.values()]
            deadlines += [since + PARK_LIMIT - now for route, queue in self.parked.items() for _, since in queue[:1]
                          if not self._at_cap(route)]  # a capped route's calls wait for its slots' news
            if not self.slots:  # a live slot (busy, or idle with a session) keeps the server
                if now - last_call >= idle_seconds and not self.pending:
                    return
                deadlines.append(idle_seconds - (now - last_call))
            timeout = max(min(deadlines), 0.01) if deadlines else None
            # Slots first (select answers in this order): a slot's IDLE heard before a waiting route
            # lets that call have the warm slot.
            readable = select.select([*self.slots, *self.spare_calls, *self.pending, self.listener], [], [],
                                     timeout)[0]
            for ready in readable:
                if ready is self.listener:
                    self._accept()
                    last_call = time.monotonic()
                elif ready in self.pending:
                    self._read_route(ready)
                elif ready in self.slots:
                    self._hear_slot(ready)
                elif ready in self.spare_calls:
                    self._hear_spare_call(ready)
            now = time.monotonic()
            for conn, (_, due) in list(self.pending.items()):
                if due <= now:  # a client that never sent its route: it gets EOF and runs the call itself
                    del self.pending[conn]
                    conn.close()
            for route, queue in list(self.parked.items()):
                while queue and queue[0][1] + PARK_LIMIT <= now:  # waited long enough: a slot of its own
                    if self._at_cap(route):  # unless its route has all it may have: it waits on, unhurried
                        for conn, _ in queue:
                            self._tell_queued(conn)
                        break
                    conn = self._unpark(route)
                    if conn is not None:
                        self.log.info("a call waited %g s for a worker of its config: it gets one of its own",
                                      PARK_LIMIT)
                        self._new_slot(conn, route)
                if not queue:
                    del self.parked[route]

    def _accept(self) -> None:
        import time

        conn, _ = self.listener.accept()
        uid = peer_credentials(conn)[1]
        if uid != os.getuid():
            self.log.warning("refused a connection from uid %d", uid)
            conn.close()
            return
        conn.setblocking(False)
        self.pending[conn] = (b"", time.monotonic() + START_TIMEOUT)

    def _read_route(self, conn: socket.socket) -> None:
        got, due = self.pending[conn]
        data = _recv_ready(conn, _ROUTE.size - len(got))
        if data is None:
            return
        if not data:
            del self.pending[conn]
            conn.close()
            return
        got += data
        if len(got) < _ROUTE.size:
            self.pending[conn] = (got, due)
            return
        del self.pending[conn]
        conn.setblocking(True)
        if got == STATUS:
            self._answer_status(conn)
            return
        self.calls += 1
        self._dispatch(conn, got)

    def _answer_status(self, conn: socket.socket) -> None:
        """Send an administrator's client (server_status) the report, then hang up. The report is small; a
        client that does not read it within a second loses it, and the calls of others go on. A client the
        server would not serve a call of (refusal: other credentials or namespaces) gets no report either."""
        import json

        why = refusal(peer_credentials(conn)[0], self.own)
        if why is not None:
            self.log.warning("refused a status request: %s", why)
        conn.settimeout(1.0)
        try:
            conn.sendall(REFUSED if why is not None else json.dumps(self.report()).encode())
        except OSError:
            pass
        conn.close()

    def report(self) -> dict[str, object]:
        """How the server stands: its counts since it started, and per route its slots (idle, busy, starting
        as spares), the calls waiting, its cap, and whether its calls are sent back (declined)."""
        routes = dict.fromkeys([*self.slots.values(), *self.parked, *self.declined])
        return {
            "pid": os.getpid(), "since": self.started, "calls": self.calls - self.refused,
            "warm_calls": self.warm_calls, "spares": self.spares, "capped_waits": self.capped_waits,
            "sent_back": self.refused, "routes": [self._route_report(route) for route in routes],
        }

    def _route_report(self, route: bytes) -> dict[str, object]:
        """One route's part of the report. What the route is, the server knows only from its slots (ABOUT): a
        call's argv and working directory, for the reader to make sense of."""
        slots = [slot for slot, its in self.slots.items() if its == route]
        idle = len(self.idle.get(route, []))
        starting = sum(1 for slot in slots if slot in self.warming)
        return {
            "workers": len(slots), "idle": idle, "starting": starting, "busy": len(slots) - idle - starting,
            "waiting": len(self.parked.get(route, [])), "cap": self.caps.get(route),
            "pool_workers": self._pool_slots(route) - len(slots),
            "sent_back": route in self.declined, "call": self.about.get(route),
        }

    def _dispatch(self, conn: socket.socket, route: bytes) -> None:
        if route in self.declined:  # a worker would decline it: the client runs it in its own process
            self.refused += 1
            try:
                conn.sendall(REFUSED + _INT.pack(0))
            except OSError:
                pass  # the client is gone
            conn.close()
            return
        idle = self.idle.get(route, [])
        while idle:
            if self._give(idle.pop(), conn):
                return
        # All busy: wait for one (or a spare), or, where the route (with its pool) has all the slots it may
        # and none of them is another route's idle one to take the place of, only for one.
        if self._at_cap(route) and not self._make_room(route):
            self._park(conn, route)
            return
        if route in self.slots.values() and route in self.templates:
            self._park(conn, route)
            return
        self._new_slot(conn, route)

    def _sharing(self, route: bytes) -> set[bytes]:
        """The routes whose slots count against `route`'s cap: itself and those of its pool."""
        pool = self.pools.get(route)
        return {route} if pool is None else {route, *(its for its, their in self.pools.items() if their == pool)}

    def _at_cap(self, route: bytes) -> bool:
        cap = self.caps.get(route)
        return cap is not None and self._pool_slots(route) >= cap

    def _over_cap(self, route: bytes) -> bool:
        cap = self.caps.get(route)
        return cap is not None and self._pool_slots(route) > cap

    def _pool_slots(self, route: bytes) -> int:
        """The slots that count against `route`'s cap: its own and those of its pool."""
        sharing = self._sharing(route)
        return sum(1 for its in self.slots.values() if its in sharing)

    def _make_room(self, route: bytes) -> bool:
        """End an idle slot of another route of `route`'s pool, to make room for a slot of `route`; False if
        none is idle, or if `route` has a slot of its own: its calls wait for that one rather than take turns
        with the other route's calls, each turn a login."""
        if route in self.slots.values() or not self._end_idle_other(route):
            return False
        self.log.info("a call takes the place of an idle worker of another config to the same backup host: "
                      "with it, its config may have no more (%d)", self.caps[route])
        return True

    def _end_idle_other(self, route: bytes) -> bool:
        """End an idle slot of another route of `route`'s pool (that route's longest idle); False if none is."""
        others = [slot for its in self._sharing(route) - {route} for slot in self.idle.get(its, [])[:1]]
        if not others:
            return False
        self._forget(others[0])  # its worker reads EOF and ends, with the session it kept
        return True

    def _trim_pool(self, route: bytes) -> None:
        """`route`'s pool has more slots than its cap allows (its first call, or the pool's first, came before
        the server knew them): end idle slots of the pool's other routes, down to the cap."""
        while self._over_cap(route) and self._end_idle_other(route):
            self.log.info("ended an idle worker of another config to the same backup host: with it, a config "
                          "there had more than it may have (%d)", self.caps[route])

    def _tell_queued(self, conn: socket.socket) -> None:
        """Tell a parked call's client, once, that it waits for as long as it takes (QUEUED)."""
        if conn in self.queued:
            return
        self.queued.add(conn)
        try:
            conn.sendall(QUEUED + _INT.pack(0))
        except OSError:
            pass  # the client is gone: the slot that takes the call sees so, and nothing runs

    def _unpark(self, route: bytes) -> socket.socket | None:
        """The route's longest-waiting call whose client is still there; None if none is.

        A client gone while it waited (killed with gpbackup) is dropped here: handed to a slot, its
        call would end that slot (refused, to nobody) and the session its worker kept."""
        import select

        queue = self.parked.get(route, [])
        while queue:
            conn = queue.pop(0)[0]
            self.queued.discard(conn)
            poll = select.poll()
            poll.register(conn, select.POLLRDHUP)
            if not poll.poll(0):
                return conn
            conn.close()
        return None

    def _give(self, slot: socket.socket, conn: socket.socket) -> bool:
        """Hand an idle slot the call on `conn`; False (the slot forgotten, `conn` still ours) if it ended."""
        import socket

        try:
            socket.send_fds(slot, [CALL], [conn.fileno()])
        except OSError:
            self._forget(slot)  # ended meanwhile
            return False
        self.warm_calls += 1
        conn.close()
        return True

    def _park(self, conn: socket.socket, route: bytes) -> None:
        import time

        queue = self.parked.setdefault(route, [])
        queue.append((conn, time.monotonic()))
        if self._at_cap(route):
            if not self.capped_waits:  # once: a capped storm parks most of its calls (the exit line counts them)
                self.log.info("calls wait: every worker of their config%s is busy, and it may have no more (%d)",
                              "" if self._sharing(route) == {route} else " and of others to the same backup host",
                              self.caps[route])
            self.capped_waits += 1
            self._tell_queued(conn)
            return
        starting = sum(1 for slot in self.warming if self.slots.get(slot) == route)
        if starting < len(queue) and route in self.templates:
            self._start_spare(route)

    def _start_spare(self, route: bytes) -> None:
        """A new slot whose worker opens a session for `route` (Calls.warm), with our own end of its request:
        the route's template, /dev/null for std fds, a liveness pipe we hold open until the slot replies."""
        import socket

        payload = self.templates[route]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        alive_read, alive_write = os.pipe()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            # Far below the socket's buffer (TEMPLATE_LIMIT): this never waits for the slot to read.
            _send_request(ours, payload, [null, null, null, alive_read])
        except OSError:
            self.log.warning("could not start a spare slot", exc_info=True)
            ours.close()
            theirs.close()
            os.close(alive_write)
            return
        finally:
            os.close(null)
            os.close(alive_read)
        ours.setblocking(False)
        self.spare_calls[ours] = alive_write  # before the fork: the slot must hold neither
        slot = self._new_slot(theirs, route)
        if slot is None:
            del self.spare_calls[ours]
            ours.close()
            os.close(alive_write)
            return
        self.warming.add(slot)
        self.spares += 1
        busy = sum(1 for other, its in self.slots.items() if its == route and other is not slot)
        self.log.info("a call waits: every worker of its config is busy (%d); a spare worker logs in for it", busy)

    def _parked_calls(self) -> list[socket.socket]:
        return [conn for queue in self.parked.values() for conn, _ in queue]

    def _hear_spare_call(self, ours: socket.socket) -> None:
        """The slot's replies to a spare's request (started, ended): read until it closes, then let go."""
        if _recv_ready(ours, 64) == b"":
            os.close(self.spare_calls.pop(ours))
            ours.close()

    def _new_slot(self, conn: socket.socket, route: bytes) -> socket.socket | None:
        """Fork a slot to serve the call on `conn`; its control socket, None if it could not be forked."""
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            self.log.warning("cannot fork a slot; the call runs in its own process", exc_info=True)
            ours.close()
            theirs.close()
            conn.close()
            return None
        if pid == 0:
            try:  # whatever happens here (a signal meant for the server), this process never serves
                # Nothing of the server stays open in a slot: a copy of another slot's control
                # socket would keep that slot from reading EOF, a copy of the lock keeps it held,
                # a copy of a waiting call's connection or a spare's pipe would hide its end.
                ours.close()
                self.listener.close()
                os.close(self.lock)  # a flock holds while any copy is open: a long call must not keep it
                for other in [*self.slots, *self.pending, *self.spare_calls, *self._parked_calls()]:
                    other.close()
                for fd in self.spare_calls.values():
                    os.close(fd)
                _slot(theirs, conn, self.digest, self.own, self.handler)  # never returns
            finally:
                os._exit(1)
        theirs.close()
        conn.close()
        self.slots[ours] = route
        return ours

    def _hear_slot(self, slot: socket.socket) -> None:
        try:
            message = slot.recv(1 + TEMPLATE_LIMIT)
        except OSError:
            message = b""
        route = self.slots[slot]
        if message[:1] == TEMPLATE:
            self.templates[route] = message[1:]
        elif message[:1] == CAP:
            self._learn_cap(route, message)
        elif message == DECLINES:
            self.declined.add(route)
        elif message[:1] == ABOUT:
            cwd, *argv = (os.fsdecode(field) for field in message[1:].split(b"\0"))
            self.about[route] = {"argv": argv, "cwd": cwd}
        elif message[:1] == IDLE:
            self._learn_cap(route, message)
            self.warming.discard(slot)
            conn = self._unpark(route)
            if conn is not None:
                if not self._give(slot, conn):
                    self._new_slot(conn, route)
            elif slot in self.retiring:
                self._forget(slot)
            else:
                self.idle.setdefault(route, []).append(slot)
                self._trim_pool(route)
                self._serve_pool(route)
        elif message == RETIRE:
            for other in self.idle.pop(route, []):
                self._forget(other)
            self._forget(slot)
            self.templates.pop(route, None)
            if route not in self.slots.values():  # kept till now: a route's calls may wait with no slot (pools)
                self.about.pop(route, None)
            self.retiring.update(other for other in self.warming if self.slots.get(other) == route)
            self._replace_ended(route)
        else:  # EOF: the slot ended
            self._forget(slot)
            self._replace_ended(route)

    def _learn_cap(self, route: bytes, message: bytes) -> None:
        """The cap a slot's message (IDLE, CAP) carries for its route, if any (0 means none), and its pool."""
        if len(message) < 1 + _INT.size:
            return
        cap = _INT.unpack_from(message, 1)[0]
        if cap > 0:
            self.caps[route] = cap
        else:
            self.caps.pop(route, None)
        pool = message[1 + _INT.size:]
        if pool:
            self.pools[route] = pool
        else:
            self.pools.pop(route, None)

    def _waiting_in_pool(self, route: bytes) -> list[bytes]:
        """The routes of `route`'s pool with calls waiting, the longest-waiting call's first."""
        waiting = [its for its in self._sharing(route) if self.parked.get(its)]
        return sorted(waiting, key=lambda its: self.parked[its][0][1])

    def _serve_pool(self, route: bytes) -> None:
        """A slot of `route` is idle and no call of its own waits: a call of another route of the pool waiting
        at its cap takes its place."""
        for its in self._waiting_in_pool(route):
            if self._at_cap(its) and self._make_room(its):
                conn = self._unpark(its)
                if conn is not None:
                    self._new_slot(conn, its)
                return

    def _replace_ended(self, route: bytes) -> None:
        """A slot of `route` ended: a call that waited for it (a spare that failed to log in, a capped
        route's busy slot whose call retired the route, a slot of the pool) gets a slot of its own."""
        for its in self._waiting_in_pool(route):
            if not self._at_cap(its):
                conn = self._unpark(its)
                if conn is not None:
                    self.log.info("a waiting call gets a worker of its own: another worker of its config%s ended",
                                  "" if its == route else " or of another to the same backup host")
                    self._new_slot(conn, its)
                return

    def _forget(self, slot: socket.socket) -> None:
        route = self.slots.pop(slot, None)
        if route is not None and slot in self.idle.get(route, []):
            self.idle[route].remove(slot)
        self.warming.discard(slot)
        self.retiring.discard(slot)
        slot.close()

    def close(self) -> None:
        for conn in [*self.pending, *self._parked_calls()]:
            conn.close()
        self.parked.clear()
        self.queued.clear()
        for ours, alive_write in self.spare_calls.items():
            os.close(alive_write)
            ours.close()
        self.spare_calls.clear()
        for slot in list(self.slots):
            self._forget(slot)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def stop_servers() -> tuple[list[int], list[int]]:
    """Stop this user's fork servers (every version) in the current socket directory: the pids of those that
    exited, and of those still running STOP_WAIT seconds after they were told to.

    For an admin after an upgrade or while troubleshooting, and for the demo
    and the benchmark, which must leave nothing running. Calls in flight are
    not touched; a lock nobody holds is a leftover and is removed.
    """
    import time

    told = []
    for _sock, pid, _this_code in running_servers(tidy=True):
        try:
            os.kill(pid, _signal.SIGTERM)
        except ProcessLookupError:  # it ended meanwhile
            pass
        told.append(pid)
    deadline = time.monotonic() + STOP_WAIT
    running = [pid for pid in told if _alive(pid)]
    while running and time.monotonic() < deadline:
        time.sleep(0.02)
        running = [pid for pid in running if _alive(pid)]
    return [pid for pid in told if pid not in running], running


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, which only waits for its parent to reap it, does not)."""
    from sftp_plugin.caller import stat_fields

    fields = stat_fields(pid)
    return bool(fields) and fields[0] != b"Z"


def running_servers(tidy: bool = False) -> list[tuple[str, int, bool]]:
    """This user's fork servers in the current socket directory: (socket path, pid, whether it runs this code).
    With `tidy`, the lock files and sockets no server holds are removed on the way (_lock_holder)."""
    import time

    directory = runtime_dir()
    if directory is None:
        return []
    ours = socket_path()
    servers = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".sock.lock"):
            sock = os.path.join(directory, name[: -len(".lock")])
            pid = _lock_holder(sock + ".lock", tidy)
            deadline = time.monotonic() + STOP_WAIT
            while pid == 0 and time.monotonic() < deadline:  # held by a server being started: its pid comes
                time.sleep(0.01)
                pid = _lock_holder(sock + ".lock", tidy)
            if pid:
                servers.append((sock, pid, sock == ours))
    return servers


def server_status(path: str) -> dict[str, object] | None:
    """The report (_Dispatcher.report) of the server listening on `path`; None if none of ours answers.
    Only a server of this code understands STATUS: ask no other (running_servers says which). Raises
    PermissionError when the server refuses us, as it would refuse our calls (refusal)."""
    import json

    try:
        conn = _connect_to_own(path)
    except OSError:
        return None
    if conn is None:
        return None
    try:
        conn.sendall(STATUS)
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
    except OSError:
        return None
    finally:
        conn.close()
    if data == REFUSED:
        raise PermissionError("its credentials or namespaces differ from this process's")
    try:
        report = json.loads(data)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


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


def _lock_holder(lock_path: str, tidy: bool = True) -> int | None:
    """The pid a held server lock names (0 if not written yet); None if nobody holds it.

    A lock nobody holds, and its socket, are leftovers and removed (under the
    lock: see _take_lock for a process that opened it meanwhile), unless `tidy` is False.
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
        if not tidy:
            return None
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


def _slot(ctrl: socket.socket, conn: socket.socket, digest: str, own: dict[str, str], calls: Calls) -> None:
    """A slot: this process serves `conn`, then each call the server passes while it stays warm (what its
    calls keep, an SSH session, lives here between them); never returns. It is the worker itself: there is no
    process between the server and the call, and none between the call and its client (_CallerWatch)."""
    offered = False  # our template (TEMPLATE): once per slot is enough for the server
    try:
        _name_process("worker")
        # A call's own children (a ProxyCommand) are waited for; the server lets the kernel reap its slots.
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        _signal.signal(_signal.SIGIO, _signal.SIG_IGN)  # its default would end us: only a call's watch takes it
        _quiet_between_calls()  # stopping the server does not stop the call in flight
        first = True
        while True:
            stay, retire, template = _serve_call(ctrl, conn, digest, own, calls, first)
            first = False
            conn.close()
            if template is not None and not offered and len(template) <= TEMPLATE_LIMIT:
                _tell(ctrl, TEMPLATE + template)
                offered = True
            if not stay:
                if retire:
                    _tell(ctrl, RETIRE)
                break
            next_conn = _next_call(ctrl, calls)
            if next_conn is None:
                break
            conn = next_conn
    except Exception:  # a bug of ours: the client reads EOF and says its worker was lost; the log says why
        import logging

        logging.getLogger("gpbackup_sftp_plugin.forkserver").exception("fork server worker %d failed", os.getpid())
    except BaseException:  # noqa: BLE001 - interrupted between calls: the same, nothing to log
        pass
    finally:
        try:
            calls.close()
        finally:
            import logging

            logging.shutdown()
            os._exit(0)


def _tell(ctrl: socket.socket, message: bytes) -> None:
    """Send the server `message`; a server already gone hears nothing, and this slot ends at its next read."""
    try:
        ctrl.send(message)
    except OSError:
        pass


def _next_call(ctrl: socket.socket, calls: Calls) -> socket.socket | None:
    """Wait, idle, for the server's next call (its connection); None when the slot should end: the server
    closed our control socket (it retired us, or exits), or, asked about once a second, `calls` no longer
    wants to stay warm (idle too long, its config changed).

    Leaving, the slot first shuts its control socket for reading, so that the server's next CALL fails at
    once (the server then hands it to another slot), and still serves a call the server sent before that:
    a call passed to a slot that ends unread would have run in its client's own process."""
    import select
    import socket

    while True:
        if not select.select([ctrl], [], [], 1.0)[0]:
            if calls.still_warm():
                continue
            ctrl.shutdown(socket.SHUT_RD)  # from here on a read returns what was sent before, then EOF
        message, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 1)
        if message == CALL and len(fds) == 1:
            return socket.socket(fileno=fds[0])
        for fd in fds:
            os.close(fd)
        if not message:
            return None


def _serve_call(ctrl: socket.socket, conn: socket.socket, digest: str,  # noqa: PLR0913
                own: dict[str, str], calls: Calls, first: bool) -> tuple[bool, bool, bytes | None]:
    """One call: check the caller, receive it, run it here, report its end. Whether this slot stays for the
    next call, whether its route retires, and the request if it was a client's call that left us warm (the
    server's template of the route). The slot's `first` call, once started, also tells the server what the
    route is (ABOUT). A request from the server itself (our parent) is a spare's: we only warm up for it.
    A call that is not run (refused, declined) leaves the slot as it was: warm if it was, else ending."""
    import socket

    caller_pid = peer_credentials(conn)[0]
    spare = caller_pid == os.getppid()
    why = refusal(caller_pid, own)
    if why is not None:  # before reading anything of the call: it runs in its own process
        import logging

        logging.getLogger("gpbackup_sftp_plugin.forkserver").warning(
            "refused the call of pid %d, which runs in its own process: %s", caller_pid, why)
        return _refuse(ctrl, conn, warm=not first)
    conn.settimeout(START_TIMEOUT)
    head, fds, _flags, _addr = socket.recv_fds(conn, _INT.size, 4)
    taken = False
    try:
        if len(head) != _INT.size or len(fds) != 4:
            raise OSError("malformed request")
        payload = _recv_exact(conn, _INT.unpack(head)[0])
        request = _decode_request(payload)
        if request.magic != MAGIC or request.digest != digest:
            return _refuse(ctrl, conn, warm=not first)
        if not calls.admits(request.argv, request.cwd):
            # Another worker would decline it too, and this route's next calls: the server sends them back.
            _tell(ctrl, DECLINES)
            return _refuse(ctrl, conn, warm=False)
        conn.settimeout(None)
        conn.sendall(STARTED + _INT.pack(os.getpid()))
        taken = True
    finally:
        if not taken:
            for fd in fds:
                os.close(fd)
    if first and not spare:
        _tell_about(ctrl, request)
    ending = _run_call(fds, request, calls.warm if spare else calls.run, conn)
    pool = (ending.pool or b"")[:POOL_LIMIT]
    _report_end(ctrl, ending.stay, ending.slots, pool)
    try:
        conn.sendall(ENDED + _INT.pack((ending.code & 0xFF) << 8))  # as waitpid reports an exit with that code
    except OSError:
        pass  # the client died as its call ended: nothing of the call is left to tell, and we stay as we are
    return ending.stay, ending.retire_route, payload if ending.stay and not spare else None


def _refuse(ctrl: socket.socket, conn: socket.socket, warm: bool) -> tuple[bool, bool, None]:
    """Send the client back to run its call in its own process; a `warm` slot is idle again (IDLE)."""
    if warm:
        _tell(ctrl, IDLE)
    try:
        conn.sendall(REFUSED + _INT.pack(0))
    except OSError:
        pass  # the client is gone
    return warm, False, None


def _tell_about(ctrl: socket.socket, request: Request) -> None:
    """Tell the server what this slot's route is (ABOUT): the call's working directory and argv."""
    message = ABOUT + b"\0".join(os.fsencode(field) for field in [request.cwd, *request.argv])
    if len(message) <= 1 + TEMPLATE_LIMIT:
        _tell(ctrl, message)


def _report_end(ctrl: socket.socket, stays: bool, slots: int | None = None, pool: bytes | None = None) -> None:
    """Tell the server a call ended: a slot that stays is idle (IDLE), said before the client hears its call's
    end, since the caller's next call, started the moment this one ends, must find this slot idle rather than
    open a new one (and a new SSH session). `slots`, the cap on the route's slots the call reported (None: it
    did not learn it), and its `pool` after it, go with IDLE, or alone (CAP) from a slot about to end: they
    still count for the route's other slots."""
    cap = b"" if slots is None else _INT.pack(slots) + (pool or b"")
    if stays:
        _tell(ctrl, IDLE + cap)
    elif cap:
        _tell(ctrl, CAP + cap)


class _CallerWatch:
    """While a call runs in this process, what its client sends it: each byte is a signal the client
    received and forwards, raised here; EOF means the client died (even by SIGKILL), and the call must not
    outlive it. The kernel tells us with SIGIO when the connection has news (O_ASYNC): no thread or process
    waits on it between two signals. Python runs the handler in the main thread, between two bytecodes or as
    a blocking call of that thread is interrupted by the signal.

    A signal raised here between `start` and the call's own handlers, or after the call's end quieted them,
    is ignored: the liveness pipe (act_on_caller_news) still keeps such a call from committing, and a
    signalled call from staying warm."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def start(self) -> None:
        import fcntl
        import threading

        fd = self.conn.fileno()
        _signal.signal(_signal.SIGIO, self._on_news)
        # To this thread (the main one, whose blocking calls the signal must interrupt), not to any thread.
        fcntl.fcntl(fd, _F_SETOWN_EX, _OWNER.pack(_F_OWNER_TID, threading.get_native_id()))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        self._on_news()  # what came before O_ASYNC was set raised no SIGIO

    def stop(self) -> None:
        import fcntl

        fd = self.conn.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)
        _signal.signal(_signal.SIGIO, _signal.SIG_IGN)  # a SIGIO still pending is dropped

    def _on_news(self, *_args: object) -> None:
        while True:
            try:
                data = self.conn.recv(16, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                return  # SIGIO also says the connection may be written to: nothing to read
            except OSError:
                data = b""
            for sig in data or [_signal.SIGKILL]:
                _signal.raise_signal(sig)
            if not data:
                return


# fcntl's F_SETOWN_EX and its struct f_owner_ex (Linux; Python's fcntl module does not name them): SIGIO to one thread.
_F_SETOWN_EX, _F_OWNER_TID = 15, 0
_OWNER = struct.Struct("ii")


def _name_process(role: str) -> None:
    """Name this process after its role (PROCESS_NAMES): threads it starts later take the name too. Where /proc
    does not let us, it keeps its name; nothing else depends on it."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(PROCESS_NAMES[role])
    except OSError:
        pass


def _quiet_between_calls() -> None:
    """Between calls a worker takes no signal: a late one meant for the last call must not end the next."""
    for sig in FORWARDED_SIGNALS:
        _signal.signal(sig, _signal.SIG_IGN)


def _fresh_std_streams() -> None:
    """New sys.stdin, stdout and stderr objects on fds 0-2: nothing an earlier call left in their
    buffers (input read ahead, output not flushed) can reach this call's caller."""
    for name, fd, mode, errors in (("stdin", 0, "r", "surrogateescape"), ("stdout", 1, "w", "surrogateescape"),
                                   ("stderr", 2, "w", "backslashreplace")):
        old = getattr(sys, name)
        line_buffered = mode == "w" and (name == "stderr" or os.isatty(fd))  # as Python sets them up
        setattr(sys, name, open(fd, mode, buffering=1 if line_buffered else -1, encoding=old.encoding,  # noqa: SIM115
                                errors=errors, closefd=False))


def _take_environment(env: dict[bytes, bytes]) -> None:
    """Make the environment exactly `env`, touching only what differs: a caller's environment is
    nearly always the last call's, and clearing and refilling it (a putenv or unsetenv and Python's
    bookkeeping for each of ~40 variables) cost a warm call ~0.1 ms of CPU."""
    current = os.environb
    # CPython's dict behind os.environ and os.environb, compared at C speed: most calls stop here (reading
    # the mapping key by key cost ~180 Python calls of the ~2,700 a warm call makes).
    if getattr(current, "_data", None) == env:
        return
    for key in [key for key in current if key not in env]:
        del current[key]
    for key, value in env.items():
        if current.get(key) != value:
            current[key] = value


def _run_call(fds: list[int], request: Request, task: Callable[[list[str], int], Ending],
              conn: socket.socket) -> Ending:
    """Become the process the client on `conn` would have been, run the command (`task`: Calls.run, or
    Calls.warm for a spare) with the client's signals and death watched, become nobody's again."""
    global _caller_pipe
    ending = Ending(1)
    *std, _caller_pipe = fds
    watch = _CallerWatch(conn)
    try:
        from sftp_plugin import caller

        caller.remember(*request.caller)
        caller.add_guard(act_on_caller_news)
        for target, fd in enumerate(std):
            os.dup2(fd, target)
            os.close(fd)
        _fresh_std_streams()
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        for sig in (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
            _signal.signal(sig, _signal.SIG_DFL)
        watch.start()  # once the call's handlers are set: a forwarded signal now acts as it would on it
        _take_environment(request.env)
        import time

        time.tzset()  # log timestamps in the caller's TZ
        os.chdir(request.cwd)
        os.umask(request.umask)
        ending = task(request.argv, os.getppid())
    except SystemExit as stop:
        ending = Ending(stop.code if isinstance(stop.code, int) else 1)
    except KeyboardInterrupt:
        ending = Ending(130)
    watch.stop()  # the call has ended: the client's news from now on is the caller pipe's to tell
    _quiet_between_calls()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the reader may be gone; the exit code still counts
            ending.stay = False  # what stayed in the buffer must never reach a later caller
    # The caller's stdin, stdout and stderr go now: gpbackup waits for EOF on them, and the
    # next call brings its own. A signal or death of the caller seen now means no staying.
    null = os.open(os.devnull, os.O_RDWR)
    for target in range(3):
        os.dup2(null, target)
    os.close(null)
    import select

    signalled = bool(select.select([_caller_pipe], [], [], 0)[0])
    os.close(_caller_pipe)
    _caller_pipe = None
    if signalled:
        ending.stay = False
    return ending
