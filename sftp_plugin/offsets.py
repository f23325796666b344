"""Parsing of the offsets file that gprestore passes to ``restore_data_subset``.

Format: one line ``N s1 e1 s2 e2 ... sN eN``; ranges are half-open
``[s, e)`` and ascending. Everything is validated before any byte is sent to
stdout, so a malformed file changes nothing.
"""

from __future__ import annotations

from sftp_plugin.errors import UsageError

Range = tuple[int, int]


def parse_offsets(text: str, source: str = "offsets file") -> list[Range]:
    fields = text.split()
    if not fields:
        raise UsageError(f"{source} is empty", "gprestore writes 'N s1 e1 ... sN eN'")
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        raise UsageError(f"{source} holds a non-integer", "expected 'N s1 e1 ... sN eN'") from None
    count, bounds = numbers[0], numbers[1:]
    if count < 0 or len(bounds) != 2 * count:
        raise UsageError(
            f"{source} announces {count} ranges but holds {len(bounds)} numbers after the count",
            "expected 2*N numbers after N",
        )
    ranges = list(zip(bounds[0::2], bounds[1::2]))
    previous_end = 0
    for start, end in ranges:
        if start < 0 or start >= end:
            raise UsageError(f"{source}: range [{start}, {end}) is empty or negative", "each start must be < its end")
        if start < previous_end:
            raise UsageError(
                f"{source}: range [{start}, {end}) overlaps or precedes the one before", "ranges must ascend"
            )
        previous_end = end
    return ranges
