"""SSH packets under AES-GCM, sealed and opened in place instead of copied at every step.

paramiko's Packetizer copies every packet five or six times on the way in
(concatenating header and body, decrypting, cutting off the padding, the
message type, then the channel data) and as often on the way out, plus once
more per layer above it (Channel, SFTPClient). At the ~8,000 packets of
32 KiB a 256 MiB stream is, those copies, the page faults of their fresh
allocations and the Python around them were the bulk of the client's CPU,
done under the GIL. For AES-GCM, the cipher we prefer, this subclass:

* reads the socket into one reusable buffer, decrypts each packet from a view
  of it and hands channel data on as a view of the decrypted packet: one
  copy where there were six (256 MiB restore: ~0.95 s -> ~0.70 s of CPU);
* seals outgoing packets into one reusable buffer with ``encrypt_into``, and
  takes several channel packets at once (``send_channel_data``), so an SFTP
  write goes from the caller's buffer to the socket with two copies and one
  system call (256 MiB backup: ~8,900 -> ~3,600 socket sends).

Figures are in bench/RESULTS.md. Everything else (key exchange, other
ciphers, compression, packet dumps) goes through paramiko's own code, which
reads through our ``read_all`` and so sees the same byte stream. Sequence
numbers, nonces and the rekey accounting are kept exactly as Packetizer keeps
them, in its private state (hence the upper bound on paramiko in setup.cfg).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from paramiko.channel import Channel
from paramiko.common import MSG_CHANNEL_DATA, xffffffff
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer, first_arg
from paramiko.ssh_exception import SSHException

# Bytes one socket read may take: room for ~30 packets of 32 KiB, so a busy
# stream needs one system call (and one GIL round trip) per many packets.
RECEIVE_BUFFER = 1024 * 1024
# Most bytes one packet may occupy on the wire, the receive buffer's size:
# four times the largest channel packet we invite (connection.MAX_PACKET_SIZE;
# sshd does send 256 KiB of data plus framing). A packet's length field is
# authenticated only once the whole packet is read (not at all before the
# first key exchange); the bound keeps a corrupt or hostile one from making us
# wait for, or allocate, gigabytes, which paramiko's own reader would.
MAX_PACKET_BYTES = RECEIVE_BUFFER
LENGTH_FIELD = 4
GCM_TAG = 16
# Longest packet length field we accept under AES-GCM: what fits MAX_PACKET_BYTES with its framing.
MAX_PACKET_LENGTH = MAX_PACKET_BYTES - LENGTH_FIELD - GCM_TAG
GCM_BLOCK = 16
# Plaintext bytes of the packets we send, to begin with: a channel packet of
# OpenSSH's maximum (32 KiB) with room to spare; larger packets grow it.
SEND_BUFFER = 64 * 1024
# What a packet adds to its payload on the wire: length, padding length, at
# most a block and 3 bytes of padding (see _seal), and the GCM tag.
PACKET_OVERHEAD = LENGTH_FIELD + 1 + GCM_BLOCK + 3 + GCM_TAG
# Channel packets encrypted together and handed to the socket in one call
# (send_channel_data), window permitting: a long upload's SFTP write is eight
# packets of OpenSSH's 32 KiB. One system call instead of eight, and sshd
# wakes to read them once.
PACKETS_PER_SEND = 8
# Random bytes fetched at once for packet padding: paramiko asks the kernel for
# 4-19 fresh bytes per packet, a system call costing ~7% of an upload's CPU.
PADDING_POOL = 4096
_read_length = struct.Struct(">I").unpack_from
_CHANNEL_DATA_HEADER = struct.Struct(">BII")  # message type, recipient channel, data length


class ChannelDataMessage(Message):  # type: ignore[misc]  # paramiko ships no type hints
    """SSH_MSG_CHANNEL_DATA over the decrypted packet, whose data it returns as a view, not a copy.

    ``packet`` still holds the padding after the message; the only readers of
    this message (Transport.run and Channel._feed) read the channel number and
    the data, both length-delimited.
    """

    def __init__(self, packet: bytes, start: int, end: int) -> None:
        super().__init__(packet)  # BytesIO shares an immutable initial value: no copy
        self.packet.seek(start)
        self._raw = packet
        self._end = end  # where the padding begins

    def get_binary(self) -> memoryview:  # type: ignore[override]
        length = self.get_int()
        start = self.packet.tell()
        if start + length > self._end:
            raise SSHException("channel data longer than its packet")
        self.packet.seek(start + length)
        return memoryview(self._raw)[start : start + length]


class ChannelData:
    """Several SSH_MSG_CHANNEL_DATA packets of one channel, for the packetizer to send at once."""

    def __init__(self, channel_id: int, chunks: list[list[memoryview]]) -> None:
        self.channel_id = channel_id
        self.chunks = chunks  # each packet's data, as pieces sent back to back

    def payloads(self) -> list[list[bytes | memoryview]]:
        """Each packet's payload: message type, recipient channel, data length, then the data."""
        return [
            [_CHANNEL_DATA_HEADER.pack(MSG_CHANNEL_DATA, self.channel_id, sum(map(len, c))), *c] for c in self.chunks
        ]

    def messages(self) -> list[Message]:
        """The same packets as paramiko Messages, for paramiko's own send path."""
        out = []
        for chunk in self.chunks:
            msg = Message()
            msg.add_byte(bytes([MSG_CHANNEL_DATA]))
            msg.add_int(self.channel_id)
            msg.add_string(b"".join(chunk))
            out.append(msg)
        return out


def send_channel_data(channel: Channel, buffers: list[bytes | memoryview]) -> None:
    """Send `buffers`, back to back, on `channel`, several packets per system call where the
    window allows; otherwise as paramiko's Channel.sendall, whose window and locking it keeps.

    Raises EOFError once the channel is at EOF (as paramiko's SFTP client does),
    OSError if it is closed (as Channel.send does).
    """
    if not isinstance(channel.transport.packetizer, InPlacePacketizer):
        _send_plainly(channel, memoryview(b"".join(buffers)))
        return
    views = [memoryview(b) for b in buffers if len(b)]
    remaining = sum(map(len, views))
    while remaining:
        chunks: list[list[memoryview]] = []
        with channel.lock:
            if channel.closed:
                raise OSError("Socket is closed")  # what Channel.send raises
            # Blocks until the window opens; later packets only take what is open already,
            # for the server reopens it only once it has the packets we hold.
            size = channel._wait_for_send_window(remaining)
            while size:
                chunks.append(_take(views, size))
                remaining -= size
                if not remaining or len(chunks) == PACKETS_PER_SEND or channel.out_window_size == 0:
                    break
                size = channel._wait_for_send_window(remaining)
        if not chunks:
            raise EOFError()
        # With the channel lock released, as Channel._send does: waiting for a key
        # exchange to finish while holding it can deadlock.
        channel.transport._send_user_message(ChannelData(channel.remote_chanid, chunks))


def _send_plainly(channel: Channel, data: memoryview) -> None:
    """What paramiko's SFTP client does (BaseSFTP._write_all), for a transport without our packetizer."""
    while data:
        sent = channel.send(data)
        if sent <= 0:
            raise EOFError()
        data = data[sent:]


def _take(views: list[memoryview], n: int) -> list[memoryview]:
    """The first `n` bytes of `views` (removed from it), as views."""
    out = []
    while n:
        first = views[0]
        if len(first) <= n:
            out.append(views.pop(0))
            n -= len(first)
        else:
            out.append(first[:n])
            views[0] = first[n:]
            n = 0
    return out


class InPlacePacketizer(Packetizer):  # type: ignore[misc]
    """paramiko's Packetizer with a read-ahead buffer and in-place AES-GCM receive and send paths."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # end of the bytes received
        self._plain = memoryview(bytearray(SEND_BUFFER))
        self._wire = memoryview(bytearray(PACKETS_PER_SEND * (SEND_BUFFER + PACKET_OVERHEAD)))
        self._pool = b""
        self._pool_used = 0
        # Our channels whose receive buffer takes views (channel_buffer.ChunkedPipe);
        # paramiko's BufferedPipe takes only bytes.
        self._view_channels: set[int] = set()

    def hand_views_to(self, channel_id: int) -> None:
        """Hand the incoming data of our channel `channel_id` on as views of the decrypted
        packets; its receive buffer must take them (channel_buffer.ChunkedPipe does)."""
        self._view_channels.add(channel_id)

    def send_message(self, data: Message | ChannelData) -> None:
        with self._Packetizer__write_lock:  # an RLock: paramiko's path below takes it again
            if not self._seals_in_place():
                for message in data.messages() if isinstance(data, ChannelData) else [data]:
                    super().send_message(message)
                return
            if isinstance(data, ChannelData):
                packets = data.payloads()
            else:
                packets = [[data.asbytes()]]
            # Room for every packet with its framing: at most a block of padding more than its payload.
            wire = self._wire_buffer(sum(sum(map(len, p)) + PACKET_OVERHEAD for p in packets))
            sizes = []
            end = 0
            for payload in packets:
                sizes.append(self._seal(payload, wire, end))
                end += sizes[-1]
            self.write_all(wire[:end])
            for size in sizes:
                self._count_sent(size)

    def _seals_in_place(self) -> bool:
        """Whether outgoing packets take the in-place AES-GCM path (write lock held)."""
        return bool(
            self._Packetizer__aead_out
            and self._Packetizer__compress_engine_out is None
            and not self._Packetizer__dump_packets
            and hasattr(self._Packetizer__block_engine_out, "encrypt_into")  # cryptography >= 45
        )

    def _seal(self, payload: list[bytes | memoryview], wire: memoryview, at: int) -> int:
        """Encrypt one packet of `payload` (pieces sent back to back) into `wire` at `at`; its size there."""
        size = sum(map(len, payload))
        # Padding as paramiko computes it for AES-GCM (the length field is not encrypted).
        padding = 3 + GCM_BLOCK - ((size + LENGTH_FIELD) % GCM_BLOCK)
        length = 1 + size + padding
        if len(self._plain) < length:
            self._plain = memoryview(bytearray(length))
        plain = self._plain
        plain[0] = padding
        pos = 1
        for piece in payload:
            plain[pos : pos + len(piece)] = piece
            pos += len(piece)
        plain[pos:length] = self._random_padding(padding)
        wire[at : at + LENGTH_FIELD] = length.to_bytes(LENGTH_FIELD, "big")
        iv = self._Packetizer__iv_out
        self._Packetizer__block_engine_out.encrypt_into(
            iv,
            plain[:length],
            wire[at : at + LENGTH_FIELD],
            wire[at + LENGTH_FIELD : at + LENGTH_FIELD + length + GCM_TAG],
        )
        self._Packetizer__iv_out = self._inc_iv_counter(iv)
        next_seq = (self._Packetizer__sequence_number_out + 1) & xffffffff
        if next_seq == 0 and not self._initial_kex_done:
            raise SSHException("Sequence number rolled over during initial kex!")
        self._Packetizer__sequence_number_out = next_seq
        return LENGTH_FIELD + length + GCM_TAG

    def _count_sent(self, wire_size: int) -> None:
        """Rekey accounting, as Packetizer.send_message keeps it."""
        self._Packetizer__sent_bytes += wire_size
        self._Packetizer__sent_packets += 1
        sent_too_much = (
            self._Packetizer__sent_packets >= self.REKEY_PACKETS or self._Packetizer__sent_bytes >= self.REKEY_BYTES
        )
        if sent_too_much and not self._Packetizer__need_rekey:  # only ask once
            self._Packetizer__received_bytes_overflow = 0
            self._Packetizer__received_packets_overflow = 0
            self._trigger_rekey()

    def _wire_buffer(self, size: int) -> memoryview:
        """The reusable buffer for encrypted packets, grown to at least `size` bytes."""
        if len(self._wire) < size:
            self._wire = memoryview(bytearray(size))
        return self._wire

    def _random_padding(self, size: int) -> bytes:
        """`size` random bytes, each handed out once, from a pool filled by os.urandom."""
        if self._pool_used + size > len(self._pool):
            self._pool, self._pool_used = os.urandom(PADDING_POOL), 0
        start = self._pool_used
        self._pool_used = start + size
        return self._pool[start : start + size]

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
        end = packet_length - packet[0]
        kind = packet[1]
        if kind == MSG_CHANNEL_DATA and _read_length(packet, 2)[0] in self._view_channels:
            msg = ChannelDataMessage(packet, 2, end)
        else:
            msg = Message(packet[2:end])
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
        if n > MAX_PACKET_BYTES:  # paramiko's own path asks for a packet's length in one read
            raise SSHException(f"incoming packet of {n} bytes exceeds {MAX_PACKET_BYTES}")
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
        """Room in the buffer for `n` bytes (at most its size) from ``_start`` on, moving unread bytes to the front."""
        if self._start + n <= len(self._buffer):
            return
        unread = self._end - self._start
        # Through a copy: the two ranges may overlap, and slice assignment is a memcpy.
        self._buffer[:unread] = bytes(self._view[self._start : self._end])
        self._start, self._end = 0, unread
