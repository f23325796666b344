"""An authenticated SFTP session to the backup host.

Resolves the host like ``ssh`` does (``~/.ssh/config`` Host aliases for
HostName, Port, User, IdentityFile; explicit plugin options win), verifies the
host key *before* any credential is sent, authenticates with the configured
key, the ssh-agent, the default keys, then a password, and opens SFTP with
throughput-oriented algorithm and window settings.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
from dataclasses import dataclass

import paramiko

from sftp_plugin.channel_buffer import ChunkedPipe
from sftp_plugin.config import PluginConfig
from sftp_plugin.errors import AuthError, ConfigError, ConnectError, HostKeyError
from sftp_plugin.packetizer import InPlacePacketizer

log = logging.getLogger(__name__)

# AES-GCM first: AEAD ciphers need no separate MAC pass, and AES-NI makes them
# the cheapest per byte in paramiko (the issue asks for them where offered).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
# Flow-control window we grant the server: how far it may send ahead of our
# reads, and so the most a download buffers. With arriving packets kept as
# they are (channel_buffer.ChunkedPipe) a bigger window costs memory, not CPU,
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
SSH_CONFIG_PATH = "~/.ssh/config"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_PORT = 22


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, after ssh_config resolution."""

    host: str
    port: int
    user: str
    identity_files: tuple[str, ...]

    @property
    def known_hosts_name(self) -> str:
        # The key OpenSSH files a host under in known_hosts.
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def resolve_endpoint(cfg: PluginConfig) -> Endpoint:
    """Apply ``~/.ssh/config`` to the hostname; explicit plugin options take precedence."""
    found: dict = {}
    path = os.path.expanduser(SSH_CONFIG_PATH)
    if os.path.isfile(path):
        try:
            found = paramiko.SSHConfig.from_path(path).lookup(cfg.hostname)
        except Exception as err:  # noqa: BLE001 - a broken ssh_config must name itself, not crash
            raise ConfigError(f"cannot parse {path}: {err}", "fix or move that file") from None
    port = cfg.port or int(found.get("port", DEFAULT_PORT))
    if cfg.identity_file:
        identities: tuple[str, ...] = (cfg.identity_file,)
    else:
        # Like ssh, skip IdentityFile entries that do not exist (ssh_config often lists several).
        candidates = (os.path.expanduser(p) for p in found.get("identityfile", []))
        identities = tuple(p for p in candidates if os.path.isfile(p))
    return Endpoint(
        host=found.get("hostname", cfg.hostname),
        port=port,
        user=cfg.username or found.get("user") or cfg.effective_username(),
        identity_files=identities,
    )


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint in the form ``ssh-keygen -lf`` prints: SHA256:<base64, no padding>."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _load_known_hosts(path: str) -> paramiko.HostKeys:
    host_keys = paramiko.HostKeys()
    if os.path.isfile(path):
        try:
            host_keys.load(path)
        except (OSError, paramiko.SSHException) as err:
            raise ConfigError(f"cannot read known_hosts_file {path}: {err}", "check the file") from None
    return host_keys


def _append_known_host(path: str, endpoint: Endpoint, key: paramiko.PKey) -> None:
    # One O_APPEND write per line: many plugin processes may add the same host at
    # once, and rewriting the whole file (HostKeys.save) would lose entries.
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    line = f"{endpoint.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def verify_host_key(cfg: PluginConfig, endpoint: Endpoint, key: paramiko.PKey, known: paramiko.HostKeys) -> str:
    """Accept or refuse the server's key; return how it was verified (for logs and `check`)."""
    seen = fingerprint(key)
    if cfg.host_key_fingerprint:
        if seen == cfg.host_key_fingerprint:
            return "pinned fingerprint"
        raise HostKeyError(
            f"host key of {endpoint.host}:{endpoint.port} ({key.get_name()}) is {seen}, "
            f"not the pinned {cfg.host_key_fingerprint}",
            f"pin the server's {key.get_name()} key (the type negotiated, preferring ed25519): "
            "ssh-keygen -lf on its public key file; if that key really changed, update host_key_fingerprint",
        )
    if cfg.strict_host_key_checking == "no":
        log.warning("host key of %s not verified (strict_host_key_checking: no): %s", endpoint.host, seen)
        return "not verified (strict_host_key_checking: no)"
    known_hosts_file = os.path.expanduser(cfg.known_hosts_file)
    entries = known.lookup(endpoint.known_hosts_name)
    if entries is not None and key.get_name() in entries:
        if entries[key.get_name()] == key:
            return f"known_hosts ({known_hosts_file})"
        raise HostKeyError(
            f"host key of {endpoint.known_hosts_name} CHANGED: it is now {seen}, "
            f"which does not match {known_hosts_file}",
            "this may be an attack; if the key was legitimately replaced, remove the old line "
            f"with: ssh-keygen -R '{endpoint.known_hosts_name}' -f {known_hosts_file}",
        )
    if cfg.strict_host_key_checking == "accept-new":
        _append_known_host(known_hosts_file, endpoint, key)
        log.warning("added new host key of %s to %s: %s", endpoint.known_hosts_name, known_hosts_file, seen)
        return f"accepted new key into {known_hosts_file}"
    raise HostKeyError(
        f"host key of {endpoint.known_hosts_name} ({key.get_name()} {seen}) is not in {known_hosts_file}",
        f"verify it and add it (ssh-keyscan -p {endpoint.port} {endpoint.host} >> {known_hosts_file}), "
        "or set host_key_fingerprint or strict_host_key_checking: accept-new",
    )


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


def _load_key(path: str, passphrase: str | None, required: bool) -> paramiko.PKey | None:
    try:
        # paramiko 5 hands the passphrase to cryptography, which takes bytes only.
        return paramiko.PKey.from_path(path, passphrase.encode() if passphrase else None)
    except (paramiko.PasswordRequiredException, TypeError) as err:
        # paramiko 5 reports a missing passphrase as TypeError("...password-protected...").
        if isinstance(err, TypeError) and "password" not in str(err).lower():
            raise
        if not required:
            log.info("skipping encrypted default key %s", path)
            return None
        raise AuthError(
            f"identity_file {path} is encrypted", "set identity_passphrase or load it into ssh-agent"
        ) from None
    except FileNotFoundError:
        raise AuthError(f"identity_file {path} does not exist", "check the identity_file option") from None
    except (OSError, ValueError, paramiko.SSHException) as err:
        if not required:
            log.info("skipping default key %s: %s", path, err)
            return None
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

    @property
    def cipher(self) -> str:
        return self.transport.remote_cipher

    def close(self) -> None:
        try:
            self.sftp.close()
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


def start_sftp(transport: paramiko.Transport) -> paramiko.SFTPClient:
    """SFTPClient.from_transport, with our window, packet size and receive buffer (channel_buffer.py)."""
    channel = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE)
    channel.in_buffer = ChunkedPipe()  # before the subsystem starts, so nothing is buffered yet
    if isinstance(transport.packetizer, InPlacePacketizer):
        transport.packetizer.hand_views_to(channel.get_id())
    channel.invoke_subsystem("sftp")
    return paramiko.SFTPClient(channel)


def connect(cfg: PluginConfig) -> Session:
    """Open one session: TCP, SSH handshake, host key check, auth, SFTP. No retries here."""
    endpoint = resolve_endpoint(cfg)
    known = _load_known_hosts(os.path.expanduser(cfg.known_hosts_file))
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=cfg.connect_timeout)
    except OSError as err:
        raise ConnectError(
            f"cannot connect to {endpoint.host}:{endpoint.port}: {err.strerror or err}",
            "check hostname and port, that sshd runs there, and any firewall between",
        ) from err
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # paramiko retries a send that times out for ever; with this, the kernel fails the
        # socket once sent data stays unacknowledged for io_timeout (a dead peer or a
        # black-holing firewall), and the retry policy reconnects.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, cfg.io_timeout * 1000)
    transport = paramiko.Transport(
        sock,
        default_window_size=WINDOW_SIZE,
        default_max_packet_size=MAX_PACKET_SIZE,
        packetizer_class=InPlacePacketizer,
    )
    try:
        options = transport.get_security_options()
        offered = list(options.ciphers)
        options.ciphers = [c for c in PREFERRED_CIPHERS if c in offered] + [
            c for c in offered if c not in PREFERRED_CIPHERS
        ]
        known_types = list((known.lookup(endpoint.known_hosts_name) or {}).keys())
        if known_types and not cfg.host_key_fingerprint:
            # Ask for the key type we already trust, as ssh does, so a server with
            # several host keys is checked against the one on file.
            options.key_types = [t for t in options.key_types if t in known_types] + [
                t for t in options.key_types if t not in known_types
            ]
        transport.banner_timeout = cfg.connect_timeout
        transport.auth_timeout = cfg.connect_timeout
        try:
            transport.start_client(timeout=cfg.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as err:
            raise ConnectError(
                f"SSH handshake with {endpoint.host}:{endpoint.port} failed: {err or type(err).__name__}",
                "the server may be refusing new connections (sshd MaxStartups) or not be an SSH server",
            ) from err
        host_key_status = verify_host_key(cfg, endpoint, transport.get_remote_server_key(), known)
        auth_method = authenticate(transport, cfg, endpoint)
        sftp = start_sftp(transport)
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
