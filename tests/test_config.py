"""Unit tests of config.py: the options gpbackup hands over, as it really hands them over (strings)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from sftp_plugin.config import PluginConfig, load_config, parse_options
from sftp_plugin.errors import ConfigError

BASE: dict[str, Any] = {"hostname": "backup.example.com", "remote_dir": "/srv/gpbackup"}


def parse(**options: Any) -> PluginConfig:
    return parse_options({**BASE, **options})


def problems(**options: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_options({**BASE, **options})
    return str(caught.value)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_minimal_options_give_defaults() -> None:
    cfg = parse()
    assert cfg.hostname == "backup.example.com"
    assert cfg.remote_dir == "/srv/gpbackup"
    assert cfg.port is None
    assert cfg.strict_host_key_checking == "yes"
    assert cfg.restore_subset is False


@pytest.mark.parametrize("raw", [22, "22", " 22 "])
def test_port_accepts_int_and_its_string_form(raw: Any) -> None:
    assert parse(port=raw).port == 22


@pytest.mark.parametrize("key", ["port", "retries", "connect_timeout", "keep_last", "keep_days"])
def test_integer_options_accept_the_string_form_gpbackup_sends(key: str) -> None:
    assert getattr(parse(**{key: "7"}), key) == 7


@pytest.mark.parametrize("raw", ["abc", "2.5", "", True, [22]])
def test_port_rejects_non_numbers(raw: Any) -> None:
    assert "'port'" in problems(port=raw)


@pytest.mark.parametrize("raw", ["0", "65536", -1])
def test_port_rejects_out_of_range_numbers(raw: Any) -> None:
    assert "'port'" in problems(port=raw)


@pytest.mark.parametrize("raw", ["0", 0, "-3"])
def test_retries_must_be_at_least_one(raw: Any) -> None:
    assert "'retries'" in problems(retries=raw)


@pytest.mark.parametrize("raw", [True, "true", "True", "on", "yes", "1"])
def test_restore_subset_true_forms(raw: Any) -> None:
    assert parse(restore_subset=raw).restore_subset is True


@pytest.mark.parametrize("raw", [False, "false", "off", "no", "0"])
def test_restore_subset_false_forms(raw: Any) -> None:
    assert parse(restore_subset=raw).restore_subset is False


def test_restore_subset_rejects_other_words() -> None:
    assert "'restore_subset'" in problems(restore_subset="maybe")


def test_gpbackup_added_keys_are_accepted() -> None:
    cfg = parse(pgport="6000", backup_plugin_version="0.1.0")
    assert cfg.hostname == "backup.example.com"


def test_gpbackup_added_keys_are_accepted_when_empty() -> None:
    # On backup, gpbackup writes backup_plugin_version with an empty value.
    assert parse(pgport="6000", backup_plugin_version="").remote_dir == "/srv/gpbackup"


def test_unknown_key_error_names_the_key_and_suggests_the_closest() -> None:
    message = problems(hostnme="x")
    assert "hostnme" in message
    assert "did you mean 'hostname'" in message


def test_unknown_key_without_close_match_is_still_named() -> None:
    assert "zzzqqq" in problems(zzzqqq="1")


def test_every_invalid_option_is_reported_in_one_message() -> None:
    message = problems(port="abc", retries="0", log_level="loud", strict_host_key_checking="sometimes",
                       prot="22", host_key_fingerprint="MD5:xx")
    for key in ("'port'", "'retries'", "'log_level'", "'strict_host_key_checking'", "'prot'",
                "'host_key_fingerprint'"):
        assert key in message, f"{key} missing from {message!r}"


def test_missing_required_options_are_all_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_options({"port": "22"})
    message = str(caught.value)
    assert "'hostname'" in message and "'remote_dir'" in message


def test_option_without_value_is_reported() -> None:
    assert "'username'" in problems(username=None)


def test_nested_value_is_refused() -> None:
    assert "'hostname'" in problems(hostname={"a": 1})


def test_options_must_be_a_map() -> None:
    with pytest.raises(ConfigError, match="options"):
        parse_options(["hostname", "remote_dir"])


@pytest.mark.parametrize("raw", ["relative/dir", "/srv/../etc", "/srv/gp/.."])
def test_remote_dir_must_be_absolute_without_dotdot(raw: str) -> None:
    assert "'remote_dir'" in problems(remote_dir=raw)


def test_remote_dir_is_normalised() -> None:
    assert parse(remote_dir="/srv//gpbackup/").remote_dir == "/srv/gpbackup"


@pytest.mark.parametrize(("raw", "expected"), [
    ("yes", "yes"), ("no", "no"), ("accept-new", "accept-new"), ("ACCEPT-NEW", "accept-new"),
    (True, "yes"), (False, "no"), ("true", "yes"), ("false", "no"), ("on", "yes"), ("off", "no"),
])
def test_strict_host_key_checking_values(raw: Any, expected: str) -> None:
    assert parse(strict_host_key_checking=raw).strict_host_key_checking == expected


@pytest.mark.parametrize(("yaml_word", "expected"), [("yes", "yes"), ("no", "no"), ("accept-new", "accept-new")])
def test_strict_host_key_checking_from_bare_yaml_words(tmp_path: Path, yaml_word: str, expected: str) -> None:
    # A bare yes/no is a YAML 1.1 boolean, not a string.
    path = write_yaml(tmp_path / "c.yaml", "options:\n  hostname: h\n  remote_dir: /r\n"
                      f"  strict_host_key_checking: {yaml_word}\n")
    assert load_config(str(path)).strict_host_key_checking == expected


def test_strict_host_key_checking_rejects_other_values() -> None:
    message = problems(strict_host_key_checking="sometimes")
    assert "'strict_host_key_checking'" in message and "accept-new" in message


def test_fingerprint_pin_accepts_ssh_keygen_form_with_or_without_padding() -> None:
    body = "A" * 43
    assert parse(host_key_fingerprint=f"SHA256:{body}").host_key_fingerprint == f"SHA256:{body}"
    assert parse(host_key_fingerprint=f"SHA256:{body}=").host_key_fingerprint == f"SHA256:{body}"


@pytest.mark.parametrize("raw", ["SHA256:short", "MD5:aa:bb", "A" * 43])
def test_fingerprint_pin_rejects_other_forms(raw: str) -> None:
    assert "'host_key_fingerprint'" in problems(host_key_fingerprint=raw)


def test_log_level_is_case_insensitive_and_checked() -> None:
    assert parse(log_level="DEBUG").log_level == "debug"
    assert "'log_level'" in problems(log_level="verbose")


def test_secrets_lists_password_and_passphrase() -> None:
    cfg = parse(password="pw-value", identity_passphrase="pass-value")
    assert set(cfg.secrets()) == {"pw-value", "pass-value"}
    assert parse().secrets() == []


def test_load_config_accepts_the_copy_gpbackup_writes(tmp_path: Path) -> None:
    # gpbackup re-serialises every option value as a string and adds its own keys.
    document = {"executablepath": "/usr/local/bin/gpbackup_sftp_plugin", "options": {
        "hostname": "backup.example.com", "remote_dir": "/srv/gpbackup", "port": "2222", "retries": "3",
        "restore_subset": "true", "strict_host_key_checking": "accept-new", "keep_last": "4",
        "pgport": "6000", "backup_plugin_version": "0.1.0"}}
    path = tmp_path / "gpbackup_copy.yaml"
    path.write_text(yaml.safe_dump(document))
    cfg = load_config(str(path))
    assert (cfg.port, cfg.retries, cfg.restore_subset, cfg.keep_last) == (2222, 3, True, 4)
    assert cfg.strict_host_key_checking == "accept-new"


def test_load_config_accepts_native_yaml_values(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "options:\n  hostname: h\n  remote_dir: /r\n  port: 22\n"
                      "  restore_subset: on\n")
    cfg = load_config(str(path))
    assert cfg.port == 22 and cfg.restore_subset is True


def test_missing_config_file_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing))
    assert str(missing) in str(caught.value) and "not found" in str(caught.value)


def test_unparsable_config_file_error_names_the_path(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", "options:\n  hostname: [unclosed\n  remote_dir: /r\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(path) in str(caught.value) and "YAML" in str(caught.value)


@pytest.mark.parametrize("text", ["", "executablepath: /x\n", "- a\n- b\n"])
def test_config_file_without_options_map_is_refused(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match="options"):
        load_config(str(path))


def test_config_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path))
    assert str(tmp_path) in str(caught.value)


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("option", [f.name for f in fields(PluginConfig)])
def test_every_option_is_documented_in_the_readme_and_the_template(option: str) -> None:
    assert f"``{option}``" in (REPO / "README.rst").read_text(), f"{option} missing from README.rst's option table"
    assert f"# {option}:" in (REPO / "plugin.yaml.template").read_text() or \
        f"  {option}:" in (REPO / "plugin.yaml.template").read_text(), f"{option} missing from plugin.yaml.template"


def test_fork_server_is_on_by_default_and_takes_booleans() -> None:
    assert parse_options({"hostname": "h", "remote_dir": "/r"}).fork_server is True
    assert parse_options({"hostname": "h", "remote_dir": "/r", "fork_server": "no"}).fork_server is False
