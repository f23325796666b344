"""``stop-fork-server``: stop this user's fork servers on this host (forkserver.py)."""

from __future__ import annotations

from sftp_plugin.admin.runner import command_parser, parse_args
from sftp_plugin.stderr import fail


def stop_fork_server(argv: list[str]) -> int:
    """``stop-fork-server``: stop this user's fork servers; calls in flight finish undisturbed."""
    parser = command_parser(
        "stop-fork-server",
        "Stop the current user's plugin fork servers and close the SSH sessions their workers keep (both "
        "also end by themselves after a minute without calls). Calls in flight are not interrupted.", config_help=None,
    )
    parsed = parse_args(parser, argv)
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
