"""``stop-fork-server`` and ``fork-server-status``: this user's fork servers on this host (forkserver.py), stopped
or shown with the workers and SSH sessions they keep, config by config."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from sftp_plugin.admin.output import human_age
from sftp_plugin.admin.runner import command_parser, parse_args
from sftp_plugin.stderr import fail


def stop_fork_server(argv: list[str]) -> int:
    """``stop-fork-server``: stop this user's fork servers; calls in flight finish undisturbed."""
    parser = command_parser("stop-fork-server", "Stop the current user's plugin fork servers and close the SSH "
                            "sessions their workers keep (both also end by themselves after a minute without "
                            "calls). Calls in flight are not interrupted.", config_help=None)
    return _run(parser, argv, lambda _args: _stop())


def fork_server_status(argv: list[str]) -> int:
    """``fork-server-status [--json]``: each fork server of this user, and per config its workers and sessions."""
    parser = command_parser("fork-server-status", "Show the current user's plugin fork servers on this host: for "
                            "each config, how many workers it has, which of them are idle keeping an SSH session to "
                            "the backup host, busy with a call, or logging in, and how many calls wait for one; "
                            "then the connections that calls running in their own process hold under "
                            "max_connections. Changes nothing.", config_help=None)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of lines")
    return _run(parser, argv, lambda args: _show(_servers(), _own_process_connections(), args.json))


def _run(parser: argparse.ArgumentParser, argv: list[str], action: Callable[[argparse.Namespace], None]) -> int:
    """Parse `argv` (these commands take no config), then run `action`; a socket directory we may not read is one
    line on stderr."""
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    from sftp_plugin import forkserver

    try:
        action(args)
    except _StillRunning as err:
        return fail(parser.prog.split()[-1], str(err), 1)
    except OSError as err:
        return fail(parser.prog.split()[-1], f"{err}; check the permissions of {forkserver.runtime_dir()}", 1)
    return 0


class _StillRunning(Exception):
    """A fork server told to stop had not ended when stop-fork-server stopped waiting."""


def _stop() -> None:
    from sftp_plugin import forkserver

    stopped, running = forkserver.stop_servers()
    for pid in stopped:
        print(f"stopped fork server pid {pid}")
    if not stopped and not running:
        print("no fork server was running")
    if running:
        pids = [str(pid) for pid in running]
        raise _StillRunning(f"fork server pid {', '.join(pids)} still runs {forkserver.STOP_WAIT:g} s after "
                            f"SIGTERM; see its log, and end it with kill -KILL {' '.join(pids)}")


# What a server said when asked (_servers): its report; it refused this process; it did not answer; it runs other
# code, which would not understand the question (see forkserver.server_status), so it was not asked.
ANSWERED, REFUSED, SILENT, OTHER_CODE = "answered", "refused", "did not answer", "other code"


def _servers() -> list[dict[str, Any]]:
    """Each fork server of this user on this host, as fork-server-status --json prints it."""
    from sftp_plugin import forkserver

    servers: list[dict[str, Any]] = []
    for path, pid, this_code in forkserver.running_servers():
        server: dict[str, Any] = {"pid": pid, "version": os.path.basename(path).removesuffix(".sock")}
        servers.append(server)
        if not this_code:
            server["answer"] = OTHER_CODE
            continue
        try:
            report = forkserver.server_status(path)
        except PermissionError as err:  # as it would refuse this process's calls
            server.update(answer=REFUSED, why=str(err))
            continue
        if report is None:
            server["answer"] = SILENT
            continue
        server.update(answer=ANSWERED, up_seconds=round(time.time() - report["since"], 1),
                      **{key: report[key] for key in ("calls", "warm_calls", "spares", "capped_waits", "sent_back")},
                      configs=[_config_entry(route) for route in report.get("routes") or []])
    return servers


def _own_process_connections() -> list[dict[str, Any]]:
    """Per backup host, the connections that calls running in their own process hold under max_connections
    (host_slots, in the fork server's directory), with their pids."""
    from sftp_plugin import forkserver, host_slots

    directory = forkserver.runtime_dir()
    pools = host_slots.held(directory) if directory is not None else {}
    return [{"backup_host": pool, "connections": len(pids), "pids": pids} for pool, pids in pools.items()]


def _config_entry(route: dict[str, Any]) -> dict[str, Any]:
    """One route of a report as a config: its path and backup host (None where the server could not tell), its
    workers by what they do, the calls waiting, its cap and the workers of other configs to the same backup host
    that count against it; a config whose calls are sent back has fork_server: no."""
    config, backup_host, problem = _config_of(route.get("call"))
    return {"config": config, "backup_host": backup_host, "problem": problem, "fork_server": not route["sent_back"],
            **{key: route[key] for key in ("workers", "idle", "busy", "starting", "waiting")},
            "max_connections": route["cap"], "other_configs_workers": route.get("pool_workers", 0)}


def _config_of(call: dict[str, Any] | None) -> tuple[str | None, str | None, str | None]:
    """The config a route's calls name, the backup host it says now, and what is wrong with it now if anything."""
    if not call or len(call.get("argv") or []) < 2:
        return None, None, None  # a slot tells the server as its first call starts
    from sftp_plugin.config import load_config
    from sftp_plugin.errors import PluginError

    path = os.path.join(call["cwd"], call["argv"][1])
    try:
        cfg = load_config(path)
    except PluginError:
        return path, None, "now unreadable or invalid: its workers end within a second"
    host = cfg.hostname if cfg.port is None else f"{cfg.hostname}:{cfg.port}"
    return path, host if cfg.username is None else f"{cfg.username}@{host}", None


def _show(servers: list[dict[str, Any]], own_process: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"fork_servers": servers, "own_process_connections": own_process}, indent=2))
        return
    if not servers:
        print("no fork server is running")
    for server in servers:
        for line in _server_lines(server):
            print(line)
    for host in own_process:
        pids = ", ".join(str(pid) for pid in host["pids"] if pid)
        print(f"calls in their own process hold {_count(host['connections'], 'connection')} to backup host "
              f"{host['backup_host']} under max_connections" + (f" (pid {pids})" if pids else ""))


def _server_lines(server: dict[str, Any]) -> list[str]:
    pid, answer = server["pid"], server["answer"]
    if answer == OTHER_CODE:
        return [f"fork server pid {pid}: another installed copy or version of the plugin ({server['version']}); "
                "stop-fork-server stops it"]
    if answer == REFUSED:
        return [f"fork server pid {pid}: tells this process nothing: {server['why']} (its log says how)"]
    if answer == SILENT:
        return [f"fork server pid {pid}: did not answer (starting, or stopping)"]
    up = server["up_seconds"]
    line = (f"fork server pid {pid}, up {f'{up:.0f}s' if up < 60 else human_age(up)}: "
            f"{_count(server['calls'], 'call')}, {server['warm_calls']} of them by a warm worker")
    if server["spares"]:
        line += f"; {_count(server['spares'], 'spare worker')} started"
    if server["capped_waits"]:
        line += f"; {_count(server['capped_waits'], 'call')} waited at max_connections"
    if server["sent_back"]:
        line += f"; {_count(server['sent_back'], 'call')} sent back to run in their own process (fork_server: no)"
    configs = [f"  {_config_line(config)}" for config in server["configs"]]
    return [line, *(configs or ["  no worker now, so no session kept; the server exits after a minute without calls"])]


def _config_line(config: dict[str, Any]) -> str:
    """One config's line: what it is, then its workers and the calls waiting."""
    if not config["fork_server"]:
        return "a config with fork_server: no: its calls run in their own process, each with its own login"
    if config["config"] is None:
        name = "a config none of whose calls has started yet"
    else:
        name = f"config {config['config']} ({config['problem'] or 'backup host ' + config['backup_host']})"
    sessions = "its SSH session" if config["idle"] == 1 else "their SSH sessions"
    parts = [(config["idle"], f"{config['idle']} idle, keeping {sessions}"),
             (config["busy"], f"{config['busy']} busy with a call"),
             (config["starting"], f"{config['starting']} logging in as a spare")]
    workers = ", ".join(part for count, part in parts if count)
    line = f"{name}: " + (f"{_count(config['workers'], 'worker')}: {workers}" if workers else "no worker")
    if config["waiting"]:
        line += f"; {_count(config['waiting'], 'call')} waiting for one"
    if config["max_connections"]:
        others = config["other_configs_workers"]
        line += f" (max_connections {config['max_connections']}" + (
            f", counting {_count(others, 'worker')} of other configs to the same backup host)" if others else ")")
    return line


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" if number == 1 else f"{number} {thing}s"
