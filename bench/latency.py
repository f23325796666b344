"""A high-latency link for the bench: a network namespace holding a second sshd, behind a delayed veth pair.

The backup host's sshd runs inside a private network namespace; both clients
stay in the root namespace and reach it over a veth pair whose two ends each
get ``tc netem delay <rtt/2>``, so every round trip pays the full RTT. Every
step is undone on exit, in reverse order, also after an error or Ctrl-C. A
step that cannot be done (not root, no ``ip``/``tc``, no netem in the kernel)
raises LinkUnavailable with the reason, after undoing what was already set up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from devtools.sshd import SshServer, known_hosts_line, start_entrypoint, stop_entrypoint, wait_for_ssh_banner

# A /24 from RFC 1918 space that Docker, libvirt and common LANs do not use by default.
SUBNET = "10.203.0.0/24"
CLIENT_ADDR = "10.203.0.1"  # root namespace end: where both clients run
SERVER_ADDR = "10.203.0.2"  # namespace end: where the sshd listens
PREFIX_LEN = 24
# The namespace has a port space of its own, so a fixed port is always free there.
SERVER_PORT = 2222
# netem's default queue is 1000 packets (~1.5 MB of 1500-byte frames): at
# loopback speeds and 20 ms RTT more than that is in flight, and the drops would
# measure netem instead of the clients. This limit never drops in practice.
NETEM_LIMIT = 100_000
# How long one `ip`/`tc` step may take; they answer in milliseconds.
STEP_TIMEOUT = 30
# How long sshd processes get to exit on SIGTERM before SIGKILL; they exit at once unless wedged.
STOP_TIMEOUT = 10


class LinkUnavailable(Exception):
    """The delayed link cannot be built here; the message says which step failed and why."""


class DelayedLink:
    """Context manager: set up the namespace, veth pair, netem delay and sshd; tear all of it down on exit."""

    def __init__(self, server: SshServer, workdir: Path, rtt_ms: float) -> None:
        self.server = server
        self.workdir = workdir
        self.rtt_ms = rtt_ms
        tag = os.getpid() % 100_000
        self.namespace = f"gpbench{tag}"
        self.veth_client = f"gpbc{tag}"  # interface names are limited to 15 characters
        self.veth_server = f"gpbs{tag}"
        self.server_dir = workdir / "ns-server"
        self.known_hosts = workdir / "ns_known_hosts"
        self.log_path = workdir / "ns-sshd.log"
        self.port = SERVER_PORT
        self.host = SERVER_ADDR
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._sshd: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DelayedLink:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self, what: str, argv: list[str]) -> None:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LinkUnavailable(f"{what}: `{' '.join(argv)}` could not run: {err}") from None
        if result.returncode != 0:
            detail = " ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}"
            raise LinkUnavailable(f"{what}: `{' '.join(argv)}` failed: {detail}")

    def _build(self) -> None:
        if os.geteuid() != 0:
            raise LinkUnavailable("creating network namespaces and qdiscs needs root (CAP_NET_ADMIN)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise LinkUnavailable(f"`{tool}` is not installed (apt-get install iproute2)")
        in_use = subprocess.run(["ip", "-o", "addr", "show", "to", SUBNET], capture_output=True, text=True)
        if in_use.stdout.strip():
            raise LinkUnavailable(f"subnet {SUBNET} is already used on this host: {in_use.stdout.split()[1]}")

        ns_exec = ["ip", "netns", "exec", self.namespace]
        self._step("create network namespace", ["ip", "netns", "add", self.namespace])
        self._undo.append(("delete namespace", lambda: self._quiet(["ip", "netns", "del", self.namespace])))
        self._step("create veth pair", ["ip", "link", "add", self.veth_client, "type", "veth",
                                        "peer", "name", self.veth_server])
        # Deleting one end deletes its peer and both qdiscs, wherever the peer lives.
        self._undo.append(("delete veth pair", lambda: self._quiet(["ip", "link", "del", self.veth_client])))
        self._step("move veth end into namespace", ["ip", "link", "set", self.veth_server, "netns", self.namespace])
        self._step("address client end", ["ip", "addr", "add", f"{CLIENT_ADDR}/{PREFIX_LEN}", "dev", self.veth_client])
        self._step("address server end", [*ns_exec, "ip", "addr", "add", f"{SERVER_ADDR}/{PREFIX_LEN}",
                                          "dev", self.veth_server])
        self._step("bring up client end", ["ip", "link", "set", self.veth_client, "up"])
        self._step("bring up server end", [*ns_exec, "ip", "link", "set", self.veth_server, "up"])
        self._step("bring up namespace loopback", [*ns_exec, "ip", "link", "set", "lo", "up"])
        if self.rtt_ms > 0:
            delay = f"{self.rtt_ms / 2:g}ms"  # half on each end: a round trip crosses both
            netem = ["root", "netem", "delay", delay, "limit", str(NETEM_LIMIT)]
            try:
                self._step("add netem delay", ["tc", "qdisc", "add", "dev", self.veth_client, *netem])
            except LinkUnavailable as err:
                if "unknown" in str(err).lower():
                    raise LinkUnavailable(f"this kernel ({os.uname().release}) has no netem qdisc (sch_netem not "
                                          f"built or not loadable), so no delay can be added ({err})") from None
                raise
            self._step("add netem delay on server end", [*ns_exec, "tc", "qdisc", "add", "dev", self.veth_server,
                                                         *netem])
        self._start_sshd(ns_exec)

    def _start_sshd(self, ns_exec: list[str]) -> None:
        # Same host keys as the loopback server, in a directory of its own (the entrypoint writes
        # sshd_config and the pid file there).
        self.server_dir.mkdir(parents=True, exist_ok=True)
        for key in self.server.server_dir.glob("ssh_host_*_key*"):
            shutil.copy2(key, self.server_dir / key.name)
        self._sshd = start_entrypoint(self.server_dir, self.port, self.server.authorized_keys, self.log_path,
                                      listen=SERVER_ADDR, prefix=tuple(ns_exec), REMOTE_DIR=str(self.server.remote_dir),
                                      SSHD_MAX_STARTUPS=self.server.max_startups)
        self._undo.append(("stop namespace sshd", self._stop_sshd))
        self._wait_for_sshd()
        self.known_hosts.write_text(known_hosts_line(self.server_dir, SERVER_ADDR, self.port))

    def _wait_for_sshd(self) -> None:
        try:
            wait_for_ssh_banner(SERVER_ADDR, self.port, self._sshd, self.log_path)
        except RuntimeError as err:
            raise LinkUnavailable(f"sshd in the namespace: {err}") from None

    def _stop_sshd(self) -> None:
        if self._sshd is not None:
            stop_entrypoint(self._sshd, STOP_TIMEOUT)
        self._sshd = None
        # sshd's per-connection children start sessions of their own, so killing the listener's group
        # misses them; once the veth is gone they would wait forever for their client. Everything in
        # this private namespace was started by us: end it all.
        self._kill_namespace_processes(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._namespace_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill_namespace_processes(signal.SIGKILL)

    def _namespace_pids(self) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True,
                                timeout=STEP_TIMEOUT)
        return [int(pid) for pid in result.stdout.split() if pid.isdigit()]

    def _kill_namespace_processes(self, signum: int) -> None:
        for pid in self._namespace_pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    @staticmethod
    def _quiet(argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(" ".join(result.stderr.split()))

    def close(self) -> None:
        """Undo every step done so far, newest first; report (not raise) what could not be undone."""
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as err:  # noqa: BLE001 - keep undoing the other steps
                print(f"bench: teardown: could not {what}: {err}", file=sys.stderr)
