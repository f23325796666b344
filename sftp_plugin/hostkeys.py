"""known_hosts read as OpenSSH reads it, and the verdict on a server's host key.

paramiko's HostKeys knows a host only under its exact name (or that name's
hash), and its loader raises on the first ``@cert-authority`` or ``@revoked``
line. OpenSSH (hostfile.c, sshconnect.c) reads more, and this module does the
same:

- a line's host field is a comma-separated list of names and patterns
  (``*`` and ``?``, case-insensitive; ``[127.0.0.*]:2222``, ``*.example.com``),
  a pattern starting with ``!`` vetoes the whole line for the names it matches,
  and ``|1|salt|hash`` names are matched with paramiko's ``HostKeys.hash_host``;
- a host is looked up under ``[host]:port`` (``host`` on port 22), or under its
  ``HostKeyAlias`` alone when ``~/.ssh/config`` sets one;
- ``@revoked`` lines name keys never to accept, for the hosts their patterns match;
- ``@cert-authority`` lines are skipped: the plugin does not negotiate host
  certificates, so a CA could only vouch for a key the server never shows. This
  is what OpenSSH 9 does with a server that offers no certificate: the CA line
  does not make the host known, its plain key is judged on its own;
- a host with any key on file, of any type, is never new: a key not among them is
  CHANGED (so a man in the middle offering another key type than the one on file
  is refused, as ``ssh`` refuses it).

Keys are compared as the key blobs the server sends, so a line of a key type
paramiko cannot load (``sk-ssh-ed25519@openssh.com``...) still makes its host known.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import paramiko

from sftp_plugin.errors import HostKeyError

log = logging.getLogger(__name__)

MARKER_REVOKED = "@revoked"
MARKER_CERT_AUTHORITY = "@cert-authority"
# OpenSSH's prefix of a hashed host name (HashKnownHosts): |1|<base64 salt>|<base64 HMAC-SHA1 of the name>.
HASH_MAGIC = "|1|"
# The port ssh leaves out of the name it files a host under.
DEFAULT_PORT = 22
# A known_hosts line is "[marker] names keytype base64 [comment]": at least three fields without a marker.
MIN_FIELDS = 3
# Key type names a known_hosts line may give for a key whose blob says "ssh-rsa" (they name signature
# algorithms of the same key; OpenSSH's sshkey_read accepts them).
RSA_ALIASES = frozenset({"ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"})
# The host key algorithms to ask for when a key of one of these types is on file: paramiko negotiates RSA
# keys under their signature algorithm names, not under the key type "ssh-rsa".
ALGORITHMS_OF_KEY_TYPE = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH files a host under: ``host`` on port 22, else ``[host]:port``; lower case, as ssh
    lower-cases the names it looks up."""
    host = host.lower()
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


@lru_cache(maxsize=256)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # OpenSSH's match_pattern: '*' any run of characters, '?' one character, everything else literal
    # (so the brackets of "[127.0.0.*]:2222" are brackets, unlike in fnmatch).
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def pattern_matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches one host pattern (no negation, no list)."""
    return _pattern_regex(pattern).fullmatch(name) is not None


def _hash_matches(name: str, hashed: str) -> bool:
    try:
        candidate = paramiko.HostKeys.hash_host(name, hashed)
    except (binascii.Error, ValueError, AssertionError, IndexError):
        return False  # a malformed hash (wrong salt length...) matches nothing, as in OpenSSH
    return hmac.compare_digest(candidate.encode(), hashed.encode())


def names_match(name: str, names: str) -> bool:
    """Whether ``name`` is among a line's host field ``names``, as OpenSSH's match_hostname decides:
    a matching negated pattern (``!pattern``) rules the line out whatever else matches."""
    found = False
    for item in names.split(","):
        if item.startswith("!"):
            if pattern_matches(name, item[1:]):
                return False
        elif item.startswith(HASH_MAGIC):
            found = found or _hash_matches(name, item)
        elif item and pattern_matches(name, item):
            found = True
    return found


def _is_exact(names: str, name: str) -> bool:
    """Whether every item of the host field is ``name`` itself or a hash (what ssh-keygen -R removes)."""
    return all(item.startswith(HASH_MAGIC) or item.lower() == name.lower() for item in names.split(","))


@dataclass(frozen=True)
class Entry:
    """One usable line of a known_hosts file."""

    line: int  # 1-based, for messages
    marker: str  # "" for a plain key line, else MARKER_REVOKED or MARKER_CERT_AUTHORITY
    names: str  # the host field as written
    key_type: str  # the type the key blob carries ("ssh-ed25519", "ssh-rsa", ...)
    blob: bytes  # the public key as the server sends it

    def matches(self, name: str) -> bool:
        return names_match(name, self.names)

    def holds(self, key: paramiko.PKey) -> bool:
        return hmac.compare_digest(self.blob, key.asbytes())

    def where(self, path: str) -> str:
        return f"line {self.line} of {path}"


def parse_line(text: str, number: int) -> Entry | None:
    """The entry on one line, or None when the line is not one (then it is skipped, as OpenSSH skips it)."""
    fields = text.split()
    marker = ""
    if fields and fields[0].startswith("@"):
        marker = fields.pop(0)
        if marker not in (MARKER_REVOKED, MARKER_CERT_AUTHORITY):
            return None
    if len(fields) < MIN_FIELDS:
        return None
    names, declared, body = fields[:MIN_FIELDS]
    try:
        blob = base64.b64decode(body, validate=True)
        key_type = paramiko.Message(blob).get_text()
    except (binascii.Error, ValueError, UnicodeDecodeError, paramiko.SSHException):
        return None
    if not blob or (key_type != declared and not (key_type == "ssh-rsa" and declared in RSA_ALIASES)):
        return None  # OpenSSH refuses a line whose key is not of the type it says
    return Entry(number, marker, names, key_type, blob)


@dataclass(frozen=True)
class HostEntries:
    """What a known_hosts file says about one name."""

    name: str
    keys: tuple[Entry, ...]  # plain key lines
    revoked: tuple[Entry, ...]
    authorities: tuple[Entry, ...]

    def key_types(self) -> list[str]:
        """The types of the keys on file, in file order, each once."""
        return list(dict.fromkeys(entry.key_type for entry in self.keys))


class KnownHosts:
    """The usable lines of one known_hosts file (a missing file has none)."""

    def __init__(self, path: str, entries: Sequence[Entry] = (), skipped: Sequence[int] = ()) -> None:
        self.path = path
        self.entries = tuple(entries)
        self.skipped = tuple(skipped)  # numbers of lines that are neither entries, comments nor blank
        self._warned_authorities: set[str] = set()

    @classmethod
    def parse(cls, path: str, lines: Iterable[str]) -> KnownHosts:
        entries: list[Entry] = []
        skipped: list[int] = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            entry = parse_line(text, number)
            if entry is None:
                skipped.append(number)
            else:
                entries.append(entry)
        if skipped:
            log.warning("known_hosts_file %s: skipped line(s) %s, not readable as known_hosts lines",
                        path, ", ".join(map(str, skipped)))
        return cls(path, entries, skipped)

    @classmethod
    def load(cls, path: str) -> KnownHosts:
        """Read ``path``; a missing file is an empty one. Raises OSError when it exists but cannot be read."""
        if not os.path.exists(path):
            return cls(path)
        with open(path, encoding="utf-8", errors="replace") as lines:
            return cls.parse(path, lines)

    def lookup(self, name: str) -> HostEntries:
        found = [entry for entry in self.entries if entry.matches(name)]
        return HostEntries(
            name,
            keys=tuple(e for e in found if not e.marker),
            revoked=tuple(e for e in found if e.marker == MARKER_REVOKED),
            authorities=tuple(e for e in found if e.marker == MARKER_CERT_AUTHORITY),
        )

    def warn_authorities(self, entries: HostEntries) -> None:
        """One log warning per host that a @cert-authority line covers: ssh would trust a certificate the
        CA signed; the plugin needs the host's own key on file (or a pin)."""
        if not entries.authorities or entries.name in self._warned_authorities:
            return
        self._warned_authorities.add(entries.name)
        log.warning(
            "known_hosts_file %s: @cert-authority %s for %s not used: the plugin does not verify host "
            "certificates; the host's own key must be on file, or pinned with host_key_fingerprint",
            self.path, "line " + ", ".join(str(e.line) for e in entries.authorities), entries.name,
        )


def preferred_algorithms(offered: Sequence[str], known_types: Sequence[str]) -> list[str]:
    """``offered`` host key algorithms with those of the key types on file first, as ssh orders them, so
    a server with several host keys shows the one on file."""
    wanted = [algorithm for key_type in known_types for algorithm in ALGORITHMS_OF_KEY_TYPE.get(key_type, (key_type,))]
    first = [a for a in wanted if a in offered]
    return list(dict.fromkeys(first + list(offered)))


def append(path: str, name: str, key: paramiko.PKey) -> None:
    """Add ``key`` for ``name`` to the file (created 0600, its directory 0700)."""
    # One O_APPEND write per line: many plugin processes may add the same host at
    # once, and rewriting the whole file (HostKeys.save) would lose entries.
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    """Whose key is judged, for the look-up and the messages."""

    name: str  # what known_hosts files it under: its HostKeyAlias, or [host]:port
    host: str
    port: int
    alias: str | None = None
    role: str = ""  # "" for the backup host, "jump host " for a ProxyJump host
    pinnable: bool = True  # whether host_key_fingerprint could stand for known_hosts (the backup host's only)

    @property
    def label(self) -> str:
        via = f" (HostKeyAlias of {self.host}:{self.port})" if self.alias else ""
        return f"{self.role}{self.name}{via}"

    def add_hint(self, path: str) -> str:
        scan = f"ssh-keyscan -p {self.port} {self.host}"
        if self.alias:
            return f"verify it and add it under its HostKeyAlias ({scan} | sed 's/^[^ ]*/{self.alias}/' >> {path})"
        return f"verify it and add it ({scan} >> {path})"


def refuse_revoked(known: KnownHosts, host: Host, key: paramiko.PKey, seen: str) -> HostEntries:
    """Raise HostKeyError if ``key`` is @revoked for the host, whatever else is configured; else return
    what the file says about the host."""
    entries = known.lookup(host.name)
    for entry in entries.revoked:
        if entry.holds(key):
            raise HostKeyError(
                f"host key of {host.label} ({key.get_name()} {seen}) is REVOKED ({entry.where(known.path)})",
                "it must never be trusted again, whatever host_key_fingerprint or strict_host_key_checking say: "
                "this may be an attack, or the host still has a retired key; ask its administrator for its "
                "current key",
            )
    return entries


def verify(known: KnownHosts, host: Host, key: paramiko.PKey, seen: str, policy: str) -> str:
    """Judge ``key`` against known_hosts under ``policy`` ("yes" or "accept-new"); return how it was
    verified, or raise HostKeyError. ``seen`` is its fingerprint, for messages."""
    entries = refuse_revoked(known, host, key, seen)
    known.warn_authorities(entries)
    for entry in entries.keys:
        if entry.holds(key):
            return f"known_hosts ({known.path})"
    if entries.keys:
        raise _changed(known, host, key, seen, entries.keys)
    if policy == "accept-new":
        append(known.path, host.name, key)
        log.warning("added new host key of %s to %s: %s %s", host.label, known.path, key.get_name(), seen)
        return f"accepted new key into {known.path}"
    instead = "host_key_fingerprint or strict_host_key_checking" if host.pinnable else "strict_host_key_checking"
    raise HostKeyError(
        f"host key of {host.label} ({key.get_name()} {seen}) is not in {known.path}",
        f"{host.add_hint(known.path)}, or set {instead}: accept-new",
    )


def _changed(known: KnownHosts, host: Host, key: paramiko.PKey, seen: str, on_file: Sequence[Entry]) -> HostKeyError:
    filed = "; ".join(f"{e.key_type} under '{e.names}' ({e.where(known.path)})" for e in on_file)
    if all(_is_exact(e.names, host.name) for e in on_file):
        remove = f"remove the old line with: ssh-keygen -R '{host.name}' -f {known.path}"
    else:
        remove = f"correct {', '.join(e.where(known.path) for e in on_file)} (a pattern line: other hosts share it)"
    return HostKeyError(
        f"host key of {host.label} CHANGED: it is now {key.get_name()} {seen}, which does not match "
        f"{known.path}: it holds {filed}",
        f"this may be an attack; if the key was legitimately replaced, {remove}",
    )
