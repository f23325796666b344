"""Unit tests of retry.py: which failures a new connection can fix (the one predicate), and what that means for the
number of attempts."""

from __future__ import annotations

import errno
import socket

import paramiko
import pytest

from sftp_plugin.errors import AuthError, ConnectError, HostKeyError, RemoteError
from sftp_plugin.retry import call_with_retries, is_connection_lost

# Short enough that a test making several attempts waits next to nothing; not a timing assertion.
NO_WAIT = 0.001


def reported_by_connect(cause: BaseException) -> ConnectError:
    """A ConnectError as connection.connect raises it: `raise ConnectError(...) from cause`."""
    error = ConnectError("cannot connect to backup:22", "check the network")
    error.__cause__ = cause
    return error


def name_error(code: int) -> socket.gaierror:
    return socket.gaierror(code, "as getaddrinfo says it")


# (what failed, whether a new connection may fix it)
CASES: list[tuple[str, BaseException, bool]] = [
    # the name lookup: "no such name" is DNS's final word; "no answer yet" may pass
    ("no such name", reported_by_connect(name_error(socket.EAI_NONAME)), False),
    ("name without an address", reported_by_connect(name_error(socket.EAI_NODATA)), False),
    ("non-recoverable DNS failure", reported_by_connect(name_error(socket.EAI_FAIL)), False),
    ("temporary DNS failure", reported_by_connect(name_error(socket.EAI_AGAIN)), True),
    ("no such name, unwrapped", name_error(socket.EAI_NONAME), False),
    ("temporary DNS failure, unwrapped", name_error(socket.EAI_AGAIN), True),
    # the handshake
    ("no cipher in common", reported_by_connect(paramiko.IncompatiblePeer("no acceptable ciphers")), False),
    ("no algorithm in common, unwrapped", paramiko.IncompatiblePeer("no acceptable kex algorithm"), False),
    ("handshake dropped (MaxStartups)", reported_by_connect(paramiko.SSHException("Error reading SSH protocol "
                                                                                    "banner")), True),
    ("EOF during the handshake", reported_by_connect(EOFError()), True),
    # a jump host forwarding (ProxyJump): its configuration says no; or the target is down for now
    ("forwarding prohibited by the jump host", reported_by_connect(paramiko.ChannelException(1, "prohibited")), False),
    ("forwarding target refused", reported_by_connect(paramiko.ChannelException(2, "connect failed")), True),
    # the TCP connection
    ("connection refused", reported_by_connect(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), True),
    ("connect timed out", reported_by_connect(TimeoutError("timed out")), True),
    ("a ConnectError of its own", ConnectError("the SSH session broke"), True),
    ("connection reset", OSError(errno.ECONNRESET, "reset"), True),
    ("socket closed under us", OSError("Socket is closed"), True),
    ("read timed out", socket.timeout("timed out"), True),
    ("transport dropped", paramiko.SSHException("SSH session not active"), True),
    # the server's answer, or ours
    ("authentication refused", AuthError("authentication failed"), False),
    ("authentication refused by paramiko", paramiko.AuthenticationException("failed"), False),
    ("host key refused", HostKeyError("host key changed"), False),
    ("permission denied", PermissionError(errno.EACCES, "denied"), False),
    ("disk full", OSError(errno.ENOSPC, "no space"), False),
    ("no such file", FileNotFoundError(errno.ENOENT, "missing"), False),
    ("an SFTP failure reported", RemoteError("Failure"), False),
    ("a bug", ValueError("unexpected"), False),
]


@pytest.mark.parametrize(("error", "retried"), [(error, retried) for _, error, retried in CASES],
                         ids=[what for what, _, _ in CASES])
def test_is_connection_lost_retries_only_what_a_new_connection_can_fix(error: BaseException, retried: bool) -> None:
    assert is_connection_lost(error) is retried


def test_a_permanent_failure_is_tried_once_and_raised_unchanged() -> None:
    error = reported_by_connect(name_error(socket.EAI_NONAME))
    calls = []

    def action() -> None:
        calls.append(1)
        raise error

    with pytest.raises(ConnectError) as caught:
        call_with_retries("connect", 6, NO_WAIT, action)
    assert caught.value is error
    assert len(calls) == 1


def test_a_lost_connection_is_tried_as_often_as_allowed_and_says_so() -> None:
    calls = []

    def action() -> None:
        calls.append(1)
        raise reported_by_connect(name_error(socket.EAI_AGAIN))

    with pytest.raises(ConnectError) as caught:
        call_with_retries("connect", 3, NO_WAIT, action)
    assert len(calls) == 3
    assert "failed after 3 attempts" in caught.value.message


def test_an_attempt_that_got_further_starts_the_count_again() -> None:
    # Ten resets, each after the transfer got 100 bytes further: three attempts in a row without progress
    # are never used up, so the transfer gets through.
    done = [0]

    def action() -> int:
        done[0] += 100
        if done[0] < 1000:
            raise EOFError()
        return done[0]

    assert call_with_retries("upload", 3, NO_WAIT, action, progress=lambda: done[0]) == 1000


def test_attempts_without_progress_are_counted_even_after_some_with_it() -> None:
    done, calls = [0], []

    def action() -> None:
        calls.append(1)
        if len(calls) <= 4:
            done[0] += 100  # four attempts get further, then none does
        raise EOFError()

    with pytest.raises(ConnectError) as caught:
        call_with_retries("upload", 3, NO_WAIT, action, progress=lambda: done[0])
    # The fourth attempt got further, so the count starts again there: it and the next two fail in a row.
    assert len(calls) == 4 + 2
    assert "failed after 3 attempts" in caught.value.message
