"""Table-like test data for the at-rest rows of the bench: what gpbackup streams with --no-compression.

COPY's text format of a table with an id, a date, an amount, a status word,
a short name and a small number per row: decimal digits, dates and a few
hundred distinct words: 3.0x compressible by zstd -1 in 1 MiB chunks and
2.6x by gzip -1, as plain table data is. 16 MiB of distinct rows are generated (fixed seed,
~1 s) and repeated to the size asked for: every 1 MiB chunk of the plugin's
container is still unlike the one before, and neither zstd's nor gzip's
window reaches back 16 MiB.
"""

from __future__ import annotations

import random
from datetime import date, timedelta
from pathlib import Path

UNIQUE_BYTES = 16 * 1024 * 1024  # generated once, then repeated
SEED = 14
STATUSES = ("new", "paid", "shipped", "returned", "cancelled", "on hold")
SYLLABLES = ("an", "ber", "cor", "del", "en", "fal", "gor", "han", "is", "jo", "ka", "lin", "mar", "nor", "ol",
             "per", "qu", "ros", "sel", "tor", "ul", "ven", "wil", "xa", "yor", "zel")


def _rows(rng: random.Random) -> bytes:
    names = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize() for _ in range(150)]
    start = date(2015, 1, 1)
    out: list[str] = []
    size = 0
    row = 0
    while size < UNIQUE_BYTES:
        row += 1
        line = (f"{row}\t{start + timedelta(days=rng.randint(0, 1000))}\t{rng.randint(0, 9_999) / 4:.2f}\t"
                f"{rng.choice(STATUSES)}\t{rng.choice(names)} {rng.choice(names)}\t{rng.randint(0, 99)}\n")
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:UNIQUE_BYTES]


def write_table_data(path: Path, size: int) -> None:
    """Write `size` bytes of table-like rows to `path`."""
    unique = _rows(random.Random(SEED))
    with open(path, "wb") as out:
        left = size
        while left > 0:
            piece = unique[:left]
            out.write(piece)
            left -= len(piece)
