"""The ``~/.ssh/config`` options set for the backup host that the plugin does not honour.

``ssh`` would obey them; the plugin connects its own way, so each one that
changes where or how it connects, set to something other than what the
plugin does anyway, is named with what the plugin does instead (``check``
prints them as warnings). What the plugin honours is one list,
connection.HONOURED_SSH_CONFIG; options that do not change the connection
(SendEnv, LocalForward, HashKnownHosts...) are not named.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sftp_plugin.config import PluginConfig
from sftp_plugin.connection import HONOURED_SSH_CONFIG, SSH_CONFIG_PATH

# ssh_config's words for "no"/"yes" (its flag values also accept true/false).
NO_WORDS = frozenset({"no", "false"})
YES_WORDS = frozenset({"yes", "true"})
# Where the plugin's own algorithm lists are documented.
ALGORITHMS_DOC = "the plugin offers its own list of algorithms (README: Supported algorithms)"
# ssh_config's StrictHostKeyChecking words, as the plugin's strict_host_key_checking words.
STRICT_WORDS = {"yes": "yes", "true": "yes", "accept-new": "accept-new", "no": "no", "false": "no", "off": "no"}


@dataclass(frozen=True)
class Rule:
    """One ssh_config keyword the plugin does not honour."""

    keyword: str  # as ssh_config(5) spells it
    instead: Callable[[PluginConfig], str]  # what the plugin does instead
    # Whether a value means what the plugin does anyway (then nothing is ignored); None: no value does.
    agrees: Callable[[str, PluginConfig], bool] | None = None


def _says(words: frozenset[str]) -> Callable[[str, PluginConfig], bool]:
    return lambda value, _cfg: value.lower() in words


def _same_known_hosts(value: str, cfg: PluginConfig) -> bool:
    files = value.split()
    return bool(files) and os.path.expanduser(files[0]) == os.path.expanduser(cfg.known_hosts_file)


def _fixed(text: str) -> Callable[[PluginConfig], str]:
    return lambda _cfg: text


RULES = (
    Rule("Ciphers", _fixed(ALGORITHMS_DOC)),
    Rule("MACs", _fixed(ALGORITHMS_DOC)),
    Rule("KexAlgorithms", _fixed(ALGORITHMS_DOC)),
    Rule("HostKeyAlgorithms", _fixed(ALGORITHMS_DOC)),
    Rule("PubkeyAcceptedAlgorithms", _fixed(ALGORITHMS_DOC)),
    Rule("PubkeyAcceptedKeyTypes", _fixed(ALGORITHMS_DOC)),  # the old name of PubkeyAcceptedAlgorithms
    Rule("UserKnownHostsFile", lambda cfg: f"use known_hosts_file (now {cfg.known_hosts_file})", _same_known_hosts),
    Rule("GlobalKnownHostsFile", lambda cfg: f"use known_hosts_file (now {cfg.known_hosts_file}); no global file "
         "is read"),
    Rule(
        "StrictHostKeyChecking",
        lambda cfg: f"use strict_host_key_checking (now {cfg.strict_host_key_checking})",
        lambda value, cfg: STRICT_WORDS.get(value.lower()) == cfg.strict_host_key_checking,
    ),
    Rule("CheckHostIP", _fixed("the plugin checks the host key under the host's name only"), _says(NO_WORDS)),
    Rule("VerifyHostKeyDNS", _fixed("the plugin reads no SSHFP records: use host_key_fingerprint or "
                                    "known_hosts_file"), _says(NO_WORDS)),
    Rule("UpdateHostKeys", _fixed("the plugin never rewrites known_hosts_file (accept-new only adds a new host)"),
         _says(NO_WORDS)),
    Rule("BindAddress", _fixed("the plugin connects from the source address the kernel picks")),
    Rule("BindInterface", _fixed("the plugin connects from the interface the kernel picks")),
    Rule("AddressFamily", _fixed("the plugin tries every address the name resolves to, IPv4 and IPv6"),
         _says(frozenset({"any"}))),
    Rule("ConnectTimeout", lambda cfg: f"use connect_timeout (now {cfg.connect_timeout} s)",
         lambda value, cfg: value == str(cfg.connect_timeout)),
    Rule("ConnectionAttempts", lambda cfg: f"use retries (now {cfg.retries})"),
    Rule("ServerAliveInterval", lambda cfg: f"the plugin sends keepalives of its own; use io_timeout (now "
         f"{cfg.io_timeout} s) for how long a silent connection is waited on"),
    Rule("ServerAliveCountMax", lambda cfg: f"use io_timeout (now {cfg.io_timeout} s)"),
    Rule("Compression", _fixed("the plugin never compresses"), _says(NO_WORDS)),
    Rule("IdentitiesOnly", _fixed("the plugin offers the ssh-agent's keys too (SSH_AUTH_SOCK), after the "
                                  "identity files"), _says(NO_WORDS)),
    Rule("IdentityAgent", _fixed("the plugin uses the ssh-agent of SSH_AUTH_SOCK")),
    Rule("CertificateFile", _fixed("the plugin uses only a certificate next to the key (<identity_file>-cert.pub)")),
    Rule("PubkeyAuthentication", _fixed("the plugin always offers keys"), _says(YES_WORDS)),
    Rule(
        "PasswordAuthentication",
        _fixed("the plugin sends a password only when the password option is set"),
        lambda value, cfg: value.lower() in (YES_WORDS if cfg.password else NO_WORDS),
    ),
    Rule("KbdInteractiveAuthentication", _fixed("the plugin does not use keyboard-interactive authentication; "
                                                "set password"), _says(NO_WORDS)),
    Rule("ChallengeResponseAuthentication", _fixed("the plugin does not use keyboard-interactive authentication; "
                                                   "set password"), _says(NO_WORDS)),
    Rule("GSSAPIAuthentication", _fixed("the plugin does not use GSSAPI (Kerberos)"), _says(NO_WORDS)),
    Rule("HostbasedAuthentication", _fixed("the plugin does not use host-based authentication"), _says(NO_WORDS)),
    Rule("PreferredAuthentications", _fixed("the plugin tries keys (identity files, ssh-agent, default keys), "
                                            "then password if set")),
    # paramiko's SSHConfig does not follow Include: whatever the included files set for the host is not used.
    Rule("Include", _fixed("the plugin does not read included files: put the host's HostName, Port, User and "
                           "IdentityFile in ~/.ssh/config itself, or set the plugin options")),
)


@dataclass(frozen=True)
class Unused:
    """An option set for the host that the plugin does not honour."""

    keyword: str
    value: str
    instead: str


def lookup(hostname: str) -> dict[str, object] | None:
    """What ~/.ssh/config sets for ``hostname`` (paramiko's SSHConfig.lookup, as the plugin's connection reads it),
    or None when there is no such file or it cannot be read (connecting reports that)."""
    import paramiko

    path = os.path.expanduser(SSH_CONFIG_PATH)
    if not os.path.isfile(path):
        return None
    try:
        return dict(paramiko.SSHConfig.from_path(path).lookup(hostname))
    except Exception:  # noqa: BLE001 - resolve_endpoint reports a broken file when connecting
        return None


def unused_options(found: Mapping[str, object], cfg: PluginConfig) -> list[Unused]:
    """The options in ``found`` (an SSHConfig lookup) the plugin does not honour, that change the connection."""
    unused: list[Unused] = []
    for rule in RULES:
        key = rule.keyword.lower()
        if key in HONOURED_SSH_CONFIG or key not in found:
            continue
        raw = found[key]
        value = " ".join(map(str, raw)) if isinstance(raw, list) else str(raw)
        if rule.agrees is not None and rule.agrees(value, cfg):
            continue
        unused.append(Unused(rule.keyword, value, rule.instead(cfg)))
    return unused
