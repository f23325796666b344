"""interrupts.interrupt_aborts: what SIGINT does while a command runs (signals raised in this process)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from sftp_plugin.interrupts import interrupt_aborts


@pytest.fixture(autouse=True)
def sigint_restored() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_aborts_the_connection_before_raising_keyboard_interrupt() -> None:
    aborted: list[bool] = []

    def abort() -> None:
        aborted.append(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)

    with pytest.raises(KeyboardInterrupt), interrupt_aborts(abort):
        signal.raise_signal(signal.SIGINT)
    assert aborted == [True]  # once, with further interrupts already ignored


def test_a_second_sigint_is_ignored_once_the_first_has_fired() -> None:
    with pytest.raises(KeyboardInterrupt), interrupt_aborts(lambda: None):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.raise_signal(signal.SIGINT)  # nothing happens: the call is already ending


def test_without_an_interrupt_the_default_handler_comes_back() -> None:
    with interrupt_aborts(lambda: None):
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigint_ignored_by_whoever_started_us_stays_ignored() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    aborted: list[bool] = []
    with interrupt_aborts(lambda: aborted.append(True)):
        signal.raise_signal(signal.SIGINT)
    assert aborted == []
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
