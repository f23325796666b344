"""Load and validate the plugin's YAML configuration into a frozen, typed object.

gpbackup re-serialises every value under ``options`` as a string before the
plugin sees it (``port: 22`` arrives as ``"22"``, ``on`` may arrive as
``"true"``), so every parser here takes native YAML values and their string
forms alike. Keys gpbackup adds itself are accepted and ignored; any other
unknown key is an error that suggests the closest valid one. All problems are
reported together in one message, so one edit fixes the file.
"""

from __future__ import annotations

import getpass
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sftp_plugin.errors import ConfigError

STRICT_CHOICES = ("yes", "accept-new", "no")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Keys gpbackup/gprestore write into the per-host copy of the config; never ours to reject.
GPBACKUP_KEYS = frozenset({"pgport", "backup_plugin_version"})
FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}=?")
MIB = 1024 * 1024
# Smallest resume buffer: one local read (1 MiB) must fit, or nothing could be resent.
MIN_RESUME_BUFFER = MIB
# Largest: one plugin process per segment runs at once; more than 4 GiB each is
# surely a unit mistake (a bare number means MiB, not bytes).
MAX_RESUME_BUFFER = 4096 * MIB
SIZE_RE = re.compile(r"(\d+)\s*([kmg]i?b?)?", re.IGNORECASE)
SIZE_UNITS = {"k": 1024, "m": MIB, "g": 1024 * MIB}
# Options whose values are masked in every log line and message.
SECRET_OPTIONS = ("password", "identity_passphrase")
TRUE_WORDS = frozenset({"yes", "on", "true", "1", "y"})
FALSE_WORDS = frozenset({"no", "off", "false", "0", "n"})


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
    log_dir: str = "~/gpAdminLogs"
    log_level: str = "info"
    restore_subset: bool = False
    fork_server: bool = True

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line or a message."""
        return [value for value in (getattr(self, name) for name in SECRET_OPTIONS) if value]

    def effective_username(self) -> str:
        return self.username or getpass.getuser()


class _Invalid(ValueError):
    """One option's value is unusable; the text says what is expected."""


def _text(value: Any) -> str:
    if isinstance(value, (bool, int, float, str)):
        return str(value).strip()
    raise _Invalid("expected a plain value, not a list or map")


def _non_empty(value: Any) -> str:
    text = _text(value)
    if not text:
        raise _Invalid("must not be empty")
    return text


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise _Invalid("expected a whole number")
        try:
            number = int(_text(value))
        except ValueError:
            raise _Invalid(f"expected a whole number, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise _Invalid(f"must be {bound}, got {number}")
        return number

    return parse


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = _text(value).lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _Invalid(f"expected yes/no, on/off or true/false, got {value!r}")


def _strict(value: Any) -> str:
    # YAML 1.1 reads a bare `yes`/`no` as a boolean, and gpbackup passes it on as "true"/"false".
    if isinstance(value, bool):
        return "yes" if value else "no"
    word = _text(value).lower()
    if word in TRUE_WORDS:
        return "yes"
    if word in FALSE_WORDS:
        return "no"
    if word == "accept-new":
        return word
    raise _Invalid(f"expected one of {', '.join(STRICT_CHOICES)}, got {value!r}")


def _remote_dir(value: Any) -> str:
    text = _non_empty(value)
    if not text.startswith("/"):
        raise _Invalid(f"must be an absolute path, got {text!r}")
    if ".." in text.split("/"):
        raise _Invalid("must not contain '..'")
    return posixpath.normpath(text)


def _local_path(value: Any) -> str:
    return os.path.expanduser(_non_empty(value))


def _fingerprint(value: Any) -> str:
    text = _non_empty(value)
    if not FINGERPRINT_RE.fullmatch(text):
        raise _Invalid("expected SHA256:<43 base64 characters>, as `ssh-keygen -lf` prints it")
    return text.rstrip("=")


def _size(value: Any) -> int:
    """A byte size: a bare number means MiB; K/M/G suffixes (binary, optional 'iB') are accepted."""
    match = SIZE_RE.fullmatch(_text(value))
    if not match:
        raise _Invalid(f"expected a size such as 64, 64MiB or 1GiB, got {value!r}")
    unit = (match.group(2) or "m")[0].lower()
    size = int(match.group(1)) * SIZE_UNITS[unit]
    if size < MIN_RESUME_BUFFER or size > MAX_RESUME_BUFFER:
        raise _Invalid(f"must be between 1MiB and 4GiB (a bare number means MiB), got {value!r}")
    return size


def _log_level(value: Any) -> str:
    word = _text(value).lower()
    if word not in LOG_LEVELS:
        raise _Invalid(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return word


# The single table of options: name -> parser. Defaults live on PluginConfig.
PARSERS: dict[str, Callable[[Any], Any]] = {
    "hostname": _non_empty,
    "remote_dir": _remote_dir,
    "port": _int_at_least(1, 65535),
    "username": _non_empty,
    "identity_file": _local_path,
    "identity_passphrase": _text,
    "password": _text,
    "known_hosts_file": _local_path,
    "strict_host_key_checking": _strict,
    "host_key_fingerprint": _fingerprint,
    "connect_timeout": _int_at_least(1),
    "retries": _int_at_least(1),
    "keep_last": _int_at_least(1),
    "keep_days": _int_at_least(1),
    "retry_max_wait": _int_at_least(1),
    "resume_buffer": _size,
    "io_timeout": _int_at_least(1),
    "verify_checksums": parse_bool,
    "log_dir": _local_path,
    "log_level": _log_level,
    "restore_subset": parse_bool,
    "fork_server": parse_bool,
}
REQUIRED = ("hostname", "remote_dir")
assert set(PARSERS) == {f.name for f in fields(PluginConfig)}, "PARSERS and PluginConfig must list the same options"


def parse_options(options: Any, source: str = "config") -> PluginConfig:
    """Validate an ``options`` mapping; raise one ConfigError listing every problem."""
    if not isinstance(options, dict):
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
        try:
            values[name] = parser(raw)
        except _Invalid as err:
            problems.append(f"option '{name}': {err}")
    problems += [f"option '{name}' is required" for name in REQUIRED if name not in values and name not in options]
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems), "fix the options block (see plugin.yaml.template)")
    return PluginConfig(**values)


def load_config(path: str) -> PluginConfig:
    """Read the YAML file gpbackup passed and return its validated options."""
    import yaml  # deferred: the version commands must not pay for it

    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found", "check the --plugin-config path") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}", "check its permissions") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}", "check its indentation and quoting") from None
    if not isinstance(document, dict) or "options" not in document:
        raise ConfigError(f"config file {path} has no 'options' map", "see plugin.yaml.template")
    return parse_options(document["options"], source=f"config file {path}")
