"""``check <config>``: a preflight of a config against its backup host, one OK/WARN/FAIL/SKIP line per
check; ``check --cluster``: the same on every host of the cluster over ssh (cluster.py), one line per host.

Each check step does the remote work and says what it found through the Report (output.py); file system
usage comes from the statvfs@openssh.com extension (`statvfs`), which paramiko has no call for.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING

from sftp_plugin import PLUGIN_NAME
from sftp_plugin.admin.output import MIB, Report, human_size, throughput
from sftp_plugin.admin.runner import command_parser, parse_args, quiet_logging, raw_secrets
from sftp_plugin.config import SECRET_OPTIONS
from sftp_plugin.errors import AuthError, HostKeyError, PluginError, RemoteError
from sftp_plugin.stderr import fail

if TYPE_CHECKING:
    import paramiko

    from sftp_plugin.config import PluginConfig
    from sftp_plugin.store import Remote

DEFAULT_PROBE_MIB = 8
# Below this much free space the check warns: one segment's data alone is usually more.
LOW_SPACE_WARNING = 1024 * MIB
# The SFTP extension that reports file system usage, and its reply fields (OpenSSH PROTOCOL, section 4.4).
STATVFS_EXTENSION = "statvfs@openssh.com"
STATVFS_FIELDS = ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail", "fsid", "flag", "namemax")
# `check --cluster` without a host file: the hosts come from gp_segment_configuration.
CLUSTER_FROM_CATALOG = "<gp_segment_configuration>"


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


def statvfs(sftp: paramiko.SFTPClient, path: str) -> FsUsage | None:
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


def _print_options(cfg: PluginConfig, config_path: str, secrets: list[str]) -> None:
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
        elif isinstance(value, tuple):
            shown = ", ".join(value) or "(not set)"
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


def _check_free_space(remote: Remote, report: Report, probe_size: int) -> None:
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


def _check_round_trip(remote: Remote, report: Report, size: int) -> None:
    """Write ``size`` random bytes the way backup_data does, read them back, compare, delete."""
    from sftp_plugin import transfer
    from sftp_plugin.store import PROBE_PREFIX

    sftp = remote.sftp
    probe = posixpath.join(remote.cfg.remote_dir, f"{PROBE_PREFIX}.{os.getpid()}.{secrets.token_hex(4)}")
    data = os.urandom(size)
    try:
        started = time.monotonic()
        with transfer.create_private(sftp, probe) as handle:
            writer = transfer.PipelinedWriter(sftp, handle.handle, sync=remote.cfg.fsync)
            writer.write(data)
            writer.sync_and_close(handle)
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
        f"{human_size(size)} probe written at {throughput(size, write_seconds)}, "
        f"read back at {throughput(size, read_seconds)}, identical, deleted",
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


def _check_keys(cfg: PluginConfig, report: Report) -> None:
    """Each configured key file loads (32 bytes, private); its fingerprint, to compare across hosts."""
    from sftp_plugin import keys

    named = [("encryption key", cfg.encryption_key_file)] if cfg.encryption_key_file else []
    named += [("decryption key", path) for path in cfg.decryption_key_files]
    for what, path in named:
        try:
            key = keys.load_key(path)
        except PluginError as err:
            report.fail("keys", err.message, err.hint)
            continue
        report.ok("keys", f"{what} {path}: {keys.fingerprint(key)} (the same on every host?)")


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
    _check_keys(cfg, report)

    log_path = quiet_logging(cfg, "check")
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
            detail = f"{session.endpoint.user} can create and delete files there"
            if cfg.fsync:
                report.ok("writable", detail)
            else:
                report.warn("writable", f"{detail}; fsync: no, so stored files are not flushed to disk there",
                            "set fsync: yes unless the backup host's storage is durable by itself: a crash of the "
                            "backup host soon after a backup can leave files of it empty")

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

    parser = command_parser(
        "check",
        "Check a plugin config against its backup host: options, who can read the config and "
        "keys, connection, host key, authentication, cipher, remote_dir and its mode, creating a backup "
        "directory as setup does, free space and a write/read/delete round trip.",
        config_help="the plugin config file (YAML) given to gpbackup --plugin-config",
    )
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
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    if args.cluster is not None:
        return _check_cluster(args.config, args.cluster, args.probe_mib // MIB, args.parallel)
    report = Report(secrets=raw_secrets(args.config))
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

    hidden = raw_secrets(config_path)
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
