"""``stop-fork-server`` and ``fork-server-status``: this user's fork servers on this host (forkserver.py), stopped
or shown with the workers and SSH sessions they keep, config by config."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from sftp_plugin.admin.output import human_age
from sftp_plugin.admin.runner import command_parser, parse_args
from sftp_plugin.stderr import fail


def stop_fork_server(argv: list[str]) -> int:
    """``stop-fork-server``: stop this user's fork servers; calls in flight finish undisturbed."""
    return _run("stop-fork-server", "Stop the current user's plugin fork servers and close the SSH sessions their "
                "workers keep (both also end by themselves after a minute without calls). Calls in flight are not "
                "interrupted.", argv, _stop)


def fork_server_status(argv: list[str]) -> int:
    """``fork-server-status``: each fork server of this user, and per config its workers and their sessions."""
    return _run("fork-server-status", "Show the current user's plugin fork servers on this host: for each config, "
                "how many workers it has, which of them are idle keeping an SSH session to the backup host, busy "
                "with a call, or logging in, and how many calls wait for one. Changes nothing.", argv, _show)


def _run(command: str, description: str, argv: list[str], action: Callable[[], None]) -> int:
    """Parse `argv` (these commands take no config), then run `action`; a socket directory we may not read is one
    line on stderr."""
    parsed = parse_args(command_parser(command, description, config_help=None), argv)
    if isinstance(parsed, int):
        return parsed
    from sftp_plugin import forkserver

    try:
        action()
    except OSError as err:
        return fail(command, f"{err}; check the permissions of {forkserver.runtime_dir()}", 1)
    return 0


def _stop() -> None:
    from sftp_plugin import forkserver

    stopped = forkserver.stop_servers()
    for pid in stopped:
        print(f"stopped fork server pid {pid}")
    if not stopped:
        print("no fork server was running")


def _show() -> None:
    from sftp_plugin import forkserver

    servers = forkserver.running_servers()
    if not servers:
        print("no fork server is running")
    for path, pid, this_code in servers:
        if not this_code:  # it would not understand the question (see forkserver.server_status)
            print(f"fork server pid {pid}: another installed copy or version of the plugin "
                  f"({os.path.basename(path).removesuffix('.sock')}); stop-fork-server stops it")
            continue
        try:
            report = forkserver.server_status(path)
        except PermissionError as err:  # as it would refuse this process's calls
            print(f"fork server pid {pid}: tells this process nothing: {err} (its log says how)")
            continue
        if report is None:
            print(f"fork server pid {pid}: did not answer (starting, or stopping)")
            continue
        print(_server_line(report))
        routes = report.get("routes") or []
        for route in routes:
            print("  " + _route_line(route))
        if not routes:
            print("  no worker now, so no session kept; the server exits after a minute without calls")


def _server_line(report: dict) -> str:
    up = time.time() - report["since"]
    line = (f"fork server pid {report['pid']}, up {f'{up:.0f}s' if up < 60 else human_age(up)}: "
            f"{_count(report['calls'], 'call')}, {report['warm_calls']} of them by a warm worker")
    if report["spares"]:
        line += f"; {_count(report['spares'], 'spare worker')} started"
    if report["capped_waits"]:
        line += f"; {_count(report['capped_waits'], 'call')} waited at max_connections"
    if report["sent_back"]:
        line += f"; {_count(report['sent_back'], 'call')} sent back to run in their own process (fork_server: no)"
    return line


def _route_line(route: dict) -> str:
    """One config's line: what it is (from a call of it), then its workers and the calls waiting."""
    if route["sent_back"]:
        return "a config with fork_server: no: its calls run in their own process, each with its own login"
    sessions = "its SSH session" if route["idle"] == 1 else "their SSH sessions"
    parts = [(route["idle"], f"{route['idle']} idle, keeping {sessions}"),
             (route["busy"], f"{route['busy']} busy with a call"),
             (route["starting"], f"{route['starting']} logging in as a spare")]
    workers = ", ".join(part for count, part in parts if count)
    line = f"{_config_of(route.get('call'))}: " + (f"{_count(route['workers'], 'worker')}: {workers}" if workers
                                                    else "no worker")
    if route["waiting"]:
        line += f"; {_count(route['waiting'], 'call')} waiting for one"
    if route["cap"]:
        line += f" (max_connections {route['cap']})"
    return line


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" if number == 1 else f"{number} {thing}s"


def _config_of(call: dict | None) -> str:
    """The config a route's calls name, with the backup host it says now; what the server could not tell."""
    if not call or len(call.get("argv") or []) < 2:
        return "a config none of whose calls has started yet"  # a slot tells the server as its first call starts
    from sftp_plugin.config import load_config
    from sftp_plugin.errors import PluginError

    path = os.path.join(call["cwd"], call["argv"][1])
    try:
        cfg = load_config(path)
    except PluginError:
        return f"config {path} (now unreadable or invalid: its workers end within a second)"
    host = cfg.hostname if cfg.port is None else f"{cfg.hostname}:{cfg.port}"
    return f"config {path} (backup host {host if cfg.username is None else f'{cfg.username}@{host}'})"
