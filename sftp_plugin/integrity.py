"""SHA-256 sidecars: how a stored file's checksum is named, written and read back.

Each stored file ``<name>`` gets ``<name>.sha256`` beside it, in the format
``sha256sum`` writes (``<64 hex>  <name>``), so an admin can verify a backup on
the backup host itself with ``sha256sum -c *.sha256``. The sidecar is put in
place *before* its data file is renamed into place, so a file under its final
name always has its checksum.
"""

from __future__ import annotations

import hashlib
import re

SIDECAR_SUFFIX = ".sha256"
_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def is_sidecar(name: str) -> bool:
    return name.endswith(SIDECAR_SUFFIX)


def new_hash() -> hashlib._Hash:
    return hashlib.sha256()


def format_sidecar(digest: str, name: str) -> bytes:
    return f"{digest}  {name}\n".encode()


def parse_sidecar(text: bytes) -> str | None:
    """The hex digest in a sidecar, or None if it is not in sha256sum format."""
    match = _LINE_RE.match(text.decode("utf-8", "replace").strip())
    return match.group(1) if match else None
