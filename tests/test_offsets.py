"""Unit tests of offsets.py: the one-line offsets file gprestore writes for restore_data_subset."""

from __future__ import annotations

import pytest

from sftp_plugin.errors import UsageError
from sftp_plugin.offsets import parse_offsets


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


@pytest.mark.parametrize("text", ["1 5 5", "1 7 5", "2 0 2 6 6"])
def test_start_not_below_end_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_offsets(text)


@pytest.mark.parametrize("text", ["2 5 7 0 2", "2 0 5 3 7", "3 0 2 10 12 4 6"])
def test_descending_or_overlapping_ranges_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="ascend"):
        parse_offsets(text)


@pytest.mark.parametrize("text", ["1 -2 5", "1 -5 -2", "-1", "-1 0 2"])
def test_negative_numbers_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_offsets(text)


@pytest.mark.parametrize("text", ["", "   \n", "two 0 2 5 7", "2 0 2 5 7.5", "1 0x0 0x10"])
def test_empty_or_non_integer_file_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_offsets(text)


def test_error_names_its_source() -> None:
    with pytest.raises(UsageError, match="/tmp/offsets_7"):
        parse_offsets("2 0 2", source="offsets file /tmp/offsets_7")
