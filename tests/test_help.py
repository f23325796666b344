"""`help`, `--help`, `-h`, `help <command>` and the "did you mean" of an unknown command, run as the installed
console script (no backup host needed: none of them reads a config)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.harness import Plugin, assert_failed, assert_ok
from sftp_plugin.cli import ADMIN_COMMANDS, COMMANDS, VERSION_COMMANDS


def listed(output: str, title: str) -> list[str]:
    """The command names listed under one group title of the usage text."""
    lines = output.splitlines()
    start = lines.index(title) + 1
    names = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        names.append(line.split()[0])
    return names


@pytest.mark.parametrize("word", ["help", "--help", "-h"])
def test_help_lists_the_gpbackup_commands_and_the_admin_commands_in_two_groups(plugin: Plugin, word: str) -> None:
    result = assert_ok(plugin.run(word))
    output = result.stdout.decode()

    assert output.startswith("usage: gpbackup_sftp_plugin <command>")
    assert listed(output, "Commands gpbackup and gprestore run:") == [*VERSION_COMMANDS, *COMMANDS]
    assert listed(output, "Commands for the administrator:") == [*ADMIN_COMMANDS, "help"]
    for line in output.splitlines():
        if line.startswith("  "):
            assert len(line.split(maxsplit=1)) == 2, f"a command without its one-line description: {line!r}"


def test_help_of_an_admin_command_is_its_argparse_help(plugin: Plugin) -> None:
    output = assert_ok(plugin.run("help", "check")).stdout.decode()

    assert output.startswith("usage: gpbackup_sftp_plugin check")
    assert "--probe-mib" in output and "--cluster" in output


@pytest.mark.parametrize(("command", "arguments"), [
    ("backup_data", "<config.yaml> <data_filekey>"),
    ("restore_data_subset", "<config.yaml> <data_filekey> <offsets_file>"),
    ("--version", ""),
])
def test_help_of_a_gpbackup_command_names_its_arguments(plugin: Plugin, command: str, arguments: str) -> None:
    output = assert_ok(plugin.run("help", command)).stdout.decode()

    assert output.splitlines()[0] == f"usage: gpbackup_sftp_plugin {command} {arguments}".rstrip()
    assert output.splitlines()[2], "one line saying what it does"


@pytest.mark.parametrize(("typed", "meant"), [
    ("chek", "check"),
    ("list-backup", "list-backups"),
    ("BACKUP_FILE", "backup_file"),
    ("restore_data_sub", "restore_data_subset"),
])
def test_an_unknown_command_fails_with_one_line_suggesting_the_closest(plugin: Plugin, tmp_path: Path,
                                                                       typed: str, meant: str) -> None:
    result = plugin.run(typed, tmp_path / "config.yaml")

    assert result.returncode == 2
    line = assert_failed(result)
    assert f"did you mean '{meant}'?" in line
    assert result.stdout == b""


def test_help_of_an_unknown_command_suggests_the_closest(plugin: Plugin) -> None:
    result = plugin.run("help", "verfy")

    assert result.returncode == 2
    assert "did you mean 'verify'?" in assert_failed(result)


def test_an_unknown_command_without_a_close_one_points_at_help(plugin: Plugin) -> None:
    line = assert_failed(plugin.run("zzzzzz"))

    assert "did you mean" not in line
    assert re.search(r"'gpbackup_sftp_plugin help' lists the commands", line)


def test_help_answers_without_importing_paramiko_or_the_commands(tmp_path: Path) -> None:
    """help, like the version commands, answers before anything heavy is imported."""
    code = ("import sys; from sftp_plugin.cli import main; code = main(['help']); "
            "print(code, sorted(m for m in ('paramiko', 'yaml', 'sftp_plugin.commands') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "0 []"
