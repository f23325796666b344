"""An authenticated SFTP session to the backup host.

Resolves the host like ``ssh`` does (``~/.ssh/config`` Host aliases for
HostName, Port, User, IdentityFile; explicit plugin options win), verifies the
host key *before* any credential is sent, authenticates with the configured
key, the ssh-agent, the default keys, then a password, and opens SFTP with
throughput-oriented algorithm and window settings.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Protocol

import paramiko

from sftp_plugin import fastpath, hostkeys, keys, proxy
from sftp_plugin.config import DEFAULT_PORT, PluginConfig
from sftp_plugin.errors import AuthError, ConfigError, ConnectError, HostKeyError
from sftp_plugin.fastpath.negotiation import OfferRecordingTransport, mismatch

log = logging.getLogger(__name__)

# AES-GCM first: AEAD ciphers need no separate MAC pass, and AES-NI makes them
# the cheapest per byte in paramiko (the issue asks for them where offered).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
# Flow-control window we grant the server: how far it may send ahead of our
# reads, and so the most a download buffers. With arriving packets kept as
# they are (fastpath.channel.ChunkedPipe) a bigger window costs memory, not CPU,
# and the server stalls less: restore_data of 256 MiB on loopback took ~1.1 s
# with 4 MiB, ~0.95 s with 16 MiB, no less with 32 MiB (bench/RESULTS.md).
WINDOW_SIZE = 16 * 1024 * 1024
# Largest SSH packet we accept (OpenSSH's own limit is 256 KiB), so nothing
# the server sends is split for our sake. In practice sshd forwards what it
# read from sftp-server, mostly 32 KiB per packet; 32-128 KiB here measured the
# same within noise (bench/RESULTS.md).
MAX_PACKET_SIZE = 256 * 1024
# Seconds between SSH keepalives: well inside the idle timeouts of common
# firewalls and NAT gateways (minutes), so a paused stream is not dropped.
KEEPALIVE_INTERVAL = 15
# Session.close: how long to wait for the server to end the connection after SSH_MSG_DISCONNECT (it does so
# at once; a server that does not is cut off then).
DISCONNECT_WAIT = 2.0
SSH_CONFIG_PATH = "~/.ssh/config"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, after ssh_config resolution."""

    host: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    host_key_alias: str | None = None  # HostKeyAlias from ~/.ssh/config
    # The way there when ~/.ssh/config sets one (proxy.py): jump hosts, first to last, or a ProxyCommand
    # (tokens expanded); ``route`` says which, for messages.
    jumps: tuple[Endpoint, ...] = ()
    proxy_command: str | None = None
    route: str = ""

    @property
    def known_hosts_name(self) -> str:
        # The name OpenSSH files a host under in known_hosts: its HostKeyAlias alone, if it has one.
        return self.host_key_alias or hostkeys.known_hosts_name(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


# The ~/.ssh/config keywords the plugin honours, as paramiko's SSHConfig.lookup spells them (lower case).
# The one list: `check` warns about every other keyword set for the host that would change where or how ssh
# connects (ssh_config_unused.py), so a keyword added here stops being warned about.
HONOURED_SSH_CONFIG = frozenset(
    {"hostname", "port", "user", "identityfile", "proxyjump", "proxycommand", "hostkeyalias"}
)


def resolve_endpoint(cfg: PluginConfig, looked_at: list[str] | None = None) -> Endpoint:
    """Apply ``~/.ssh/config`` to the hostname; explicit plugin options take precedence. ``looked_at`` gets
    the identity files ssh_config names, present or not: whether they exist decides the result too."""
    ssh_config = _read_ssh_config()
    found = _lookup(ssh_config, cfg.hostname)
    endpoint = Endpoint(
        host=found.get("hostname", cfg.hostname),
        port=cfg.port or int(found.get("port", DEFAULT_PORT)),
        user=cfg.username or found.get("user") or cfg.effective_username(),
        identity_files=_identities(cfg, found, looked_at),
        host_key_alias=found.get("hostkeyalias"),
    )
    return _with_route(cfg, endpoint, ssh_config, found, looked_at)


def _read_ssh_config() -> paramiko.SSHConfig | None:
    path = os.path.expanduser(SSH_CONFIG_PATH)
    if not os.path.isfile(path):
        return None
    try:
        return proxy.RawProxySSHConfig.from_path(path)
    except Exception as err:  # noqa: BLE001 - a broken ssh_config must name itself, not crash
        raise ConfigError(f"cannot parse {path}: {err}", "fix or move that file") from None


def _lookup(ssh_config: paramiko.SSHConfig | None, host: str) -> dict:
    if ssh_config is None:
        return {}
    try:
        return ssh_config.lookup(host)
    except Exception as err:  # noqa: BLE001 - a broken ssh_config must name itself, not crash
        raise ConfigError(f"cannot parse {SSH_CONFIG_PATH}: {err}", "fix or move that file") from None


def _identities(cfg: PluginConfig, found: dict, looked_at: list[str] | None = None) -> tuple[str, ...]:
    if cfg.identity_file:
        return (cfg.identity_file,)
    # Like ssh, skip IdentityFile entries that do not exist (ssh_config often lists several).
    candidates = [os.path.expanduser(p) for p in found.get("identityfile", [])]
    if looked_at is not None:
        looked_at += candidates
    return tuple(p for p in candidates if os.path.isfile(p))


def _with_route(cfg: PluginConfig, endpoint: Endpoint, ssh_config: paramiko.SSHConfig | None,
                found: dict, looked_at: list[str] | None = None) -> Endpoint:
    """The endpoint with the ProxyJump hosts or the ProxyCommand ~/.ssh/config sets for it (proxy.py)."""
    route = proxy.route_of(found)
    if route is None:
        return endpoint
    value = proxy.expand_tokens(route.value, host=endpoint.host, port=endpoint.port, user=endpoint.user,
                                original=cfg.hostname)
    where = f"{route.keyword} {value} (~/.ssh/config, for {cfg.hostname})"
    if route.keyword == "ProxyCommand":
        return replace(endpoint, proxy_command=value, route=where)
    try:
        specs = proxy.parse_proxy_jump(value)
    except ValueError as err:
        raise ConfigError(f"cannot use {where}: {err}",
                          "write ProxyJump as [user@]host[:port], several separated by commas") from None
    jumps = tuple(_jump_endpoint(cfg, ssh_config, spec, looked_at) for spec in specs)
    return replace(endpoint, jumps=jumps, route=where)


def _jump_endpoint(cfg: PluginConfig, ssh_config: paramiko.SSHConfig | None, spec: proxy.JumpSpec,
                   looked_at: list[str] | None = None) -> Endpoint:
    """A jump host as ssh -J reaches it: its own HostName, Port, User, IdentityFile and HostKeyAlias in
    ~/.ssh/config apply (what ProxyJump says wins); identity_file, when set, is offered to it too. The
    plugin's username and port are the backup host's, not its."""
    found = _lookup(ssh_config, spec.host)
    if proxy.route_of(found) is not None:
        log.info("jump host %s: its own ProxyJump/ProxyCommand in %s is not followed", spec.host, SSH_CONFIG_PATH)
    return Endpoint(
        host=found.get("hostname", spec.host),
        port=spec.port or int(found.get("port", DEFAULT_PORT)),
        user=spec.user or found.get("user") or getpass.getuser(),
        identity_files=_identities(cfg, found, looked_at),
        host_key_alias=found.get("hostkeyalias"),
    )


# The environment a session key depends on: HOME (where ~ is), the ssh-agent, and the variables
# getpass.getuser reads for the default username.
KEY_ENVIRONMENT = ("HOME", "SSH_AUTH_SOCK", "LOGNAME", "USER", "LNAME", "USERNAME")
# Session keys remembered by a fork-server worker, which asks at every call (parsing ~/.ssh/config
# again was a tenth of a warm call's CPU); a handful of configs is the most one host uses at a time.
KEY_MEMO_SIZE = 16
# ssh_config's ``Match exec`` runs a command at every lookup: its answer may change with nothing on disk
# changing, so a key computed through one is never remembered.
MATCH_EXEC_RE = re.compile(r"^\s*match\b.*\bexec\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ConnectionKey:
    """What decides a call's connection (connection_key): its session key, and the backup host it reaches."""

    key: str  # a digest of everything that decides where, how and as whom `connect` connects (sessions.py)
    backup_host: str  # ``host:port`` after ~/.ssh/config, the host in lower case: what max_connections counts


@dataclass(frozen=True)
class _KeyMemo:
    """A connection key and what it was computed from: the files read or looked for, by stat."""

    files: tuple[tuple[str, tuple[int, ...] | None], ...]
    keyed: ConnectionKey


_key_memo: dict[tuple[str, tuple[str | None, ...]], _KeyMemo] = {}


def _stat_signature(path: str) -> tuple[int, ...] | None:
    """What changes whenever the file at ``path`` does (ctime: on any write, also one that restores mtime)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def session_key(cfg: PluginConfig) -> str:
    """A digest of everything that decides where, how and as whom `connect` connects (connection_key)."""
    return connection_key(cfg).key


def connection_key(cfg: PluginConfig) -> ConnectionKey:
    """The session key, a digest of everything that decides where, how and as whom `connect` connects
    (sessions.py), with the backup host it reaches (what max_connections counts sessions to).

    Every option (a changed one means a new session, whatever it is), the
    endpoint after ~/.ssh/config (so a changed HostName, User or ProxyJump
    counts), the files read while connecting (known_hosts, the identity
    files of the host and its jump hosts, ~/.ssh/config) by content, and the
    ssh-agent in use. A secret goes into the digest, never out of it.

    Remembered while the options, the environment and every file it read or looked for are unchanged
    (by stat, taken before they are read, so a change while computing is seen by the next call; a relative
    path is stat'ed from the directory of the call that asks).
    """
    options = repr(tuple(getattr(cfg, field.name) for field in dataclasses.fields(cfg)))  # astuple deep-copies
    memo_key = (options, tuple(os.environ.get(name) for name in KEY_ENVIRONMENT))
    memo = _key_memo.get(memo_key)
    if memo is not None and all(_stat_signature(path) == signature for path, signature in memo.files):
        return memo.keyed
    ssh_config = os.path.expanduser(SSH_CONFIG_PATH)
    before = {ssh_config: _stat_signature(ssh_config)}
    looked_at: list[str] = []
    endpoint = resolve_endpoint(cfg, looked_at)
    digest = hashlib.sha256()
    for part in (options, repr(endpoint), os.environ.get("SSH_AUTH_SOCK", "")):
        digest.update(part.encode() + b"\0")
    files = [cfg.known_hosts_file, SSH_CONFIG_PATH, *endpoint.identity_files,
             *(path for jump in endpoint.jumps for path in jump.identity_files)]
    rememberable = True
    for path in files:
        digest.update(os.fsencode(path) + b"\0")
        expanded = os.path.expanduser(path)
        before.setdefault(expanded, _stat_signature(expanded))
        try:
            with open(expanded, "rb") as handle:
                content = handle.read()
        except OSError as err:
            digest.update(f"unreadable: {err.errno}".encode())
            continue
        digest.update(hashlib.sha256(content).digest())
        if expanded == ssh_config and MATCH_EXEC_RE.search(content.decode(errors="replace")):
            rememberable = False
    used = set(endpoint.identity_files).union(*(jump.identity_files for jump in endpoint.jumps))
    for path in looked_at:
        signature = before.setdefault(path, _stat_signature(path))
        # resolve_endpoint looked for it before this stat: remembered only if it still finds what it found then
        rememberable &= (signature is not None and os.path.isfile(path)) == (path in used)
    keyed = ConnectionKey(digest.hexdigest(), f"{endpoint.host.lower()}:{endpoint.port}")
    if rememberable:
        if len(_key_memo) >= KEY_MEMO_SIZE:
            _key_memo.clear()
        _key_memo[memo_key] = _KeyMemo(tuple(before.items()), keyed)
    return keyed


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint in the form ``ssh-keygen -lf`` prints: SHA256:<base64, no padding>."""
    return keys.fingerprint(key.asbytes())


def _load_known_hosts(path: str) -> hostkeys.KnownHosts:
    try:
        return hostkeys.KnownHosts.load(path)
    except OSError as err:
        raise ConfigError(f"cannot read known_hosts_file {path}: {err.strerror or err}", "check the file") from None


def _host_key_subject(endpoint: Endpoint, jump: bool) -> hostkeys.Host:
    return hostkeys.Host(endpoint.known_hosts_name, endpoint.host, endpoint.port, endpoint.host_key_alias,
                         role="jump host " if jump else "", pinnable=not jump)


def verify_host_key(cfg: PluginConfig, endpoint: Endpoint, key: paramiko.PKey, known: hostkeys.KnownHosts,
                    jump: bool = False) -> str:
    """Accept or refuse the server's key; return how it was verified (for logs and `check`).

    A jump host (``jump``) is checked against known_hosts_file under strict_host_key_checking; the
    host_key_fingerprint pin is the backup host's. A key @revoked in known_hosts_file is refused always.
    """
    seen = fingerprint(key)
    subject = _host_key_subject(endpoint, jump)
    hostkeys.refuse_revoked(known, subject, key, seen)
    if cfg.host_key_fingerprint and not jump:
        if seen == cfg.host_key_fingerprint:
            return "pinned fingerprint"
        raise HostKeyError(
            f"host key of {endpoint.host}:{endpoint.port} ({key.get_name()}) is {seen}, "
            f"not the pinned {cfg.host_key_fingerprint}",
            f"pin the server's {key.get_name()} key (the type negotiated, preferring ed25519): "
            "ssh-keygen -lf on its public key file; if that key really changed, update host_key_fingerprint",
        )
    if cfg.strict_host_key_checking == "no":
        log.warning("host key of %s not verified (strict_host_key_checking: no): %s", subject.label, seen)
        return "not verified (strict_host_key_checking: no)"
    return hostkeys.verify(known, subject, key, seen, cfg.strict_host_key_checking)


def _candidate_keys(cfg: PluginConfig, endpoint: Endpoint) -> list[tuple[str, paramiko.PKey]]:
    """Keys to offer, in ssh's order: configured identity, agent, then default key files."""
    keys: list[tuple[str, paramiko.PKey]] = []
    for path in endpoint.identity_files:
        keys.append((path, _load_key(path, cfg.identity_passphrase, required=True)))
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            keys += [("ssh-agent", k) for k in paramiko.Agent().get_keys()]
        except paramiko.SSHException as err:
            log.info("ssh-agent not usable: %s", err)
    if not endpoint.identity_files:
        for path in (os.path.expanduser(p) for p in DEFAULT_IDENTITIES):
            if os.path.isfile(path):
                key = _load_key(path, cfg.identity_passphrase, required=False)
                if key is not None:
                    keys.append((path, key))
    return keys


def _is_encrypted(path: str) -> bool:
    """Whether the key file needs a passphrase: cryptography raises TypeError, and only then, when a key is
    encrypted and no passphrase is given (PasswordRequiredException is paramiko's older form of it)."""
    try:
        paramiko.PKey.from_path(path, None)
    except (TypeError, paramiko.PasswordRequiredException):
        return True
    except Exception:  # noqa: BLE001 - unreadable for another reason: not a question of its passphrase
        return False
    return False


def _load_key(path: str, passphrase: str | None, required: bool) -> paramiko.PKey | None:
    try:
        # paramiko 5 hands the passphrase to cryptography, which takes bytes only.
        return paramiko.PKey.from_path(path, passphrase.encode() if passphrase else None)
    except (paramiko.PasswordRequiredException, TypeError):
        # cryptography's TypeError means the passphrase does not fit the file: given for a key that is not
        # encrypted, or missing for one that is. Like ssh, use an unencrypted key as it is.
        if passphrase:
            return _load_key(path, None, required)
        if not required:
            log.info("skipping encrypted default key %s", path)
            return None
        raise AuthError(
            f"identity_file {path} is encrypted", "set identity_passphrase or load it into ssh-agent"
        ) from None
    except FileNotFoundError:
        raise AuthError(f"identity_file {path} does not exist", "check the identity_file option") from None
    except (OSError, ValueError, paramiko.SSHException) as err:
        # A wrong passphrase does not decrypt the key, and paramiko then reports what its fallback to the
        # PEM format found ("Valid PEM but no BEGIN/END delimiters..."): tell it apart by the file itself.
        wrong_passphrase = bool(passphrase) and isinstance(err, ValueError) and _is_encrypted(path)
        if not required:
            log.info("skipping default key %s: %s", path, "wrong passphrase" if wrong_passphrase else err)
            return None
        if wrong_passphrase:
            raise AuthError(
                f"wrong passphrase for {path}", "check identity_passphrase: the key does not decrypt with it"
            ) from None
        raise AuthError(f"cannot load identity_file {path}: {err}", "check the file and identity_passphrase") from None


def authenticate(transport: paramiko.Transport, cfg: PluginConfig, endpoint: Endpoint) -> str:
    """Try each method until one succeeds; return which one did."""
    tried: list[str] = []
    for source, key in _candidate_keys(cfg, endpoint):
        try:
            transport.auth_publickey(endpoint.user, key)
            return f"publickey ({source})"
        except paramiko.BadAuthenticationType as err:
            tried.append(f"publickey refused by server (allowed: {','.join(err.allowed_types)})")
            break
        except paramiko.AuthenticationException:
            tried.append(f"key {source}")
    if cfg.password:
        try:
            transport.auth_password(endpoint.user, cfg.password)
            return "password"
        except paramiko.AuthenticationException:
            tried.append("password")
    raise AuthError(
        f"authentication as {endpoint} failed (tried: {', '.join(tried) or 'no key or password available'})",
        "check that the user's public key is in authorized_keys on the backup host, or set identity_file",
    )


class Held(Protocol):
    """Something open on a session's SFTP channel that outlives a call (Session.held)."""

    def release(self, sftp: paramiko.SFTPClient) -> None:
        """Let it go on the server (close, remove); never raises."""


class Session:
    """One SSH transport with one SFTP channel; close() releases both."""

    def __init__(
        self,
        transport: paramiko.Transport,
        sftp: paramiko.SFTPClient,
        endpoint: Endpoint,
        host_key_status: str,
        auth_method: str,
    ) -> None:
        self.transport = transport
        self.sftp = sftp
        self.endpoint = endpoint
        self.host_key_status = host_key_status
        self.auth_method = auth_method
        # What a call left open on this session for a later call of the same worker (store.py's spare
        # files), by name: each is released (close() calls its release(sftp), which never raises) first.
        self.held: dict[str, Held] = {}

    @property
    def cipher(self) -> str:
        return self.transport.remote_cipher

    def close(self, wait: float = DISCONNECT_WAIT) -> None:
        """End the session as ssh does, so that the backup host logs no error for it: the SFTP channel
        closed (CHANNEL_EOF and CHANNEL_CLOSE), then SSH_MSG_DISCONNECT; the server then closes the
        connection, and paramiko's thread reads everything it sent up to that end and closes the socket.
        Closing the socket with anything unread instead makes the kernel send a reset, which sshd logs as
        "Read error ...: Connection reset by peer". A server that does not close within ``wait`` seconds
        is not waited for any longer. Used at the end of a call and for a kept session (sessions.py)."""
        held, self.held = list(self.held.values()), {}
        if held and self.transport.is_active():
            # What is held goes first, and a stalled link holds the close up no longer than its own wait.
            channel = self.sftp.get_channel()
            channel.settimeout(min(wait, channel.gettimeout() or wait))
            for item in held:
                item.release(self.sftp)
        try:
            self.sftp.close()
        finally:
            try:
                if self.transport.is_active() and fastpath.send_disconnect(self.transport):
                    # Transport is a thread (public API): it ends at the server's end of the connection.
                    self.transport.join(wait)
            finally:
                self.transport.close()

    def abort(self) -> None:
        """Shut the connection down at once; safe in a signal handler: no lock, no waiting.

        paramiko's thread then reads EOF and closes the channel, so whatever waits on
        this session (a reply, send window, a lock released by a closing channel)
        ends at once with a connection error.
        """
        try:
            self.transport.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def use_fast_path(cfg: PluginConfig) -> bool:
    """Whether this connection takes the fast packet path (fastpath/): on unless ``fast_path: no`` or this
    paramiko lacks what it needs; then paramiko's own packet code, slower, and one warning says why."""
    if not cfg.fast_path:
        return False
    missing = fastpath.packet_code_missing()
    if missing:
        log.warning(
            "paramiko %s lacks %s: using paramiko's own packet code (slower; tested fast with paramiko %s)",
            paramiko.__version__, ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""),
            fastpath.TESTED_PARAMIKO[1],
        )
        return False
    return True


def _require_sftp_code() -> None:
    missing = fastpath.sftp_code_missing()
    if missing:
        raise ConfigError(
            f"paramiko {paramiko.__version__} lacks {', '.join(missing)}, which the plugin's SFTP requests use",
            f"install a paramiko from {fastpath.TESTED_PARAMIKO[0]} to {fastpath.TESTED_PARAMIKO[1]} "
            "in the plugin's virtualenv",
        )


def _limit_unacknowledged(sock: object, io_timeout: int) -> None:
    """On a TCP socket: paramiko retries a send that times out for ever; with TCP_USER_TIMEOUT the kernel
    fails the socket once sent data stays unacknowledged for io_timeout (a dead peer or a black-holing
    firewall), and the retry policy reconnects. (A ProxyCommand's socket pair and a jump host's channel
    are not TCP: the TCP connection under a channel is the first jump host's, limited when it is made.)"""
    if hasattr(socket, "TCP_USER_TIMEOUT") and isinstance(sock, socket.socket) and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, io_timeout * 1000)


def _prefer_known_key_types(options: paramiko.transport.SecurityOptions, known: hostkeys.KnownHosts,
                            endpoint: Endpoint) -> None:
    # Ask for the key types on file for the host (under its name, HostKeyAlias or a matching pattern)
    # first, as ssh does, so a server with several host keys is checked against the one on file.
    known_types = known.lookup(endpoint.known_hosts_name).key_types()
    options.key_types = hostkeys.preferred_algorithms(options.key_types, known_types)


def _open_socket(cfg: PluginConfig, endpoint: Endpoint, known: hostkeys.KnownHosts) -> object:
    """The connection to the backup host's sshd: direct (a socket error is the caller's to report), through
    ~/.ssh/config's ProxyCommand, or through its ProxyJump hosts (a failure names the one that failed)."""
    if endpoint.route:
        log.debug("reaching %s through %s", endpoint, endpoint.route)
    if endpoint.proxy_command:
        return proxy.start_proxy_command(endpoint.proxy_command, cfg.connect_timeout, endpoint.route)
    if endpoint.jumps:
        def describe(jump: Endpoint) -> str:
            return f"jump host {jump} (ProxyJump for {cfg.hostname})"

        return proxy.open_tunnel(
            endpoint.jumps, (endpoint.host, endpoint.port), cfg.connect_timeout,
            lambda sock, jump: _open_jump(cfg, jump, sock, known, describe(jump)), describe,
            WINDOW_SIZE, MAX_PACKET_SIZE,
        )
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=cfg.connect_timeout)
    # No Nagle: SFTP requests are small packets sent while replies are still due, and Nagle holds each one
    # back until the previous is acknowledged. Streams are not affected (their packets are full); short
    # reads one after another are: a 1% range read of a 1 GiB container took 64-76 ms with it off,
    # 180-370 ms with it on (10 ranges, ~20 chunks; bench/RESULTS.md).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _handshake(cfg: PluginConfig, sock: object, known: hostkeys.KnownHosts, endpoint: Endpoint, label: str,
               prefer_known: bool, no_answer: str) -> paramiko.Transport:
    """An SSH transport over ``sock`` with its handshake done (not yet verified nor authenticated): AES-GCM
    preferred, the host key types already known for ``endpoint`` asked for first where ``prefer_known``."""
    _limit_unacknowledged(sock, cfg.io_timeout)
    transport = OfferRecordingTransport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE,
        **fastpath.transport_options(use_fast_path(cfg)),
    )
    try:
        options = transport.get_security_options()
        offered = list(options.ciphers)
        options.ciphers = [c for c in PREFERRED_CIPHERS if c in offered] + [
            c for c in offered if c not in PREFERRED_CIPHERS
        ]
        if prefer_known:
            _prefer_known_key_types(options, known, endpoint)
        transport.banner_timeout = cfg.connect_timeout
        transport.auth_timeout = cfg.connect_timeout
        try:
            transport.start_client(timeout=cfg.connect_timeout)
        except paramiko.IncompatiblePeer as err:
            # No algorithm in common: the server's configuration, final (retry.is_connection_lost).
            found = mismatch(transport, transport.server_offer) if transport.server_offer else None
            raise ConnectError(
                f"SSH handshake with {label} failed: {found.describe() if found else err}",
                found.advice() if found else "the server speaks no SSH version or algorithms the plugin supports "
                "(README: Supported algorithms)",
            ) from err
        except (paramiko.SSHException, EOFError, OSError) as err:
            raise ConnectError(f"SSH handshake with {label} failed: {err or type(err).__name__}", no_answer) from err
        return transport
    except BaseException:
        transport.close()
        raise


def _open_jump(cfg: PluginConfig, jump: Endpoint, sock: object, known: hostkeys.KnownHosts,
               label: str) -> paramiko.Transport:
    """The SSH connection to one jump host over ``sock``: handshake, its host key verified like the backup
    host's (before any credential is sent), then its authentication, with keys only: the password
    option is the backup host's, never sent elsewhere."""
    transport = _handshake(cfg, sock, known, jump, label, prefer_known=True,
                           no_answer="check that an SSH server answers there (ProxyJump in ~/.ssh/config)")
    try:
        status = verify_host_key(cfg, jump, transport.get_remote_server_key(), known, jump=True)
        try:
            method = authenticate(transport, replace(cfg, password=None), jump)
        except AuthError as err:
            refused = err.message.startswith("authentication as")  # not a key file of ours that failed to load
            raise AuthError(f"{label}: {err.message}",
                            "check that the user's public key is in authorized_keys on the jump host (jump hosts "
                            "are offered keys only)" if refused else err.hint) from None
        transport.set_keepalive(KEEPALIVE_INTERVAL)
        log.debug("connected to %s (%s, %s)", label, status, method)
        return transport
    except BaseException:
        transport.close()
        raise


def connect(cfg: PluginConfig) -> Session:
    """Open one session: TCP, SSH handshake, host key check, auth, SFTP. No retries here."""
    _require_sftp_code()
    endpoint = resolve_endpoint(cfg)
    known = _load_known_hosts(os.path.expanduser(cfg.known_hosts_file))
    try:
        sock = _open_socket(cfg, endpoint, known)
    except socket.gaierror as err:
        # retry.is_connection_lost decides from the cause: "no such name" is final, a DNS timeout is retried.
        alias = f" (the HostName of {cfg.hostname} in {SSH_CONFIG_PATH})" if endpoint.host != cfg.hostname else ""
        raise ConnectError(
            f"cannot resolve {endpoint.host}{alias}: {err.strerror or err}",
            "check the hostname option (or its HostName in ~/.ssh/config) and this host's DNS",
        ) from err
    except OSError as err:
        raise ConnectError(
            f"cannot connect to {endpoint.host}:{endpoint.port}: {err.strerror or err}",
            "check hostname and port, that sshd runs there, and any firewall between",
        ) from err
    transport = _handshake(
        cfg, sock, known, endpoint, f"{endpoint.host}:{endpoint.port}", prefer_known=not cfg.host_key_fingerprint,
        no_answer="the server may be refusing new connections (sshd MaxStartups) or not be an SSH server",
    )
    try:
        host_key_status = verify_host_key(cfg, endpoint, transport.get_remote_server_key(), known)
        auth_method = authenticate(transport, cfg, endpoint)
        sftp = fastpath.start_sftp(transport, WINDOW_SIZE, MAX_PACKET_SIZE)
        transport.set_keepalive(KEEPALIVE_INTERVAL)
        # A read or a send that makes no progress for io_timeout seconds raises
        # socket.timeout, which the retry policy turns into a reconnect.
        sftp.get_channel().settimeout(cfg.io_timeout)
        log.debug(
            "connected to %s (%s, %s, cipher %s)", endpoint, host_key_status, auth_method, transport.remote_cipher
        )
        return Session(transport, sftp, endpoint, host_key_status, auth_method)
    except BaseException:
        transport.close()
        raise
