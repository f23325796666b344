"""Unit tests of config.py: the options gpbackup hands over, as it really hands them over (strings)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from sftp_plugin.config import NOT_PLAIN, PluginConfig, load_config, parse_options, read_options
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


@pytest.mark.parametrize(
    "raw", ["backup", "backup-01.example.com", "my_backup_alias", "10.0.0.7", "::1", "fe80::1%eth0", "2001:db8::7"]
)
def test_hostname_accepts_names_addresses_ipv6_and_ssh_config_aliases(raw: str) -> None:
    assert parse(hostname=raw).hostname == raw


@pytest.mark.parametrize(
    "raw", ["gpadmin@backup", "backup:2222", "gpadmin@backup:2222", "[::1]", "[::1]:2222", "backup:22:22", "::1::2"]
)
def test_hostname_with_a_user_port_or_brackets_is_refused_saying_where_they_go(raw: str) -> None:
    message = problems(hostname=raw)
    assert "option 'hostname'" in message and repr(raw) in message
    assert "put the user in 'username', the port in 'port'" in message


@pytest.mark.parametrize("raw", ["22", " 22 ", "022", "+22"])
def test_port_accepts_its_decimal_text(raw: str) -> None:
    assert parse(port=raw).port == 22


@pytest.mark.parametrize("key", ["port", "retries", "connect_timeout", "keep_last", "keep_days"])
def test_integer_options_accept_the_string_form_gpbackup_sends(key: str) -> None:
    assert getattr(parse(**{key: "7"}), key) == 7


@pytest.mark.parametrize("raw", ["abc", "2.5", "", "yes", [22]])
def test_port_rejects_non_numbers(raw: Any) -> None:
    assert "'port'" in problems(port=raw)


@pytest.mark.parametrize("raw", ["2_2", "٢٢"])
def test_port_rejects_digits_python_reads_but_that_are_not_plain_decimal(raw: str) -> None:
    # int() takes underscores and non-ASCII digits; a port is written in ASCII decimal digits.
    assert f"'port': expected a whole number, got {raw!r}" in problems(port=raw)


@pytest.mark.parametrize("raw", ["0", "65536", "-1"])
def test_port_rejects_out_of_range_numbers(raw: str) -> None:
    assert "'port'" in problems(port=raw)


@pytest.mark.parametrize("raw", ["0", "-3"])
def test_retries_must_be_at_least_one(raw: str) -> None:
    assert "'retries'" in problems(retries=raw)


def test_parse_options_takes_the_text_of_each_value_not_native_values() -> None:
    with pytest.raises(TypeError, match="port"):
        parse_options({**BASE, "port": 22})


@pytest.mark.parametrize(("raw", "expected"), [("on", True), ("off", False)])
def test_restore_subset_is_on_or_off(raw: str, expected: bool) -> None:
    assert parse(restore_subset=raw).restore_subset is expected


@pytest.mark.parametrize("raw", ["true", "True", "yes", "1", "ON", "On", "false", "no", "0", "OFF", " on", "", "maybe"])
def test_restore_subset_refuses_all_but_exactly_on_or_off(raw: str) -> None:
    # gprestore compares the text with "on" itself: `true` would silently mean off to it.
    message = problems(restore_subset=raw)
    assert f"'restore_subset': expected exactly on or off, got {raw!r}" in message
    assert "gprestore" in message and "exactly 'on'" in message


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
    ("true", "yes"), ("false", "no"), ("on", "yes"), ("off", "no"),
])
def test_strict_host_key_checking_values(raw: str, expected: str) -> None:
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


def test_at_rest_options_default_to_plain_files() -> None:
    cfg = parse()
    assert (cfg.compression, cfg.encryption_key_file, cfg.decryption_key_files) == ("none", None, ())
    assert not cfg.uses_container


def test_at_rest_options_are_parsed_and_checked() -> None:
    cfg = parse(compression="ZSTD", compression_level="7", encryption_key_file="~/k",
                decryption_key_files="/etc/old1.key, ~/old2.key")
    assert cfg.compression == "zstd" and cfg.compression_level == 7 and cfg.uses_container
    assert cfg.encryption_key_file is not None and not cfg.encryption_key_file.startswith("~")
    assert cfg.decryption_key_files[0] == "/etc/old1.key" and not cfg.decryption_key_files[1].startswith("~")
    assert parse(encryption_key_file="/k").uses_container
    assert "'compression': expected one of none, zstd" in problems(compression="gzip")
    assert "'compression_level'" in problems(compression_level="20")
    assert "'decryption_key_files'" in problems(decryption_key_files="/a,,/b")


def test_max_connections_defaults_to_no_cap_and_takes_a_whole_number() -> None:
    assert parse().max_connections == 0
    assert parse(max_connections="16").max_connections == 16
    assert "'max_connections': must be >= 0" in problems(max_connections="-1")
    assert "'max_connections'" in problems(max_connections="4.5")


def test_secrets_lists_password_and_passphrase() -> None:
    cfg = parse(password="pw-value", identity_passphrase="pass-value")
    assert set(cfg.secrets()) == {"pw-value", "pass-value"}
    assert parse().secrets() == []


def test_load_config_accepts_the_copy_gpbackup_writes(tmp_path: Path) -> None:
    # gpbackup re-serialises every option value as a string and adds its own keys.
    document = {"executablepath": "/usr/local/bin/gpbackup_sftp_plugin", "options": {
        "hostname": "backup.example.com", "remote_dir": "/srv/gpbackup", "port": "2222", "retries": "3",
        "restore_subset": "on", "strict_host_key_checking": "accept-new", "keep_last": "4",
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


def test_read_options_gives_the_literal_text_and_none_only_for_a_plain_null(tmp_path: Path) -> None:
    # As gpbackup's map[string]string (yaml.v2) reads them: no YAML 1.1 typing of the values.
    path = write_yaml(tmp_path / "c.yaml", "executablepath: /x\noptions:\n"
                      "  a: 012345\n  b: yes\n  c: 12:30\n  d: 1.5e+3\n  e: 0x1F\n  f: .inf\n"
                      "  g:\n  h: ~\n  i: null\n  j: NULL\n  k: 'null'\n  l: \"~\"\n  m: \"\"\n"
                      "  n: [1, 2]\n  o: {p: q}\n  pgport: \"6000\"\n")
    assert read_options(str(path)) == {
        "a": "012345", "b": "yes", "c": "12:30", "d": "1.5e+3", "e": "0x1F", "f": ".inf",
        "g": None, "h": None, "i": None, "j": None, "k": "null", "l": "~", "m": "",
        "n": NOT_PLAIN, "o": NOT_PLAIN, "pgport": "6000",
    }


def test_read_options_merges_an_anchored_map_as_yaml_v2_does(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "common: &common\n  port: 022\n  retries: 3\n"
                      "options:\n  <<: *common\n  retries: 5\n  hostname: h\n")
    assert read_options(str(path)) == {"port": "022", "retries": "5", "hostname": "h"}


@pytest.mark.parametrize(("written", "text"), [
    ("012345", "012345"),  # YAML 1.1 octal: 5349
    ("yes", "yes"),  # YAML 1.1 boolean: True
    ("12:30", "12:30"),  # YAML 1.1 sexagesimal: 750
    ("1.5e+3", "1.5e+3"),  # float: 1500.0
    ("0x1F", "0x1F"),  # hex: 31
    ('"  spaced out  "', "  spaced out  "),  # spaces are part of a secret
])
def test_secrets_are_the_literal_yaml_text(tmp_path: Path, written: str, text: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", "options:\n  hostname: h\n  remote_dir: /r\n"
                      f"  identity_passphrase: {written}\n  password: {written}\n")
    cfg = load_config(str(path))
    assert (cfg.identity_passphrase, cfg.password) == (text, text)


def test_integer_options_in_the_file_are_decimal_text_not_yaml_octal(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "options:\n  hostname: h\n  remote_dir: /r\n  retries: 010\n"
                      "  port: 0022\n")
    cfg = load_config(str(path))
    assert (cfg.retries, cfg.port) == (10, 22)


@pytest.mark.parametrize("written", ["0x10", "1:30", "1_0", "0b11", "1.5e+3"])
def test_yaml_1_1_numbers_in_the_file_are_refused_for_integer_options(tmp_path: Path, written: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", f"options:\n  hostname: h\n  remote_dir: /r\n  connect_timeout: {written}\n")
    with pytest.raises(ConfigError, match=re.escape(f"'connect_timeout': expected a whole number, got '{written}'")):
        load_config(str(path))


@pytest.mark.parametrize("written", ["yes", "true", "True", "1"])
def test_restore_subset_in_the_file_other_than_on_or_off_is_refused(tmp_path: Path, written: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", f"options:\n  hostname: h\n  remote_dir: /r\n  restore_subset: {written}\n")
    with pytest.raises(ConfigError, match="restore_subset': expected exactly on or off"):
        load_config(str(path))


@pytest.mark.parametrize(("text", "where", "what"), [
    # remote_dir indented less than hostname
    ("options:\n  hostname: h\n remote_dir: /r\n  port: 22\n", "at line 3, column 2", "expected <block end>"),
    # remote_dir indented more than hostname
    ("options:\n  hostname: h\n   remote_dir: /r\n  port: 22\n", "at line 3, column", "mapping values are not allowed"),
])
def test_yaml_error_names_the_misindented_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert f"{path} is not valid YAML {where}" in str(caught.value) and what in str(caught.value)


@pytest.mark.parametrize(("text", "line"), [
    ("options:\n  hostname: h\n  password: 'secret-pw\n  remote_dir: /r\n  port: 22\n", 3),
    ("options:\n  hostname: [unclosed, secret-pw\n  remote_dir: /r\n  port: 22\n", 2),
    ("options:\n  hostname: h\n  secret-pw\n  remote_dir: /r\n", 3),
])
def test_yaml_error_names_the_line_where_an_unclosed_token_opens_and_shows_none_of_it(
    tmp_path: Path, text: str, line: int
) -> None:
    # PyYAML notices these only at a later token (often the end of the file): its context mark is the line.
    path = write_yaml(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert f"is not valid YAML at line {line}," in message
    assert "secret-pw" not in message


def test_check_masks_the_secrets_as_written_even_when_the_config_is_invalid(tmp_path: Path) -> None:
    from sftp_plugin.admin.runner import raw_secrets as _raw_secrets  # admin imports much more than config: only here

    path = write_yaml(tmp_path / "c.yaml", "options:\n  hostname: h\n  password: 012345\n"
                      "  identity_passphrase: ' spaced '\n  port: nope\n")
    assert _raw_secrets(str(path)) == ["012345", " spaced "]


@pytest.mark.parametrize(("word", "says"), [
    ("on", "filtered restores of --single-data-file backups read only the byte ranges they need"),
    ("off", "filtered restores of --single-data-file backups stream each segment's whole data file"),
])
def test_check_says_whether_filtered_restores_read_byte_ranges(
    capsys: pytest.CaptureFixture[str], word: str, says: str
) -> None:
    from sftp_plugin.admin.preflight import _print_options  # admin imports much more than config: only here

    _print_options(parse(restore_subset=word), "c.yaml", [])
    out = capsys.readouterr().out
    assert re.search(rf"^  restore_subset +{word}$", out, re.M), out
    assert re.search(rf"^  -> restore_subset +{word}: {re.escape(says)}", out, re.M), out


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


def test_fsync_is_on_by_default_and_takes_booleans() -> None:
    assert parse_options({"hostname": "h", "remote_dir": "/r"}).fsync is True
    assert parse_options({"hostname": "h", "remote_dir": "/r", "fsync": "no"}).fsync is False
    assert parse_options({"hostname": "h", "remote_dir": "/r", "fsync": "on"}).fsync is True
    with pytest.raises(ConfigError, match="fsync"):
        parse_options({"hostname": "h", "remote_dir": "/r", "fsync": "sometimes"})
