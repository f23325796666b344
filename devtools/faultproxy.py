"""A TCP proxy on 127.0.0.1 that breaks connections on purpose, for the reliability and host key tests.

The plugin is pointed at the proxy instead of sshd. Every accepted connection
takes the next `Plan` from a queue (connection 1 gets plan 1, and so on); once
the queue is empty, connections pass through untouched. A plan can:

- pass everything through (`Plan.pass_through()`);
- reset the connection after N bytes have gone one way (`Plan.reset(n, direction)`):
  exactly N bytes are forwarded, then both sockets are closed abortively
  (SO_LINGER with a zero timeout), so each peer gets a TCP RST, not a FIN;
- stall after N bytes one way (`Plan.stall(n, direction)`): exactly N bytes are
  forwarded, then nothing more in either direction, with both sockets kept
  open until the proxy stops, like a link that silently drops every packet;
- refuse (`Plan.refuse()`): accept, then reset at once, before any byte and
  without ever contacting the upstream server;
- hold (`Plan.hold()`): accept, then wait for `release()` before connecting
  upstream and passing through, so that many clients can be made to reach
  the server in the same instant (e.g. to provoke sshd's MaxStartups).

`accepted` counts connections accepted, `triggered` counts plans whose fault
actually fired (a test asserts it, so a fault placed beyond the end of a
transfer cannot pass unnoticed), `forwarded` is each finished connection's
byte count per direction, and `bursts` lists the offsets at which each
direction started talking again after the other had spoken: on a
request/response protocol such as SFTP, the start of every request (or reply).
A test can calibrate on a clean run and then cut a connection inside each
request in turn.

Each connection is served by one thread with non-blocking sockets and
``poll``, so a slow reader in one direction never blocks the other direction;
`stop()` closes every socket and joins every thread.
"""

from __future__ import annotations

import enum
import fcntl
import select
import socket
import struct
import termios
import threading
import time
from collections import deque
from dataclasses import dataclass

LOCALHOST = "127.0.0.1"
# How often blocked loops look at the stop flag (seconds).
POLL_INTERVAL = 0.05
# Bytes read from a socket at once.
RECV_SIZE = 64 * 1024
# Stop reading a direction while this much is waiting to be written on (back pressure).
MAX_PENDING = 512 * 1024
# Seconds to wait for the upstream sshd to accept our connection.
UPSTREAM_CONNECT_TIMEOUT = 5.0
# Before an abortive close, how long to wait for the kernel to hand the last
# forwarded bytes to the peer (an RST discards unsent data).
DRAIN_TIMEOUT = 1.0
# Seconds stop() waits for each thread.
JOIN_TIMEOUT = 5.0
# SO_LINGER on, zero seconds: close() sends RST and discards unsent data.
ABORTIVE_LINGER = struct.pack("ii", 1, 0)
LISTEN_BACKLOG = 128


class Direction(enum.Enum):
    """Which way bytes flow through the proxy."""

    CLIENT_TO_SERVER = "c2s"
    SERVER_TO_CLIENT = "s2c"


class Action(enum.Enum):
    PASS = "pass"
    RESET = "reset"
    STALL = "stall"
    REFUSE = "refuse"
    HOLD = "hold"


@dataclass(frozen=True)
class Plan:
    """What the proxy does to one connection."""

    action: Action = Action.PASS
    after: int = 0
    direction: Direction = Direction.CLIENT_TO_SERVER

    @classmethod
    def pass_through(cls) -> Plan:
        return cls(Action.PASS)

    @classmethod
    def reset(cls, after: int, direction: Direction = Direction.CLIENT_TO_SERVER) -> Plan:
        """Forward ``after`` bytes in ``direction``, then RST both sides."""
        return cls(Action.RESET, after, direction)

    @classmethod
    def stall(cls, after: int, direction: Direction = Direction.CLIENT_TO_SERVER) -> Plan:
        """Forward ``after`` bytes in ``direction``, then nothing more either way, sockets kept open."""
        return cls(Action.STALL, after, direction)

    @classmethod
    def refuse(cls) -> Plan:
        """Accept, then RST before any byte; the upstream server is never contacted."""
        return cls(Action.REFUSE)

    @classmethod
    def hold(cls) -> Plan:
        """Accept, wait for `FaultProxy.release()`, then pass through."""
        return cls(Action.HOLD)

    def __str__(self) -> str:
        if self.action in (Action.PASS, Action.REFUSE, Action.HOLD):
            return self.action.value
        return f"{self.action.value}-after-{self.after}-{self.direction.value}"


def abort(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer receives a TCP RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE_LINGER)
    except OSError:
        pass
    sock.close()


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes still in the kernel's send queue of ``sock`` (Linux SIOCOUTQ); 0 when unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class _Pipe:
    """One direction of one connection: source socket, destination socket and the bytes between."""

    def __init__(self, direction: Direction, source: socket.socket, target: socket.socket) -> None:
        self.direction = direction
        self.source = source
        self.target = target
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.received = 0  # bytes read from source (and accepted for forwarding)
        self.bursts: list[int] = []  # values of `received` where this direction took its turn to talk
        self.source_done = False  # source sent FIN
        self.target_shut = False  # we sent FIN on target

    def queue(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.received += len(data)

    def flush(self) -> None:
        """Write as much as the target takes without blocking."""
        while self.pending:
            head = self.pending[0]
            try:
                sent = self.target.send(head)
            except (BlockingIOError, InterruptedError):
                return
            self.pending_bytes -= sent
            if sent < len(head):
                self.pending[0] = head[sent:]
                return
            self.pending.popleft()


class _Connection:
    """Both directions of one proxied connection, served by one thread."""

    def __init__(self, proxy: FaultProxy, number: int, client: socket.socket, plan: Plan) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.plan = plan
        self.upstream: socket.socket | None = None
        self.pipes: dict[Direction, _Pipe] = {}
        self.last_talker: Direction | None = None
        self.thread = threading.Thread(target=self._serve, name=f"faultproxy-conn-{number}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # --- the connection's thread -------------------------------------------------------

    def _serve(self) -> None:
        try:
            if self.plan.action is Action.REFUSE:
                abort(self.client)
                self.proxy._fired()
                return
            if self.plan.action is Action.HOLD:
                while not self.proxy.released.wait(POLL_INTERVAL):
                    if self.proxy.stopping.is_set():
                        self.client.close()
                        return
            try:
                self.upstream = socket.create_connection(self.proxy.upstream, timeout=UPSTREAM_CONNECT_TIMEOUT)
            except OSError:
                abort(self.client)
                return
            for sock in (self.client, self.upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pipes = {
                Direction.CLIENT_TO_SERVER: _Pipe(Direction.CLIENT_TO_SERVER, self.client, self.upstream),
                Direction.SERVER_TO_CLIENT: _Pipe(Direction.SERVER_TO_CLIENT, self.upstream, self.client),
            }
            self._forward()
        except OSError:
            # One peer reset or vanished: pass that on to the other as a reset.
            self._close(abortive=True)
        finally:
            self.proxy._record(
                self.number,
                {d.value: p.received for d, p in self.pipes.items()},
                {d.value: list(p.bursts) for d, p in self.pipes.items()},
            )

    def _forward(self) -> None:
        """Shuttle bytes both ways until both sides are done, a fault fires, or the proxy stops."""
        faulty = self.pipes.get(self.plan.direction) if self.plan.action in (Action.RESET, Action.STALL) else None
        fault_due = False  # the fault's byte count was reached; fire once those bytes are out
        while not self.proxy.stopping.is_set():
            if fault_due and faulty is not None:
                faulty.flush()
                if not faulty.pending:
                    self._fire(faulty)
                    return
            poller = select.poll()
            interest: dict[int, int] = {}
            for pipe in self.pipes.values():
                if not fault_due and not pipe.source_done and pipe.pending_bytes < MAX_PENDING:
                    interest[pipe.source.fileno()] = interest.get(pipe.source.fileno(), 0) | select.POLLIN
                if pipe.pending:
                    interest[pipe.target.fileno()] = interest.get(pipe.target.fileno(), 0) | select.POLLOUT
            if not interest and not fault_due:
                self._close(abortive=False)  # both directions finished cleanly
                return
            for fd, mask in interest.items():
                poller.register(fd, mask)
            events = dict(poller.poll(POLL_INTERVAL * 1000))
            for pipe in self.pipes.values():
                fd = pipe.source.fileno()
                if events.get(fd, 0) and interest.get(fd, 0) & select.POLLIN and not fault_due:
                    fault_due = self._read(pipe, faulty) or fault_due
                if pipe.pending:
                    pipe.flush()
                if pipe.source_done and not pipe.pending and not pipe.target_shut:
                    pipe.target_shut = True
                    try:
                        pipe.target.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
        self._close(abortive=False)

    def _read(self, pipe: _Pipe, faulty: _Pipe | None) -> bool:
        """Read what ``pipe``'s source offers; True when that reaches the fault's byte count."""
        try:
            data = pipe.source.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            pipe.source_done = True
            return False
        if self.last_talker is not pipe.direction:
            self.last_talker = pipe.direction
            pipe.bursts.append(pipe.received)
        if pipe is faulty:
            allowed = self.plan.after - pipe.received
            if len(data) >= allowed:
                pipe.queue(data[: max(allowed, 0)])
                return True
        pipe.queue(data)
        return False

    def _fire(self, faulty: _Pipe) -> None:
        self.proxy._fired()
        if self.plan.action is Action.RESET:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while unsent_bytes(faulty.target) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL / 10)
            self._close(abortive=True)
            return
        # STALL: keep both sockets open and silent until the proxy stops.
        self.proxy.stopping.wait()
        self._close(abortive=False)

    def _close(self, abortive: bool) -> None:
        for sock in (self.client, self.upstream):
            if sock is None or sock.fileno() < 0:
                continue
            if abortive:
                abort(sock)
            else:
                sock.close()


class FaultProxy:
    """A threaded TCP proxy from a free port on 127.0.0.1 to ``upstream_port``, breaking connections by plan.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, upstream_port: int, upstream_host: str = LOCALHOST, plans: tuple[Plan, ...] = ()) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.stopping = threading.Event()
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._plans: deque[Plan] = deque(plans)
        self._connections: list[_Connection] = []
        self._accepted = 0
        self._triggered = 0
        self._forwarded: dict[int, dict[str, int]] = {}
        self._bursts: dict[int, dict[str, list[int]]] = {}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCALHOST, 0))
        self._listener.listen(LISTEN_BACKLOG)
        self._listener.settimeout(POLL_INTERVAL)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)

    # --- control --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def push(self, *plans: Plan) -> None:
        """Queue plans for the next connections, in order."""
        with self._lock:
            self._plans.extend(plans)

    def release(self) -> None:
        """Let every held connection (and any held later) through to the server."""
        self.released.set()

    @property
    def accepted(self) -> int:
        """Connections accepted so far (refused ones included)."""
        with self._lock:
            return self._accepted

    @property
    def triggered(self) -> int:
        """Plans whose fault (reset, stall or refusal) actually happened."""
        with self._lock:
            return self._triggered

    def forwarded(self, number: int) -> dict[str, int]:
        """Bytes forwarded per direction ("c2s", "s2c") by finished connection ``number`` (1-based);
        how the reset offsets in test_reliability.py were measured."""
        with self._lock:
            return dict(self._forwarded.get(number, {}))

    def bursts(self, number: int, direction: Direction) -> list[int]:
        """Offsets in ``direction`` where finished connection ``number`` started a new turn of talking."""
        with self._lock:
            return list(self._bursts.get(number, {}).get(direction.value, []))

    def stop(self) -> None:
        """Close the listener and every connection, and join every thread."""
        self.stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join(JOIN_TIMEOUT)
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            if connection.thread.is_alive():
                connection.thread.join(JOIN_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            with self._lock:
                self._accepted += 1
                number = self._accepted
                plan = self._plans.popleft() if self._plans else Plan.pass_through()
                connection = _Connection(self, number, client, plan)
                self._connections.append(connection)
            connection.start()

    def _fired(self) -> None:
        with self._lock:
            self._triggered += 1

    def _record(self, number: int, counts: dict[str, int], bursts: dict[str, list[int]]) -> None:
        with self._lock:
            self._forwarded[number] = counts
            self._bursts[number] = bursts
