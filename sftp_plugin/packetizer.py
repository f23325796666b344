"""Incoming SSH packets under AES-GCM, decrypted straight from one receive buffer.

paramiko's Packetizer reads every packet with several socket reads and then
copies it five or six times (concatenating header and body, decrypting,
cutting off the padding, cutting off the message type, copying the channel
data out of the message). At the ~8,000 packets of 32 KiB a 256 MiB restore
receives, those copies and the page faults of their fresh allocations were a
third of the transport thread's work, done under the GIL. This subclass, for
AES-GCM only (the cipher we prefer), reads the socket into one reusable
buffer, decrypts each packet from a view of it, and hands channel data on as
a view of the decrypted packet: one copy where there were six (256 MiB
restore: ~0.95 s -> ~0.70 s of CPU, see bench/RESULTS.md).

Everything else (key exchange, other ciphers, compression, packet dumps) goes
through paramiko's own code, which reads through our ``read_all`` and so sees
the same byte stream. Sequence numbers and the rekey accounting are kept
exactly as in ``Packetizer.read_message``, whose private state this class uses
(hence the upper bound on paramiko in setup.cfg).
"""

from __future__ import annotations

import errno
import socket
import struct

from paramiko.common import MSG_CHANNEL_DATA, xffffffff
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer, first_arg
from paramiko.ssh_exception import SSHException

# Bytes one socket read may take: room for ~30 packets of 32 KiB, so a busy
# stream needs one system call (and one GIL round trip) per many packets.
RECEIVE_BUFFER = 1024 * 1024
# Longest packet we accept: the receive buffer, four times the largest channel
# packet we invite (connection.MAX_PACKET_SIZE; sshd does send 256 KiB of data
# plus framing). The length field of an AES-GCM packet is authenticated only
# once the whole packet is read; the bound keeps a corrupt one from making us
# wait for, or buffer, gigabytes.
MAX_PACKET_LENGTH = RECEIVE_BUFFER
LENGTH_FIELD = 4
_read_length = struct.Struct(">I").unpack_from


class ChannelDataMessage(Message):  # type: ignore[misc]  # paramiko ships no type hints
    """SSH_MSG_CHANNEL_DATA over the decrypted packet, whose data it returns as a view, not a copy.

    ``packet`` still holds the padding after the message; the only readers of
    this message (Transport.run and Channel._feed) read the channel number and
    the data, both length-delimited.
    """

    def __init__(self, packet: bytes, start: int) -> None:
        super().__init__(packet)  # BytesIO shares an immutable initial value: no copy
        self.packet.seek(start)
        self._raw = packet

    def get_binary(self) -> memoryview:  # type: ignore[override]
        length = self.get_int()
        start = self.packet.tell()
        if start + length > len(self._raw):
            raise SSHException("channel data longer than its packet")
        self.packet.seek(start + length)
        return memoryview(self._raw)[start : start + length]


class InPlacePacketizer(Packetizer):  # type: ignore[misc]
    """paramiko's Packetizer with a read-ahead buffer and an in-place AES-GCM receive path."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # end of the bytes received

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        self._fill(n, check_rekey)
        start = self._start
        self._start = start + n
        return bytes(self._view[start : start + n])

    def read_message(self) -> tuple[int, Message]:
        if (
            not self._Packetizer__aead_in
            or self._Packetizer__compress_engine_in is not None
            or self._Packetizer__dump_packets
        ):
            return super().read_message()
        self._fill(LENGTH_FIELD, check_rekey=True)
        packet_length = _read_length(self._buffer, self._start)[0]
        if packet_length > MAX_PACKET_LENGTH:
            raise SSHException(f"incoming packet of {packet_length} bytes exceeds {MAX_PACKET_LENGTH}")
        mac_size = self._Packetizer__mac_size_in
        total = LENGTH_FIELD + packet_length + mac_size
        self._fill(total)
        start = self._start
        iv = self._Packetizer__iv_in
        packet = self._Packetizer__block_engine_in.decrypt(
            iv, self._view[start + LENGTH_FIELD : start + total], self._view[start : start + LENGTH_FIELD]
        )
        self._start = start + total
        self._Packetizer__iv_in = self._inc_iv_counter(iv)
        # packet: padding length, message type, message, padding
        padding = packet[0]
        kind = packet[1]
        if kind == MSG_CHANNEL_DATA:
            msg = ChannelDataMessage(packet, 2)
        else:
            msg = Message(packet[2 : packet_length - padding])
        self._count_received(msg, packet_length + mac_size + LENGTH_FIELD)
        return kind, msg

    def _count_received(self, msg: Message, raw_size: int) -> None:
        """Sequence number and rekey accounting, as Packetizer.read_message keeps them."""
        msg.seqno = self._Packetizer__sequence_number_in
        next_seq = (msg.seqno + 1) & xffffffff
        if next_seq == 0 and not self._initial_kex_done:
            raise SSHException("Sequence number rolled over during initial kex!")
        self._Packetizer__sequence_number_in = next_seq
        self._Packetizer__received_bytes += raw_size
        self._Packetizer__received_packets += 1
        if self._Packetizer__need_rekey:
            # Rekey asked for: give the peer some packets to comply before giving up.
            self._Packetizer__received_bytes_overflow += raw_size
            self._Packetizer__received_packets_overflow += 1
            if (
                self._Packetizer__received_packets_overflow >= self.REKEY_PACKETS_OVERFLOW_MAX
                or self._Packetizer__received_bytes_overflow >= self.REKEY_BYTES_OVERFLOW_MAX
            ):
                raise SSHException("Remote transport is ignoring rekey requests")
        elif (
            self._Packetizer__received_packets >= self.REKEY_PACKETS
            or self._Packetizer__received_bytes >= self.REKEY_BYTES
        ):
            self._Packetizer__received_bytes_overflow = 0
            self._Packetizer__received_packets_overflow = 0
            self._trigger_rekey()

    def _fill(self, n: int, check_rekey: bool = False) -> None:
        """Have at least `n` received bytes from ``_start`` on; wait as Packetizer.read_all does."""
        leftover = self._Packetizer__remainder  # read past the server's banner line
        if leftover:
            self._Packetizer__remainder = b""
            self._make_room(self._end - self._start + len(leftover))
            self._view[self._end : self._end + len(leftover)] = leftover
            self._end += len(leftover)
        if self._end - self._start >= n:
            return
        self._make_room(n)
        sock = self._Packetizer__socket
        while self._end - self._start < n:
            if self.handshake_timed_out():
                raise EOFError()
            try:
                received = sock.recv_into(self._view[self._end :])
                if received == 0:
                    raise EOFError()
                self._end += received
                continue
            except socket.timeout:
                pass
            except OSError as err:
                if first_arg(err) != errno.EAGAIN:  # EAGAIN: a timeout on some kernels
                    if self._Packetizer__closed:
                        raise EOFError() from err
                    raise
            # No data within the socket timeout: the moments paramiko checks for close,
            # a pending rekey (only between packets) and keepalives.
            if self._Packetizer__closed:
                raise EOFError()
            if check_rekey and self._end == self._start and self._Packetizer__need_rekey:
                raise NeedRekeyException()
            self._check_keepalive()

    def _make_room(self, n: int) -> None:
        """Room in the buffer for `n` bytes from ``_start`` on, moving unread bytes to the front."""
        if self._start + n <= len(self._buffer):
            return
        unread = self._end - self._start
        if n > len(self._buffer):
            grown = bytearray(n)
            grown[:unread] = self._view[self._start : self._end]
            self._buffer, self._view = grown, memoryview(grown)
        else:
            # Through a copy: the two ranges may overlap, and slice assignment is a memcpy.
            self._buffer[:unread] = bytes(self._view[self._start : self._end])
        self._start, self._end = 0, unread
