"""Unit tests of offsets.py: the one-line offsets file gprestore writes for restore_data_subset."""

from __future__ import annotations

import pytest

from sftp_plugin.errors import UsageError
from sftp_plugin.offsets import check_within, parse_offsets


def apply(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(data[start:end] for start, end in ranges)


def test_documented_example_selects_abfg() -> None:
    ranges = parse_offsets("2 0 2 5 7")
    assert ranges == [(0, 2), (5, 7)]
    assert apply(b"ABCDEFGHIJKL", ranges) == b"ABFG"


def test_trailing_newline_and_extra_spaces_are_fine() -> None:
    assert parse_offsets("  3 0 1\t4 6 10 12\n") == [(0, 1), (4, 6), (10, 12)]


def test_adjacent_ranges_are_allowed() -> None:
    assert parse_offsets("2 0 2 2 4") == [(0, 2), (2, 4)]


def test_zero_ranges_select_nothing() -> None:
    assert parse_offsets("0") == []


def test_large_offsets_are_integers_not_floats() -> None:
    big = 300 * 1024**3
    assert parse_offsets(f"1 {big} {big + 1}") == [(big, big + 1)]


@pytest.mark.parametrize("text", ["2 0 2 5", "1 0 2 5 7", "3 0 1 2 3", "1"])
def test_count_mismatch_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="ranges"):
        parse_offsets(text)


@pytest.mark.parametrize("text", ["1 7 5", "2 0 2 6 4"])
def test_end_before_start_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="ends before it starts"):
        parse_offsets(text)


def test_ranges_keep_the_helpers_oid_order() -> None:
    # gpbackup_helper writes one pair per table in the order of its OID list, not by offset.
    data = bytes(range(256))
    ranges = parse_offsets("3 100 200 0 50 50 50")
    assert ranges == [(100, 200), (0, 50), (50, 50)]
    assert apply(data, ranges) == data[100:200] + data[0:50]


@pytest.mark.parametrize(("text", "expected"), [
    ("2 5 7 0 2", b"FGAB"),  # descending
    ("2 0 5 3 7", b"ABCDEDEFG"),  # overlapping
    ("2 2 4 2 4", b"CDCD"),  # the same range twice
    ("3 0 2 10 12 4 6", b"ABKLEF"),  # out of order
])
def test_unordered_or_overlapping_ranges_are_served_in_file_order(text: str, expected: bytes) -> None:
    assert apply(b"ABCDEFGHIJKL", parse_offsets(text)) == expected


@pytest.mark.parametrize("text", ["1 5 5", "1 0 0", "3 0 2 6 6 5 7"])
def test_empty_table_gives_an_empty_range_that_selects_nothing(text: str) -> None:
    ranges = parse_offsets(text)
    assert [(s, e) for s, e in ranges if s == e]
    assert apply(b"ABCDEFGHIJKL", ranges) == apply(b"ABCDEFGHIJKL", [(s, e) for s, e in ranges if s != e])


def test_ranges_up_to_the_end_of_the_file_are_within_it() -> None:
    check_within([(0, 12), (12, 12), (3, 5), (0, 0)], size=12, source="offsets file /tmp/o")


def test_no_ranges_are_within_an_empty_file() -> None:
    check_within([], size=0)


@pytest.mark.parametrize("ranges", [[(0, 13)], [(0, 5), (10, 13)], [(13, 13)], [(100, 200), (0, 5)]])
def test_range_ending_beyond_the_stored_file_is_refused(ranges: list[tuple[int, int]]) -> None:
    with pytest.raises(UsageError, match="beyond") as caught:
        check_within(ranges, size=12, source="offsets file /tmp/offsets_7")
    assert "/tmp/offsets_7" in str(caught.value) and "12 bytes" in str(caught.value)


@pytest.mark.parametrize("text", ["1 -2 5", "1 -5 -2", "-1", "-1 0 2"])
def test_negative_numbers_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_offsets(text)


@pytest.mark.parametrize("text", ["", "   \n", "two 0 2 5 7", "2 0 2 5 7.5", "1 0x0 0x10", "1 +0 2", "1 0 1_0"])
def test_empty_or_non_integer_file_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_offsets(text)


def test_error_names_its_source() -> None:
    with pytest.raises(UsageError, match="/tmp/offsets_7"):
        parse_offsets("2 0 2", source="offsets file /tmp/offsets_7")
