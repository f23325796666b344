"""The one retry policy: which failures a new connection can fix, and how long to wait.

Built on tenacity: exponential backoff with full jitter (so hundreds of
segments that failed together do not come back together), bounded by the
``retries`` option (attempts in all). Authentication, host key, permission,
missing-file and disk-full errors are never retried: a new connection cannot
fix them, and retrying a bad password can lock an account. Nor are the
answers that stay the same however often we ask: a server with no algorithm
in common, a host name that does not exist.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import TypeVar

import paramiko
import tenacity

from sftp_plugin.errors import ConnectError

log = logging.getLogger(__name__)
T = TypeVar("T")

# First backoff ceiling; doubles each attempt up to max_wait. One second lets a
# MaxStartups burst (10 pending handshakes) drain before we knock again.
INITIAL_WAIT = 1.0
# OS errors a new connection can fix; everything else (EACCES, ENOSPC, ENOENT...) is final.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    }
)


# getaddrinfo answers meaning "there is no such name" (or no address for it): the DNS gave its final word, and
# asking again gives the same answer. EAI_AGAIN (the DNS server did not answer in time) is not among them: that
# one may pass. (EAI_NODATA is glibc's; other platforms fold it into EAI_NONAME, hence getattr.)
PERMANENT_NAME_ERRORS = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL") if hasattr(socket, name)
)
# The other getaddrinfo answer a new attempt can fix.
TRANSIENT_NAME_ERRORS = frozenset({socket.EAI_AGAIN})
# Answers a new connection cannot change: the server's or the resolver's final word, not a lost connection.
PERMANENT_ERRORS = (
    paramiko.AuthenticationException,
    paramiko.BadHostKeyException,
    # Raised when the server and we share no key exchange, host key, cipher, MAC or compression algorithm
    # (or SSH version): the server's configuration, the same on every attempt.
    paramiko.IncompatiblePeer,
)
# A jump host's refusals of a forwarding channel (RFC 4254 5.1) that are its configuration, not its state:
# "administratively prohibited" (AllowTcpForwarding no) and "unknown channel type". "Connect failed" (the
# target is down) and "resource shortage" may pass.
PERMANENT_CHANNEL_REFUSALS = frozenset({1, 3})


def is_permanent(error: BaseException) -> bool:
    """True for an answer no new connection can change (no such host name, no common algorithm, auth refused)."""
    if isinstance(error, PERMANENT_ERRORS):
        return True
    if isinstance(error, paramiko.ChannelException):
        return error.code in PERMANENT_CHANNEL_REFUSALS
    return isinstance(error, socket.gaierror) and error.errno in PERMANENT_NAME_ERRORS


def is_connection_lost(error: BaseException) -> bool:
    """True when the error means "the connection failed" (worth a new one), not "the answer was no".

    The one predicate the retry policy asks. A ConnectError (connection.connect's report of a failed
    connection) is retried unless what it reports, its cause, is permanent.
    """
    if isinstance(error, ConnectError):
        return error.__cause__ is None or not is_permanent(error.__cause__)
    if is_permanent(error):
        return False
    if isinstance(error, socket.gaierror):
        return error.errno in TRANSIENT_NAME_ERRORS
    if isinstance(error, (socket.timeout, TimeoutError, EOFError, paramiko.SSHException)):
        return True
    if isinstance(error, OSError):
        return error.errno in TRANSIENT_ERRNOS or (error.errno is None and "closed" in str(error).lower())
    return False


def _log_before_sleep(what: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: attempt %d failed (%s); retrying in %.1fs",
            what,
            state.attempt_number,
            describe(error),
            state.next_action.sleep if state.next_action else 0.0,
        )

    return before_sleep


def describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    return str(error) or type(error).__name__


def call_with_retries(
    what: str, attempts: int, max_wait: float, action: Callable[[], T], on_retry: Callable[[], None] | None = None,
    progress: Callable[[], int] | None = None,
) -> T:
    """Run ``action`` until it succeeds, fails for good, or ``attempts`` are used up.

    ``on_retry`` runs before each new attempt (e.g. to drop a broken session).
    ``progress``, for an action that resumes where the last attempt stopped: how far
    it has got (bytes acknowledged or delivered). An attempt that got further before
    its connection was lost starts the count and the backoff again, so ``attempts``
    bounds the failures in a row without progress, not the resets a long transfer
    over a flaky link meets in all.
    A lost connection that outlasts several attempts is re-raised as a ConnectError
    that says how many were made; any other error is re-raised unchanged.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_random_exponential(multiplier=INITIAL_WAIT, max=max_wait),
        retry=tenacity.retry_if_exception(is_connection_lost),
        before_sleep=_log_before_sleep(what),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                if on_retry is not None and attempt.retry_state.attempt_number > 1:
                    on_retry()
                reached = progress() if progress is not None else 0
                try:
                    return action()
                except BaseException:
                    if progress is not None and progress() > reached:
                        # The stop and the wait read attempt_number (a RetryCallState attribute): from 1, this
                        # failure is the first of a new run.
                        attempt.retry_state.attempt_number = 1
                    raise
    except BaseException as error:
        if is_connection_lost(error) and attempts > 1:
            message = getattr(error, "message", None) or describe(error)
            raise ConnectError(
                f"{what} failed after {attempts} attempts: {message}",
                getattr(error, "hint", "") or "check the network and the backup host's sshd",
            ) from error
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")
