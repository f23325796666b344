"""A userspace TCP delay proxy: the bench's high-latency link on kernels without netem.

`DelayProxy` listens on free ports on 127.0.0.1 (one per `forward()` call) and
forwards every connection to an upstream address, such as the bench's loopback
sshd. Every chunk read from either side is held, and written to the other side
only ``one_way_delay`` seconds after it was read, in order; an end of stream
(FIN) is delayed the same way. So every request/response round trip through the
proxy pays ``2 * one_way_delay``, as over a link with that RTT.

With a ``rate`` (bytes per second), each direction is also a link of that
bandwidth shared by all connections: a chunk leaves the link ``len / rate``
seconds after the one before it (or after it was read, if the link was idle),
then travels ``one_way_delay``, as over a serial link; without one, bandwidth is
limited only by the proxy's own CPU cost: it reads up to
`READ_CHUNK` bytes at a time, lets up to `MAX_HELD` bytes per direction be in
flight, and one timer per direction releases every chunk that is due at once,
so its work is per chunk, never per byte. A chunk never leaves early, but may
leave up to about a millisecond late (asyncio's timers wait in epoll, which
counts whole milliseconds), so 10 ms each way measures about 21 ms RTT. Not
emulated: loss, jitter, and the TCP handshake (a client's
connect completes at the proxy at once, so a connection opens one RTT sooner
than over a real link; every client gets the same).

All connections are served by one asyncio event loop in a background thread of
the calling process, so there is no child process to clean up: `close()` (or
leaving the ``with`` block) aborts every connection and joins the thread.
`measure_rtt()` times small request/response exchanges through a running
proxy, to check the delay it really adds.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

LOCALHOST = "127.0.0.1"
KIB = 1024
MIB = 1024 * KIB
# Bytes asked of the kernel per read. SSH over loopback moves a few hundred MiB/s; 256 KiB reads keep that
# to a few thousand reads, timers and writes per second per direction, when more than that is waiting.
READ_CHUNK = 256 * KIB
# Bytes held in the delay (read, not yet due) per direction before reading from the sender pauses: a cap on
# the in-flight window and its memory that, at 10 ms one way, still allows 6.4 GB/s, far above what SSH
# reaches on one machine, so it is never what limits a transfer.
MAX_HELD = 64 * MIB
# Bytes a socket may have queued for writing (beyond the kernel's buffer) before reading from the other side
# pauses, so a receiver that stops reading stops its sender too. asyncio's default (64 KiB) is a quarter of
# one read: this is several reads, so releasing a burst of due chunks does not pause and resume every time.
WRITE_HIGH_WATER = 4 * MIB
# Pending connections per listener; the bench opens a handful at once at most.
LISTEN_BACKLOG = 128
# Seconds to wait for the event loop thread to start, answer or stop; each takes milliseconds.
THREAD_TIMEOUT = 10.0
# Exchanges measure_rtt() times: 20 give a stable median and take under half a second at 20 ms RTT.
RTT_EXCHANGES = 20
# Seconds measure_rtt() waits for one connection or byte: far above any delay the bench asks for.
PROBE_TIMEOUT = 5.0
# One byte each way: the smallest request/response, so the time is the delay and nothing else.
PROBE = b"?"
# Blocked in the proxy's thread, so the kernel hands Ctrl-C and SIGTERM to the main thread: Python runs
# signal handlers only there, and a signal taken by this thread would not interrupt the main thread's wait.
MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection (the client's or the upstream's), read into a reused buffer."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(READ_CHUNK)
        self.outbound: _Direction  # what this side sends; set by _Direction
        self.inbound: _Direction  # what this side receives; set by _Direction
        self.write_blocked = False  # more than WRITE_HIGH_WATER is waiting to be sent to this side
        self.reading_paused = False
        self.eof = False  # this side sent its FIN: nothing more to read
        self.lost = False  # the socket is closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # No Nagle: chunks leave when released, not when the peer has acknowledged the last one. asyncio
        # sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, which an accepted socket's is not
        # (0): small replies to the client then waited for its delayed ACK, 40 ms on half the short calls.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.outbound.update_flow()
        self.inbound.update_flow()
        self.inbound.schedule()  # the other side may have sent chunks before this one was connected

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.outbound.push(bytes(memoryview(self.buffer)[:nbytes]))

    def eof_received(self) -> bool:
        self.eof = True
        self.outbound.push(None)
        return True  # keep the socket open: the other direction may still be writing to it

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.inbound.update_flow()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.inbound.update_flow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.connection.side_lost(self)

    def set_reading(self, wanted: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.eof or self.lost:
            return
        if wanted and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False
        elif not wanted and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True


class _Link:
    """One direction's bandwidth, shared by every connection of the proxy: when it is next free to send."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate  # bytes per second; None: no limit
        self.free_at = 0.0
        self.passed = 0  # bytes passed this way, over all connections of the proxy

    def sent_by(self, now: float, size: int) -> float:
        """When a chunk of `size` bytes read at `now` has left the link (now, without a rate)."""
        if self.rate is None:
            return now
        self.free_at = max(now, self.free_at) + size / self.rate
        return self.free_at


class _Direction:
    """Chunks read from one side, each held until it has crossed the link (its bandwidth, then
    one_way_delay), then written to the other."""

    def __init__(self, connection: _Connection, delay: float, source: _Side, dest: _Side, link: _Link) -> None:
        self.connection = connection
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.delay = delay
        self.source = source
        self.dest = dest
        source.outbound = self
        dest.inbound = self
        self.held: deque[tuple[float, bytes | None]] = deque()  # (due time, chunk), oldest first; None: FIN
        self.held_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False  # the end of stream is queued: nothing more is accepted
        self.done = False  # the end of stream was delivered, or the destination is gone

    def push(self, chunk: bytes | None) -> None:
        """Hold chunk (None: the end of stream) until one_way_delay from now."""
        if self.ended or self.done:
            return
        if chunk is None:
            self.ended = True
        else:
            self.held_bytes += len(chunk)
            self.link.passed += len(chunk)
        self.held.append((self.link.sent_by(self.loop.time(), len(chunk or b"")) + self.delay, chunk))
        self.schedule()
        self.update_flow()

    def schedule(self) -> None:
        """Arm the timer for the oldest held chunk, unless it is armed already or there is nowhere to write."""
        if self.timer is None and self.held and not self.done and self.dest.transport is not None:
            self.timer = self.loop.call_at(self.held[0][0], self.release)

    def release(self) -> None:
        """Write every chunk that is due, oldest first, then re-arm for the next one."""
        self.timer = None
        transport = self.dest.transport
        if transport is None or self.done:
            return
        now = self.loop.time()
        while self.held and self.held[0][0] <= now:
            _, chunk = self.held.popleft()
            if chunk is None:
                self.done = True
                self.connection.end_delivered(self)
                return
            self.held_bytes -= len(chunk)
            transport.write(chunk)
        self.schedule()
        self.update_flow()

    def update_flow(self) -> None:
        """Read from the source only while the destination is connected and keeps up, and room is left."""
        dest = self.dest
        self.source.set_reading(dest.transport is not None and not dest.write_blocked and self.held_bytes < MAX_HELD)

    def drop(self) -> None:
        """The destination is gone: forget what is held and accept nothing more."""
        self.done = True
        self.held.clear()
        self.held_bytes = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Connection:
    """One client connection and its upstream connection, with a delayed direction each way."""

    def __init__(self, delay: float, registry: set[_Connection], links: tuple[_Link, _Link]) -> None:
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.up = _Direction(self, delay, self.client, self.upstream, links[0])
        self.down = _Direction(self, delay, self.upstream, self.client, links[1])
        self.registry = registry
        registry.add(self)

    def end_delivered(self, direction: _Direction) -> None:
        """direction's end of stream is due: half-close its destination, or close both once both ends are done."""
        other = self.down if direction is self.up else self.up
        dest = direction.dest.transport
        if other.done or direction.source.lost or dest is None or not dest.can_write_eof():
            self.close()
        else:
            dest.write_eof()

    def side_lost(self, side: _Side) -> None:
        side.inbound.drop()  # nothing can be written to it any more
        side.outbound.push(None)  # the other side learns of it one delay later (ignored if already ended)
        if side.outbound.done:  # its end was delivered already and nothing more can come back: finish now
            self.close()
        if self.client.lost and self.upstream.lost:
            self.registry.discard(self)

    def close(self) -> None:
        """Close both sockets after what is already written to them has been sent."""
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def abort(self) -> None:
        """Close both sockets at once, discarding everything held or unsent."""
        self.up.drop()
        self.down.drop()
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.abort()
        self.registry.discard(self)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delays every chunk by one_way_delay seconds each way, and with a
    `rate` (bytes per second) limits each direction to that bandwidth.

    Use as a context manager (or call `start()` and `close()`); `forward()` opens a listening port.
    """

    def __init__(self, one_way_delay: float, rate: float | None = None) -> None:
        if one_way_delay < 0:
            raise ValueError(f"one_way_delay must not be negative, got {one_way_delay}")
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.one_way_delay = one_way_delay
        self.errors: list[str] = []  # connections that could not be set up, and why
        self._thread = threading.Thread(target=self._run, name="delayproxy", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: Exception | None = None
        self._listeners: list[socket.socket] = []
        self._connections: set[_Connection] = set()  # touched only by the loop thread
        self._tasks: set[asyncio.Task[None]] = set()  # touched only by the loop thread
        self._cpu_seconds = 0.0  # the loop thread's CPU time, recorded as it ends
        # Towards the upstream and towards the clients, over all connections (touched only by the loop thread).
        self._links = (_Link(rate), _Link(rate))

    # -- control (any thread) ----------------------------------------------------------------------

    def start(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(THREAD_TIMEOUT) or self._loop is None:
            self.close()
            raise RuntimeError(f"delay proxy: event loop did not start: {self._failure or 'timed out'}")
        return self

    def forward(self, upstream: tuple[str, int]) -> int:
        """Listen on a free port on 127.0.0.1 and forward its connections to upstream; return the port."""
        listener = socket.create_server((LOCALHOST, 0), backlog=LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._call(self._accept_on(listener, upstream))
        return cast(int, listener.getsockname()[1])

    def bytes_down(self) -> int:
        """Bytes passed from the upstream to the clients so far (with a zero delay: a byte counter)."""
        return self._links[1].passed

    def cpu_seconds(self) -> float:
        """CPU time the proxy's thread has used so far (all connections)."""
        if self._thread.is_alive() and self._loop is not None:
            return self._call(self._thread_time())
        return self._cpu_seconds

    def close(self) -> None:
        """Abort every connection, stop the event loop, join its thread and close the listeners."""
        loop, stop = self._loop, self._stop
        if self._thread.is_alive() and loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed on its own in the meantime
                pass
            self._thread.join(THREAD_TIMEOUT)
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run coro on the loop thread and return its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("delay proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(THREAD_TIMEOUT)

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
        try:
            asyncio.run(self._serve())
        except Exception as err:  # noqa: BLE001 - a thread cannot raise to its caller; start() reports it
            self._failure = err
        finally:
            self._cpu_seconds = time.thread_time()
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self._connections):
            connection.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # one more pass: the aborted transports' callbacks close their sockets

    async def _thread_time(self) -> float:
        return time.thread_time()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_on(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        self._spawn(self._accept_loop(listener, upstream))

    async def _accept_loop(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as err:  # out of file descriptors or the like: stop accepting, say why
                self.errors.append(f"accepting on {listener.getsockname()}: {err}")
                return
            self._spawn(self._open(client, upstream))

    async def _open(self, client: socket.socket, upstream: tuple[str, int]) -> None:
        """Connect upstream first, then start serving the client, so both sides exist before any byte moves."""
        loop = asyncio.get_running_loop()
        connection = _Connection(self.one_way_delay, self._connections, self._links)
        try:
            await loop.create_connection(lambda: connection.upstream, *upstream)
            await loop.connect_accepted_socket(lambda: connection.client, client)
        except OSError as err:
            self.errors.append(f"connecting to {upstream[0]}:{upstream[1]}: {err}")
            connection.abort()
            client.close()
        except BaseException:
            connection.abort()
            client.close()
            raise


@dataclass
class RttSample:
    """Seconds per request/response exchange, through the proxy and directly."""

    through_proxy: list[float]
    direct: list[float]

    @property
    def proxy_ms(self) -> float:
        return statistics.median(self.through_proxy) * 1000

    @property
    def direct_ms(self) -> float:
        return statistics.median(self.direct) * 1000


def measure_rtt(proxy: DelayProxy, exchanges: int = RTT_EXCHANGES) -> RttSample:
    """Time one-byte request/response exchanges through proxy (a new route of it) and without it.

    The responder is a socket of this thread, so the times hold the proxy's delay and overhead, and the
    loopback's, but no scheduling of a separate echo server.
    """
    with socket.create_server((LOCALHOST, 0), backlog=LISTEN_BACKLOG) as listener:
        listener.settimeout(PROBE_TIMEOUT)
        address = cast(tuple[str, int], listener.getsockname())
        direct = _time_exchanges(listener, address, exchanges)
        through_proxy = _time_exchanges(listener, (LOCALHOST, proxy.forward(address)), exchanges)
    return RttSample(through_proxy, direct)


def _time_exchanges(listener: socket.socket, address: tuple[str, int], exchanges: int) -> list[float]:
    with socket.create_connection(address, timeout=PROBE_TIMEOUT) as client:
        responder, _ = listener.accept()
        with responder:
            responder.settimeout(PROBE_TIMEOUT)
            for sock in (client, responder):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            seconds = []
            for _ in range(exchanges):
                started = time.perf_counter()
                client.sendall(PROBE)
                _receive(responder, len(PROBE))
                responder.sendall(PROBE)
                _receive(client, len(PROBE))
                seconds.append(time.perf_counter() - started)
    return seconds


def _receive(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("connection closed during an RTT probe")
        got += len(chunk)
