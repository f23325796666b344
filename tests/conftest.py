"""Fixtures: one real sshd for the session, the installed plugin in an isolated environment, per-test configs."""

from __future__ import annotations

import inspect
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.gpbackup import LocalBackup, make_local_backup
from devtools.harness import Plugin, SiteConfig
from devtools.sshd import SshServer
from tests import helpers
from tests.helpers import session_plugin, sshd_fixture

# A shell without job control starts background commands (`make test &`) with SIGINT ignored, and an
# ignored signal stays ignored across exec: every plugin the tests start would then ignore SIGINT, as
# the plugin must (a SIGINT its starter ignores stays ignored), and the tests that send one would hang.
# A handler, unlike SIG_IGN, is reset to the default in the children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def no_fork_server_outlives_the_session() -> Iterator[None]:
    """The suite's plugin calls share a TMPDIR of their own; the fork server they leave there is stopped
    at the end (it would idle out in a minute), and no other server of this user is touched."""
    tmpdir = tempfile.mkdtemp(prefix="gpsftp-tests.")  # short: a Unix socket path holds 107 bytes
    helpers.SESSION_TMPDIR = tmpdir
    yield
    session_plugin(Path(tmpdir)).stop_fork_server()
    helpers.SESSION_TMPDIR = None
    shutil.rmtree(tmpdir, ignore_errors=True)


# One OpenSSH server on 127.0.0.1 for the whole session; tests keep to their own remote subdirectory.
sshd = sshd_fixture("sshd", scope="session")
# A server of its own, for a test that changes server state (e.g. authorized_keys).
fresh_sshd = sshd_fixture("sshd_fresh")


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    home = tmp_path / "home"
    home.mkdir()
    return session_plugin(home)


@pytest.fixture
def config(sshd: SshServer, tmp_path: Path, request: pytest.FixtureRequest) -> SiteConfig:
    """A plugin config for the session server with this test's own (existing) remote_dir and log_dir."""
    return SiteConfig.create(sshd, tmp_path, request.node.name)


@pytest.fixture
def fresh_config(fresh_sshd: SshServer, tmp_path: Path, request: pytest.FixtureRequest) -> SiteConfig:
    return SiteConfig.create(fresh_sshd, tmp_path, request.node.name)


@pytest.fixture
def make_backup(tmp_path: Path) -> Callable[..., LocalBackup]:
    """Factory: make_backup(timestamp=None, segment="gpseg0") -> a local backups/<date>/<timestamp> dir."""

    def make(timestamp: str | None = None, segment: str = "gpseg0", create: bool = True) -> LocalBackup:
        return make_local_backup(tmp_path / "local", timestamp, segment, create)

    return make


@pytest.fixture
def backup(make_backup: Callable[..., LocalBackup]) -> LocalBackup:
    """A local gpbackup-shaped directory with a random timestamp."""
    return make_backup()


# ---------------------------------------------------------------- the two tiers

# What makes a test a behaviour test (the `sshd` tier): it, or a fixture it uses, starts an sshd, runs
# the installed plugin or another process. Everything else is a unit test of a pure module (`unit`):
# `make unit` runs those alone, in seconds.
BEHAVIOUR_FIXTURES = frozenset({"plugin", "sshd", "fresh_sshd"})
BEHAVIOUR_MARKS = ("SshServer(", "subprocess", "PLUGIN", "Popen", "os.fork", "socket.socketpair")


def _runs_the_real_thing(item: pytest.Item) -> bool:
    if BEHAVIOUR_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for definitions in (info.name2fixturedefs.values() if info is not None else ()):
        functions += [definition.func for definition in definitions]
    for function in functions:
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            continue
        if any(mark in source for mark in BEHAVIOUR_MARKS):
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: a test of a pure module (make unit)")
    config.addinivalue_line("markers", "sshd: a behaviour test: a real sshd, the installed plugin, a process")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.sshd if _runs_the_real_thing(item) else pytest.mark.unit)
