"""Connection errors as a new user meets them: each one clear line, and no retries where a new connection cannot
help. The installed plugin against a real sshd on 127.0.0.1."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup
from devtools.harness import PLUGIN_EXE, Plugin, SiteConfig, assert_failed, socket_dir_env
from devtools.sshd import SshServer, keygen
from tests.helpers import session_plugin, sshd_fixture

# A cipher OpenSSH has and paramiko lacks: a backup host that allows only it shares no cipher with the plugin.
CHACHA20 = "chacha20-poly1305@openssh.com"
# Default number of attempts (the option's default), kept explicit: these tests are about retries not happening.
RETRIES = 6
# The longest wait between attempts, short so that a regression (retrying after all) fails fast.
RETRY_MAX_WAIT = 1
# Reserved by RFC 6761: never resolves, anywhere.
UNRESOLVABLE = "backup.invalid"
# What sshd (LogLevel VERBOSE) logs for every TCP connection it accepts.
CONNECTION_LINE = re.compile(r"^Connection from 127\.0\.0\.1 port \d+", re.MULTILINE)


def setup_coordinator(plugin: Plugin, cfg: Path, backup: LocalBackup) -> str:
    """The first call of every backup, failing: returns its one stderr line."""
    return plugin.fails("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')


def connections(server: SshServer) -> int:
    return len(CONNECTION_LINE.findall(server.log_path.read_text(errors="replace")))


# A backup host whose sshd allows only a cipher paramiko does not have.
chacha20_only = sshd_fixture("sshd_chacha20", extra_config=f"Ciphers {CHACHA20}\n")


def test_a_server_with_no_cipher_in_common_fails_at_once_naming_what_each_side_supports(
        plugin: Plugin, chacha20_only: SshServer, backup: LocalBackup, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    cfg = chacha20_only.write_config(tmp_path / "chacha20.yaml", log_dir=str(logs), retries=RETRIES,
                                     retry_max_wait=RETRY_MAX_WAIT)
    before = connections(chacha20_only)

    message = setup_coordinator(plugin, cfg, backup)

    assert "no cipher in common" in message
    assert f"the server offers {CHACHA20};" in message
    assert "the plugin (paramiko" in message and "aes128-ctr" in message and "aes256-ctr" in message
    assert "Ciphers" in message and "MaxStartups" not in message
    assert connections(chacha20_only) - before == 1, "a mismatch of algorithms must not be retried"
    log = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert "retrying" not in log and "attempts" not in message


def test_a_wrong_passphrase_for_an_openssh_format_key_says_so(plugin: Plugin, config: SiteConfig,
                                                              backup: LocalBackup, tmp_path: Path) -> None:
    key = keygen(tmp_path / "id_encrypted", passphrase="pass")  # ssh-keygen writes OpenSSH format
    wrong = "not-the-Passphrase-9c1e"
    cfg = config.write("wrong_passphrase.yaml", identity_file=str(key), identity_passphrase=wrong,
                       retries=RETRIES, retry_max_wait=RETRY_MAX_WAIT)

    message = setup_coordinator(plugin, cfg, backup)

    assert f"wrong passphrase for {key}" in message
    assert "PEM" not in message
    assert wrong not in message
    log = config.log_text()
    assert wrong not in log
    assert "retrying" not in log


def test_a_passphrase_set_for_a_key_that_needs_none_does_not_stop_it(plugin: Plugin, config: SiteConfig,
                                                                    backup: LocalBackup) -> None:
    # ssh never asks for a passphrase a key does not need; the plugin called such a key "encrypted".
    cfg = config.write("needless_passphrase.yaml", identity_passphrase="needless-Passphrase-7d2e")  # key: unencrypted

    plugin.ok("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')


@pytest.mark.parametrize("hostname", ["{user}@127.0.0.1", "127.0.0.1:{port}", "[127.0.0.1]:{port}"])
def test_a_hostname_holding_a_user_or_port_is_refused_as_a_config_error(plugin: Plugin, config: SiteConfig,
                                                                        backup: LocalBackup, hostname: str) -> None:
    written = hostname.format(user=config.server.options()["username"], port=config.server.port)
    cfg = config.write("user_at_host.yaml", hostname=written, retries=1)
    before = connections(config.server)

    result = plugin.run("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"')

    assert result.returncode == 2, result.stderr
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "Traceback" not in message
    assert f"'{written}'" in message
    assert "put the user in 'username', the port in 'port'" in message
    assert connections(config.server) == before


def files_only_resolver(tmp_path: Path) -> Plugin:
    """The plugin run in a mount namespace of its own whose nsswitch.conf says ``hosts: files``: a
    name missing from /etc/hosts is refused by the C library without one DNS packet leaving the
    machine (tests send nothing beyond loopback). Skips where no mount namespace can be made."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare --mount needs root)")
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("hosts: files\n")
    wrapper = tmp_path / "plugin_files_only"
    wrapper.write_text("#!/bin/sh\n"
                       f"exec unshare --mount --propagation private /bin/sh -c "
                       f"'mount --bind {nsswitch} /etc/nsswitch.conf && exec \"$0\" \"$@\"' {PLUGIN_EXE} \"$@\"\n")
    wrapper.chmod(0o755)
    home = tmp_path / "home_files_only"
    home.mkdir()
    return session_plugin(home, exe=str(wrapper))


def test_a_host_name_that_does_not_exist_fails_at_once_naming_it(config: SiteConfig, backup: LocalBackup,
                                                                 tmp_path: Path) -> None:
    plugin = files_only_resolver(tmp_path)
    # fork_server: no and a socket directory of its own: no worker outside the namespace serves the call.
    cfg = config.write("unresolvable.yaml", hostname=UNRESOLVABLE, retries=RETRIES, retry_max_wait=RETRY_MAX_WAIT,
                       fork_server="no")

    result = plugin.run("setup_plugin_for_backup", cfg, backup.path, "coordinator", '"-1"',
                        env_extra=socket_dir_env(tmp_path))

    message = assert_failed(result)
    assert f"cannot resolve {UNRESOLVABLE}" in message
    assert "attempts" not in message
    assert "retrying" not in config.log_text()


def test_check_warns_about_ssh_config_options_the_plugin_ignores(plugin: Plugin, config: SiteConfig) -> None:
    ssh_dir = plugin.home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "config").write_text(
        "Host 127.0.0.1\n"
        "  Ciphers aes256-ctr\n"
        "  UserKnownHostsFile /dev/null\n"
        "  PasswordAuthentication no\n"  # what the plugin does anyway without a password: nothing to say
        "  SendEnv LANG\n"  # does not change the connection
    )

    result = plugin.run("check", config.path, "--probe-mib", "0")

    out = result.stdout.decode()
    assert result.returncode == 0, out
    warnings = {match.group(1): match.group(2) for match in
                re.finditer(r"^WARN\s+ssh_config\s+(\w+) .*\n\s+-> (.*)$", out, re.MULTILINE)}
    assert set(warnings) == {"Ciphers", "UserKnownHostsFile"}, out
    assert "Supported algorithms" in warnings["Ciphers"]
    assert f"use known_hosts_file (now {config.server.known_hosts})" in warnings["UserKnownHostsFile"]
