"""Host keys as strict as OpenSSH's (HostKeyAlias, patterns, @revoked, @cert-authority, other key types), and the
way to the backup host through ProxyJump and ProxyCommand.

Unit tests of hostkeys.py and proxy.py's parsing, then behaviour tests of the installed plugin against real
sshds: a second sshd, with host keys of its own, plays the man in the middle (known_hosts files the first
server's key under the host:port the plugin connects to), or the jump host in front of the backup host.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from devtools.faultproxy import Direction, FaultProxy, Plan
from devtools.gpbackup import LocalBackup
from devtools.harness import RUN_TIMEOUT, Plugin, SiteConfig
from devtools.sshd import SshServer, free_port, keygen, known_hosts_line
from sftp_plugin import hostkeys, proxy
from sftp_plugin.errors import HostKeyError
from tests.helpers import sshd_fixture, wait_until

MIB = 1024 * 1024
# A download long enough to be mid-stream when the link to the jump host stalls after STALL_AFTER bytes.
STREAM_SIZE = 8 * MIB
STALL_AFTER = 2 * MIB
# Longer than any wait on the stalled link could last in the test: the call must end because of the
# interrupt, not because io_timeout ran out.
PATIENT_IO_TIMEOUT = 10 * RUN_TIMEOUT

# ---------------------------------------------------------------- unit: known_hosts as OpenSSH reads it


def public_key(path: Path) -> tuple[str, str, paramiko.PKey]:
    """(type, base64, key) of the public half of an ssh-keygen key file."""
    kind, body = path.with_suffix(".pub").read_text().split()[:2]
    return kind, body, paramiko.PKey.from_type_string(kind, base64.b64decode(body))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, paramiko.PKey]]:
    directory = tmp_path_factory.mktemp("keys")
    return {name: public_key(keygen(directory / name, kind))
            for name, kind in (("server", "ed25519"), ("other", "ed25519"), ("ecdsa", "ecdsa"), ("rsa", "rsa"))}


def known(*lines: str) -> hostkeys.KnownHosts:
    return hostkeys.KnownHosts.parse("/k/known_hosts", [line + "\n" for line in lines])


def line(names: str, key: tuple[str, str, paramiko.PKey], marker: str = "") -> str:
    return f"{marker} {names} {key[0]} {key[1]}".strip()


def host(name: str = "[127.0.0.1]:2222", alias: str | None = None) -> hostkeys.Host:
    return hostkeys.Host(alias or name, "127.0.0.1", 2222, alias)


@pytest.mark.parametrize(("name", "pattern", "expected"), [
    ("[127.0.0.1]:2222", "[127.0.0.*]:2222", True),  # brackets are literal, not a character class
    ("[127.0.0.1]:2222", "[127.0.0.?]:2222", True),
    ("[127.0.0.10]:2222", "[127.0.0.?]:2222", False),
    ("[127.0.0.1]:22222", "[127.0.0.*]:2222", False),
    ("backup.example.com", "*.example.com", True),
    ("backup.example.com", "*.EXAMPLE.com", True),  # host names compare without case, as ssh compares them
    ("example.com", "*.example.com", False),
    ("1", "[1]", False),
])
def test_a_host_pattern_matches_as_openssh_matches_it(name: str, pattern: str, expected: bool) -> None:
    assert hostkeys.pattern_matches(name, pattern) is expected


def test_a_negated_pattern_rules_the_line_out_whatever_else_matches() -> None:
    assert hostkeys.names_match("good.example.com", "*.example.com,!bad.example.com")
    assert not hostkeys.names_match("bad.example.com", "*.example.com,!bad.example.com")
    assert not hostkeys.names_match("bad.example.com", "!bad.example.com,bad.example.com")
    assert not hostkeys.names_match("other.org", "!bad.example.com")  # a negation alone matches nothing


def test_hashed_names_match_their_host_only() -> None:
    hashed = paramiko.HostKeys.hash_host("[127.0.0.1]:2222")
    assert hostkeys.names_match("[127.0.0.1]:2222", hashed)
    assert not hostkeys.names_match("[127.0.0.1]:2223", hashed)
    assert hostkeys.names_match("[127.0.0.1]:2222", f"other.example.com,{hashed}")
    assert not hostkeys.names_match("[127.0.0.1]:2222", "|1|bm90IGEgc2FsdA==|eA==")  # a malformed hash


def test_the_name_a_host_is_filed_under_is_lower_case_with_the_port_unless_22() -> None:
    assert hostkeys.known_hosts_name("Backup.Example.com", 22) == "backup.example.com"
    assert hostkeys.known_hosts_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_marker_lines_are_read_and_broken_lines_skipped_without_failing(keys: dict) -> None:
    server, ecdsa = keys["server"], keys["ecdsa"]
    table = known(
        "# a comment",
        "",
        line("[127.0.0.1]:2222", server),
        line("*", ecdsa, "@revoked"),
        line("*.example.com", server, "@cert-authority"),
        line("[127.0.0.1]:2222", server, "@unknown-marker"),
        f"[127.0.0.1]:2222 {server[0]} !!not-base64!!",
        f"[127.0.0.1]:2222 ssh-rsa {server[1]}",  # the blob says ssh-ed25519: OpenSSH refuses such a line
        "[127.0.0.1]:2222 ssh-ed25519",
    )
    assert [e.marker for e in table.entries] == ["", hostkeys.MARKER_REVOKED, hostkeys.MARKER_CERT_AUTHORITY]
    assert table.skipped == (6, 7, 8, 9)
    entries = table.lookup("[127.0.0.1]:2222")
    assert [e.line for e in entries.keys] == [3] and [e.line for e in entries.revoked] == [4]
    assert entries.authorities == ()
    assert [e.line for e in table.lookup("backup.example.com").authorities] == [5]


def test_a_key_of_a_type_paramiko_cannot_load_still_makes_its_host_known(keys: dict) -> None:
    # A security-key host key: paramiko has no class for it, OpenSSH reads it (and refuses another key as CHANGED).
    blob = paramiko.Message()
    blob.add_string("sk-ssh-ed25519@openssh.com")
    blob.add_string(b"\x01" * 32)
    blob.add_string("ssh:")
    body = base64.b64encode(blob.asbytes()).decode()
    table = known(f"[127.0.0.1]:2222 sk-ssh-ed25519@openssh.com {body}")
    assert table.lookup("[127.0.0.1]:2222").key_types() == ["sk-ssh-ed25519@openssh.com"]
    with pytest.raises(HostKeyError, match="CHANGED"):
        hostkeys.verify(table, host(), keys["server"][2], "SHA256:x", "accept-new")


def test_an_rsa_key_may_be_filed_under_a_signature_algorithm_name(keys: dict) -> None:
    rsa = keys["rsa"]
    table = known(f"[127.0.0.1]:2222 rsa-sha2-512 {rsa[1]}")
    assert table.lookup("[127.0.0.1]:2222").key_types() == ["ssh-rsa"]
    assert hostkeys.verify(table, host(), rsa[2], "SHA256:x", "yes").startswith("known_hosts")


def test_the_key_types_on_file_are_asked_for_first_rsa_under_its_signature_algorithms() -> None:
    offered = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"]
    assert hostkeys.preferred_algorithms(offered, ["ssh-rsa"]) == [
        "rsa-sha2-512", "rsa-sha2-256", "ssh-ed25519", "ecdsa-sha2-nistp256"]
    assert hostkeys.preferred_algorithms(offered, ["ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com"]) == [
        "ecdsa-sha2-nistp256", "ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]
    assert hostkeys.preferred_algorithms(offered, []) == offered


@pytest.mark.parametrize("policy", ["yes", "accept-new"])
def test_a_key_of_another_type_than_the_one_on_file_is_changed_not_new(keys: dict, tmp_path: Path,
                                                                       policy: str) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", keys["server"]) + "\n")
    table = hostkeys.KnownHosts.load(str(path))
    with pytest.raises(HostKeyError, match=r"CHANGED: it is now ecdsa-sha2-nistp256 .* holds ssh-ed25519") as err:
        hostkeys.verify(table, host(), keys["ecdsa"][2], "SHA256:x", policy)
    assert "ssh-keygen -R '[127.0.0.1]:2222'" in err.value.hint
    assert path.read_text().count("\n") == 1


@pytest.mark.parametrize("names", ["[127.0.0.*]:2222", "*", "[127.0.0.1]:2222,[127.0.0.2]:2222"])
def test_a_changed_key_filed_under_a_pattern_names_the_line_not_ssh_keygen_r(keys: dict, names: str) -> None:
    table = known(line(names, keys["server"]))
    with pytest.raises(HostKeyError) as err:
        hostkeys.verify(table, host(), keys["other"][2], "SHA256:x", "accept-new")
    assert f"under '{names}' (line 1 of /k/known_hosts)" in err.value.message
    assert "ssh-keygen -R" not in err.value.hint and "line 1 of /k/known_hosts" in err.value.hint


def test_under_a_host_key_alias_only_the_alias_counts(keys: dict, tmp_path: Path) -> None:
    table = known(line("backup-alias", keys["server"]), line("[127.0.0.1]:2222", keys["other"]))
    aliased = host(alias="backup-alias")
    assert hostkeys.verify(table, aliased, keys["server"][2], "SHA256:x", "yes").startswith("known_hosts")
    with pytest.raises(HostKeyError, match=r"host key of backup-alias \(HostKeyAlias of 127.0.0.1:2222\) CHANGED"):
        hostkeys.verify(table, aliased, keys["other"][2], "SHA256:x", "yes")
    # As in OpenSSH: a key filed under the host's name does not count for a host with an alias.
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2222", keys["server"]) + "\n")
    status = hostkeys.verify(hostkeys.KnownHosts.load(str(path)), aliased, keys["other"][2], "SHA256:x",
                             "accept-new")
    assert status == f"accepted new key into {path}"
    assert path.read_text().splitlines()[1] == line("backup-alias", keys["other"])


def test_a_revoked_key_is_refused_even_when_also_on_file_as_the_hosts_key(keys: dict) -> None:
    table = known(line("[127.0.0.1]:2222", keys["server"]), line("*", keys["server"], "@revoked"))
    with pytest.raises(HostKeyError, match=r"REVOKED \(line 2 of /k/known_hosts\)"):
        hostkeys.verify(table, host(), keys["server"][2], "SHA256:x", "yes")
    with pytest.raises(HostKeyError, match="REVOKED"):
        hostkeys.refuse_revoked(table, host(), keys["server"][2], "SHA256:x")


def test_a_revoked_line_covers_the_hosts_its_pattern_matches_as_in_openssh(keys: dict) -> None:
    table = known(line("[127.0.0.1]:2222", keys["server"]), line("other.example.com", keys["server"], "@revoked"))
    assert hostkeys.verify(table, host(), keys["server"][2], "SHA256:x", "yes").startswith("known_hosts")


def test_a_cert_authority_line_is_skipped_with_one_warning_and_makes_no_host_known(
        keys: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.*]:2222", keys["other"], "@cert-authority") + "\n")
    table = hostkeys.KnownHosts.load(str(path))
    with pytest.raises(HostKeyError, match="is not in"):
        hostkeys.verify(table, host(), keys["server"][2], "SHA256:x", "yes")
    # accept-new: as OpenSSH 9 with a server that shows no certificate, the plain key is new.
    assert hostkeys.verify(table, host(), keys["server"][2], "SHA256:x", "accept-new").startswith("accepted")
    warnings = [r.getMessage() for r in caplog.records if "@cert-authority" in r.getMessage()]
    assert len(warnings) == 1 and "line 1" in warnings[0]


def test_accept_new_adds_a_host_nothing_is_known_of_under_its_name(keys: dict, tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(line("[127.0.0.1]:2223", keys["other"]) + "\n" + line("*.example.com", keys["other"]) + "\n")
    table = hostkeys.KnownHosts.load(str(path))
    hostkeys.verify(table, host(), keys["server"][2], "SHA256:x", "accept-new")
    assert path.read_text().splitlines()[2] == line("[127.0.0.1]:2222", keys["server"])


def test_a_missing_known_hosts_file_is_empty() -> None:
    table = hostkeys.KnownHosts.load("/nonexistent/known_hosts")
    assert table.entries == () and table.lookup("x").keys == ()


# ---------------------------------------------------------------- unit: ProxyJump and ProxyCommand from ssh_config


@pytest.mark.parametrize(("value", "expected"), [
    ("bastion", [proxy.JumpSpec("bastion")]),
    ("admin@bastion:2222", [proxy.JumpSpec("bastion", "admin", 2222)]),
    ("a, b@c:23", [proxy.JumpSpec("a"), proxy.JumpSpec("c", "b", 23)]),
    ("ssh://me@jump.example.com:2200", [proxy.JumpSpec("jump.example.com", "me", 2200)]),
    ("u@[::1]:2222", [proxy.JumpSpec("::1", "u", 2222)]),
    ("fe80::1", [proxy.JumpSpec("fe80::1")]),
    ("user@domain@bastion", [proxy.JumpSpec("bastion", "user@domain")]),
])
def test_proxy_jump_lists_user_host_and_port_of_each_jump_host(value: str, expected: list) -> None:
    assert list(proxy.parse_proxy_jump(value)) == expected


@pytest.mark.parametrize("value", ["bastion:0", "bastion:http", "a,,b", "@bastion:22x", "[::1", "[::1]x", "user@"])
def test_a_malformed_proxy_jump_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        proxy.parse_proxy_jump(value)


def test_proxy_tokens_are_expanded_once_and_percent_percent_is_a_percent() -> None:
    expanded = proxy.expand_tokens("nc %h %p # %r %n 100%% %%h %x", host="10.0.0.5", port=2222, user="gp",
                                   original="backup")
    assert expanded == "nc 10.0.0.5 2222 # gp backup 100% %h %x"


def lookup(text: str, host: str) -> dict:
    config = proxy.RawProxySSHConfig()
    config.parse(io.StringIO(text))
    return config.lookup(host)


def test_the_first_of_proxy_jump_and_proxy_command_wins_and_none_means_none() -> None:
    both = "Host backup\n  ProxyCommand nc %h %p\nHost *\n  ProxyJump bastion\n"
    assert proxy.route_of(lookup(both, "backup")) == proxy.Route("ProxyCommand", "nc %h %p")
    assert proxy.route_of(lookup(both, "other")) == proxy.Route("ProxyJump", "bastion")
    off = "Host backup\n  ProxyJump none\n  ProxyCommand none\nHost *\n  ProxyCommand nc %h %p\n"
    assert proxy.route_of(lookup(off, "backup")) is None
    assert proxy.route_of(lookup("Host backup\n  ProxyCommand none\nHost *\n  ProxyJump b\n", "backup")) is None
    assert proxy.route_of(lookup("Host other\n  ProxyJump b\n", "backup")) is None


def test_proxy_tokens_are_left_for_the_plugin_to_expand() -> None:
    # paramiko would put ssh_config's Port and User in, before the plugin's port and username options win.
    found = lookup("Host backup\n  Port 22\n  ProxyCommand nc %h %p\n  ProxyJump j:%p\n", "backup")
    assert found["proxycommand"] == "nc %h %p" and found["proxyjump"] == "j:%p"


# ---------------------------------------------------------------- behaviour: a man in the middle


def setup_coordinator(plugin: Plugin, cfg: Path, backup: LocalBackup) -> str:
    """The first call of every backup, failing: returns its one stderr line."""
    return plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')


# A second real sshd with host keys of its own, which would serve the plugin's call if let in.
mitm = sshd_fixture("mitm")
# A man in the middle showing only an ECDSA host key, where the real server's ed25519 key is on file.
ecdsa_mitm = sshd_fixture("mitm_ecdsa", extra_config="HostKeyAlgorithms ecdsa-sha2-nistp256\n")


def mitm_config(mitm: SshServer, tmp_path: Path, known_hosts: str, **options: object) -> tuple[Path, Path]:
    """A config reaching ``mitm`` under accept-new, with ``known_hosts`` as its known_hosts file."""
    path = tmp_path / "known_hosts"
    path.write_text(known_hosts)
    cfg = mitm.write_config(tmp_path / "mitm.yaml", known_hosts_file=str(path), log_dir=str(tmp_path / "logs"),
                            strict_host_key_checking="accept-new", retries=1, **options)
    return cfg, path


def real_key(sshd: SshServer, names: str, key_type: str = "ed25519") -> str:
    """The first (real) server's key, filed under ``names``."""
    return names + " " + known_hosts_line(sshd.server_dir, "127.0.0.1", sshd.port, key_type).split(" ", 1)[1]


def assert_refused_as_changed(message: str, mitm: SshServer, known_hosts: Path, before: str) -> None:
    assert "CHANGED" in message and "may be an attack" in message
    assert known_hosts.read_text() == before, "the man in the middle's key must not be saved"
    assert list(mitm.remote_dir.iterdir()) == [], "nothing may reach the man in the middle"
    assert "publickey" not in mitm.log_text(), "no credential may be offered to the man in the middle"


def test_accept_new_refuses_a_host_whose_key_on_file_is_of_another_type(
        plugin: Plugin, sshd: SshServer, ecdsa_mitm: SshServer, backup: LocalBackup, tmp_path: Path) -> None:
    # As after the README's `ssh-keyscan -t ed25519`: only the real server's ed25519 key is on file.
    content = real_key(sshd, f"[127.0.0.1]:{ecdsa_mitm.port}")
    cfg, known_hosts = mitm_config(ecdsa_mitm, tmp_path, content)
    message = setup_coordinator(plugin, cfg, backup)
    assert "it is now ecdsa-sha2-nistp256" in message and "holds ssh-ed25519" in message
    assert_refused_as_changed(message, ecdsa_mitm, known_hosts, content)


def test_accept_new_refuses_a_host_whose_key_is_filed_under_its_host_key_alias(
        plugin: Plugin, sshd: SshServer, mitm: SshServer, backup: LocalBackup, tmp_path: Path) -> None:
    ssh_dir = plugin.home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "config").write_text("Host 127.0.0.1\n  HostKeyAlias backup.example.com\n")
    content = real_key(sshd, "backup.example.com")
    cfg, known_hosts = mitm_config(mitm, tmp_path, content)
    message = setup_coordinator(plugin, cfg, backup)
    assert "host key of backup.example.com (HostKeyAlias of 127.0.0.1:" in message
    assert_refused_as_changed(message, mitm, known_hosts, content)


@pytest.mark.parametrize("names", ["[127.0.0.*]:{port}", "*", "[127.0.0.?]:{port},!badhost.example.com"])
def test_accept_new_refuses_a_host_matching_a_wildcard_entry(plugin: Plugin, sshd: SshServer, mitm: SshServer,
                                                             backup: LocalBackup, tmp_path: Path, names: str) -> None:
    content = real_key(sshd, names.format(port=mitm.port))
    cfg, known_hosts = mitm_config(mitm, tmp_path, content)
    message = setup_coordinator(plugin, cfg, backup)
    assert f"under '{names.format(port=mitm.port)}' (line 1 of {known_hosts})" in message
    assert_refused_as_changed(message, mitm, known_hosts, content)


@pytest.mark.parametrize("filed_under", ["alias", "pattern"])
def test_strict_checking_accepts_the_key_filed_under_the_host_key_alias_or_a_pattern(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path, filed_under: str) -> None:
    if filed_under == "alias":
        (plugin.home / ".ssh").mkdir()
        (plugin.home / ".ssh" / "config").write_text("Host 127.0.0.1\n  HostKeyAlias backup.example.com\n")
        names = "backup.example.com"
    else:
        names = f"[127.0.0.*]:{config.server.port},!backup.example.com"
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(real_key(config.server, names))
    cfg = config.write("filed.yaml", known_hosts_file=str(known_hosts), strict_host_key_checking="yes")
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(config.remote_dir).is_dir()


@pytest.mark.parametrize("strict", ["yes", "accept-new"])
def test_the_key_type_on_file_under_a_pattern_or_alias_is_the_one_asked_for(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup, tmp_path: Path, strict: str) -> None:
    # The server has ed25519 (preferred) and ecdsa keys; only its ecdsa key is on file, under a pattern and
    # under an alias: the handshake must ask for ecdsa first, or the ed25519 key would be refused as changed.
    (plugin.home / ".ssh").mkdir()
    (plugin.home / ".ssh" / "config").write_text("Host backup-aliased\n  HostName 127.0.0.1\n"
                                                  "  HostKeyAlias backup.example.com\n")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(real_key(config.server, "[127.0.0.*]:*", "ecdsa")
                           + real_key(config.server, "backup.example.com", "ecdsa"))
    before = known_hosts.read_text()
    for hostname in ("127.0.0.1", "backup-aliased"):
        cfg = config.write(f"ecdsa_{hostname}.yaml", hostname=hostname, known_hosts_file=str(known_hosts),
                           strict_host_key_checking=strict)
        plugin.ok("list_directory", cfg)
    assert known_hosts.read_text() == before


@pytest.mark.parametrize("pinned", [False, True])
def test_a_revoked_host_key_is_refused_even_when_on_file_or_pinned(plugin: Plugin, config: SiteConfig,
                                                                   backup: LocalBackup, tmp_path: Path,
                                                                   pinned: bool) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(real_key(config.server, f"[127.0.0.1]:{config.server.port}")
                           + "@" + real_key(config.server, "revoked *"))
    cfg = config.write("revoked.yaml", known_hosts_file=str(known_hosts),
                       host_key_fingerprint=config.server.host_fingerprint if pinned else None)
    message = setup_coordinator(plugin, cfg, backup)
    assert f"REVOKED (line 2 of {known_hosts})" in message
    assert list(config.remote_dir.iterdir()) == []


def test_a_cert_authority_line_in_known_hosts_does_not_stop_the_call(plugin: Plugin, config: SiteConfig,
                                                                     backup: LocalBackup, tmp_path: Path) -> None:
    authority = keygen(tmp_path / "host_ca")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"@cert-authority [127.0.0.1]:{config.server.port},*.example.com {authority.with_suffix('.pub').read_text()}"
        + real_key(config.server, f"[127.0.0.1]:{config.server.port}"))
    cfg = config.write("ca.yaml", known_hosts_file=str(known_hosts))
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(config.remote_dir).is_dir()
    assert "@cert-authority line 1" in config.log_text()


# ---------------------------------------------------------------- behaviour: ProxyJump


# Jump hosts log each forwarding (LogLevel DEBUG1).
jump_sshd = sshd_fixture("jump", extra_config="LogLevel DEBUG1\n")
second_jump_sshd = sshd_fixture("jump2", extra_config="LogLevel DEBUG1\n")


@pytest.fixture
def jump(sshd: SshServer, jump_sshd: SshServer) -> SshServer:
    """A jump host in front of the session's backup host that lets the backup host's user key in (the plugin
    offers the jump host the same identities)."""
    jump_sshd.authorize(sshd.user_key.with_suffix(".pub"))
    return jump_sshd


def forwarded_to(server: SshServer, port: int) -> bool:
    return f"target 127.0.0.1 port {port}" in server.log_text()


def via(plugin: Plugin, directive: str) -> None:
    """~/.ssh/config: the backup host, as `backup-behind`, reached through ``directive``."""
    (plugin.home / ".ssh").mkdir(exist_ok=True)
    (plugin.home / ".ssh" / "config").write_text(f"Host backup-behind\n  HostName 127.0.0.1\n  {directive}\n")


def test_proxy_jump_reaches_the_backup_host_through_the_jump_host_verifying_its_key(
        plugin: Plugin, config: SiteConfig, jump: SshServer, backup: LocalBackup, tmp_path: Path) -> None:
    via(plugin, f"ProxyJump 127.0.0.1:{jump.port}")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(config.server.known_hosts.read_text() + jump.known_hosts.read_text())
    cfg = config.write("jump.yaml", hostname="backup-behind", known_hosts_file=str(known_hosts))
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    data = os.urandom(100_000)
    plugin.ok("backup_data", cfg, backup.file(f"gpbackup_0_{backup.timestamp}"), stdin=data)
    assert backup.remote(config.remote_dir, f"gpbackup_0_{backup.timestamp}").read_bytes() == data
    assert "Accepted publickey" in jump.log_text()
    assert forwarded_to(jump, config.server.port)


def test_check_says_which_jump_host_it_goes_through_and_passes(plugin: Plugin, config: SiteConfig, jump: SshServer,
                                                                tmp_path: Path) -> None:
    via(plugin, f"ProxyJump 127.0.0.1:{jump.port}")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(config.server.known_hosts.read_text() + jump.known_hosts.read_text())
    cfg = config.write("jump_check.yaml", hostname="backup-behind", known_hosts_file=str(known_hosts))

    result = plugin.run("check", cfg, "--probe-mib", "0")

    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert re.search(rf"-> through +ProxyJump 127\.0\.0\.1:{jump.port} ", out), out


def test_proxy_jump_with_two_jump_hosts_goes_through_each_in_turn(
        plugin: Plugin, config: SiteConfig, jump: SshServer, second_jump_sshd: SshServer, sshd: SshServer,
        backup: LocalBackup, tmp_path: Path) -> None:
    second = second_jump_sshd
    second.authorize(sshd.user_key.with_suffix(".pub"))
    via(plugin, f"ProxyJump 127.0.0.1:{jump.port},ssh://127.0.0.1:{second.port}")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts.read_text() + jump.known_hosts.read_text()
                           + second.known_hosts.read_text())
    cfg = config.write("jumps.yaml", hostname="backup-behind", known_hosts_file=str(known_hosts))
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert forwarded_to(jump, second.port) and not forwarded_to(jump, sshd.port)
    assert forwarded_to(second, sshd.port)
    assert backup.remote(config.remote_dir).is_dir()


def test_proxy_jump_refuses_an_unknown_jump_host_key_before_sending_it_any_credential(
        plugin: Plugin, config: SiteConfig, jump: SshServer, backup: LocalBackup) -> None:
    via(plugin, f"ProxyJump 127.0.0.1:{jump.port}")
    # The known_hosts file knows the backup host only.
    cfg = config.write("unknown_jump.yaml", hostname="backup-behind")
    message = setup_coordinator(plugin, cfg, backup)
    assert f"setup_plugin_for_backup: host key of jump host [127.0.0.1]:{jump.port} (ssh-ed25519 " in message
    assert f"is not in {config.server.known_hosts}" in message
    assert f"ssh-keyscan -p {jump.port} 127.0.0.1" in message and "host_key_fingerprint" not in message
    log = jump.log_text()
    assert "userauth" not in log and "publickey" not in log, "a credential was offered to an unverified host"
    assert list(config.remote_dir.iterdir()) == []


def test_proxy_jump_to_a_jump_host_that_does_not_answer_names_it(plugin: Plugin, config: SiteConfig,
                                                                 backup: LocalBackup) -> None:
    port = free_port()
    via(plugin, f"ProxyJump admin@127.0.0.1:{port}")
    cfg = config.write("dead_jump.yaml", hostname="backup-behind", retries=1, connect_timeout=5)
    message = setup_coordinator(plugin, cfg, backup)
    assert f": cannot connect to jump host admin@127.0.0.1:{port} (ProxyJump for backup-behind)" in message
    assert "Connection refused" in message


def test_sigint_ends_a_download_through_a_stalled_jump_host_at_once(
        plugin: Plugin, config: SiteConfig, jump: SshServer, backup: LocalBackup, tmp_path: Path) -> None:
    # The link to the jump host goes silent mid-stream: the interrupt must cut the whole route (the session's
    # abort shuts the jump host's TCP connection down), not wait on it for io_timeout.
    name = f"gpbackup_0_{backup.timestamp}"
    data = os.urandom(STREAM_SIZE)
    direct = config.write("direct.yaml")
    plugin.ok("backup_data", direct, backup.file(name), stdin=data)
    with FaultProxy(jump.port) as link:
        link.push(Plan.stall(STALL_AFTER, Direction.SERVER_TO_CLIENT))
        via(plugin, f"ProxyJump 127.0.0.1:{link.port}")
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(config.server.known_hosts.read_text()
                               + real_key(jump, f"[127.0.0.1]:{link.port}"))
        cfg = config.write("stalled_jump.yaml", hostname="backup-behind", known_hosts_file=str(known_hosts),
                           io_timeout=PATIENT_IO_TIMEOUT, fork_server="no")
        process = plugin.popen("restore_data", cfg, backup.file(name), stdout=subprocess.DEVNULL)
        assert wait_until(lambda: link.triggered == 1), "the stall never happened"
        process.send_signal(signal.SIGINT)
        try:
            err = process.communicate(timeout=RUN_TIMEOUT)[1]
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"still running {RUN_TIMEOUT}s after SIGINT")
    assert process.returncode == 130, err
    assert err.decode().strip().endswith("restore_data: interrupted") and err.count(b"\n") == 1, err


# ---------------------------------------------------------------- behaviour: ProxyCommand

# A relay as `nc host port` is (not installed everywhere): stdin to the server, the server to stdout; it
# first notes its arguments in the file named last, for the test to see the tokens it was given.
RELAY = """\
import os, socket, sys, threading
with open(sys.argv[-1], "a") as note:
    note.write(" ".join(sys.argv[1:-1]) + "\\n")
server = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 65536):
        server.sendall(data)
    server.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := server.recv(65536):
    os.write(1, data)
"""


def test_proxy_command_carries_the_connection_with_its_tokens_expanded(plugin: Plugin, config: SiteConfig,
                                                                       backup: LocalBackup, tmp_path: Path) -> None:
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    note = tmp_path / "relay.note"
    via(plugin, f"ProxyCommand {sys.executable} {relay} %h %p %r 100%% {note}")
    cfg = config.write("command.yaml", hostname="backup-behind", username="gpbackup-user")
    message = setup_coordinator(plugin, cfg, backup)  # through the relay, as that user (unknown there)
    assert "authentication as gpbackup-user@127.0.0.1" in message
    assert note.read_text() == f"127.0.0.1 {config.server.port} gpbackup-user 100%\n"

    user = config.server.options()["username"]
    cfg = config.write("command.yaml", hostname="backup-behind", username=user)
    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert backup.remote(config.remote_dir).is_dir()
    assert note.read_text().splitlines()[-1] == f"127.0.0.1 {config.server.port} {user} 100%"


def test_a_proxy_command_that_fails_is_one_line_naming_it_with_its_last_words(
        plugin: Plugin, config: SiteConfig, backup: LocalBackup) -> None:
    via(plugin, "ProxyCommand sh -c \"echo 'channel 0: open failed: no route to 10.9.9.9' >&2; exit 255\"")
    cfg = config.write("failing_command.yaml", hostname="backup-behind", retries=1)
    message = setup_coordinator(plugin, cfg, backup)
    assert "setup_plugin_for_backup: ProxyCommand sh -c " in message
    assert "(~/.ssh/config, for backup-behind) exited with status 255: channel 0: open failed: no route" in message
    assert list(config.remote_dir.iterdir()) == []


def test_a_proxy_command_that_cannot_be_run_is_a_configuration_error(plugin: Plugin, config: SiteConfig,
                                                                      backup: LocalBackup) -> None:
    via(plugin, "ProxyCommand /nonexistent/netcat %h %p")
    cfg = config.write("missing_command.yaml", hostname="backup-behind")
    result = plugin.run("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')
    assert result.returncode == 2, result.stderr
    assert b"/nonexistent/netcat 127.0.0.1" in result.stderr and b"cannot be run" in result.stderr
