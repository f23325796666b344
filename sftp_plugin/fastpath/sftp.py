"""SFTP requests below paramiko's public SFTPClient: our own request pipeline and extended requests.

paramiko's pipelined ``SFTPFile`` write drops the status of replies it
collects while waiting for another request, so a full disk could go
unnoticed, and it has no call for extensions (fsync@openssh.com,
limits@openssh.com, statvfs@openssh.com) nor for OPEN with attributes. So
requests go through SFTPClient's own request machinery (``_async_request``,
``_read_response``, ``_expecting``, ``_convert_status``, ``_request``): its
private state, touched here and nowhere else (checked by fastpath.missing).
WRITE requests are framed here, so that their data goes from the caller's
buffer into the packets uncopied (packets.send_channel_data), and so are the
requests of a `Pipeline.batch`: those a short call sends together (both OPENs,
a file's fsync and CLOSE, two renames) leave in one SSH packet, not one each.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import deque
from collections.abc import Iterator

import paramiko
from paramiko.buffered_pipe import PipeTimeout
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.file import BufferedFile
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_READ,
    CMD_REMOVE,
    CMD_STAT,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_FLAG_READ,
    int64,
)

from sftp_plugin.fastpath.channel import FrameTooLong
from sftp_plugin.fastpath.packets import send_channel_data

_PACKET_HEADER = struct.Struct(">IB")  # SFTP length, type
_LENGTH_FIELD = 4  # an SFTP packet's length, before its type
_WRITE_HEADER = struct.Struct(">IBII")  # SFTP length, type, request id, handle length (the handle follows)
_WRITE_TAIL = struct.Struct(">QI")  # offset, data length
WRITE_HEADER = _WRITE_HEADER.size + _WRITE_TAIL.size  # 25 bytes besides the handle
# SFTPClient attributes the pipeline uses; fastpath.missing checks they exist.
REQUIRED = ("_async_request", "_read_response", "_convert_status", "_request", "_adjust_cwd")
# SFTPAttributes' parser of an ATTRS reply (FSTAT sent through the pipeline) and its packer (OPEN with
# attributes in a batch); checked likewise.
REQUIRED_ATTRIBUTES = ("_from_msg", "_pack")


class EndOfFile(Exception):
    """The server answered a read with SFTP's EOF status."""


class _Replies:
    """Holds replies that arrive while we wait for an earlier one.

    Paramiko calls ``_async_response`` for every reply that is not the one
    being waited for; keeping them here (instead of paramiko's default of
    discarding write statuses) means no error reply is ever lost.
    """

    def __init__(self) -> None:
        self.early: dict[int, tuple[int, paramiko.Message]] = {}

    def _async_response(self, kind: int, msg: paramiko.Message, num: int) -> None:
        self.early[num] = (kind, msg)


class Pipeline:
    """Requests in flight on one SFTP handle, their replies consumed strictly in order."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp
        self.replies = _Replies()
        self.pending: deque[tuple[int, int, int]] = deque()  # (request number, offset, length)
        self._batch: list[bytes | memoryview] | None = None  # requests framed, not yet sent (in `batch`)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Requests sent inside go out together as it ends, in as few SSH packets as they fit (one, for a
        few small ones) instead of one packet each: less work for both ends of a short call. Nothing
        sent inside may be waited for inside. What was framed goes out even if the block raises: those
        requests are numbered, and a file whose CLOSE is among them counts as closed already."""
        self._batch = []
        try:
            yield
        finally:
            framed, self._batch = self._batch, None
            if framed:
                send_channel_data(self.sftp.sock, framed)

    def _number(self) -> int:
        """The next request number, registered for our replies: as SFTPClient._async_request does it."""
        sftp = self.sftp
        with sftp._lock:
            num = sftp.request_number
            sftp._expecting[num] = self.replies
            sftp.request_number += 1
        return num

    def send(self, kind: int, *args: object) -> int:
        if self._batch is None:
            return self.sftp._async_request(self.replies, kind, *args)
        num = self._number()
        msg = paramiko.Message()  # framed as _async_request and _send_packet frame it
        msg.add_int(num)
        for item in args:
            if isinstance(item, int64):
                msg.add_int64(item)
            elif isinstance(item, int):
                msg.add_int(item)
            elif isinstance(item, paramiko.SFTPAttributes):
                item._pack(msg)
            else:
                msg.add_string(item)
        body = msg.asbytes()
        self._batch.append(_PACKET_HEADER.pack(len(body) + 1, kind) + body)
        return num

    def send_write(self, handle: bytes, offset: int, data: memoryview) -> int:
        """A WRITE request, as ``send`` would frame it, without copying `data` on the way:
        its bytes go from the caller's buffer straight into the encrypted packets."""
        num = self._number()
        header = (
            _WRITE_HEADER.pack(WRITE_HEADER - 4 + len(handle) + len(data), CMD_WRITE, num, len(handle))
            + handle
            + _WRITE_TAIL.pack(offset, len(data))
        )
        if self._batch is not None:
            self._batch += [header, data]
        else:
            send_channel_data(self.sftp.sock, [header, data])
        return num

    def send_sync_and_close(self, file: paramiko.SFTPFile, sync: bool = True) -> tuple[int | None, int]:
        """fsync@openssh.com (unless not ``sync``) and CLOSE for `file`'s handle, sent behind what is in flight
        (the server answers in order, so a file's last writes, its sync and its close cost one round trip
        together); their request numbers, None for a sync not sent. `file` counts as closed from here:
        BufferedFile.close marks it so without a request, since paramiko's own CLOSE, sent after ours, could
        close a handle the server has meanwhile given to another file."""
        return self.send_extended("fsync@openssh.com", file.handle) if sync else None, self.send_close(file)

    def send_extended(self, name: str, *args: object) -> int:
        """An SFTP extended request, as `extended` frames it; its reply is taken by `wait`."""
        return self.send(CMD_EXTENDED, name, *args)

    def send_open(self, path: str, flags: int = SFTP_FLAG_READ, attrs: paramiko.SFTPAttributes | None = None) -> int:
        """OPEN framed as SFTPClient.open frames it, with ``attrs`` for a file it creates (``open`` sends none);
        its reply is taken by `opened`."""
        return self.send(CMD_OPEN, self.sftp._adjust_cwd(path), flags, attrs or paramiko.SFTPAttributes())

    def opened(self, num: int, mode: str = "rb") -> paramiko.SFTPFile:
        """The file a send_open opened; an error status raises IOError (FileNotFoundError for a missing file)."""
        kind, msg = self.wait(num)
        if kind != CMD_HANDLE:
            raise paramiko.SFTPError(f"expected a handle in reply to OPEN, got message type {kind}")
        return paramiko.SFTPFile(self.sftp, msg.get_binary(), mode)

    def send_posix_rename(self, source: str, target: str) -> int:
        """posix-rename@openssh.com, as SFTPClient.posix_rename frames it."""
        return self.send_extended("posix-rename@openssh.com", self.sftp._adjust_cwd(source),
                                  self.sftp._adjust_cwd(target))

    def send_remove(self, path: str) -> int:
        """REMOVE, as SFTPClient.remove frames it; its reply is taken by `wait`."""
        return self.send(CMD_REMOVE, self.sftp._adjust_cwd(path))

    def send_fstat(self, file: paramiko.SFTPFile) -> int:
        return self.send(CMD_FSTAT, file.handle)

    def send_stat(self, path: str) -> int:
        """STAT (following links, as OPEN does), as SFTPClient.stat frames it; its reply is taken by `attributes`."""
        return self.send(CMD_STAT, self.sftp._adjust_cwd(path))

    def send_read(self, file: paramiko.SFTPFile, offset: int, length: int) -> int:
        return self.send(CMD_READ, file.handle, int64(offset), length)

    def send_close(self, file: paramiko.SFTPFile) -> int:
        """CLOSE for `file`'s handle, behind what is in flight; `file` counts as closed from here
        (as in send_sync_and_close)."""
        num = self.send(CMD_CLOSE, file.handle)
        BufferedFile.close(file)
        return num

    def attributes(self, num: int) -> paramiko.SFTPAttributes:
        """The reply to a send_fstat or send_stat."""
        kind, msg = self.wait(num)
        if kind != CMD_ATTRS:
            raise paramiko.SFTPError(f"expected attributes in reply to (F)STAT, got message type {kind}")
        return paramiko.SFTPAttributes._from_msg(msg)

    def data(self, num: int) -> bytes:
        """The reply to a send_read: its bytes, b"" at end of file."""
        try:
            kind, msg = self.wait(num)
        except EndOfFile:
            return b""
        if kind != CMD_DATA:
            raise paramiko.SFTPError(f"expected data in reply to READ, got message type {kind}")
        return msg.get_string()

    def wait(self, num: int) -> tuple[int, paramiko.Message]:
        """The reply to request ``num``; an error status raises IOError, SFTP's EOF status EndOfFile.

        paramiko raises a bare EOFError both for the SFTP EOF status and for a
        connection lost while *sending*; only here, converting a reply, does it
        mean end of file. Anything else must reach the retry policy as a lost
        connection, not be mistaken for a truncated file.
        """
        try:
            early = self.replies.early.pop(num, None)
            if early is None:
                return self.sftp._read_response(num)
            kind, msg = early
            if kind == CMD_STATUS:
                self.sftp._convert_status(msg)
            return kind, msg
        except EOFError:
            raise EndOfFile() from None


class FrameSFTPClient(paramiko.SFTPClient):  # type: ignore[misc]  # paramiko ships no type hints
    """An SFTPClient that reads each reply whole from our receive buffer (ChunkedPipe.read_frame): one wait and
    one copy per packet, where BaseSFTP._read_packet read its length and its body through Channel.recv (two
    reads, each with its lock and window check, a body in pieces joined piece by piece). The channel's window
    is accounted for as Channel.recv accounts for it. fastpath.start_sftp makes one on the fast path only
    (the channel's buffer is a ChunkedPipe)."""

    def _read_packet(self) -> tuple[int, bytes]:
        channel = self.sock
        try:
            frame = channel.in_buffer.read_frame(channel.timeout)
        except PipeTimeout:
            raise socket.timeout() from None
        except FrameTooLong:
            raise paramiko.SFTPError("Garbage packet received") from None
        if not frame:
            raise EOFError()
        ack = channel._check_add_window(len(frame))
        if ack > 0:  # as Channel.recv asks for more
            message = paramiko.Message()
            message.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
            message.add_int(channel.remote_chanid)
            message.add_int(ack)
            channel.transport._send_user_message(message)
        if len(frame) == _LENGTH_FIELD:
            return 0, b""
        return frame[_LENGTH_FIELD], frame[_LENGTH_FIELD + 1 :]


def extended(sftp: paramiko.SFTPClient, name: str, *args: object) -> tuple[int, paramiko.Message]:
    """An SFTP extended request (fsync@openssh.com, limits@openssh.com, statvfs@openssh.com...) and its reply;
    an error status (an extension the server lacks: "unsupported") raises IOError."""
    return sftp._request(CMD_EXTENDED, name, *args)
