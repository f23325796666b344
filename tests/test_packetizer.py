"""InPlacePacketizer reads exactly what paramiko's Packetizer reads, and fails where it must.

Over a socket pair, paramiko's own Packetizer encrypts (AES-GCM, as negotiated
with OpenSSH) and both packetizers decrypt; against the real sshd, downloads
go through the in-place path, through a rekey in mid-stream, and through
paramiko's path for a cipher other than AES-GCM.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST, MSG_IGNORE
from paramiko.packet import Packetizer

from devtools.sshd import SshServer
from sftp_plugin import connection, fastpath, transfer
from sftp_plugin.fastpath.packets import (
    MAX_PACKET_LENGTH,
    ChannelData,
    ChannelDataMessage,
    InPlacePacketizer,
    send_channel_data,
)

GCM_BLOCK, GCM_TAG = 16, 16
# The in-place packet code needs paramiko's AES-GCM state (paramiko >= 3.5); on an older paramiko the plugin
# runs on paramiko's own packetizer (test_fastpath covers that), and there is nothing here to compare.
pytestmark = pytest.mark.skipif(bool(fastpath.packet_code_missing()),
                                reason=f"paramiko {paramiko.__version__} lacks the fast path's packet state")


def _gcm(packetizer: Packetizer, key: bytes, iv: bytes, inbound: bool) -> Packetizer:
    """Switch a packetizer to AES-GCM as Transport._activate_inbound/_outbound do."""
    if inbound:
        packetizer.set_inbound_cipher(AESGCM(key), GCM_BLOCK, None, GCM_TAG, None, aead=True, iv_in=iv)
    else:
        packetizer.set_outbound_cipher(AESGCM(key), GCM_BLOCK, None, GCM_TAG, None, aead=True, iv_out=iv)
    return packetizer


def _channel_data_message(channel: int, data: bytes) -> paramiko.Message:
    msg = paramiko.Message()
    msg.add_byte(bytes([MSG_CHANNEL_DATA]))
    msg.add_int(channel)
    msg.add_string(data)
    return msg


def _messages(rng: random.Random) -> list[paramiko.Message]:
    messages = []
    for size in [0, 1, 17, 4096, 32768, 32768, 262144, *(rng.randrange(70000) for _ in range(40))]:
        if rng.random() < 0.8:
            messages.append(_channel_data_message(rng.randrange(2**32), rng.randbytes(size)))
        else:
            msg = paramiko.Message()
            msg.add_byte(bytes([rng.choice([MSG_CHANNEL_WINDOW_ADJUST, MSG_IGNORE])]))
            msg.add_int(rng.randrange(2**32))
            msg.add_int(size)
            messages.append(msg)
    return messages


def _wire_bytes(
    items: list[paramiko.Message] | list[paramiko.Message | ChannelData],
    key: bytes,
    iv: bytes,
    sender_class: type[Packetizer] = Packetizer,
    encrypt: bool = True,
) -> bytes:
    """What `sender_class` puts on the wire for `items` (under AES-GCM unless `encrypt` is off)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.extend(iter(lambda: theirs.recv(1 << 20), b"")))
        reader.start()
        sender = sender_class(ours)
        if encrypt:
            _gcm(sender, key, iv, inbound=False)
        for item in items:
            sender.send_message(item)
        ours.shutdown(socket.SHUT_WR)
        reader.join()
    return b"".join(received)


def _read_messages(
    packetizer_class: type[Packetizer], wire: bytes, count: int, key: bytes, iv: bytes, piece_sizes: list[int]
) -> list[tuple[int, int, bytes]]:
    """Feed `wire` in pieces of the given sizes and read `count` messages back as (type, int, rest)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:

        def write() -> None:
            offset, sizes = 0, iter(piece_sizes)
            while offset < len(wire):
                size = next(sizes, len(wire))
                theirs.sendall(wire[offset : offset + size])
                offset += size

        writer = threading.Thread(target=write)
        writer.start()
        reader = _gcm(packetizer_class(ours), key, iv, inbound=True)
        out = []
        for _ in range(count):
            kind, msg = reader.read_message()
            number = msg.get_int()
            if kind == MSG_CHANNEL_DATA:
                rest = bytes(msg.get_binary())
            else:  # the whole message: nothing of the padding may show
                rest = msg.get_int().to_bytes(4, "big") + msg.get_remainder()
            out.append((kind, number, rest))
        writer.join()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_in_place_reads_return_the_messages_paramiko_reads(seed: int) -> None:
    rng = random.Random(seed)
    key, iv = rng.randbytes(16), rng.randbytes(12)
    messages = _messages(rng)
    wire = _wire_bytes(messages, key, iv)
    # Pieces from a byte at a time to more than the receive buffer: packets split anywhere.
    pieces = [rng.choice([1, 3, 16, 1000, 32768, 2_000_000]) for _ in range(2000)]
    ours = _read_messages(InPlacePacketizer, wire, len(messages), key, iv, pieces)
    theirs = _read_messages(Packetizer, wire, len(messages), key, iv, [len(wire)])
    assert ours == theirs
    assert [kind for kind, _, _ in ours] == [msg.asbytes()[0] for msg in messages]


def test_channel_data_is_handed_on_as_a_view_of_the_decrypted_packet() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    msg = _channel_data_message(7, b"x" * 1000)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = _gcm(Packetizer(theirs), key, iv, inbound=False)
        sender.send_message(msg)
        sender.send_message(_channel_data_message(8, b"y" * 1000))
        reader = _gcm(InPlacePacketizer(ours), key, iv, inbound=True)
        reader.hand_views_to(7)
        kind, received = reader.read_message()
        other_kind, other = reader.read_message()
    # Channel 8 did not ask for views: its data comes as paramiko's own Message would give it.
    assert other_kind == MSG_CHANNEL_DATA and not isinstance(other, ChannelDataMessage)
    assert other.get_int() == 8 and other.get_binary() == b"y" * 1000
    assert kind == MSG_CHANNEL_DATA and isinstance(received, ChannelDataMessage)
    assert received.get_int() == 7
    data = received.get_binary()
    assert isinstance(data, memoryview) and data == b"x" * 1000


def test_a_huge_length_before_encryption_fails_at_once_instead_of_allocating_it() -> None:
    # Before the first key exchange (and under other ciphers) paramiko's own reader asks
    # for a whole packet in one read_all; a hostile server could claim 4 GiB.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall((0xFFFFFFFC).to_bytes(4, "big") + bytes(12))
        with pytest.raises(paramiko.SSHException, match="exceeds"):
            InPlacePacketizer(ours).read_message()


def test_a_packet_length_beyond_the_limit_fails_at_once_instead_of_waiting_for_it() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall((MAX_PACKET_LENGTH + 16).to_bytes(4, "big"))
        reader = _gcm(InPlacePacketizer(ours), key, iv, inbound=True)
        with pytest.raises(paramiko.SSHException, match="exceeds"):
            reader.read_message()


def test_a_tampered_packet_fails_authentication() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    wire = bytearray(_wire_bytes([_channel_data_message(0, b"payload" * 100)], key, iv))
    wire[40] ^= 1
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(wire)
        with pytest.raises(InvalidTag):
            _gcm(InPlacePacketizer(ours), key, iv, inbound=True).read_message()


def _read_back(wire: bytes, count: int, key: bytes, iv: bytes, encrypted: bool = True) -> list[tuple[int, bytes]]:
    """`count` messages read from `wire` by paramiko's own Packetizer, as (type, rest of the message)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = threading.Thread(target=theirs.sendall, args=(wire,))
        writer.start()
        reader = Packetizer(ours)
        if encrypted:
            _gcm(reader, key, iv, inbound=True)
        out = [(kind, msg.get_remainder()) for kind, msg in (reader.read_message() for _ in range(count))]
        writer.join()
    return out


def _channel_data(channel: int, data: bytes) -> tuple[int, bytes]:
    return MSG_CHANNEL_DATA, channel.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize("seed", range(4))
def test_packets_sealed_in_place_are_what_paramiko_reads(seed: int) -> None:
    rng = random.Random(seed)
    key, iv = rng.randbytes(16), rng.randbytes(12)
    items: list[paramiko.Message | ChannelData] = []
    expected: list[tuple[int, bytes]] = []
    for _ in range(60):
        if rng.random() < 0.3:
            msg = paramiko.Message()
            msg.add_byte(bytes([MSG_CHANNEL_WINDOW_ADJUST]))
            msg.add_int(rng.randrange(2**32))
            msg.add_string(rng.randbytes(rng.randrange(100)))
            items.append(msg)
            expected.append((MSG_CHANNEL_WINDOW_ADJUST, msg.asbytes()[1:]))
        else:
            # Several packets at once, each from pieces: an SFTP header and slices of the data.
            channel, chunks = rng.randrange(2**32), []
            for _ in range(rng.randrange(1, 9)):
                pieces = [rng.randbytes(rng.choice([0, 1, 29, 4096, 32675])) for _ in range(rng.randrange(1, 4))]
                chunks.append([memoryview(piece) for piece in pieces])
                expected.append(_channel_data(channel, b"".join(pieces)))
            items.append(ChannelData(channel, chunks))
    wire = _wire_bytes(items, key, iv, sender_class=InPlacePacketizer)
    assert _read_back(wire, len(expected), key, iv) == expected


def _counters(packetizer: Packetizer) -> dict[str, object]:
    names = (
        "sequence_number_out",
        "sequence_number_in",
        "sent_bytes",
        "sent_packets",
        "received_bytes",
        "received_packets",
        "iv_out",
        "iv_in",
    )
    return {name: getattr(packetizer, f"_Packetizer__{name}") for name in names}


def test_sequence_numbers_nonces_and_byte_counts_advance_as_in_paramiko() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    messages = _messages(random.Random(7))
    ends: dict[type[Packetizer], tuple[dict[str, object], dict[str, object]]] = {}
    for packetizer_class in (Packetizer, InPlacePacketizer):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            sender = _gcm(packetizer_class(ours), key, iv, inbound=False)
            receiver = _gcm(packetizer_class(theirs), key, iv, inbound=True)
            reader = threading.Thread(target=lambda r=receiver: [r.read_message() for _ in messages])
            reader.start()
            for msg in messages:
                sender.send_message(msg)
            reader.join()
        ends[packetizer_class] = (_counters(sender), _counters(receiver))
    assert ends[InPlacePacketizer] == ends[Packetizer]


def test_channel_data_goes_through_paramiko_while_packets_are_not_encrypted() -> None:
    # Before the first key exchange nothing is encrypted: paramiko's own path sends the packets.
    data = ChannelData(5, [[memoryview(b"head"), memoryview(b"er and data")], [memoryview(b"more")]])
    wire = _wire_bytes([data], b"", b"", sender_class=InPlacePacketizer, encrypt=False)
    assert _read_back(wire, 2, b"", b"", encrypted=False) == [
        _channel_data(5, b"header and data"),
        _channel_data(5, b"more"),
    ]


# ---------------------------------------------------------------- against sshd


@pytest.fixture
def remote_path(sshd: SshServer) -> Iterator[Path]:
    """A unique file name under the test sshd's remote_dir, removed afterwards."""
    path = sshd.remote_dir / f"packetizer-{os.getpid()}-{random.randrange(10**9)}.bin"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def remote_file(remote_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(8 * 1024 * 1024 + 12345)
    remote_path.write_bytes(data)
    return remote_path, data


def _transport(
    sshd: SshServer, cipher: str, packetizer_class: type[Packetizer] = InPlacePacketizer
) -> paramiko.Transport:
    """A transport to the test sshd with our packetizer (unless told), limited to one cipher."""
    transport = paramiko.Transport(
        socket.create_connection(("127.0.0.1", sshd.port), timeout=10),
        default_window_size=connection.WINDOW_SIZE,
        default_max_packet_size=connection.MAX_PACKET_SIZE,
        packetizer_class=packetizer_class,
    )
    transport.get_security_options().ciphers = (cipher,)
    host_key = paramiko.Ed25519Key.from_private_key_file(str(sshd.server_dir / "ssh_host_ed25519_key"))
    transport.connect(
        hostkey=host_key,  # its public half is what the server must present
        username=str(sshd.options()["username"]),
        pkey=paramiko.Ed25519Key.from_private_key_file(str(sshd.user_key)),
    )
    return transport


def _download(transport: paramiko.Transport, path: Path) -> bytes:
    sftp = fastpath.start_sftp(transport, connection.WINDOW_SIZE, connection.MAX_PACKET_SIZE)
    received: list[bytes] = []
    transfer.ResumableDownload(str(path), received.append).attempt(sftp)
    sftp.close()
    return b"".join(received)


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr"])
def test_a_download_is_byte_exact_with_each_cipher(
    sshd: SshServer, remote_file: tuple[Path, bytes], cipher: str
) -> None:
    path, data = remote_file
    transport = _transport(sshd, cipher)
    try:
        assert transport.remote_cipher == cipher
        assert _download(transport, path) == data
    finally:
        transport.close()


def test_a_rekey_in_mid_download_keeps_the_stream_byte_exact(sshd: SshServer, remote_file: tuple[Path, bytes]) -> None:
    path, data = remote_file
    transport = _transport(sshd, "aes128-gcm@openssh.com")
    try:
        first_exchange = transport.H
        # Ask for new keys after every MiB received: several key exchanges while
        # packets of the old and the new keys sit in the receive buffer.
        transport.packetizer.REKEY_BYTES = 1024 * 1024
        assert _download(transport, path) == data
        assert transport.H != first_exchange
    finally:
        transport.close()


def _upload(transport: paramiko.Transport, path: Path, data: bytes) -> None:
    sftp = fastpath.start_sftp(transport, connection.WINDOW_SIZE, connection.MAX_PACKET_SIZE)
    with sftp.open(str(path), "wb") as remote:
        writer = transfer.PipelinedWriter(sftp, remote.handle)
        writer.use_long_writes()  # several packets per request, as for a long stream
        for start in range(0, len(data), transfer.LOCAL_CHUNK):
            writer.write(data[start : start + transfer.LOCAL_CHUNK])
        writer.drain()
    sftp.close()


def _uploads_byte_exact(transport: paramiko.Transport, path: Path, size: int) -> bool:
    """Upload `size` random bytes through `transport` (closed afterwards); whether the file holds them."""
    data = os.urandom(size)
    try:
        _upload(transport, path, data)
    finally:
        transport.close()
    return path.read_bytes() == data


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes128-ctr"])
def test_an_upload_is_byte_exact_with_each_cipher(sshd: SshServer, remote_path: Path, cipher: str) -> None:
    assert _uploads_byte_exact(_transport(sshd, cipher), remote_path, 8 * 1024 * 1024 + 777)


def test_a_rekey_in_mid_upload_keeps_the_file_byte_exact(sshd: SshServer, remote_path: Path) -> None:
    transport = _transport(sshd, "aes128-gcm@openssh.com")
    first_exchange = transport.H
    transport.packetizer.REKEY_BYTES = 1024 * 1024  # new keys after every MiB sent
    assert _uploads_byte_exact(transport, remote_path, 8 * 1024 * 1024 + 777)
    assert transport.H != first_exchange


def test_sending_on_a_channel_after_eof_or_close_fails(sshd: SshServer) -> None:
    transport = _transport(sshd, "aes128-gcm@openssh.com")
    try:
        channel = transport.open_session()
        channel.shutdown_write()
        with pytest.raises(EOFError):
            send_channel_data(channel, [b"data"])
        channel.close()
        with pytest.raises(OSError, match="closed"):
            send_channel_data(channel, [b"data"])
    finally:
        transport.close()


def test_a_channel_of_paramiko_own_on_our_transport_gets_its_data_as_bytes(sshd: SshServer, remote_path: Path) -> None:
    # Only channels that asked for views (start_sftp) get them; paramiko's BufferedPipe takes bytes only.
    path, data = remote_path, os.urandom(300_000)
    path.write_bytes(data)
    transport = _transport(sshd, "aes128-gcm@openssh.com")
    try:
        theirs = paramiko.SFTPClient.from_transport(transport)
        assert theirs is not None
        with theirs.open(str(path), "rb") as remote:
            assert remote.read() == data
        assert _download(transport, path) == data
        theirs.close()
    finally:
        transport.close()


def test_writes_work_on_a_transport_with_paramiko_own_packetizer(sshd: SshServer, remote_path: Path) -> None:
    transport = _transport(sshd, "aes128-gcm@openssh.com", packetizer_class=Packetizer)
    assert _uploads_byte_exact(transport, remote_path, 3 * 1024 * 1024 + 5)


def test_a_short_stream_goes_out_with_its_fsync_close_and_checksum_file_in_one_packet(
    sshd: SshServer, remote_path: Path
) -> None:
    # A table's file in a per-table backup, read from a pipe as stdin: after the OPENs of its two files (one
    # packet), its bytes go out with their fsync and CLOSE and the checksum file's WRITE, fsync and CLOSE in one
    # packet, not behind a WRITE of their own (one more wake-up of sshd and sftp-server, one more reply).
    data, checksum = os.urandom(20_000), b"0" * 64 + b"  data\n"
    sidecar = remote_path.with_name(remote_path.name + ".sha256")
    transport = _transport(sshd, "aes128-gcm@openssh.com")
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    try:
        sftp = fastpath.start_sftp(transport, connection.WINDOW_SIZE, connection.MAX_PACKET_SIZE)
        with open(read_end, "rb") as source:
            upload = transfer.ResumableUpload(source.read, str(remote_path), 1024 * 1024, companions=[str(sidecar)],
                                              companion_data=lambda: [checksum])
            before = _counters(transport.packetizer)["sent_packets"]
            upload.attempt(sftp)
            sent = _counters(transport.packetizer)["sent_packets"]
            upload.finish(sftp)
        assert sent - before == 2  # type: ignore[operator]
        assert (remote_path.read_bytes(), sidecar.read_bytes()) == (data, checksum)
    finally:
        transport.close()
        sidecar.unlink(missing_ok=True)
