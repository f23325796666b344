"""Everything of the plugin that touches paramiko's private state, and nothing else does.

- ``packets``: SSH packets under AES-GCM sealed and opened in place
  (InPlacePacketizer, a Packetizer subclass keeping its private state), and
  several channel packets per socket send;
- ``channel``: the SFTP channel's receive buffer (replaces ``Channel.in_buffer``),
  which also hands out whole SFTP packets (``read_frame``);
- ``sftp``: the SFTP request pipeline that checks every reply and sends
  requests in batches, extended requests, OPEN with attributes (SFTPClient's
  request machinery), and the client that reads each reply whole from that
  buffer (``FrameSFTPClient``, SFTPClient._read_packet with Channel.recv's
  window accounting);
- ``negotiation``: the server's algorithm offer, for "no cipher in common".

Checked, not assumed: `packet_code_missing` says which private names the
packet code needs and this paramiko lacks (paramiko before 3.5 has no
AES-GCM state at all). Where any is missing, or ``fast_path: no`` says so,
connections use paramiko's own Packetizer and receive buffer: slower (see
bench/RESULTS.md), never broken; one warning in the log says why. The SFTP
request pipeline has no public equivalent that reports every write's status
(paramiko's pipelined SFTPFile drops them); its names are present in every
paramiko from 2.0 to the highest tested, and `sftp_code_missing` turns their
absence into a clear error instead of an AttributeError mid-transfer.

Tested with paramiko TESTED_PARAMIKO[0] (the fallback: `make test-oldest`)
to TESTED_PARAMIKO[1] (everything).
"""

from __future__ import annotations

import functools
from typing import Any

import paramiko
from paramiko.packet import Packetizer

# The lowest paramiko setup.cfg allows, run through the fallback by `make test-oldest`, and the
# highest the whole suite ran on.
TESTED_PARAMIKO = ("3.4.1", "5.1.0")
# Packetizer state the in-place code reads and writes (set in Packetizer.__init__), and its helpers.
PACKETIZER_STATE = (
    "_Packetizer__aead_in", "_Packetizer__aead_out", "_Packetizer__block_engine_in", "_Packetizer__block_engine_out",
    "_Packetizer__closed", "_Packetizer__compress_engine_in", "_Packetizer__compress_engine_out",
    "_Packetizer__dump_packets", "_Packetizer__iv_in", "_Packetizer__iv_out", "_Packetizer__mac_size_in",
    "_Packetizer__need_rekey", "_Packetizer__received_bytes", "_Packetizer__received_bytes_overflow",
    "_Packetizer__received_packets", "_Packetizer__received_packets_overflow", "_Packetizer__remainder",
    "_Packetizer__sent_bytes", "_Packetizer__sent_packets", "_Packetizer__sequence_number_in",
    "_Packetizer__sequence_number_out", "_Packetizer__socket", "_Packetizer__write_lock", "_initial_kex_done",
)
PACKETIZER_METHODS = ("_inc_iv_counter", "_trigger_rekey", "_check_keepalive")
CHANNEL_METHODS = ("_wait_for_send_window", "_check_add_window")
TRANSPORT_METHODS = ("_send_user_message",)


@functools.cache
def packet_code_missing() -> tuple[str, ...]:
    """The private names the fast packet path needs that this paramiko lacks (none: it can run)."""
    assigned = set(Packetizer.__init__.__code__.co_names)
    missing = [name for name in PACKETIZER_STATE if name not in assigned]
    missing += [f"Packetizer.{name}" for name in PACKETIZER_METHODS if not hasattr(Packetizer, name)]
    missing += [f"Channel.{name}" for name in CHANNEL_METHODS if not hasattr(paramiko.Channel, name)]
    missing += [f"Transport.{name}" for name in TRANSPORT_METHODS if not hasattr(paramiko.Transport, name)]
    return tuple(missing)


@functools.cache
def sftp_code_missing() -> tuple[str, ...]:
    from sftp_plugin.fastpath.sftp import REQUIRED, REQUIRED_ATTRIBUTES

    missing = [f"SFTPClient.{name}" for name in REQUIRED if not hasattr(paramiko.SFTPClient, name)]
    missing += [f"SFTPAttributes.{name}" for name in REQUIRED_ATTRIBUTES if not hasattr(paramiko.SFTPAttributes, name)]
    return tuple(missing)


def transport_options(fast: bool) -> dict[str, Any]:
    """Keyword arguments for paramiko.Transport: our packetizer on the fast path, paramiko's otherwise."""
    if not fast:
        return {}
    from sftp_plugin.fastpath.packets import InPlacePacketizer

    return {"packetizer_class": InPlacePacketizer}


def start_sftp(transport: paramiko.Transport, window_size: int, max_packet_size: int) -> paramiko.SFTPClient:
    """SFTPClient.from_transport with our window and packet size and, on the fast path (the transport
    has our packetizer), our receive buffer, handed the decrypted packets' views, and a client that reads
    each reply whole from it (FrameSFTPClient)."""
    from sftp_plugin.fastpath.packets import InPlacePacketizer

    channel = transport.open_session(window_size=window_size, max_packet_size=max_packet_size)
    if not isinstance(transport.packetizer, InPlacePacketizer):
        channel.invoke_subsystem("sftp")
        return paramiko.SFTPClient(channel)
    from sftp_plugin.fastpath.channel import ChunkedPipe
    from sftp_plugin.fastpath.sftp import FrameSFTPClient

    channel.in_buffer = ChunkedPipe()  # before the subsystem starts, so nothing is buffered yet
    transport.packetizer.hand_views_to(channel.get_id())
    channel.invoke_subsystem("sftp")
    return FrameSFTPClient(channel)


# SSH_DISCONNECT_BY_APPLICATION (RFC 4253, 11.1): the client is done, nothing went wrong.
DISCONNECT_BY_APPLICATION = 11


def send_disconnect(transport: paramiko.Transport, description: str = "closed by gpbackup_sftp_plugin") -> bool:
    """Send SSH_MSG_DISCONNECT on ``transport`` (paramiko has no public call for it: Transport.close only
    closes the socket, which the server logs as an error). Whether it was sent: not where this paramiko
    lacks Transport._send_user_message (checked, not assumed) or the transport is no longer active.

    _send_user_message, not _send_message: it waits out a key exchange in progress, as any message of the
    user's must, and drops the message if the connection died meanwhile."""
    if not hasattr(paramiko.Transport, "_send_user_message") or not transport.is_active():
        return False
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_DISCONNECT)
    message.add_int(DISCONNECT_BY_APPLICATION)
    message.add_string(description)
    message.add_string("")  # language tag
    transport._send_user_message(message)
    return True
