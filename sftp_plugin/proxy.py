"""The way to the backup host when ``~/.ssh/config`` sets ``ProxyJump`` or ``ProxyCommand`` for it.

``ProxyJump a,b``: an SSH connection to ``a``, through it (a ``direct-tcpip``
channel, what ``ssh -W`` asks for) one to ``b``, and through ``b`` the
backup host's connection. Each jump host is verified and authenticated by the
caller (connection.py) before anything more is sent through it. The backup
host's transport then runs over `TunnelSocket`, which owns the jump hosts'
transports and closes them with it.

``ProxyCommand``: the command runs under ``/bin/sh -c`` (as ssh runs it) with
one end of a socket pair as its stdin and stdout, so the transport keeps a
real socket (timeouts, ``shutdown`` on interrupt, the packetizer's
``recv_into``); `CommandSocket` ends the command when it is closed.

Which of the two applies, their ``%`` tokens and the ProxyJump syntax follow
ssh_config(5); this module imports nothing of connection.py (it sits below it).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import paramiko

from sftp_plugin.errors import ConfigError, ConnectError

log = logging.getLogger(__name__)

# ssh_config's word for "no proxy" (paramiko already turns "ProxyCommand none" into None).
NONE = "none"
SSH_URI_PREFIX = "ssh://"
SHELL = "/bin/sh"
# Exit statuses of `sh -c "exec cmd"` when cmd cannot be run at all (not found, not executable):
# the configuration is wrong, no retry can help.
COMMAND_NOT_RUNNABLE = frozenset({126, 127})
# Lines of a ProxyCommand's stderr kept for the message when it fails (the reason is usually the last one).
STDERR_LINES_KEPT = 5
# Seconds a ProxyCommand gets to exit after SIGTERM when its connection is closed, before SIGKILL.
TERMINATE_GRACE = 2.0
# Largest port number.
MAX_PORT = 65535
# The originator address sent with a direct-tcpip request: ssh -W sends this one too (no local socket).
ORIGINATOR = ("127.0.0.1", 0)


class RawProxySSHConfig(paramiko.SSHConfig):  # type: ignore[misc]  # paramiko ships no type hints
    """paramiko's SSHConfig, leaving the ``%`` tokens of ProxyCommand and ProxyJump alone.

    paramiko expands ``%h %p %r`` from ssh_config alone, before the plugin's ``port`` and ``username``
    options win over it, and leaves ``%%`` as it is; `expand_tokens` does it right.
    """

    TOKENS_BY_CONFIG_KEY = {
        key: tokens
        for key, tokens in paramiko.SSHConfig.TOKENS_BY_CONFIG_KEY.items()
        if key not in ("proxycommand", "proxyjump")
    }


def expand_tokens(value: str, *, host: str, port: int, user: str, original: str) -> str:
    """ssh_config's tokens in ProxyCommand/ProxyJump: %h host (after HostName), %p port, %r remote user,
    %n the name as given, %% a percent sign. An unknown token is left as it is."""
    tokens = {"%": "%", "h": host, "p": str(port), "r": user, "n": original}
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "%" and i + 1 < len(value) and value[i + 1] in tokens:
            out.append(tokens[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Route:
    """What ``~/.ssh/config`` says about the way to a host: a ProxyJump list or a ProxyCommand (raw)."""

    keyword: str  # "ProxyJump" or "ProxyCommand", as ssh_config(5) spells it
    value: str


def route_of(found: Mapping[str, object]) -> Route | None:
    """The proxy an SSHConfig lookup sets, or None. Like ssh, the first of ProxyJump and ProxyCommand
    set for the host wins (the lookup keeps keys in the order first seen) and ``none`` means none."""
    for key in found:
        if key == "proxyjump":
            value = str(found[key]).strip()
            return None if value.lower() == NONE else Route("ProxyJump", value)
        if key == "proxycommand":
            value = found[key]
            return None if value is None or str(value).strip().lower() == NONE else Route("ProxyCommand", str(value))
    return None


@dataclass(frozen=True)
class JumpSpec:
    """One jump host as ProxyJump names it: ``[user@]host[:port]`` or ``ssh://[user@]host[:port]``."""

    host: str
    user: str | None = None
    port: int | None = None


def parse_proxy_jump(value: str) -> tuple[JumpSpec, ...]:
    """The jump hosts of a ProxyJump value, first to last. Raises ValueError saying what is wrong."""
    specs = []
    for item in value.split(","):
        text = item.strip()
        if text.startswith(SSH_URI_PREFIX):
            text = text[len(SSH_URI_PREFIX):].rstrip("/")
        user, _, hostport = text.rpartition("@")
        host, port = _split_host_port(hostport, item)
        if not host or any(c.isspace() for c in host) or (user and any(c.isspace() for c in user)):
            raise ValueError(f"'{item.strip()}' is not [user@]host[:port]")
        specs.append(JumpSpec(host, user or None, port))
    return tuple(specs)


def _split_host_port(text: str, item: str) -> tuple[str, int | None]:
    if text.startswith("["):  # [IPv6 address]:port, or [host]
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"'{item.strip()}' has an unclosed '['")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None  # no port, or an IPv6 address without one
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= MAX_PORT:
        raise ValueError(f"'{item.strip()}' has no valid port")
    return host, int(port_text)


# ---------------------------------------------------------------- ProxyCommand


class CommandSocket(socket.socket):
    """Our end of the socket pair a ProxyCommand talks through; closing it ends the command."""

    def __init__(self, fileno: int, process: subprocess.Popen[bytes], command: str) -> None:
        super().__init__(fileno=fileno)
        self.process = process
        self.command = command
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self.stderr_reader = threading.Thread(target=_log_stderr, args=(self, process.stderr),
                                              name="proxy-command-stderr", daemon=True)

    def close(self) -> None:
        super().close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TERMINATE_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def failure(self) -> str:
        """How the command ended, with its last stderr line, for a message."""
        status = self.process.poll()
        ended = f"exited with status {status}" if status is not None else "closed its output"
        last = next((line for line in reversed(self.stderr_tail) if line), "")
        return f"{ended}{': ' + last if last else ''}"


def _log_stderr(sock: CommandSocket, stream: object) -> None:
    # The command's stderr must not reach ours (gpbackup reads the plugin's stderr as its error): log it.
    for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
        line = raw.decode("utf-8", errors="replace").rstrip()
        sock.stderr_tail.append(line)
        log.info("ProxyCommand: %s", line)


def start_proxy_command(command: str, timeout: float, what: str) -> CommandSocket:
    """Run ``command`` (tokens expanded) and wait until the server's SSH banner comes through it.

    ``what`` names it in messages ("ProxyCommand ... (~/.ssh/config, for backup)"). A command that ends
    or stays silent for ``timeout`` seconds raises ConnectError (ConfigError when it cannot be run).
    """
    ours, theirs = socket.socketpair()
    try:
        # exec: the shell becomes the command, so ending the process ends the command.
        process = subprocess.Popen([SHELL, "-c", f"exec {command}"], stdin=theirs, stdout=theirs,
                                   stderr=subprocess.PIPE, close_fds=True)
    except OSError as err:
        ours.close()
        raise ConfigError(f"cannot run {what}: {err.strerror or err}", f"check that {SHELL} exists") from None
    finally:
        theirs.close()
    sock = CommandSocket(ours.detach(), process, command)
    sock.stderr_reader.start()
    try:
        sock.settimeout(timeout)
        answered = sock.recv(1, socket.MSG_PEEK)
    except socket.timeout:
        sock.close()
        raise ConnectError(f"{what} gave no SSH banner within {timeout:g} s",
                           "run the command by hand: it must connect its stdin and stdout to the SSH server") from None
    except OSError as err:
        sock.close()
        raise ConnectError(f"{what} failed: {err.strerror or err}", "run the command by hand to see why") from err
    if answered:
        return sock
    try:
        process.wait(TERMINATE_GRACE)  # it closed its output: it is ending, collect its status
        sock.stderr_reader.join(TERMINATE_GRACE)  # and what it said last
    except subprocess.TimeoutExpired:
        pass
    failure = sock.failure()
    sock.close()
    if process.returncode in COMMAND_NOT_RUNNABLE:
        raise ConfigError(f"{what} cannot be run: {failure}",
                          "correct ProxyCommand in ~/.ssh/config (it runs under /bin/sh -c)")
    raise ConnectError(f"{what} {failure}, before the SSH server answered",
                       "run the command by hand to see why; check ProxyCommand in ~/.ssh/config")


# ---------------------------------------------------------------- ProxyJump


class ChannelSocket:
    """A channel as a socket: what paramiko's Transport and our packetizer use of one (``recv_into`` too).
    A jump host's transport runs over the channel of the jump host before it."""

    def __init__(self, channel: paramiko.Channel, target: tuple[str, int]) -> None:
        self._channel = channel
        self._target = target

    def recv(self, size: int) -> bytes:
        return self._channel.recv(size)

    def recv_into(self, buffer: memoryview | bytearray, size: int = 0) -> int:
        data = self._channel.recv(size or len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def send(self, data: bytes | memoryview) -> int:
        # The channel sends at most one packet per call: hand it no more than that (a copy of the whole
        # remaining buffer on every call would make a large write quadratic).
        return self._channel.send(bytes(memoryview(data)[: self._channel.out_max_packet_size]))

    def settimeout(self, timeout: float | None) -> None:
        self._channel.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._channel.gettimeout()

    def getpeername(self) -> tuple[str, int]:
        return self._target

    @property
    def _closed(self) -> bool:  # paramiko's Transport asks a socket this
        return self._channel.closed

    def close(self) -> None:
        try:
            self._channel.close()
        except (EOFError, OSError, paramiko.SSHException):
            pass  # the connection it runs over is already gone, and the channel with it


class TunnelSocket(ChannelSocket):
    """The backup host's connection: a direct-tcpip channel through the last jump host.

    Owns the jump hosts' transports, closed with it, so the session keeps them for its lifetime and
    closing it closes them.
    """

    def __init__(self, channel: paramiko.Channel, jumps: Sequence[paramiko.Transport],
                 target: tuple[str, int]) -> None:
        super().__init__(channel, target)
        self._jumps = list(jumps)
        self._shut = False

    def shutdown(self, how: int) -> None:
        """Cut the whole route at once (for Session.abort, from a signal handler: no lock, no wait): the TCP
        connection to the first jump host; every transport behind it then reads EOF."""
        self._jumps[0].sock.shutdown(how)

    def close(self) -> None:
        # paramiko closes its socket twice (Transport.close, then its thread's exit); the second time, the
        # jump hosts' transports are gone.
        if self._shut:
            return
        self._shut = True
        try:
            super().close()
        finally:
            for transport in reversed(self._jumps):
                transport.close()


class Hop(Protocol):
    host: str
    port: int


H = TypeVar("H", bound=Hop)


def open_tunnel(
    jumps: Sequence[H],
    target: tuple[str, int],
    timeout: float,
    secure: Callable[[socket.socket | ChannelSocket, H], paramiko.Transport],
    describe: Callable[[H], str],
    window_size: int,
    max_packet_size: int,
) -> TunnelSocket:
    """Connect to each jump host in turn, each through the one before, and open a channel to ``target``.

    ``secure(sock, jump)`` makes the SSH connection to one jump host over ``sock`` (handshake, host key,
    authentication) and raises a PluginError naming it; ``describe(jump)`` names a jump host in messages.
    Nothing is left open on failure.
    """
    transports: list[paramiko.Transport] = []
    try:
        sock: socket.socket | ChannelSocket
        for index, jump in enumerate(jumps):
            if index == 0:
                sock = _connect_first(jump, timeout, describe)
            else:
                channel = _open_channel(transports[-1], (jump.host, jump.port), timeout, describe(jumps[index - 1]),
                                        window_size, max_packet_size)
                sock = ChannelSocket(channel, (jump.host, jump.port))
            transports.append(secure(sock, jump))
        channel = _open_channel(transports[-1], target, timeout, describe(jumps[-1]), window_size, max_packet_size)
    except BaseException:
        for transport in reversed(transports):
            transport.close()
        raise
    return TunnelSocket(channel, transports, target)


def _connect_first(jump: H, timeout: float, describe: Callable[[H], str]) -> socket.socket:
    try:
        return socket.create_connection((jump.host, jump.port), timeout=timeout)
    except OSError as err:
        # The cause decides retrying (retry.is_connection_lost): a refused or unreachable jump host is
        # tried again, a name that does not resolve is not.
        raise ConnectError(
            f"cannot connect to {describe(jump)}: {err.strerror or err}",
            "check ProxyJump (and that jump host's HostName and Port) in ~/.ssh/config, and that sshd runs there",
        ) from err


def _open_channel(transport: paramiko.Transport, target: tuple[str, int], timeout: float, through: str,
                  window_size: int, max_packet_size: int) -> paramiko.Channel:
    try:
        return transport.open_channel("direct-tcpip", target, ORIGINATOR, window_size=window_size,
                                      max_packet_size=max_packet_size, timeout=timeout)
    except paramiko.ChannelException as err:
        raise ConnectError(
            f"{through} cannot connect on to {target[0]}:{target[1]}: {err.text or err}",
            "check the host and port it forwards to, and that the jump host allows TCP forwarding for this "
            "user (sshd AllowTcpForwarding)",
        ) from err
    except (paramiko.SSHException, EOFError, OSError) as err:
        raise ConnectError(f"{through} lost the connection while forwarding to {target[0]}:{target[1]}: "
                           f"{err or type(err).__name__}", "check the jump host and the network to it") from err
