"""Write requests are sized so that each one travels in a single SSH packet."""

from __future__ import annotations

import struct

import pytest

from sftp_plugin import transfer

CMD_WRITE = 6


def write_request(handle: bytes, data_len: int) -> int:
    """Length on the wire of an SFTP WRITE request (RFC draft-ietf-secsh-filexfer-02, 6.4), length prefix included."""
    body = struct.pack(">BI", CMD_WRITE, 7) + struct.pack(">I", len(handle)) + handle
    body += struct.pack(">QI", 0, data_len)
    return 4 + len(body) + data_len


@pytest.mark.parametrize("handle", [b"\x00\x00\x00\x01", b"h" * 16, b"h" * 256])
@pytest.mark.parametrize("max_packet", [32768, 65536, 262144])
def test_a_write_request_fills_but_never_exceeds_what_one_channel_packet_carries(handle: bytes,
                                                                                 max_packet: int) -> None:
    size = transfer.write_request_size(max_packet, handle)
    assert size <= transfer.REQUEST_SIZE
    # paramiko puts at most max_packet - 64 bytes of channel data in one packet.
    assert write_request(handle, size) <= max_packet - 64
    if size < transfer.REQUEST_SIZE:
        assert write_request(handle, size + 1) > max_packet - 64


def test_openssh_gets_32675_bytes_per_write_with_its_4_byte_handles() -> None:
    assert transfer.write_request_size(32768, b"\x00\x00\x00\x00") == 32675


def test_a_tiny_peer_packet_still_allows_progress() -> None:
    assert transfer.write_request_size(64, b"h" * 8) == 1


@pytest.mark.parametrize("packets", [2, 4, 8])
def test_a_long_write_fills_exactly_that_many_packets(packets: int) -> None:
    handle = b"\x00\x00\x00\x07"
    size = transfer.write_request_size(32768, handle, packets, max_write=10**9)
    assert write_request(handle, size) == packets * (32768 - 64)


def test_a_long_write_never_exceeds_the_servers_max_write_length() -> None:
    assert transfer.write_request_size(262144, b"h" * 4, 4, max_write=255 * 1024) == 255 * 1024
