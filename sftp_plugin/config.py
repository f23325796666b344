"""Load and validate the plugin's YAML configuration into a frozen, typed object.

gpbackup reads ``options`` into a Go ``map[string]string`` (yaml.v2), which
keeps every scalar's literal text: ``012345`` stays ``012345``, ``on`` stays
``on``, ``12:30`` stays ``12:30``. It passes the plugin a re-serialised copy
(``port: 22`` arrives as ``port: "22"``), while gpbackup_manager and gpbackman
pass the admin's own file. So the values under ``options`` are read the way
gpbackup reads them, as literal text (`read_options`, without PyYAML's YAML 1.1
typing), and each parser converts its own text: either file gives the same
result. A plain null (``key:``, ``~``, ``null``) means "no value"; a list or
map is refused, as gpbackup refuses it. Keys gpbackup adds itself are accepted
and ignored; any other unknown key is an error that suggests the closest valid
one. All problems are reported together in one message, so one edit fixes the
file.
"""

from __future__ import annotations

import functools
import getpass
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Union

from sftp_plugin.errors import ConfigError

STRICT_CHOICES = ("yes", "accept-new", "no")
LOG_LEVELS = ("debug", "info", "warning", "error")
COMPRESSIONS = ("none", "zstd")
# The port of a config (or ~/.ssh/config entry) that names none: SSH's.
DEFAULT_PORT = 22
# Keys gpbackup/gprestore write into the per-host copy of the config; never ours to reject.
GPBACKUP_KEYS = frozenset({"pgport", "backup_plugin_version"})
FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}=?")
MIB = 1024 * 1024
# Smallest resume buffer: one local read (1 MiB) must fit, or nothing could be resent.
MIN_RESUME_BUFFER = MIB
# Largest: one plugin process per segment runs at once; more than 4 GiB each is
# surely a unit mistake (a bare number means MiB, not bytes).
MAX_RESUME_BUFFER = 4096 * MIB
SIZE_RE = re.compile(r"([0-9]+)\s*([kmg]i?b?)?", re.IGNORECASE)
SIZE_UNITS = {"k": 1024, "m": MIB, "g": 1024 * MIB}
# Options whose values are masked in every log line and message.
SECRET_OPTIONS = ("password", "identity_passphrase")
TRUE_WORDS = frozenset({"yes", "on", "true", "1", "y"})
FALSE_WORDS = frozenset({"no", "off", "false", "0", "n"})
INTEGER_RE = re.compile(r"[+-]?[0-9]+")
# The tag PyYAML's resolver gives a plain ``key:``, ``~`` or ``null`` (yaml.v2 resolves them alike).
YAML_NULL_TAG = "tag:yaml.org,2002:null"
# gprestore uses restore_data_subset only when this option's text is exactly "on" (utils/plugin.go).
RESTORE_SUBSET_WORDS = {"on": True, "off": False}


class NotPlain:
    """Stands for an option whose YAML value is a list or a map: gpbackup's map of string to string refuses it."""

    def __repr__(self) -> str:
        return "<list or map>"


NOT_PLAIN = NotPlain()
# One option's value as `read_options` returns it: its literal text, None for a plain null, or NOT_PLAIN.
OptionText = Union[str, None, NotPlain]


@dataclass(frozen=True)
class PluginConfig:
    """Validated plugin options. ``None`` means "not set": ssh_config or a default applies."""

    hostname: str
    remote_dir: str
    port: int | None = None
    username: str | None = None
    identity_file: str | None = None
    identity_passphrase: str | None = None
    password: str | None = None
    known_hosts_file: str = "~/.ssh/known_hosts"
    strict_host_key_checking: str = "yes"
    host_key_fingerprint: str | None = None
    connect_timeout: int = 30
    retries: int = 6
    keep_last: int | None = None
    keep_days: int | None = None
    retry_max_wait: int = 30
    resume_buffer: int = 64 * MIB
    io_timeout: int = 60
    verify_checksums: bool = True
    # Ask the backup host to flush every stored file to disk (fsync@openssh.com) before it is renamed into place.
    fsync: bool = True
    log_dir: str = "~/gpAdminLogs"
    log_level: str = "info"
    restore_subset: bool = False
    fork_server: bool = True
    # Seconds a fork-server worker keeps its SSH session for the next call; 0: none is kept.
    session_idle: int = 60
    # The most SSH sessions the fork server keeps to the backup host for this config on this host at once
    # (calls beyond wait for one to be free); 0: as many as calls run at once.
    max_connections: int = 0
    fast_path: bool = True
    # At rest (container.py): "none" stores files as they come, "zstd" compresses them in chunks.
    compression: str = "none"
    compression_level: int = 1
    encryption_key_file: str | None = None
    decryption_key_files: tuple[str, ...] = ()

    @property
    def uses_container(self) -> bool:
        """Whether new files are stored as containers (compressed and/or encrypted) rather than as they come."""
        return self.compression != "none" or self.encryption_key_file is not None

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line or a message."""
        return [value for value in (getattr(self, name) for name in SECRET_OPTIONS) if value]

    def effective_username(self) -> str:
        return self.username or getpass.getuser()


class _Invalid(ValueError):
    """One option's value is unusable; the text says what is expected."""


def _text(value: str) -> str:
    return value.strip()


def _literal(value: str) -> str:
    """A secret, taken as written: its spaces may be part of it."""
    return value


def _non_empty(value: str) -> str:
    text = _text(value)
    if not text:
        raise _Invalid("must not be empty")
    return text


def _whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        text = _text(value)
        # Decimal digits only: no YAML 1.1 octal (010), hex, sexagesimal (1:30), floats or underscores.
        if not INTEGER_RE.fullmatch(text):
            raise _Invalid(f"expected a whole number, got {value!r}")
        number = int(text)
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise _Invalid(f"must be {bound}, got {number}")
        return number

    return parse


def parse_bool(value: str) -> bool:
    word = _text(value).lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _Invalid(f"expected yes/no, on/off or true/false, got {value!r}")


def _strict(value: str) -> str:
    # ssh_config's own words, plus the boolean words an admin may write for yes and no.
    word = _text(value).lower()
    if word in TRUE_WORDS:
        return "yes"
    if word in FALSE_WORDS:
        return "no"
    if word == "accept-new":
        return word
    raise _Invalid(f"expected one of {', '.join(STRICT_CHOICES)}, got {value!r}")


def _restore_subset(value: str) -> bool:
    """gprestore reads this option itself, as text: only the exact text ``on`` makes it use byte ranges."""
    if value not in RESTORE_SUBSET_WORDS:
        raise _Invalid(
            f"expected exactly on or off, got {value!r}: gprestore reads this option as text and uses "
            "restore_data_subset only when it is exactly 'on'"
        )
    return RESTORE_SUBSET_WORDS[value]


def _is_ipv6_address(text: str) -> bool:
    import ipaddress  # only for a hostname with a colon: every call reads the config

    try:
        ipaddress.IPv6Address(text)  # also takes a zone (fe80::1%eth0), as getaddrinfo does
    except ValueError:
        return False
    return True


def _hostname(value: str) -> str:
    """A host name, IP address or ~/.ssh/config Host alias: never ``user@host`` or ``host:port``.

    Those would only fail to resolve, retried for half a minute. An IPv6 address has colons too, so a colon is
    refused only outside one; a bracketed ``[::1]`` (known_hosts' and URLs' form) is refused: ssh cannot resolve it
    either.
    """
    text = _non_empty(value)
    if "@" in text or "[" in text or (":" in text and not _is_ipv6_address(text)):
        raise _Invalid(
            f"expected a host name, IP address (IPv6 without brackets) or ~/.ssh/config Host alias, got {text!r}: "
            "put the user in 'username', the port in 'port'"
        )
    return text


def _remote_dir(value: str) -> str:
    text = _non_empty(value)
    if not text.startswith("/"):
        raise _Invalid(f"must be an absolute path, got {text!r}")
    if ".." in text.split("/"):
        raise _Invalid("must not contain '..'")
    return posixpath.normpath(text)


def _local_path(value: str) -> str:
    return os.path.expanduser(_non_empty(value))


def _fingerprint(value: str) -> str:
    text = _non_empty(value)
    if not FINGERPRINT_RE.fullmatch(text):
        raise _Invalid("expected SHA256:<43 base64 characters>, as `ssh-keygen -lf` prints it")
    return text.rstrip("=")


def _size(value: str) -> int:
    """A byte size: a bare number means MiB; K/M/G suffixes (binary, optional 'iB') are accepted."""
    match = SIZE_RE.fullmatch(_text(value))
    if not match:
        raise _Invalid(f"expected a size such as 64, 64MiB or 1GiB, got {value!r}")
    unit = (match.group(2) or "m")[0].lower()
    size = int(match.group(1)) * SIZE_UNITS[unit]
    if size < MIN_RESUME_BUFFER or size > MAX_RESUME_BUFFER:
        raise _Invalid(f"must be between 1MiB and 4GiB (a bare number means MiB), got {value!r}")
    return size


def _compression(value: str) -> str:
    word = _text(value).lower()
    if word not in COMPRESSIONS:
        raise _Invalid(f"expected one of {', '.join(COMPRESSIONS)}, got {value!r}")
    return word


def _local_paths(value: str) -> tuple[str, ...]:
    """Local paths separated by commas (gpbackup's options are text: no YAML lists)."""
    items = [item.strip() for item in value.split(",")]
    if not any(items):
        raise _Invalid("must not be empty")
    if not all(items):
        raise _Invalid(f"expected paths separated by commas, got {value!r}")
    return tuple(os.path.expanduser(item) for item in items)


def _log_level(value: str) -> str:
    word = _text(value).lower()
    if word not in LOG_LEVELS:
        raise _Invalid(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return word


# The single table of options: name -> parser. Defaults live on PluginConfig.
PARSERS: dict[str, Callable[[str], Any]] = {
    "hostname": _hostname,
    "remote_dir": _remote_dir,
    "port": _whole_number(1, 65535),
    "username": _non_empty,
    "identity_file": _local_path,
    "identity_passphrase": _literal,
    "password": _literal,
    "known_hosts_file": _local_path,
    "strict_host_key_checking": _strict,
    "host_key_fingerprint": _fingerprint,
    "connect_timeout": _whole_number(1),
    "retries": _whole_number(1),
    "keep_last": _whole_number(1),
    "keep_days": _whole_number(1),
    "retry_max_wait": _whole_number(1),
    "resume_buffer": _size,
    "io_timeout": _whole_number(1),
    "verify_checksums": parse_bool,
    "fsync": parse_bool,
    "log_dir": _local_path,
    "log_level": _log_level,
    "restore_subset": _restore_subset,
    "fork_server": parse_bool,
    # Up to an hour: a session kept longer than any pause within a backup only holds a login open.
    "session_idle": _whole_number(0, 3600),
    "max_connections": _whole_number(0),
    "fast_path": parse_bool,
    "compression": _compression,
    # zstd's levels; above 19 ("ultra") a level needs far more memory per chunk.
    "compression_level": _whole_number(1, 19),
    "encryption_key_file": _local_path,
    "decryption_key_files": _local_paths,
}
REQUIRED = ("hostname", "remote_dir")
assert set(PARSERS) == {f.name for f in fields(PluginConfig)}, "PARSERS and PluginConfig must list the same options"


def parse_options(options: Mapping[str, OptionText], source: str = "config") -> PluginConfig:
    """Validate an ``options`` mapping of option texts (see `read_options`); raise one ConfigError listing every
    problem."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{source}: 'options' must be a map of key: value", "see plugin.yaml.template")
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in options.items():
        name = str(key)
        if name in GPBACKUP_KEYS:
            continue
        parser = PARSERS.get(name)
        if parser is None:
            import difflib  # only for this message: every call that reads a config would pay for it

            close = difflib.get_close_matches(name, list(PARSERS), n=1)
            problems.append(f"unknown option '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            continue
        if raw is None:
            problems.append(f"option '{name}' has no value")
            continue
        if not isinstance(raw, str):
            if not isinstance(raw, (NotPlain, list, dict)):
                raise TypeError(f"option {name!r}: expected its text as read from YAML, got {type(raw).__name__}")
            problems.append(f"option '{name}': expected a plain value, not a list or map")
            continue
        try:
            values[name] = parser(raw)
        except _Invalid as err:
            problems.append(f"option '{name}': {err}")
    problems += [f"option '{name}' is required" for name in REQUIRED if name not in values and name not in options]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems), "fix the options block (see plugin.yaml.template)")
    return PluginConfig(**values)


def _unclosed(error: Any) -> bool:
    """Whether a YAML error is about something opened at its context mark and never closed (a quote, a bracket,
    a key without its colon): the parser notices only at a later token, often the end of the file, so the line
    where it was opened is the one to look at."""
    context, problem = error.context or "", error.problem or ""
    if context.startswith(("while scanning a simple key", "while parsing a flow")):
        return True
    return context.startswith("while scanning") and ("end of stream" in problem or "document separator" in problem)


def _yaml_error_detail(error: Any, text: str) -> str:
    """Where a YAML error is and what it is, from its marks: never a snippet of the file (it may hold a secret)."""
    problem_mark = getattr(error, "problem_mark", None)
    context_mark = getattr(error, "context_mark", None)
    if problem_mark is None and context_mark is None:
        position = getattr(error, "position", None)  # a ReaderError: a character YAML does not allow
        line = f" at line {text.count(chr(10), 0, position) + 1}" if isinstance(position, int) else ""
        reason = getattr(error, "reason", None)
        return f"{line}: {reason}" if reason else line
    if problem_mark is None or (context_mark is not None and _unclosed(error)):
        detail = f"{error.context}, {error.problem}" if error.problem else str(error.context)
        if problem_mark is not None and problem_mark.line != context_mark.line:
            detail += f" at line {problem_mark.line + 1}"
        mark = context_mark
    else:
        detail, mark = str(error.problem), problem_mark
        if detail.startswith("but ") and error.context:  # "expected a single document ..., but found another"
            detail = f"{error.context}, {detail}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {detail}"


def read_options(path: str) -> dict[str, OptionText]:
    """The ``options`` of a YAML config file as gpbackup reads them: each value's literal text.

    PyYAML's composer gives the nodes before any YAML 1.1 typing, so ``012345``, ``yes``, ``12:30`` and ``1e3``
    stay the text written, as in gpbackup's ``map[string]string``. A plain null (``key:``, ``~``, ``null``) is
    None ("no value"); a list or map is NOT_PLAIN. Only ``options`` is read this way; the rest of the document
    is only checked to be YAML. Raises ConfigError naming the line of a syntax error.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found", "check the --plugin-config path") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}", "check its permissions") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start})", "save it as UTF-8") from None
    return dict(_options_of_text(path, text))  # a copy: the cached one stays as read


# A fork-server worker reads the same config for call after call: composing it costs ~3.7 ms in pure-Python
# PyYAML (libyaml's composer resolves tags differently), so the options of the last few texts are kept.
@functools.lru_cache(maxsize=8)
def _options_of_text(path: str, text: str) -> dict[str, OptionText]:
    import yaml  # deferred: the version commands must not pay for it

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        options = None
        if isinstance(root, yaml.MappingNode):
            found = [value for key, value in root.value if isinstance(key, yaml.ScalarNode) and key.value == "options"]
            options = found[-1] if found else None
        if isinstance(options, yaml.MappingNode):
            yaml.constructor.SafeConstructor().flatten_mapping(options)  # `<<: *anchor` merges, as yaml.v2 does
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {path} is not valid YAML{_yaml_error_detail(err, text)}", "check its indentation and quoting"
        ) from None
    if not isinstance(options, yaml.MappingNode):
        what = "has no 'options' map" if options is None else "has 'options' that is not a map of key: value"
        raise ConfigError(f"config file {path} {what}", "see plugin.yaml.template")
    values: dict[str, OptionText] = {}
    for key, value in options.value:
        if not isinstance(key, yaml.ScalarNode):
            raise ConfigError(
                f"config file {path}: a key under 'options' at line {key.start_mark.line + 1} is a list or map",
                "option names are plain words (see plugin.yaml.template)",
            )
        if not isinstance(value, yaml.ScalarNode):
            values[key.value] = NOT_PLAIN
        elif value.style is None and value.tag == YAML_NULL_TAG:
            values[key.value] = None
        else:
            values[key.value] = value.value
    return values


def load_config(path: str) -> PluginConfig:
    """Read the YAML file gpbackup passed and return its validated options."""
    return parse_options(read_options(path), source=f"config file {path}")
