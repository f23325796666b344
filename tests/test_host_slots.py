"""host_slots: at most N holders of a pool's slots at once, across processes, by flock'd files in a directory.

Plain files in a temporary directory and child processes; no network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftp_plugin import host_slots

pytestmark = pytest.mark.unit

# A holder in another process: takes a slot of pool "backup:22" (2 slots), says which, and keeps it until killed.
HOLDER = ("import sys, time\nfrom sftp_plugin import host_slots\n"
          "slot = host_slots.take(sys.argv[1], 'backup:22', 2)\nprint(slot.index, flush=True)\ntime.sleep(60)\n")


def take_within(seconds: float, directory: Path) -> host_slots.Slot:
    """A slot of "backup:22" (2 slots), or a failure after `seconds` instead of waiting for good."""

    def too_long(_signum: int, _frame: object) -> None:
        raise AssertionError(f"no slot within {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return host_slots.take(str(directory), "backup:22", 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_each_holder_gets_a_slot_of_its_own_up_to_the_cap(tmp_path: Path) -> None:
    first = host_slots.take(str(tmp_path), "backup:22", 2)
    second = host_slots.take(str(tmp_path), "backup:22", 2)
    assert {first.index, second.index} == {0, 1}
    other_pool = host_slots.take(str(tmp_path), "other:22", 2)  # another pool's slots are its own
    assert other_pool.index == 0
    for slot in (first, second, other_pool):
        slot.release()


def test_a_taker_beyond_the_cap_waits_until_a_slot_is_let_go(tmp_path: Path) -> None:
    held = [host_slots.take(str(tmp_path), "backup:22", 2) for _ in range(2)]
    waits: list[float] = []
    waiter = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert waiter.poll() is None
        assert waiter.stdout is not None
        held[1].release()
        assert waiter.stdout.readline() == b"1\n"  # the slot let go, once it was
    finally:
        waiter.kill()
        waiter.wait()
    # Its process gone, its slot is free again; on_wait was never called for a free one.
    assert host_slots.take(str(tmp_path), "backup:22", 2, on_wait=lambda: waits.append(1.0)).index == 1
    assert waits == []
    held[0].release()


def test_a_killed_holder_never_leaves_its_slot_taken(tmp_path: Path) -> None:
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE)
               for _ in range(2)]
    try:
        for holder in holders:
            assert holder.stdout is not None and holder.stdout.readline() in (b"0\n", b"1\n")
        holders[0].send_signal(signal.SIGKILL)
        take_within(10, tmp_path).release()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_the_wait_calls_on_wait_once_and_ends_with_the_exception_of_a_signal(tmp_path: Path) -> None:
    held = host_slots.take(str(tmp_path), "backup:22", 1)
    calls: list[int] = []

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            host_slots.take(str(tmp_path), "backup:22", 1, on_wait=lambda: calls.append(1))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert calls == [1]
    held.release()


def test_held_lists_each_pool_with_the_pids_holding_its_slots_taking_nothing(tmp_path: Path) -> None:
    assert host_slots.held(str(tmp_path)) == {}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"0\n"
        mine = host_slots.take(str(tmp_path), "other:2222", 1)
        assert host_slots.held(str(tmp_path)) == {"backup:22": [holder.pid], "other:2222": [os.getpid()]}
        beside = take_within(10, tmp_path)
        assert beside.index == 1  # asking took no slot of the holder's pool
        for slot in (beside, mine):
            slot.release()
    finally:
        holder.kill()
        holder.wait()
    assert host_slots.held(str(tmp_path)) == {}  # the files stay; no one holds them
