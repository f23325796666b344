"""Parsing of the offsets file that gprestore's helper passes to ``restore_data_subset``.

Format: one line ``N s1 e1 s2 e2 ... sN eN`` of decimal integers; each range
is half-open, ``[s, e)``. gpbackup_helper writes one pair per table it
restores, in the order of its OID list, so ranges may come in any order, be
adjacent or overlap, and an empty table gives ``s == e``: they are served in
the order given, each as it is, and an empty one sends nothing.
`parse_offsets` refuses only what is malformed: a non-integer, a negative
number, an end before its start, or a count that does not match the pairs.
Once the stored file's size is known, `check_within` refuses a range that
ends beyond it. Both run before any byte is sent to stdout, so a bad offsets
file changes nothing.
"""

from __future__ import annotations

import re

from sftp_plugin.errors import UsageError

Range = tuple[int, int]
NUMBER_RE = re.compile(r"-?[0-9]+")


def parse_offsets(text: str, source: str = "offsets file") -> list[Range]:
    """The ranges of an offsets file, in file order, unchanged; UsageError naming ``source`` if malformed."""
    fields = text.split()
    if not fields:
        raise UsageError(f"{source} is empty", "gprestore writes 'N s1 e1 ... sN eN'")
    for field in fields:
        if not NUMBER_RE.fullmatch(field):
            raise UsageError(f"{source} holds a non-integer, {field[:20]!r}", "expected 'N s1 e1 ... sN eN'")
        if field.startswith("-"):
            raise UsageError(f"{source} holds a negative number, {field}", "offsets and the count are >= 0")
    count, *bounds = (int(field) for field in fields)
    if len(bounds) != 2 * count:
        raise UsageError(
            f"{source} announces {count} ranges but holds {len(bounds)} numbers after the count",
            "expected 2*N numbers after N",
        )
    ranges = list(zip(bounds[0::2], bounds[1::2]))
    for start, end in ranges:
        if end < start:
            raise UsageError(f"{source}: range [{start}, {end}) ends before it starts", "each start must be <= its end")
    return ranges


def check_within(ranges: list[Range], size: int, source: str = "offsets file") -> None:
    """Refuse ranges that end beyond the stored file's ``size``: they cannot be served, and it is known before
    any byte goes out."""
    for start, end in ranges:
        if end > size:
            raise UsageError(
                f"{source}: range [{start}, {end}) ends beyond the end of the stored data file ({size} bytes)",
                "the offsets do not belong to this data file; check the backup timestamp and the data file key",
            )
