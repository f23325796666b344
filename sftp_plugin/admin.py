"""Commands for the administrator, not for gpbackup: ``check`` (a preflight),
``list-backups``, ``prune`` and ``stop-fork-server``.

They print freely to stdout: they are run by a person (or a script, with
``list-backups --json``), never by gpbackup, so the "nothing on stderr"
contract of the API commands does not bind them. They never show a
traceback: every failure is a line saying what failed and what to do, and
the exit code says whether anything failed. Secrets from the config are
masked in everything printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sftp_plugin import PLUGIN_NAME
from sftp_plugin.config import SECRET_OPTIONS
from sftp_plugin.errors import AuthError, HostKeyError, PluginError, RemoteError, RemoteNotFound
from sftp_plugin.stderr import fail

if TYPE_CHECKING:
    from sftp_plugin.catalog import CatalogEntry
    from sftp_plugin.config import PluginConfig
    from sftp_plugin.paths import BackupDir
    from sftp_plugin.store import Remote

log = logging.getLogger("gpbackup_sftp_plugin")

MIB = 1024 * 1024
DEFAULT_PROBE_MIB = 8
# Below this much free space the check warns: one segment's data alone is usually more.
LOW_SPACE_WARNING = 1024 * MIB
# The SFTP extension that reports file system usage, and its reply fields (OpenSSH PROTOCOL, section 4.4).
STATVFS_EXTENSION = "statvfs@openssh.com"
STATVFS_FIELDS = ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail", "fsid", "flag", "namemax")
# `check --cluster` without a host file: the hosts come from gp_segment_configuration.
CLUSTER_FROM_CATALOG = "<gp_segment_configuration>"


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code when argparse wanted to exit (it has printed why)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2


def _quiet_logging(cfg: Any, command: str) -> str | None:
    """Log to the plugin's log file like every other command; never let a record reach the terminal.

    Returns the log file path, or None when log_dir is not writable (``check`` reports that).
    """
    from sftp_plugin.log import setup_logging

    try:
        return setup_logging(cfg.log_dir, cfg.log_level, command, cfg.secrets())
    except OSError:
        root = logging.getLogger()
        root.handlers[:] = [logging.NullHandler()]
        return None


def _raw_secrets(config_path: str) -> list[str]:
    """Secret values as written in the YAML (the text the plugin uses), to mask them even when the config does
    not validate."""
    from sftp_plugin.config import read_options

    try:
        options = read_options(config_path)
    except Exception:  # noqa: BLE001 - unreadable or invalid: load_config reports it properly
        return []
    return [value for name in SECRET_OPTIONS if isinstance(value := options.get(name), str) and value]


def _with_config(command: str, config_path: str, action: Callable[[PluginConfig], int]) -> int:
    """Load the config, log to the plugin's log, run ``action``: every failure is one line (stderr.fail), never a
    traceback; secrets masked."""
    from sftp_plugin.config import load_config
    from sftp_plugin.log import mask

    try:
        cfg = load_config(config_path)
    except PluginError as err:
        return fail(command, mask(str(err), _raw_secrets(config_path)), err.exit_code)
    _quiet_logging(cfg, command)
    try:
        return action(cfg)
    except PluginError as err:
        log.error("%s failed: %s", command, err)
        return fail(command, mask(str(err), cfg.secrets()), err.exit_code)
    except OSError as err:
        log.error("%s failed: %s", command, err)
        return fail(command, mask(f"{err or type(err).__name__}; check the backup host and the network",
                                  cfg.secrets()), 1)
    except KeyboardInterrupt:
        return fail(command, "interrupted", 130)
    except Exception as err:  # noqa: BLE001 - never a traceback
        log.exception("%s: unexpected failure", command)
        return fail(command, mask(f"unexpected error ({type(err).__name__}: {err})", cfg.secrets()), 1)


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    if seconds < 0:
        return "in future"
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


# --------------------------------------------------------------------------- check


@dataclass
class CheckLine:
    status: str  # OK, WARN, FAIL or SKIP
    name: str
    detail: str
    advice: str = ""


@dataclass
class Report:
    """The check lines, printed as they are made (a slow step shows where it is)."""

    secrets: list[str] = field(default_factory=list)
    lines: list[CheckLine] = field(default_factory=list)

    def add(self, status: str, name: str, detail: str, advice: str = "") -> None:
        from sftp_plugin.log import mask

        line = CheckLine(status, name, mask(detail, self.secrets), mask(advice, self.secrets))
        self.lines.append(line)
        print(f"{line.status:<4}  {line.name:<11} {line.detail}", flush=True)
        if line.advice:
            print(f"{'':<4}  {'':<11} -> {line.advice}", flush=True)

    def ok(self, name: str, detail: str) -> None:
        self.add("OK", name, detail)

    def warn(self, name: str, detail: str, advice: str = "") -> None:
        self.add("WARN", name, detail, advice)

    def fail(self, name: str, detail: str, advice: str) -> None:
        self.add("FAIL", name, detail, advice)

    def skip(self, name: str, why: str) -> None:
        self.add("SKIP", name, why)

    def fail_from(self, name: str, error: BaseException, log_path: str | None) -> None:
        """A FAIL line for any exception: a PluginError's own advice, or a pointer to the log."""
        if isinstance(error, PluginError):
            self.fail(name, error.message, error.hint or "see the message above")
        elif isinstance(error, OSError):
            self.fail(name, str(error) or type(error).__name__, "check the backup host and the network")
        else:
            log.error("check %s: unexpected failure", name, exc_info=error)
            where = f"details in {log_path}" if log_path else "set log_dir to a writable directory for details"
            self.fail(name, f"unexpected error: {type(error).__name__}: {error}", f"please report this; {where}")

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line.status == "FAIL")


@dataclass(frozen=True)
class FsUsage:
    """The statvfs@openssh.com reply, field names as in OpenSSH's PROTOCOL file."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int

    @property
    def total_bytes(self) -> int:
        return self.blocks * self.frsize

    @property
    def available_bytes(self) -> int:
        return self.bavail * self.frsize


def statvfs(sftp: Any, path: str) -> FsUsage | None:
    """File system usage of ``path`` on the server; None when the server lacks the extension.

    paramiko has no public call for it: an extended request (fastpath.sftp).
    """
    from paramiko.sftp import CMD_EXTENDED_REPLY

    from sftp_plugin import transfer
    from sftp_plugin.fastpath.sftp import extended

    try:
        kind, msg = extended(sftp, STATVFS_EXTENSION, path)
    except OSError as err:
        if transfer.extension_unsupported(err):
            return None
        raise
    if kind != CMD_EXTENDED_REPLY:
        raise OSError(f"unexpected reply type {kind} to {STATVFS_EXTENSION}")
    return FsUsage(**{name: msg.get_int64() for name in STATVFS_FIELDS})


def _subset_restores(restore_subset: bool) -> str:
    """What restore_subset means for a filtered gprestore (e.g. --include-table)."""
    if restore_subset:
        return (
            "on: filtered restores of --single-data-file backups read only the byte ranges they need "
            "(uncompressed backups; compressed ones are read whole)"
        )
    return "off: filtered restores of --single-data-file backups stream each segment's whole data file"


def _print_options(cfg: Any, config_path: str, secrets: list[str]) -> None:
    from sftp_plugin.connection import resolve_endpoint
    from sftp_plugin.log import MASK, mask

    print(f"Effective options of {config_path} (defaults filled in, secrets masked):")
    for option in fields(cfg):
        value = getattr(cfg, option.name)
        if value is None:
            shown = "(not set)"
        elif option.name in SECRET_OPTIONS:
            shown = MASK
        elif option.name == "restore_subset":
            shown = "on" if value else "off"  # the only words gprestore and the plugin accept
        elif isinstance(value, bool):
            shown = "yes" if value else "no"
        else:
            shown = str(value)
        print(f"  {option.name:<26} {mask(shown, secrets)}")
    print(f"  {'-> restore_subset':<26} {_subset_restores(cfg.restore_subset)}")
    try:
        endpoint = resolve_endpoint(cfg)
    except PluginError:
        return  # the connect check reports it
    identities = ", ".join(endpoint.identity_files) or "ssh-agent, then the default keys in ~/.ssh"
    print(mask(f"  {'-> connects to':<26} {endpoint} (after ~/.ssh/config), keys: {identities}", secrets))
    if endpoint.route:
        print(mask(f"  {'-> through':<26} {endpoint.route}", secrets))


def _throughput(size: int, seconds: float) -> str:
    return f"{size / MIB / max(seconds, 1e-6):.1f} MiB/s"


def _check_free_space(remote: Any, report: Report, probe_size: int) -> None:
    root = remote.cfg.remote_dir
    usage = statvfs(remote.sftp, root)
    if usage is None:
        report.warn(
            "free space",
            f"the server does not offer {STATVFS_EXTENSION}: free space unknown",
            f"check it on the backup host with: df -h {root}",
        )
        return
    free, total = usage.available_bytes, usage.total_bytes
    percent = 100.0 * free / total if total else 0.0
    detail = f"{human_size(free)} free of {human_size(total)} ({percent:.0f}%) on {remote.where(root)}"
    if usage.files:
        detail += f", {usage.favail} inodes free"
    if free < max(probe_size, 1):
        report.fail("free space", detail, "free space on the backup host's file system, or point remote_dir elsewhere")
    elif usage.files and usage.favail == 0:
        report.fail("free space", detail, "the file system has no free inodes; remove files on the backup host")
    elif free < LOW_SPACE_WARNING:
        report.warn("free space", detail, "a backup needs room for every segment's data; free space first")
    else:
        report.ok("free space", detail)


def _check_round_trip(remote: Any, report: Report, size: int) -> None:
    """Write ``size`` random bytes the way backup_data does, read them back, compare, delete."""
    from sftp_plugin import transfer
    from sftp_plugin.store import PROBE_PREFIX

    sftp = remote.sftp
    probe = posixpath.join(remote.cfg.remote_dir, f"{PROBE_PREFIX}.{os.getpid()}.{secrets.token_hex(4)}")
    data = os.urandom(size)
    try:
        started = time.monotonic()
        with transfer.create_private(sftp, probe) as handle:
            writer = transfer.PipelinedWriter(sftp, handle.handle)
            writer.write(data)
            writer.drain()
            transfer.fsync(sftp, handle.handle)
        write_seconds = time.monotonic() - started
        digest = hashlib.sha256()
        started = time.monotonic()
        with sftp.open(probe, "rb") as handle:
            read = transfer.read_range(sftp, handle.handle, 0, size, digest.update)
        read_seconds = time.monotonic() - started
        sftp.remove(probe)
    except BaseException:
        transfer.remove_quietly(sftp, probe)
        raise
    if read != size or digest.digest() != hashlib.sha256(data).digest():
        report.fail(
            "round trip",
            f"the {human_size(size)} probe file read back differs from what was written",
            "the backup host's storage is corrupting data; do not use it for backups",
        )
        return
    report.ok(
        "round trip",
        f"{human_size(size)} probe written at {_throughput(size, write_seconds)}, "
        f"read back at {_throughput(size, read_seconds)}, identical, deleted",
    )


def _check_secrets(config_path: str, cfg: PluginConfig, report: Report) -> None:
    """WARN for a config holding a secret that every user can read, and for private keys open to others."""
    from sftp_plugin.connection import resolve_endpoint
    from sftp_plugin.permissions import exposures

    key_files: list[str] = [cfg.identity_file] if cfg.identity_file else []
    try:
        key_files += resolve_endpoint(cfg).identity_files  # IdentityFile from ~/.ssh/config too
    except PluginError:
        pass  # a broken ~/.ssh/config: the connect check reports it
    found = exposures(config_path, cfg, key_files)
    for exposure in found:
        report.warn("secrets", exposure.problem, exposure.fix)
    if not found:
        held = [name for name in SECRET_OPTIONS if getattr(cfg, name)]
        what = [f"the config ({' and '.join(held)})"] if held else []
        what += [f"key {key}" for key in dict.fromkeys(key_files)]
        report.ok("secrets", f"readable by no other user: {', '.join(what)}" if what else
                  "no password, passphrase or key file named in the config")


def _check_privacy(remote: Remote, report: Report) -> None:
    """WARN when group or others may list or read remote_dir: the backups below it are the database's data."""
    import stat

    from sftp_plugin import transfer

    root = remote.cfg.remote_dir
    mode = stat.S_IMODE(remote.retrying("look at remote_dir", lambda: remote.sftp.stat(root)).st_mode or 0)
    others = [who for who, bits in (("group", 0o050), ("others", 0o005)) if mode & bits]
    if others:
        report.warn(
            "privacy",
            f"{remote.where(root)} has mode {mode:04o}: {' and '.join(others)} can reach the backups in it "
            f"(what the plugin creates is {transfer.PRIVATE_FILE_MODE:04o}/{transfer.PRIVATE_DIR_MODE:04o}, "
            "but older backups and other tools' files may not be)",
            f"on the backup host: chmod 700 {root}",
        )
    else:
        report.ok("privacy", f"{remote.where(root)} has mode {mode:04o}: only its owner reaches the backups")


def _check_setup(remote: Remote, report: Report) -> None:
    """Do what setup_plugin_for_backup does for the coordinator: create a directory under backups/<today>/;
    then remove exactly what was created (empty directories only), so no backup is ever touched."""
    import stat

    from sftp_plugin import paths, transfer
    from sftp_plugin.store import PROBE_PREFIX, remote_errors

    root = remote.cfg.remote_dir
    date_dir = posixpath.join(root, paths.BACKUPS, datetime.now().strftime("%Y%m%d"))
    # Not a timestamp: list-backups, retention and a concurrent backup's cleanup ignore it.
    probe = posixpath.join(date_dir, f"{PROBE_PREFIX}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with remote_errors(remote, "create a backup directory", probe):
            created = remote.retrying(
                "create a backup directory", lambda: transfer.makedirs(remote.sftp, probe, stop_at=root)
            )
    except RemoteError as err:
        report.fail("setup", f"setup_plugin_for_backup will fail: {err.message}", err.hint)
        return
    try:
        mode = stat.S_IMODE(remote.sftp.stat(probe).st_mode or 0)
    finally:
        for directory in reversed(created):  # innermost first; a directory someone filled meanwhile stays
            transfer.rmdir_if_empty(remote.sftp, directory)
    if mode & 0o077:
        report.warn(
            "setup",
            f"{remote.where(date_dir)}/ takes a backup directory, but the server made it {mode:04o}, "
            f"not {transfer.PRIVATE_DIR_MODE:04o} as asked: it ignores the modes the plugin asks for",
            f"keep remote_dir itself private: chmod 700 {root} on the backup host",
        )
        return
    report.ok("setup", f"created and removed a backup directory in {remote.where(date_dir)}/, "
              "as setup_plugin_for_backup will")


def _check_ssh_config(cfg: PluginConfig, report: Report) -> None:
    """WARN for each ~/.ssh/config option set for the host that would change where or how ssh connects, but that
    the plugin does not honour: ssh and the plugin would connect differently, and nothing else says so."""
    from sftp_plugin.ssh_config_unused import lookup, unused_options

    found = lookup(cfg.hostname)
    if found is None:
        return  # no ~/.ssh/config, or one that cannot be read: the connect check reports that
    for option in unused_options(found, cfg):
        report.warn(
            "ssh_config",
            f"{option.keyword} {option.value} (~/.ssh/config, for {cfg.hostname}) is ignored by the plugin",
            option.instead,
        )


def _run_checks(config_path: str, probe_size: int, report: Report) -> None:
    from sftp_plugin.config import load_config
    from sftp_plugin.connection import fingerprint, resolve_endpoint
    from sftp_plugin.store import Remote, check_writable, require_remote_dir

    try:
        cfg = load_config(config_path)
    except PluginError as err:
        report.fail("config", err.message, err.hint)
        return
    report.secrets = [*report.secrets, *cfg.secrets()]
    _print_options(cfg, config_path, report.secrets)
    print(flush=True)
    report.ok("config", f"{config_path} is valid")
    _check_secrets(config_path, cfg, report)

    log_path = _quiet_logging(cfg, "check")
    if log_path is None:
        from sftp_plugin.log import log_file_path

        report.fail(
            "log_dir",
            f"cannot write the log file {log_file_path(cfg.log_dir)}",
            "create log_dir writable for this user, or set log_dir elsewhere; every plugin call logs there",
        )
    else:
        report.ok("log_dir", f"plugin calls log to {log_path}")
    _check_ssh_config(cfg, report)

    # One attempt only: a person waiting on a preflight wants the first error, not a minute of backoff.
    remote = Remote(replace(cfg, retries=1))
    try:
        try:
            endpoint = resolve_endpoint(cfg)
            session = remote.session
        except HostKeyError as err:
            report.ok("connect", f"SSH handshake with {endpoint.host}:{endpoint.port} done")
            report.fail("host key", err.message, err.hint)
            report.skip("auth", "not attempted: no credential is sent to an unverified host")
            return
        except AuthError as err:
            report.ok("connect", f"SSH handshake with {endpoint.host}:{endpoint.port} done")
            report.ok("host key", "verified before authentication")
            report.fail("auth", err.message, err.hint)
            return
        except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL line
            report.fail_from("connect", err, log_path)
            return
        transport = session.transport
        report.ok("connect", f"{session.endpoint}, server {transport.remote_version}")
        key = transport.get_remote_server_key()
        key_text = f"{key.get_name()} {fingerprint(key)}"
        if session.host_key_status.startswith("not verified"):
            report.warn(
                "host key",
                f"{key_text}, {session.host_key_status}",
                f"pin it: host_key_fingerprint: {fingerprint(key)} (after checking it on the backup host "
                "with ssh-keygen -lf), or add it to known_hosts_file",
            )
        else:
            report.ok("host key", f"{key_text}, verified by {session.host_key_status}")
        report.ok("auth", f"{session.auth_method} as {session.endpoint.user}")
        integrity = (
            "authenticated encryption" if session.cipher.endswith("-gcm@openssh.com") else f"MAC {transport.remote_mac}"
        )
        report.ok("cipher", f"{session.cipher} ({integrity})")

        def remote_dir_exists() -> None:
            require_remote_dir(remote)
            report.ok("remote_dir", f"{remote.where(cfg.remote_dir)} is a directory")

        def writable() -> None:
            check_writable(remote)
            report.ok("writable", f"{session.endpoint.user} can create and delete files there")

        steps: list[tuple[str, Callable[[], None]]] = [
            ("remote_dir", remote_dir_exists),
            ("privacy", lambda: _check_privacy(remote, report)),
            ("writable", writable),
            ("setup", lambda: _check_setup(remote, report)),
            ("free space", lambda: _check_free_space(remote, report, probe_size)),
        ]
        if probe_size:
            steps.append(("round trip", lambda: _check_round_trip(remote, report, probe_size)))
        for index, (name, step) in enumerate(steps):
            try:
                step()
            except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL line
                report.fail_from(name, err, log_path)
                if name in ("remote_dir", "writable"):
                    for later, _ in steps[index + 1 :]:
                        report.skip(later, f"needs a writable remote_dir ({name} failed)")
                    return
    finally:
        remote.close_quietly()


def _probe_mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB, got {text!r}") from None
    if not 0 <= value <= 4096:
        raise argparse.ArgumentTypeError("must be between 0 and 4096")
    return value * MIB


def _hosts_at_once(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of hosts, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def check(argv: list[str]) -> int:
    """``check <config> [--probe-mib N] [--cluster [HOSTFILE]]``: preflight of a config, one OK/WARN/FAIL line per
    check; or, with --cluster, one summary line per host of the cluster."""
    from sftp_plugin import cluster

    parser = argparse.ArgumentParser(
        prog=f"{PLUGIN_NAME} check",
        description="Check a plugin config against its backup host: options, who can read the config and "
        "keys, connection, host key, authentication, cipher, remote_dir and its mode, creating a backup "
        "directory as setup does, free space and a write/read/delete round trip.",
    )
    parser.add_argument("config", help="the plugin config file (YAML) given to gpbackup --plugin-config")
    parser.add_argument(
        "--probe-mib",
        type=_probe_mib,
        default=DEFAULT_PROBE_MIB * MIB,
        metavar="N",
        help=f"size of the round-trip probe file in MiB (default {DEFAULT_PROBE_MIB}; 0 skips it)",
    )
    parser.add_argument(
        "--cluster",
        nargs="?",
        const=CLUSTER_FROM_CATALOG,
        metavar="HOSTFILE",
        help="run check on every host over ssh (BatchMode, plus $SSH_OPTS) with a copy of the config, one summary "
        "line per host: the hosts in HOSTFILE (one per line, # comments), or without it those psql finds in "
        "gp_segment_configuration",
    )
    parser.add_argument(
        "--parallel", type=_hosts_at_once, default=cluster.PARALLEL, metavar="N",
        help=f"with --cluster: hosts checked at once (default {cluster.PARALLEL})",
    )
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    if args.cluster is not None:
        return _check_cluster(args.config, args.cluster, args.probe_mib // MIB, args.parallel)
    report = Report(secrets=_raw_secrets(args.config))
    print(f"{PLUGIN_NAME} check {args.config}", flush=True)
    try:
        _run_checks(args.config, args.probe_mib, report)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - never a traceback
        report.fail_from("check", err, None)
    print()
    total = len(report.lines)
    if report.failed:
        print(f"{report.failed} of {total} checks FAILED: fix them (see the -> lines) and run check again.")
        return 1
    warned = sum(1 for line in report.lines if line.status == "WARN")
    print(f"All checks passed{f' ({warned} with warnings)' if warned else ''}: this config is ready for gpbackup.")
    return 0


def _check_cluster(config_path: str, host_file: str, probe_mib: int, parallel: int) -> int:
    """``check --cluster``: the config validated here once, then checked on every host (cluster.py)."""
    from sftp_plugin import cluster
    from sftp_plugin.config import load_config
    from sftp_plugin.errors import ConfigError
    from sftp_plugin.log import mask

    hidden = _raw_secrets(config_path)
    try:
        load_config(config_path)
        try:
            with open(config_path, "rb") as handle:
                config = handle.read()
        except OSError as err:
            raise ConfigError(f"cannot read config file {config_path}: {err.strerror or err}",
                              "check its permissions") from None
        hosts = cluster.read_host_file(host_file) if host_file != CLUSTER_FROM_CATALOG else cluster.hosts_from_catalog()
        print(f"{PLUGIN_NAME} check {config_path} on {len(hosts)} host{'s' if len(hosts) != 1 else ''} over ssh, "
              f"{min(parallel, len(hosts))} at a time:", flush=True)
        width = max(map(len, hosts))
        failed = 0
        for result in cluster.check_hosts(hosts, config, probe_mib, parallel):
            failed += not result.ok
            print(mask(f"  {result.host:<{width}}  {result.summary}", hidden), flush=True)
    except PluginError as err:
        return fail("check", mask(str(err), hidden), err.exit_code)
    except KeyboardInterrupt:
        return fail("check", "interrupted", 130)
    print()
    if failed:
        print(f"{failed} of {len(hosts)} hosts FAILED: run '{PLUGIN_NAME} check {config_path}' on "
              f"{'it' if failed == 1 else 'each'} for the details.")
        return 1
    print(f"All {len(hosts)} hosts passed check.")
    return 0


# --------------------------------------------------------------------------- list-backups


@dataclass
class BackupSummary:
    timestamp: str
    path: str
    files: int
    bytes: int
    age_seconds: int
    temporary_files: list[str]
    has_report: bool
    report_status: str | None = None  # what the report says ("Success", "Failure"); None without one
    config_status: str | None = None  # what gpbackup's config.yaml says; None without one
    database: str | None = None  # the database backed up; None when unknown
    # The other backups a restore of this one reads (an incremental's full backup and the
    # incrementals before it); [] for a full backup, None when unknown (no readable config.yaml).
    needs: list[str] | None = None
    # Stored files whose size differs from what their checksum files record, or that are gone.
    damaged_files: list[str] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        from sftp_plugin.catalog import SUCCESS

        found: list[str] = []
        if self.temporary_files:
            count = len(self.temporary_files)
            found.append(f"{count} leftover temporary file{'s' if count != 1 else ''} (an interrupted upload)")
        if not self.has_report:
            found.append("no coordinator report (gpbackup did not finish)")
        elif self.report_status != SUCCESS:
            found.append(f"gpbackup reported it as {self.report_status or 'without a status'}")
        if self.config_status not in (None, SUCCESS):
            found.append(f"its config.yaml says {self.config_status}")
        found += self.damaged_files
        return found

    @property
    def complete(self) -> bool:
        return not self.reasons

    @property
    def state(self) -> str:
        return "complete" if self.complete else "incomplete: " + "; ".join(self.reasons)

    def as_json(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "path": self.path,
            "files": self.files,
            "bytes": self.bytes,
            "age_seconds": self.age_seconds,
            "complete": self.complete,
            "state": "complete" if self.complete else "incomplete",
            "reasons": self.reasons,
            "temporary_files": self.temporary_files,
            "has_report": self.has_report,
            "report_status": self.report_status,
            "config_status": self.config_status,
            "database": self.database,
            "needs": self.needs,
            "damaged_files": self.damaged_files,
        }


def summarize(
    timestamp: str, path: str, entries: list[tuple[str, int]], now: datetime, entry: CatalogEntry | None = None
) -> BackupSummary:
    """One backup from its file listing (relative paths and sizes) and its catalog entry (report and config)."""
    from sftp_plugin import paths
    from sftp_plugin.catalog import report_name
    from sftp_plugin.integrity import is_checksum_file

    names = [posixpath.basename(name) for name, _ in entries]
    temporary = sorted(name for name in names if paths.is_temp_name(name))
    data_files = [name for name in names if not paths.is_temp_name(name) and not is_checksum_file(name)]
    started = datetime.strptime(timestamp, "%Y%m%d%H%M%S")  # gpbackup timestamps are the coordinator's local time
    return BackupSummary(
        timestamp=timestamp,
        path=path,
        files=len(data_files),
        bytes=sum(size for _, size in entries),
        age_seconds=int((now - started).total_seconds()),
        temporary_files=temporary,
        has_report=report_name(paths.BackupDir(timestamp[:8], timestamp)) in names,
        report_status=entry.report_status if entry is not None else None,
        config_status=entry.config_status if entry is not None else None,
        database=entry.database if entry is not None else None,
        needs=entry.needs if entry is not None else None,
    )


def _needs_column(needs: list[str] | None) -> str:
    if needs is None:
        return "?"
    return ",".join(needs) or "-"


def _print_table(host: str, root: str, backups: list[BackupSummary]) -> None:
    if not backups:
        print(f"No backups under {host}:{posixpath.join(root, 'backups')}")
        return
    rows = [("TIMESTAMP", "DATABASE", "FILES", "SIZE", "AGE", "NEEDS", "STATE")]
    rows += [
        (b.timestamp, b.database or "?", str(b.files), human_size(b.bytes), human_age(b.age_seconds),
         _needs_column(b.needs), b.state)
        for b in backups
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    # Text left-aligned, numbers right-aligned; the last column (free text) is not padded.
    right_aligned = {2, 3, 4}
    for row in rows:
        cells = [cell.rjust(width) if i in right_aligned else cell.ljust(width) for i, (cell, width) in
                 enumerate(zip(row, widths))]
        print("  ".join([*cells, row[-1]]))
    incomplete = sum(1 for b in backups if not b.complete)
    total = sum(b.bytes for b in backups)
    print(
        f"\n{len(backups)} backup{'s' if len(backups) != 1 else ''}, {human_size(total)} on "
        f"{host}:{root}; {incomplete} incomplete"
    )


def list_backups(argv: list[str]) -> int:
    """``list-backups <config> [--json]``: the backups on the host, their size, age and completeness."""
    parser = argparse.ArgumentParser(
        prog=f"{PLUGIN_NAME} list-backups",
        description="List the backups stored on the backup host: timestamp, database, files, total size, age, the "
        "backups an incremental one needs, and whether each is complete.",
    )
    parser.add_argument("config", help="the plugin config file (YAML)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args

    def show(cfg: PluginConfig) -> int:
        summaries = _collect(cfg)
        if args.json:
            document = {
                "host": cfg.hostname,
                "remote_dir": cfg.remote_dir,
                "backups": [summary.as_json() for summary in summaries],
            }
            print(json.dumps(document, indent=2))
        else:
            _print_table(cfg.hostname, cfg.remote_dir, summaries)
        return 0

    return _with_config("list-backups", args.config, show)


def _collect(cfg: Any) -> list[BackupSummary]:
    from sftp_plugin import catalog, transfer
    from sftp_plugin.store import Remote, remote_errors

    # Two attempts at most: enough for a dropped handshake, short enough for a person waiting.
    remote = Remote(replace(cfg, retries=min(cfg.retries, 2)))
    try:
        now = datetime.now()
        summaries: list[BackupSummary] = []
        for backup in catalog.list_backup_dirs(remote):
            path = backup.remote(cfg.remote_dir)
            try:
                with remote_errors(remote, "list backup", path):
                    entries = transfer.walk_files(remote.sftp, path)
            except RemoteNotFound:
                continue  # deleted (delete_backup, retention) since we listed the backups
            # The listing says which of report and config.yaml exist: no read of an absent one.
            entry = catalog.read_entry(remote, backup, present={name for name, _ in entries})
            summary = summarize(backup.timestamp, path, entries, now, entry)
            summary.damaged_files = _size_problems(remote, path, dict(entries))
            summaries.append(summary)
        return summaries
    finally:
        remote.close_quietly()


def _size_problems(remote: Remote, directory: str, sizes: dict[str, int]) -> list[str]:
    """Files that are gone though their checksum is stored, or whose size differs from the size their
    block digests record (files longer than one block); one header read per such file, no data read."""
    from sftp_plugin import blocks, transfer
    from sftp_plugin.integrity import missing_data_files

    found = [f"{name} is missing (its checksum is stored)" for name in missing_data_files(sizes)]
    for name in sorted(n for n in sizes if blocks.is_blocks_file(n)):
        data = name[: -len(blocks.BLOCKS_SUFFIX)]
        if data not in sizes:
            continue  # reported above, through its sidecar
        path = posixpath.join(directory, name)
        head = remote.retrying(
            "read block digests", lambda p=path: transfer.read_small(remote.sftp, p, blocks.HEADER_SIZE)
        )
        try:
            recorded = blocks.parse_header(head or b"").size
        except blocks.BlocksFormatError:
            found.append(f"{name} is damaged")
            continue
        if recorded != sizes[data]:
            found.append(f"{data} holds {sizes[data]} bytes, {recorded} were backed up")
    return found


# --------------------------------------------------------------------------- prune


def prune(argv: list[str]) -> int:
    """``prune <config> [--dry-run]``: retention on demand, the decision cleanup makes after each backup."""
    parser = argparse.ArgumentParser(
        prog=f"{PLUGIN_NAME} prune",
        description="Apply the config's keep_last and keep_days to the backups on the backup host now, as the "
        "cleanup at the end of every backup does: one KEEP or DELETE line per backup with the reasons, then "
        "the deleting.",
    )
    parser.add_argument("config", help="the plugin config file (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the decisions only; delete nothing")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args

    def run(cfg: PluginConfig) -> int:
        if cfg.keep_last is None and cfg.keep_days is None:
            print(f"Neither keep_last nor keep_days is set in {args.config}: nothing is pruned.")
            return 0
        return _prune(cfg, args.dry_run)

    return _with_config("prune", args.config, run)


def _prune(cfg: Any, dry_run: bool) -> int:
    from sftp_plugin import catalog, retention
    from sftp_plugin.log import mask
    from sftp_plugin.store import Remote, delete_backup_dir

    remote = Remote(replace(cfg, retries=min(cfg.retries, 2)))
    try:
        where = remote.where(posixpath.join(cfg.remote_dir, "backups"))
        entries = catalog.read_catalog(remote)
        if not entries:
            print(f"No backups under {where}: nothing to prune.")
            return 0
        decisions = retention.decide([e.facts() for e in entries], cfg.keep_last, cfg.keep_days, datetime.now())
        rules = ", ".join(f"{name}: {value}" for name, value in (("keep_last", cfg.keep_last),
                                                                 ("keep_days", cfg.keep_days)) if value is not None)
        print(f"{len(decisions)} backup{'s' if len(decisions) != 1 else ''} under {where}, {rules}:")
        width = max(len(d.database or "?") for d in decisions)
        for decision in decisions:
            print(f"{decision.action:<6}  {decision.backup.timestamp}  {decision.database or '?':<{width}}  "
                  f"{'; '.join(decision.reasons)}")
        doomed = [d for d in decisions if not d.keep]
        if dry_run:
            print(f"\nDry run: {len(doomed)} would be deleted; nothing was deleted.")
            return 0
        if not doomed:
            print("\nNothing to delete.")
            return 0
        print()
        failed = 0
        for decision in doomed:
            try:
                files = delete_backup_dir(remote, decision.backup, reason="prune: " + "; ".join(decision.reasons))
            except RemoteError as err:  # the server refused this one; the others may still go
                failed += 1
                log.error("prune could not delete backup %s: %s", decision.backup.timestamp, err)
                print(mask(f"FAILED to delete {decision.backup.timestamp}: {err}", cfg.secrets()))
                continue
            print(f"deleted {decision.backup.timestamp} ({files} file{'s' if files != 1 else ''})")
        if failed:
            return fail("prune", f"{failed} of {len(doomed)} backups could not be deleted (see above)", 1)
        print(f"\nDeleted {len(doomed)} of {len(decisions)} backups.")
        return 0
    finally:
        remote.close_quietly()


def stop_fork_server(argv: list[str]) -> int:
    """``stop-fork-server``: stop this user's fork servers; calls in flight finish undisturbed."""
    parser = argparse.ArgumentParser(
        prog=f"{PLUGIN_NAME} stop-fork-server",
        description="Stop the current user's plugin fork servers (they also exit by themselves after a minute "
        "without calls). Calls in flight are not interrupted.",
    )
    parsed = _parse(parser, argv)
    if isinstance(parsed, int):
        return parsed
    from sftp_plugin import forkserver

    try:
        stopped = forkserver.stop_servers()
    except OSError as err:
        return fail("stop-fork-server", f"{err}; check the permissions of {forkserver.runtime_dir()}", 1)
    for pid in stopped:
        print(f"stopped fork server pid {pid}")
    if not stopped:
        print("no fork server was running")
    return 0


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyTally:
    """What verify found in one backup."""

    files: int = 0
    verified: int = 0
    bytes: int = 0
    problems: int = 0


def verify(argv: list[str]) -> int:
    """``verify <config> <timestamp> | --all``: re-read stored files over SFTP and check them against their digests."""
    parser = argparse.ArgumentParser(
        prog=f"{PLUGIN_NAME} verify",
        description="Re-read every file of a backup from the backup host and check its size and checksums, exactly "
        "as a restore would: one line per damaged, missing or unverifiable file, then a summary per backup. "
        "Exits 1 if anything is wrong.",
    )
    parser.add_argument("config", help="the plugin config file (YAML)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("timestamp", nargs="?", help="the backup to verify (14 digits, as gprestore --timestamp)")
    which.add_argument("--all", action="store_true", help="verify every backup under remote_dir")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    timestamp = None if args.all else args.timestamp
    return _with_config("verify", args.config, lambda cfg: _verify(replace(cfg, verify_checksums=True), timestamp))


def _verify(cfg: Any, timestamp: str | None) -> int:
    from sftp_plugin import catalog, paths
    from sftp_plugin.store import Remote

    remote = Remote(cfg)
    try:
        if timestamp is not None:
            backups = [paths.parse_timestamp(timestamp.strip("\"'"))]
        else:
            backups = catalog.list_backup_dirs(remote)
            if not backups:
                print(f"No backups under {remote.where(posixpath.join(cfg.remote_dir, paths.BACKUPS))}")
                return 0
        problems = 0
        for backup in backups:
            problems += _verify_backup(remote, backup)
        if len(backups) > 1:
            print(f"\n{len(backups)} backups verified: {'all good' if not problems else f'{problems} problems'}")
        return 1 if problems else 0
    finally:
        remote.close_quietly()


def _verify_backup(remote: Remote, backup: BackupDir) -> int:
    """Check every file of one backup; print a line per problem and a summary; return the problem count."""
    from sftp_plugin import paths, transfer
    from sftp_plugin.catalog import report_name
    from sftp_plugin.errors import IntegrityError, RemoteError
    from sftp_plugin.integrity import SIDECAR_SUFFIX, is_checksum_file, missing_data_files
    from sftp_plugin.store import read_stored, remote_errors

    directory = backup.remote(remote.cfg.remote_dir)
    try:
        with remote_errors(remote, "list backup", directory):
            entries = dict(remote.retrying("list backup", lambda: transfer.walk_files(remote.sftp, directory)))
    except RemoteNotFound:
        print(f"MISSING  backup {backup.timestamp}: {remote.where(directory)} does not exist")
        return 1
    tally = VerifyTally()

    def problem(kind: str, name: str, what: str) -> None:
        tally.problems += 1
        print(f"{kind:<8} {backup.timestamp}/{name}: {what}")

    data = sorted(n for n in entries if not paths.is_temp_name(posixpath.basename(n)) and not is_checksum_file(n))
    for name in missing_data_files(entries):
        problem("MISSING", name, "its checksum is stored, the file is not")
    if report_name(backup) not in entries:
        problem("MISSING", report_name(backup), "no coordinator report: gpbackup did not finish this backup")
    for name in data:
        tally.files += 1
        if name + SIDECAR_SUFFIX not in entries:
            problem("NOCHECK", name, "no checksum stored (verify_checksums was off, or the sidecar was removed)")
            continue
        try:
            read_stored(remote, posixpath.join(directory, name), lambda _data: None)
        except (IntegrityError, RemoteError) as err:
            problem("DAMAGED", name, err.message)
            continue
        tally.verified += 1
        tally.bytes += entries[name]
    for name in sorted(n for n in entries if paths.is_temp_name(posixpath.basename(n))):
        print(f"{'NOTE':<8} {backup.timestamp}/{name}: an interrupted upload's leftover (cleanup removes it)")
    verdict = "OK" if not tally.problems else f"{tally.problems} problem{'s' if tally.problems != 1 else ''}"
    print(f"backup {backup.timestamp}: {verdict}; {tally.verified} of {tally.files} files verified "
          f"({human_size(tally.bytes)}) on {remote.where(directory)}")
    return tally.problems
