"""SSH algorithm negotiation: what the server offers, what the plugin supports, and one line naming a mismatch.

When the server and paramiko share no key exchange, host key, cipher, MAC or
compression algorithm, paramiko raises ``IncompatiblePeer`` naming only the
kind ("no acceptable ciphers"). An admin needs both lists to fix it, so the
transport keeps the lists of the server's KEXINIT message, and `mismatch`
names the first kind without a common algorithm, in the order paramiko
negotiates them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import paramiko

log = logging.getLogger(__name__)

# Entries of a KEXINIT kex list that are protocol flags, not algorithms (RFC 8308 ext-info, OpenSSH strict kex).
PSEUDO_ALGORITHM_PREFIXES = ("ext-info-", "kex-strict-")
# paramiko also accepts each host key type's certificate form; listing them all would double the message.
CERTIFICATE_SUFFIX = "-cert-v01@openssh.com"


@dataclass(frozen=True)
class ServerOffer:
    """The algorithm lists of the server's KEXINIT (RFC 4253, 7.1), in the server's order."""

    kex: tuple[str, ...]
    host_keys: tuple[str, ...]
    ciphers_to_server: tuple[str, ...]
    ciphers_to_client: tuple[str, ...]
    macs_to_server: tuple[str, ...]
    macs_to_client: tuple[str, ...]
    compression_to_server: tuple[str, ...]
    compression_to_client: tuple[str, ...]

    @classmethod
    def parse(cls, body: bytes) -> ServerOffer:
        """Read a KEXINIT payload after its message type byte: a 16-byte cookie, then the name-lists."""
        message = paramiko.Message(body)
        message.get_bytes(16)  # the cookie
        kex = tuple(name for name in message.get_list() if not name.startswith(PSEUDO_ALGORITHM_PREFIXES))
        return cls(kex, *(tuple(message.get_list()) for _ in range(7)))


class OfferRecordingTransport(paramiko.Transport):  # type: ignore[misc]  # paramiko ships no type hints
    """paramiko's Transport, keeping the server's algorithm lists (`server_offer`) for `mismatch`."""

    server_offer: ServerOffer | None = None

    def _parse_kex_init(self, m: paramiko.Message) -> None:  # paramiko's handler of the peer's KEXINIT
        try:
            self.server_offer = ServerOffer.parse(m.get_remainder())  # get_remainder leaves m where it was
        except Exception:  # noqa: BLE001 - only for a better message: a malformed offer is paramiko's to refuse
            log.debug("could not read the server's KEXINIT", exc_info=True)
        super()._parse_kex_init(m)


@dataclass(frozen=True)
class Mismatch:
    """A kind of algorithm the server and the plugin have none of in common."""

    kind: str  # "cipher", "MAC", ...
    fix: str  # what to change in the backup host's sshd_config
    offered: tuple[str, ...]
    supported: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"no {self.kind} in common: the server offers {', '.join(self.offered) or 'none'}; "
            f"the plugin (paramiko {paramiko.__version__}) supports {', '.join(self.supported)}"
        )

    def advice(self) -> str:
        return f"{self.fix} in the backup host's sshd_config, then restart sshd (README: Supported algorithms)"


def _allow(keyword: str) -> str:
    return f"add one of the plugin's to {keyword}"


def mismatch(transport: paramiko.Transport, offer: ServerOffer) -> Mismatch | None:
    """The first kind of algorithm without a common one, checked in paramiko's order; None when all agree."""
    checks = (
        ("key exchange algorithm", _allow("KexAlgorithms"), offer.kex, transport.preferred_kex),
        (
            "host key type",
            "add a host key of a type the plugin supports (HostKey; ssh-keygen -A makes them) or allow its "
            "type in HostKeyAlgorithms",
            offer.host_keys,
            transport.preferred_keys,
        ),
        ("cipher", _allow("Ciphers"), offer.ciphers_to_server, transport.preferred_ciphers),
        ("cipher", _allow("Ciphers"), offer.ciphers_to_client, transport.preferred_ciphers),
        ("MAC", _allow("MACs"), offer.macs_to_server, transport.preferred_macs),
        ("MAC", _allow("MACs"), offer.macs_to_client, transport.preferred_macs),
        ("compression", "allow 'no' in Compression", offer.compression_to_server, transport.preferred_compression),
        ("compression", "allow 'no' in Compression", offer.compression_to_client, transport.preferred_compression),
    )
    for kind, fix, offered, supported in checks:
        if not set(offered) & set(supported):
            shown = tuple(name for name in supported if not name.endswith(CERTIFICATE_SUFFIX))
            return Mismatch(kind, fix, offered, shown)
    return None
