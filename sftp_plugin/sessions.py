"""The SSH session a fork-server worker keeps between calls: warm sessions.

A call that succeeds in a worker hands its session here instead of closing
it, under the key of everything that decided it (connection.session_key).
The worker's next call computes its own key before connecting: the same key
gets the session, as long as its transport is up; any other key closes it
and connects anew. Between calls the worker asks `still_warm` about once a
second, and ends (closing the session) once the session has been idle for
its session_idle or its config no longer yields the same key.

This module knows sessions and keys, not commands, and not the fork server
that keeps the worker alive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftp_plugin.connection import Session

log = logging.getLogger(__name__)


class _Kept:
    def __init__(self, key: str, session: Session, idle_seconds: float, recheck: Callable[[], str]) -> None:
        self.key, self.session, self.idle_seconds, self.recheck = key, session, idle_seconds, recheck
        self.since = time.monotonic()


# At most one per process: a worker serves one call at a time, with one session.
_kept: _Kept | None = None
# How many sessions like the current call's may be kept at once (its config's max_connections, 0: no
# cap), for whoever hands out the calls; None until the call has loaded its config.
_cap: int | None = None
# The backup host that cap is about, as the call's config names it: sessions of other configs to it count too.
_pool: str | None = None


def take(key: str) -> Session | None:
    """The kept session if it was kept under `key` and is still up; None to connect anew."""
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    if kept.key == key and kept.session.transport.is_active():
        log.debug("reusing the session kept %.1fs ago", time.monotonic() - kept.since)
        return kept.session
    log.info("not reusing the kept session: %s", "its settings differ" if kept.key != key else "it was closed")
    _close(kept.session)
    return None


def keep(key: str, session: Session, idle_seconds: float, recheck: Callable[[], str]) -> None:
    """Keep `session` for the next call with `key`, for at most `idle_seconds` without one.

    ``recheck`` computes the key anew from the config on disk; raising, or a
    different key, means the session no longer fits and is closed.
    """
    global _kept
    close()
    _kept = _Kept(key, session, idle_seconds, recheck)


def is_kept() -> bool:
    return _kept is not None


def set_connection_cap(cap: int | None, backup_host: str | None = None) -> None:
    """What the current call's config says of its sessions (max_connections) and where they go (the
    backup host's name and port, after ~/.ssh/config in a worker); None at a call's start."""
    global _cap, _pool
    _cap, _pool = cap, backup_host


def connection_cap() -> int | None:
    """The current call's cap (set_connection_cap); None if it never loaded its config."""
    return _cap


def connection_pool() -> bytes | None:
    """What the current call's cap is shared with (set_connection_cap): its backup host; None if unknown."""
    return None if _pool is None else _pool.encode()


def still_warm() -> bool:
    """Whether the kept session should stay: not idle too long, still up, its config unchanged."""
    kept = _kept
    if kept is None:
        return False
    if time.monotonic() - kept.since >= kept.idle_seconds:
        log.info("closing the session kept for %gs without a call (session_idle)", kept.idle_seconds)
        return False
    if not kept.session.transport.is_active():
        return False
    try:
        same = kept.recheck() == kept.key
    except Exception as err:  # noqa: BLE001 - a config that no longer loads fits no session
        log.info("closing the kept session: its config no longer loads (%s)", err)
        return False
    if not same:
        log.info("closing the kept session: its config, known_hosts or keys changed")
    return same


def close() -> None:
    """Close the kept session, if any."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        _close(kept.session)


def _close(session: Session) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - closing a broken session must not fail anything
        log.debug("closing the kept session failed", exc_info=True)
