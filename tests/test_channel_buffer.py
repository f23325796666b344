"""ChunkedPipe behaves exactly like paramiko's BufferedPipe, which it replaces on our SFTP channel."""

from __future__ import annotations

import random
import threading
import time

import pytest
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout

from sftp_plugin.fastpath.channel import MAX_FRAME, ChunkedPipe, FrameTooLong


@pytest.mark.parametrize("seed", range(20))
def test_random_feeds_and_reads_return_what_the_original_returns(seed: int) -> None:
    rng = random.Random(seed)
    ours, theirs = ChunkedPipe(), BufferedPipe()
    for _ in range(300):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.choice([0, 1, 4, 100, 32768, 70000]))
            # Channel data from packetizer.py arrives as views of decrypted packets.
            ours.feed(memoryview(data) if rng.random() < 0.5 else data)
            theirs.feed(data)
        elif len(theirs):
            size = rng.choice([1, 4, 5, 1000, 32768, 261120, 10**7])
            got = ours.read(size, timeout=0)
            assert type(got) is bytes
            assert got == theirs.read(size, timeout=0)
        assert len(ours) == len(theirs)
        assert ours.read_ready() == theirs.read_ready()
    rest = ours.empty()
    assert type(rest) is bytes
    assert rest == theirs.empty()
    assert len(ours) == 0


def test_a_read_spanning_chunks_returns_them_joined_and_keeps_the_rest() -> None:
    pipe = ChunkedPipe()
    for chunk in (b"abc", b"defg", b"hij"):
        pipe.feed(chunk)
    assert pipe.read(5) == b"abcde"
    assert pipe.read(100) == b"fghij"
    assert len(pipe) == 0


def test_an_empty_pipe_times_out_and_a_closed_one_returns_eof() -> None:
    pipe = ChunkedPipe()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0)
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.05)
    pipe.feed(b"last")
    pipe.close()
    assert pipe.read(10) == b"last"  # what was fed before close is still delivered
    assert pipe.read(10) == b""


def test_a_blocked_reader_wakes_on_feed_and_on_close() -> None:
    pipe = ChunkedPipe()
    results: list[bytes] = []
    reader = threading.Thread(target=lambda: results.append(pipe.read(10, timeout=10)))
    reader.start()
    time.sleep(0.05)
    pipe.feed(b"hello")
    reader.join(5)
    assert results == [b"hello"]

    reader = threading.Thread(target=lambda: results.append(pipe.read(10, timeout=10)))
    reader.start()
    time.sleep(0.05)
    pipe.close()
    reader.join(5)
    assert results == [b"hello", b""]


def test_the_event_is_set_while_data_waits_and_cleared_once_drained() -> None:
    pipe, event = ChunkedPipe(), threading.Event()
    pipe.set_event(event)
    assert not event.is_set()
    pipe.feed(b"xy")
    assert event.is_set()
    pipe.read(1)
    assert event.is_set()
    pipe.read(1)
    assert not event.is_set()
    pipe.close()
    assert event.is_set()


def test_a_mutable_buffer_is_copied_when_fed_so_later_changes_do_not_show() -> None:
    pipe, data = ChunkedPipe(), bytearray(b"original")
    pipe.feed(data)
    pipe.feed(memoryview(data))  # writable view of the same buffer
    data[:] = b"changed!"
    assert pipe.read(100) == b"originaloriginal"


# ---------------------------------------------------------------- whole SFTP packets (read_frame)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("seed", range(10))
def test_frames_fed_in_any_pieces_come_out_whole_and_in_order(seed: int) -> None:
    rng = random.Random(seed)
    bodies = [rng.randbytes(rng.choice([0, 1, 3, 100, 32768, 261133])) for _ in range(30)]
    stream = b"".join(frame(body) for body in bodies)
    pipe = ChunkedPipe()
    at = 0
    while at < len(stream):  # pieces of any size: a length field cut in two, a body in many
        size = rng.choice([1, 2, 3, 5, 1000, 32768, 70000])
        pipe.feed(memoryview(stream[at : at + size]) if rng.random() < 0.5 else stream[at : at + size])
        at += size
    got = [pipe.read_frame(timeout=0.5) for _ in bodies]
    assert all(type(item) is bytes for item in got)
    assert got == [frame(body) for body in bodies]
    assert len(pipe) == 0


def test_a_frame_reader_waits_for_the_last_piece_and_returns_the_frame_whole() -> None:
    pipe = ChunkedPipe()
    whole = frame(b"x" * 5000)
    pipe.feed(whole[:2])  # not even the length yet
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_frame(timeout=10)))
    reader.start()
    pipe.feed(whole[2:3000])
    time.sleep(0.1)
    assert not got  # the length is known, the body is not all there
    pipe.feed(whole[3000:] + frame(b"next"))
    reader.join(10)
    assert got == [whole]
    assert pipe.read_frame(timeout=0) == frame(b"next")


def test_a_frame_reader_times_out_and_a_channel_closed_mid_frame_gives_eof() -> None:
    pipe = ChunkedPipe()
    pipe.feed(frame(b"complete")[:-1])
    with pytest.raises(PipeTimeout):
        pipe.read_frame(timeout=0.05)
    pipe.close()
    assert pipe.read_frame(timeout=0.05) == b""


def test_a_frame_that_keeps_coming_is_read_however_long_it_takes_and_the_timeout_counts_time_without_bytes(
        ) -> None:
    # The channel's timeout is io_timeout: no progress for that long. A packet that takes longer over a slow
    # link, piece by piece, is no stall.
    pipe = ChunkedPipe()
    whole = frame(b"y" * 600)
    pieces = [whole[at : at + 100] for at in range(0, len(whole), 100)]

    def dribble() -> None:
        for piece in pieces:
            time.sleep(0.2)
            pipe.feed(piece)

    feeder = threading.Thread(target=dribble)
    started = time.monotonic()
    feeder.start()
    assert pipe.read_frame(timeout=1.0) == whole
    assert time.monotonic() - started > 1.0  # longer than the timeout in all, each piece within it
    feeder.join()
    with pytest.raises(PipeTimeout):
        pipe.read_frame(timeout=0.2)


def test_a_frame_length_no_sftp_packet_could_have_is_refused_before_waiting_for_it() -> None:
    pipe = ChunkedPipe()
    pipe.feed((MAX_FRAME + 1).to_bytes(4, "big") + b"garbage")
    with pytest.raises(FrameTooLong):
        pipe.read_frame(timeout=10)  # at once: not after 10 s, nor after 16 MiB
