"""Unit tests of negotiation.py: reading the server's KEXINIT and naming the first kind of algorithm without a
common one, against a real paramiko Transport's lists (never started)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import paramiko
import pytest

from sftp_plugin.fastpath.negotiation import OfferRecordingTransport, ServerOffer, mismatch

# What OpenSSH 9 offers by default, abridged; each test replaces one list.
OPENSSH = {
    "kex": ["curve25519-sha256", "curve25519-sha256@libssh.org", "ext-info-s", "kex-strict-s-v00@openssh.com"],
    "host_keys": ["rsa-sha2-512", "ecdsa-sha2-nistp256", "ssh-ed25519"],
    "ciphers": ["chacha20-poly1305@openssh.com", "aes128-ctr", "aes128-gcm@openssh.com"],
    "macs": ["umac-64-etm@openssh.com", "hmac-sha2-256-etm@openssh.com"],
    "compression": ["none", "zlib@openssh.com"],
}


def kexinit_body(**lists: list[str]) -> bytes:
    """A KEXINIT payload after its type byte, as a server sends it (RFC 4253, 7.1)."""
    offer = {**OPENSSH, **lists}
    message = paramiko.Message()
    message.add_bytes(os.urandom(16))
    for name in ("kex", "host_keys", "ciphers", "ciphers", "macs", "macs", "compression", "compression"):
        message.add_list(offer[name])
    message.add_list([])  # languages, each way
    message.add_list([])
    message.add_boolean(False)
    message.add_int(0)
    return message.asbytes()


@pytest.fixture
def transport() -> Iterator[paramiko.Transport]:
    ours, theirs = socket.socketpair()
    transport = OfferRecordingTransport(ours)
    yield transport
    transport.close()
    theirs.close()


def test_the_offer_is_read_in_the_servers_order_without_protocol_flags() -> None:
    offer = ServerOffer.parse(kexinit_body())
    assert offer.kex == ("curve25519-sha256", "curve25519-sha256@libssh.org")
    assert offer.ciphers_to_server == offer.ciphers_to_client == tuple(OPENSSH["ciphers"])
    assert offer.compression_to_client == ("none", "zlib@openssh.com")


def test_an_offer_sharing_an_algorithm_of_each_kind_is_no_mismatch(transport: paramiko.Transport) -> None:
    assert mismatch(transport, ServerOffer.parse(kexinit_body())) is None


@pytest.mark.parametrize(
    ("lists", "kind", "keyword"),
    [
        ({"kex": ["sntrup761x25519-sha512@openssh.com", "ext-info-s"]}, "key exchange algorithm", "KexAlgorithms"),
        ({"host_keys": ["sk-ssh-ed25519@openssh.com"]}, "host key type", "HostKey"),
        ({"ciphers": ["chacha20-poly1305@openssh.com"]}, "cipher", "Ciphers"),
        ({"macs": ["umac-128-etm@openssh.com"]}, "MAC", "MACs"),
    ],
    ids=["kex", "host key", "cipher", "mac"],
)
def test_a_mismatch_names_its_kind_what_the_server_offers_and_what_the_plugin_supports(
        transport: paramiko.Transport, lists: dict[str, list[str]], kind: str, keyword: str) -> None:
    found = mismatch(transport, ServerOffer.parse(kexinit_body(**lists)))
    assert found is not None
    assert found.kind == kind
    text = found.describe()
    assert text.startswith(f"no {kind} in common: the server offers {next(iter(lists.values()))[0]}")
    assert f"the plugin (paramiko {paramiko.__version__}) supports " in text
    assert "ext-info-s" not in text and "-cert-v01@openssh.com" not in text
    assert keyword in found.advice()


def test_the_first_kind_without_a_common_algorithm_is_named_in_paramikos_order(transport: paramiko.Transport) -> None:
    offer = kexinit_body(ciphers=["x"], host_keys=["sk-ssh-ed25519@openssh.com"])
    found = mismatch(transport, ServerOffer.parse(offer))
    assert found is not None and found.kind == "host key type"
